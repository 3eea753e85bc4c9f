"""Graded ranking metrics with trec_eval's definitions, vectorised with numpy.

Inputs follow pytrec_eval: qrels `{qid: {docid: grade}}` and a run `{qid: {docid: score}}`.
Documents are ranked by score descending, ties broken by docid descending (as trec_eval
does). Every query in qrels is evaluated; one missing from the run scores 0. Queries in
the run but not in qrels are ignored.

Measures (names as returned):
  ndcg@k    trec_eval ndcg_cut: linear gain (the grade), log2 discount, ideal from all qrels
  map@k     trec_eval map_cut: precision at each relevant rank <= k, over all relevant docs
  mrr@k     reciprocal rank of the first relevant document within the top k
  recall@k  relevant retrieved in the top k / relevant in qrels
  p@k       relevant retrieved in the top k / k
  err       expected reciprocal rank over the retrieved list, R = (2^g - 1) / 2^max_grade
  rbp@p     rank-biased precision with persistence p, gain g / max_grade
`err@k` and `rbp@p@k` cut the list at k. "Relevant" means grade >= relevance_level.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

DEFAULT_MEASURES = (
    "ndcg@10",
    "map@1000",
    "mrr@1000",
    "recall@10",
    "p@10",
    "err",
    "rbp@0.7",
    "rbp@0.8",
    "rbp@0.9",
)

Qrels = Mapping[str, Mapping[str, float]]
Run = Mapping[str, Mapping[str, float]]


def _parse_measure(name: str) -> tuple[str, float | None, int | None]:
    """'ndcg@10' -> ('ndcg', None, 10); 'rbp@0.8' -> ('rbp', 0.8, None); 'rbp@0.8@100' -> cut 100."""
    kind, *params = name.lower().split("@")
    known = {"ndcg", "map", "mrr", "recall", "p", "err", "rbp"}
    if kind not in known:
        raise ValueError(f"unknown measure {name!r}; accepted: {sorted(known)} with @k (rbp takes @p, err @k optional)")
    try:
        if kind == "rbp":
            if not params:
                raise ValueError
            p = float(params[0])
            if not 0 < p < 1:
                raise ValueError
            return kind, p, int(params[1]) if len(params) > 1 else None
        if kind == "err":
            return kind, None, int(params[0]) if params else None
        (k,) = params
        if int(k) < 1:
            raise ValueError
        return kind, None, int(k)
    except ValueError:
        raise ValueError(f"measure {name!r}: expected e.g. ndcg@10, err, err@20, rbp@0.8 or rbp@0.8@100") from None


def _rank_chunk(qids: Sequence[str], qrels: Qrels, run: Run) -> tuple[np.ndarray, np.ndarray]:
    """Grades of each query's retrieved documents in trec_eval's rank order.

    Returns (Q, L) grades, zero-padded, and (Q,) run lengths. Sorting is row-wise on a padded
    score matrix; only rows with tied scores pay for the docid tie-break.
    """
    lengths = np.array([len(run.get(q) or ()) for q in qids], dtype=np.int64)
    width = max(int(lengths.max(initial=0)), 1)
    scores = np.full((len(qids), width), -np.inf)
    grades = np.zeros((len(qids), width))
    for row, qid in enumerate(qids):
        entries = run.get(qid)
        if not entries:
            continue
        judged = qrels[qid]
        n = len(entries)
        scores[row, :n] = np.fromiter(entries.values(), dtype=np.float64, count=n)
        grades[row, :n] = [judged.get(doc, 0) for doc in entries]
    order = np.argsort(-scores, axis=1, kind="stable")
    ranked = np.take_along_axis(scores, order, axis=1)
    valid = np.arange(width)[None, :] < lengths[:, None]
    tied = ((ranked[:, 1:] == ranked[:, :-1]) & valid[:, 1:]).any(axis=1)
    for row in np.flatnonzero(tied):
        entries = run[qids[row]]
        n = len(entries)
        docid_rank = np.argsort(np.argsort(np.array(list(entries), dtype=str), kind="stable"))
        order[row, :n] = np.lexsort((-docid_rank, -scores[row, :n]))
    return np.take_along_axis(grades, order, axis=1), lengths


def _ideal_chunk(qids: Sequence[str], qrels: Qrels, width: int) -> np.ndarray:
    """(Q, width) each query's judged grades sorted descending, zero-padded."""
    ideal = np.zeros((len(qids), width))
    for row, qid in enumerate(qids):
        best = sorted(qrels[qid].values(), reverse=True)[:width]
        ideal[row, : len(best)] = best
    return ideal


def evaluate(
    qrels: Qrels,
    run: Run,
    measures: Sequence[str] = DEFAULT_MEASURES,
    *,
    relevance_level: float = 1,
    max_grade: float | None = None,
    per_query: bool = False,
    chunk_queries: int = 2048,
) -> dict[str, float] | tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Mean of each measure over the queries in qrels (and per query if asked).

    max_grade: the top grade for ERR and RBP gains; default the largest grade in qrels.
    chunk_queries: queries scored at once; bounds memory at about chunk x list length.
    Returns {measure: mean}, or ({measure: mean}, {qid: {measure: value}}) with per_query.
    """
    parsed = {m: _parse_measure(m) for m in measures}
    qids = list(qrels.keys())
    if not qids:
        raise ValueError("qrels is empty: there is no query to evaluate")
    if max_grade is None:
        max_grade = max((g for judged in qrels.values() for g in judged.values()), default=0)
    top = max(float(max_grade), 1e-12)

    results = {m: np.zeros(len(qids)) for m in measures}
    for lo in range(0, len(qids), chunk_queries):
        chunk = qids[lo : lo + chunk_queries]
        grades, lengths = _rank_chunk(chunk, qrels, run)
        valid = np.arange(grades.shape[1])[None, :] < lengths[:, None]
        n_relevant = np.array([sum(g >= relevance_level for g in qrels[q].values()) for q in chunk], dtype=float)
        for name, (kind, p, k) in parsed.items():
            results[name][lo : lo + len(chunk)] = _measure(
                kind,
                p,
                k,
                grades,
                valid,
                relevance_level,
                n_relevant,
                top,
                lambda width, chunk=chunk: _ideal_chunk(chunk, qrels, width),
            )

    means = {m: float(v.mean()) for m, v in results.items()}
    if not per_query:
        return means
    return means, {q: {m: float(results[m][i]) for m in measures} for i, q in enumerate(qids)}


def _measure(kind, p, k, grades, valid, relevance_level, n_relevant, top, ideal) -> np.ndarray:
    """One measure for a chunk of queries. grades: (Q, L) in rank order, zero-padded."""
    width = grades.shape[1]
    cut = width if k is None else min(k, width)
    g = grades[:, :cut]
    v = valid[:, :cut]
    ranks = np.arange(1, cut + 1, dtype=np.float64)[None, :]
    relevant = (g >= relevance_level) & v
    if kind == "ndcg":
        discount = 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))
        dcg = (np.maximum(g, 0) * discount[None, :cut]).sum(axis=1)
        best = np.maximum(ideal(k), 0)
        idcg = (best * discount[None, :]).sum(axis=1)
        return np.divide(dcg, idcg, out=np.zeros_like(dcg), where=idcg > 0)
    if kind == "map":
        hits = np.cumsum(relevant, axis=1)
        precision_sum = (relevant * hits / ranks).sum(axis=1)
        return np.divide(precision_sum, n_relevant, out=np.zeros_like(precision_sum), where=n_relevant > 0)
    if kind == "mrr":
        first = np.where(relevant.any(axis=1), relevant.argmax(axis=1) + 1, 0)
        return np.divide(1.0, first, out=np.zeros(len(first)), where=first > 0)
    if kind == "recall":
        found = relevant.sum(axis=1).astype(float)
        return np.divide(found, n_relevant, out=np.zeros_like(found), where=n_relevant > 0)
    if kind == "p":
        return relevant.sum(axis=1) / float(k)
    gain = np.clip(g, 0, top)
    if kind == "err":
        stop = np.where(v, (np.exp2(gain) - 1.0) / np.exp2(top), 0.0)
        reach = np.cumprod(np.concatenate([np.ones((len(g), 1)), 1.0 - stop[:, :-1]], axis=1), axis=1)
        return (stop * reach / ranks).sum(axis=1)
    # rbp
    return (1 - p) * (np.where(v, gain / top, 0.0) * p ** (ranks - 1)).sum(axis=1)
