"""The tracking server going away while `gcl embed`, `gcl index --register` and `gcl evaluate` run:
each finishes the work it can do without the store, says what was not recorded, and leaves no
partial registration; the same command records it once the store answers.

A real `mlflow server` (its store and artifacts on disk) stands behind a small HTTP relay in this
process, which goes away (closes its socket: nothing listens any more) at a point each case names,
observed rather than timed: after the requests the command makes before its work, or at the first
request from any process but the command's own. The commands run one after the other in one
process (tests/cli_driver.py), as the `gcl` console script runs each."""

import http.client
import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
from conftest import free_port, ray_local_env, register_tiny_model, start_mlflow_server, stop_mlflow_server
from mlflow import MlflowClient

from gcl.search.faiss_index import SearchIndex
from workflows import CONFIGS

pytestmark = pytest.mark.integration
DRIVER = Path(__file__).with_name("cli_driver.py")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection", "upgrade"}


class GoingAwayRelay:
    """Relays HTTP requests to the tracking server at `target_port` until `goes_away(relay, pid,
    method, path)` says so for a request (pid: the process that sent it): that request and every
    later one find the relay gone, as a server that went down. `answered` lists what it relayed."""

    def __init__(self, target_port: int, goes_away):
        self.target_port, self.goes_away = target_port, goes_away
        self.answered: list[tuple[int | None, str, str]] = []
        self.gone_at: tuple[int | None, str, str] | None = None
        relay = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def relay(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                request = (relay.pid_of(self.client_address), self.command, self.path)
                if relay.gone_at or relay.goes_away(relay, *request):
                    relay.go_away(request)
                    self.close_connection = True  # no answer: the client sees the connection drop
                    return
                upstream = http.client.HTTPConnection("127.0.0.1", relay.target_port, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                upstream.request(self.command, self.path, body=body, headers=headers)
                answer = upstream.getresponse()
                data = answer.read()
                upstream.close()
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in HOP_BY_HOP:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                relay.answered.append(request)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = relay

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def pid_of(client_address) -> int | None:
        """The process whose socket has `client_address` as its local end (same user: readable)."""
        for connection in psutil.net_connections("tcp"):
            if connection.laddr and tuple(connection.laddr) == tuple(client_address[:2]) and connection.pid:
                return connection.pid
        return None

    def go_away(self, request) -> None:
        if self.gone_at is None:
            self.gone_at = request
            # Its listening socket closed from another thread: this one is inside a request.
            threading.Thread(target=lambda: (self.server.shutdown(), self.server.server_close()), daemon=True).start()


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    """A real mlflow server with the tiny model registered as tiny@champion (its artifacts served
    by the server)."""
    root = tmp_path_factory.mktemp("outage-server")
    port = free_port()
    server = start_mlflow_server(port, root)
    uri = register_tiny_model(root, f"http://127.0.0.1:{port}")
    yield root, port, uri
    stop_mlflow_server(server)


def test_tracking_server_going_away_during_embed_index_and_evaluate(tracking_server, ray_local, synth_dir, tmp_path):
    """gcl embed fetches the model once, in its own process, before any Ray work: the store goes
    away at the first request from any other process (a Ray worker) and the embeddings are all
    written. gcl index --register and a two-model gcl evaluate find it gone after the check they
    make first: the index is complete and said to be, nothing is registered and no run is left
    open; the comparison is printed and written, and the terminal says it was not logged. With
    the store back, the same index command registers the search model."""
    root, port, uri = tracking_server
    tiny = str(CONFIGS / "tiny-cpu.yaml")
    embeddings, index = tmp_path / "catalog", tmp_path / "index"
    quick = ["--set", "mlflow.finish_wait_seconds=2"]  # how long a command retries the store before saying so
    evaluate_on = [
        "--set",
        f"data.eval={{in_domain: {synth_dir}/in_domain.parquet}}",
        "--set",
        f"storage={tmp_path}/runs",
    ]

    def after_the_check(relay, pid, method, path):
        return len(relay.answered) >= 1  # check_tracking's one request, which each command makes first

    def from_another_process(relay, pid, method, path):
        return pid != driver.pid

    relays = {
        "embed": GoingAwayRelay(port, from_another_process),
        "index": GoingAwayRelay(port, after_the_check),
        "evaluate": GoingAwayRelay(port, after_the_check),
    }
    register = [
        "index",
        "--embeddings",
        str(embeddings),
        "--out",
        str(index),
        "--register",
        "tiny-search",
        "-c",
        tiny,
        *quick,
    ]
    cases = [
        {
            "name": "embed",
            "argv": [
                "embed",
                "-c",
                tiny,
                "--model",
                "models:/tiny@champion",
                "--input",
                f"{synth_dir}/in_domain.parquet",
                "--out",
                str(embeddings),
                "--set",
                f"mlflow.tracking_uri={relays['embed'].uri}",
                "--set",
                f"storage={tmp_path}/runs",
            ],
            "env": {"RAY_ADDRESS": ray_local_env()["RAY_ADDRESS"]},
        },
        {
            "name": "index",
            "argv": [
                *register,
                "--set",
                f"mlflow.tracking_uri={relays['index'].uri}",
                "--set",
                f"storage={tmp_path}/runs",
            ],
        },
        {
            "name": "evaluate",
            "argv": [
                "evaluate",
                "-c",
                tiny,
                "--model",
                str(root / "model"),
                "--model",
                "open_clip:gcl-tiny",
                "--output",
                str(tmp_path / "evaluation.json"),
                *evaluate_on,
                *quick,
                "--set",
                f"mlflow.tracking_uri={relays['evaluate'].uri}",
            ],
        },
        {
            "name": "index, the store back",
            "argv": [*register, "--set", f"mlflow.tracking_uri={uri}", "--set", f"storage={tmp_path}/runs"],
        },
    ]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    driver = subprocess.Popen(
        [sys.executable, str(DRIVER), str(tmp_path / "cases.json"), str(tmp_path / "out.json")],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output, _ = driver.communicate(timeout=900)
    assert driver.returncode == 0, output[-3000:]
    done = {case["name"]: case for case in json.loads((tmp_path / "out.json").read_text())}
    client = MlflowClient(uri)

    embed = done["embed"]
    assert embed["code"] == 0, embed["terminal"][-3000:]
    assert relays["embed"].gone_at is None, f"another process asked the store: {relays['embed'].gone_at}"
    assert all(pid == driver.pid for pid, _, _ in relays["embed"].answered)
    summary = json.loads((embeddings / "_gcl_embeddings.json").read_text())
    assert summary["model_uri"] == "models:/tiny/1" and summary["rows"] > 0

    first = done["index"]
    lines = first["terminal"].strip().splitlines()
    assert first["code"] == 2 and "Traceback" not in first["terminal"], first["terminal"]
    assert lines[-1].startswith(f"error: the index is complete in {index}, but the MLflow tracking store"), lines
    assert "no version of tiny-search was registered" in lines[-1] and "the same command registers it" in lines[-1]
    assert relays["index"].gone_at is not None
    assert SearchIndex(str(tmp_path / "index")).index.ntotal > 0  # complete: it loads and searches

    evaluate = done["evaluate"]
    assert evaluate["code"] == 0, evaluate["terminal"][-3000:]
    assert "warning: the comparison was not logged to MLflow: the tracking store" in evaluate["terminal"]
    assert relays["evaluate"].gone_at is not None
    written = json.loads((tmp_path / "evaluation.json").read_text())
    assert set(written["models"]) == {str(root / "model"), "open_clip:gcl-tiny"}
    assert "ndcg@10" in written["models"]["open_clip:gcl-tiny"]["in_domain"]

    again = done["index, the store back"]
    assert again["code"] == 0, again["terminal"][-3000:]
    versions = client.search_model_versions("name = 'tiny-search'")
    assert [v.version for v in versions] == ["1"]  # one registration: the outage left none behind
    experiment = client.get_experiment_by_name("gcl").experiment_id
    runs = client.search_runs([experiment])
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    assert not [r for r in runs if r.info.run_name.startswith("evaluate-")]  # the comparison was not logged
    assert [r.info.status for r in runs if r.info.run_name == "index-tiny-search"] == ["FINISHED"]
