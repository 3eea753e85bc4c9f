"""Query-disjoint x document-disjoint splits, as in Marqo-GS-10M.

Queries are split into seen and novel, documents into seen and novel:
  train           seen query,  seen document
  in_domain       a sample of training queries with their (seen) training pairs
  novel_query     novel query, seen document
  novel_document  seen query,  novel document
  zero_shot       novel query, novel document
No novel query or novel document appears in train.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from pydantic import Field

from gcl.config import Section


class SplitConfig(Section):
    """Fractions and seed for `gcl data split`."""

    novel_query_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    """Fraction of distinct queries held out of training (novel queries)."""
    novel_document_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    """Fraction of distinct documents held out of training (novel documents)."""
    in_domain_fraction: float = Field(0.2, gt=0.0, le=1.0)
    """Fraction of training queries whose training pairs form the in-domain evaluation split."""
    seed: int = 0
    """Seed for choosing the held-out queries and documents."""


def _sample(values: np.ndarray, fraction: float, rng: np.random.Generator) -> set:
    count = max(1, round(len(values) * fraction))
    return set(rng.choice(values, size=min(count, len(values)), replace=False).tolist())


def build_splits(
    pairs: pd.DataFrame, query_col: str, doc_col: str, cfg: SplitConfig
) -> dict[str, pd.DataFrame]:
    """Split scored pairs into train, in_domain, novel_query, novel_document and zero_shot."""
    for column in (query_col, doc_col):
        if column not in pairs.columns:
            raise ValueError(f"split: column {column!r} not in the data; columns are {list(pairs.columns)}")
    rng = np.random.default_rng(cfg.seed)
    queries = np.sort(pairs[query_col].unique())
    docs = np.sort(pairs[doc_col].unique())
    if len(queries) < 2 or len(docs) < 2:
        raise ValueError(
            f"split: need at least 2 distinct queries and documents, got {len(queries)} and {len(docs)}"
        )
    novel_q = _sample(queries, cfg.novel_query_fraction, rng)
    novel_d = _sample(docs, cfg.novel_document_fraction, rng)
    q_novel = pairs[query_col].isin(novel_q)
    d_novel = pairs[doc_col].isin(novel_d)
    train = pairs[~q_novel & ~d_novel]
    train_queries = np.sort(train[query_col].unique())
    in_domain_q = _sample(train_queries, cfg.in_domain_fraction, rng) if len(train_queries) else set()
    splits = {
        "train": train,
        "in_domain": train[train[query_col].isin(in_domain_q)],
        "novel_query": pairs[q_novel & ~d_novel],
        "novel_document": pairs[~q_novel & d_novel],
        "zero_shot": pairs[q_novel & d_novel],
    }
    empty = [name for name, df in splits.items() if df.empty]
    if empty:
        raise ValueError(
            f"split: {empty} would be empty with {len(queries)} queries and {len(docs)} documents; "
            "raise the fractions or use more data"
        )
    return {name: df.reset_index(drop=True) for name, df in splits.items()}
