"""Cached-gradient steps (train.embed_chunk) against whole ones: per-worker peak memory and time per
pair on the bench job's DeepSpeed workers (2 on the CPU), for a batch of one chunk, a batch 16x
the chunk in chunks, and the same large batch whole (what the chunks save)."""

from __future__ import annotations

import json
import os
import tempfile
import time

import torch

from gcl.bench.proc import peak_rss_mib, reset_peak_rss, rss_mib
from gcl.config import FieldsConfig
from gcl.data.pipeline import PRESENT
from gcl.job_config import JobConfig

FACTOR = 16  # the large batch, in chunks


def random_batch(
    fields: FieldsConfig, rows: int, context_length: int, image_size: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A pipeline batch of random tokens, pixels and scores: every query and document its own."""
    generator = torch.Generator().manual_seed(seed)
    batch: dict[str, torch.Tensor] = {}
    for name, modality in fields.modalities().items():
        if modality == "text":
            batch[name] = torch.randint(1, 49000, (rows, context_length), generator=generator)
        else:
            batch[name] = torch.randint(
                0, 256, (rows, 3, image_size, image_size), dtype=torch.uint8, generator=generator
            )
        batch[name + PRESENT] = torch.ones(rows, dtype=torch.bool)
    batch.update(
        score=torch.rand(rows, generator=generator),
        query_key=torch.arange(rows),
        document_key=torch.arange(rows),
        valid=torch.ones(rows, dtype=torch.bool),
    )
    return batch


def cached_step_worker(config: dict) -> None:
    """Steps of the job's batch (whole, or in train.embed_chunk chunks) on this Ray Train worker;
    writes its peak memory beyond what it held before the model (GPU: allocated memory) and its
    seconds per pair."""
    import ray.train

    from gcl.loss import GCLLoss
    from gcl.train.engine import setup_engine
    from gcl.train.micro_batch import backward_micro_batch

    job = JobConfig.model_validate(config["job"])
    torch.set_num_threads(1)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    cuda = job.scaling.use_gpu
    if cuda:
        baseline = torch.cuda.memory_allocated() / 2**20
    else:
        reset_peak_rss()
        baseline = rss_mib()
    engine, _, loaded = setup_engine(job, total_steps=10)
    loss_fn = GCLLoss(job.loss, job.fields.weights("left"), job.fields.weights("right"), rank=rank, world_size=world)
    batch = random_batch(
        job.fields,
        job.train.batch_size,
        loaded.model_cfg["text_cfg"]["context_length"],
        loaded.model_cfg["vision_cfg"]["image_size"],
        seed=rank,
    )
    batch = {k: v.to(engine.device) for k, v in batch.items()}

    def step():
        backward_micro_batch(engine, loss_fn, job.fields, batch, divisor=1, boundary=True, chunk=job.train.embed_chunk)
        engine.step()

    step()  # warm-up: the optimizer's state is made on the first step
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(config["steps"]):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mib()
    with open(os.path.join(config["out"], f"rank{rank}.json"), "w") as f:
        json.dump(
            {
                "peak_beyond_mib": peak - baseline,
                "seconds_per_pair": seconds / (config["steps"] * job.train.batch_size),
            },
            f,
        )


def _measure(job: JobConfig, storage: str, batch_size: int, chunk: int | None, steps: int) -> dict:
    """The largest per-worker peak (MiB beyond the worker's start) and seconds per pair of the job's
    workers (2 on the CPU, one per GPU up to 2)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    train = job.train.model_copy(update={"batch_size": batch_size, "embed_chunk": chunk})
    job = job.model_copy(update={"train": train})
    out = tempfile.mkdtemp(prefix="cached-", dir=storage)
    trainer = TorchTrainer(
        cached_step_worker,
        train_loop_config={"job": job.model_dump(mode="json"), "out": out, "steps": steps},
        scaling_config=ScalingConfig(
            num_workers=job.scaling.num_workers, use_gpu=job.scaling.use_gpu, resources_per_worker={"CPU": 0.5}
        ),
        run_config=RunConfig(name=f"bench-cached-{time.time_ns()}", storage_path=storage),
    )
    trainer.fit()
    ranks = []
    for rank in range(job.scaling.num_workers):
        with open(os.path.join(out, f"rank{rank}.json")) as f:
            ranks.append(json.load(f))
    return {
        "peak_mib": max(r["peak_beyond_mib"] for r in ranks),
        "seconds_per_pair": max(r["seconds_per_pair"] for r in ranks),
    }


def cached_gradient_figures(job: JobConfig, storage: str, chunk: int = 32, steps: int = 3) -> dict:
    """Per-worker peak memory (beyond the libraries) and time per pair: a batch of `chunk` pairs, a
    batch FACTORx larger in chunks of `chunk`, and that large batch whole; with the ratios the
    issue asks for (large in chunks over the chunk-sized batch: memory within 1.3x; time per pair
    over the whole large batch: about one more forward pass)."""
    large = chunk * FACTOR
    small = _measure(job, storage, chunk, None, steps)
    cached = _measure(job, storage, large, chunk, steps)
    whole = _measure(job, storage, large, None, steps)
    figures = {"cached_chunk": chunk, "cached_batch": large}
    for name, values in (("chunk_batch", small), ("cached", cached), ("whole", whole)):
        figures[f"{name}_peak_mib"] = values["peak_mib"]
        figures[f"{name}_us_per_pair"] = values["seconds_per_pair"] * 1e6
    figures["cached_over_chunk_batch_memory"] = cached["peak_mib"] / small["peak_mib"]
    figures["whole_over_chunk_batch_memory"] = whole["peak_mib"] / small["peak_mib"]
    figures["cached_over_whole_time_per_pair"] = cached["seconds_per_pair"] / whole["seconds_per_pair"]
    return figures
