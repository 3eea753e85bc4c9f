"""Validate scored pairs before any training starts.

Structural problems (a missing or mistyped column, an empty dataset) always stop with an
error. Row problems (bad scores, empty text, unreadable images, duplicate or missing ids)
stop with an error naming file, row and column, or with `on_bad_rows: skip` are dropped
and reported by reason. Nothing is dropped silently.
"""

from __future__ import annotations

import io
import logging
import math
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
from PIL import Image

from gcl.config import FieldsConfig
from gcl.data.readers import DataError, file_columns, image_base_dir, image_bytes, iter_batches, resolve_files
from gcl.data.schema import DataConfig

log = logging.getLogger(__name__)
MAX_LISTED = 20


@dataclass
class BadRow:
    """One rejected row: where it is and why."""

    file: str
    row: int
    column: str
    reason: str
    pair_id: object = None

    def __str__(self) -> str:
        return f"{self.file} row {self.row} column {self.column!r}: {self.reason}"


@dataclass
class ValidationReport:
    """What validation found across all files of a dataset."""

    files: list[str]
    rows: int = 0
    bad: list[BadRow] = field(default_factory=list)
    score_min: float = math.inf
    score_max: float = -math.inf

    @property
    def bad_pair_ids(self) -> set:
        return {b.pair_id for b in self.bad if b.pair_id is not None}

    @property
    def bad_row_keys(self) -> set[tuple[str, int]]:
        return {(b.file, b.row) for b in self.bad}

    def reasons(self) -> Counter:
        """Count of rejected rows per reason (first problem of each row)."""
        first: dict[tuple[str, int], str] = {}
        for b in self.bad:
            first.setdefault((b.file, b.row), f"{b.column}: {b.reason.split(' (')[0]}")
        return Counter(first.values())

    @property
    def rows_valid(self) -> int:
        return self.rows - len(self.bad_row_keys)

    def summary(self) -> str:
        if not self.bad:
            return f"{self.rows} rows, all valid"
        reasons = ", ".join(f"{n} x {r}" for r, n in self.reasons().most_common())
        return f"{self.rows} rows, {len(self.bad_row_keys)} bad ({reasons})"


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_image(t: pa.DataType) -> bool:
    if pa.types.is_struct(t):
        return t.get_field_index("bytes") >= 0 or t.get_field_index("path") >= 0
    return _is_text(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def _is_id(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or _is_text(t)


def _check_schema(file: str, schema: pa.Schema, expected: dict[str, tuple[str, object]]) -> None:
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


@dataclass(frozen=True)
class RowRules:
    """What a valid row is: its columns (the sides' fields, the weight key, the ids) and the
    lowest acceptable weight-key value (1 for rank positions)."""

    data: DataConfig
    fields: FieldsConfig
    weight_key: str
    min_score: float = 0.0

    def expected_columns(self) -> dict[str, tuple[str, object]]:
        """Column -> (what it must hold, in words; a check of its arrow type)."""
        expected: dict[str, tuple[str, object]] = {
            self.weight_key: ("a numeric type", _is_number),
            self.data.query_id_column: ("integer or string ids", _is_id),
            self.data.document_id_column: ("integer or string ids", _is_id),
            self.data.pair_id_column: ("integer or string ids", _is_id),
        }
        for name, modality in self.fields.modalities().items():
            if modality == "text":
                expected[name] = ("string (text)", _is_text)
            else:
                expected[name] = ("encoded image bytes, a {bytes, path} struct or a path string", _is_image)
        return expected


def validate_pairs(
    spec: str,
    data: DataConfig,
    fields: FieldsConfig,
    weight_key: str,
    *,
    min_score: float = 0.0,
    files: list[str] | None = None,
) -> ValidationReport:
    """Check every row of the dataset at `spec` (its `files`, listed here when not given); raise
    DataError or return a report, which carries the files on to training and the manifest.

    min_score: the lowest acceptable weight-key value (1 for rank positions).
    """
    files = files or resolve_files(spec)
    rules = RowRules(data, fields, weight_key, min_score)
    expected = rules.expected_columns()
    report = ValidationReport(files=files)
    seen_pairs: dict[object, tuple[str, int]] = {}
    for file in files:
        _check_schema(file, file_columns(file), expected)
        base_dir = image_base_dir(file, data.image_root)
        for offset, batch in iter_batches(file, list(expected)):
            rows = _BatchRows(file, offset, batch, report, data.pair_id_column)
            _check_scores(rows, rules)
            _check_ids(rows, rules, seen_pairs)
            for side in ("left", "right"):
                _check_side(rows, rules, side, base_dir)
            report.rows += batch.num_rows
    if report.rows == 0:
        raise DataError(f"{spec}: the dataset is empty (0 rows in {len(files)} file(s))")
    if report.bad and data.on_bad_rows == "error":
        listed = "\n  ".join(str(b) for b in report.bad[:MAX_LISTED])
        more = f"\n  ... and {len(report.bad) - MAX_LISTED} more" if len(report.bad) > MAX_LISTED else ""
        raise DataError(
            f"{spec}: {report.summary()}:\n  {listed}{more}\n"
            "Fix these rows, or set data.on_bad_rows=skip to drop them (they are counted and reported)."
        )
    if report.rows_valid == 0:
        raise DataError(f"{spec}: no valid rows left after skipping bad ones ({report.summary()})")
    if report.bad:
        log.warning("%s: skipping bad rows: %s", spec, report.summary())
    return report


class _BatchRows:
    """One batch of a file as Python values, and the rows rejected so far (with their reasons,
    recorded in the report)."""

    def __init__(
        self, file: str, offset: int, batch: pa.RecordBatch, report: ValidationReport, pair_id_column: str
    ):
        self.file, self.offset, self.report = file, offset, report
        self.count = batch.num_rows
        self.columns = {name: batch.column(name).to_pylist() for name in batch.schema.names}
        self.rejected: set[int] = set()
        self._pair_ids = self.columns[pair_id_column]

    def reject(self, i: int, column: str, reason: str) -> None:
        self.report.bad.append(BadRow(self.file, self.offset + i, column, reason, self._pair_ids[i]))
        self.rejected.add(i)


def _check_scores(rows: _BatchRows, rules: RowRules) -> None:
    """Weight-key values: finite and at least min_score; the range of the valid ones is recorded."""
    accepted = f"accepted: a finite number >= {rules.min_score}"
    report = rows.report
    for i, score in enumerate(rows.columns[rules.weight_key]):
        if score is None:
            rows.reject(i, rules.weight_key, f"score is missing (null or NaN) ({accepted})")
        elif not math.isfinite(score):
            rows.reject(i, rules.weight_key, f"score is {score} ({accepted})")
        elif score < rules.min_score:
            rows.reject(i, rules.weight_key, f"score {score} is below {rules.min_score} ({accepted})")
        else:
            report.score_min = min(report.score_min, float(score))
            report.score_max = max(report.score_max, float(score))


def _check_ids(rows: _BatchRows, rules: RowRules, seen_pairs: dict[object, tuple[str, int]]) -> None:
    """Query and document ids present; pair ids present and unique across the dataset."""
    data = rules.data
    for column in (data.query_id_column, data.document_id_column):
        for i, value in enumerate(rows.columns[column]):
            if value is None:
                rows.reject(i, column, "id is missing")
    for i, pid in enumerate(rows.columns[data.pair_id_column]):
        if pid is None:
            rows.reject(i, data.pair_id_column, "pair id is missing")
        elif pid in seen_pairs:
            first_file, first_row = seen_pairs[pid]
            rows.reject(
                i, data.pair_id_column, f"duplicate pair id {pid!r} (first at {first_file} row {first_row})"
            )
        else:
            seen_pairs[pid] = (rows.file, rows.offset + i)


def _check_side(rows: _BatchRows, rules: RowRules, side: str, base_dir: str | None) -> None:
    """A side's fields: no empty text, images that decode (data.validate_images), and a value in
    at least one field of positive weight (a null is a missing value, not an error)."""
    specs = getattr(rules.fields, side)
    present = [[False] * rows.count for _ in specs]
    for k, (name, spec) in enumerate(specs.items()):
        for i, value in enumerate(rows.columns[name]):
            if value is None:
                continue
            if spec.modality == "text":
                if not str(value).strip():
                    rows.reject(i, name, "empty text (accepted: non-empty text, or null for a missing value)")
                    continue
            elif rules.data.validate_images:
                problem = _image_problem(value, base_dir)
                if problem:
                    rows.reject(i, name, problem)
                    continue
            present[k][i] = True
    usable = [n for n, s in specs.items() if s.weight > 0]
    for i in range(rows.count):
        if i not in rows.rejected and not any(present[k][i] for k, n in enumerate(specs) if n in usable):
            rows.reject(i, "/".join(usable), f"the {side} side has no value in any field")


def _image_problem(value, base_dir) -> str | None:
    """None if the image decodes, else why not."""
    try:
        raw = image_bytes(value, base_dir)
    except (FileNotFoundError, OSError) as err:
        return f"image file cannot be read ({err})"
    if raw is None:
        return None
    try:
        with Image.open(io.BytesIO(raw)) as img:
            img.load()
    except Exception as err:  # PIL raises several types for corrupt data
        return f"image cannot be decoded ({type(err).__name__}: {err}); accepted: PNG/JPEG/WebP bytes or a path to one"
    return None
