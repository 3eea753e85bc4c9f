"""Does GCL rank better from a pretrained start? Binary (CLIP's loss, image-only
documents), GCL-uniform and GCL, each fine-tuned from the pretrained towers of
workflows/configs/minilm-efflite0.yaml at its own validation-selected settings:

    .venv/bin/python experiments/pretrained_sweeps.py [WORKDIR]

Runs docs/sweep-towers-{binary,uniform,gcl}.yaml on `gcl demo`'s synthetic benchmark (each picks
its best trial on the validation splits), then trains each variant's best settings with seeds 1
and 2. Results go to <WORKDIR>/pretrained-sweeps.json (a rerun continues where it stopped); the
tables it prints (test NDCG@10 per split) are what docs/ranking.md reports.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from default_sweeps import job_overrides, ndcg_at_10, open_results, run_sweep  # noqa: E402

from gcl.data.schema import SPLITS  # noqa: E402
from gcl.report import split_metrics  # noqa: E402

HERE = Path(__file__).parent
VARIANTS = {"binary": "binary", "uniform": "GCL-uniform", "gcl": "GCL"}
MORE_SEEDS = (1, 2)


def sweep_path(name: str) -> Path:
    return HERE / f"sweep-towers-{name}.yaml"


def train_with_seed(name: str, best: dict, seed: int, workdir: str) -> dict[str, float]:
    """Test NDCG@10 per split of the sweep's best settings trained again with `seed` (as long as
    the best trial trained)."""
    from gcl.train.job import resolve_job, run_train
    from gcl.tune.sweep import load_sweep
    from gcl.tune.tuner import trial_job

    sweep, job = load_sweep(sweep_path(name), [f"job.{override}" for override in job_overrides(workdir)])
    params = {**best["params"], "train.epochs": best["epochs"]}
    seeded = trial_job({**job.model_dump(mode="json"), "seed": seed}, params, f"{sweep.name}-best-seed{seed}")
    metrics = split_metrics(run_train(resolve_job(seeded), progress=False).metrics)
    return {split: ndcg_at_10(metrics[split]) for split in SPLITS}


def test_ndcg(results: dict, name: str) -> dict[str, list[float]]:
    """Split -> test NDCG@10 of every seed trained at the variant's best settings (seed 0 first)."""
    runs = [
        {s: ndcg_at_10(m) for s, m in results[name]["best"]["test"].items()},
        *results[name].get("seeds", {}).values(),
    ]
    return {split: [run[split] for run in runs] for split in SPLITS}


def champions_table(results: dict) -> str:
    """Each variant's best settings on the test splits (seed 0), and GCL's change over the others."""
    lines = [
        "| split | binary | GCL-uniform | GCL | GCL vs binary | GCL vs GCL-uniform |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for split in SPLITS:
        binary, uniform, gcl = (test_ndcg(results, name)[split][0] for name in VARIANTS)
        lines.append(
            f"| {split} | {binary:.4f} | {uniform:.4f} | {gcl:.4f} | {100 * (gcl / binary - 1):+.1f}% | "
            f"{100 * (gcl / uniform - 1):+.1f}% |"
        )
    return "\n".join(lines)


def seeds_table(results: dict, names: list[str]) -> str:
    """Mean and standard deviation over the seeds of two variants, and the change of the first's
    mean over the second's."""
    first, second = (test_ndcg(results, name) for name in names)
    lines = [
        f"| split | {VARIANTS[names[0]]} (mean ± sd, {len(first[SPLITS[0]])} seeds) | "
        f"{VARIANTS[names[1]]} (mean ± sd, {len(second[SPLITS[0]])} seeds) | change of the means |",
        "| --- | --- | --- | --- |",
    ]
    for split in SPLITS:
        a, b = first[split], second[split]
        lines.append(
            f"| {split} | {statistics.mean(a):.4f} ± {statistics.stdev(a):.4f} | "
            f"{statistics.mean(b):.4f} ± {statistics.stdev(b):.4f} | "
            f"{100 * (statistics.mean(a) / statistics.mean(b) - 1):+.1f}% |"
        )
    return "\n".join(lines)


def main(workdir: str) -> None:
    workdir, out, results = open_results(workdir, "pretrained-sweeps.json")
    for name in VARIANTS:
        if name not in results:
            results[name] = run_sweep(sweep_path(name), workdir)
            out.write_text(json.dumps(results, indent=2))
        print(
            name,
            "best",
            json.dumps(results[name]["best"]["params"]),
            "validation",
            round(results[name]["best"]["objective"], 4),
            flush=True,
        )
    for name in VARIANTS:
        seeds = results[name].setdefault("seeds", {})
        for seed in MORE_SEEDS:
            if str(seed) not in seeds:
                seeds[str(seed)] = train_with_seed(name, results[name]["best"], seed, workdir)
                out.write_text(json.dumps(results, indent=2))
    print(champions_table(results))
    print(seeds_table(results, ["gcl", "uniform"]))
    print(seeds_table(results, ["gcl", "binary"]))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gcl_runs/pretrained-sweeps")
