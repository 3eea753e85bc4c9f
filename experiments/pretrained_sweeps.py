"""Does GCL rank better from a pretrained start? Binary (CLIP's loss, image-only
documents), GCL-uniform and GCL, each fine-tuned from the pretrained towers of
workflows/configs/minilm-efflite0.yaml at its own validation-selected settings:

    .venv/bin/python experiments/pretrained_sweeps.py [WORKDIR]

Runs experiments/sweep-towers-{binary,uniform,gcl}.yaml on `gcl demo`'s synthetic benchmark (each picks
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

from default_sweeps import job_overrides, open_results, run_sweep, test_ndcg, train_with_seed  # noqa: E402

from gcl.data.schema import SPLITS  # noqa: E402

HERE = Path(__file__).parent
VARIANTS = {"binary": "binary", "uniform": "GCL-uniform", "gcl": "GCL"}
MORE_SEEDS = (1, 2)


def sweep_path(name: str) -> Path:
    return HERE / f"sweep-towers-{name}.yaml"


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
                seeds[str(seed)] = train_with_seed(
                    sweep_path(name), results[name]["best"], seed, job_overrides(workdir)
                )
                out.write_text(json.dumps(results, indent=2))
    print(champions_table(results))
    print(seeds_table(results, ["gcl", "uniform"]))
    print(seeds_table(results, ["gcl", "binary"]))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gcl_runs/pretrained-sweeps")
