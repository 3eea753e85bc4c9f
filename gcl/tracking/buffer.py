"""Tracking that outlives an MLflow outage. Training's rank 0 queues its metrics and tags and
writes them to the run in batches; when the tracking store cannot be reached it keeps them in
spill files under the run's storage (<storage>/<name>/tracking_buffer/part-*.jsonl) and tries
again with backoff while training goes on. A replay (once the store answers again, at the end of
training, or by `gcl sync`) writes every spilled (metric, step) the run does not hold yet and
then deletes the file, so that a step is neither written twice nor lost, across restarts too."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from collections import defaultdict

from gcl import storage

log = logging.getLogger(__name__)
SPILL_DIR = "tracking_buffer"
OUTAGE_CODES = {
    "INTERNAL_ERROR",
    "TEMPORARILY_UNAVAILABLE",
    "REQUEST_LIMIT_EXCEEDED",
    "BAD_GATEWAY",
    "SERVICE_UNAVAILABLE",
    "DEADLINE_EXCEEDED",
    "ENDPOINT_NOT_FOUND",
}
BATCH_METRICS = 1000  # MLflow's log_batch limit
FAIL_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def is_outage(err: BaseException) -> bool:
    """Whether `err` says the tracking store could not be reached or did not answer (worth trying
    again later), rather than that the request itself was wrong."""
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        return err.error_code in OUTAGE_CODES
    import requests

    return isinstance(err, OSError | requests.RequestException | TimeoutError)


@contextlib.contextmanager
def fail_fast_requests(timeout_seconds: float = 10):
    """One try per MLflow HTTP request in the block, with a short timeout: the caller retries with
    its own backoff (while training goes on), where MLflow's default retries hold each request
    for minutes. A refused connection fails at once whatever the timeout."""
    saved = {k: os.environ.get(k) for k in FAIL_FAST}
    os.environ.update({**FAIL_FAST, "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(timeout_seconds))})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def while_unreachable(action, wait_seconds: float, doing: str):
    """`action()`, tried again with backoff for up to `wait_seconds` while the tracking store
    cannot be reached (one quick try per request); then the outage's error is raised. `doing`
    completes the warning each retry logs: "MLflow tracking store unreachable <doing> (...)"."""
    deadline = time.monotonic() + wait_seconds
    pause = 1.0
    with fail_fast_requests():
        while True:
            try:
                return action()
            except Exception as err:
                if not is_outage(err) or time.monotonic() + pause > deadline:
                    raise
                log.warning(
                    "MLflow tracking store unreachable %s (%s); trying again in %.0f s",
                    doing,
                    type(err).__name__,
                    pause,
                )
                time.sleep(pause)
                pause = min(2 * pause, 30.0)


class SpillFiles:
    """The spill files of a run: JSON lines of {"metric": key, "value", "timestamp", "step"} or
    {"tag": key, "value"}, one new file per spill (object stores do not append)."""

    def __init__(self, run_dir: str):
        self.directory = storage.join(run_dir, SPILL_DIR)

    def write(self, records: list[dict]) -> None:
        if not records:
            return
        store, path = storage.filesystem(self.directory)
        store.create_dir(path, recursive=True)
        name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.jsonl"
        with store.open_output_stream(f"{path}/{name}") as out:
            out.write("".join(json.dumps(r) + "\n" for r in records).encode())

    def parts(self) -> list[str]:
        from pyarrow import fs

        store, path = storage.filesystem(self.directory)
        if store.get_file_info(path).type != fs.FileType.Directory:
            return []
        entries = store.get_file_info(fs.FileSelector(path))
        return sorted(e.path for e in entries if e.is_file and e.base_name.startswith("part-"))

    def read(self, parts: list[str]) -> list[dict]:
        store, _ = storage.filesystem(self.directory)
        records = []
        for part in parts:
            with store.open_input_stream(part) as stream:
                records.extend(json.loads(line) for line in stream.read().decode().splitlines() if line)
        return records

    def remove(self, parts: list[str]) -> None:
        store, _ = storage.filesystem(self.directory)
        for part in parts:
            store.delete_file(part)


def replay(client, run_id: str, spill: SpillFiles) -> int:
    """Write the spilled metrics the run does not hold yet (compared by metric and step with its
    history) and the spilled tags, then delete the spill files; the number of metrics written."""
    from mlflow.entities import Metric, RunTag

    parts = spill.parts()
    if not parts:
        return 0
    metrics: dict[str, dict[int, Metric]] = defaultdict(dict)
    tags: dict[str, str] = {}
    for record in spill.read(parts):
        if "metric" in record:  # the first value of a step wins: training retraces steps identically
            metrics[record["metric"]].setdefault(
                record["step"], Metric(record["metric"], record["value"], record["timestamp"], record["step"])
            )
        else:
            tags[record["tag"]] = record["value"]
    missing = []
    for key, steps in metrics.items():
        logged = {m.step for m in client.get_metric_history(run_id, key)}
        missing.extend(m for step, m in sorted(steps.items()) if step not in logged)
    for i in range(0, len(missing), BATCH_METRICS):
        client.log_batch(run_id, metrics=missing[i : i + BATCH_METRICS])
    if tags:
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    spill.remove(parts)
    return len(missing)


class BufferedRunLog:
    """Rank 0's metrics and tags for an MLflow run, written in batches (every `flush_metrics`
    metrics or `flush_seconds`), spilled to storage while the store cannot be reached and
    replayed when it can again. Steps an earlier attempt of the run already logged are not
    logged again (after a restore, the steps past the checkpoint are trained once more)."""

    def __init__(
        self,
        client,
        run_id: str,
        run_dir: str,
        flush_seconds: float = 10.0,
        flush_metrics: int = 200,
        max_backoff_s: float = 60.0,
    ):
        self.client, self.run_id = client, run_id
        self.spill = SpillFiles(run_dir)
        self.flush_seconds, self.flush_metrics, self.max_backoff_s = flush_seconds, flush_metrics, max_backoff_s
        self.metrics: list = []
        self.tags: dict[str, str] = {}
        self.logged_through: dict[str, int] | None = None  # metric -> last step in MLflow; None: not known yet
        self.last_flush = time.monotonic()
        self.retry_at = 0.0  # while out: when to try the store again
        self.backoff_s = 0.0  # 0: the store answered last time
        self.spilled = True  # spill files may be waiting (an earlier attempt's, or this one's)

    def log(self, metrics: dict[str, float], step: int, timestamp_ms: int) -> None:
        from mlflow.entities import Metric

        self.metrics.extend(Metric(k, float(v), timestamp_ms, step) for k, v in metrics.items())
        if len(self.metrics) >= self.flush_metrics or time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush()

    def set_tag(self, key: str, value: str) -> None:
        self.tags[key] = value
        self.flush()

    @property
    def out(self) -> bool:
        """Whether the store did not answer the last time it was tried."""
        return self.backoff_s > 0

    def flush(self) -> None:
        """Write what is queued; while the store is out (or answers with an outage), spill it."""
        self.last_flush = time.monotonic()
        if not self.metrics and not self.tags and not self.out:
            return
        if self.out and time.monotonic() < self.retry_at:
            self._spill()
            return
        try:
            self._write()
        except Exception as err:
            if not is_outage(err):
                raise
            self._spill()
            self.backoff_s = min(self.max_backoff_s, max(1.0, 2 * self.backoff_s))
            self.retry_at = time.monotonic() + self.backoff_s
            log.warning(
                "MLflow tracking store unreachable (%s: %s); metrics are kept in %s and written "
                "when it answers again (next try in %.0f s)",
                type(err).__name__,
                str(err)[:200],
                self.spill.directory,
                self.backoff_s,
            )
            return
        if self.out:
            log.warning("MLflow tracking store answers again; the buffered metrics are written")
        self.backoff_s = 0.0

    def _write(self) -> None:
        from mlflow.entities import RunTag

        if self.logged_through is None:
            self.logged_through = {}
            for key in self.client.get_run(self.run_id).data.metrics:
                history = self.client.get_metric_history(self.run_id, key)
                self.logged_through[key] = max((m.step for m in history), default=0)
        if self.spilled:
            replay(self.client, self.run_id, self.spill)
            self.spilled = False
        fresh = [m for m in self.metrics if m.step > self.logged_through.get(m.key, -1)]
        for i in range(0, len(fresh), BATCH_METRICS):
            self.client.log_batch(self.run_id, metrics=fresh[i : i + BATCH_METRICS])
        if self.tags:
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in self.tags.items()])
        for m in fresh:
            self.logged_through[m.key] = max(m.step, self.logged_through.get(m.key, -1))
        self.metrics, self.tags = [], {}

    def _spill(self) -> None:
        records = [
            {"metric": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step} for m in self.metrics
        ] + [{"tag": k, "value": v} for k, v in self.tags.items()]
        self.spill.write(records)
        self.spilled = True
        self.metrics, self.tags = [], {}
