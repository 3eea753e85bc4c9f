"""`gcl tune`: sweep any config keys with Ray Tune (Optuna's TPE and ASHA) and register the best
model; the work is gcl.tune.sweep_job.run_sweep's, this recipe prints what it returns."""

from __future__ import annotations

from gcl.console import say
from gcl.tune.sweep_job import run_sweep
from gcl.tune.tuner import TuneResult


def run_tune(path: str, overrides: list[str] | None = None) -> TuneResult:
    """Run (or resume) the sweep in `path` and print its trials and its best."""
    result = run_sweep(path, overrides)
    say(f"\n{result.heading}")
    say(result.table)
    if result.plot:
        say(f"plot: {result.plot}")
    if result.registered:
        version, alias = result.registered
        say(f"registered {result.registered_model} version {version} as @{alias}")
    best = result.best
    scores = f"objective {best['objective']:.4f}"
    if result.validated:
        scores += f" (validation), test {best['test_objective']:.4f}"
    say(f"best trial {best['trial']}: {scores}, MLflow run {best['run_id']}")
    return result
