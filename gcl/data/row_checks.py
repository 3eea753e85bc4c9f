"""The checks of one batch of scored pairs, vectorized with pyarrow compute: what a valid row is
(RowRules) and the rows of a batch that are not (with file, row, column and why).

Python runs per rejected row (to word its message) and per image (to decode it); everything else
is a pyarrow kernel over the batch's columns. gcl.data.validate runs these over a whole dataset.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, UnidentifiedImageError

from gcl.config import FieldsConfig
from gcl.data.readers import image_bytes
from gcl.data.schema import DataConfig


@dataclass
class BadRow:
    """One rejected row: where it is and why."""

    file: str
    row: int
    column: str
    reason: str
    pair_id: object = None
    kind: str = ""
    """The reason without the row's values, for counting rows by reason."""

    def __str__(self) -> str:
        return f"{self.file} row {self.row} column {self.column!r}: {self.reason}"

    @property
    def label(self) -> str:
        return f"{self.column}: {self.kind or self.reason.split(' (')[0]}"


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


@dataclass
class CheckResult:
    """What the checks found in some rows: how many, the valid scores' range, the rejected rows by
    reason (the first problem of each row), and the rejected rows themselves, up to `listed`
    (None: all of them)."""

    listed: int | None = None
    rows: int = 0
    bad_rows: int = 0
    reasons: Counter = field(default_factory=Counter)
    bad: list[BadRow] = field(default_factory=list)
    score_min: float = math.inf
    score_max: float = -math.inf

    def add(self, other: CheckResult) -> None:
        self.rows += other.rows
        self.bad_rows += other.bad_rows
        self.reasons.update(other.reasons)
        self.score_min, self.score_max = min(self.score_min, other.score_min), max(self.score_max, other.score_max)
        self.keep(other.bad)

    def keep(self, bad: list[BadRow]) -> None:
        room = len(bad) if self.listed is None else max(0, self.listed - len(self.bad))
        self.bad.extend(bad[:room])


class _Rejected:
    """The rows of one batch rejected so far, in the order the checks found them."""

    def __init__(self, file: str, offset: int, pair_ids: pa.Array):
        self.file, self.offset, self.pair_ids = file, offset, pair_ids
        self.bad: list[BadRow] = []
        self.rows: set[int] = set()

    def reject(self, mask, column: str, kind: str, reason_of=None) -> None:
        """Reject the rows where `mask` is true for `kind` of problem; reason_of(i) words row i's
        (default: the kind)."""
        for i in np.flatnonzero(_numpy(mask)).tolist():
            reason = reason_of(i) if reason_of else kind
            self.bad.append(BadRow(self.file, self.offset + i, column, reason, self.pair_ids[i].as_py(), kind))
            self.rows.add(i)


def _numpy(mask) -> np.ndarray:
    """A boolean pyarrow array as numpy, nulls as false."""
    if isinstance(mask, np.ndarray):
        return mask
    return pc.fill_null(mask, False).to_numpy(zero_copy_only=False)


def check_batch(
    file: str, offset: int, batch: pa.RecordBatch, rules: RowRules, base_dir: str | None, result: CheckResult
) -> None:
    """Check the rows of `batch` (rows offset.. of `file`) and add what was found to `result`."""
    rejected = _Rejected(file, offset, batch.column(rules.data.pair_id_column))
    _check_scores(batch, rules, rejected, result)
    _check_ids(batch, rules, rejected)
    for side in ("left", "right"):
        _check_side(batch, rules, side, base_dir, rejected)
    _tally(rejected, batch.num_rows, result)


def check_side_batch(
    file: str,
    offset: int,
    batch: pa.RecordBatch,
    rules: RowRules,
    side: str,
    id_column: str,
    base_dir: str | None,
    result: CheckResult,
) -> None:
    """The checks of one side's rows (a catalog of documents or a list of queries, as `gcl embed`
    reads them): an id, and the side's fields as in check_batch."""
    rejected = _Rejected(file, offset, batch.column(id_column))
    rejected.reject(pc.is_null(batch.column(id_column)), id_column, "id is missing")
    _check_side(batch, rules, side, base_dir, rejected)
    _tally(rejected, batch.num_rows, result)


def _tally(rejected: _Rejected, rows: int, result: CheckResult) -> None:
    """Add a batch's rows and its rejected rows (counted by their first problem) to `result`."""
    first: dict[int, BadRow] = {}
    for bad in rejected.bad:
        first.setdefault(bad.row, bad)
    result.rows += rows
    result.bad_rows += len(first)
    result.reasons.update(b.label for b in first.values())
    result.keep(rejected.bad)


def _check_scores(batch: pa.RecordBatch, rules: RowRules, rejected: _Rejected, result: CheckResult) -> None:
    """Weight-key values: finite and at least min_score; the range of the valid ones is recorded."""
    accepted = f"accepted: a finite number >= {rules.min_score}"
    raw = batch.column(rules.weight_key)
    scores = pc.cast(raw, pa.float64()) if not pa.types.is_null(raw.type) else pa.nulls(len(raw), pa.float64())
    missing = _numpy(pc.is_null(scores, nan_is_null=True))
    infinite = ~missing & _numpy(pc.is_inf(scores))
    below = ~missing & ~infinite & _numpy(pc.less(scores, rules.min_score))
    value = lambda i: raw[i].as_py()  # noqa: E731 - as the file has it: 0, not 0.0
    column = rules.weight_key
    rejected.reject(missing, column, "score is missing", lambda i: f"score is missing (null or NaN) ({accepted})")
    rejected.reject(infinite, column, "score is not finite", lambda i: f"score is {value(i)} ({accepted})")
    rejected.reject(
        below,
        column,
        f"score is below {rules.min_score}",
        lambda i: f"score {value(i)} is below {rules.min_score} ({accepted})",
    )
    valid = pc.filter(scores, pa.array(~(missing | infinite | below)))
    if len(valid):
        low, high = pc.min_max(valid).values()
        result.score_min = min(result.score_min, low.as_py())
        result.score_max = max(result.score_max, high.as_py())


def _check_ids(batch: pa.RecordBatch, rules: RowRules, rejected: _Rejected) -> None:
    """Query, document and pair ids present (duplicate pair ids are found across the dataset)."""
    data = rules.data
    for column in (data.query_id_column, data.document_id_column):
        rejected.reject(pc.is_null(batch.column(column)), column, "id is missing")
    rejected.reject(pc.is_null(batch.column(data.pair_id_column)), data.pair_id_column, "pair id is missing")


def _check_side(batch: pa.RecordBatch, rules: RowRules, side: str, base_dir: str | None, rejected: _Rejected) -> None:
    """A side's fields: no empty text, images that decode (data.validate_images), and a value in
    at least one field of positive weight (a null is a missing value, not an error)."""
    specs = getattr(rules.fields, side)
    present = {}
    for name, spec in specs.items():
        column = batch.column(name)
        given = ~_numpy(pc.is_null(column))
        if pa.types.is_null(column.type):
            pass
        elif spec.modality == "text":
            empty = given & _numpy(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(column)), 0))
            rejected.reject(
                empty,
                name,
                "empty text",
                lambda i: "empty text (accepted: non-empty text, or null for a missing value)",
            )
            given &= ~empty
        elif rules.data.validate_images:
            problems = {i: _image_problem(column[i].as_py(), base_dir) for i in np.flatnonzero(given).tolist()}
            for kind in ("image file cannot be read", "image cannot be decoded"):
                bad = np.zeros(len(column), bool)
                bad[[i for i, p in problems.items() if p and p.startswith(kind)]] = True
                rejected.reject(bad, name, kind, problems.__getitem__)
                given &= ~bad
        present[name] = given
    usable = [n for n, s in specs.items() if s.weight > 0]
    nothing = ~np.any([present[n] for n in usable], axis=0) if usable else np.ones(batch.num_rows, bool)
    nothing[list(rejected.rows)] = False
    rejected.reject(nothing, "/".join(usable), f"the {side} side has no value in any field")


def _image_problem(value, base_dir) -> str | None:
    """None if the image decodes, else why not."""
    try:
        raw = image_bytes(value, base_dir)
    except (FileNotFoundError, OSError) as err:
        return (
            f"image file cannot be read ({err}); accepted: a path to an image file (relative ones start at "
            "data.image_root, else at the data file's directory)"
        )
    if raw is None:
        return None
    try:
        with Image.open(io.BytesIO(raw)) as img:
            img.load()
    except Exception as err:  # PIL raises several types for corrupt data
        detail = "not an image format PIL knows" if isinstance(err, UnidentifiedImageError) else str(err)
        return (
            f"image cannot be decoded ({type(err).__name__}: {detail}); accepted: PNG/JPEG/WebP bytes or a path to one"
        )
    return None
