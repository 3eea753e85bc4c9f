"""Query-disjoint x document-disjoint splits, as in Marqo-GS-10M, plus validation splits carved
from queries and documents of their own.

Queries are split into seen, novel and validation-novel; documents likewise:
  train               seen query,  seen document
  in_domain           a sample of training queries with their (seen) training pairs
  novel_query         novel query, seen document
  novel_document      seen query,  novel document
  zero_shot           novel query, novel document
  val_in_domain       another sample of training queries (none of in_domain's), their training pairs
  val_novel_query     validation-novel query, seen document
  val_novel_document  seen query,  validation-novel document
  val_zero_shot       validation-novel query, validation-novel document
No novel or validation-novel query or document appears in train; no query or document held out
for validation appears in a test split, and none held out for testing in a validation split;
the in-domain validation queries are not the in-domain test queries. Sweeps select on the val_*
splits and report the others. (Queries and documents seen in training are on the seen side of
both kinds of split, as they are in training.)
Pairs that join a novel query to a validation-novel document (or the reverse) belong to no split;
the manifest counts them (`unused_pairs`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from pydantic import Field

from gcl.config import Section
from gcl.data.schema import SPLITS
from gcl.errors import DataError

VALIDATION_PREFIX = "val_"
VALIDATION_SPLITS = tuple(VALIDATION_PREFIX + s for s in SPLITS)


class SplitConfig(Section):
    """Fractions and seed for `gcl data split`."""

    novel_query_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    """Fraction of distinct queries held out of training (novel queries)."""
    novel_document_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    """Fraction of distinct documents held out of training (novel documents)."""
    in_domain_fraction: float = Field(0.2, gt=0.0, le=1.0)
    """Fraction of training queries whose training pairs form the in-domain evaluation split
    (and, a different sample, the in-domain validation split)."""
    validation_query_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    """Fraction of distinct queries held out of training and of the test splits for the
    validation splits (0: no validation splits)."""
    validation_document_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    """Fraction of distinct documents held out likewise for the validation splits."""
    seed: int = 0
    """Seed for choosing the held-out queries and documents."""

    @property
    def validation(self) -> bool:
        return self.validation_query_fraction > 0 and self.validation_document_fraction > 0


def _sample(values: np.ndarray, fraction: float, rng: np.random.Generator) -> set:
    count = max(1, round(len(values) * fraction))
    return set(rng.choice(values, size=min(count, len(values)), replace=False).tolist())


def _held_out(values: np.ndarray, test_fraction: float, validation_fraction: float,
              rng: np.random.Generator) -> tuple[set, set]:  # fmt: skip
    """(novel, validation-novel) samples of `values`, disjoint: the novel ones drawn first."""
    novel = _sample(values, test_fraction, rng)
    if validation_fraction <= 0:
        return novel, set()
    rest = np.array([v for v in values if v not in novel], dtype=values.dtype)
    return novel, _sample(rest, validation_fraction / (1 - test_fraction), rng) if len(rest) else set()


def build_splits(
    pairs: pd.DataFrame, query_col: str, doc_col: str, cfg: SplitConfig
) -> dict[str, pd.DataFrame]:
    """Split scored pairs into train, the four test splits and (when cfg.validation) the four
    val_* splits; see the module's docstring."""
    for column in (query_col, doc_col):
        if column not in pairs.columns:
            raise DataError(f"split: column {column!r} not in the data; columns are {list(pairs.columns)}")
    rng = np.random.default_rng(cfg.seed)
    queries = np.sort(pairs[query_col].unique())
    docs = np.sort(pairs[doc_col].unique())
    if len(queries) < 2 or len(docs) < 2:
        raise DataError(
            f"split: need at least 2 distinct queries and documents, got {len(queries)} and {len(docs)}"
        )
    novel_q, val_q = _held_out(queries, cfg.novel_query_fraction, cfg.validation_query_fraction, rng)
    novel_d, val_d = _held_out(docs, cfg.novel_document_fraction, cfg.validation_document_fraction, rng)
    q_novel, q_val = pairs[query_col].isin(novel_q), pairs[query_col].isin(val_q)
    d_novel, d_val = pairs[doc_col].isin(novel_d), pairs[doc_col].isin(val_d)
    q_seen, d_seen = ~q_novel & ~q_val, ~d_novel & ~d_val
    train = pairs[q_seen & d_seen]
    train_queries = np.sort(train[query_col].unique())
    in_domain_q, val_in_domain_q = _held_out(train_queries, cfg.in_domain_fraction,
                                             cfg.in_domain_fraction if cfg.validation else 0.0, rng)  # fmt: skip
    splits = {
        "train": train,
        "in_domain": train[train[query_col].isin(in_domain_q)],
        "novel_query": pairs[q_novel & d_seen],
        "novel_document": pairs[q_seen & d_novel],
        "zero_shot": pairs[q_novel & d_novel],
    }
    if cfg.validation:
        splits.update({
            "val_in_domain": train[train[query_col].isin(val_in_domain_q)],
            "val_novel_query": pairs[q_val & d_seen],
            "val_novel_document": pairs[q_seen & d_val],
            "val_zero_shot": pairs[q_val & d_val],
        })  # fmt: skip
    empty = [name for name, df in splits.items() if df.empty]
    if empty:
        raise DataError(
            f"split: {empty} would be empty with {len(queries)} queries and {len(docs)} documents; "
            "raise the fractions or use more data"
        )
    return {name: df.reset_index(drop=True) for name, df in splits.items()}


def unused_pairs(pairs: pd.DataFrame, splits: dict[str, pd.DataFrame]) -> int:
    """Pairs in no split: a novel query with a validation-novel document, or the reverse."""
    in_a_split = sum(len(df) for name, df in splits.items() if name not in ("in_domain", "val_in_domain"))
    return len(pairs) - in_a_split
