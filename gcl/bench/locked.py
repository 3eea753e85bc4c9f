"""`gcl bench --only locked`: a locked image tower's features computed once (gcl.data.locked_features)
against the tower run for every pair and epoch, side by side in one run: each job trained twice on
the same data, cached and not, with its pairs/s, the seconds of its last evaluation, its wall time
(the cached run's includes building the store) and its test objective (the two must agree: the
same model)."""

from __future__ import annotations

import time

from gcl.job_config import JobConfig


def locked_feature_figures(jobs: dict[str, JobConfig]) -> dict:
    """For each named job (a locked image tower), `locked_<name>_*` figures: pairs/s and the last
    evaluation's seconds cached and not, their ratios, the wall times, and the test objectives'
    difference (0 when the cached run trained the same model)."""
    from gcl.train.job import resolve_job, run_train

    figures: dict = {}
    for name, job in jobs.items():
        measured = {}
        for cached in (True, False):
            pipeline = job.pipeline.model_copy(update={"cache_locked_features": cached})
            run = job.model_copy(
                update={"name": f"{job.name}-{'cached' if cached else 'uncached'}", "pipeline": pipeline}
            )
            start = time.perf_counter()
            metrics = run_train(resolve_job(run), progress=False).metrics
            measured[cached] = {**metrics, "wall": time.perf_counter() - start}
        on, off = measured[True], measured[False]
        figures.update(
            {
                f"locked_{name}_pairs_per_s_cached": on["epoch_pairs_per_s"],
                f"locked_{name}_pairs_per_s_uncached": off["epoch_pairs_per_s"],
                f"locked_{name}_cached_over_uncached": on["epoch_pairs_per_s"] / off["epoch_pairs_per_s"],
                f"locked_{name}_eval_seconds_cached": on.get("eval_seconds", 0.0),
                f"locked_{name}_eval_seconds_uncached": off.get("eval_seconds", 0.0),
                f"locked_{name}_wall_seconds_cached": on["wall"],
                f"locked_{name}_wall_seconds_uncached": off["wall"],
                f"locked_{name}_test_objective_difference": abs(
                    on.get("test_objective", 0.0) - off.get("test_objective", 0.0)
                ),
            }
        )
    return figures
