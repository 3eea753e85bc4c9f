"""`gcl demo`: the main job on embedded defaults (local Ray, MLflow on SQLite, generated data).

Generates the synthetic benchmark, fine-tunes three times with the same budget - the CLIP-style
binary baseline (CLIP's loss: uniform weights, image-only documents, no masking), GCL-uniform
(uniform weights with GCL's image + title documents and loss settings) and GCL (graded weights
too), each at its own settings (workflows/configs/towers-*.yaml), chosen for it on the validation
splits by a sweep of its own at this budget - evaluates them on all four splits, prints the
comparison, saves a plot, and registers the GCL model as `champion`. The model is a dual encoder from pretrained towers
(minilm-efflite0.yaml: MiniLM text, ImageNet EfficientNet-Lite0 image, from the `pretrained`
extra); `gcl demo --tiny` does the same with gcl-tiny from random weights (tiny-*.yaml).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from gcl.config import parse_config
from gcl.console import say
from gcl.data.schema import SPLITS
from gcl.data.synth import SynthConfig, synthesize
from gcl.job_config import JobConfig
from gcl.registry.models import register_run
from gcl.report import comparison_plot, comparison_table, split_metrics
from gcl.tracking.names import OBJECTIVE
from gcl.train.job import resolve_job, run_train
from workflows import CONFIGS

MEASURES = ["ndcg@10", "map@1000", "mrr@1000", "err", "rbp@0.8"]
REGISTERED_MODEL = "gcl-demo"
TINY_MODEL = "gcl-demo-tiny"  # `gcl demo --tiny`: gcl-tiny, not the towers, so a name of its own
log = logging.getLogger("gcl.demo")


def _nested(metrics: dict) -> dict[str, dict[str, float]]:
    """{split: {measure: value}} for the benchmark's test splits, in the paper's order."""
    out = split_metrics(metrics)
    return {s: out[s] for s in SPLITS if s in out}


# The three trainings, in the table's order (each column after the first is compared with the
# first): their names, and the config each trains (workflows/configs/), from the pretrained towers
# and, with --tiny, from gcl-tiny. Each config holds its variant's own settings, chosen for it on
# the validation splits by a sweep at the demo's budget (docs/ranking.md), so the margins the demo
# prints are over tuned baselines.
NAMES = {"binary": "binary", "gcl-uniform": "GCL-uniform", "gcl": "GCL"}
TOWERS_CONFIGS = {"binary": "towers-binary.yaml", "gcl-uniform": "towers-gcl-uniform.yaml", "gcl": "towers-gcl.yaml"}
TINY_CONFIGS = {"binary": "tiny-binary.yaml", "gcl-uniform": "tiny-gcl-uniform.yaml", "gcl": "tiny-cpu.yaml"}


# The demo's synthetic benchmark (`gcl demo --quick` makes a smaller one).
BENCHMARK = SynthConfig(products=1500, queries=500)


def benchmark_data(data: str) -> list[str]:
    """Overrides that point a job at the benchmark written to `data`: its training pairs, test
    splits and validation splits."""
    return [
        f"data.train={data}/train.parquet",
        "data.eval={" + ", ".join(f"{s}: {data}/{s}.parquet" for s in SPLITS) + "}",
        "data.validation={" + ", ".join(f"{s}: {data}/val_{s}.parquet" for s in SPLITS) + "}",
    ]


def demo_jobs(workdir: str, quick: bool, stamp: str, tiny: bool = False) -> dict[str, JobConfig]:
    """The trainings the demo compares, each its variant's config (TOWERS_CONFIGS, or TINY_CONFIGS
    with `tiny`), with identical budget and data: the CLIP-style binary baseline, GCL-uniform
    (uniform weights with GCL's title + image fields, masking and term weights) and GCL (graded
    weights too)."""
    configs, epochs = (TINY_CONFIGS, 4) if tiny else (TOWERS_CONFIGS, 2)
    common = [
        *benchmark_data(f"{workdir}/data"),
        f"storage={workdir}/runs",
        "eval.measures=[" + ", ".join(MEASURES) + "]",
        f"train.epochs={1 if quick else epochs}",
        "train.batch_size=32",
    ]
    return {
        key: parse_config(JobConfig, CONFIGS / config, [*common, f"name=demo-{key}-{stamp}"])
        for key, config in configs.items()
    }


def _plot_and_log(runs: dict, results: dict, client, path: str) -> str:
    """The comparison plot (per-split NDCG@10, loss curves), logged to every run."""
    losses = {
        NAMES[key]: [m.value for m in sorted(client.get_metric_history(r.run_id, "loss"), key=lambda m: m.step)]
        for key, r in runs.items()
    }
    plot = comparison_plot({NAMES[key]: r for key, r in results.items()}, "ndcg@10", path, losses)
    for run in runs.values():
        client.log_artifact(run.run_id, plot)
    return plot


def _print_next_steps(uri: str, name: str, alias: str, baseline_model: str, split: str) -> None:
    say("\nNext:")
    say(
        f"  search page: .venv/bin/gcl ui --model models:/{name}@{alias} --model {baseline_model} "
        f"--eval-split {split}   # GCL beside the binary baseline; open http://127.0.0.1:8765/"
    )
    say(f"  MLflow UI:   .venv/bin/mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
    say(
        f"  serve:       PATH=$PWD/.venv/bin:$PATH MLFLOW_TRACKING_URI={uri} mlflow models serve "
        f"-m models:/{name}@{alias} --env-manager local --host 127.0.0.1 --port 5001"
    )
    say(
        "  query:       curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' "
        '-d \'{"dataframe_records": [{"query": "red striped circle"}]}\''
    )


def run_demo(quick: bool = False, workdir: str = "gcl_runs/demo", tiny: bool = False) -> dict:
    """Run the whole comparison (with gcl-tiny from random weights with `tiny`); returns {'baseline',
    'ablation', 'gcl': test results per split, 'plot', 'version', 'alias', 'registered_model',
    'runs': MLflow run ids}."""
    from mlflow import MlflowClient

    workdir = os.path.abspath(workdir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    # A line per phase (the trainings draw their own bars; two bars at once would cost a line per update
    # where the terminal is a log or a pipe).
    phases = iter(range(1, 7))

    def phase(what: str) -> None:
        say(f"[{next(phases)}/6] {what}")

    phase("generating the synthetic benchmark")
    synth = SynthConfig(products=400, queries=150, docs_per_query=10) if quick else BENCHMARK
    manifest = synthesize(f"{workdir}/data", synth)
    log.info("data: %s", json.dumps({k: v["rows"] for k, v in manifest["splits"].items()}))

    jobs = {key: resolve_job(job) for key, job in demo_jobs(workdir, quick, stamp, tiny).items()}
    registered_model = TINY_MODEL if tiny else REGISTERED_MODEL
    runs = {}
    for key, job in jobs.items():
        phase(f"training {NAMES[key]}")
        runs[key] = run_train(job)

    phase("comparing")
    results = {key: _nested(run.metrics) for key, run in runs.items()}
    table = comparison_table({NAMES[key]: r for key, r in results.items()}, MEASURES)
    gcl, uri = runs["gcl"], jobs["gcl"].mlflow.resolved_uri()
    client = MlflowClient(uri)
    plot = _plot_and_log(runs, results, client, f"{workdir}/demo-{stamp}.png")
    (Path(workdir) / f"results-{stamp}.txt").write_text(table + "\n")

    phase("registering the GCL model")
    version, alias = register_run(gcl.run_id, registered_model, uri)

    say(
        "\nSame model, data and budget, each at its own settings (chosen on the validation splits by a sweep of "
        "its own; docs/ranking.md): binary = CLIP-style (uniform weights, image-only documents, no masking); "
        "GCL-uniform = GCL's title + image fields, masking and term weights with uniform weights; GCL = graded "
        "weights too. Test splits, seed 0:"
    )
    say(table)
    say(f"\nplot: {plot}")
    say(
        f"registered {registered_model} version {version} as @{alias} "
        f"({jobs['gcl'].eval.objective_name()} on the validation splits {gcl.metrics[OBJECTIVE]:.4f})"
    )
    _print_next_steps(uri, registered_model, alias, runs["binary"].model_dir, f"{workdir}/data/in_domain.parquet")
    return {
        **results,
        "plot": plot,
        "version": version,
        "alias": alias,
        "registered_model": registered_model,
        "runs": {key: run.run_id for key, run in runs.items()},
    }
