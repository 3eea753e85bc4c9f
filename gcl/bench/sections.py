"""The sections of `gcl bench`, each returning its figures (name -> value) measured side by side."""

from __future__ import annotations

import time

import torch

from gcl.bench.anchor import anchor_figures
from gcl.bench.data import data_pipeline_pass, preprocessor_pairs_per_s
from gcl.bench.flops import peak_flops_per_s, train_flops_per_pair
from gcl.bench.memory import zero_memory_figures
from gcl.bench.steps import bare_loop_pairs_per_s, data_parallel_pairs_per_s
from gcl.bench.top_k import retrieval_queries_per_s, search_peak_memory
from gcl.job_config import JobConfig
from gcl.train.job import run_train


def data_figures(job: JobConfig, batch: dict, device: torch.device) -> dict:
    """The data pipeline's pairs/s against what the trainers consume (bare steps, 1 core or GPU each)."""
    world, per_worker_batch = job.scaling.num_workers, job.train.batch_size
    per_worker = {k: v[:per_worker_batch] for k, v in batch.items()}
    consume_one = bare_loop_pairs_per_s(job, per_worker, threads=1, device=device)
    figures = {
        "train_consumption_pairs_per_s": world * consume_one,
        "preprocessor_alone_pairs_per_s": preprocessor_pairs_per_s(job),
    }
    for tasks in (1, 2):
        rate, first = data_pipeline_pass(job, tasks)
        figures[f"data_pairs_per_s_{tasks}cpu"] = rate
        figures[f"data_first_batch_s_{tasks}cpu"] = first
    figures["data_over_consumption"] = figures["data_pairs_per_s_2cpu"] / figures["train_consumption_pairs_per_s"]
    return figures


def bare_loop_figures(job: JobConfig, batch: dict, device: torch.device) -> dict:
    """The one bare loop every training ratio divides by, with the FLOPs and peak of its MFU."""
    threads = job.scaling.num_workers * job.scaling.torch_threads  # the cores the workers train on
    figures = {"bare_loop_pairs_per_s": bare_loop_pairs_per_s(job, batch, threads=threads, device=device)}
    peak, figures["peak_flops_source"] = peak_flops_per_s(device)
    figures["peak_tflops_per_s"] = peak / 1e12
    figures["train_gflops_per_pair"] = train_flops_per_pair(job, batch) / 1e9
    figures["bare_loop_mfu"] = figures["bare_loop_pairs_per_s"] * figures["train_gflops_per_pair"] * 1e9 / peak
    return figures


def steps_figures(job: JobConfig, batch: dict, timed_steps: int = 20) -> dict:
    """Training steps against the anchor, open_clip's own training step at the job's model and
    batch (gcl.bench.anchor): in one process, gcl's step in plain torch and in DeepSpeed engines
    at ZeRO-0 to 3, with the MFU of each; then, for a job of several workers (2 CPU workers, or
    one per GPU up to 2), the same steps in plain processes side by side, one per worker, each
    against the anchor."""
    rows = job.train.batch_size * job.scaling.num_workers
    figures = anchor_figures(job.model.arch, rows, steps=timed_steps, precision=job.train.precision)
    if job.scaling.num_workers == 1:  # nothing to run side by side
        return figures
    anchor = figures[f"b{rows}_open_clip_pairs_per_s"]
    steps = data_parallel_pairs_per_s(job, batch, job.scaling.num_workers, steps=timed_steps)
    figures.update(steps)
    figures.update({k.replace("_pairs_per_s", "_over_open_clip"): v / anchor for k, v in steps.items()})
    return figures


def pipeline_figures(job: JobConfig, bare: dict, steps: dict | None = None) -> dict:
    """`gcl train` on the bench job: its warm epoch (the last of 2) against the bare loop, and its
    MFU; against open_clip's loop too where the steps section measured it (`steps`)."""

    metrics = run_train(job.model_copy(update={"name": f"bench-{time.time_ns()}"})).metrics
    figures = {
        "pipeline_pairs_per_s": float(metrics["epoch_pairs_per_s"]),
        "pipeline_steady_pairs_per_s": float(metrics["epoch_steady_pairs_per_s"]),
        "pipeline_epoch_first_batch_s": float(metrics["epoch_first_batch_seconds"]),
        # How much of the warm epoch the trainers spent waiting for data (0: never starved).
        "pipeline_data_wait_fraction": float(metrics["epoch_data_wait_fraction"]),
    }
    figures["pipeline_over_bare"] = figures["pipeline_pairs_per_s"] / bare["bare_loop_pairs_per_s"]
    figures["pipeline_steady_over_bare"] = figures["pipeline_steady_pairs_per_s"] / bare["bare_loop_pairs_per_s"]
    rows = job.train.batch_size * job.scaling.num_workers
    anchor = (steps or {}).get(f"b{rows}_open_clip_pairs_per_s")
    if anchor:
        figures["pipeline_over_open_clip"] = figures["pipeline_pairs_per_s"] / anchor
        figures["pipeline_steady_over_open_clip"] = figures["pipeline_steady_pairs_per_s"] / anchor
    peak = bare["peak_tflops_per_s"] * 1e12
    figures["pipeline_mfu"] = figures["pipeline_pairs_per_s"] * bare["train_gflops_per_pair"] * 1e9 / peak
    return figures


def memory_figures(storage: str, gpus: int) -> dict:
    """ZeRO-3 against ZeRO-0 per-worker peaks: on 2+ GPUs allocated GPU memory; on the CPU the
    RSS in fp32 (as gcl trains there) and in bf16 (as the GPU config trains)."""
    if gpus == 1:
        return {"memory": "left out: needs 2 GPUs"}
    if gpus:
        return zero_memory_figures(storage, "auto", use_gpu=True)
    return {
        **zero_memory_figures(storage, "fp32", use_gpu=False),
        **zero_memory_figures(storage, "bf16", use_gpu=False, suffix="_bf16"),
    }


def retrieval_figures() -> dict:
    """Exact top-k against FAISS, and the search's peak memory at 100k and 1M documents."""
    return {**retrieval_queries_per_s(), **search_peak_memory()}
