"""Units of work over a dataset's files: row groups of a parquet file (a whole file for CSV/JSONL),
each read by one Ray Data task (validation, splitting), in batches that bound its memory."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from gcl.data.readers import read_table, reading
from gcl.storage import filesystem

BATCH_ROWS = 4096
"""Rows a task holds at once (with their images)."""


@dataclass(frozen=True)
class Unit:
    """One check task's rows: row groups of a parquet file (None: the whole file) starting at row
    `first_row` of it."""

    file: str
    first_row: int
    rows: int
    row_groups: tuple[int, ...] | None = None


def plan_units(file: str, unit_rows: int) -> tuple[pa.Schema, list[Unit]]:
    """`file`'s schema (from a parquet footer; CSV/JSONL files, which hold image paths rather than
    images, are read) and the file cut into units of consecutive row groups of at least `unit_rows`
    rows."""
    if not file.endswith(".parquet"):
        schema, rows = (table := read_table(file)).schema, table.num_rows
        return schema, [Unit(file, 0, rows)]
    store, path = filesystem(file)
    with reading(file):
        meta = pq.ParquetFile(path, filesystem=store).metadata
    schema = meta.schema.to_arrow_schema()
    units, groups, first, rows = [], [], 0, 0
    for g in range(meta.num_row_groups):
        groups.append(g)
        rows += meta.row_group(g).num_rows
        if rows >= unit_rows or g == meta.num_row_groups - 1:
            units.append(Unit(file, first, rows, tuple(groups)))
            groups, first, rows = [], first + rows, 0
    return schema, units


def unit_batches(unit: Unit, columns: list[str] | None = None, batch_rows: int = BATCH_ROWS):
    """(first row number in the file, batch) over `unit`'s rows (only `columns`), `batch_rows` at a
    time; DataError naming the row group (and its rows) that cannot be read."""
    if unit.row_groups is None:
        yield from _numbered(unit.first_row, read_table(unit.file, columns).to_batches(batch_rows))
        return
    store, path = filesystem(unit.file)
    with reading(unit.file):
        parquet = pq.ParquetFile(path, filesystem=store)
    offset = unit.first_row
    for group in unit.row_groups:
        last = offset + parquet.metadata.row_group(group).num_rows - 1
        # Streamed a batch at a time (a row group can hold gigabytes of images).
        with reading(unit.file, f"row group {group} (rows {offset}-{last})"):
            for batch in parquet.iter_batches(batch_rows, row_groups=[group], columns=columns):
                yield offset, batch
                offset += batch.num_rows


def _numbered(offset: int, batches):
    """(first row number, batch) for consecutive `batches` starting at row `offset`."""
    for batch in batches:
        yield offset, batch
        offset += batch.num_rows


def units_dataset(count: int):
    """A Ray Dataset of `count` rows {"unit": i}, one block each, for tasks that map a unit index
    to its work (connecting to Ray, or starting it, first)."""
    import ray.data

    from gcl.cluster import init_ray

    init_ray()
    units = ray.data.from_items([{"unit": i} for i in range(count)], override_num_blocks=count)
    # A DataError raised in a task (an unreadable file) reaches the caller as itself.
    units.context.raise_original_map_exception = True
    return units
