"""Position bias in search logs, estimated from the log itself, and grades with it taken out.

A product shown first is clicked more because it is first. The position-based click model (PBM;
Craswell, Zoeter, Taylor and Ramsey, WSDM 2008; Chuklin, Markov and de Rijke, "Click Models for
Web Search", 2015, ch. 3) says a shown product is clicked when it is examined, with a probability
theta_k of its position k alone, and attractive, with a probability gamma of its (query, product)
pair alone: P(click) = theta_k * gamma_qd. `fit_pbm` fits both by expectation-maximization over the log's
counts per (query, product, position), never its impressions (the E-step's closed forms are the
book's, section 4.2.1): the log is aggregated first (gcl.data.grades), so the fit's cost is the
number of distinct (pair, position) rows.

PBM cannot tell bias from relevance on its own: if every pair is always shown at one position, any
theta fits as well as any other (with gamma rescaled). What identifies theta is a pair shown at
several positions, which a ranker's noise or randomized swaps provide; `harvested_propensities`
estimates theta from those pairs alone, comparing a pair's click-through rate at neighbouring
positions (intervention harvesting: Agarwal, Zaitsev, Wang, Li, Najork and Joachims, "Estimating
Position Bias without Intrusive Interventions", WSDM 2019), as a check on the EM fit.
`propensity_spread` bootstraps the fit over queries for its uncertainty.

Propensities are relative to position 1 (theta_1 = 1): PBM fixes them only up to a common factor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PositionCounts:
    """A log aggregated per (pair, position): row r says pair `pair[r]` was shown `impressions[r]`
    times at `position[r]` (1-based) and clicked `clicks[r]` times there. Pairs are 0..n_pairs-1;
    `query[p]` is pair p's query (for resampling queries)."""

    pair: np.ndarray  # (R,) int64
    position: np.ndarray  # (R,) int64, 1-based
    impressions: np.ndarray  # (R,) float64
    clicks: np.ndarray  # (R,) float64
    query: np.ndarray  # (P,) int64: each pair's query

    @property
    def n_pairs(self) -> int:
        return len(self.query)

    @property
    def n_positions(self) -> int:
        return int(self.position.max()) if len(self.position) else 0

    def rows_of(self, pairs: np.ndarray) -> PositionCounts:
        """The counts of the given pairs (a pair drawn twice counts twice), renumbered 0..len-1."""
        order = np.argsort(self.pair, kind="stable")
        starts = np.searchsorted(self.pair[order], np.arange(self.n_pairs + 1))
        picked = [order[starts[p] : starts[p + 1]] for p in pairs]
        rows = np.concatenate(picked) if picked else np.zeros(0, np.int64)
        renumbered = np.repeat(np.arange(len(pairs)), [len(r) for r in picked])
        return PositionCounts(
            renumbered, self.position[rows], self.impressions[rows], self.clicks[rows], self.query[pairs]
        )


@dataclass
class PbmFit:
    """theta: (K,) examination propensity per position, theta[0] = 1 (position 1); gamma: (P,)
    attractiveness per pair, on theta's scale (gamma * theta is the click probability)."""

    theta: np.ndarray
    gamma: np.ndarray
    iterations: int
    converged: bool


def fit_pbm(
    counts: PositionCounts, iterations: int = 2000, tolerance: float = 1e-6, init: PbmFit | None = None
) -> PbmFit:
    """The position-based model's maximum-likelihood theta and gamma by EM over `counts`."""
    k = counts.position - 1
    n, c = counts.impressions, counts.clicks
    theta = init.theta.copy() if init is not None else np.full(counts.n_positions, 0.5)
    if init is not None and len(theta) < counts.n_positions:
        theta = np.concatenate([theta, np.full(counts.n_positions - len(theta), theta[-1])])
    theta = np.clip(theta * 0.5, 1e-6, 1 - 1e-6)  # below 1: the E-step divides by 1 - theta * gamma
    ctr = _grouped(counts.pair, c, counts.n_pairs) / np.maximum(_grouped(counts.pair, n, counts.n_pairs), 1e-12)
    gamma = np.clip(ctr if init is None else init.gamma[: counts.n_pairs], 1e-6, 1 - 1e-6)
    shown_at = np.maximum(_grouped(k, n, counts.n_positions), 1e-12)
    shown = np.maximum(_grouped(counts.pair, n, counts.n_pairs), 1e-12)
    converged, step = False, 0
    for step in range(1, iterations + 1):  # noqa: B007 (the last step is reported)
        t, g = theta[k], gamma[counts.pair]
        denominator = np.maximum(1 - t * g, 1e-12)
        examined_unclicked = t * (1 - g) / denominator  # P(E=1 | C=0)
        attractive_unclicked = (1 - t) * g / denominator  # P(A=1 | C=0)
        new_theta = _grouped(k, c + (n - c) * examined_unclicked, counts.n_positions) / shown_at
        new_gamma = _grouped(counts.pair, c + (n - c) * attractive_unclicked, counts.n_pairs) / shown
        # Converged when the propensities stop moving: an unclicked pair's gamma creeps toward 0 for
        # thousands of steps more, changing nothing else.
        change = np.abs(new_theta - theta).max(initial=0)
        theta, gamma = np.clip(new_theta, 1e-9, 1 - 1e-9), np.clip(new_gamma, 1e-9, 1 - 1e-9)
        if change < tolerance:
            converged = True
            break
    scale = theta[0] if len(theta) and theta[0] > 0 else 1.0
    return PbmFit(
        theta=theta / scale, gamma=gamma * scale, iterations=step if counts.n_pairs else 0, converged=converged
    )


def harvested_propensities(counts: PositionCounts) -> tuple[np.ndarray, np.ndarray]:
    """(theta relative to position 1, pairs that informed each ratio) from the pairs shown at both
    of two neighbouring positions: theta_{k+1} / theta_k is the ratio of their click-through rates
    there, pooled over those pairs (each weighted by the harmonic mean of its impressions at the
    two), chained from position 1. NaN from the first position no pair links to the one above."""
    positions = counts.n_positions
    table_n = np.zeros((counts.n_pairs, positions))
    table_c = np.zeros((counts.n_pairs, positions))
    np.add.at(table_n, (counts.pair, counts.position - 1), counts.impressions)
    np.add.at(table_c, (counts.pair, counts.position - 1), counts.clicks)
    theta = np.full(positions, np.nan)
    informed = np.zeros(positions, np.int64)
    if positions:
        theta[0] = 1.0
    for k in range(positions - 1):
        both = (table_n[:, k] > 0) & (table_n[:, k + 1] > 0)
        informed[k + 1] = int(both.sum())
        if not both.any():
            break
        a, b = table_n[both, k], table_n[both, k + 1]
        weight = a * b / (a + b)
        upper = (weight * table_c[both, k] / a).sum()
        lower = (weight * table_c[both, k + 1] / b).sum()
        if upper <= 0:
            break
        theta[k + 1] = theta[k] * lower / upper
    return theta, informed


def propensity_spread(counts: PositionCounts, fit: PbmFit, resamples: int = 20, seed: int = 0) -> np.ndarray:
    """(K,) standard deviation of theta over `resamples` bootstrap samples of the queries (each
    query with all its pairs), each fitted by EM from `fit`."""
    rng = np.random.default_rng(seed)
    queries = np.unique(counts.query)
    pairs_of = {q: np.nonzero(counts.query == q)[0] for q in queries}
    thetas = []
    for _ in range(resamples):
        drawn = rng.choice(queries, size=len(queries), replace=True)
        pairs = np.concatenate([pairs_of[q] for q in drawn])
        sample = counts.rows_of(pairs)
        refit = fit_pbm(sample, iterations=200, init=PbmFit(fit.theta, fit.gamma[pairs], 0, True))
        theta = np.full(counts.n_positions, np.nan)
        theta[: len(refit.theta)] = refit.theta
        thetas.append(theta)
    return np.nanstd(np.array(thetas), axis=0)


def shown_at_several_positions(counts: PositionCounts) -> float:
    """The share of pairs the log shows at two or more positions: what identifies the bias."""
    if not counts.n_pairs:
        return 0.0
    distinct = np.unique(np.stack([counts.pair, counts.position]), axis=1)[0]
    return float((np.bincount(distinct, minlength=counts.n_pairs) >= 2).mean())


def _grouped(index: np.ndarray, values: np.ndarray, size: int) -> np.ndarray:
    return np.bincount(index, weights=values, minlength=size).astype(np.float64)
