"""One rule for everything gcl writes where a user points it (`gcl index`, `embed`, `data split`,
`data synth`, `evaluate -o`): what is at the target is replaced only when it is an earlier output
of the same kind (it holds that kind's marker file), never anything else, and never an input of
the same command; checked before any work. The new output is written beside the target and moved
into place whole, so that a failure (a bad input found late, a full disk, Ctrl-C) leaves what was
there exactly as it was.

Local targets are swapped by two renames. Object stores have no rename: there the new output is
written beside the target, then copied over it once whole (a failure during that copy is the one
window that leaves a mixed target).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from pyarrow import fs

from gcl import storage
from gcl.errors import ConfigError


@dataclass(frozen=True)
class OutputKind:
    """A kind of output: how commands name it, its flag or config key, and the file that marks a
    finished one."""

    what: str
    key: str
    marker: str


# `gcl data split` and `gcl data synth` write the same kind: splits with their manifest.
DATA_OUTPUT = OutputKind("gcl's data splits", "--out", "manifest.json")
EVALUATION_OUTPUT = OutputKind("gcl evaluate's JSON", "-o", "")  # a file: recognised by its content


def check_output(target: str, kind: OutputKind, inputs: Sequence[str | None] = ()) -> None:
    """A ConfigError, before any work, unless `target` is new, an empty directory, or a finished
    output of `kind`; and when it is, holds, or lies inside one of `inputs` (what the command reads)."""
    local = storage.local_path(target)
    if local is not None and _holds_working_directory(local):
        raise ConfigError(f"{kind.key} {target} holds the working directory; give a new directory for {kind.what}")
    for given in filter(None, inputs):
        if _overlap(target, given):
            raise ConfigError(
                f"{kind.key} {target} is, holds or lies inside the input {given}; give another "
                "location, so that the input is not replaced"
            )
    store, path = storage.filesystem(target)
    info = store.get_file_info(path)
    if info.type == fs.FileType.NotFound:
        return
    if info.type != fs.FileType.Directory:
        raise ConfigError(f"{kind.key} {target} is a file; give a directory (new, empty, or an earlier {kind.what})")
    names = sorted(os.path.basename(entry.path) for entry in store.get_file_info(fs.FileSelector(path)))
    if names and kind.marker not in names:
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise ConfigError(
            f"{kind.key} {target} holds {shown} and no {kind.marker}: not {kind.what}, which is all "
            f"gcl replaces there; give a new or empty directory"
        )


def check_output_file(target: str, kind: OutputKind, recognise) -> None:
    """A ConfigError, before any work, unless the file `target` can be written: its directory
    exists, and it is new or an earlier output of `kind` (`recognise(text)` says so)."""
    parent = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(parent):
        raise ConfigError(f"{kind.key} {target}: the directory {parent} does not exist; create it or write elsewhere")
    if os.path.isdir(target):
        raise ConfigError(f"{kind.key} {target} is a directory; give a file name")
    if os.path.exists(target):
        try:
            with open(target) as f:
                ours = recognise(f.read())
        except (OSError, UnicodeDecodeError, ValueError):
            ours = False
        if not ours:
            raise ConfigError(f"{kind.key} {target} exists and is not {kind.what}; give a new file name")


@contextlib.contextmanager
def replaced_whole(target: str) -> Iterator[str]:
    """A new location beside `target` to write the output into; once the block ends it becomes
    `target`, replacing what was there (which check_output allowed). If the block fails, what it
    wrote is removed and `target` is left as it was."""
    local = storage.local_path(target)
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    partial = f"{(local or target).rstrip('/')}.partial-{token}"
    try:
        yield partial
        if local is not None:
            _swap_local(partial, local, f"{local.rstrip('/')}.old-{token}")
        else:
            _copy_over_remote(partial, target)
    finally:
        _remove(partial)


def write_file_whole(target: str, text: str) -> None:
    """Write the local file `target` beside it, then move it into place (os.replace)."""
    partial = f"{target}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(partial, "w") as f:
            f.write(text)
        os.replace(partial, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)


def _swap_local(partial: str, target: str, old: str) -> None:
    if not os.path.exists(partial):
        os.makedirs(partial)  # nothing written: an empty output
    if os.path.exists(target):
        os.rename(target, old)
    os.rename(partial, target)
    shutil.rmtree(old, ignore_errors=True)


def _copy_over_remote(partial: str, target: str) -> None:
    store, path = storage.filesystem(target)
    _, partial_path = storage.filesystem(partial)
    if store.get_file_info(path).type == fs.FileType.Directory:
        store.delete_dir_contents(path)
    store.create_dir(path, recursive=True)
    fs.copy_files(partial_path, path, source_filesystem=store, destination_filesystem=store)


def _remove(location: str) -> None:
    store, path = storage.filesystem(location)
    info = store.get_file_info(path)
    with contextlib.suppress(OSError):
        if info.type == fs.FileType.Directory:
            store.delete_dir(path)
        elif info.type == fs.FileType.File:
            store.delete_file(path)


def _overlap(target: str, given: str) -> bool:
    """Whether `target` and `given` are the same location or one lies inside the other."""
    a, b = storage.local_path(target), storage.local_path(given)
    if a is None or b is None:
        a, b = target.rstrip("/"), given.rstrip("/")
    else:
        a, b = os.path.realpath(a), os.path.realpath(b)
    return a == b or a.startswith(b.rstrip(os.sep) + "/") or b.startswith(a.rstrip(os.sep) + "/")


def _holds_working_directory(path: str) -> bool:
    here, there = os.path.realpath(os.getcwd()), os.path.realpath(path)
    return here == there or here.startswith(there.rstrip(os.sep) + os.sep)
