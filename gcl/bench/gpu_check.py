"""The GPU check: one command that measures gcl's training step against open_clip's own loop on one
GPU and writes one JSON file (`gcl bench --gpu-check`, or `python -m gcl.bench.gpu_check`).

    python -m gcl.bench.gpu_check --out gpu-check.json            # ViT-B-32, batches 256 and 512
    python -m gcl.bench.gpu_check --out cpu.json --arch gcl-tiny --batches 16 --steps 3   # the CPU smoke

What it measures, each side by side in one run:
- environment: torch, CUDA, the device, bf16;
- steps: open_clip's training step (gcl.bench.anchor) against gcl's (FieldEncoder + GCLLoss with
  CLIP's loss on image-only documents) in plain torch and in DeepSpeed engines at ZeRO-0, 2 and 3,
  at each batch: pairs/s, the ratio to open_clip's, and MFU against the GPU's data-sheet bf16 peak
  (on the CPU, a measured matrix product);
- cached gradients: a chunked step against the whole step (loss and every gradient, fp32); the
  peak allocated memory of a batch 16x the chunk in chunks against a batch of one chunk; time per
  pair in chunks against whole;
- inference: images/s of gcl's FieldEncoder against open_clip's `encode_image`;
- `gcl train` on one GPU on generated data, where Ray is installed (skipped where it is not).

It needs PyTorch and, besides gcl's own code, packages small enough to bring along: open_clip
(with ftfy and wcwidth), DeepSpeed's package directory (with hjson), pydantic (with pydantic_core,
annotated_types and typing_inspection) and PyYAML; no Ray, MLflow or network. `make gpu-bundle`
gathers them (gcl/bench/gpu_bundle.py); docs/performance.md says how to run it on a GPU machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

from gcl.bench.anchor import (
    check_job,
    free_device_memory,
    gcl_batch,
    open_clip_step,
    start_process_group,
    step_figures,
)
from gcl.bench.flops import gpu_peak_flops_per_s, peak_flops_per_s
from gcl.bench.steps import pairs_per_s

STEP_MODES = ("plain", "zero0", "zero2", "zero3")
CHUNK_FACTOR = 16  # the large batch of the cached-gradient figures, in chunks


def environment() -> dict:
    cuda = torch.cuda.is_available()
    figures = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": cuda,
        "cpu_cores": os.cpu_count(),
    }
    if cuda:
        figures.update(
            device=torch.cuda.get_device_name(0),
            cuda_version=torch.version.cuda,
            bf16=torch.cuda.is_bf16_supported(),
            gpu_memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30,
        )
    for package in ("open_clip", "deepspeed", "ray", "mlflow", "pydantic"):
        figures[f"has_{package}"] = importlib.util.find_spec(package) is not None
    return figures


def _full_grads(engine) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_grad

    return {n: safe_get_full_grad(p).float().clone() for n, p in engine.module.named_parameters()}


def _peak_allocated_mib(device: torch.device, work) -> float:
    """Peak allocated GPU memory (MiB) of `work`, beyond what was allocated before it (0 on the CPU)."""
    if device.type != "cuda":
        work()
        return 0.0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    work()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def cached_gradient_figures(arch: str, chunk: int, device: torch.device, steps: int) -> dict:
    """Cached-gradient steps (train.embed_chunk) on this device, a ZeRO-0 engine of one rank: a
    chunked step's loss and gradients against the whole step's (fp32), and the peak memory and
    time per pair of a batch CHUNK_FACTOR x `chunk` in chunks against a batch of one chunk and
    the large batch whole."""
    from gcl.loss import GCLLoss
    from gcl.train.engine import setup_engine
    from gcl.train.micro_batch import backward_micro_batch

    figures = {}
    # Exactness, in fp32: the chunked step's loss and gradients against the whole step's.
    job = check_job(arch, 4 * chunk, "fp32", "deepspeed.zero_stage=0")
    batch = gcl_batch(job, 4 * chunk, device, seed=1)
    loss_fn = GCLLoss(job.loss, job.fields.weights("left"), job.fields.weights("right"))
    sides = {}
    for name, size in (("whole", None), ("chunked", chunk)):
        engine, _, _ = setup_engine(job, total_steps=10)
        loss, _, _ = backward_micro_batch(engine, loss_fn, job.fields, batch, 1, boundary=True, chunk=size)
        sides[name] = (loss.item(), _full_grads(engine))
        del engine
        free_device_memory(device)
    (whole_loss, whole), (chunked_loss, chunked) = sides["whole"], sides["chunked"]
    figures["cached_loss_abs_diff"] = abs(whole_loss - chunked_loss)
    figures["cached_grad_max_abs_diff"] = max((whole[n] - chunked[n]).abs().max().item() for n in whole)
    figures["cached_grad_max_abs"] = max(g.abs().max().item() for g in whole.values())
    # Memory and time, in the device's training precision (bf16 on a GPU).
    large = CHUNK_FACTOR * chunk
    for name, rows, size in (
        ("chunk_batch", chunk, None),
        ("large_in_chunks", large, chunk),
        ("large_whole", large, None),
    ):
        job = check_job(arch, rows, "auto", "deepspeed.zero_stage=0")
        engine, _, _ = setup_engine(job, total_steps=1000)
        batch = gcl_batch(job, rows, device, seed=2)

        def step(engine=engine, batch=batch, size=size, job=job):
            backward_micro_batch(engine, loss_fn, job.fields, batch, 1, boundary=True, chunk=size)
            engine.step()

        step()  # warm-up: the optimizer's state exists from here on
        figures[f"cached_{name}_peak_mib"] = _peak_allocated_mib(device, step)
        figures[f"cached_{name}_seconds_per_pair"] = 1 / pairs_per_s(step, rows, steps)
        del engine, batch, step
        free_device_memory(device)
    figures["cached_peak_large_in_chunks_over_chunk_batch"] = figures["cached_large_in_chunks_peak_mib"] / max(
        figures["cached_chunk_batch_peak_mib"], 1e-9
    )
    figures["cached_time_in_chunks_over_whole"] = (
        figures["cached_large_in_chunks_seconds_per_pair"] / figures["cached_large_whole_seconds_per_pair"]
    )
    return figures


def inference_figures(arch: str, rows: int, device: torch.device, steps: int) -> dict:
    """Images/s of gcl's FieldEncoder (uint8 pixels in, normalized on the device) against open_clip's
    encode_image (normalized float pixels in), the same weights, bf16 autocast on a GPU."""
    from gcl.model import FieldEncoder

    _, model, (images, _) = open_clip_step(arch, rows, device)
    model.eval()
    encoder = FieldEncoder(model, {"image": "image"}).eval()
    pixels = torch.randint(0, 256, images.shape, dtype=torch.uint8, device=device)
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")

    def theirs():
        with torch.no_grad(), autocast:
            model.encode_image(images, normalize=True)

    def ours():
        with torch.no_grad(), autocast:
            encoder({"image": pixels})

    reference, rate = pairs_per_s(theirs, rows, steps), pairs_per_s(ours, rows, steps)
    return {
        f"inference_b{rows}_open_clip_images_per_s": reference,
        f"inference_b{rows}_gcl_images_per_s": rate,
        f"inference_b{rows}_gcl_over_open_clip": rate / reference,
    }


def gcl_train_figures(workdir: str, timeout: int = 300) -> dict:
    """`gcl train` of the tiny config on generated data on one GPU worker, where Ray (and gcl's
    command) are installed: its warm epoch's pairs/s."""
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("mlflow") is None:
        return {"gcl_train": "skipped: Ray or MLflow is not installed here"}
    from gcl.data.synth import SynthConfig, synthesize

    synthesize(f"{workdir}/data", SynthConfig(products=600, queries=200))
    command = [
        sys.executable,
        "-m",
        "workflows.cli",
        "train",
        "-c",
        "workflows/configs/tiny-cpu.yaml",
        "--set",
        f"data.train={workdir}/data/train.parquet",
        "--set",
        "data.eval={}",
        "--set",
        "data.validation={}",
        "--set",
        f"storage={workdir}/runs",
        "--set",
        f"mlflow.tracking_uri=sqlite:///{workdir}/mlflow.db",
        "--set",
        "scaling.use_gpu=true",
        "--set",
        "scaling.num_workers=1",
        "--set",
        "train.batch_size=256",
        "--set",
        "train.epochs=2",
    ]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    figures = {"gcl_train_returncode": done.returncode, "gcl_train_seconds": time.perf_counter() - start}
    if done.returncode != 0:
        figures["gcl_train_error"] = (done.stdout + done.stderr)[-2000:]
    return figures


def run_gpu_check(
    arch: str = "ViT-B-32",
    batches: tuple[int, ...] = (256, 512),
    chunk: int = 256,
    steps: int = 20,
    workdir: str | None = None,
    train: bool = True,
) -> dict:
    """Every figure of the check, measured on the first GPU (the CPU where there is none)."""
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    started = time.perf_counter()
    figures = {"arch": arch, "date": time.strftime("%Y-%m-%d"), **environment()}
    peak, figures["peak_source"] = peak_flops_per_s(device)
    figures["peak_tflops_per_s"] = peak / 1e12
    if device.type == "cuda" and gpu_peak_flops_per_s(figures["device"]) is None:
        figures["peak_note"] = "no data-sheet peak for this GPU: MFU divides by a measured bf16 product"
    start_process_group(device)
    for rows in batches:
        figures.update(step_figures(arch, rows, device, steps, peak, STEP_MODES))
    figures.update(cached_gradient_figures(arch, chunk, device, steps=max(2, steps // 4)))
    figures.update(inference_figures(arch, max(batches), device, steps))
    if train:
        figures.update(gcl_train_figures(workdir or tempfile.mkdtemp(prefix="gcl-gpu-check-")))
    figures["seconds"] = time.perf_counter() - started
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the JSON file to write")
    parser.add_argument("--arch", default="ViT-B-32", help="open_clip architecture (random weights)")
    parser.add_argument("--batches", default="256,512", help="pairs per step, comma-separated")
    parser.add_argument("--chunk", type=int, default=256, help="train.embed_chunk of the cached-gradient figures")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per figure")
    parser.add_argument("--no-train", action="store_true", help="leave out `gcl train`")
    args = parser.parse_args(argv)
    figures = run_gpu_check(
        args.arch, tuple(int(b) for b in args.batches.split(",")), args.chunk, args.steps, train=not args.no_train
    )
    with open(args.out, "w") as f:
        json.dump(figures, f, indent=2)
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
