"""The sweeps behind the shipped defaults, on `gcl demo`'s benchmark and budget:

    .venv/bin/python experiments/default_sweeps.py [WORKDIR] [gcl|binary ...]

Each sweep (experiments/sweep-defaults-<name>.yaml) selects its best trial on the validation splits; the
best trial's test splits are what docs/ranking.md reports. Results go to
<WORKDIR>/default-sweeps.json (one entry per sweep: every trial's parameters and validation
objective, the best trial's per-split test metrics).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from gcl.data.schema import SPLITS
from gcl.data.synth import synthesize
from gcl.report import split_metrics
from workflows.demo import BENCHMARK, benchmark_data

HERE = Path(__file__).parent


def ndcg_at_10(measures: dict) -> float:
    """NDCG@10 from a run's measures (MLflow keeps it as ndcg_at_10)."""
    return measures["ndcg@10"] if "ndcg@10" in measures else measures["ndcg_at_10"]


def job_overrides(workdir: str) -> list[str]:
    """Overrides that point a job at the benchmark, storage and tracking store in `workdir`."""
    return [
        *benchmark_data(f"{workdir}/data"),
        f"storage={workdir}/runs",
        f"mlflow.tracking_uri=sqlite:///{workdir}/mlruns.db",
    ]


def tune_overrides(overrides: list[str]) -> list[str]:
    """A script's overrides as `gcl tune` takes them: the job's prefixed `job.`, the sweep's
    (given as `sweep.key=value`) bare."""
    return [o.removeprefix("sweep.") if o.startswith("sweep.") else f"job.{o}" for o in overrides]


def run_sweep(path: str | Path, workdir: str, overrides: list[str] | None = None) -> dict:
    """Run the sweep in `path` on the benchmark in <workdir>/data (or as `overrides`, the job's, say:
    `job_overrides(workdir)` by default; sweep-level ones prefixed `sweep.`); every trial's
    parameters and validation objective, and the best trial's per-split test metrics."""
    from mlflow import MlflowClient

    from workflows.tune import run_tune

    uri = f"sqlite:///{workdir}/mlruns.db"
    overrides = job_overrides(workdir) if overrides is None else overrides
    result = run_tune(str(path), tune_overrides(overrides))
    best_metrics = MlflowClient(uri).get_run(result.best["run_id"]).data.metrics
    test = split_metrics(best_metrics)
    return {
        "trials": [
            {k: row[k] for k in ("trial", "params", "objective", "test_objective", "epochs", "status")}
            for row in result.trials
        ],
        "best": {
            "params": result.best["params"],
            "objective": result.best["objective"],
            "epochs": result.best["epochs"],
            "test": {s: test[s] for s in SPLITS},
        },
    }


def train_with_seed(sweep: str | Path, best: dict, seed: int, overrides: list[str]) -> dict[str, float]:
    """Test NDCG@10 per split of a sweep's best settings trained again with `seed`, as long as the
    best trial trained; `overrides` as the sweep ran (see run_sweep)."""
    from gcl.train.job import resolve_job, run_train
    from gcl.tune.sweep import load_sweep
    from gcl.tune.tuner import trial_job

    config, job = load_sweep(sweep, tune_overrides(overrides))
    params = {**best["params"], "train.epochs": best["epochs"]}
    seeded = trial_job({**job.model_dump(mode="json"), "seed": seed}, params, f"{config.name}-best-seed{seed}")
    metrics = split_metrics(run_train(resolve_job(seeded), progress=False).metrics)
    return {split: ndcg_at_10(metrics[split]) for split in SPLITS}


def test_ndcg(results: dict, name: str) -> dict[str, list[float]]:
    """Split -> test NDCG@10 of every seed trained at a variant's best settings (seed 0 first)."""
    best = results[name]["best"]
    champion = [{s: ndcg_at_10(m) for s, m in best["test"].items()}] if "test" in best else []  # not swept: seeds only
    runs = [*champion, *results[name].get("seeds", {}).values()]
    return {split: [run[split] for run in runs] for split in SPLITS}


def margin_table(results: dict) -> str:
    """The two champions' test NDCG@10 per split, and GCL's change over binary (markdown)."""
    lines = ["| split | binary champion | GCL champion | change |", "| --- | --- | --- | --- |"]
    for split in SPLITS:
        binary, gcl = (ndcg_at_10(results[name]["best"]["test"][split]) for name in ("binary", "gcl"))
        lines.append(f"| {split} | {binary:.4f} | {gcl:.4f} | {100 * (gcl / binary - 1):+.1f}% |")
    return "\n".join(lines)


def open_results(workdir: str, filename: str) -> tuple[str, Path, dict]:
    """(absolute workdir, results file, results so far) for a script's work directory, with the
    benchmark written to <workdir>/data if it is not there yet."""
    workdir = os.path.abspath(workdir)
    if not os.path.exists(f"{workdir}/data/train.parquet"):
        synthesize(f"{workdir}/data", BENCHMARK)
    out = Path(workdir) / filename
    return workdir, out, json.loads(out.read_text()) if out.exists() else {}


def main(workdir: str, names: list[str]) -> None:
    workdir, out, results = open_results(workdir, "default-sweeps.json")
    for name in names:
        results[name] = run_sweep(HERE / f"sweep-defaults-{name}.yaml", workdir)
        out.write_text(json.dumps(results, indent=2))
        best = results[name]["best"]
        print(
            name,
            "best",
            json.dumps(best["params"]),
            "validation",
            round(best["objective"], 4),
            "test ndcg@10",
            json.dumps({s: round(ndcg_at_10(m), 4) for s, m in best["test"].items()}),
            flush=True,
        )
    if {"gcl", "binary"} <= set(results):
        print(margin_table(results))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gcl_runs/default-sweeps", sys.argv[2:] or ["gcl", "binary"])
