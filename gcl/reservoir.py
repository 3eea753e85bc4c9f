"""Compiled kernel of exact top-k search (gcl.retrieval.exact_top_k): a reservoir per query.

`search` splits the queries into blocks, one block per thread at a time. A thread scores its
block against the corpus chunk by chunk into its own buffer (one single-threaded BLAS product)
and reads those scores at once, while they are still in its cache. Each query row r has a
reservoir: kept_scores[r, :kept[r]] (document indices in kept_index) holds every document scored
so far that can still be in its top k; threshold[r] is a lower bound on its k-th best. `offer`
adds a chunk's scores above the threshold; when a reservoir fills (2k slots), a quickselect keeps
its k best and their minimum becomes the threshold. FAISS's exact index does the same for large
k. The product runs inside the kernel's threads, not in a BLAS thread pool of its own: on few
cores the two pools compete, and each thread's buffer is read where it was written.

Compiled with numba on first use (a few seconds) and cached on disk for later processes; the
kernels are module-level functions because numba cannot reuse its cache for closures. numba's
np.dot calls SciPy's BLAS, limited to one thread by the caller.
"""

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def select_k_best(values, index, n, k):
    """Quickselect (Hoare partition): values[:k] (index alongside) become the k largest of
    values[:n], in no order; returns the k-th largest."""
    target, lo, hi = k - 1, 0, n - 1
    while lo < hi:
        pivot, i, j = values[target], lo, hi
        while i <= j:
            while values[i] > pivot:
                i += 1
            while pivot > values[j]:
                j -= 1
            if i <= j:
                values[i], values[j] = values[j], values[i]
                index[i], index[j] = index[j], index[i]
                i += 1
                j -= 1
        if j < target:
            lo = i
        if target < i:
            hi = j
    return values[target]


@numba.njit(cache=True, nogil=True)
def offer(scores, offset, kept_scores, kept_index, kept, threshold, k):
    """scores (B, C): a chunk whose first document is `offset`; kept_scores, kept_index (B, 2k),
    kept (B,), threshold (B,): the reservoirs, updated in place."""
    for r in range(scores.shape[0]):
        row, values, index = scores[r], kept_scores[r], kept_index[r]
        n, bound = kept[r], threshold[r]
        for j in range(row.shape[0]):
            if row[j] > bound:  # rare once the reservoir has filled: a well-predicted branch
                values[n], index[n] = row[j], offset + j
                n += 1
                if n == values.shape[0]:
                    bound = select_k_best(values, index, n, k)
                    n = k
        kept[r], threshold[r] = n, bound


@numba.njit(parallel=True, cache=True, nogil=True)
def search(queries, docs, k, chunk_size, block, out_scores, out_index, found):
    """queries (Q, D), docs (N, D): float32, C-contiguous. Writes each query's k best scores, best
    first, into out_scores (Q, k) and their documents into out_index (Q, k); found (Q,) gets how
    many finite scores each query kept (below k: its scores were NaN or -inf, out rows unset)."""
    n_queries, n_docs = queries.shape[0], docs.shape[0]
    for b in numba.prange((n_queries + block - 1) // block):
        lo = b * block
        hi = min(lo + block, n_queries)
        rows = hi - lo
        kept_scores = np.empty((rows, 2 * k), np.float32)
        kept_index = np.empty((rows, 2 * k), np.int64)
        kept = np.zeros(rows, np.int64)
        threshold = np.full(rows, -np.inf, np.float32)
        buffer = np.empty(rows * min(chunk_size, n_docs), np.float32)
        for start in range(0, n_docs, chunk_size):
            stop = min(start + chunk_size, n_docs)
            scores = buffer[: rows * (stop - start)].reshape((rows, stop - start))
            np.dot(queries[lo:hi], docs[start:stop].T, scores)
            offer(scores, start, kept_scores, kept_index, kept, threshold, k)
        for r in range(rows):
            found[lo + r] = kept[r]
            if kept[r] < k:
                continue
            if kept[r] > k:
                select_k_best(kept_scores[r], kept_index[r], kept[r], k)
            order = np.argsort(-kept_scores[r, :k])
            out_scores[lo + r] = kept_scores[r, :k][order]
            out_index[lo + r] = kept_index[r, :k][order]
