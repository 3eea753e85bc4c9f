"""MLflow tracking shared by training and sweeps: the tracking URI resolved where a command starts,
fail fast on an unreachable store, runs resumed by name, configs flattened into params, and the
metrics logger of training's rank 0."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time

from gcl.errors import TrackingError
from gcl.tracking.names import ERROR_TAG, PARENT_RUN_TAG, RUN_NAME_TAG

log = logging.getLogger(__name__)


def flatten(prefix: str, value, out: dict) -> dict:
    """Nested config -> {'section.key': value} for MLflow params."""
    if isinstance(value, dict):
        for k, v in value.items():
            flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = json.dumps(value) if isinstance(value, list | tuple) else value
    return out


SQLITE = "sqlite:///"


def resolve_tracking_uri(uri: str | None) -> str:
    """The tracking URI a command uses, resolved in the process the user started: `uri`, else
    MLFLOW_TRACKING_URI, else SQLite in ./mlruns.db; a relative SQLite path made absolute, since
    `sqlite:///mlruns.db` names a file in whatever directory a process runs in, and Ray's trials,
    workers and jobs each run in their own."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or SQLITE + "mlruns.db"
    if uri.startswith(SQLITE) and uri != SQLITE + ":memory:":
        path = uri.removeprefix(SQLITE)
        return SQLITE + os.path.abspath(path)  # an absolute path keeps its leading slash: sqlite:////...
    return uri


@contextlib.contextmanager
def fluent_tracking_uri(uri: str):
    """MLflow's fluent API (start_run, log_model, register_model) reads one process-wide tracking
    URI, which mlflow.set_tracking_uri also exports as MLFLOW_TRACKING_URI: set it for the block
    only, so that a later job in this process (a notebook, a test session) still resolves its own
    default store instead of inheriting this one."""
    import mlflow

    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)  # None unsets it again


def check_tracking(uri: str) -> None:
    """Fail fast, before any training, if the MLflow tracking store cannot be reached."""
    from mlflow import MlflowClient

    from gcl.tracking.buffer import fail_fast_requests

    try:
        # One try: a wrong URI (nothing listening, no such host) fails at once. A server that is
        # there but slow to answer its first request (starting, or on a busy machine: over 10 s
        # was seen) gets a minute.
        with fail_fast_requests(timeout_seconds=60), _sqlite_init_lock(uri):
            MlflowClient(uri).search_experiments(max_results=1)
    except Exception as err:
        raise TrackingError(f"MLflow tracking store {uri!r} is not reachable: {type(err).__name__}: {err}") from None


@contextlib.contextmanager
def _sqlite_init_lock(uri: str):
    """MLflow creates and migrates a new SQLite store on first use; two processes doing that at once
    collide ('duplicate column name'). Serialize the first touch with a lock file beside the store."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    path = uri.removeprefix("sqlite:///")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def log_params(client, run_id: str, params: dict) -> None:
    """Log `params` ({key: value}) to a run, in batches MLflow accepts."""
    from mlflow.entities import Param

    flat = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(flat), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=flat[i : i + 100])


def runs_named(client, experiment: str, name: str) -> list:
    """The MLflow runs gcl made under `name` (RUN_NAME_TAG) in `experiment`, newest first."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return client.search_runs(
        [found.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{name}'", order_by=["start_time DESC"]
    )


def find_run(uri: str, run: str, experiment: str) -> str:
    """The id of the run `run` names: a run gcl made under that name in `experiment` (the newest),
    else a run with that id."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(uri)
    named = runs_named(client, experiment, run)
    if named:
        return named[0].info.run_id
    try:
        return client.get_run(run).info.run_id
    except MlflowException:
        raise TrackingError(
            f"no run named {run!r} in experiment {experiment!r} of {uri}, and no run with that id"
        ) from None


def logged_job(uri: str, reference: str, experiment: str) -> dict:
    """The resolved job config (CONFIG_ARTIFACT) that a run trained with, as a dict: the run
    `reference` names (a run name in `experiment`, a run id, or a registered model's version as
    models:/NAME@ALIAS or models:/NAME/VERSION). A TrackingError says what was not found."""
    import tempfile

    import yaml
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from gcl.tracking.names import CONFIG_ARTIFACT

    client = MlflowClient(uri)
    if reference.startswith("models:/"):
        run_id = model_version_run(client, reference)
    else:
        run_id = find_run(uri, reference, experiment)
    with tempfile.TemporaryDirectory() as scratch:
        try:
            path = client.download_artifacts(run_id, CONFIG_ARTIFACT, scratch)
        except (MlflowException, OSError):
            raise TrackingError(
                f"run {run_id} ({reference}) has no {CONFIG_ARTIFACT}: only runs of gcl train and "
                "sweeps' trials log the job they trained"
            ) from None
        with open(path) as f:
            return yaml.safe_load(f)


def model_version_run(client, reference: str) -> str:
    """The run id of the registered model version models:/NAME@ALIAS or models:/NAME/VERSION."""
    from mlflow.exceptions import MlflowException

    name, _, which = reference.removeprefix("models:/").partition("@")
    try:
        if which:
            return client.get_model_version_by_alias(name, which).run_id
        name, _, version = name.partition("/")
        return client.get_model_version(name, version).run_id
    except MlflowException as err:
        raise TrackingError(
            f"{reference}: no such registered model version ({' '.join(str(err).split())[:200]}); "
            "give models:/NAME@ALIAS or models:/NAME/VERSION"
        ) from None


def start_run(
    uri: str, experiment: str, name: str, params: dict, tags: dict | None = None, reopen_finished: bool = False
) -> str:
    """The MLflow run called `name`: an unfinished (running, failed or killed) run of that name
    (or with `reopen_finished`, the latest one whatever its status) is resumed and marked running
    again, else a new one is created with `params` and `tags`."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    runs = runs_named(client, experiment, name)
    if runs and (reopen_finished or runs[0].info.status != "FINISHED"):
        log.info("resuming MLflow run %s (%s)", runs[0].info.run_id, name)
        client.update_run(runs[0].info.run_id, status="RUNNING")
        return runs[0].info.run_id
    run = client.create_run(experiment_id, run_name=name, tags={RUN_NAME_TAG: name, **(tags or {})})
    log_params(client, run.info.run_id, params)
    return run.info.run_id


def mark_failed(client, run_id: str, error: BaseException) -> None:
    """End a run as FAILED, saying why (ERROR_TAG); the same command resumes it."""
    client.set_tag(run_id, ERROR_TAG, f"{type(error).__name__}: {error}"[:5000])
    client.set_terminated(run_id, "FAILED")


def mark_killed(client, run_id: str) -> None:
    """End a run as KILLED: stopped by its user (Ctrl-C, SIGTERM); the same command resumes it."""
    client.set_terminated(run_id, "KILLED")


def end_interrupted(client, run_id: str, err: BaseException, children: bool = False) -> None:
    """End a run whose command did not finish (and with `children`, its child runs still
    running: a sweep's trials, which die with its driver): KILLED when its user stopped it (Ctrl-C,
    or SIGTERM, which Ray's driver turns into sys.exit(15)), else FAILED with `err`. The same
    command resumes them. A tracking store that cannot be reached is said, not raised over `err`."""
    from gcl.tracking.buffer import fail_fast_requests, is_outage

    stopped = isinstance(err, KeyboardInterrupt | SystemExit)
    try:
        with fail_fast_requests():
            run_ids = [run_id]
            if children:
                experiment_id = client.get_run(run_id).info.experiment_id
                running = f"tags.`{PARENT_RUN_TAG}` = '{run_id}' and attributes.status = 'RUNNING'"
                run_ids += [run.info.run_id for run in client.search_runs([experiment_id], running)]
            for each in run_ids:
                mark_killed(client, each) if stopped else mark_failed(client, each, err)
    except Exception as tracking_err:
        if not is_outage(tracking_err):
            raise
        log.warning("MLflow cannot be reached to mark run %s %s", run_id, "killed" if stopped else "failed")


def mark_finished(client, run_id: str) -> None:
    """End a run as FINISHED, without the error an earlier, failed attempt of it left."""
    if ERROR_TAG in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, ERROR_TAG)
    client.set_terminated(run_id)


def mlflow_metric_name(name: str) -> str:
    """MLflow forbids '@' in metric names: 'in_domain/ndcg@10' -> 'in_domain/ndcg_at_10'."""
    return name.replace("@", "_at_")


class MetricsLogger:
    """Rank 0's metrics and tags for the MLflow run, buffered so that an outage of the tracking
    store does not stop training (gcl.tracking.buffer.BufferedRunLog); other ranks log nothing."""

    def __init__(
        self, tracking_uri: str | None, run_id: str | None, enabled: bool, run_dir: str, flush_seconds: float = 10.0
    ):
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.buffer = None
        if enabled and tracking_uri and run_id:
            from mlflow import MlflowClient

            from gcl.tracking.buffer import FAIL_FAST, BufferedRunLog

            os.environ.update(FAIL_FAST)  # this worker process's MLflow requests are the buffer's
            self.buffer = BufferedRunLog(MlflowClient(tracking_uri), run_id, run_dir, flush_seconds)

    def check_run(self) -> None:
        """A TrackingError when this worker's view of the store lacks the run: a restart cannot fix
        that (a SQLite file that is not the driver's, on a node of its own). A store that cannot be
        reached now is no error: its metrics are buffered."""
        from mlflow.exceptions import MlflowException

        from gcl.tracking.buffer import is_outage

        if self.buffer is None:
            return
        try:
            self.buffer.client.get_run(self.run_id)
        except MlflowException as err:
            if err.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise TrackingError(
                    f"MLflow run {self.run_id} is not in the tracking store {self.tracking_uri!r} as the training "
                    "workers see it, though the driver created it there; on a cluster of several nodes use a "
                    "tracking server that every node reaches (mlflow.tracking_uri: http://...), not a local file"
                ) from None
            if not is_outage(err):
                raise
            log.warning("MLflow tracking store %s unreachable at start: metrics are buffered", self.tracking_uri)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.buffer is not None:
            named = {mlflow_metric_name(k): v for k, v in metrics.items()}
            self.buffer.log(named, step, int(time.time() * 1000))

    def set_tag(self, key: str, value: str) -> None:
        if self.buffer is not None:
            self.buffer.set_tag(key, value)

    def flush(self) -> None:
        if self.buffer is not None:
            self.buffer.flush()
