"""MFU's two numbers: the FLOPs of a training step per pair (torch's FlopCounterMode) and the peak
it is divided by (a known GPU's data-sheet dense bf16 peak, else a measured matrix product)."""

from __future__ import annotations

import time

import torch

from gcl.bench.steps import training_step
from gcl.job_config import JobConfig

# Dense bf16 tensor-core peaks (TFLOP/s) from NVIDIA's data sheets, most specific name first.
GPU_PEAK_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100": 989.4,
    "H200": 989.4,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
}


def gpu_peak_flops_per_s(name: str) -> float | None:
    """The data-sheet dense bf16 peak of a GPU by its CUDA name, None for one not listed."""
    return next((tflops * 1e12 for key, tflops in GPU_PEAK_TFLOPS.items() if key in name), None)


def peak_flops_per_s(device: torch.device) -> tuple[float, str]:
    """(peak FLOP/s, where it comes from) that MFU divides by: the data sheet's dense bf16 peak
    for a known GPU, otherwise a measured square matrix product on `device` with this process's
    threads (fp32 on CPU), which is what the machine can do at best on this work."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if (peak := gpu_peak_flops_per_s(name)) is not None:
            return peak, f"{name}, dense bf16 data-sheet peak"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(2048, 2048, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ a
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * 2048**3 / best, f"measured 2048x2048 {dtype} matrix product, {torch.get_num_threads()} threads"


def train_flops_per_pair(job: JobConfig, batch: dict) -> float:
    """FLOPs of one training step (forward and backward) per pair, counted by torch's
    FlopCounterMode on the bench batch: matrix products, convolutions and attention, as MFU
    counts them (elementwise work and the optimizer are left out)."""
    from torch.utils.flop_counter import FlopCounterMode

    step = training_step(job, batch, "plain")
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / len(batch["score"])
