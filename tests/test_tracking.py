"""The tracking buffer (gcl.tracking.buffer) on a real SQLite MLflow store: spilled metrics are
replayed once, against the run's history, and an unreachable store is told from a bad request."""

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE

from gcl.tracking.buffer import BufferedRunLog, SpillFiles, is_outage, replay


@pytest.fixture
def run(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    experiment = client.create_experiment("buffer")
    return client, client.create_run(experiment).info.run_id


def _steps(client, run_id, key="loss"):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_replay_writes_each_spilled_step_the_run_lacks_once_and_deletes_the_spill(run, tmp_path):
    client, run_id = run
    client.log_batch(run_id, metrics=[Metric("loss", 1.0 / s, 0, s) for s in (1, 2, 3)])
    spill = SpillFiles(str(tmp_path / "runs" / "job"))
    spill.write([{"metric": "loss", "value": 1.0 / s, "timestamp": 0, "step": s} for s in (2, 3, 4, 5)])
    spill.write([{"metric": "loss", "value": 0.2, "timestamp": 0, "step": 5}, {"tag": "gcl.workers", "value": "x"}])
    assert len(spill.parts()) == 2
    assert replay(client, run_id, spill) == 2  # steps 4 and 5, once each
    assert _steps(client, run_id) == [1, 2, 3, 4, 5]
    assert client.get_run(run_id).data.tags["gcl.workers"] == "x"
    assert spill.parts() == [] and replay(client, run_id, spill) == 0


def test_an_unreachable_store_is_spilled_and_written_when_it_answers(run, tmp_path):
    client, run_id = run
    down = MlflowClient("http://127.0.0.1:9")  # nothing listens on the discard port
    buffer = BufferedRunLog(down, run_id, str(tmp_path / "runs" / "job"), flush_seconds=1e9, flush_metrics=2)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        for step in (1, 2, 3, 4):
            buffer.log({"loss": 1.0 / step}, step, timestamp_ms=0)
    assert buffer.out and len(buffer.spill.parts()) >= 1 and _steps(client, run_id) == []
    buffer.client, buffer.retry_at = client, 0.0  # the store is back
    buffer.log({"loss": 0.2}, 5, timestamp_ms=0)
    buffer.flush()
    assert not buffer.out and buffer.spill.parts() == []
    assert _steps(client, run_id) == [1, 2, 3, 4, 5]


def test_outages_are_told_from_requests_that_are_wrong():
    assert is_outage(MlflowException("down", error_code=TEMPORARILY_UNAVAILABLE))
    assert is_outage(ConnectionRefusedError())
    assert not is_outage(MlflowException("bad key", error_code=INVALID_PARAMETER_VALUE))
    assert not is_outage(ValueError("a bug"))


def test_the_end_of_training_check_asks_an_unreachable_store_once(tiny_job):
    """gcl train's last look at the store (check_learned) makes one request when the store does not
    answer, and lets the run end (gcl sync finishes it later). With MLflow's own retries (7, backing
    off from 2 s) it held `gcl train` about 4 minutes; counted here as the connections a store that
    hangs up on every request receives: 1, not 8."""
    import socket
    import threading

    from gcl.train.job import check_learned

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    accepted = []

    def hang_up():
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:  # closed: the test is over
                return
            accepted.append(connection)
            connection.close()

    threading.Thread(target=hang_up, daemon=True).start()
    try:
        check_learned(tiny_job(), MlflowClient(f"http://127.0.0.1:{listener.getsockname()[1]}"), "0" * 32)
    finally:
        listener.close()
    assert len(accepted) == 1
