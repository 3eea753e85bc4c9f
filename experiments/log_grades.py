"""Does GCL trained on a search log's debiased grades rank better than training on its raw clicks?

    .venv/bin/python experiments/log_grades.py [WORKDIR] [--confounded | --sponsored | --sponsored-large]
        [--only=VARIANT,...] [--at=RESULTS.json]

1. `gcl demo`'s benchmark, with a search log over its training queries (gcl.data.synth: a logging
   ranker that also ranks by a promotion unrelated to relevance, position bias 1/k, clicks, carts
   and purchases drawn from the true grades) and the products' catalog. --confounded: a stronger
   promotion (2.0 against 1.5) and grades from clicks alone, where raw click-through rates learn
   the promotion back most (tests/test_grades.py's setting). --sponsored: the first log, with
   every list opening with two sponsored products of other queries' results (true grade 0), which
   their clicks at the top of a list make look relevant; --sponsored-large: the same with 400
   searches per query instead of 40. --only=harvested,raw runs those variants alone; --at=FILE
   trains each at FILE's champion settings, seeds 0-2, instead of sweeping.
2. `gcl data grades`: (a) debiased grades, (b) raw click-through-rate grades
   (`grades.debias: false`); (c) the pairs clicked at least once, what a team trains on today;
   (d) (a)'s pairs at their true grades: what any grading could buy at most; (e) and (f): (a) and
   (b) with score_linear by rank within each query (`grades.score: rank`); (a') (a) with the
   propensities by intervention harvesting (`grades.estimator: harvested`).
3. Each variant at its own validation-selected settings: (a), (b), (d), (e), (f) and (a') run
   sweep-logs-gcl.yaml (the towers' GCL), (c) sweep-logs-clip.yaml (CLIP's loss over the same
   title + image documents). Every variant selects on the benchmark's validation splits (true grades, the same
   for all) and is reported on its test splits against the true grades; each champion is trained
   again with seeds 1 and 2.

Results go to <WORKDIR>/log-grades.json (a rerun continues where it stopped); the table it prints
(test NDCG@10 per split, mean and standard deviation over the seeds) is what docs/ranking.md
section 4 reports.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from default_sweeps import job_overrides, run_sweep, test_ndcg, train_with_seed  # noqa: E402

from gcl.data.schema import SPLITS  # noqa: E402

HERE = Path(__file__).parent
# variant -> (what it is, its sweep, its training pairs under the work directory)
VARIANTS = {
    "debiased": ("(a) GCL, debiased grades", "sweep-logs-gcl.yaml", "grades-debiased/pairs"),
    "raw": ("(b) GCL, raw click-through grades", "sweep-logs-gcl.yaml", "grades-raw/pairs"),
    "clicked": ("(c) CLIP's loss, clicked pairs", "sweep-logs-clip.yaml", "clicked"),
    # What grades can buy at most: (a)'s pairs with the grades the log was drawn from.
    "true": ("(d) GCL, (a)'s pairs at their true grades", "sweep-logs-gcl.yaml", "true-grades"),
    # (a) and (b) with score_linear by rank within the query (grades.score=rank), as the benchmark's
    # own scores are: the grade over the log's largest puts most pairs near the weight's floor.
    "debiased-rank": ("(e) GCL, debiased grades by rank", "sweep-logs-gcl.yaml", "grades-debiased-rank/pairs"),
    "raw-rank": ("(f) GCL, raw click-through grades by rank", "sweep-logs-gcl.yaml", "grades-raw-rank/pairs"),
    # (a) with the propensities by intervention harvesting (grades.estimator=harvested): what the
    # report advises where EM and harvesting disagree (the sponsored log).
    "harvested": ("(a') GCL, debiased grades, harvested propensities", "sweep-logs-gcl.yaml", "grades-harvested/pairs"),
}
MORE_SEEDS = (1, 2)
COMPARED = (
    ("debiased", "raw"),
    ("debiased", "clicked"),
    ("true", "raw"),
    ("debiased-rank", "raw-rank"),
    ("debiased-rank", "clicked"),
    ("harvested", "raw"),
)
GRADINGS = {
    "debiased": {},
    "raw": {"debias": False},
    "debiased-rank": {"score": "rank"},
    "raw-rank": {"debias": False, "score": "rank"},
    "harvested": {"estimator": "harvested"},
}


LOGS = {
    "mild": {},
    "confounded": {"promotion": 2.0},
    "sponsored": {"sponsored": 2},
    # The sponsored log with 10x the searches: grades closer to their limit (debiased: the truth's
    # order; raw: the ranker's bias), with --only harvested,raw.
    "sponsored-large": {"sponsored": 2, "sessions_per_query": 400},
}


def make_data(workdir: str, log: str = "mild") -> dict:
    """The benchmark with its log, both gradings and the clicked pairs (each made once); what
    each grading reported."""
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    from gcl.data.grades import GradesConfig, make_grades
    from gcl.data.synth import LogConfig, synthesize
    from workflows.demo import BENCHMARK

    data = f"{workdir}/data"
    if not os.path.exists(f"{data}/log-truth.json"):
        synthesize(data, BENCHMARK, log=LogConfig(**LOGS[log]))
    reports = {}
    for name, grading in GRADINGS.items():
        out = f"{workdir}/grades-{name}"
        if not os.path.exists(f"{out}/manifest.json"):
            clicks_only = {"add_to_cart_weight": 0.0, "purchase_weight": 0.0} if log == "confounded" else {}
            cfg = GradesConfig(log=f"{data}/log", catalog=f"{data}/catalog.parquet", out=out, **grading)
            make_grades(cfg.model_copy(update=clicks_only))
        reports[name] = json.loads(Path(f"{out}/manifest.json").read_text())["report"]
    clicked = f"{workdir}/clicked/pairs.parquet"
    if not os.path.exists(clicked):
        os.makedirs(os.path.dirname(clicked), exist_ok=True)
        pairs = ds.dataset(f"{workdir}/grades-raw/pairs").to_table(filter=ds.field("clicks") > 0)
        pq.write_table(pairs, clicked + ".partial")
        os.replace(clicked + ".partial", clicked)
    reports["clicked_pairs"] = pq.read_metadata(clicked).num_rows
    true = f"{workdir}/true-grades/pairs.parquet"
    if not os.path.exists(true):
        os.makedirs(os.path.dirname(true), exist_ok=True)
        pq.write_table(
            with_true_grades(f"{workdir}/grades-debiased/pairs", f"{data}/log-truth.parquet"), true + ".partial"
        )
        os.replace(true + ".partial", true)
    return reports


def with_true_grades(graded: str, truth: str):
    """The graded pairs with score_linear replaced by the true grade of each (query, product) the
    log showed (gcl.data.synth.log_truth), and position / score_reciprocal ranked again by it."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    pairs = ds.dataset(graded).to_table().to_pandas()
    true = ds.dataset(truth).to_table(columns=["query_id", "product_id", "grade"]).to_pandas()
    true = true.astype({"query_id": str, "product_id": str}).rename(columns={"grade": "true"})
    pairs = pairs.merge(true, on=["query_id", "product_id"], how="left", validate="one_to_one")
    assert pairs["true"].notna().all(), "a graded pair is not in the log's truth"
    pairs["score_linear"] = pairs.pop("true")
    pairs["position"] = pairs.groupby("query_id")["score_linear"].rank(ascending=False, method="first").astype(int)
    pairs["score_reciprocal"] = 1.0 / pairs["position"]
    return pa.Table.from_pandas(pairs, preserve_index=False)


def variant_overrides(workdir: str, name: str) -> list[str]:
    """The benchmark's validation and test splits, the variant's own training pairs and sweep name."""
    train = f"data.train={workdir}/{VARIANTS[name][2]}"
    return [
        *(o for o in job_overrides(workdir) if not o.startswith("data.train=")),
        train,
        f"sweep.name=sweep-logs-{name}",
    ]


def results_table(results: dict) -> str:
    """Test NDCG@10 per split, mean ± sd over the seeds, and the changes COMPARED names, of the
    variants `results` has (an earlier run's lack (a'))."""
    variants = [name for name in VARIANTS if name in results]
    compared = [(a, b) for a, b in COMPARED if a in results and b in results]
    ndcg = {name: test_ndcg(results, name) for name in variants}
    seeds = len(ndcg[variants[0]][SPLITS[0]])
    lines = [
        "| split | "
        + " | ".join(f"{VARIANTS[name][0]} ({seeds} seeds)" for name in variants)
        + "".join(f" | {VARIANTS[a][0].split()[0]} vs {VARIANTS[b][0].split()[0]}" for a, b in compared)
        + " |",
        "| --- " * (len(variants) + len(compared) + 1) + "|",
    ]
    for split in SPLITS:
        means = {name: statistics.mean(ndcg[name][split]) for name in variants}
        cells = [f"{means[name]:.4f} ± {statistics.stdev(ndcg[name][split]):.4f}" for name in variants]
        changes = [f"{100 * (means[a] / means[b] - 1):+.1f}%" for a, b in compared]
        lines.append(f"| {split} | " + " | ".join(cells + changes) + " |")
    return "\n".join(lines)


def main(workdir: str, log: str = "mild", only: list[str] | None = None, at: str | None = None) -> None:
    """`at`: an earlier run's results file; each variant trains at that run's champion settings
    with seeds 0, 1 and 2 instead of sweeping its own (every GCL sweep so far chose the same one)."""
    workdir = os.path.abspath(workdir)
    out = Path(workdir) / "log-grades.json"
    os.makedirs(workdir, exist_ok=True)
    results = json.loads(out.read_text()) if out.exists() else {}
    results["grades"] = make_data(workdir, log)
    for name, (label, sweep, _) in VARIANTS.items():
        if only and name not in only:
            continue
        overrides = variant_overrides(workdir, name)
        if name not in results and at:
            best = json.loads(Path(at).read_text())[name]["best"]
            results[name] = {"best": {"params": best["params"], "epochs": best["epochs"], "from": at}, "seeds": {}}
        if name not in results:
            results[name] = run_sweep(HERE / sweep, workdir, overrides)
            out.write_text(json.dumps(results, indent=2))
        print(label, "best", json.dumps(results[name]["best"]["params"]), flush=True)
        seeds = results[name].setdefault("seeds", {})
        for seed in MORE_SEEDS if "test" in results[name]["best"] else (0, *MORE_SEEDS):
            if str(seed) not in seeds:
                seeds[str(seed)] = train_with_seed(HERE / sweep, results[name]["best"], seed, overrides)
                out.write_text(json.dumps(results, indent=2))
    print(results_table(results))


if __name__ == "__main__":
    options = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith(("--only=", "--at=")))
    logs = [a[2:] for a in sys.argv[1:] if a[2:] in LOGS]
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    only = options["only"].split(",") if "only" in options else None
    main(args[0] if args else "gcl_runs/log-grades", logs[0] if logs else "mild", only, options.get("at"))
