"""Validate scored pairs before any training starts.

Structural problems (a missing or mistyped column, an empty dataset) always stop with an
error. Row problems (bad scores, empty text, unreadable images, duplicate or missing ids)
stop with an error naming file, row and column, or with `on_bad_rows: skip` are dropped
and reported by reason. Nothing is dropped silently.

A dataset is checked in units of row groups (a whole file for CSV/JSONL). Large datasets are a
Ray Data job over the cluster's CPUs: one task per unit runs gcl.data.row_checks, and duplicate
pair ids are found by Ray Data's distributed groupby on the id, so the driver holds only the
counts by reason and the rows it lists (all rejected rows with `on_bad_rows: skip`, which the
pipeline drops by pair id), never the dataset or its ids. Small datasets run the same functions in
this process, where a Ray job's start-up would cost more than the checks.
"""

from __future__ import annotations

import logging
import pickle
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gcl.config import FieldsConfig
from gcl.data.readers import DataError, image_base_dir, resolve_files
from gcl.data.row_checks import BadRow, CheckResult, RowRules, check_batch
from gcl.data.schema import DataConfig
from gcl.data.units import Unit, plan_units, unit_batches, units_dataset

log = logging.getLogger(__name__)
MAX_LISTED = 20
UNIT_ROWS = 4096
"""Rows per check task at least: consecutive row groups of a file are merged up to it."""
LOCAL_ROWS = 50_000
"""Datasets of at most this many rows are checked in this process rather than as a Ray job."""

__all__ = ["BadRow", "RowRules", "ValidationReport", "validate_pairs"]


@dataclass
class ValidationReport:
    """What validation found across all files of a dataset: every rejected row when they are
    skipped (training drops them), the first MAX_LISTED otherwise (the error lists them)."""

    files: list[str]
    rows: int = 0
    bad: list[BadRow] = field(default_factory=list)
    bad_rows: int = 0
    reason_counts: Counter = field(default_factory=Counter)
    score_min: float = float("inf")
    score_max: float = float("-inf")

    @property
    def bad_pair_ids(self) -> set:
        return {b.pair_id for b in self.bad if b.pair_id is not None}

    @property
    def bad_row_keys(self) -> set[tuple[str, int]]:
        return {(b.file, b.row) for b in self.bad}

    def reasons(self) -> Counter:
        """Count of rejected rows per reason (first problem of each row)."""
        return self.reason_counts

    @property
    def rows_valid(self) -> int:
        return self.rows - self.bad_rows

    def summary(self) -> str:
        if not self.bad_rows:
            return f"{self.rows} rows, all valid"
        reasons = ", ".join(f"{n} x {r}" for r, n in self.reasons().most_common())
        return f"{self.rows} rows, {self.bad_rows} bad ({reasons})"


def check_schema(file: str, schema: pa.Schema, expected: dict[str, tuple[str, object]]) -> None:
    names = set(schema.names)
    missing = [c for c in expected if c not in names]
    if missing:
        raise DataError(
            f"{file}: missing column(s) {missing}; the file has {schema.names}. "
            "Set fields.*, loss.weight_key and data.*_id_column to columns that exist."
        )
    for column, (wanted, accepts) in expected.items():
        actual = schema.field(column).type
        if not accepts(actual) and not pa.types.is_null(actual):  # all-null columns fail per row
            raise DataError(f"{file}: column {column!r} has type {actual}, expected {wanted}")


def check_unit(unit: Unit, rules: RowRules, listed: int | None) -> CheckResult:
    """Every row check on one unit."""
    result = CheckResult(listed=listed)
    base_dir = image_base_dir(unit.file, rules.data.image_root)
    for offset, batch in unit_batches(unit, list(rules.expected_columns())):
        check_batch(unit.file, offset, batch, rules, base_dir, result)
    return result


def unit_pair_ids(index: int, unit: Unit, column: str, id_type: pa.DataType) -> pa.Table:
    """(pair_id, unit, row) of `unit`'s rows that have a pair id."""
    parts = []
    for offset, batch in unit_batches(unit, [column]):
        ids = pc.cast(batch.column(0), id_type)
        rows = np.arange(offset, offset + batch.num_rows, dtype=np.int64)
        parts.append(
            pa.table({"pair_id": ids, "unit": pa.array(np.full(len(rows), index, np.int32)), "row": rows}).filter(
                pc.is_valid(ids)
            )
        )
    return pa.concat_tables(parts) if parts else pa.table({"pair_id": pa.array([], id_type)})


def _duplicate_rows(locations: pa.Table, units: list[Unit], column: str) -> list[BadRow]:
    """BadRows for every occurrence after the first (in file and row order) of the pair ids in
    `locations` (pair_id, unit, row)."""
    seen: dict[object, list[tuple[int, int]]] = defaultdict(list)
    for pid, unit, row in zip(*(locations.column(c).to_pylist() for c in ("pair_id", "unit", "row")), strict=True):
        seen[pid].append((unit, row))
    bad = []
    for pid, places in seen.items():
        (first_unit, first_row), *later = sorted(places)
        first_file = units[first_unit].file
        reason = f"duplicate pair id {pid!r} (first at {first_file} row {first_row})"
        bad.extend(BadRow(units[u].file, row, column, reason, pid, "duplicate pair id") for u, row in later)
    return bad


def _id_type(schemas: list[pa.Schema], column: str) -> pa.DataType:
    """One type for the pair ids of all files: int64 when every file has integers, else strings."""
    types = [s.field(column).type for s in schemas]
    return pa.int64() if all(pa.types.is_integer(t) or pa.types.is_null(t) for t in types) else pa.string()


class _Local:
    """Runs the checks in this process."""

    def __init__(self, units: list[Unit], rules: RowRules, id_type: pa.DataType):
        self.units, self.rules, self.id_type = units, rules, id_type

    def check(self, listed: int | None) -> list[CheckResult]:
        return [check_unit(u, self.rules, listed) for u in self.units]

    def pair_ids(self) -> pa.Table:
        column = self.rules.data.pair_id_column
        return pa.concat_tables([unit_pair_ids(i, u, column, self.id_type) for i, u in enumerate(self.units)])

    def repeated(self, listed: int | None) -> tuple[int, pa.Table]:
        """(rows whose pair id came earlier, locations of the repeated ids listed)."""
        ids = self.pair_ids()
        counts = ids.group_by("pair_id").aggregate([("row", "count")])
        repeated = counts.filter(pc.greater(counts["row_count"], 1))
        extra = pc.sum(repeated["row_count"]).as_py() - repeated.num_rows if repeated.num_rows else 0
        listed_ids = repeated["pair_id"][: listed if listed is not None else repeated.num_rows]
        return extra, ids.filter(pc.is_in(ids["pair_id"], listed_ids))


def _check_task(batch: dict, units: list[Unit], rules: RowRules, listed: int | None) -> dict:
    return {
        "result": np.array(
            [pickle.dumps(check_unit(units[int(i)], rules, listed)) for i in batch["unit"]], dtype=object
        )
    }


def _ids_task(batch: dict, units: list[Unit], column: str, id_type: pa.DataType) -> pa.Table:
    return pa.concat_tables([unit_pair_ids(int(i), units[int(i)], column, id_type) for i in batch["unit"]])


class _OnRay(_Local):
    """Runs the checks as Ray Data tasks, one unit per task, over the cluster's CPUs."""

    def _units(self):
        return units_dataset(len(self.units))

    def check(self, listed: int | None) -> list[CheckResult]:
        results = self._units().map_batches(
            _check_task,
            fn_kwargs={"units": self.units, "rules": self.rules, "listed": listed},
            batch_size=1,
            num_cpus=1,
        )
        return [pickle.loads(row["result"]) for row in results.iter_rows()]

    def pair_ids(self):
        return self._units().map_batches(
            _ids_task,
            fn_kwargs={"units": self.units, "column": self.rules.data.pair_id_column, "id_type": self.id_type},
            batch_size=1,
            num_cpus=1,
            batch_format="pyarrow",
        )

    def repeated(self, listed: int | None) -> tuple[int, pa.Table]:
        counts = self.pair_ids().groupby("pair_id").count()
        repeated = counts.map_batches(
            lambda t: t.filter(pc.greater(t["count()"], 1)), batch_format="pyarrow"
        ).materialize()
        if not repeated.count():
            return 0, pa.table({"pair_id": pa.array([], self.id_type), "unit": [], "row": []})
        extra = repeated.sum("count()") - repeated.count()
        rows = repeated.take(listed) if listed is not None else repeated.take_all()
        listed_ids = pa.array([r["pair_id"] for r in rows], self.id_type)
        located = self.pair_ids().map_batches(
            lambda t: t.filter(pc.is_in(t["pair_id"], listed_ids)), batch_format="pyarrow"
        )
        return extra, pa.Table.from_pylist(
            located.take_all(), schema=pa.schema([("pair_id", self.id_type), ("unit", pa.int32()), ("row", pa.int64())])
        )


def validate_pairs(
    spec: str,
    data: DataConfig,
    fields: FieldsConfig,
    weight_key: str,
    *,
    min_score: float = 0.0,
    files: list[str] | None = None,
    local_rows: int = LOCAL_ROWS,
    trimmable: bool = True,
) -> ValidationReport:
    """Check every row of the dataset at `spec` (its `files`, listed here when not given); raise
    DataError or return a report, which carries the files on to training and the manifest.

    min_score: the lowest acceptable weight-key value (1 for rank positions).
    local_rows: datasets of more rows are checked as a Ray Data job.
    trimmable: False for data whose bad rows are never skipped (evaluation splits): one line.
    """
    files = files or resolve_files(spec)
    rules = RowRules(data, fields, weight_key, min_score)
    expected = rules.expected_columns()
    schemas, units = [], []
    for file in files:
        schema, file_units = plan_units(file, UNIT_ROWS)
        check_schema(file, schema, expected)
        schemas.append(schema)
        units.extend(file_units)
    total = sum(u.rows for u in units)
    if total == 0:
        raise DataError(f"{spec}: the dataset is empty (0 rows in {len(files)} file(s))")
    runner = (_Local if total <= local_rows else _OnRay)(units, rules, _id_type(schemas, data.pair_id_column))
    listed = None if data.on_bad_rows == "skip" else MAX_LISTED
    report = _report(files, units, runner, listed)
    if report.bad_rows and data.on_bad_rows == "error":
        raise bad_rows_error(spec, report, trimmable=trimmable)
    if report.rows_valid == 0:
        raise DataError(f"{spec}: no valid rows left after skipping bad ones ({report.summary()})")
    if report.bad_rows:
        log.warning("%s: skipping bad rows: %s", spec, report.summary())
    return report


def bad_rows_error(spec: str, report: ValidationReport, trimmable: bool = True) -> DataError:
    """The error that lists a dataset's first bad rows (file, row, column, why) and their count;
    for data that is never trimmed (an evaluation split), one line with the first."""
    if not trimmable:
        return DataError(
            f"{report.bad[0]}; {report.bad_rows} bad row(s) in {spec}, which is never trimmed "
            "(an evaluation split judges every row): fix them"
        )
    more = report.bad_rows - min(len(report.bad), MAX_LISTED)
    listed_rows = "\n  ".join(str(b) for b in report.bad[:MAX_LISTED])
    more = f"\n  ... and {more} more" if more > 0 else ""
    return DataError(
        f"{spec}: {report.summary()}:\n  {listed_rows}{more}\n"
        "Fix these rows, or set data.on_bad_rows=skip to drop them (they are counted and reported)."
    )


def _report(files: list[str], units: list[Unit], runner: _Local, listed: int | None) -> ValidationReport:
    """Every unit's checks and the dataset's duplicate pair ids, merged in file and row order."""
    found = CheckResult(listed=None)
    for result in runner.check(listed):
        found.add(result)
    extra, locations = runner.repeated(listed)
    duplicates = _duplicate_rows(locations, units, runner.rules.data.pair_id_column)
    already = {(b.file, b.row) for b in found.bad}
    found.bad_rows += extra - sum((b.file, b.row) in already for b in duplicates)
    found.reasons.update(b.label for b in duplicates if (b.file, b.row) not in already)
    order = {f: i for i, f in enumerate(files)}
    bad = sorted(found.bad + duplicates, key=lambda b: (order[b.file], b.row))
    return ValidationReport(
        files=files,
        rows=found.rows,
        bad=bad,
        bad_rows=found.bad_rows,
        reason_counts=found.reasons,
        score_min=found.score_min,
        score_max=found.score_max,
    )


def check_judgements(spec: str, files: list[str], data: DataConfig, grade_column: str) -> None:
    """An evaluation split judges each (query, document) pair once: a DataError naming the pair's
    two rows (file and row) when it is given twice with different grades, which would leave one
    of them to chance (the later one overwrote the earlier). The same pair twice with one grade is
    a harmless repeat. Grouped by pyarrow, not row by row."""
    qcol, dcol = data.query_id_column, data.document_id_column
    columns = list(dict.fromkeys([qcol, dcol, grade_column]))
    parts = []
    for index, file in enumerate(files):
        for unit in plan_units(file, UNIT_ROWS)[1]:
            for first, batch in unit_batches(unit, columns):
                parts.append(
                    pa.table(
                        {
                            "q": pc.cast(batch.column(qcol), pa.string()),
                            "d": pc.cast(batch.column(dcol), pa.string()),
                            "g": pc.cast(batch.column(grade_column), pa.float64()),
                            "file": pa.array([index] * batch.num_rows),
                            "row": pa.array(np.arange(first, first + batch.num_rows)),
                        }
                    )
                )
    if not parts:
        return
    pairs = pa.concat_tables(parts)
    grades = pairs.group_by(["q", "d"], use_threads=False).aggregate([("g", "min"), ("g", "max")])
    conflicts = grades.filter(pc.not_equal(grades["g_min"], grades["g_max"]))
    if conflicts.num_rows == 0:
        return
    q, d = conflicts["q"][0].as_py(), conflicts["d"][0].as_py()
    rows = pairs.filter(pc.and_(pc.equal(pairs["q"], q), pc.equal(pairs["d"], d))).to_pylist()
    where = "; ".join(f"{files[r['file']]} row {r['row']}: {grade_column} {r['g']:g}" for r in rows[:2])
    raise DataError(
        f"{spec}: query {q!r} and document {d!r} are judged twice with different grades ({where}); "
        f"{conflicts.num_rows} pair(s) in all: keep one grade per pair"
    )
