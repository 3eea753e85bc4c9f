"""Training steps timed without Ray or Ray Data: the bare single-process loop every ratio divides
by, and 2 plain processes side by side (no communication, torch DDP, DeepSpeed ZeRO-0 and ZeRO-2),
which show where the pipeline's rate goes before Ray and Ray Data. On a CUDA machine they run on
the GPUs (NCCL), else on the CPU (gloo), in the job's precision (bf16 autocast by default on
GPUs, fp32 on the CPU)."""

from __future__ import annotations

import os
import time

import torch

from gcl.job_config import JobConfig
from gcl.loss import GCLLoss
from gcl.model import FieldEncoder, create_model
from gcl.train.engine import adamw, setup_engine, use_bf16
from gcl.train.micro_batch import batch_loss

CPU = torch.device("cpu")


def training_step(job: JobConfig, batch: dict, mode: str, rank: int = 0, world: int = 1, device: torch.device = CPU):
    """One GCL training step on `batch` as a callable. mode: `plain` (torch AdamW, no
    communication; the loss sees only this process's batch), `ddp` (torch DDP, the loss gathers
    every rank's embeddings) or `zero0`/`zero2` (gcl's DeepSpeed engine, on DeepSpeed's device).
    Where the job trains in bf16 (train.precision) the torch modes run under bf16 autocast, as
    gcl's engines do."""
    torch.manual_seed(0)
    if mode.startswith("zero"):
        job = job.model_copy(
            update={
                "deepspeed": job.deepspeed.model_copy(update={"zero_stage": int(mode[4:])}),
                "train": job.train.model_copy(update={"batch_size": len(batch["score"])}),
            }
        )
        model, _, _ = setup_engine(job, total_steps=1000)
        backward, optimizer_step = model.backward, model.step
        device = model.device
    else:
        model = FieldEncoder(create_model(job.model).clip, job.fields.modalities()).to(device)
        if mode == "ddp":
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device] if device.type == "cuda" else None
            )
        optimizer = adamw(model, lr=1e-4, weight_decay=0.1)

        def backward(loss):
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)

        optimizer_step = optimizer.step
    gathers = mode != "plain"
    loss_fn = GCLLoss(
        job.loss,
        job.fields.weights("left"),
        job.fields.weights("right"),
        rank=rank if gathers else 0,
        world_size=world if gathers else 1,
    )

    batch = {k: v.to(device) for k, v in batch.items()}
    autocast = torch.autocast(
        device.type, torch.bfloat16, enabled=use_bf16(job.train.precision) and not mode.startswith("zero")
    )

    def step():
        with autocast:
            loss, _, _ = batch_loss(model, loss_fn, job.fields, batch)
        backward(loss)
        optimizer_step()

    return step


def _wait_for_device(barrier=lambda: None) -> None:
    """Let queued GPU work finish (CUDA runs asynchronously), then wait for the other ranks."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    barrier()


def pairs_per_s(step, pairs_per_step: int, steps: int = 20, barrier=lambda: None) -> float:
    for _ in range(3):
        step()
    _wait_for_device(barrier)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _wait_for_device(barrier)
    return steps * pairs_per_step / (time.perf_counter() - start)


def bench_device() -> torch.device:
    """Where the training figures run: the first GPU if there is one, else the CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def bare_loop_pairs_per_s(
    job: JobConfig, batch: dict, threads: int, steps: int = 20, device: torch.device = CPU
) -> float:
    """Single-process torch training (no Ray, no DeepSpeed) on in-memory batches."""
    torch.set_num_threads(threads)
    return pairs_per_s(training_step(job, batch, "plain", device=device), len(batch["score"]), steps)


def data_parallel_process(
    rank: int, world: int, mode: str, job_json: str, batch: dict, port: int, results, steps: int = 20
) -> None:
    """One of `world` 1-thread processes (no Ray, no Ray Data) timing `mode` steps on its slice
    of `batch`, on GPU `rank` over NCCL where CUDA exists, else on the CPU over gloo; rank 0 puts
    the pairs/s of all ranks together on `results`."""
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank) if cuda else "0",
    )
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    rows = len(batch["score"]) // world
    local = {k: v[rank * rows : (rank + 1) * rows] for k, v in batch.items()}
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    step = training_step(JobConfig.model_validate_json(job_json), local, mode, rank, world, device)
    rate = pairs_per_s(step, rows * world, steps, barrier=dist.barrier)
    if rank == 0:
        results.put(rate)
    dist.destroy_process_group()


def data_parallel_pairs_per_s(job: JobConfig, batch: dict, world: int, steps: int = 20) -> dict:
    """Pairs/s of `world` plain processes (1 thread each) training side by side on the batch's
    slices: without communication, with torch DDP, and with DeepSpeed ZeRO-0 and ZeRO-2. Where
    the pipeline's ratio to the bare loop goes before Ray and Ray Data."""
    import socket

    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    figures = {}
    for mode in ("plain", "ddp", "zero0", "zero2"):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        results = context.Queue()
        processes = [
            context.Process(
                target=data_parallel_process,
                args=(rank, world, mode, job.model_dump_json(), batch, port, results, steps),
            )
            for rank in range(world)
        ]
        for process in processes:
            process.start()
        rate = results.get(timeout=600)
        for process in processes:
            process.join()
        figures[f"steps_{world}proc_{mode}_pairs_per_s"] = rate
    return figures
