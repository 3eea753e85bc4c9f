"""`gcl data grades`: graded training pairs from the logs a shop has. Impressions (a query, the
products shown, each at a position) and what people did with them (clicks, add-to-cart,
purchases) in; pairs in the schema `gcl data validate | split` and `gcl train` take out, each
graded by its position-debiased click-through rate combined with its cart and purchase rates.

1. The log is aggregated to counts per (query, product, position), as a Ray Data job for a large
   log (only the counts reach the driver) or in this process for a small one.
2. Position bias is estimated from the log itself (gcl.data.click_model: the position-based
   model by EM, checked against intervention harvesting where pairs were shown at several
   positions, with a bootstrap over queries for its spread; `grades.estimator: harvested` grades
   by the harvested curve instead), or taken from `grades.propensities` (a randomized
   experiment's), or left out (`grades.debias: false`: raw click-through rates). Where the two
   estimates disagree, the report says so.
3. Each pair's grade: its clicks, carts and purchases per expected examination (impressions
   weighted by their position's propensity), each shrunk toward the log's mean rate with
   `grades.prior_examinations` pseudo-examinations (1 click in 1 impression is not the top grade),
   combined with `grades.{click,add_to_cart,purchase}_weight`. Pairs with fewer than
   `grades.min_examinations` expected examinations are dropped and counted. `score_linear` is the
   grade over the largest grade (or, `grades.score: rank`, the pair's rank within its query as
   Marqo-GS-10M's scores are); `position` ranks each query's products by grade.
4. The pairs are joined with the catalog (product id -> title, image, ...) and written to
   `<out>/pairs/`, with `<out>/manifest.json` (the inputs' sha256, the report), as gcl writes
   every output (gcl.outputs).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from gcl.config import Section
from gcl.data.click_model import (
    PositionCounts,
    fit_pbm,
    harvested_propensities,
    propensity_spread,
    shown_at_several_positions,
)
from gcl.data.keys import stable_keys
from gcl.data.readers import DataError, read_table, resolve_files

log = logging.getLogger(__name__)
LOCAL_ROWS = 200_000  # logs of at most this many impressions are aggregated in this process
COUNTS = ("impressions", "clicks", "carts", "purchases")
REPORT_FILE = "manifest.json"
PAIRS_DIR = "pairs"  # <out>/pairs/part-*.parquet: the graded pairs, what `gcl data split --input` takes


class GradesConfig(Section):
    """`gcl data grades`: graded pairs from a search log (gcl/data/grades.py)."""

    log: str | None = None
    """The impression log: parquet, CSV or JSONL files, a directory or a glob (local or a URI);
    one row per product shown in a search."""
    catalog: str | None = None
    """The products: one row per product id with the fields the pairs carry (title, image, ...)."""
    out: str | None = None
    """Where the graded pairs go (a new or empty directory, or an earlier `gcl data grades` output)."""
    query_column: str = "query"
    """The log's column with the query text."""
    query_id_column: str | None = "query_id"
    """The log's column identifying the query (null: the query text identifies it)."""
    product_id_column: str = "product_id"
    """The log's and the catalog's column identifying the product."""
    position_column: str = "position"
    """The log's column with the 1-based position the product was shown at."""
    click_column: str = "click"
    """The log's click column (0/1, or a count)."""
    add_to_cart_column: str | None = "add_to_cart"
    """The log's add-to-cart column (0/1 or a count); null or absent from the log: none."""
    purchase_column: str | None = "purchase"
    """The log's purchase column (0/1 or a count); null or absent from the log: none."""
    click_weight: float = Field(1.0, ge=0)
    """The debiased click-through rate's weight in the grade."""
    add_to_cart_weight: float = Field(2.0, ge=0)
    """The add-to-cart rate's weight in the grade (per expected examination, as clicks)."""
    purchase_weight: float = Field(4.0, ge=0)
    """The purchase rate's weight in the grade."""
    prior_examinations: float = Field(1.0, gt=0)
    """Pseudo-examinations at the log's mean rates added to every pair: a pair seen little is
    graded near the mean, not by its one click."""
    min_examinations: float = Field(1.0, ge=0)
    """Pairs with fewer expected examinations (impressions weighted by propensity) are dropped."""
    score: Literal["grade", "rank"] = "grade"
    """What `score_linear` holds: `grade`, the pair's grade over the log's largest (comparable across
    queries; a skewed log puts most pairs near 0); `rank`, its rank among its query's products as
    Marqo-GS-10M's scores are, (n - position + 1) / n, which spreads every query's pairs over the
    weight range the shipped training settings were tuned on."""
    debias: bool = True
    """Take position bias out (false: raw click-through rates, every position examined alike)."""
    estimator: Literal["em", "harvested"] = "em"
    """How the propensities are estimated from the log: `em`, the position-based click model over
    every pair; `harvested`, the click-through rates of the pairs shown at both of two neighbouring
    positions (no model of each pair: where few pairs link some positions, e.g. sponsored slots
    that open every list, EM can be biased and the report says so)."""
    propensities: list[float] | None = None
    """Known examination propensities per position (1 first), e.g. from a randomized experiment,
    instead of estimating them from the log; positions beyond the list take its last value."""
    max_position: int = Field(100, ge=1)
    """Impressions below this position are left out (a ranked list's tail is seldom examined)."""
    bootstrap: int = Field(20, ge=0)
    """Bootstrap samples of the queries for the propensities' spread (0: none)."""
    min_identifying_share: float = Field(0.02, ge=0, le=1)
    """Below this share of pairs shown at 2+ positions, the estimate rests on too little variation
    to tell bias from relevance, and the command says so."""


@dataclass
class GradesReport:
    """What the grading found, for the terminal, manifest.json and MLflow."""

    impressions: int = 0
    queries: int = 0
    pairs: int = 0
    bad_rows: int = 0
    bad_examples: list[str] = field(default_factory=list)
    several_positions_share: float = 0.0
    propensities: list[float] = field(default_factory=list)
    propensity_sd: list[float] = field(default_factory=list)
    harvested: list[float] = field(default_factory=list)
    harvested_pairs: list[int] = field(default_factory=list)
    disagreeing_positions: list[int] = field(default_factory=list)  # 1-based, EM against harvested
    source: str = "estimated"  # estimated (by grades.estimator) | given | none
    estimator: str = "em"
    identifiable: bool = True
    dropped_little_evidence: int = 0
    dropped_not_in_catalog: int = 0
    written: int = 0
    grade_quantiles: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


BAD = "\x00bad"  # the query id of the group that counts a batch's unusable rows


def aggregate_batch(table: pa.Table, cfg: dict) -> pa.Table:
    """Counts per (query id, query, product id, position) of one batch of log rows. Rows that are
    not a usable impression (no query or product, a position that is not an integer >= 1, an event
    count that is not a number >= 0) are counted in one group of query id BAD. Runs in Ray Data
    tasks as in this process."""
    n = table.num_rows
    query = table.column(cfg["query_column"]).cast(pa.string())
    query_id = table.column(cfg["query_id_column"]).cast(pa.string()) if cfg["query_id_column"] else query
    product = table.column(cfg["product_id_column"]).cast(pa.string())
    position = _numbers(table, cfg["position_column"])
    events = {"clicks": _numbers(table, cfg["click_column"])}
    for name, column in (("carts", cfg["add_to_cart_column"]), ("purchases", cfg["purchase_column"])):
        events[name] = _numbers(table, column) if column and column in table.column_names else np.zeros(n)
    bad = np.zeros(n, bool)
    for column in (query, query_id, product):
        bad |= np.asarray(pc.is_null(column).to_numpy(zero_copy_only=False), bool)
    bad |= ~np.isfinite(position) | (position < 1) | (position != np.round(np.nan_to_num(position)))
    for values in events.values():
        bad |= ~np.isfinite(values) | (values < 0)
    keep = ~bad & (np.nan_to_num(position) <= cfg["max_position"])
    rows = pa.table(
        {
            "query_id": pc.filter(query_id, pa.array(keep)),
            "query": pc.filter(query, pa.array(keep)),
            "product_id": pc.filter(product, pa.array(keep)),
            "position": position[keep].astype(np.int64),
            "impressions": np.ones(int(keep.sum())),
            **{name: values[keep] for name, values in events.items()},
        }
    )
    keys = ["query_id", "query", "product_id", "position"]
    summed = rows.group_by(keys, use_threads=False).aggregate([(c, "sum") for c in COUNTS])
    summed = summed.select([*keys, *(f"{c}_sum" for c in COUNTS)]).rename_columns([*keys, *COUNTS])
    if bad.any():
        counted = {
            "query_id": [BAD],
            "query": [BAD],
            "product_id": [BAD],
            "position": [0],
            "impressions": [float(bad.sum())],
            "clicks": [0.0],
            "carts": [0.0],
            "purchases": [0.0],
        }
        summed = pa.concat_tables([summed, pa.table(counted, schema=summed.schema)])
    return summed


def _numbers(table: pa.Table, column: str) -> np.ndarray:
    values = table.column(column)
    if not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type) or pa.types.is_boolean(values.type)):
        raise DataError(f"grades: column {column!r} holds {values.type}, not numbers; accepted: integers, 0/1, floats")
    return np.asarray(values.cast(pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False), np.float64)


def aggregate_log(cfg: GradesConfig, files: list[str], cpus: float = 0.5) -> tuple[pa.Table, int]:
    """(counts per (query id, query, product id, position), unusable rows) of the log's `files`: a
    Ray Data job over a large log, the same function in this process over a small one."""
    settings = cfg.model_dump()
    columns = [
        c
        for c in (
            cfg.query_column,
            cfg.query_id_column,
            cfg.product_id_column,
            cfg.position_column,
            cfg.click_column,
            cfg.add_to_cart_column,
            cfg.purchase_column,
        )
        if c
    ]
    _check_columns(files, columns, cfg)
    import pyarrow.parquet as pq

    rows = sum(pq.ParquetFile(f).metadata.num_rows if f.endswith(".parquet") else LOCAL_ROWS + 1 for f in files)
    keys = ["query_id", "query", "product_id", "position"]
    if rows <= LOCAL_ROWS:
        parts = [aggregate_batch(read_table(f, [c for c in columns if c in _schema_names(f)]), settings) for f in files]
        combined = pa.concat_tables(parts)
    else:
        import ray
        from ray.data.aggregate import Sum

        from gcl.cluster import init_ray
        from gcl.data.readers import read_pairs

        init_ray()
        present = [c for c in columns if c in _schema_names(files[0])]
        ds = read_pairs(cfg.log, files, present, cpus).map_batches(
            aggregate_batch, fn_kwargs={"cfg": settings}, batch_format="pyarrow", num_cpus=cpus
        )
        ds.context.raise_original_map_exception = True  # a column of text named as the local path names it
        summed = ds.groupby(keys).aggregate(*(Sum(c, alias_name=c) for c in COUNTS))
        # The counts come here as Arrow blocks from one execution (not as a dict per row).
        blocks = [block for block in ray.get(summed.to_arrow_refs()) if block.num_rows]
        if not blocks:
            raise DataError(f"grades.log {cfg.log}: no impressions")
        combined = pa.concat_tables(blocks)
    totals = combined.group_by(keys, use_threads=False).aggregate([(c, "sum") for c in COUNTS])
    totals = totals.select([*keys, *(f"{c}_sum" for c in COUNTS)]).rename_columns([*keys, *COUNTS])
    is_bad = pc.equal(totals["query_id"], BAD)
    bad = int(pc.sum(pc.filter(totals["impressions"], is_bad)).as_py() or 0)
    return totals.filter(pc.invert(is_bad)), bad


def _schema_names(file: str) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_schema(file).names if file.endswith(".parquet") else read_table(file).column_names


def _check_columns(files: list[str], columns: list[str], cfg: GradesConfig) -> None:
    optional = {cfg.add_to_cart_column, cfg.purchase_column}
    for file in files:
        names = _schema_names(file)
        missing = [c for c in columns if c not in names and c not in optional]
        if missing:
            raise DataError(
                f"grades.log: {file} has no column(s) {missing}; it has {names}. Name the log's columns "
                "with grades.query_column, grades.product_id_column, grades.position_column, ..."
            )


def position_counts(totals: pa.Table) -> tuple[PositionCounts, pa.Table]:
    """The counts as the click model takes them, and the pairs (query id, query, product id) by
    their index, with each pair's event totals."""
    pair_keys = stable_keys(
        np.asarray(
            pc.binary_join_element_wise(totals["query_id"], totals["product_id"], "\x1f").to_numpy(zero_copy_only=False)
        )
    )
    unique, first, pair = np.unique(pair_keys, return_index=True, return_inverse=True)
    query_index = np.unique(stable_keys(totals["query_id"].to_numpy(zero_copy_only=False)), return_inverse=True)[1]
    counts = PositionCounts(
        pair=pair.astype(np.int64),
        position=totals["position"].to_numpy().astype(np.int64),
        impressions=totals["impressions"].to_numpy().astype(np.float64),
        clicks=totals["clicks"].to_numpy().astype(np.float64),
        query=query_index[first].astype(np.int64),
    )
    pairs = totals.take(pa.array(first)).select(["query_id", "query", "product_id"])
    for name in COUNTS:
        pairs = pairs.append_column(
            name, pa.array(np.bincount(pair, weights=totals[name].to_numpy(), minlength=len(unique)))
        )
    return counts, pairs


def propensities_of(cfg: GradesConfig, counts: PositionCounts, report: GradesReport) -> np.ndarray:
    """theta per position (1 first): estimated (PBM by EM), given, or all 1 (grades.debias off); the
    estimate's check and spread, and whether the log can identify it, go into `report`."""
    positions = counts.n_positions
    report.several_positions_share = shown_at_several_positions(counts)
    harvested, informed = harvested_propensities(counts)
    report.harvested = [None if math.isnan(v) else float(v) for v in harvested]
    report.harvested_pairs = informed.tolist()
    if not cfg.debias:
        report.source = "none"
        return np.ones(positions)
    if cfg.propensities:
        report.source = "given"
        given = list(cfg.propensities) + [cfg.propensities[-1]] * max(0, positions - len(cfg.propensities))
        theta = np.asarray(given[:positions], np.float64)
        return theta / theta[0]
    fit = fit_pbm(counts)
    report.propensities = fit.theta.tolist()
    if cfg.bootstrap:
        report.propensity_sd = propensity_spread(counts, fit, resamples=cfg.bootstrap).tolist()
    report.identifiable = report.several_positions_share >= cfg.min_identifying_share
    report.disagreeing_positions = disagreeing_positions(fit.theta, harvested, informed, report.propensity_sd)
    report.estimator = cfg.estimator
    if cfg.estimator == "em":
        return fit.theta
    if np.isnan(harvested).any():
        unlinked = int(np.flatnonzero(np.isnan(harvested))[0]) + 1
        raise DataError(
            f"grades.estimator=harvested: no pair of the log was shown at both positions {unlinked - 1} and "
            f"{unlinked}, so harvesting cannot reach position {unlinked}; set grades.max_position={unlinked - 1}, "
            "use grades.estimator=em, or pass known grades.propensities"
        )
    return harvested


# EM and harvesting disagree at a position when they differ by more than this, and by more than
# DISAGREE_SPREADS times EM's bootstrap spread there, with at least DISAGREE_PAIRS pairs informing
# the harvested ratio (fewer: harvesting's own noise). Measured: on logs the click model fits
# (tests/test_grades.py) they differ by at most 0.02; with sponsored slots opening every list, by 0.25.
DISAGREE_BY, DISAGREE_SPREADS, DISAGREE_PAIRS = 0.05, 3.0, 20


def disagreeing_positions(em: np.ndarray, harvested: np.ndarray, informed: np.ndarray, spread: list) -> list[int]:
    """The 1-based positions where EM's propensity and the harvested one disagree (see DISAGREE_BY)."""
    out = []
    for k in range(1, len(em)):
        if k >= len(harvested) or np.isnan(harvested[k]) or informed[k] < DISAGREE_PAIRS:
            continue
        bound = max(DISAGREE_BY, DISAGREE_SPREADS * (spread[k] if k < len(spread) else 0.0))
        if abs(em[k] - harvested[k]) > bound:
            out.append(k + 1)
    return out


def grade_pairs(
    cfg: GradesConfig, counts: PositionCounts, pairs: pa.Table, theta: np.ndarray, report: GradesReport
) -> pa.Table:
    """Each pair's grade (see the module docstring) and the columns of a scored pair; pairs with
    too little evidence dropped and counted."""
    exams = np.bincount(counts.pair, weights=counts.impressions * theta[counts.position - 1], minlength=counts.n_pairs)
    totals = {name: pairs[name].to_numpy() for name in ("clicks", "carts", "purchases")}
    rates = {}
    for name, events in totals.items():
        prior = events.sum() / max(exams.sum(), 1e-12)  # the log's mean rate per examination
        rates[name] = (events + cfg.prior_examinations * prior) / (exams + cfg.prior_examinations)
    grade = (
        cfg.click_weight * rates["clicks"]
        + cfg.add_to_cart_weight * rates["carts"]
        + cfg.purchase_weight * rates["purchases"]
    )
    keep = exams >= cfg.min_examinations
    report.dropped_little_evidence = int((~keep).sum())
    graded = pairs.filter(pa.array(keep)).append_column("examinations", pa.array(exams[keep]))
    graded = graded.append_column("debiased_ctr", pa.array(rates["clicks"][keep]))
    grade = grade[keep]
    score = grade / grade.max() if len(grade) and grade.max() > 0 else np.zeros(len(grade))
    query = stable_keys(graded["query_id"].to_numpy(zero_copy_only=False))
    order = np.lexsort((-score, query))  # by query, best first
    rank = np.empty(len(score), np.int64)
    starts = np.r_[0, np.nonzero(np.diff(query[order]))[0] + 1]
    counts_per_query = np.diff(np.r_[starts, len(order)])
    rank[order] = np.arange(len(order)) - np.repeat(starts, counts_per_query) + 1
    if cfg.score == "rank":  # Marqo-GS-10M's score_linear: (n - position + 1) / n within each query
        in_query = np.empty(len(rank), np.int64)
        in_query[order] = np.repeat(counts_per_query, counts_per_query)
        score = (in_query - rank + 1) / in_query
    report.grade_quantiles = {f"p{q}": float(np.percentile(score, q)) for q in (10, 50, 90)} if len(score) else {}
    return (
        graded.append_column("score_linear", pa.array(score))
        .append_column("position", pa.array(rank))
        .append_column("score_reciprocal", pa.array(1.0 / rank))
        .append_column("no_score", pa.array(np.ones(len(rank))))
    )


def join_catalog(cfg: GradesConfig, graded: pa.Table, out: str, cpus: float = 0.5) -> int:
    """The graded pairs with each product's catalog fields, written as parquet files in `out`;
    returns how many were written (a pair whose product the catalog lacks is not)."""
    files = resolve_files(cfg.catalog)
    key = cfg.product_id_column
    graded = graded.append_column(
        "pair_id",
        pa.array(
            stable_keys(
                np.asarray(
                    pc.binary_join_element_wise(graded["query_id"], graded["product_id"], "\x1f").to_numpy(
                        zero_copy_only=False
                    )
                )
            )
        ),
    )
    graded = graded.rename_columns(["query_id", "query", key, *graded.column_names[3:]])
    rows = sum(_rows_of(f) for f in files)
    if rows <= LOCAL_ROWS:
        catalog = pa.concat_tables([read_table(f) for f in files], promote_options="default")
        joined = _joined(graded, _checked_catalog(catalog, key, cfg.catalog), key)
        import pyarrow.parquet as pq

        store, root = _filesystem(out)
        for index, start in enumerate(range(0, max(joined.num_rows, 1), 50_000)):
            with store.open_output_stream(f"{root}/part-{index:05d}.parquet") as stream:
                pq.write_table(joined.slice(start, 50_000), stream)
        return joined.num_rows
    import pyarrow.parquet as pq
    import ray

    from gcl.cluster import init_ray
    from gcl.data.readers import read_pairs

    init_ray()
    # The graded pairs (one row per pair: what the driver already holds) go to every task once; the
    # catalog streams past them, each of its blocks joined with the pairs of its products.
    joined = read_pairs(cfg.catalog, files, None, cpus).map_batches(
        _join_block,
        fn_kwargs={"graded": ray.put(graded), "key": key, "where": cfg.catalog},
        batch_format="pyarrow",
        num_cpus=cpus,
    )
    joined.context.raise_original_map_exception = True  # a DataError reaches the command as itself
    joined.write_parquet(out)
    store, root = _filesystem(out)
    pair_ids = pq.read_table(root, columns=["pair_id"], filesystem=store)["pair_id"]
    if pc.count_distinct(pair_ids).as_py() != len(pair_ids):
        raise DataError(f"grades.catalog {cfg.catalog}: {key} repeats; give each product one row")
    return len(pair_ids)


def _checked_catalog(catalog: pa.Table, key: str, where: str) -> pa.Table:
    """The catalog (or a block of it) with its ids as strings; an error naming `where` if it has no
    id column or an id repeats in it (across a large catalog's blocks, join_catalog checks)."""
    if key not in catalog.column_names:
        raise DataError(f"grades.catalog {where}: no column {key!r} (grades.product_id_column)")
    catalog = catalog.set_column(catalog.column_names.index(key), key, catalog[key].cast(pa.string()))
    if pc.count_distinct(catalog[key]).as_py() != catalog.num_rows:
        raise DataError(f"grades.catalog {where}: {key} repeats; give each product one row")
    return catalog


def _join_block(catalog: pa.Table, graded, key: str, where: str) -> pa.Table:
    """Ray Data task: the graded pairs whose product is in this block of the catalog, with its columns."""
    import ray

    return _joined(ray.get(graded), _checked_catalog(catalog, key, where), key)


def _joined(graded: pa.Table, catalog: pa.Table, key: str) -> pa.Table:
    """Each graded pair with its product's catalog columns (pairs whose product is missing left
    out): by sorted ids, vectorized (Arrow's hash join takes no struct columns such as images)."""
    ids = catalog[key].to_numpy(zero_copy_only=False).astype(str)
    order = np.argsort(ids, kind="stable")
    wanted = graded[key].to_numpy(zero_copy_only=False).astype(str)
    at = np.minimum(np.searchsorted(ids[order], wanted), max(len(ids) - 1, 0))
    found = ids[order][at] == wanted if len(ids) else np.zeros(len(wanted), bool)
    rows = catalog.drop_columns([key]).take(pa.array(order[at][found]))
    kept = graded.filter(pa.array(found))
    for name in rows.column_names:
        if name not in kept.column_names:
            kept = kept.append_column(name, rows[name])
    return kept


def _rows_of(file: str) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(file).metadata.num_rows if file.endswith(".parquet") else read_table(file).num_rows


def _filesystem(location: str):
    from gcl import storage

    store, root = storage.filesystem(location)
    store.create_dir(root, recursive=True)
    return store, root


def make_grades(cfg: GradesConfig, cpus: float = 0.5) -> GradesReport:
    """`gcl data grades`: read, aggregate, estimate the bias, grade, join and write (see the module
    docstring); returns the report, which manifest.json holds too."""
    from gcl import storage
    from gcl.data.manifest import spec_manifest
    from gcl.outputs import DATA_OUTPUT, check_output, replaced_whole

    for key in ("log", "catalog", "out"):
        if not getattr(cfg, key):
            raise DataError(f"grades.{key} is not set: give --{key} (or grades.{key} in the config)")
    out = storage.absolute(cfg.out)
    check_output(out, DATA_OUTPUT, inputs=[cfg.log, cfg.catalog])
    start = time.perf_counter()
    log_files = resolve_files(cfg.log)
    report = GradesReport()
    totals, report.bad_rows = aggregate_log(cfg, log_files, cpus)
    if totals.num_rows == 0:
        raise DataError(
            f"grades.log {cfg.log}: no usable impression ({report.bad_rows} rows without a query, a "
            "product, a position >= 1 or events >= 0)"
        )
    report.impressions = int(pc.sum(totals["impressions"]).as_py())
    counts, pairs = position_counts(totals)
    report.queries, report.pairs = int(counts.query.max()) + 1, counts.n_pairs
    theta = propensities_of(cfg, counts, report)  # report.propensities: EM's, whichever grades
    graded = grade_pairs(cfg, counts, pairs, theta, report)
    with replaced_whole(out) as partial:
        report.written = join_catalog(cfg, graded, storage.join(partial, PAIRS_DIR), cpus)
        report.dropped_not_in_catalog = graded.num_rows - report.written
        report.seconds = time.perf_counter() - start
        manifest = {
            "log": spec_manifest(cfg.log, log_files),
            "catalog": spec_manifest(cfg.catalog),
            "config": cfg.model_dump(),
            "report": report.__dict__,
        }
        storage.write_text(storage.join(partial, REPORT_FILE), json.dumps(manifest, indent=2, default=str))
    return report


def report_lines(report: GradesReport) -> list[str]:
    """The report as the terminal shows it: counts, the propensities per position with their check
    and spread, whether they can be trusted, the grades."""
    lines = [
        f"{report.impressions} impressions of {report.pairs} (query, product) pairs in {report.queries} queries"
        + (f"; {report.bad_rows} unusable rows skipped" if report.bad_rows else ""),
        f"pairs shown at 2+ positions: {100 * report.several_positions_share:.1f}% (what tells position bias "
        "from relevance)",
    ]
    shown = report.propensities or ([1.0] * len(report.harvested) if report.source == "none" else [])
    if report.source == "given":
        lines.append("propensities: given (grades.propensities)")
    elif report.source == "none":
        lines.append("propensities: none (grades.debias=false: raw click-through rates)")
    else:
        lines.append(
            f"propensities: estimated from the log; the grades use {report.estimator.upper()}'s (grades.estimator)"
        )
        lines.append(f"{'position':>8s} {'EM':>8s} {'+-':>6s} {'harvested':>10s} {'pairs':>6s}")
        for k, theta in enumerate(shown[:20]):
            sd = report.propensity_sd[k] if k < len(report.propensity_sd) else float("nan")
            harvested = report.harvested[k] if k < len(report.harvested) else None
            pairs = report.harvested_pairs[k] if k < len(report.harvested_pairs) else 0
            lines.append(
                f"{k + 1:8d} {theta:8.3f} {sd:6.3f} {'-' if harvested is None else f'{harvested:10.3f}':>10s} "
                f"{pairs:6d}"
            )
        if not report.identifiable:
            lines.append(
                "warning: too few pairs were shown at more than one position to tell position bias from "
                "relevance: the propensities above rest on the click model's assumption alone. Log some "
                "randomized swaps, or pass known propensities (grades.propensities) from an experiment"
            )
        elif report.disagreeing_positions:
            worst = max(abs(report.propensities[k - 1] - report.harvested[k - 1]) for k in report.disagreeing_positions)
            lines.append(
                f"warning: EM and harvesting disagree at position(s) {report.disagreeing_positions} (by up to "
                f"{worst:.2f}, beyond their spread): the log links some positions through few pairs (sponsored "
                "slots, a fixed top of the list), where EM's per-pair model can be biased. "
                + (
                    "Grade by the harvested curve (grades.estimator=harvested) or known grades.propensities"
                    if report.estimator == "em"
                    else "The grades use the harvested curve (grades.estimator=harvested)"
                )
            )
    lines.append(
        f"grades: {report.written} pairs written; dropped: {report.dropped_little_evidence} with too little "
        f"evidence (grades.min_examinations), {report.dropped_not_in_catalog} not in the catalog; "
        f"score_linear {report.grade_quantiles}"
    )
    return lines
