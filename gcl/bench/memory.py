"""Peak memory: this process's resident memory read from /proc (not getrusage, see peak_rss_mib),
and the per-worker peak of 2 DeepSpeed workers on a ViT-B-32-sized model at ZeRO-0 and ZeRO-3."""

from __future__ import annotations

import json
import os
import tempfile
import time

import torch

from gcl.bench.proc import peak_rss_mib, reset_peak_rss, rss_mib
from gcl.config import parse_config
from gcl.job_config import JobConfig
from gcl.train.engine import setup_engine


def memory_worker(config: dict) -> None:
    """Two optimizer steps of a ViT-B-32-sized model under DeepSpeed; reports the peak memory:
    allocated GPU memory on a GPU, else the process's RSS."""
    import ray.train

    job = JobConfig.model_validate(config["job"])
    torch.set_num_threads(1)
    cuda = job.scaling.use_gpu
    # What the process holds before the model: Python, torch, Ray, DeepSpeed (on a GPU, nothing).
    if cuda:
        baseline_mib = torch.cuda.memory_allocated() / 2**20
    else:
        reset_peak_rss()  # the peak counts from here, whatever a reused worker held before
        baseline_mib = rss_mib()
    engine, _, loaded = setup_engine(job, total_steps=10)
    size = loaded.model_cfg["vision_cfg"]["image_size"]
    length = loaded.model_cfg["text_cfg"]["context_length"]
    inputs = {"query": torch.randint(1, 49000, (4, length)), "image": torch.randn(4, 3, size, size)}
    inputs = {k: v.to(engine.device) for k, v in inputs.items()}
    for _ in range(2):
        embeddings, log_scale = engine(inputs)
        loss = -(embeddings["query"] * embeddings["image"]).sum() * log_scale.exp().squeeze()
        engine.backward(loss)
        engine.step()
    peak_mib = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mib()
    rank = ray.train.get_context().get_world_rank()
    with open(os.path.join(config["out"], f"rank{rank}.json"), "w") as f:
        json.dump({"peak_mib": peak_mib, "baseline_mib": baseline_mib}, f)


def zero_peak_memory_mib(
    stage: int, storage: str, precision: str = "auto", use_gpu: bool = False
) -> tuple[float, float]:
    """Max over the 2 workers of peak memory (MiB; RSS, or allocated GPU memory with `use_gpu`) for
    ZeRO `stage` on ViT-B-32 (random init), and of that peak beyond the worker's memory before
    the model was built."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    job = parse_config(
        JobConfig,
        None,
        [
            "model.arch=ViT-B-32",
            f"deepspeed.zero_stage={stage}",
            "train.batch_size=4",
            "fields.left={query: {modality: text}}",
            "fields.right={image: {modality: image}}",
            f"train.precision={precision}",
            f"scaling.use_gpu={str(use_gpu).lower()}",
        ],
    )
    out = tempfile.mkdtemp(prefix=f"zero{stage}-", dir=storage)
    trainer = TorchTrainer(
        memory_worker,
        train_loop_config={"job": job.model_dump(mode="json"), "out": out},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=use_gpu, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name=f"bench-zero{stage}-{time.time_ns()}", storage_path=storage),
    )
    trainer.fit()
    ranks = []
    for rank in range(2):
        with open(os.path.join(out, f"rank{rank}.json")) as f:
            ranks.append(json.load(f))
    return max(r["peak_mib"] for r in ranks), max(r["peak_mib"] - r["baseline_mib"] for r in ranks)


def zero_memory_figures(storage: str, precision: str, use_gpu: bool, suffix: str = "") -> dict:
    """ZeRO-3 against ZeRO-0: each one's peak, and the peak beyond the libraries, with ratios;
    `suffix` tells one precision's figures from another's."""
    zero0, zero0_model = zero_peak_memory_mib(0, storage, precision, use_gpu)
    zero3, zero3_model = zero_peak_memory_mib(3, storage, precision, use_gpu)
    label = ("gpu_mib" if use_gpu else "rss_mib") + suffix
    return {
        f"peak_{label}_zero0": zero0,
        f"peak_{label}_zero3": zero3,
        f"zero3_over_zero0{suffix}": zero3 / zero0,
        f"training_{label}_zero0": zero0_model,
        f"training_{label}_zero3": zero3_model,
        f"zero3_over_zero0_training{suffix}": zero3_model / zero0_model,
    }
