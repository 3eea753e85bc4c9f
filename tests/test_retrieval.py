"""Exact top-k search equals FAISS's exact inner-product index and a brute-force top-k; evaluation
shared by the training workers equals single-process evaluation."""

import json
import os
import tempfile

import faiss
import numpy as np
import pytest
import torch

from gcl.retrieval import exact_top_k


@pytest.mark.parametrize(
    ("n_docs", "k", "chunk_size", "query_block"),
    [(5000, 100, 1024, 64), (3000, 1000, 700, 37), (50, 100, 16, 8), (2048, 10, 4096, 4096)],
)
def test_exact_top_k_equals_faiss_index_flat_ip(n_docs, k, chunk_size, query_block):
    generator = torch.Generator().manual_seed(n_docs)
    docs = torch.nn.functional.normalize(torch.randn(n_docs, 64, generator=generator), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(200, 64, generator=generator), dim=1)
    scores, index = exact_top_k(queries, docs, k, chunk_size=chunk_size, query_block=query_block)

    reference = faiss.IndexFlatIP(64)
    reference.add(docs.numpy())
    faiss_scores, faiss_index = reference.search(queries.numpy(), min(k, n_docs))
    assert scores.shape == (200, min(k, n_docs))
    np.testing.assert_allclose(scores.numpy(), faiss_scores, atol=1e-5)
    # Same documents, except where two scores tie to float rounding (then either order is right).
    differ = index.numpy() != faiss_index
    assert differ.mean() < 0.01
    all_scores = (queries @ docs.T).numpy()
    rows = np.nonzero(differ)[0]
    gaps = np.abs(all_scores[rows, index.numpy()[differ]] - all_scores[rows, faiss_index[differ]])
    assert (gaps < 1e-5).all()
    brute = torch.topk(queries @ docs.T, min(k, n_docs), dim=1)
    np.testing.assert_allclose(scores.numpy(), brute.values.numpy(), atol=1e-5)
    # Reported scores are the scores of the reported documents.
    np.testing.assert_allclose(scores.numpy(), torch.gather(queries @ docs.T, 1, index).numpy(), atol=1e-6)


@pytest.mark.parametrize("near_first", [True, False])
def test_exact_top_k_when_the_best_documents_come_first_or_last(near_first):
    """Near documents first: once each query's reservoir has its k best, no later score passes
    its bound. Near documents last: the reservoir fills with far ones and nearly every later
    score passes, so it is compacted again and again. Both give the brute-force top k."""
    generator = torch.Generator().manual_seed(3)
    direction = torch.nn.functional.normalize(torch.randn(1, 32, generator=generator), dim=1)
    queries = torch.nn.functional.normalize(direction + 0.05 * torch.randn(40, 32, generator=generator), dim=1)
    near = torch.nn.functional.normalize(direction + 0.3 * torch.randn(300, 32, generator=generator), dim=1)
    far = torch.nn.functional.normalize(-direction + 0.3 * torch.randn(900, 32, generator=generator), dim=1)
    docs = torch.cat([near, far] if near_first else [far, near])
    scores, index = exact_top_k(queries, docs, 50, chunk_size=100, query_block=16)
    brute = torch.topk(queries @ docs.T, 50, dim=1)
    np.testing.assert_allclose(scores.numpy(), brute.values.numpy(), atol=1e-6)
    np.testing.assert_array_equal(index.numpy(), brute.indices.numpy())
    assert ((index < 300) if near_first else (index >= 900)).all()


def test_exact_top_k_names_a_query_whose_scores_are_not_finite():
    generator = torch.Generator().manual_seed(5)
    docs = torch.nn.functional.normalize(torch.randn(300, 16, generator=generator), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(20, 16, generator=generator), dim=1)
    queries[7] = float("nan")
    with pytest.raises(ValueError, match="query 7 has NaN"):
        exact_top_k(queries, docs, 10, chunk_size=64, query_block=8)


def test_the_search_runs_one_blas_thread_per_kernel_thread_from_a_fresh_process():
    """The kernel's threads each call BLAS (numba's np.dot -> SciPy's OpenBLAS), which must stay
    single-threaded inside them, or the two thread pools compete for the cores. SciPy loads its
    BLAS lazily, so the limit has to hold on a process's first search too; OpenBLAS says when it
    finds itself multi-threaded inside an OpenMP loop."""
    import subprocess
    import sys

    code = (
        "import torch; from gcl.retrieval import exact_top_k; torch.set_num_threads(2); "
        "q = torch.nn.functional.normalize(torch.randn(256, 512), dim=1); "
        "d = torch.nn.functional.normalize(torch.randn(8192, 512), dim=1); "
        "s, i = exact_top_k(q, d, 20, chunk_size=2048, query_block=128); "
        "assert torch.allclose(s, torch.topk(q @ d.T, 20, dim=1).values, atol=1e-5)"
    )
    env = {**os.environ, "NUMBA_THREADING_LAYER": "omp", "NUMBA_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "OpenBLAS Warning" not in done.stderr, done.stderr


def test_torch_top_k_and_merged_shards_equal_exact_top_k():
    from gcl.train.worker_eval import merge_top_k, torch_top_k

    g = torch.Generator().manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(300, 16, generator=g), dim=1)
    docs = torch.nn.functional.normalize(torch.randn(5000, 16, generator=g), dim=1)
    scores, index = exact_top_k(queries, docs, 50)
    t_scores, t_index = torch_top_k(queries, docs, 50, chunk_size=700, query_block=128)
    assert torch.equal(t_index, index) and torch.allclose(t_scores, scores, atol=1e-6)
    # Three shards of the corpus searched apart, their lists merged: the same ranking.
    ids = np.array([f"d{i}" for i in range(len(docs))], dtype=object)
    parts = []
    for shard in np.array_split(np.random.default_rng(1).permutation(len(docs)), 3):
        s, i = exact_top_k(queries, docs[shard], 50)
        parts.append((s.numpy(), ids[shard][i.numpy()]))
    m_scores, m_ids = merge_top_k(parts, 50)
    assert (m_ids == ids[index.numpy()]).all() and np.allclose(m_scores, scores.numpy(), atol=1e-6)


def _eval_rank(rank, world, init_file, synth_dir, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = _tiny_evaluation(synth_dir)
    if rank == 0:
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump(results, f)
    else:
        assert results == ({}, {})
    dist.destroy_process_group()


def _tiny_evaluation(synth_dir):
    from gcl.config import parse_config
    from gcl.job_config import JobConfig
    from gcl.model import FieldEncoder, create_model
    from gcl.train.worker import evaluate_model
    from workflows import CONFIGS

    job = parse_config(
        JobConfig,
        CONFIGS / "tiny-cpu.yaml",
        [
            f"data.eval={{in_domain: {synth_dir}/in_domain.parquet, zero_shot: {synth_dir}/zero_shot.parquet}}",
            f"data.validation={{in_domain: {synth_dir}/val_in_domain.parquet}}",
            "eval.k=20",
        ],
    )
    torch.manual_seed(0)
    module = FieldEncoder(create_model(job.model).clip, job.fields.modalities())
    return evaluate_model(job, module, sample=0)


def test_two_workers_evaluating_their_shares_give_the_single_process_metrics(synth_dir):
    import torch.multiprocessing as mp

    world = 2
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_eval_rank, args=(world, os.path.join(tmp, "init"), str(synth_dir), tmp), nprocs=world, join=True)
        with open(os.path.join(tmp, "metrics.json")) as f:
            test, validation = json.load(f)
    single_test, single_validation = _tiny_evaluation(synth_dir)
    for shared, single in ((test, single_test), (validation, single_validation)):
        assert set(shared) == set(single) and single
        for split, values in single.items():
            for measure, value in values.items():
                assert shared[split][measure] == pytest.approx(value, abs=1e-6), (split, measure)
