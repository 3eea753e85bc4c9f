"""The Ray Tune side of a sweep: each trial is a driver function that builds and fits a
TorchTrainer (the Ray Train V2 pattern), its per-epoch metrics reaching Tune through Ray Train's
TuneReportCallback; Optuna's TPE proposes settings and ASHA stops unpromising trials. MLflow
gets a child run per trial under the sweep's parent run. What a sweep is (its config, search
space and checks) is gcl.tune.sweep; `gcl tune` (workflows/tune.py) runs one.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from gcl.config import validate_config
from gcl.job_config import JobConfig
from gcl.tracking.names import (
    CONFIG_ARTIFACT,
    ERROR_TAG,
    EVAL_SAMPLE_QUERIES,
    OBJECTIVE,
    PARENT_RUN_TAG,
    STOPPED_EARLY_TAG,
    SWEEP_TAG,
    TEST_OBJECTIVE,
    TRIAL_ID_TAG,
)
from gcl.tracking.runs import flatten, log_params, mark_failed, mark_finished, start_run
from gcl.train.job import fit, with_score_range
from gcl.tune.sweep import SweepConfig, trial_overrides

log = logging.getLogger(__name__)
TRIAL_DRIVER_MEMORY = 256 * 2**20  # bytes: a trial driver holds configs and an MLflow client


@dataclass
class SweepContext:
    """What every trial driver of a sweep gets (pickled once by Tune)."""

    name: str
    base: dict  # the prepared base job (resolved paths and tracking URI), as a dict
    data: Any  # gcl.train.job.CheckedData: the training data as validation found it
    tracking_uri: str
    experiment: str
    parent_run_id: str


@dataclass
class TuneResult:
    """What a finished sweep produced."""

    parent_run_id: str
    trials: list[dict] = field(default_factory=list)
    best: dict | None = None
    registered: tuple[str, str] | None = None  # (version, alias)
    registered_model: str | None = None
    validated: bool = False  # selected on validation splits
    heading: str = ""  # what the objective is and where it was measured
    table: str = ""  # the trials, best first (trial_table)
    plot: str | None = None  # the trials' plot, where the storage is local


def trial_job(base: dict, params: dict[str, Any], name: str) -> JobConfig:
    """The job a trial trains: the sweep's base job with the sampled values applied."""
    # Every trial starts from the same model: evaluating it before training is the same work each time.
    overrides = [*trial_overrides(params), f"name={name}", "eval.before_training=false"]
    return validate_config(JobConfig, base, overrides, source=f"trial {name}")


def trial_run_name(sweep_name: str, trial_id: str) -> str:
    """The MLflow run name (and job name) of a sweep's trial."""
    return f"{sweep_name}-{trial_id}"


def trial_driver(params: dict[str, Any], sweep: SweepContext) -> None:
    """One Tune trial: an MLflow child run, then a TorchTrainer fit reporting to Tune.

    params: the sampled {dotted key: value}.
    """
    import ray.tune
    from mlflow import MlflowClient
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = ray.tune.get_context().get_trial_id()
    name = trial_run_name(sweep.name, trial_id)
    tags = {PARENT_RUN_TAG: sweep.parent_run_id, SWEEP_TAG: sweep.name, TRIAL_ID_TAG: trial_id}
    # A trial id is unique within its sweep: a trial Tune starts again after the sweep was stopped
    # (even one that had finished, if Tune had not yet saved that) continues its own run.
    run_id = start_run(sweep.tracking_uri, sweep.experiment, name, params, tags, reopen_finished=True)
    client = MlflowClient(sweep.tracking_uri)
    try:
        job = with_score_range(trial_job(sweep.base, params, name), sweep.data.train)
        log_params(
            client, run_id, {k: v for k, v in flatten("", job.model_dump(mode="json"), {}).items() if k not in params}
        )
        # What `gcl train --from-run` trains again, as gcl train logs it.
        client.log_text(run_id, yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False), CONFIG_ARTIFACT)
        fit(job, sweep.data, run_id, callbacks=[TuneReportCallback()])
    except BaseException as err:
        mark_failed(client, run_id, err)
        raise
    mark_finished(client, run_id)


def build_tuner(sweep: SweepConfig, job: JobConfig, trainable, concurrency: int):
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
        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            max_t=job.train.epochs,
            grace_period=sweep.asha.grace_period,
            reduction_factor=sweep.asha.reduction_factor,
        )
    return tune.Tuner(
        trainable,
        param_space={key: domain.to_tune() for key, domain in sweep.space.items()},
        # reuse_actors: a trial's driver process serves the next trial too, instead of a new process
        # importing gcl, Ray Train and MLflow again for every trial. Not under ASHA: a trial it stops
        # goes on training (Tune cannot interrupt the Ray Train run its driver waits on), so its
        # process cannot be reused, and the sweep hung with the next trial waiting for the CPUs the
        # stopped one still held. A process of its own ends with the trial, and its Ray Train run with it.
        tune_config=tune.TuneConfig(
            metric=OBJECTIVE,
            mode="max",
            search_alg=search,
            scheduler=scheduler,
            num_samples=sweep.num_samples,
            reuse_actors=scheduler is None,
        ),
        run_config=tune.RunConfig(
            name=sweep.name,
            storage_path=job.storage,
            callbacks=[trial_lines(sweep), placement_group_release()],
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )


def shown_value(value: Any) -> str:
    """A sampled value as the trial lines and the trial table show it (floats to 4 digits)."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def trial_lines(sweep: SweepConfig):
    """A Tune callback that prints a line on the terminal as each trial ends: its sampled values,
    epochs and objective (or its error), so a sweep's table builds up while it runs."""
    from ray import tune

    from gcl.console import say

    class TrialLines(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            self._line(trial, None)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._line(trial, "ERROR")

        def _line(self, trial, status) -> None:
            result = trial.last_result or {}
            values = ", ".join(f"{k}={shown_value(trial.config.get(k))}" for k in sweep.space)
            score = result.get(OBJECTIVE)
            outcome = status or ("-" if score is None else f"objective {score:.4f}")
            say(f"trial {trial.trial_id} ended after {result.get('epoch', 0)} epochs: {outcome} ({values})")

    return TrialLines()


def placement_group_release(check_every_s: float = 10.0, idle_for_s: float = 30.0):
    """A Tune callback that removes the placement groups no live actor has used for `idle_for_s`,
    checked every `check_every_s` while the sweep runs and as each trial ends. A trial that Tune
    stops (ASHA's cut) dies with its Ray Train run, but not always with the placement group that
    run reserved for its workers: Ray Train leaves that to a detached cleaner actor, whose state
    queries find no cluster when another Ray instance runs on the machine ("Found multiple active
    Ray instances"), and placement groups live as long as the job that made them (the sweep's
    driver). Each one left held CPUs until, twelve trials into a towers sweep on 2 cores, a new
    trial's data pipeline could not get the CPU it waited for (observed twice: 1.0 of the cluster's
    2 reserved by two stopped trials' groups, the next trial hung). Checking while trials run, not
    only as they end, frees a group whose actors were still dying when its trial ended; the grace
    spares a group a starting trial has just made and not yet filled with its workers. A group in
    use has actors (a running trial's workers, Tune's own trial groups); one still waiting for
    resources is PENDING, not CREATED, and is left alone."""
    import time

    from ray import tune

    class ReleasePlacementGroups(tune.Callback):
        def __init__(self):
            self.idle_since: dict[str, float] = {}
            self.checked = 0.0

        def on_step_begin(self, iteration, trials, **info):
            if time.monotonic() - self.checked >= check_every_s:
                self._release()

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._release()

        def on_trial_error(self, iteration, trials, trial, **info):
            self._release()

        def _release(self):
            self.checked = time.monotonic()
            release_idle_placement_groups(self.idle_since, idle_for_s)

    return ReleasePlacementGroups()


def release_idle_placement_groups(idle_since: dict[str, float], idle_for_s: float) -> int:
    """Remove the created placement groups that no actor (alive, or starting) has used since
    `idle_for_s` ago; `idle_since` (group id -> when first seen idle) carries over between calls.
    Returns how many were removed."""
    import time

    import ray
    from ray.util import placement_group_table, remove_placement_group
    from ray.util.placement_group import PlacementGroup
    from ray.util.state import list_actors

    # This cluster's address: without it the state API refuses when other Ray instances run here.
    address = ray.get_runtime_context().gcs_address
    actors = list_actors(address=address, filters=[("state", "!=", "DEAD")], detail=True, limit=10_000)
    used = {a.placement_group_id for a in actors}
    now = time.monotonic()
    idle = {g for g, group in placement_group_table().items() if group["state"] == "CREATED" and g not in used}
    for group_id in set(idle_since) - idle:
        del idle_since[group_id]
    released = 0
    for group_id in idle:
        if now - idle_since.setdefault(group_id, now) >= idle_for_s:
            remove_placement_group(PlacementGroup(ray_id_from_hex(group_id)))
            del idle_since[group_id]
            released += 1
    if released:
        log.info("released %d placement group(s) left by trials Tune stopped", released)
    return released


def ray_id_from_hex(group_id: str):
    from ray._raylet import PlacementGroupID

    return PlacementGroupID(bytes.fromhex(group_id))


def trainable(context: SweepContext, trial_cpus: float):
    """The trial driver as Tune runs it: with the sweep's context and its resources. Tune needs
    a non-empty resource request per trial; the driver's memory makes it one when trial_cpus is 0."""
    from ray import tune

    return tune.with_resources(
        tune.with_parameters(trial_driver, sweep=context), {"CPU": trial_cpus, "memory": TRIAL_DRIVER_MEMORY}
    )


def _error_text(error: BaseException) -> str:
    """A trial's error as one line: the exception the driver raised, not Ray's task wrapper."""
    cause = getattr(error, "cause", None) or error  # RayTaskError wraps the driver's exception
    return f"{type(cause).__name__}: " + " ".join(str(cause).split())


def trial_rows(grid, sweep: SweepConfig) -> list[dict]:
    """One row per trial, best first: id, sampled params, last objective, status, error."""
    from ray.tune import ExperimentAnalysis

    # A restored trial that failed before reporting has no config in its Result; the trial has it.
    configs = {t.trial_id: t.config for t in ExperimentAnalysis(grid.experiment_path).trials}
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        trial_id = metrics["trial_id"]
        config = result.config or configs.get(trial_id, {})
        rows.append(
            {
                "trial": trial_id,
                "params": {k: config.get(k) for k in sweep.space},
                "objective": metrics.get(OBJECTIVE),
                "test_objective": metrics.get(TEST_OBJECTIVE),
                "sampled_queries": metrics.get(EVAL_SAMPLE_QUERIES) or 0,
                "epochs": metrics.get("epoch"),
                "status": "ERROR" if result.error else "OK",
                "error": _error_text(result.error) if result.error else None,
                "checkpoint_path": metrics.get("checkpoint_path"),
            }
        )
    return sorted(rows, key=lambda r: (r["objective"] is None, -(r["objective"] or 0.0)))


def close_child_runs(client, experiment: str, parent_run_id: str, rows: list[dict], epochs: int) -> None:
    """Tune stops a trial (ASHA's cut, or its last epoch) by removing its placement group: the
    driver is killed mid-fit, leaving its MLflow run running, or its fit first fails on the dead
    Train controller (ActorDiedError), marking the run failed. Tune's verdict decides: a trial it
    did not record as errored was stopped, not failed. Mark such runs finished, and tag the ones
    cut before their last epoch."""
    epochs_run = {row["trial"]: row["epochs"] or 0 for row in rows}
    stopped = {row["trial"] for row in rows if row["status"] == "OK"}
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    for run in client.search_runs([experiment_id], f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}'"):
        trial = run.data.tags.get(TRIAL_ID_TAG)
        if run.info.status == "RUNNING" or (run.info.status == "FAILED" and trial in stopped):
            if epochs_run.get(trial, 0) < epochs:
                client.set_tag(run.info.run_id, STOPPED_EARLY_TAG, "true")
            if ERROR_TAG in run.data.tags:
                client.delete_tag(run.info.run_id, ERROR_TAG)
            client.set_terminated(run.info.run_id)


def trial_table(rows: list[dict]) -> str:
    """The trials as a Markdown table, best first: the objective that ranks them and, beside it,
    the same measure on the test splits (`test`); marked * where a trial's last evaluation was a
    quick one on a sample of queries (a trial ASHA stopped between full evaluations)."""
    keys = list(rows[0]["params"]) if rows else []
    header = ["trial", *keys, "epochs", "objective", "test", "status"]
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for r in rows:
        values = [shown_value(v) for v in r["params"].values()]
        mark = "*" if r.get("sampled_queries") else ""
        scores = ["-" if r.get(k) is None else f"{r[k]:.4f}{mark}" for k in ("objective", "test_objective")]
        status = r["status"] if not r["error"] else f"{r['status']}: {r['error'][:160]}"
        lines.append(" | ".join([r["trial"], *values, str(r["epochs"] or "-"), *scores, status]))
    sampled = sorted({r["sampled_queries"] for r in rows if r.get("sampled_queries")})
    if sampled:
        lines.append(f"\n* on a sample of {', '.join(map(str, sampled))} queries per split (eval.sample_queries)")
    return "\n".join(lines)
