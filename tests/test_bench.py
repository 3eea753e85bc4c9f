"""gcl bench's FLOP count, peaks for MFU and peak-memory readings (the timed figures are
benchmarks, not tests)."""

import pytest
import torch

from gcl.bench.flops import gpu_peak_flops_per_s, peak_flops_per_s, train_flops_per_pair
from gcl.bench.proc import peak_rss_mib, reset_peak_rss
from gcl.config import FieldsConfig
from gcl.data.pipeline import PairPreprocessor
from gcl.data.schema import DataConfig
from gcl.data.synth import SynthConfig, generate_pairs
from gcl.job_config import JobConfig


def _batch(rows: int) -> dict:
    pairs = generate_pairs(SynthConfig(products=20, queries=8, docs_per_query=4, seed=3)).head(rows)
    pre = PairPreprocessor(
        {"arch": "gcl-tiny"},
        FieldsConfig().model_dump(),
        "score_linear",
        DataConfig().model_dump(),
        None,
        augment=False,
    )
    batch = {k: torch.from_numpy(v) for k, v in pre({c: pairs[c].to_numpy() for c in pairs.columns}).items()}
    batch["valid"] = torch.ones(rows, dtype=torch.bool)
    return batch


def test_a_training_step_counts_forward_and_backward_flops():
    """Backward costs about twice the forward in matrix products: a step is ~3x the forward."""
    from torch.utils.flop_counter import FlopCounterMode

    from gcl.model import FieldEncoder, create_model

    job = JobConfig.model_validate({"model": {"arch": "gcl-tiny"}, "loss": {"score_range": [0, 1]}})
    batch = _batch(16)
    encoder = FieldEncoder(create_model(job.model).clip, job.fields.modalities())
    with torch.no_grad(), FlopCounterMode(display=False) as forward:
        encoder({n: batch[n] for n in job.fields.modalities()})
    per_pair = train_flops_per_pair(job, batch)
    assert per_pair == pytest.approx(3 * forward.get_total_flops() / 16, rel=0.05)


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("Tesla T4", None),
    ],
)
def test_gpu_peaks_match_the_most_specific_name(name, tflops):
    assert gpu_peak_flops_per_s(name) == (None if tflops is None else tflops * 1e12)


def test_the_cpu_peak_is_measured():
    peak, source = peak_flops_per_s(torch.device("cpu"))
    assert peak > 1e9 and source.startswith("measured")


@pytest.mark.gpu
def test_the_bare_loop_trains_on_the_gpu_under_bf16_autocast():
    """Needs CUDA (skipped on the CPU machines the suite runs on): the bench's GPU path."""
    from gcl.bench.steps import bare_loop_pairs_per_s, bench_device

    job = JobConfig.model_validate({"model": {"arch": "gcl-tiny"}, "loss": {"score_range": [0, 1]}})
    assert bench_device().type == "cuda"
    assert bare_loop_pairs_per_s(job, _batch(16), threads=1, steps=2, device=bench_device()) > 0


def test_bench_job_takes_overrides_after_its_own_settings_and_names_a_bad_key(tmp_path):
    """`gcl bench --set`: what a user times on their own hardware (a bigger model, batch or more
    preprocessing tasks); a misspelled key stops the bench before any section runs."""
    from gcl.config import ConfigError
    from workflows.bench import BATCH, bench_job

    default = bench_job(str(tmp_path), gpus=0)
    assert default.train.batch_size == BATCH and default.scaling.num_workers == 2
    assert not default.scaling.use_gpu
    on_one_gpu = bench_job(str(tmp_path), gpus=1, overrides=["train.batch_size=128", "pipeline.preprocess_tasks=8"])
    assert on_one_gpu.scaling.use_gpu and on_one_gpu.scaling.num_workers == 1
    assert on_one_gpu.train.batch_size == 128 and on_one_gpu.pipeline.preprocess_tasks == 8
    with pytest.raises(ConfigError, match=r"train.batch_sise: unknown key.*did you mean 'batch_size'"):
        bench_job(str(tmp_path), gpus=0, overrides=["train.batch_sise=64"])


def test_the_presets_time_vitb32_and_the_job_preset_trains_one_worker_on_every_core(tmp_path):
    """`gcl bench --preset`: each preset's overrides are valid settings of the timed job; the
    whole-job preset gives its one worker the cores the anchor (open_clip's loop) runs on."""
    import os

    from workflows.bench import PRESETS, bench_job, locked_jobs

    jobs = {
        name: bench_job(str(tmp_path), gpus=0, overrides=preset["overrides"])
        for name, preset in PRESETS.items()
        if "locked" not in preset["only"]
    }
    assert {job.model.arch for job in jobs.values()} == {"ViT-B-32"}
    # The locked section's jobs: the towers with their image tower locked, binary on images only.
    locked = locked_jobs(str(tmp_path))
    assert all(job.model.towers.image.lock for job in locked.values())
    assert set(locked["binary"].fields.right) == {"image"} and set(locked["gcl"].fields.right) == {"image", "title"}
    whole_job = jobs["vitb32-cpu-job"]
    assert (whole_job.scaling.num_workers, whole_job.scaling.torch_threads) == (1, os.cpu_count())
    # open_clip's work: a query and an image per pair, as the anchor's step (title fields would add a text tower pass)
    assert set(whole_job.fields.modalities()) == {"query", "image"}
    assert set(PRESETS["vitb32-cpu-job"]["only"]) == {"steps", "pipeline"}


def test_peak_memory_is_the_process_own_not_its_parents_and_restarts_on_reset():
    """The search-memory bench runs in child processes and the ZeRO memory bench in Ray workers:
    a child of a large parent must not report the parent's size (getrusage's ru_maxrss does, on
    Linux), and a reused process must not report what it held before."""
    import subprocess
    import sys

    held = torch.ones(400 * 2**20 // 4)  # 400 MiB in this process
    code = "from gcl.bench.memory import peak_rss_mib; print(peak_rss_mib())"
    child_peak = float(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()[-1]
    )
    assert peak_rss_mib() > child_peak + 300
    del held
    before_reset = peak_rss_mib()
    reset_peak_rss()
    assert peak_rss_mib() < before_reset - 300


# The GPU check must run where PyTorch is the only one of gcl's heavy dependencies: these hide
# Ray and MLflow from the process (an import of either fails), as on a bare GPU machine.
_WITHOUT_RAY_AND_MLFLOW = "import sys; sys.modules.update(ray=None, mlflow=None); "


def test_the_gpu_check_imports_without_ray_or_mlflow():
    import subprocess
    import sys

    code = _WITHOUT_RAY_AND_MLFLOW + "import gcl.bench.gpu_check, gcl.bench.anchor; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


@pytest.mark.slow
def test_the_gpu_checks_cpu_smoke_writes_every_figure_without_ray_or_mlflow(tmp_path):
    """`python -m gcl.bench.gpu_check` on the tiny model on this CPU: open_clip's step against gcl's
    (plain, ZeRO-0/2/3), cached gradients against the whole step, inference; one JSON file. The
    GPU itself is what cannot run here (the figures on an H200 are in docs/performance.md)."""
    import json
    import subprocess
    import sys

    out = tmp_path / "cpu.json"
    code = (
        _WITHOUT_RAY_AND_MLFLOW + "from gcl.bench.gpu_check import main; "
        f"sys.exit(main(['--out', '{out}', '--arch', 'gcl-tiny', '--batches', '8', '--chunk', '2', '--steps', '2']))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-5000:]
    figures = json.loads(out.read_text())
    assert figures["has_ray"] is False and figures["has_mlflow"] is False
    ratios = {k: v for k, v in figures.items() if k.startswith("b8_") and k.endswith("_over_open_clip")}
    assert len(ratios) == 4 and all(0 < v < 10 for v in ratios.values()), ratios
    assert figures["cached_loss_abs_diff"] <= 1e-5 and figures["cached_grad_max_abs_diff"] <= 1e-4, figures
    assert figures["inference_b8_gcl_over_open_clip"] > 0 and figures["gcl_train"].startswith("skipped")
