"""MLflow tracking shared by training and sweeps: fail fast on an unreachable store, runs
resumed by name, configs flattened into params."""

from __future__ import annotations

import contextlib
import json
import logging
import os

from gcl.errors import TrackingError

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


def check_tracking(uri: str) -> None:
    """Fail fast, before any training, if the MLflow tracking store cannot be reached."""
    from mlflow import MlflowClient

    # One quick try: the client's default retries back off for minutes on a wrong URI.
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
    try:
        with _sqlite_init_lock(uri):
            MlflowClient(uri).search_experiments(max_results=1)
    except Exception as err:
        raise TrackingError(
            f"MLflow tracking store {uri!r} is not reachable: {type(err).__name__}: {err}"
        ) from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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
    """The MLflow runs gcl made under `name` (tag gcl.run_name) in `experiment`, newest first."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return client.search_runs([found.experiment_id], filter_string=f"tags.`gcl.run_name` = '{name}'",
                              order_by=["start_time DESC"])  # fmt: skip


def start_run(uri: str, experiment: str, name: str, params: dict, tags: dict | None = None,
              reopen_finished: bool = False) -> str:  # fmt: skip
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
    run = client.create_run(experiment_id, run_name=name, tags={"gcl.run_name": name, **(tags or {})})
    log_params(client, run.info.run_id, params)
    return run.info.run_id
