"""One process trains a run at a time. Two `gcl train` of the same name would share its checkpoints
and its MLflow run (every step logged twice) and both end green; the second one is refused
instead, in one line naming the process that holds the run.

The lock is a file in the run's directory, <storage>/<name>/train.lock, created exclusively and
holding the holder's pid, host and start time; it goes when the holder ends. One left by a
process that died without removing it (SIGKILL) is taken over when that process is gone from
this host. On object storage, which has no exclusive create, runs are not locked (logged).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator

from gcl import storage
from gcl.errors import ConfigError

log = logging.getLogger(__name__)
LOCK_FILE = "train.lock"


@contextlib.contextmanager
def run_lock(run_dir: str, name: str) -> Iterator[None]:
    """Hold the run at `run_dir` for the block; a ConfigError if another live process holds it."""
    local = storage.local_path(run_dir)
    if local is None:
        log.info("%s is on object storage: this run is not locked against a second gcl train of it", run_dir)
        yield
        return
    os.makedirs(local, exist_ok=True)
    path = os.path.join(local, LOCK_FILE)
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    unreadable_since = None
    while not _create(path, mine):
        holder = _read(path)
        if holder is None:  # being written by its holder this instant, removed as we looked, or left empty
            unreadable_since = unreadable_since or time.monotonic()
            if time.monotonic() - unreadable_since > 5:  # a holder that died between creating and writing it
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
            time.sleep(0.1)
            continue
        if holder.get("host") == mine["host"] and not _alive(holder.get("pid")):
            log.warning("taking over %s, left by process %s, which is gone", path, holder.get("pid"))
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            continue
        raise ConfigError(
            f"run {name} is being trained by process {holder.get('pid')} on {holder.get('host')} since "
            f"{holder.get('since')} ({path}): two trainings of one run would share its checkpoints "
            "and MLflow run. Wait for it, or give this one a name of its own (--set name=...); if "
            f"that process is gone, delete {path}"
        )
    try:
        yield
    finally:
        if _read(path) == mine:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def _create(path: str, record: dict) -> bool:
    """Write `record` to `path` if no file is there (atomically); whether it was written."""
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(descriptor, "w") as f:
        json.dump(record, f)
    return True


def _read(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return None


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True  # someone else's process, or a record we cannot read: assume it holds the run
    return True
