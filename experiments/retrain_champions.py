"""Train the champions of a recorded towers sweep again on the current code, seeds 0, 1 and 2:

    .venv/bin/python experiments/retrain_champions.py RESULTS.json [WORKDIR]

RESULTS.json is a result of experiments/pretrained_sweeps.py (e.g. pretrained-sweeps-2026-12-05.json,
whose champions were selected while training ran its first epoch in the wrong modes, issue #50).
Each variant's best settings are trained as its sweep file says (experiments/sweep-towers-*.yaml)
on the benchmark in WORKDIR (not the sweeps' own: their seed runs have these runs' names, and gcl
refuses to continue a run under another config). Set beside a new sweep's champions, this tells
what the code's fix changed from what the new sweeps chose. Results go to
<WORKDIR>/retrained-<RESULTS>.json (a rerun continues where it stopped); the tables printed are
pretrained_sweeps.py's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from default_sweeps import job_overrides, open_results, train_with_seed  # noqa: E402
from pretrained_sweeps import VARIANTS, champions_table, seeds_table, sweep_path  # noqa: E402

SEEDS = (0, 1, 2)


def main(recorded: str, workdir: str) -> None:
    champions = json.loads(Path(recorded).read_text())
    workdir, out, results = open_results(workdir, f"retrained-{Path(recorded).name}")
    for name in VARIANTS:
        best = champions[name]["best"]
        runs = results.setdefault(name, {"params": best["params"], "seeds": {}})["seeds"]
        for seed in SEEDS:
            if str(seed) not in runs:
                runs[str(seed)] = train_with_seed(sweep_path(name), best, seed, job_overrides(workdir))
                out.write_text(json.dumps(results, indent=2))
    # In pretrained_sweeps.py's layout: seed 0 as the champion's test figures, the others as seeds.
    laid_out = {
        name: {
            "best": {"test": {s: {"ndcg_at_10": v} for s, v in r["seeds"]["0"].items()}},
            "seeds": {k: v for k, v in r["seeds"].items() if k != "0"},
        }
        for name, r in results.items()
    }
    print(champions_table(laid_out))
    print(seeds_table(laid_out, ["gcl", "uniform"]))
    print(seeds_table(laid_out, ["gcl", "binary"]))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "gcl_runs/retrained-champions")
