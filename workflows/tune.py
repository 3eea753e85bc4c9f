"""`gcl tune`: sweep GCL's loss weights with Ray Tune.

Each trial is a driver function that builds and fits a TorchTrainer (the Ray Train V2
pattern); its per-epoch metrics reach Tune through Ray Train's TuneReportCallback. Optuna's
TPE proposes settings and ASHA stops unpromising trials. MLflow gets a parent run for the
sweep and a child run per trial. The best trial's model is exported and registered:
`champion` only if it beats the current champion on the same objective.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from gcl.job_config import JobConfig

log = logging.getLogger("gcl.tune")
TRIAL_DRIVER_MEMORY = 256 * 2**20  # bytes: a trial driver holds configs and an MLflow client


@dataclass
class TuneResult:
    """What a finished sweep produced."""

    parent_run_id: str
    trials: list[dict] = field(default_factory=list)
    best: dict | None = None
    registered: tuple[str, str] | None = None


def trial_job(base: dict, params: dict[str, Any], name: str) -> JobConfig:
    """The job a trial trains: the sweep's base job with the sampled values applied."""
    from gcl.config import validate_config
    from gcl.sweep import trial_overrides

    return validate_config(
        JobConfig, base, [*trial_overrides(params), f"name={name}"], source=f"trial {name}"
    )


def trial_run_name(sweep_name: str, trial_id: str) -> str:
    """The MLflow run name (and job name) of a sweep's trial."""
    return f"{sweep_name}-{trial_id}"


def trial_driver(params: dict[str, Any], sweep: dict) -> None:
    """One Tune trial: an MLflow child run, then a TorchTrainer fit reporting to Tune.

    params: the sampled {dotted key: value}; sweep: name, base (the prepared job dict),
    report (training data validation), tracking_uri, experiment, parent_run_id.
    """
    import ray.tune
    from mlflow import MlflowClient
    from ray.tune.integration.ray_train import TuneReportCallback

    from gcl.jobs import fit, with_score_range
    from gcl.tracking import flatten, log_params, start_run

    trial_id = ray.tune.get_context().get_trial_id()
    name = trial_run_name(sweep["name"], trial_id)
    uri = sweep["tracking_uri"]
    tags = {
        "mlflow.parentRunId": sweep["parent_run_id"],
        "gcl.sweep": sweep["name"],
        "gcl.trial_id": trial_id,
    }
    # A trial id is unique within its sweep: a trial Tune starts again after the sweep was stopped
    # (even one that had finished, if Tune had not yet saved that) continues its own run.
    run_id = start_run(uri, sweep["experiment"], name, params, tags, reopen_finished=True)
    client = MlflowClient(uri)
    try:
        job = with_score_range(trial_job(sweep["base"], params, name), sweep["report"])
        log_params(client, run_id, {k: v for k, v in flatten("", job.model_dump(mode="json"), {}).items()
                                    if k not in params})  # fmt: skip
        fit(job, sweep["report"], run_id, callbacks=[TuneReportCallback()])
    except BaseException as err:
        client.set_tag(run_id, "gcl.error", f"{type(err).__name__}: {err}"[:5000])
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id)


def _tuner(sweep, job: JobConfig, trainable, concurrency: int):
    """A new Tuner, or the interrupted sweep of the same name restored (finished trials kept)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    path = os.path.join(job.storage, sweep.name)
    if tune.Tuner.can_restore(path):
        log.info("resuming the sweep at %s", path)
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=False)
    if sweep.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        search = ConcurrencyLimiter(OptunaSearch(seed=sweep.seed), max_concurrent=concurrency)
    else:
        from ray.tune.search import BasicVariantGenerator

        search = BasicVariantGenerator(random_state=sweep.seed, max_concurrent=concurrency)
    scheduler = None
    if sweep.asha.enabled:
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=job.train.epochs,
                                  grace_period=sweep.asha.grace_period, reduction_factor=sweep.asha.reduction_factor)  # fmt: skip
    return tune.Tuner(
        trainable,
        param_space={key: domain.to_tune() for key, domain in sweep.space.items()},
        tune_config=tune.TuneConfig(metric="objective", mode="max", search_alg=search, scheduler=scheduler,
                                    num_samples=sweep.num_samples),
        run_config=tune.RunConfig(name=sweep.name, storage_path=job.storage,
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )  # fmt: skip


def _error_text(error: BaseException) -> str:
    """A trial's error as one line: the exception the driver raised, not Ray's task wrapper."""
    cause = getattr(error, "cause", None) or error  # RayTaskError wraps the driver's exception
    return f"{type(cause).__name__}: " + " ".join(str(cause).split())


def _trial_rows(grid, sweep) -> list[dict]:
    """One row per trial: id, sampled params, last objective, status, error."""
    from ray.tune import ExperimentAnalysis

    # A restored trial that failed before reporting has no config in its Result; the trial has it.
    configs = {t.trial_id: t.config for t in ExperimentAnalysis(grid.experiment_path).trials}
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        trial_id = metrics["trial_id"]
        config = result.config or configs.get(trial_id, {})
        rows.append({
            "trial": trial_id, "params": {k: config.get(k) for k in sweep.space},
            "objective": metrics.get("objective"), "epochs": metrics.get("epoch"),
            "status": "ERROR" if result.error else "OK",
            "error": _error_text(result.error) if result.error else None,
            "checkpoint_path": metrics.get("checkpoint_path"),
        })  # fmt: skip
    return sorted(rows, key=lambda r: (r["objective"] is None, -(r["objective"] or 0.0)))


def _close_child_runs(client, experiment: str, parent_run_id: str, rows: list[dict], epochs: int) -> None:
    """Tune stops a trial (ASHA's cut, or its last epoch) by removing its placement group: the
    driver is killed mid-fit, leaving its MLflow run running, or its fit first fails on the dead
    Train controller (ActorDiedError), marking the run failed. Tune's verdict decides: a trial it
    did not record as errored was stopped, not failed. Mark such runs finished, and tag the ones
    cut before their last epoch."""
    epochs_run = {row["trial"]: row["epochs"] or 0 for row in rows}
    stopped = {row["trial"] for row in rows if row["status"] == "OK"}
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    for run in client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'"):
        trial = run.data.tags.get("gcl.trial_id")
        if run.info.status == "RUNNING" or (run.info.status == "FAILED" and trial in stopped):
            if epochs_run.get(trial, 0) < epochs:
                client.set_tag(run.info.run_id, "gcl.stopped_early", "true")
            if "gcl.error" in run.data.tags:
                client.delete_tag(run.info.run_id, "gcl.error")
            client.set_terminated(run.info.run_id)


def _trial_table(rows: list[dict]) -> str:
    keys = list(rows[0]["params"]) if rows else []
    header = ["trial", *keys, "epochs", "objective", "status"]
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for r in rows:
        values = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in r["params"].values()]
        objective = "-" if r["objective"] is None else f"{r['objective']:.4f}"
        status = r["status"] if not r["error"] else f"{r['status']}: {r['error'][:160]}"
        lines.append(" | ".join([r["trial"], *values, str(r["epochs"] or "-"), objective, status]))
    return "\n".join(lines)


def run_tune(path: str, overrides: list[str] | None = None) -> TuneResult:
    """Run (or resume) the sweep in `path`; returns its trials, the best one and its registration."""
    import json
    import tempfile

    import ray
    from mlflow import MlflowClient
    from ray import tune
    from ray.train import Checkpoint

    from gcl.cluster import init_ray
    from gcl.data.manifest import dataset_manifest
    from gcl.jobs import check_resources, export_model, job_resources, prepare, with_score_range
    from gcl.registry import MODEL_URI_TAG, register_run
    from gcl.sweep import load_sweep, trial_concurrency
    from gcl.tracking import flatten, runs_named, start_run

    sweep, job = load_sweep(path, overrides)
    job, report = prepare(job)  # tracking store and data checked once, before any trial
    uri = job.mlflow.resolved_uri()
    init_ray()
    check_resources(job, ray.cluster_resources())
    resuming = tune.Tuner.can_restore(os.path.join(job.storage, sweep.name))
    # A resumed sweep keeps its parent run, finished or not: the trials it already ran hang under it.
    parent_run_id = start_run(uri, job.mlflow.experiment, sweep.name, flatten("sweep", sweep.model_dump(mode="json"), {}),
                              {"gcl.sweep": sweep.name}, reopen_finished=resuming)  # fmt: skip
    concurrency = trial_concurrency(ray.cluster_resources(), job, sweep.max_concurrent_trials)
    log.info("sweep %s: %d samples, %d trials at once (each holds about %s)", sweep.name, sweep.num_samples,
             concurrency, job_resources(job))  # fmt: skip
    shared = {"name": sweep.name, "base": job.model_dump(mode="json"), "report": report, "tracking_uri": uri,
              "experiment": job.mlflow.experiment, "parent_run_id": parent_run_id}  # fmt: skip
    # Tune needs a non-empty resource request per trial; the driver's memory makes it one
    # when trial_cpus is 0.
    trainable = tune.with_resources(tune.with_parameters(trial_driver, sweep=shared),
                                    {"CPU": sweep.trial_cpus, "memory": TRIAL_DRIVER_MEMORY})  # fmt: skip
    grid = _tuner(sweep, job, trainable, concurrency).fit()

    client = MlflowClient(uri)
    rows = _trial_rows(grid, sweep)
    _close_child_runs(client, job.mlflow.experiment, parent_run_id, rows, job.train.epochs)
    result = TuneResult(parent_run_id=parent_run_id, trials=rows)
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "trials.json"), "w") as f:
            json.dump(rows, f, indent=2, default=str)
        client.log_artifact(parent_run_id, os.path.join(tmp, "trials.json"))
    print(f"\nsweep {sweep.name} ({job.eval.objective_name()}):")
    print(_trial_table(rows))
    finished = [r for r in rows if r["objective"] is not None and r["checkpoint_path"]]
    if not finished:
        client.set_terminated(parent_run_id, "FAILED")
        raise SystemExit(f"sweep {sweep.name}: no trial finished an epoch; errors are in the table above")

    best = finished[0]
    best_name = trial_run_name(sweep.name, best["trial"])
    best_job = with_score_range(trial_job(shared["base"], best["params"], best_name), report)
    best_run_id = runs_named(client, job.mlflow.experiment, best_name)[0].info.run_id
    if MODEL_URI_TAG not in client.get_run(best_run_id).data.tags:  # not yet exported by an earlier pass
        export_model(best_job, Checkpoint(best["checkpoint_path"]), best_run_id, dataset_manifest(job.data))
    client.log_metric(parent_run_id, "best_objective", best["objective"])
    client.set_tag(parent_run_id, "gcl.best_trial", best["trial"])
    client.set_tag(parent_run_id, "gcl.best_run_id", best_run_id)
    result.best = {**best, "run_id": best_run_id}
    name = sweep.registered_model or job.mlflow.registered_model
    if name:
        result.registered = register_run(best_run_id, name, uri)
        print(f"registered {name} version {result.registered[0]} as @{result.registered[1]}")
    client.set_terminated(parent_run_id)
    print(f"best trial {best['trial']}: objective {best['objective']:.4f}, MLflow run {best_run_id}")
    return result
