"""`gcl bench --only search`: what search costs, side by side in one run.

- Indexes: on `rows` unit vectors (1M by default) of the model's dimension and of 512 (ViT-B-32's),
  each index kind at its default settings against FAISS's exact flat index on the same vectors and
  queries: queries/s and its ratio to flat's, recall@10 against flat's top 10, build seconds
  (gcl index's whole build: reading the parquet, training, adding) and index bytes. The vectors
  cluster around rows/100 random directions, as a catalog's embeddings cluster by kind of product;
  uniformly random vectors in hundreds of dimensions have no near neighbours (every vector is
  about as far as every other), so no approximate index finds their top 10: that case is measured
  too, on fewer vectors, and printed as such.
- Embedding: `gcl embed` (Ray Data read tasks and one actor) against a bare loop in this process
  over the same rows, model, batch size and torch threads (the actor's CPUs).
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

CENTRES_SEED = 12_345


def clustered_unit_vectors(
    rows: int, dim: int, seed: int, centres: int | None = None, spread: float = 0.8, block: int = 65_536
) -> np.ndarray:
    """(rows, dim) float32 unit vectors, each a random one of `centres` directions (default rows /
    100; the same directions for the same count and dim, whatever `seed`) plus Gaussian noise of
    norm about `spread`; generated a block at a time."""
    centres = centres or max(1, rows // 100)
    directions = np.random.default_rng([CENTRES_SEED, centres, dim]).standard_normal((centres, dim), dtype=np.float32)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    out = np.empty((rows, dim), dtype=np.float32)
    for start in range(0, rows, block):
        n = min(block, rows - start)
        part = directions[rng.integers(0, centres, n)]
        part += rng.standard_normal((n, dim), dtype=np.float32) * (spread / np.sqrt(dim))
        part /= np.linalg.norm(part, axis=1, keepdims=True)
        out[start : start + n] = part
    return out


def uniform_unit_vectors(rows: int, dim: int, seed: int) -> np.ndarray:
    out = np.random.default_rng(seed).standard_normal((rows, dim), dtype=np.float32)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def write_embeddings(directory: str, vectors: np.ndarray, rows_per_file: int = 262_144) -> str:
    """`vectors` as `gcl embed` writes embeddings (ids 0.., fixed-size float32 lists, gcl metadata)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from gcl.search.batch_embed import EMBEDDING_COLUMN, METADATA_KEY, SUMMARY_FILE

    os.makedirs(directory, exist_ok=True)
    dim = vectors.shape[1]
    meta = json.dumps({"model_uri": "bench", "side": "right", "dim": dim, "id_column": "id"}).encode()
    for part, start in enumerate(range(0, len(vectors), rows_per_file)):
        chunk = vectors[start : start + rows_per_file]
        table = pa.table(
            {
                "id": pa.array(np.arange(start, start + len(chunk))),
                EMBEDDING_COLUMN: pa.FixedSizeListArray.from_arrays(pa.array(chunk.reshape(-1)), dim),
            }
        )
        pq.write_table(table.replace_schema_metadata({METADATA_KEY: meta}), f"{directory}/part-{part:04d}.parquet")
    with open(os.path.join(directory, SUMMARY_FILE), "w") as f:  # last, as gcl embed writes it: the output is whole
        json.dump({**json.loads(meta), "rows": len(vectors)}, f)
    return directory


def _timed_search(index, queries: np.ndarray, k: int, repeats: int = 3) -> tuple[float, np.ndarray]:
    """(best queries/s of `repeats`, found positions)."""
    best, found = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        _, found = index.search(queries, k)
        best = min(best, time.perf_counter() - start)
    return len(queries) / best, found


def index_figures(
    rows: int,
    dim: int,
    n_queries: int = 1000,
    k: int = 10,
    kinds=("hnsw", "ivf-pq"),
    vectors: str = "clustered",
    workdir: str | None = None,
) -> dict:
    """Each index kind at its defaults against FAISS flat on the same vectors and queries."""
    import faiss

    from gcl.job_config import IndexConfig
    from gcl.search.faiss_index import SearchIndex, build_index
    from gcl.search.index_eval import neighbour_recall

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    tag = f"{vectors}_{rows // 1000}k_d{dim}"
    if vectors == "clustered":
        corpus = clustered_unit_vectors(rows, dim, seed=1)
        queries = clustered_unit_vectors(n_queries, dim, seed=2, centres=max(1, rows // 100))
    else:
        corpus, queries = uniform_unit_vectors(rows, dim, 1), uniform_unit_vectors(n_queries, dim, 2)
    with tempfile.TemporaryDirectory(prefix="gcl-bench-search-", dir=workdir) as scratch:
        source = write_embeddings(f"{scratch}/embeddings", corpus)
        del corpus
        figures: dict = {}
        flat = build_index(IndexConfig(kind="flat", embeddings=source, out=f"{scratch}/flat"))
        flat_qps, exact = _timed_search(SearchIndex(f"{scratch}/flat"), queries, k)
        figures[f"search_{tag}_flat_queries_per_s"] = flat_qps
        figures[f"search_{tag}_flat_bytes"] = flat["index_bytes"]
        for kind in kinds:
            built = build_index(IndexConfig(kind=kind, embeddings=source, out=f"{scratch}/{kind}"))
            qps, found = _timed_search(SearchIndex(f"{scratch}/{kind}"), queries, k)
            name = f"search_{tag}_{kind.replace('-', '')}"
            figures.update(
                {
                    f"{name}_queries_per_s": qps,
                    f"{name}_over_flat": qps / flat_qps,
                    f"{name}_recall_at_10": neighbour_recall(found, exact, 10),
                    f"{name}_build_s": built["build_seconds"],
                    f"{name}_bytes": built["index_bytes"],
                }
            )
    return figures


def embed_figures(job, rows: int = 20_000, workdir: str | None = None) -> dict:
    """`gcl embed`'s rows/s (end to end, and while its actor embeds) against a bare loop in this
    process: the same rows read from the same parquet, model, batch size and torch threads."""
    import json

    import pandas as pd
    import pyarrow.parquet as pq
    import torch

    from gcl.data.synth import SynthConfig, synthesize
    from gcl.job_config import EmbedConfig
    from gcl.model import ModelConfig, create_model, save_model
    from gcl.retrieval import RowEncoder
    from gcl.search.batch_embed import embed_rows

    scratch = tempfile.mkdtemp(prefix="gcl-bench-embed-", dir=workdir)
    synthesize(f"{scratch}/data", SynthConfig(products=max(rows, 400), queries=max(150, rows // 20), seed=5))
    catalog = pq.read_table(f"{scratch}/data/train.parquet").to_pandas().drop_duplicates("product_id")
    while len(catalog) < rows:  # the synthetic pairs hold each product once at most: repeat them
        catalog = pd.concat(
            [catalog, catalog.assign(product_id=catalog["product_id"].astype(str) + f"-{len(catalog)}")]
        )
    catalog = catalog.head(rows)
    catalog.to_parquet(f"{scratch}/catalog.parquet", row_group_size=512)
    torch.manual_seed(0)
    model = create_model(ModelConfig(arch=job.model.arch))
    model_dir = save_model(model.clip, model.model_cfg, f"{scratch}/model")
    (model_dir / "gcl_fields.json").write_text(json.dumps(job.fields.model_dump()))
    cfg = EmbedConfig(model=str(model_dir), input=f"{scratch}/catalog.parquet", out=f"{scratch}/out")
    threads = max(1, int(cfg.cpus_per_actor))

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        encoder = RowEncoder.from_model_dir(str(model_dir), device="cpu")
        encoder.base_dir = f"{scratch}"
        start = time.perf_counter()
        frame = pd.read_parquet(f"{scratch}/catalog.parquet", columns=["product_id", *job.fields.right])
        encoder.encode(frame, "right", cfg.batch_size)
        bare = rows / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    marks: list[tuple[float, int]] = []
    start = time.perf_counter()
    embed_rows(
        job, cfg, job.mlflow.resolved_uri(), progress=lambda done, total: marks.append((time.perf_counter(), done))
    )
    total = time.perf_counter() - start
    moving = [(t, n) for t, n in marks if n > 0]
    steady = (
        (moving[-1][1] - moving[0][1]) / (moving[-1][0] - moving[0][0])
        if len(moving) > 1 and moving[-1][0] > moving[0][0]
        else float("nan")
    )
    return {
        "embed_bare_loop_rows_per_s": bare,
        "embed_rows_per_s": rows / total,
        "embed_steady_rows_per_s": steady,
        "embed_steady_over_bare": steady / bare,
        "embed_end_to_end_over_bare": rows / total / bare,
    }


def search_figures(job, rows: int = 1_000_000, uniform_rows: int = 100_000, workdir: str | None = None) -> dict:
    """The search section: embedding against the bare loop, then the indexes at the model's dimension
    and at 512, and the uniformly random case."""
    from gcl.model import ModelConfig, create_model

    model_dim = int(create_model(ModelConfig(arch=job.model.arch)).model_cfg["embed_dim"])
    figures = embed_figures(job, workdir=workdir)
    for dim in dict.fromkeys([model_dim, 512]):
        figures.update(index_figures(rows, dim, workdir=workdir))
    figures.update(index_figures(uniform_rows, 512, kinds=("hnsw",), vectors="uniform", workdir=workdir))
    return figures
