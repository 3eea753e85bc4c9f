"""`gcl data grades` against a search log whose truth is known (gcl.data.synth.generate_log: a
logging ranker that also promotes products regardless of relevance, examination by 1/k, clicks by
the position-based model, carts and purchases after clicks, some randomized swaps): the fitted
propensities are the generator's, the debiased grades order each query's products closer to the
true grades than raw click-through rates do, the report says when a log cannot tell bias from
relevance, and the command writes pairs training takes."""

import json

import numpy as np
import pyarrow as pa
import pytest

from gcl.data.grades import GradesConfig, GradesReport, aggregate_batch, grade_pairs, position_counts, propensities_of
from gcl.data.synth import LogConfig, SynthConfig, generate_log, generate_pairs


@pytest.fixture(scope="module")
def pairs():
    return generate_pairs(SynthConfig(products=300, queries=120, seed=1))


def _graded(pairs, log: LogConfig, **settings):
    cfg = GradesConfig(bootstrap=0, **settings)
    totals = aggregate_batch(pa.Table.from_pandas(generate_log(pairs, log), preserve_index=False), cfg.model_dump())
    counts, by_pair = position_counts(totals)
    report = GradesReport()
    theta = propensities_of(cfg, counts, report)
    return grade_pairs(cfg, counts, by_pair, theta, report).to_pandas(), theta, report


def _rank_agreement(graded, pairs, true: str = "score_linear") -> float:
    """Mean over queries of Kendall's tau between the grades and the true grades (`pairs`'
    score_linear, or a log_truth table's grade)."""
    from scipy.stats import kendalltau

    truth = pairs[["query_id", "product_id", true]].rename(columns={true: "true"})
    joined = graded.merge(truth.astype({"query_id": str, "product_id": str}), on=["query_id", "product_id"])
    assert len(joined) == len(graded), "a graded pair has no true grade"
    taus = [kendalltau(g.score_linear, g.true).statistic for _, g in joined.groupby("query_id") if len(g) > 2]
    return float(np.nanmean(taus))


def test_the_click_model_finds_the_propensities_the_log_was_drawn_with(pairs):
    """EM over the counts and intervention harvesting each recover 1/k within 0.04 at every position
    (measured: within 0.02); the bootstrap's spread is small beside the values."""
    from gcl.data.click_model import fit_pbm, harvested_propensities, propensity_spread

    log = LogConfig(sessions_per_query=60, seed=1)
    cfg = GradesConfig()
    counts, _ = position_counts(aggregate_batch(pa.Table.from_pandas(generate_log(pairs, log)), cfg.model_dump()))
    truth = np.array(log.propensities())
    fit = fit_pbm(counts)
    harvested, informed = harvested_propensities(counts)
    print("EM", np.round(fit.theta, 3), "harvested", np.round(harvested, 3), "truth", np.round(truth, 3))
    assert fit.converged and np.abs(fit.theta - truth).max() < 0.04
    assert np.abs(harvested - truth).max() < 0.04 and informed[1:].min() > 100
    spread = propensity_spread(counts, fit, resamples=8)
    assert spread[0] == 0 and 0 < spread[1:].max() < 0.03


def test_debiased_grades_order_each_querys_products_closer_to_the_truth_than_raw_clicks(pairs):
    """The logging ranker promotes products whatever their relevance; raw click-through rates learn
    that promotion back (a promoted product is shown higher, so clicked more), the debiased grades
    take it out. Kendall's tau with the true grades, per query, mean (measured: 0.63 against 0.50)."""
    log = LogConfig(sessions_per_query=100, promotion=2.0, seed=1)
    plain = {"add_to_cart_weight": 0.0, "purchase_weight": 0.0}  # clicks alone: the two estimators compared
    debiased, _, report = _graded(pairs, log, **plain)
    raw, theta, _ = _graded(pairs, log, debias=False, **plain)
    ours, theirs = _rank_agreement(debiased, pairs), _rank_agreement(raw, pairs)
    print(f"Kendall's tau with the true grades: debiased {ours:.3f}, raw click-through rate {theirs:.3f}")
    assert ours > theirs + 0.05 and (theta == 1).all() and report.identifiable
    with_events, _, _ = _graded(pairs, log)  # carts and purchases, likelier for relevant products, help
    assert _rank_agreement(with_events, pairs) > theirs


def test_sponsored_products_are_graded_down_where_raw_clicks_keep_them(pairs):
    """A log whose lists open with two sponsored products of other queries' results (grade 0):
    raw click-through rates grade one shown first like a relevant product shown fifth; the debiased
    grades put them near the bottom. Few pairs link the sponsored slots to the rest of the list,
    and the click model's EM overestimates the lower positions' propensities there (measured: 0.55
    against 1/3 at position 3); the report says EM and harvesting disagree, and the harvested
    curve grades closer to the truth (measured: the sponsored products' mean grade percentile in
    their query 0.17 by EM, 0.14 harvested, 0.37 raw; Kendall's tau with the true grades 0.58,
    0.63, 0.45)."""
    from gcl.data.grades import report_lines
    from gcl.data.synth import log_truth

    log = LogConfig(sessions_per_query=60, sponsored=2, seed=1)
    truth = log_truth(pairs, generate_log(pairs, log))
    unrelated = truth[truth.grade == 0].astype({"query_id": str, "product_id": str})
    own = set(zip(pairs.query_id.astype(str), pairs.product_id.astype(str), strict=True))
    assert len(unrelated) == 2 * pairs.query_id.nunique() and not own & set(
        zip(unrelated.query_id, unrelated.product_id, strict=True)
    )
    plain = {"add_to_cart_weight": 0.0, "purchase_weight": 0.0}
    percentiles, reports, thetas = {}, {}, {}
    settings = {"debiased": {}, "harvested": {"estimator": "harvested"}, "raw": {"debias": False}}
    for name, setting in settings.items():
        graded, thetas[name], reports[name] = _graded(pairs, log, **setting, **plain)
        graded["percentile"] = graded.groupby("query_id").score_linear.rank(pct=True)
        percentiles[name] = graded.merge(unrelated, on=["query_id", "product_id"]).percentile.mean()
        percentiles[name + " tau"] = _rank_agreement(graded, truth, true="grade")
    print(percentiles)
    assert percentiles["debiased"] < percentiles["raw"] - 0.1
    assert percentiles["debiased tau"] > percentiles["raw tau"] + 0.05
    assert (
        percentiles["harvested"] < percentiles["debiased"]
        and percentiles["harvested tau"] > percentiles["debiased tau"]
    )
    assert 3 in reports["debiased"].disagreeing_positions and reports["debiased"].identifiable
    said = report_lines(reports["debiased"])
    assert any("EM and harvesting disagree" in line and "grades.estimator=harvested" in line for line in said)
    truth_theta = np.array(log.propensities())
    assert np.abs(thetas["debiased"] - truth_theta).max() > 0.15 > 0.1 > np.abs(thetas["harvested"] - truth_theta).max()
    quiet = report_lines(_graded(pairs, LogConfig(sessions_per_query=60, seed=1))[2])
    assert not any("disagree" in line for line in quiet)  # a log the click model fits


def test_grades_by_rank_score_each_querys_pairs_as_marqo_gs_does(pairs):
    """grades.score=rank: score_linear is (n - position + 1) / n within each query, in the order
    the grades give; the default, the grade over the log's largest, orders them alike."""
    log = LogConfig(sessions_per_query=10, seed=3)
    by_grade, _, _ = _graded(pairs, log)
    by_rank, _, _ = _graded(pairs, log, score="rank")
    assert (by_rank.position == by_grade.position).all() and by_rank.score_linear.max() == 1
    n = by_rank.groupby("query_id").position.transform("size")
    assert np.allclose(by_rank.score_linear, (n - by_rank.position + 1) / n)
    assert by_grade.score_linear.median() < 0.5 < by_rank.score_linear.median() + 0.05


def test_the_report_says_when_position_bias_cannot_be_told_from_relevance(pairs):
    """A deterministic logging ranker with no swaps shows every pair at one position: no propensity
    curve can be trusted, and the report says so instead of printing a confident one."""
    from gcl.data.grades import report_lines

    _, _, report = _graded(pairs, LogConfig(sessions_per_query=20, ranker_noise=0.0, swap_rate=0.0, seed=1))
    assert report.several_positions_share == 0 and not report.identifiable
    assert any("too few pairs were shown at more than one position" in line for line in report_lines(report))
    _, _, varied = _graded(pairs, LogConfig(sessions_per_query=20, seed=1))
    assert varied.identifiable and not any("too few pairs" in line for line in report_lines(varied))


def test_gcl_data_grades_writes_pairs_that_training_takes_with_the_inputs_sha256(tmp_path, capsys):
    """`gcl data synth --log-sessions` then `gcl data grades` as a user types them: the pairs pass
    `gcl data validate`'s checks with score_linear as their weight, every pair's product joined
    with its catalog row; manifest.json records the inputs' sha256 and the report; MLflow gets
    the report and its plot; a bad column is named."""
    import pandas as pd
    from mlflow import MlflowClient

    from gcl.config import FieldsConfig
    from gcl.data.schema import DataConfig
    from gcl.data.validate import validate_pairs
    from gcl.storage import file_sha256
    from workflows.cli import main

    data, out, uri = tmp_path / "data", tmp_path / "grades", f"sqlite:///{tmp_path}/mlflow.db"
    synth = ["data", "synth", "--out", str(data), "--products", "300", "--queries", "120", "--log-sessions", "20"]
    assert main([*synth, "--log-sponsored", "1"]) == 0
    truth = pd.read_parquet(data / "log-truth.parquet")  # each query's sponsored product, at grade 0
    assert (truth.grade == 0).sum() == truth.query_id.nunique() and (truth.grade > 0).sum() > 500
    grades = ["data", "grades", "--log", str(data / "log"), "--catalog", str(data / "catalog.parquet")]
    grades += ["--out", str(out), "--set", f"mlflow.tracking_uri={uri}"]
    assert main(grades) == 0
    said = capsys.readouterr().out
    assert "pairs shown at 2+ positions" in said and "grades:" in said and "MLflow run grades-" in said
    report = validate_pairs(str(out / "pairs"), DataConfig(), FieldsConfig(), "score_linear")
    assert report.rows > 500 and report.bad_rows == 0 and 0 < report.score_max <= 1
    manifest = json.loads((out / "manifest.json").read_text())
    log_file = str(data / "log/impressions.parquet")
    assert manifest["log"]["files"] == [{"path": log_file, "sha256": file_sha256(log_file)}]
    assert manifest["report"]["written"] == report.rows
    harvested = [*grades[:7], str(tmp_path / "harvested"), *grades[8:], "--set", "grades.estimator=harvested"]
    assert main(harvested) == 0
    by_harvest = json.loads((tmp_path / "harvested" / "manifest.json").read_text())["report"]
    assert by_harvest["estimator"] == "harvested" and by_harvest["propensities"] == manifest["report"]["propensities"]
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("gcl").experiment_id])[0]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"grades.png", "grades-report.json"}
    assert main([*grades[:-2], "--set", "grades.click_column=clicked"]) == 2  # named, before any work
    assert "no column(s) ['clicked']" in capsys.readouterr().err


@pytest.mark.integration
def test_a_large_log_is_counted_and_joined_on_ray_data_as_a_small_one_is_here(ray_local, pairs, tmp_path, monkeypatch):
    """Above grades.LOCAL_ROWS impressions the counting is a Ray Data job (what reaches the driver
    is the counts, as Arrow blocks) and so is the catalog join: both give the pairs and report that
    the in-process path gives, over a log of several files."""
    import pandas as pd

    from gcl.data import grades

    log = generate_log(pairs, LogConfig(sessions_per_query=10, seed=2))
    (tmp_path / "log").mkdir()
    for part, rows in enumerate(np.array_split(np.arange(len(log)), 3)):
        log.iloc[rows].to_parquet(tmp_path / "log" / f"part-{part}.parquet", index=False)
    pairs.drop_duplicates("product_id")[["product_id", "title", "image"]].to_parquet(tmp_path / "catalog.parquet")
    written, reports = {}, {}
    for path, local_rows in (("local", len(log)), ("ray", 0)):
        monkeypatch.setattr(grades, "LOCAL_ROWS", local_rows)
        out = tmp_path / path
        cfg = GradesConfig(log=str(tmp_path / "log"), catalog=str(tmp_path / "catalog.parquet"), out=str(out))
        reports[path] = grades.make_grades(cfg)
        written[path] = pd.read_parquet(out / "pairs").sort_values("pair_id", ignore_index=True)
    assert reports["ray"].impressions == reports["local"].impressions == len(log)
    assert reports["ray"].written == reports["local"].written == len(written["local"]) > 100
    columns = ["pair_id", "query_id", "product_id", "score_linear", "position", "clicks", "title"]
    pd.testing.assert_frame_equal(written["ray"][columns], written["local"][columns], check_dtype=False)
    catalog = pd.read_parquet(tmp_path / "catalog.parquet")
    graded_product = catalog[catalog.product_id.astype(str) == written["local"].product_id[0]]
    pd.concat([catalog, graded_product]).to_parquet(tmp_path / "catalog.parquet")  # a product twice
    with pytest.raises(grades.DataError, match="catalog.*product_id repeats"):
        grades.make_grades(cfg.model_copy(update={"out": str(tmp_path / "repeated")}))
