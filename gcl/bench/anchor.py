"""The anchor every training-step figure divides by: open_clip's own training step, as its training
loop (open_clip_train.train.train_one_epoch) takes it, at the same model and batch as gcl's step.

Its model straight from `open_clip.create_model`, `ClipLoss`, torch's AdamW (fused where the
device has it) with CLIP's weight-decay groups, bf16 autocast on CUDA (fp32 on the CPU, as gcl
trains there), gradient clipping to norm 1, and the logit scale clamped to ln(100) after each
step. Data loading is not part of it: the batch is already on the device, as it is for gcl's step.
"""

from __future__ import annotations

import math

import torch


def open_clip_batch(rows: int, context_length: int, image_size: int, device: torch.device,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(images, texts) as open_clip's data loader hands them: normalized float pixels (B, 3, H, W)
    and token ids (B, L)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(rows, 3, image_size, image_size, generator=generator)
    texts = torch.randint(1, 49000, (rows, context_length), generator=generator)
    return images.to(device), texts.to(device)


def open_clip_step(arch: str, rows: int, device: torch.device, seed: int = 0):
    """open_clip's training step for the architecture `arch` (random weights) on a batch of `rows`
    pairs, as a callable; also returns its model (for FLOP counts and inference)."""
    import open_clip
    from open_clip.loss import ClipLoss

    from gcl.model import register_gcl_configs

    register_gcl_configs()  # gcl-tiny and gcl-small, for the CPU presets
    torch.manual_seed(seed)
    model = open_clip.create_model(arch, device=device)
    config = open_clip.get_model_config(arch)
    images, texts = open_clip_batch(rows, config["text_cfg"].get("context_length", 77),
                                    config["vision_cfg"]["image_size"], device, seed)  # fmt: skip
    loss_fn = ClipLoss()
    # open_clip_train/main.py's parameter groups: no weight decay on gains, biases and the logit scale.
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
         {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": 0.2}],
        lr=5e-4, betas=(0.9, 0.98), eps=1e-6, fused=device.type in ("cuda", "cpu"),
    )  # fmt: skip
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")
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
