"""The ranking variants at `gcl demo`'s budget, each trained and scored on the test
splits (NDCG@10), the same data, model and settings as the demo's GCL run otherwise:

    .venv/bin/python experiments/ranking_variants.py [WORKDIR] [VARIANT ...]

GCL (diagonal target, shuffled pairs); the listwise target with 2 and 4 documents per query in a
batch; the diagonal target with 4 documents per query (what the grouping alone does); GCL with a
4x larger batch (128 pairs per worker) through cached-gradient steps of 32, at the demo's learning
rate and at twice it; listwise m=4 with that batch. Without VARIANTs, all. Results are added to
<WORKDIR>/ranking-variants.json and the table goes to the terminal (docs/ranking.md records them).
"""

from __future__ import annotations

import json
import os
import sys

from gcl.config import parse_config
from gcl.data.schema import SPLITS
from gcl.data.synth import synthesize
from gcl.job_config import JobConfig
from gcl.report import comparison_table, split_metrics
from gcl.train.job import resolve_job, run_train
from workflows import CONFIGS
from workflows.demo import BENCHMARK, benchmark_data

VARIANTS = {
    "GCL": [],
    "listwise m=2": ["loss.target=listwise", "pipeline.docs_per_query=2"],
    "listwise m=4": ["loss.target=listwise", "pipeline.docs_per_query=4"],
    "diagonal m=4": ["pipeline.docs_per_query=4"],
    "GCL batch 128": ["train.batch_size=128", "train.embed_chunk=32"],
    "GCL batch 128 lr 2e-3": ["train.batch_size=128", "train.embed_chunk=32", "train.lr=2e-3"],
    "listwise m=4 batch 128": [
        "loss.target=listwise",
        "pipeline.docs_per_query=4",
        "train.batch_size=128",
        "train.embed_chunk=32",
    ],
}


def main(workdir: str, names: list[str]) -> None:
    workdir = os.path.abspath(workdir)
    data = f"{workdir}/data"
    if not os.path.exists(f"{data}/train.parquet"):
        synthesize(data, BENCHMARK)
    common = [
        *benchmark_data(data),
        f"storage={workdir}/runs",
        f"mlflow.tracking_uri=sqlite:///{workdir}/mlruns.db",
        "train.epochs=4",
        "train.batch_size=32",
        "train.lr=1e-3",
    ]
    out = f"{workdir}/ranking-variants.json"
    results = {}
    if os.path.exists(out):
        with open(out) as f:
            results = json.load(f)
    for name in names:
        extra = VARIANTS[name]
        slug = name.replace(" ", "-").replace("=", "")
        job = resolve_job(parse_config(JobConfig, CONFIGS / "tiny-cpu.yaml", [*common, f"name={slug}", *extra]))
        metrics = split_metrics(run_train(job, progress=False).metrics)
        results[name] = {s: metrics[s] for s in SPLITS}
        print(name, json.dumps({s: round(m["ndcg@10"], 4) for s, m in results[name].items()}), flush=True)
        with open(out, "w") as f:
            json.dump(results, f, indent=2)
    print(comparison_table(results, ["ndcg@10"]))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gcl_runs/ranking-variants", sys.argv[2:] or list(VARIANTS))
