"""The scored-pair schema (Marqo-GS-10M's published parquet layout) and the data config.

One row is a (query, document) pair with its relevance: the query text, document fields
(title, image, ...), ids, the rank position and score columns. Which columns are the
fields of each side is `fields` config; which column is the weight is `loss.weight_key`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from gcl.config import Section

# Marqo-GS-10M's columns. `image` holds {bytes, path} structs (or a path/URI string).
MARQO_GS_COLUMNS = (
    "query",
    "title",
    "image",
    "product_id",
    "query_id",
    "pair_id",
    "position",
    "score_linear",
    "score_reciprocal",
    "no_score",
)
SPLITS = ("in_domain", "novel_query", "novel_document", "zero_shot")


class DataConfig(Section):
    """Where the scored pairs are and how to read them."""

    train: str = "gcl_runs/data/train.parquet"
    """Training pairs: a parquet file, directory or glob (local, or a URI pyarrow reads such as
    s3://...), or a .csv / .jsonl file with image paths."""
    eval: dict[str, str] = Field(default_factory=lambda: {s: f"gcl_runs/data/{s}.parquet" for s in SPLITS})
    """Evaluation (test) splits: split name -> pairs (the ground truth; its documents form the corpus).
    Their figures are what runs report."""
    validation: dict[str, str] = Field(default_factory=dict)
    """Validation splits, shaped as `eval` (`gcl data split` and `gcl data synth` write val_<split>,
    of queries and documents of their own): when given, the objective that ranks epochs, sweep
    trials and registered versions is computed on them and the evaluation splits are reported
    beside it; when empty, it is computed on the evaluation splits themselves (and a sweep warns
    that it selects on what it reports). Left out when data.eval is empty (no evaluation)."""
    image_root: str | None = None
    """Base directory for relative image paths (default: the directory of the data file)."""
    query_id_column: str = "query_id"
    """Column identifying the query (pairs of one query are masked as each other's negatives)."""
    document_id_column: str = "product_id"
    """Column identifying the document."""
    pair_id_column: str = "pair_id"
    """Column identifying the pair; must be unique."""
    on_bad_rows: Literal["error", "skip"] = "error"
    """`error` stops at the first bad rows naming file, row and column; `skip` drops them and
    reports how many and why."""
    validate_images: bool = True
    """Decode every image while validating, in Ray Data tasks over the cluster's CPUs for large
    datasets (about 3,000 images/s per core). With false, undecodable images fail in the
    pipeline instead, naming the pair."""

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        ids = [self.query_id_column, self.document_id_column, self.pair_id_column]
        if len(set(ids)) != 3:
            raise ValueError(f"data.*_id_column must be three different columns, got {ids}")
        return self
