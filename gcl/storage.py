"""Where gcl reads and writes: local paths, and URIs that pyarrow reads (s3://, gs://, file://...).

Every place that tells a URI from a local path, lists a location, hashes a file or copies a
directory to or from storage does it here.
"""

from __future__ import annotations

import hashlib
import os

from pyarrow import fs


def is_uri(location: str) -> bool:
    """Whether `location` is a URI (`scheme://...`, file:// included) rather than a plain path."""
    return "://" in location


def local_path(location: str) -> str | None:
    """The absolute local path `location` names (a plain path or a file:// URI), None for other
    URIs, whose files live in remote storage."""
    if location.startswith("file://"):
        return os.path.abspath(location.removeprefix("file://"))
    return None if is_uri(location) else os.path.abspath(location)


def absolute(location: str | None) -> str | None:
    """A local path made absolute (Ray's trials and workers run in directories of their own);
    URIs and None as they are."""
    if location is None or is_uri(location):
        return location
    return os.path.abspath(location)


def filesystem(location: str) -> tuple[fs.FileSystem, str]:
    """(pyarrow filesystem, path within it) for a local path or a URI such as s3://bucket/key."""
    path = local_path(location)
    if path is not None:
        return fs.LocalFileSystem(), path
    return fs.FileSystem.from_uri(location)


def is_file(location: str) -> bool:
    """Whether a file exists at `location` (local or in storage)."""
    store, path = filesystem(location)
    return store.get_file_info(path).type == fs.FileType.File


def file_size(location: str) -> int:
    """Bytes of the file at `location` (local or in storage)."""
    store, path = filesystem(location)
    return store.get_file_info(path).size


def read_text(location: str) -> str | None:
    """The text of the file at `location`, None when it cannot be read."""
    store, path = filesystem(location)
    try:
        with store.open_input_stream(path) as stream:
            return stream.read().decode()
    except OSError:
        return None


def write_text(location: str, text: str) -> None:
    """Write `text` to a file, local or a URI."""
    store, path = filesystem(location)
    with store.open_output_stream(path) as f:
        f.write(text.encode())


def join(location: str, *names: str) -> str:
    """`location`/name/...: a path joined as the OS does, a URI with slashes."""
    if is_uri(location):
        return "/".join([location.rstrip("/"), *names])
    return os.path.join(location, *names)


def file_sha256(location: str, chunk_bytes: int = 1 << 22) -> str:
    """sha256 of a local or remote file's bytes, read in chunks."""
    store, path = filesystem(location)
    digest = hashlib.sha256()
    with store.open_input_stream(path) as stream:
        while chunk := stream.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def download_directory(location: str, scratch: str) -> str:
    """A local directory with what `location` holds: itself where it is local, else a copy of it
    under `scratch`."""
    path = local_path(location)
    if path is not None:
        return path
    store, remote = filesystem(location)
    local = os.path.join(scratch, os.path.basename(remote.rstrip("/")) or "download")
    fs.copy_files(remote, local, source_filesystem=store, destination_filesystem=fs.LocalFileSystem())
    return local


def upload_directory(local: str, location: str) -> None:
    """Copy the local directory `local` to `location` (nothing to do where they are the same)."""
    path = local_path(location)
    if path is not None and os.path.exists(path) and os.path.samefile(local, path):
        return
    store, remote = filesystem(location)
    store.create_dir(remote, recursive=True)
    fs.copy_files(local, remote, source_filesystem=fs.LocalFileSystem(), destination_filesystem=store)
