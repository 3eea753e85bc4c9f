"""Evaluation spread over the training workers, instead of rank 0 encoding every split alone while
the others wait.

Each rank encodes the queries and documents whose ids fall to it (gcl.retrieval.shard_of), so N
workers encode about N times less each. The queries' embeddings are all-gathered; each rank
searches its own documents for every query (torch's top-k on the rank's device), and rank 0
merges the ranks' top k and scores the ranking. The documents' embeddings never move: only the
queries and the top-k lists do. The merged ranking is exact search over the
whole corpus (tested against single-process evaluation).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.distributed as dist

from gcl.data.schema import DataConfig
from gcl.metrics import evaluate
from gcl.retrieval import EvalConfig, RowEncoder, judged_queries, prepare_split


def torch_top_k(
    queries: torch.Tensor, docs: torch.Tensor, k: int, chunk_size: int = 2048, query_block: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by inner product with torch on the tensors' device (a GPU's matmul and topk),
    in chunks of `chunk_size` documents per block of `query_block` queries. Returns (scores,
    indices) of shape (Q, min(k, N)), best first, as exact_top_k."""
    k = min(k, docs.shape[0])
    out_scores, out_index = [], []
    for q0 in range(0, queries.shape[0], query_block):
        block = queries[q0 : q0 + query_block]
        best_scores = torch.full((block.shape[0], 0), float("-inf"), device=block.device, dtype=block.dtype)
        best_index = torch.zeros((block.shape[0], 0), device=block.device, dtype=torch.long)
        for d0 in range(0, docs.shape[0], chunk_size):
            scores = block @ docs[d0 : d0 + chunk_size].T
            top = scores.topk(min(k, scores.shape[1]), dim=1)
            merged = torch.cat([best_scores, top.values], dim=1)
            merged_index = torch.cat([best_index, top.indices + d0], dim=1)
            keep = merged.topk(min(k, merged.shape[1]), dim=1)
            best_scores, best_index = keep.values, merged_index.gather(1, keep.indices)
        out_scores.append(best_scores.cpu())
        out_index.append(best_index.cpu())
    return torch.cat(out_scores), torch.cat(out_index)


def _search(queries: torch.Tensor, docs: torch.Tensor, cfg: EvalConfig, device: torch.device):
    # torch's top-k, not the numba kernel (gcl.reservoir) that `gcl evaluate` uses: in a training
    # worker, numba's OpenMP threads slowed the training steps after each evaluation by 2-3.5x
    # (the tiny job's epoch 2: 11.1 s with torch's top-k, 23.5 s with numba on rank 0 alone,
    # 39.5 s with numba on both ranks; 2026-12-02).
    return torch_top_k(queries.to(device), docs.to(device), cfg.k, cfg.chunk_size, cfg.query_block)


def merge_top_k(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best `k` of each query over the ranks' (scores (Q, k_r), document ids (Q, k_r)) lists."""
    scores = np.concatenate([s for s, _ in parts], axis=1)
    ids = np.concatenate([i for _, i in parts], axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


def evaluate_split_on_workers(
    row_encoder: RowEncoder,
    spec: str,
    data: DataConfig,
    cfg: EvalConfig,
    sample: int | None,
    seed: int,
    device: torch.device,
) -> dict[str, float] | None:
    """evaluate_split, with every rank of the torch.distributed group taking part: its metrics on
    rank 0, None on the others."""
    rank, world = dist.get_rank(), dist.get_world_size()
    queries, documents, qrels = prepare_split(row_encoder, spec, data, cfg, sample, seed, (rank, world))
    # A rank may draw no query or no document of a small split.
    q_emb = row_encoder.encode(queries, "left", cfg.batch_size).numpy() if len(queries) else None
    every_query: list = [None] * world
    dist.all_gather_object(every_query, (queries[data.query_id_column].astype(str).tolist(), q_emb))
    query_ids = [q for ids, _ in every_query for q in ids]
    all_queries = torch.from_numpy(np.concatenate([e for _, e in every_query if e is not None]))
    doc_ids = documents[data.document_id_column].astype(str).to_numpy(dtype=object)
    if len(doc_ids):
        d_emb = row_encoder.encode(documents, "right", cfg.batch_size)
        scores, index = _search(all_queries, d_emb, cfg, device)
        mine = (scores.numpy(), doc_ids[index.numpy()])
    else:
        mine = (np.zeros((len(query_ids), 0), np.float32), np.zeros((len(query_ids), 0), object))
    parts: list = [None] * world if rank == 0 else None
    dist.gather_object(mine, parts, dst=0)
    if rank != 0:
        return None
    scores, ids = merge_top_k(parts, cfg.k)
    run = {q: dict(zip(i.tolist(), s.tolist(), strict=True)) for q, i, s in zip(query_ids, ids, scores, strict=True)}
    return evaluate(judged_queries(qrels, spec, cfg), run, cfg.measures, relevance_level=cfg.relevance_level)


def evaluate_splits_on_workers(
    row_encoder: RowEncoder,
    splits: Mapping[str, str],
    data: DataConfig,
    cfg: EvalConfig,
    sample: int | None,
    seed: int,
    device: torch.device,
) -> dict[str, dict[str, float]]:
    """{split: {measure: value}} on rank 0 ({} on the others), every rank encoding its share."""
    results = {
        name: evaluate_split_on_workers(row_encoder, spec, data, cfg, sample, seed, device)
        for name, spec in splits.items()
    }
    return {} if dist.get_rank() != 0 else results
