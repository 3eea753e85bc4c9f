"""The configs of `gcl embed` and `gcl index` (the job config's `embed` and `index` sections), apart
from the code that runs them so that the job config imports no more than it needs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gcl.config import Section


class EmbedConfig(Section):
    """`gcl embed`: which model embeds which rows, and where the embeddings go."""

    model: str | None = None
    """The model: models:/<name>@<alias> or /<version>, runs:/<id>/model, or an exported directory."""
    input: str | None = None
    """The rows to embed: parquet, CSV or JSONL (a file, directory or glob; local or a URI)."""
    out: str | None = None
    """Output directory (local or a URI) for parquet files; a path ending in .lance writes a Lance
    dataset instead."""
    side: Literal["left", "right"] = "right"
    """`right`: documents (the model's right-side fields, e.g. title and image); `left`: queries."""
    id_column: str | None = None
    """The rows' id column (default: data.document_id_column, or data.query_id_column for left)."""
    keep: list[str] = Field(default_factory=list)
    """Input columns copied to the output as they are (e.g. a title to display with search results)."""
    batch_size: int = Field(256, ge=1)
    """Rows per forward pass."""
    actors: int = Field(1, ge=1)
    """Embedding actors (model replicas); each holds the model once."""
    cpus_per_actor: float = Field(1.0, gt=0)
    """CPUs reserved per actor; its torch threads are this, rounded down (at least 1)."""


class IndexConfig(Section):
    """The search index `gcl index` builds from `gcl embed`'s output."""

    embeddings: str | None = None
    """`gcl embed`'s output directory (local or a URI)."""
    out: str | None = None
    """Where the index directory goes (local)."""
    display: list[str] = Field(default_factory=list)
    """Columns of the embeddings (carried by embed.keep) stored with the ids and returned with the
    search model's results, e.g. [title]."""

    kind: Literal["flat", "hnsw", "ivf-pq"] = "hnsw"
    """`flat`: exact search (every vector scored; the reference). `hnsw`: a graph, the fastest
    search at high recall, holding every vector (4 x dim bytes each) plus the graph. `ivf-pq`:
    vectors in `ivf_lists` clusters, compressed to `pq_bytes` bytes each, re-ranked exactly over
    the best `refine_factor` x k candidates (which keeps the full vectors too): the kind that
    scales to corpora larger than memory once the re-ranking is turned off (refine_factor=0)."""
    hnsw_m: int = Field(32, ge=4)
    """HNSW: neighbours per node (more: higher recall, more memory, slower build)."""
    hnsw_ef_construction: int = Field(64, ge=8)
    """HNSW: candidates considered while building (more: a better graph, slower build)."""
    hnsw_ef_search: int = Field(128, ge=1)
    """HNSW: candidates considered per query (more: higher recall, slower search; at least k)."""
    ivf_lists: int | None = Field(None, ge=1)
    """IVF: clusters (default: 4 x sqrt(rows), at most rows / 39, FAISS's training minimum)."""
    ivf_probe: int = Field(8, ge=1)
    """IVF: clusters searched per query (more: higher recall, slower search)."""
    pq_bytes: int | None = Field(None, ge=1)
    """PQ: bytes per compressed vector (a divisor of the dimension; default: dimension / 4)."""
    refine_factor: int = Field(10, ge=0)
    """ivf-pq: candidates re-ranked with the full vectors per result (0: no re-ranking, the
    compressed scores are the result)."""
    train_sample: int = Field(100_000, ge=1000)
    """Vectors an ivf-pq index is trained on (a seeded sample of the corpus)."""
    batch_rows: int = Field(65_536, ge=1)
    """Vectors added to the index at once."""
