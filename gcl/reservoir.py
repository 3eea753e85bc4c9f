"""Compiled kernels of exact top-k search (gcl.retrieval.exact_top_k): a reservoir per query.

Each query row r has a reservoir: kept_scores[r, :kept[r]] (document indices in kept_index)
holds every document scored so far that can still be in its top k; threshold[r] is a lower
bound on its k-th best. `offer` adds a chunk's scores above the threshold; when a reservoir
fills (2k slots), a quickselect keeps its k best and their minimum becomes the threshold. After
the last chunk, `keep_best` moves each row's k best to the front. FAISS's exact index does the
same for large k.

Compiled with numba on first use (a few seconds) and cached on disk for later processes; the
kernels are module-level functions because numba cannot reuse its cache for closures.
"""

import numba


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


@numba.njit(parallel=True, cache=True, nogil=True)
def offer(scores, offset, kept_scores, kept_index, kept, threshold, k):
    """scores (B, C): a chunk whose first document is `offset`; kept_scores, kept_index (B, 2k),
    kept (B,), threshold (B,): the reservoirs, updated in place. Rows run in parallel."""
    for r in numba.prange(scores.shape[0]):
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
def keep_best(kept_scores, kept_index, kept, k):
    """Move each reservoir's k best to its first k slots (in no order)."""
    for r in numba.prange(kept_scores.shape[0]):
        if kept[r] > k:
            select_k_best(kept_scores[r], kept_index[r], kept[r], k)
