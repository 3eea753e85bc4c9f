"""`gcl data split` as a streaming Ray Data job: datasets of any size, on every CPU of the cluster.

Each task reads a unit of the input (row groups of a file, gcl.data.units), decides each pair's
split from the hashes of its ids (gcl.data.splits.split_masks, no list of ids anywhere) and writes
the unit's rows of each split as one parquet file, `<out>/<split>/part-<unit>.parquet`: the same
input and seed give the same files (and a retried task rewrites its own). What comes back to the
driver is one row per (split, query or document id) and per file written, which Ray Data's
groupby reduces to the manifest: rows, distinct queries and documents, and
the sha256 of each split's files (as `gcl train` hashes them), so nothing the size of the data is
ever in one process.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gcl import storage
from gcl.data.readers import DataError, resolve_files
from gcl.data.splits import HELD_OUT, SPLIT_NAMES, SplitConfig, check_not_empty, split_masks
from gcl.data.units import Unit, plan_units, unit_batches, units_dataset
from gcl.outputs import DATA_OUTPUT, check_output, replaced_whole

log = logging.getLogger(__name__)
UNIT_ROWS = 50_000
"""Pairs per task at least (consecutive row groups of a file), and so about per file written."""
LOCAL_ROWS = 50_000
"""Datasets of at most this many rows are split in this process rather than as a Ray job."""
MANIFEST = DATA_OUTPUT.marker


class _HashingStream(io.RawIOBase):
    """A writable stream that passes bytes on to `stream` and keeps their sha256."""

    def __init__(self, stream):
        self.stream, self.sha256, self.written = stream, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.sha256.update(data)
        self.written += len(data)
        self.stream.write(data)
        return len(data)

    def tell(self) -> int:
        return self.written


class _SplitWriters:
    """One unit's parquet file per split, <out>/<split>/part-<unit>.parquet, opened on first use."""

    def __init__(self, out: str, index: int):
        self.out, self.file = out, f"part-{index:06d}.parquet"
        self.open: dict[str, tuple] = {}

    def write(self, name: str, rows: pa.Table) -> None:
        if name not in self.open:
            store, path = storage.filesystem(storage.join(self.out, name, self.file))
            stream = store.open_output_stream(path)
            hashing = _HashingStream(stream)
            self.open[name] = (stream, hashing, pq.ParquetWriter(hashing, rows.schema), [0])
        self.open[name][2].write_table(rows)
        self.open[name][3][0] += rows.num_rows

    def close(self) -> list[pa.Table]:
        """Close every file; one stats row each (key: name and sha256)."""
        stats = []
        for name, (stream, hashing, writer, rows) in self.open.items():
            writer.close()
            stream.close()
            stats.append(_rows(name, "file", [f"{self.file}:{hashing.sha256.hexdigest()}"], rows))
        return stats


def split_unit(index: int, unit: Unit, out: str, query_col: str, doc_col: str, cfg: SplitConfig) -> pa.Table:
    """Write unit `index`'s rows of each split under out/<split>/; return (split, kind, key, rows)
    rows: one per query and per document id of each split, one per file written (key: its name and
    sha256) and one counting the pairs in no split."""
    writers = _SplitWriters(out, index)
    ids: dict[tuple[str, str], list[np.ndarray]] = defaultdict(list)
    unused = 0
    for _, batch in unit_batches(unit):
        queries = batch.column(query_col).to_numpy(zero_copy_only=False)
        docs = batch.column(doc_col).to_numpy(zero_copy_only=False)
        masks = split_masks(queries, docs, cfg)
        for name, mask in masks.items():
            if mask.any():
                writers.write(name, pa.Table.from_batches([batch]).filter(pa.array(mask)))
                ids[name, "query"].append(queries[mask].astype(str))
                ids[name, "document"].append(docs[mask].astype(str))
        unused += int((~np.any([masks[n] for n in HELD_OUT if n in masks], axis=0)).sum())
    stats = writers.close()
    for (name, kind), parts in ids.items():
        keys, counts = np.unique(np.concatenate(parts), return_counts=True)
        stats.append(_rows(name, kind, keys, counts))
    stats.append(_rows("unused", "pairs", [""], [unused]))
    return pa.concat_tables(stats)


def _split_task(batch: dict, units: list[Unit], **kwargs) -> pa.Table:
    return pa.concat_tables([split_unit(int(i), units[int(i)], **kwargs) for i in batch["unit"]])


def _rows(split: str, kind: str, keys, counts) -> pa.Table:
    n = len(keys)
    return pa.table(
        {
            "split": [split] * n,
            "kind": [kind] * n,
            "key": pa.array(keys, pa.string()),
            "rows": pa.array(counts, pa.int64()),
        }
    )


def split_dataset(
    spec: str,
    out: str,
    query_col: str,
    doc_col: str,
    cfg: SplitConfig,
    extra: dict | None = None,
    local_rows: int = LOCAL_ROWS,
) -> dict:
    """Split the pairs at `spec` into parquet directories `<out>/<split>/` and write
    `<out>/manifest.json`; return the manifest. Datasets of more than `local_rows` rows are split
    as a Ray Data job; smaller ones by the same functions in this process. `out` is new, empty or
    an earlier split, which the new one replaces once whole (gcl.outputs): a split that fails
    leaves it as it was."""
    out = storage.absolute(out)
    check_output(out, DATA_OUTPUT, inputs=[spec])
    files = resolve_files(spec)
    units = []
    for file in files:
        schema, file_units = plan_units(file, UNIT_ROWS)
        for column in (query_col, doc_col):
            if column not in schema.names:
                raise DataError(f"split: {file}: column {column!r} not in the data; columns are {schema.names}")
        units.extend(file_units)
    names = [n for n in SPLIT_NAMES if cfg.validation or not n.startswith("val_")]
    with replaced_whole(out) as partial:
        for name in names:
            store, path = storage.filesystem(storage.join(partial, name))
            store.create_dir(path, recursive=True)
        task = {"units": units, "out": partial, "query_col": query_col, "doc_col": doc_col, "cfg": cfg}
        on_ray = sum(u.rows for u in units) > local_rows
        totals, files_written = (_reduce_on_ray if on_ray else _reduce_here)(task)
        manifest = _manifest(names, totals, files_written, extra)
        counts = manifest["splits"]
        check_not_empty({n: counts[n]["rows"] for n in names}, cfg)
        store, path = storage.filesystem(storage.join(partial, MANIFEST))
        with store.open_output_stream(path) as stream:
            stream.write(json.dumps(manifest, indent=2).encode())
    return manifest


def _reduce_on_ray(task: dict) -> tuple[list[dict], list[dict]]:
    """Every unit split in a Ray Data task; (totals per split and kind, files written)."""
    from ray.data.aggregate import Count, Sum

    stats = units_dataset(len(task["units"])).map_batches(
        _split_task, fn_kwargs=task, batch_size=1, num_cpus=1, batch_format="pyarrow"
    )
    # One row per (split, kind, key): the distinct ids of each split, and each file. Materialized:
    # the totals and the file list both read it, and the writing tasks must run once.
    per_key = stats.groupby(["split", "kind", "key"]).aggregate(Sum("rows", alias_name="rows")).materialize()
    totals = per_key.groupby(["split", "kind"]).aggregate(Count(alias_name="keys"), Sum("rows", alias_name="rows"))
    files_written = per_key.map_batches(lambda t: t.filter(pc.equal(t["kind"], "file")), batch_format="pyarrow")
    return totals.take_all(), files_written.take_all()


def _reduce_here(task: dict) -> tuple[list[dict], list[dict]]:
    """_reduce_on_ray in this process, with pyarrow's group_by."""
    stats = _split_task({"unit": np.arange(len(task["units"]))}, **task)
    per_key = stats.group_by(["split", "kind", "key"]).aggregate([("rows", "sum")]).rename_columns({"rows_sum": "rows"})
    totals = (
        per_key.group_by(["split", "kind"])
        .aggregate([("key", "count"), ("rows", "sum")])
        .rename_columns({"key_count": "keys", "rows_sum": "rows"})
    )
    return totals.to_pylist(), per_key.filter(pc.equal(per_key["kind"], "file")).to_pylist()


def _manifest(names: list[str], totals: list[dict], files: list[dict], extra: dict | None) -> dict:
    """The splits' rows, distinct queries and documents and combined file hashes (sha256 of the
    files' sha256 in file order, as gcl.data.manifest hashes a directory)."""
    by = {(t["split"], t["kind"]): t for t in totals}
    splits = {}
    for name in names:
        written = sorted(f["key"].split(":") for f in files if f["split"] == name)
        hashes = "".join(sha for _, sha in written)
        splits[name] = {
            "file": f"{name}/",
            "rows": by.get((name, "query"), {}).get("rows", 0),
            "queries": by.get((name, "query"), {}).get("keys", 0),
            "documents": by.get((name, "document"), {}).get("keys", 0),
            "files": len(written),
            "sha256": hashlib.sha256(hashes.encode()).hexdigest(),
        }
    unused = by.get(("unused", "pairs"), {}).get("rows", 0)
    return {"splits": splits, **(extra or {}), "unused_pairs": unused}
