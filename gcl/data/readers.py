"""Read scored pairs: parquet (file, directory or glob; local or a URI pyarrow reads) and
CSV/JSONL with image paths. Images come as encoded bytes, `{bytes, path}` structs or paths."""

from __future__ import annotations

import glob
import io
import math
import os
import re
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from gcl.errors import DataError
from gcl.storage import filesystem, is_uri, local_path

TABLE_SUFFIXES = (".parquet", ".csv", ".jsonl", ".json")
ACCEPTED_FILES = {
    ".parquet": "a parquet file (as pyarrow, pandas, Spark or DuckDB write them)",
    ".csv": "a CSV file with a header line and the same number of cells on every line",
    ".jsonl": "a JSONL file of one JSON object per line",
}
ACCEPTED_FILES[".json"] = ACCEPTED_FILES[".jsonl"]


@contextmanager
def reading(file: str, part: str = ""):
    """Turn pyarrow's error for a file that is not what its name claims (not parquet, truncated,
    a corrupt row group, a ragged CSV line, a broken JSON line) into a DataError that names the
    file, the `part` being read and what would be accepted."""
    try:
        yield
    except (pa.ArrowException, OSError) as err:
        accepted = ACCEPTED_FILES.get(os.path.splitext(file)[1], "a parquet, CSV or JSONL file")
        where = f" {part}" if part else ""
        reason = " ".join(str(err).split())
        # pyarrow numbers a CSV's lines from 1 with the header; gcl's rows from 0 without it.
        reason = re.sub(r"Row #(\d+)", lambda m: f"line {m[1]} (row {int(m[1]) - 2})", reason)
        raise DataError(f"{file}{where}: cannot be read ({reason}); expected {accepted}") from err


def resolve_files(spec: str) -> list[str]:
    """Expand a file, directory or glob into the data files it names, sorted."""
    if any(ch in spec for ch in "*?[") and not is_uri(spec):
        files = sorted(f for f in glob.glob(spec, recursive=True) if f.endswith(TABLE_SUFFIXES))
    else:
        from pyarrow import fs

        store, path = filesystem(spec)
        info = store.get_file_info(path)
        if info.type == fs.FileType.NotFound:
            raise DataError(f"data not found: {spec}; give a parquet, CSV or JSONL file, a directory of them or a glob")
        if info.type == fs.FileType.Directory:
            entries = store.get_file_info(fs.FileSelector(path, recursive=True))
            files = sorted(e.path for e in entries if e.is_file and e.path.endswith(TABLE_SUFFIXES))
            if local_path(spec) is None:  # a remote directory: its files as URIs too
                scheme = spec.split("://", 1)[0]
                files = [f"{scheme}://{f}" for f in files]
        else:
            files = [spec]
    if not files:
        raise DataError(
            f"no data files ({', '.join(TABLE_SUFFIXES)}) at {spec}; give a parquet, CSV or JSONL file, "
            "a directory of them or a glob"
        )
    return _each_file_once(files)


def _each_file_once(files: list[str]) -> list[str]:
    """`files` with each local file once: a directory listing follows symlinks, and a link back to
    a directory above it (or two links to one file) would list the same data many times."""
    shortest: dict[str, str] = {}  # each real file by the shortest path that reaches it
    for file in sorted(files, key=lambda f: (len(f), f)):
        shortest.setdefault(os.path.realpath(file) if local_path(file) is not None else file, file)
    return sorted(shortest.values())


def read_table(file: str, columns: list[str] | None = None) -> pa.Table:
    """Read one data file into an Arrow table (all columns, or those named); DataError when the
    file is not what its name claims."""
    store, path = filesystem(file)
    with reading(file):
        if file.endswith(".parquet"):
            return pq.read_table(path, columns=columns, filesystem=store)
        with store.open_input_stream(path) as stream:
            raw = stream.read()
        if file.endswith(".csv"):
            from pyarrow import csv

            # One thread: pyarrow then names a ragged line's number ("Row #N", the header being 1).
            table = csv.read_csv(io.BytesIO(raw), read_options=csv.ReadOptions(use_threads=False))
        else:
            from pyarrow import json

            table = json.read_json(io.BytesIO(raw))
    return table.select(columns) if columns else table


def image_base_dir(file: str, image_root: str | None) -> str | None:
    """Where relative image paths in `file` point: `image_root`, else the file's own directory
    (for local files)."""
    if image_root:
        return image_root
    path = local_path(file)
    return None if path is None else os.path.dirname(path)


def is_missing(value) -> bool:
    """None, or the NaN / NA that pandas puts where a column has no value (pandas 3 stores a text
    column's nulls as NaN, which str() would turn into the text "nan")."""
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def field_text(value) -> str | None:
    """A text field's value, or None when it is missing or blank."""
    if is_missing(value):
        return None
    text = str(value)
    return text if text.strip() else None


def image_bytes(value, base_dir: str | None) -> bytes | None:
    """Encoded image bytes from a `{bytes, path}` struct, raw bytes or a path/URI; None if absent.

    Raises FileNotFoundError (or OSError) when a referenced file cannot be read.
    """
    if is_missing(value):
        return None
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        value = value.get("path")
        if not value:
            return None
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    path = str(value)
    if not is_uri(path) and not os.path.isabs(path) and base_dir:
        path = str(Path(base_dir) / path)
    store, resolved = filesystem(path)
    with store.open_input_stream(resolved) as stream:
        return stream.read()


FOOTER_ACTORS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"


@contextmanager
def footer_readers_for(files: list[str]):
    """Ray Data's parquet reader starts a pool of footer-reading actors (32 unless
    RAY_DATA_PARQUET_FOOTER_NUM_ACTORS says otherwise) every time a dataset executes: once per
    epoch. Each is a new worker process; on a small machine starting 32 costs seconds of CPU at
    every epoch's start. Start one per batch of 10 files (Ray's batch of footer reads), at most
    32. The reader takes the setting when the dataset is defined, here on the driver; a value
    the user set is kept."""
    if FOOTER_ACTORS_ENV in os.environ:
        yield
        return
    os.environ[FOOTER_ACTORS_ENV] = str(min(32, math.ceil(len(files) / 10)))
    try:
        yield
    finally:
        del os.environ[FOOTER_ACTORS_ENV]


def read_pairs(spec: str, files: list[str], columns: list[str] | None, num_cpus: float = 1.0):
    """A Ray Dataset of the pairs in `files` (resolved from `spec`; parquet, CSV or JSONL), only
    `columns` (None: all); each read task reserves `num_cpus`."""
    import ray.data

    kinds = {os.path.splitext(f)[1] for f in files}
    if kinds == {".parquet"}:
        with footer_readers_for(files):
            return ray.data.read_parquet(files, columns=columns, num_cpus=num_cpus)
    if kinds == {".csv"}:
        ds = ray.data.read_csv(files, num_cpus=num_cpus)
    elif kinds <= {".jsonl", ".json"}:
        ds = ray.data.read_json(files, lines=True, num_cpus=num_cpus)
    else:
        raise DataError(f"{spec}: mixes file types {sorted(kinds)}; use one format per dataset")
    return ds.select_columns(columns) if columns else ds
