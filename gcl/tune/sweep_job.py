"""One sweep on Ray Tune, end to end, as gcl.train.job is one training: its config and data checked
once, before any trial; MLflow's parent run for the sweep and a child run per trial (gcl.tune.tuner);
the trials' table and plot logged to the parent run; the best trial's model exported and registered
(`champion` only if it beats the current champion on the same objective). `gcl tune` runs
`run_sweep` and prints what it returns.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile

from gcl import storage
from gcl.cluster import init_ray
from gcl.data.locked_features import prepare_locked_features
from gcl.errors import ConfigError, TrainingError
from gcl.registry.models import register_run
from gcl.report import sweep_plot
from gcl.tracking.names import (
    BEST_OBJECTIVE,
    BEST_RUN_TAG,
    BEST_TRIAL_TAG,
    MODEL_URI_TAG,
    SWEEP_TAG,
    TRIALS_ARTIFACT,
    TRIALS_PLOT,
)
from gcl.tracking.runs import end_interrupted, flatten, runs_named, start_run
from gcl.train.job import (
    check_resources,
    export_to_storage,
    finish_run,
    job_resources,
    prepare,
    with_score_range,
)
from gcl.tune.sweep import load_sweep, trial_concurrency
from gcl.tune.tuner import (
    SweepContext,
    TuneResult,
    build_tuner,
    close_child_runs,
    trainable,
    trial_job,
    trial_rows,
    trial_run_name,
    trial_table,
)

log = logging.getLogger(__name__)


def _log_trials(client, sweep, job, parent_run_id: str, rows: list[dict], result: TuneResult) -> None:
    """Log the trials (TRIALS_ARTIFACT) and their plot (TRIALS_PLOT, also kept under
    <storage>/<sweep name>/ when storage is local) to the parent run; the table and what the
    objective is go into `result` for the recipe to print."""
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, TRIALS_ARTIFACT), "w") as f:
            json.dump(rows, f, indent=2, default=str)
        client.log_artifact(parent_run_id, os.path.join(tmp, TRIALS_ARTIFACT))
        directory = storage.local_path(storage.join(job.storage, sweep.name)) or tmp
        plot = sweep_plot(rows, os.path.join(directory, TRIALS_PLOT))
        client.log_artifact(parent_run_id, plot)
    selected_on = "validation splits" if job.data.validation else "the evaluation splits, no validation splits given"
    result.heading = (
        f"sweep {sweep.name}: {job.eval.objective_name()}, selected on {selected_on}; "
        "test: the same on the evaluation splits"
    )
    result.table = trial_table(rows)
    result.plot = plot if directory != tmp else None  # kept where the storage is local


def _export_best(client, context: SweepContext, job, data, best: dict) -> str:
    """The best trial's MLflow run id, its model exported (once: a re-run finds it exported)."""
    from ray.train import Checkpoint

    best_name = trial_run_name(context.name, best["trial"])
    best_run_id = runs_named(client, job.mlflow.experiment, best_name)[0].info.run_id
    if MODEL_URI_TAG not in client.get_run(best_run_id).data.tags:
        best_job = with_score_range(trial_job(context.base, best["params"], best_name), data.train)
        location = export_to_storage(best_job, Checkpoint(best["checkpoint_path"]), data.manifest(job))
        finish_run(best_job, best_run_id, location, register=False)  # the sweep registers its best
    client.log_metric(context.parent_run_id, BEST_OBJECTIVE, best["objective"])
    client.set_tag(context.parent_run_id, BEST_TRIAL_TAG, best["trial"])
    client.set_tag(context.parent_run_id, BEST_RUN_TAG, best_run_id)
    return best_run_id


def run_sweep(path: str, overrides: list[str] | None = None) -> TuneResult:
    """Run (or resume) the sweep in `path`; returns its trials, the best one, its registration and
    what to print of them."""
    import ray
    from mlflow import MlflowClient
    from ray import tune

    sweep, job = load_sweep(path, overrides)
    if not job.data.validation:
        log.warning(
            "sweep %s has no validation splits (data.validation): it selects its trials and the "
            "champion on the evaluation splits it reports, whose figures are then optimistic; "
            "`gcl data split` and `gcl data synth` write val_* splits for it",
            sweep.name,
        )
    if job.eval.every_n_epochs > 1 and job.eval.sample_queries is None:
        raise ConfigError(
            f"sweep {sweep.name}: eval.every_n_epochs={job.eval.every_n_epochs} leaves epochs without an "
            "objective, which ASHA compares trials on; set eval.sample_queries (a quick evaluation "
            "between the full ones) or eval.every_n_epochs=1"
        )
    job, data = prepare(job)  # paths and tracking URI resolved here, store and data checked, once
    uri = job.mlflow.resolved_uri()
    init_ray()
    prepare_locked_features(job, data)  # once, for every trial whose sampled values keep the tower
    check_resources(job, ray.cluster_resources())
    resuming = tune.Tuner.can_restore(os.path.join(job.storage, sweep.name))
    # A resumed sweep keeps its parent run, finished or not: the trials it already ran hang under it.
    parent_run_id = start_run(
        uri,
        job.mlflow.experiment,
        sweep.name,
        flatten("sweep", sweep.model_dump(mode="json"), {}),
        {SWEEP_TAG: sweep.name},
        reopen_finished=resuming,
    )
    concurrency = trial_concurrency(ray.cluster_resources(), job, sweep.max_concurrent_trials)
    log.info(
        "sweep %s: %d samples, %d trials at once (each holds about %s)",
        sweep.name,
        sweep.num_samples,
        concurrency,
        job_resources(job),
    )
    context = SweepContext(
        name=sweep.name,
        base=job.model_dump(mode="json"),
        data=data,
        tracking_uri=uri,
        experiment=job.mlflow.experiment,
        parent_run_id=parent_run_id,
    )
    client = MlflowClient(uri)
    # Ctrl-C stops the sweep at once, as it stops gcl train: Tune's own SIGINT handler would end
    # the trials and return their results as if the sweep had finished, to be ranked and registered.
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    try:
        grid = build_tuner(sweep, job, trainable(context, sweep.trial_cpus), concurrency).fit()
    except BaseException as err:
        end_interrupted(client, parent_run_id, err, children=True)
        raise

    rows = trial_rows(grid, sweep)
    close_child_runs(client, job.mlflow.experiment, parent_run_id, rows, job.train.epochs)
    result = TuneResult(parent_run_id=parent_run_id, trials=rows, validated=bool(job.data.validation))
    _log_trials(client, sweep, job, parent_run_id, rows, result)
    finished = [r for r in rows if r["objective"] is not None and r["checkpoint_path"]]
    if not finished:
        client.set_terminated(parent_run_id, "FAILED")
        first = next((f"trial {r['trial']}: {r['error']}" for r in rows if r["error"]), "")
        raise TrainingError(f"sweep {sweep.name}: no trial finished an epoch; {first[:400]}")
    best = finished[0]
    result.best = {**best, "run_id": _export_best(client, context, job, data, best)}
    name = sweep.registered_model or job.mlflow.registered_model
    if name:
        result.registered, result.registered_model = register_run(result.best["run_id"], name, uri), name
    client.set_terminated(parent_run_id)
    return result
