"""Exact top-k search equals FAISS's exact inner-product index and a brute-force top-k."""

import os

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
    queries = torch.nn.functional.normalize(
        direction + 0.05 * torch.randn(40, 32, generator=generator), dim=1
    )
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
