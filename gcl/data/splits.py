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

Which queries and documents are held out is a seeded hash of their ids (`unit_interval`): the
fractions hold to within sampling error, and any batch of pairs is split on its own, so that
`gcl data split` streams datasets of any size (gcl.data.split_job) and the synthetic benchmark,
held in memory, is split by the same rule.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
from pydantic import Field

from gcl.config import Section
from gcl.data.keys import stable_keys
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
    """Seed of the hash that chooses the held-out queries and documents."""

    @property
    def validation(self) -> bool:
        return self.validation_query_fraction > 0 and self.validation_document_fraction > 0


SPLIT_NAMES = ("train", *SPLITS, *VALIDATION_SPLITS)
HELD_OUT = (
    "train",
    "novel_query",
    "novel_document",
    "zero_shot",
    "val_novel_query",
    "val_novel_document",
    "val_zero_shot",
)
"""The splits every pair is in one of (or none: unused); in_domain and val_in_domain are samples of train."""


def unit_interval(values, seed: int, salt: str) -> np.ndarray:
    """A number in [0, 1) for each id, a seeded hash of it: which side of a split an id falls on is
    decided by the id alone, so that a batch of pairs is split without a list of all ids, and the
    same id lands on the same side in every batch, file and task. `salt` makes queries, documents
    and the in-domain sample draws of their own."""
    values = np.asarray(values)
    unique, inverse = np.unique(values, return_inverse=True)  # strings are hashed once per batch
    salt_key = int.from_bytes(hashlib.blake2b(f"{seed}:{salt}".encode(), digest_size=8).digest(), "little")
    x = stable_keys(unique).astype(np.uint64) ^ np.uint64(salt_key)
    # splitmix64's finalizer: neighbouring ids (0, 1, 2, ...) get independent-looking numbers.
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return ((x >> np.uint64(11)).astype(np.float64) / 2.0**53)[inverse.reshape(-1)]


def _sides(u: np.ndarray, test_fraction: float, validation_fraction: float) -> tuple[np.ndarray, ...]:
    """(seen, novel, validation-novel) masks of ids with hash numbers `u`."""
    novel = u < test_fraction
    held_for_validation = (u >= test_fraction) & (u < test_fraction + validation_fraction)
    return ~novel & ~held_for_validation, novel, held_for_validation


def split_masks(query_ids, doc_ids, cfg: SplitConfig) -> dict[str, np.ndarray]:
    """For pairs (query_ids[i], doc_ids[i]): split name -> which of them are in it (see the module's
    docstring); the val_* splits only when cfg.validation. Any batch of pairs, in any order."""
    vq = cfg.validation_query_fraction if cfg.validation else 0.0
    vd = cfg.validation_document_fraction if cfg.validation else 0.0
    q_seen, q_novel, q_val = _sides(unit_interval(query_ids, cfg.seed, "query"), cfg.novel_query_fraction, vq)
    d_seen, d_novel, d_val = _sides(unit_interval(doc_ids, cfg.seed, "document"), cfg.novel_document_fraction, vd)
    train = q_seen & d_seen
    in_domain = unit_interval(query_ids, cfg.seed, "in_domain")
    masks = {
        "train": train,
        "in_domain": train & (in_domain < cfg.in_domain_fraction),
        "novel_query": q_novel & d_seen,
        "novel_document": q_seen & d_novel,
        "zero_shot": q_novel & d_novel,
    }
    if cfg.validation:
        masks.update(
            {
                "val_in_domain": train
                & (in_domain >= cfg.in_domain_fraction)
                & (in_domain < 2 * cfg.in_domain_fraction),
                "val_novel_query": q_val & d_seen,
                "val_novel_document": q_seen & d_val,
                "val_zero_shot": q_val & d_val,
            }
        )
    return masks


def build_splits(pairs: pd.DataFrame, query_col: str, doc_col: str, cfg: SplitConfig) -> dict[str, pd.DataFrame]:
    """Split scored pairs held in memory (the synthetic benchmark) into train, the four test splits
    and (when cfg.validation) the four val_* splits, as `gcl data split` splits any dataset."""
    for column in (query_col, doc_col):
        if column not in pairs.columns:
            raise DataError(f"split: column {column!r} not in the data; columns are {list(pairs.columns)}")
    queries, docs = pairs[query_col].nunique(), pairs[doc_col].nunique()
    if queries < 2 or docs < 2:
        raise DataError(f"split: need at least 2 distinct queries and documents, got {queries} and {docs}")
    masks = split_masks(pairs[query_col].to_numpy(), pairs[doc_col].to_numpy(), cfg)
    splits = {name: pairs[mask].reset_index(drop=True) for name, mask in masks.items()}
    check_not_empty({name: len(df) for name, df in splits.items()}, cfg)
    return splits


def check_not_empty(rows: dict[str, int], cfg: SplitConfig) -> None:
    """Refuse splits that came out empty (too little data for the fractions), naming the fractions."""
    empty = [name for name, n in rows.items() if n == 0]
    if empty:
        held = (
            f"novel_query_fraction {cfg.novel_query_fraction} + validation_query_fraction "
            f"{cfg.validation_query_fraction} of the queries, novel_document_fraction {cfg.novel_document_fraction} + "
            f"validation_document_fraction {cfg.validation_document_fraction} of the documents, in_domain_fraction "
            f"{cfg.in_domain_fraction} of the training queries"
        )
        raise DataError(
            f"split: {', '.join(empty)} would be empty ({held} held out); lower the fractions or use more data"
        )


def unused_pairs(pairs: pd.DataFrame, splits: dict[str, pd.DataFrame]) -> int:
    """Pairs in no split: a novel query with a validation-novel document, or the reverse."""
    in_a_split = sum(len(df) for name, df in splits.items() if name in HELD_OUT)
    return len(pairs) - in_a_split
