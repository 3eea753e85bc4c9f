"""The DeepSpeed engine the training workers run: the DeepSpeed config from the job, AdamW with
CLIP's weight-decay groups, warm-up and cosine decay, and the engine around a FieldEncoder."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import torch

from gcl.job_config import JobConfig
from gcl.model import FieldEncoder, create_model
from gcl.train.checkpoint import use_weights_only_loader

log = logging.getLogger(__name__)

# Communication buckets sized for CLIP-scale models (0.1-1B parameters), in elements. DeepSpeed's
# defaults (5e8 for the reduce and all-gather buckets, 1e9 live parameters under ZeRO-3) exceed a
# ViT-B-32's whole gradient, so its buffers alone outweighed what ZeRO-3 saves.
ZERO_BUCKETS = {
    "reduce_bucket_size": 5_000_000,
    "allgather_bucket_size": 5_000_000,
    "stage3_prefetch_bucket_size": 5_000_000,
    "stage3_max_live_parameters": 10_000_000,
    "stage3_max_reuse_distance": 10_000_000,
}
# DeepSpeed's ZeRO-3 otherwise replaces torch.nn.functional.linear for the whole process with its
# own autograd function, which bf16 autocast does not speed up: a ViT-B-32 step at ZeRO-3 in bf16
# on CPU ran at 2.1 pairs/s against 2.7 with torch's, and every linear layer in the process after
# it slowed too (open_clip's own loop from 4.9 to 1.7 pairs/s).
ZERO_DEFAULTS = {**ZERO_BUCKETS, "memory_efficient_linear": False}


def use_bf16(precision: str) -> bool:
    """Whether to train in bf16 for train.precision: always for `bf16`; for `auto`, on a CUDA
    device that supports it (fp32 on CPU)."""
    if precision == "bf16":
        return True
    return precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def deepspeed_config(job: JobConfig) -> dict[str, Any]:
    """The DeepSpeed config: the optional base JSON, with gcl's batch, clipping, precision and ZeRO stage.

    bf16 is mixed precision as open_clip trains (`--precision amp_bf16`): fp32 weights, gradients
    and optimizer state, the towers' matrix products under torch.autocast (DeepSpeed's
    `torch_autocast` mode). Not DeepSpeed's `bf16` mode, which casts the weights to bf16 and keeps
    fp32 masters in its own optimizer: that copies every gradient and weight between the two at
    each step, and a checkpoint at stage 0 then held only the bf16 weights."""
    config: dict[str, Any] = {}
    if job.deepspeed.config:
        with open(job.deepspeed.config) as f:
            config = json.load(f)
    zero = config.setdefault("zero_optimization", {})
    zero["stage"] = job.deepspeed.zero_stage
    for key, value in ZERO_DEFAULTS.items():  # the base config's own values win
        zero.setdefault(key, value)
    config.update(
        train_micro_batch_size_per_gpu=job.train.batch_size,
        gradient_accumulation_steps=job.train.grad_accum,
        gradient_clipping=job.train.grad_clip,
        bf16={"enabled": False},
        torch_autocast={"enabled": use_bf16(job.train.precision), "dtype": "bfloat16"},
        zero_allow_untested_optimizer=True,
    )
    config.setdefault("steps_per_print", 10**9)
    return config


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms, 1-d gains and the logit scale (as CLIP)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "logit_scale" in name or "ln" in name or "bias" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """torch's AdamW with its fused kernel: one pass per parameter tensor, no temporaries the size
    of the parameters. Under ZeRO the optimizer steps one flat partition, where the default
    implementation's temporaries would add a partition-sized peak."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, fused=True)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up for `warmup` steps, then cosine decay to zero at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def engine_zero_stage(job: JobConfig, config: dict[str, Any], world_size: int, resumes_zero_shards: bool) -> int:
    """The ZeRO stage the engine runs at: the job's, except one worker at stage 1 or 2 with nothing
    offloaded, which runs at stage 0. With one worker there is nothing to partition, and stages
    1-2 copy every gradient into a flat fp32 buffer and the updated weights back, about a third of
    a ViT-B-32 step on CPU; stage 0 does the same arithmetic on the parameters themselves (fp32 in
    either precision: deepspeed_config), and its checkpoint holds them whole. A run resumed from a
    checkpoint with ZeRO shards (`resumes_zero_shards`) keeps its stage."""
    stage = job.deepspeed.zero_stage
    zero = config.get("zero_optimization", {})
    offloads = bool(zero.get("offload_optimizer") or zero.get("offload_param"))
    if stage in (1, 2) and world_size == 1 and not offloads and not resumes_zero_shards:
        return 0
    return stage


def extensions_dir_per_environment() -> str:
    """Where torch builds DeepSpeed's C++ extensions (on CPU, its shared-memory all-reduce): one
    directory per Python environment unless TORCH_EXTENSIONS_DIR says otherwise. torch's default is
    one directory for all environments of a Python and CUDA version, so two environments (a second
    checkout's .venv) rebuild it in turn, half a minute on 2 cores each time."""
    import hashlib
    import os
    import sys

    from torch.utils.cpp_extension import get_default_build_root

    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        tag = hashlib.sha256(f"{sys.prefix} {sys.version} {torch.__version__}".encode()).hexdigest()[:16]
        os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(get_default_build_root(), f"env-{tag}")
    return os.environ["TORCH_EXTENSIONS_DIR"]


def setup_engine(job: JobConfig, total_steps: int, resumes_zero_shards: bool = False):
    """Model, AdamW, schedule and the DeepSpeed engine around a FieldEncoder (at the stage
    engine_zero_stage says)."""
    import deepspeed
    import torch.distributed as dist

    extensions_dir_per_environment()  # before DeepSpeed's communication backend loads its extension
    torch.manual_seed(job.seed)
    loaded = create_model(job.model, init_temperature=job.loss.init_temperature)
    encoder = FieldEncoder(loaded.clip, job.fields.modalities())
    optimizer = adamw(encoder, job.train.lr, job.train.weight_decay)
    scheduler = warmup_cosine(optimizer, job.train.warmup_steps, total_steps)
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    config = deepspeed_config(job)
    stage = engine_zero_stage(job, config, world_size, resumes_zero_shards)
    if stage != job.deepspeed.zero_stage:
        log.info(
            "one worker: ZeRO-%d has nothing to partition, the engine runs at stage 0 (the same "
            "updates, without flat copies of every parameter and gradient)",
            job.deepspeed.zero_stage,
        )
    config["zero_optimization"]["stage"] = stage
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=encoder,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=config,
        dist_init_required=False,
    )
    if stage == 0 and world_size == 1:
        # Averaging gradients over one worker changes nothing, but DeepSpeed would still flatten
        # them into buckets and copy them back every step: 5-15% of a ViT-B-32 step on CPU.
        engine.enable_backward_allreduce = False
    use_weights_only_loader(engine)
    return engine, scheduler, loaded
