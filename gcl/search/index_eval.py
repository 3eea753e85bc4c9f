"""The ranking cost of an approximate index: each evaluation split's queries searched in a `gcl
index` index and, exactly, over the same vectors, both scored against the split's judgments.

The index holds a catalog (often more documents than a split's): both searches rank that whole
catalog, so the difference between them is the approximation's alone."""

from __future__ import annotations

import logging

import numpy as np

from gcl.metrics import evaluate
from gcl.retrieval import EvalConfig, RowEncoder, exact_top_k, judged_queries, load_split
from gcl.search.faiss_index import SearchIndex, corpus_vectors

log = logging.getLogger(__name__)
NEIGHBOURS = 10  # the overlap of the index's top 10 with the exact top 10 (recall@10 of the index)


def _run(query_ids, positions: np.ndarray, scores: np.ndarray, ids: np.ndarray) -> dict[str, dict[str, float]]:
    return {
        str(q): {str(ids[p]): float(s) for p, s in zip(pos, sc, strict=True) if p >= 0}
        for q, pos, sc in zip(query_ids, positions, scores, strict=True)
    }


def evaluate_split_with_index(
    row_encoder: RowEncoder, spec: str, data, cfg: EvalConfig, index: SearchIndex, vectors: np.ndarray
) -> dict[str, dict[str, float]]:
    """{'exact': measures, 'index': measures + neighbours_recall@10} of one split; `vectors` are
    the index's own (corpus_vectors), searched exactly."""
    from gcl.data.readers import image_base_dir, resolve_files

    files = resolve_files(spec)
    queries, _, qrels = load_split(files, data, row_encoder.fields, cfg.grade_column)
    row_encoder.base_dir = image_base_dir(files[0], data.image_root)
    judged = judged_queries(qrels, spec, cfg)
    catalog = set(index.ids.astype(str).tolist())
    wanted = {d for docs in judged.values() for d, g in docs.items() if g >= cfg.relevance_level}
    missing = len(wanted - catalog)
    if missing:
        log.warning(
            "%s: %d of %d relevant documents are not in the index: no search can find them", spec, missing, len(wanted)
        )
    q_emb = row_encoder.encode(queries, "left", cfg.batch_size).numpy()
    query_ids = queries[data.query_id_column].astype(str).tolist()
    approx_scores, approx_pos = index.search(q_emb, cfg.k)
    exact_scores, exact_pos = exact_top_k(
        torch_tensor(q_emb), torch_tensor(vectors), cfg.k, cfg.chunk_size, cfg.query_block
    )
    exact_scores, exact_pos = exact_scores.numpy(), exact_pos.numpy()
    results = {
        "exact": evaluate(
            judged,
            _run(query_ids, exact_pos, exact_scores, index.ids),
            cfg.measures,
            relevance_level=cfg.relevance_level,
        ),
        "index": evaluate(
            judged,
            _run(query_ids, approx_pos, approx_scores, index.ids),
            cfg.measures,
            relevance_level=cfg.relevance_level,
        ),
    }
    results["index"]["neighbours_recall@10"] = neighbour_recall(approx_pos, exact_pos, NEIGHBOURS)
    results["exact"]["neighbours_recall@10"] = 1.0
    return results


def neighbour_recall(found: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean share of the exact top k that the approximate top k holds."""
    k = min(k, exact.shape[1])
    return float(
        np.mean([len(set(f[:k].tolist()) & set(e[:k].tolist())) / k for f, e in zip(found, exact, strict=True)])
    )


def torch_tensor(array: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def evaluate_index(
    row_encoder: RowEncoder, index_dir: str, splits: dict[str, str], data, cfg: EvalConfig
) -> dict[str, dict[str, dict[str, float]]]:
    """{'exact search': {split: measures}, '<kind> index': {split: measures}} for every split."""
    index = SearchIndex(index_dir)
    vectors = corpus_vectors(index)
    out: dict[str, dict] = {"exact search": {}, f"{index.info['kind']} index": {}}
    for split, spec in splits.items():
        both = evaluate_split_with_index(row_encoder, spec, data, cfg, index, vectors)
        out["exact search"][split] = both["exact"]
        out[f"{index.info['kind']} index"][split] = both["index"]
    return out
