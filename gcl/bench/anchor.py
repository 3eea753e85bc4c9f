"""The anchor every training-step figure divides by: open_clip's own training step, as its training
loop (open_clip_train.train.train_one_epoch) takes it, at the same model and batch as gcl's step.

Its model straight from `open_clip.create_model`, `ClipLoss`, torch's AdamW (fused where the
device has it) with CLIP's weight-decay groups, bf16 autocast where gcl's job trains in bf16
(`train.precision`: by default on CUDA, fp32 on the CPU), gradient clipping to norm 1, and the
logit scale clamped to ln(100) after each step. Data loading is not part of it: the batch is
already on the device, as it is for gcl's step.
"""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import torch

from gcl.bench.steps import pairs_per_s, training_step
from gcl.config import overlay_overrides, parse_config
from gcl.job_config import JobConfig

GCL_MODES = ("plain", "zero0", "zero1", "zero2", "zero3")


def open_clip_batch(
    rows: int, context_length: int, image_size: int, device: torch.device, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, texts) as open_clip's data loader hands them: normalized float pixels (B, 3, H, W)
    and token ids (B, L)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(rows, 3, image_size, image_size, generator=generator)
    texts = torch.randint(1, 49000, (rows, context_length), generator=generator)
    return images.to(device), texts.to(device)


def open_clip_step(arch: str, rows: int, device: torch.device, seed: int = 0, precision: str = "auto"):
    """open_clip's training step for the architecture `arch` (random weights) on a batch of `rows`
    pairs, under bf16 autocast where gcl would train in bf16 at `precision` (its
    `--precision amp_bf16`), as a callable; also returns its model (for FLOP counts and inference)."""
    import open_clip
    from open_clip.loss import ClipLoss

    from gcl.model import register_gcl_configs
    from gcl.train.engine import use_bf16

    register_gcl_configs()  # gcl-tiny and gcl-small, for the CPU presets
    torch.manual_seed(seed)
    model = open_clip.create_model(arch, device=device)
    config = open_clip.get_model_config(arch)
    images, texts = open_clip_batch(
        rows, config["text_cfg"].get("context_length", 77), config["vision_cfg"]["image_size"], device, seed
    )
    loss_fn = ClipLoss()
    # open_clip_train/main.py's parameter groups: no weight decay on gains, biases and the logit scale.
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": 0.2},
        ],
        lr=5e-4,
        betas=(0.9, 0.98),
        eps=1e-6,
        fused=device.type in ("cuda", "cpu"),
    )
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=use_bf16(precision))
    model.train()

    def step() -> None:
        optimizer.zero_grad()
        with autocast:
            image_features, text_features, logit_scale = model(images, texts)
            loss = loss_fn(image_features, text_features, logit_scale)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, norm_type=2.0)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    return step, model, (images, texts)


# The settings under which gcl's step does the work open_clip's does (the file says which).
OPEN_CLIPS_WORK = overlay_overrides(Path(__file__).with_name("open-clips-work.yaml"))


def check_job(arch: str, batch_size: int, precision: str = "auto", *overrides: str) -> JobConfig:
    """gcl's job for the comparison: the open_clip architecture `arch` from random weights, doing
    open_clip's work (OPEN_CLIPS_WORK)."""
    return parse_config(
        JobConfig,
        None,
        [
            f"model.arch={arch}",
            *OPEN_CLIPS_WORK,
            f"train.batch_size={batch_size}",
            f"train.precision={precision}",
            *overrides,
        ],
    )


def gcl_batch(job: JobConfig, rows: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """A pipeline batch for `job` (uint8 pixels, as the pipeline sends them) on `device`."""
    from gcl.bench.cached import random_batch
    from gcl.model import model_config

    config = model_config(job.model)
    batch = random_batch(
        job.fields, rows, config["text_cfg"].get("context_length", 77), config["vision_cfg"]["image_size"], seed=seed
    )
    return {k: v.to(device) for k, v in batch.items()}


def _flops_per_pair(step, rows: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / rows


def free_device_memory(device: torch.device) -> None:
    """What the last measurement left behind, freed before the next one."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def step_figures(
    arch: str,
    rows: int,
    device: torch.device,
    steps: int,
    peak: float,
    modes: tuple[str, ...] = GCL_MODES,
    precision: str = "auto",
) -> dict:
    """open_clip's step and gcl's (`modes`: plain torch, DeepSpeed ZeRO-0 to 3) at `rows` pairs a
    step in this process, both at `precision` (train.precision's values): pairs/s, the ratio to
    open_clip's, MFU against `peak` (FLOP/s); the FLOPs per pair counted on open_clip's step."""
    figures = {}
    anchor, model, _ = open_clip_step(arch, rows, device, precision=precision)
    flops = _flops_per_pair(anchor, rows)
    figures[f"b{rows}_gflops_per_pair"] = flops / 1e9
    reference = pairs_per_s(anchor, rows, steps)
    figures[f"b{rows}_open_clip_pairs_per_s"] = reference
    figures[f"b{rows}_open_clip_mfu"] = reference * flops / peak
    del anchor, model
    free_device_memory(device)
    job = check_job(arch, rows, precision)
    batch = gcl_batch(job, rows, device)
    for mode in modes:
        step = training_step(job, batch, mode, device=device)
        rate = pairs_per_s(step, rows, steps)
        figures[f"b{rows}_gcl_{mode}_pairs_per_s"] = rate
        figures[f"b{rows}_gcl_{mode}_over_open_clip"] = rate / reference
        figures[f"b{rows}_gcl_{mode}_mfu"] = rate * flops / peak
        del step
        free_device_memory(device)
    return figures


def start_process_group(device: torch.device) -> None:
    """A process group of one rank (NCCL on the GPU, gloo on the CPU): DeepSpeed's engines need one."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def _anchor_process(
    arch: str, rows: int, steps: int, modes: tuple[str, ...], threads: int, precision: str, results
) -> None:
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    torch.set_num_threads(threads)
    start_process_group(device)
    from gcl.bench.flops import peak_flops_per_s

    peak, source = peak_flops_per_s(device)
    results.put({**step_figures(arch, rows, device, steps, peak, modes, precision), "anchor_peak_source": source})


def anchor_figures(
    arch: str,
    rows: int,
    steps: int = 10,
    modes: tuple[str, ...] = GCL_MODES,
    threads: int | None = None,
    precision: str = "auto",
) -> dict:
    """step_figures on the first GPU (else the CPU, on `threads` threads: all cores by default), in
    a fresh process: DeepSpeed's engines need a process group, which the caller should not keep."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    results = context.Queue()
    process = context.Process(
        target=_anchor_process, args=(arch, rows, steps, modes, threads or os.cpu_count() or 1, precision, results)
    )
    process.start()
    figures = results.get(timeout=3600)
    process.join()
    return figures
