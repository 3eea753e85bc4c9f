"""Exact top-k search against FAISS's exact index on the same embeddings, and the search's extra
peak memory at 100k and 1M documents, each measured in a fresh process (`python -m
gcl.bench.top_k N_DOCS N_QUERIES DIM K` prints it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch

from gcl.bench.proc import peak_rss_mib, rss_mib
from gcl.retrieval import EvalConfig, exact_top_k


def unit_rows(rows: int, dim: int, seed: int) -> torch.Tensor:
    """Random L2-normalized embeddings, generated in place (no full-size temporaries)."""
    out = torch.empty(rows, dim)
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, rows, 65536):
        block = out[start : start + 65536]
        block.normal_(generator=generator)
        block.div_(block.norm(dim=1, keepdim=True))
    return out


def retrieval_queries_per_s(
    n_docs: int = 100_000, n_queries: int = 1000, dim: int = 512, k: int = 1000, repeats: int = 3
) -> dict:
    """gcl's exact_top_k and FAISS's exact IndexFlatIP on the same embeddings, same threads, best of
    `repeats`, interleaved so that both see the same machine load."""
    import faiss

    cfg = EvalConfig()
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    docs, queries = unit_rows(n_docs, dim, 0), unit_rows(n_queries, dim, 1)
    index = faiss.IndexFlatIP(dim)
    index.add(docs.numpy())
    exact_top_k(queries[:10], docs[:10_000], k)  # compiles the kernels (or loads them from numba's cache)
    gcl_s, faiss_s = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        exact_top_k(queries, docs, k, cfg.chunk_size, cfg.query_block)
        gcl_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        index.search(queries.numpy(), k)
        faiss_s.append(time.perf_counter() - start)
    gcl_qps, faiss_qps = n_queries / min(gcl_s), n_queries / min(faiss_s)
    return {
        "retrieval_gcl_queries_per_s": gcl_qps,
        "retrieval_faiss_queries_per_s": faiss_qps,
        "retrieval_gcl_over_faiss": gcl_qps / faiss_qps,
    }


def search_memory_child(n_docs: int, n_queries: int, dim: int, k: int) -> None:
    """Run in a fresh process: print the search's peak memory beyond its inputs, in MiB."""
    docs, queries = unit_rows(n_docs, dim, 0), unit_rows(n_queries, dim, 1)
    before = rss_mib()
    cfg = EvalConfig()
    exact_top_k(queries, docs, k, cfg.chunk_size, cfg.query_block)
    peak = peak_rss_mib()
    print(json.dumps({"extra_mib": peak - before}))


def search_peak_memory(n_queries: int = 1000, dim: int = 512, k: int = 1000) -> dict:
    """The search's extra peak memory (beyond corpus and queries) at 100k and at 1M documents:
    bounded by the chunk size, it must not grow with the corpus."""
    extra = {}
    for n_docs in (100_000, 1_000_000):
        command = [sys.executable, "-m", "gcl.bench.top_k", *map(str, (n_docs, n_queries, dim, k))]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        extra[n_docs] = json.loads(out.strip().splitlines()[-1])["extra_mib"]
    return {
        "search_extra_peak_mib_100k": extra[100_000],
        "search_extra_peak_mib_1m": extra[1_000_000],
        "search_extra_peak_1m_over_100k": extra[1_000_000] / extra[100_000],
    }


if __name__ == "__main__":
    search_memory_child(*map(int, sys.argv[1:5]))
