"""Ranking metrics against pytrec_eval (trec_eval) and plain per-query references for ERR/RBP."""

import random

import pytest
import pytrec_eval

from gcl.metrics import evaluate

PYTREC = {
    "ndcg@10": "ndcg_cut_10",
    "map@1000": "map_cut_1000",
    "recall@10": "recall_10",
    "p@10": "P_10",
    "ndcg@3": "ndcg_cut_3",
    "p@5": "P_5",
    "recall@100": "recall_100",
}


def _random_case(seed, n_queries=60, n_docs=80):
    rng = random.Random(seed)
    qrels, run = {}, {}
    for q in range(n_queries):
        qid = f"q{q}"
        judged = rng.sample(range(n_docs), rng.randint(1, 25))
        # Some queries have only non-relevant judgements (grade 0).
        top = 0 if q % 11 == 0 else 3
        qrels[qid] = {f"d{d}": rng.randint(0, top) for d in judged}
        if q % 13 == 5:
            continue  # no run at all for this query
        if q % 17 == 3:
            run[qid] = {}  # empty run
            continue
        retrieved = rng.sample(range(n_docs), rng.randint(1, 60))
        # Coarse scores make many ties, exercising trec_eval's docid tie-break.
        run[qid] = {f"d{d}": float(rng.randint(0, 5)) for d in retrieved}
    run["not_in_qrels"] = {"d1": 1.0}
    return qrels, run


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_equal_to_pytrec_eval_including_ties_and_empty_runs(seed):
    qrels, run = _random_case(seed)
    measures = list(PYTREC) + ["mrr@1000", "mrr@3"]
    means, per_query = evaluate(qrels, run, measures, per_query=True)

    trec_names = set(PYTREC.values()) | {"recip_rank"}
    ref = pytrec_eval.RelevanceEvaluator(qrels, trec_names).evaluate(run)
    # MRR@k is trec_eval's recip_rank on the run cut at k by trec_eval's own ordering.
    cut3 = {q: dict(sorted(d.items(), key=lambda kv: (-kv[1], _neg(kv[0])))[:3]) for q, d in run.items()}
    ref3 = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(cut3)
    assert set(per_query) == set(qrels)
    for qid in qrels:
        want = {ours: ref.get(qid, {}).get(theirs, 0.0) for ours, theirs in PYTREC.items()}
        want["mrr@1000"] = ref.get(qid, {}).get("recip_rank", 0.0)
        want["mrr@3"] = ref3.get(qid, {}).get("recip_rank", 0.0)
        for name, value in want.items():
            assert per_query[qid][name] == pytest.approx(value, abs=1e-9), (qid, name)
    for name in measures:
        mean_ref = sum(per_query[q][name] for q in qrels) / len(qrels)
        assert means[name] == pytest.approx(mean_ref, abs=1e-12)
    # Queries without a run, or with an empty one, score zero.
    assert per_query["q5"]["ndcg@10"] == 0.0 and per_query["q3"]["map@1000"] == 0.0


class _neg(str):
    """Sort key that orders strings descending (trec_eval breaks score ties by docid descending)."""

    def __lt__(self, other):
        return str.__gt__(self, other)


def _err_reference(grades, max_grade):
    p_continue, total = 1.0, 0.0
    for rank, g in enumerate(grades, start=1):
        r = (2**g - 1) / 2**max_grade
        total += p_continue * r / rank
        p_continue *= 1 - r
    return total


def _rbp_reference(grades, p, max_grade):
    return (1 - p) * sum(g / max_grade * p ** (rank - 1) for rank, g in enumerate(grades, start=1))


def test_err_and_rbp_match_per_query_reference():
    qrels, run = _random_case(7)
    measures = ["err", "err@5", "rbp@0.7", "rbp@0.8", "rbp@0.9", "rbp@0.8@10"]
    _, per_query = evaluate(qrels, run, measures, per_query=True)
    max_grade = max(g for docs in qrels.values() for g in docs.values())
    for qid, judged in qrels.items():
        ranked = sorted(run.get(qid, {}).items(), key=lambda kv: (-kv[1], _neg(kv[0])))
        grades = [judged.get(doc, 0) for doc, _ in ranked]
        assert per_query[qid]["err"] == pytest.approx(_err_reference(grades, max_grade), abs=1e-12)
        assert per_query[qid]["err@5"] == pytest.approx(_err_reference(grades[:5], max_grade), abs=1e-12)
        for p in (0.7, 0.8, 0.9):
            assert per_query[qid][f"rbp@{p}"] == pytest.approx(_rbp_reference(grades, p, max_grade), abs=1e-12)
        assert per_query[qid]["rbp@0.8@10"] == pytest.approx(_rbp_reference(grades[:10], 0.8, max_grade), abs=1e-12)


def test_perfect_ranking_scores_one_and_chunking_does_not_change_results():
    qrels = {f"q{i}": {f"d{j}": 3 - j for j in range(3)} for i in range(10)}
    run = {q: {d: float(g) for d, g in docs.items()} for q, docs in qrels.items()}
    means = evaluate(qrels, run, ["ndcg@10", "mrr@10", "recall@10", "map@1000"])
    assert means == {"ndcg@10": 1.0, "mrr@10": 1.0, "recall@10": 1.0, "map@1000": 1.0}
    qrels2, run2 = _random_case(3)
    assert evaluate(qrels2, run2, chunk_queries=7) == evaluate(qrels2, run2)


def test_bad_measure_names_and_empty_qrels_are_rejected():
    with pytest.raises(ValueError, match="unknown measure 'ndgc@10'"):
        evaluate({"q": {"d": 1}}, {}, ["ndgc@10"])
    with pytest.raises(ValueError, match="rbp@0.8"):
        evaluate({"q": {"d": 1}}, {}, ["rbp@1.5"])
    with pytest.raises(ValueError, match="qrels is empty"):
        evaluate({}, {}, ["ndcg@10"])


def test_queries_without_a_relevant_document_are_left_out_with_a_count(caplog):
    from gcl.data.readers import DataError
    from gcl.retrieval import EvalConfig, judged_queries

    cfg = EvalConfig(relevance_level=0.5)
    qrels = {"q1": {"d1": 1.0, "d2": 0.0}, "q2": {"d3": 0.2}, "q3": {"d1": 0.5}}
    assert judged_queries(qrels, "split.parquet", cfg) == {"q1": qrels["q1"], "q3": qrels["q3"]}
    assert "split.parquet: 1 of 3 queries have no document with score_linear >= 0.5" in caplog.text
    assert "query q2" in caplog.text
    with pytest.raises(DataError, match=r"split.parquet: no query has a document with score_linear >= 0.5"):
        judged_queries({"q2": {"d3": 0.2}}, "split.parquet", cfg)
