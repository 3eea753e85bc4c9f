"""`gcl bench`: performance ratios measured side by side in one run on this machine (the sections
are described in gcl.bench); this recipe chooses the sections and the job they time."""

from __future__ import annotations

import os
import tempfile

import torch

from gcl.bench.anchor import OPEN_CLIPS_WORK
from gcl.bench.data import batch_from_pipeline
from gcl.bench.printout import print_figures
from gcl.bench.sections import (
    bare_loop_figures,
    data_figures,
    memory_figures,
    pipeline_figures,
    retrieval_figures,
    steps_figures,
)
from gcl.bench.steps import bench_device
from gcl.cluster import init_ray
from gcl.config import parse_config
from gcl.data.schema import SPLITS
from gcl.data.synth import SynthConfig, synthesize
from gcl.job_config import JobConfig
from workflows import CONFIGS

SECTIONS = ["data", "steps", "pipeline", "memory", "cached", "retrieval", "search", "locked"]
BATCH = 32  # per worker
# About 15,400 training pairs: an epoch long enough that its fixed start (listing and reading
# the files, the shuffle's all-to-all, starting the preprocessing) does not stand for the rate,
# as it did with the 2,300 pairs the bench trained on until 2026-11-25 (4 s of a 9 s pass).
BENCH_DATA = SynthConfig(products=2000, queries=1000, docs_per_query=24)
DEMO_BENCHMARK = SynthConfig(products=1500, queries=500)  # gcl demo's (workflows/demo.py BENCHMARK)


def bench_job(workdir: str, gpus: int, overrides: list[str] | None = None) -> JobConfig:
    """The job the data, steps and pipeline sections time: the tiny CPU config on the bench's
    generated data, one worker per GPU up to 2 (else 2 CPU workers), then `overrides` (KEY=VALUE,
    as `gcl train --set` takes them, e.g. model.arch=ViT-B-32 or train.batch_size=128)."""
    return parse_config(
        JobConfig,
        CONFIGS / "tiny-cpu.yaml",
        [
            f"data.train={workdir}/data/train.parquet",
            "data.eval={}",
            f"storage={workdir}/runs",
            f"mlflow.tracking_uri=sqlite:///{workdir}/mlflow.db",
            f"train.batch_size={BATCH}",
            "train.epochs=2",
            "loss.score_range=[0, 1]",
            *(["scaling.use_gpu=true", f"scaling.num_workers={min(2, gpus)}"] if gpus else []),
            *(overrides or []),
        ],
    )


# Named settings of `gcl bench --preset`: sections, overrides of the timed job, timed steps, and
# optionally the generated data it trains on.
PRESETS = {
    # The steps section at ViT-B-32 size on a CPU, in a few minutes: open_clip's loop against gcl's
    # step (plain, ZeRO-0 to 3, and 2 processes side by side) on batches of 8 pairs.
    "vitb32-cpu": {"only": ["steps"], "overrides": ["model.arch=ViT-B-32", "train.batch_size=4"], "steps": 5},
    # A locked image tower's features computed once against the tower run every pair and epoch
    # (gcl.bench.locked): the demo's binary and GCL trainings, each twice (about 10 minutes).
    "towers-locked": {"only": ["locked"], "overrides": [], "steps": 5},
    # The whole job at ViT-B-32 size on a CPU (about 10 minutes): `gcl train` with one worker on
    # all cores (Ray Data -> Ray Train -> DeepSpeed), doing open_clip's work (query and image), against
    # open_clip's loop at its batch, on about 230 training pairs (2 epochs; the rate is the second's).
    "vitb32-cpu-job": {
        "only": ["steps", "pipeline"],
        "steps": 5,
        "overrides": [
            "model.arch=ViT-B-32",
            "train.batch_size=8",
            "scaling.num_workers=1",
            f"scaling.torch_threads={os.cpu_count() or 1}",
            *OPEN_CLIPS_WORK,
        ],
        "data": SynthConfig(products=200, queries=20, docs_per_query=20),
    },
}


def locked_jobs(workdir: str, overrides: list[str] | None = None) -> dict[str, JobConfig]:
    """The locked section's jobs: the demo's binary and GCL (workflows/configs/towers-binary.yaml,
    towers-gcl.yaml: the pretrained towers at their sweeps' champions, both towers locked) on `gcl
    demo`'s benchmark at its budget."""
    common = [
        f"data.train={workdir}/demo-data/train.parquet",
        "data.eval={" + ", ".join(f"{s}: {workdir}/demo-data/{s}.parquet" for s in SPLITS) + "}",
        "data.validation={" + ", ".join(f"{s}: {workdir}/demo-data/val_{s}.parquet" for s in SPLITS) + "}",
        f"storage={workdir}/runs",
        f"mlflow.tracking_uri=sqlite:///{workdir}/mlflow.db",
        "train.epochs=2",
        "train.batch_size=32",
    ]
    return {
        name: parse_config(JobConfig, CONFIGS / config, [*common, f"name=locked-{name}", *(overrides or [])])
        for name, config in (("binary", "towers-binary.yaml"), ("gcl", "towers-gcl.yaml"))
    }


def run_bench(
    only: list[str] | None = None,
    workdir: str | None = None,
    overrides: list[str] | None = None,
    search_rows: int = 1_000_000,
    preset: str | None = None,
) -> dict:
    """Run the benchmarks, print a table and JSON, return the figures. `overrides` apply to the
    data, steps, pipeline and search sections' job (see bench_job); the memory section keeps its
    own. search_rows: the vectors the search section indexes (gcl.bench.search). `preset`: one of
    PRESETS, whose sections and overrides come first (`only` and `overrides` add to them)."""
    timed_steps, data = 20, BENCH_DATA
    if preset:
        chosen = PRESETS[preset]
        only, overrides = only or chosen["only"], [*chosen["overrides"], *(overrides or [])]
        timed_steps, data = chosen["steps"], chosen.get("data", BENCH_DATA)
    only = only or [s for s in SECTIONS if s not in ("search", "locked")]  # those two: asked for by name
    device, gpus = bench_device(), torch.cuda.device_count()
    figures: dict = {"machine": f"{os.cpu_count()} CPU cores, CUDA={torch.cuda.is_available()}", "device": str(device)}
    if gpus:
        figures["gpu"] = f"{gpus} x {torch.cuda.get_device_name(0)}"
    training = set(only) - {"retrieval", "search", "locked"}
    if training or "search" in only:  # a bad --set fails here, before any section runs
        workdir = os.path.abspath(workdir or tempfile.mkdtemp(prefix="gcl-bench-"))
        os.makedirs(workdir, exist_ok=True)
        job = bench_job(workdir, gpus, overrides)
    if "retrieval" in only:  # first, before Ray's processes share the cores
        figures.update(retrieval_figures())
    if "search" in only:
        from gcl.bench.search import search_figures

        init_ray()
        figures.update(search_figures(job, rows=search_rows, uniform_rows=min(search_rows, 100_000), workdir=workdir))
    if "locked" in only:  # its own data: the demo's benchmark, for the demo's rates
        from gcl.bench.locked import locked_feature_figures

        workdir = os.path.abspath(workdir or tempfile.mkdtemp(prefix="gcl-bench-"))
        synthesize(f"{workdir}/demo-data", DEMO_BENCHMARK)
        init_ray()
        figures.update(locked_feature_figures(locked_jobs(workdir, overrides)))
    if not training:
        return print_figures(figures)
    os.makedirs(f"{workdir}/runs", exist_ok=True)
    synthesize(f"{workdir}/data", data)
    init_ray()
    if {"data", "pipeline", "steps"} & set(only):
        batch = batch_from_pipeline(job, job.train.batch_size * job.scaling.num_workers)
    if "data" in only:
        figures.update(data_figures(job, batch, device))
    if "steps" in only:
        figures.update(steps_figures(job, batch, timed_steps))
    if "pipeline" in only:
        bare = bare_loop_figures(job, batch, device)
        figures.update(bare)
        figures.update(pipeline_figures(job, bare, figures))
    if "memory" in only:
        figures.update(memory_figures(f"{workdir}/runs", gpus))
    if "cached" in only:
        from gcl.bench.cached import cached_gradient_figures

        figures.update(cached_gradient_figures(job, f"{workdir}/runs"))
    return print_figures(figures)
