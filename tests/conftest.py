import contextlib
import functools
import os
import socket
from pathlib import Path

import pytest
import torch

# Two cores: keep torch from oversubscribing them in tests.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class StepGates:
    """The session's directory of training step gates (gcl.train.step_gate, a test-only seam): a fault
    test holds a training at a step of its choosing and knows when it is held there, so that the
    fault lands while the run trains, whatever the relative speed of the test and the training.
    Every process of the session, and the Ray clusters it starts, get GCL_TEST_STEP_GATE."""

    def __init__(self, directory):
        self.directory = directory

    def hold(self, prefix: str, step: int | None) -> None:
        """Trainings whose name starts with `prefix` run through `step`, then wait (None: run on)."""
        (self.directory / f"{prefix}.gate").write_text("none" if step is None else str(step))

    def fail(self, prefix: str, step: int) -> None:
        """Trainings whose name starts with `prefix` run through `step`, then fail (rank 0 raises)."""
        (self.directory / f"{prefix}.gate").write_text(f"fail {step}")

    def forget(self, prefix: str) -> None:
        """Drop the gates of `prefix` (and of names that start with it) and the notes of the runs
        they held (a killed run leaves its note)."""
        for path in [*self.directory.glob(f"{prefix}*.gate"), *self.directory.glob(f"{prefix}*.waiting")]:
            path.unlink(missing_ok=True)

    def waiting(self, prefix: str = "") -> dict[str, int]:
        """The runs (name -> step) held at a gate now, of those whose name starts with `prefix`."""
        notes = {}
        for note in self.directory.glob(f"{prefix}*.waiting"):
            # Released as we looked, or still being written: not waiting there.
            with contextlib.suppress(FileNotFoundError, ValueError):
                notes[note.name.removesuffix(".waiting")] = int(note.read_text())
        return notes


@pytest.fixture(scope="session")
def step_gates(tmp_path_factory) -> StepGates:
    from gcl.train.step_gate import ENV

    directory = tmp_path_factory.mktemp("step-gates")
    os.environ[ENV] = str(directory)  # before any Ray cluster of the session starts: its workers inherit it
    return StepGates(directory)


# Ray's system setting (read from the environment as RAY_<name>): how long a pooled worker beyond
# num_cpus may stay idle before Ray kills it (1 s by default).
IDLE_WORKER_SECONDS = "RAY_idle_worker_killing_time_threshold_ms"


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory, step_gates):
    """A real local Ray cluster for the session, bound to 127.0.0.1, 2 logical CPUs."""
    import ray

    from gcl.cluster import init_ray

    # Ray workers unpickle test functions by module name: let them import tests/.
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")]))
    # This one cluster runs the session's Ray jobs back to back, several in a test. Ray kills the
    # pooled workers idle beyond num_cpus (2) after a second, so each job started and imported its
    # task workers afresh: a Ray Data groupby over 300 rows took 7 s, 2 s with them kept 15 s. Not
    # longer: an idle worker costs about 2.5% of a core. Read by the raylet as it starts; not
    # passed on to the commands tests start with a cluster of their own.
    with pytest.MonkeyPatch.context() as env:  # restores a value the developer had set
        env.setenv(IDLE_WORKER_SECONDS, "15000")
        init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


def ray_local_env() -> dict[str, str]:
    """This environment with RAY_ADDRESS set to the session's cluster (ray_local), for a `gcl`
    command to run its work there rather than start a cluster of its own."""
    import ray

    return {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """A small synthetic benchmark (train + evaluation splits), generated once per session."""
    from gcl.data.synth import SynthConfig, synthesize

    out = tmp_path_factory.mktemp("data")
    synthesize(out, SynthConfig(products=160, queries=60, docs_per_query=6, seed=2))
    return out


@functools.cache
def _store_template() -> Path:
    """A SQLite MLflow store as MLflow creates it, made once per session (mlflow_store copies it)."""
    import tempfile

    from mlflow import MlflowClient

    template = Path(tempfile.mkdtemp(prefix="gcl-test-store-")) / "template.db"
    MlflowClient(f"sqlite:///{template}").search_experiments()  # creates the tables
    return template


def mlflow_store(root, name: str = "mlflow.db") -> str:
    """The URI of a new SQLite MLflow store at root/name, copied from one MLflow created once this
    session: creating a store runs MLflow's schema migrations, about 2-3 s each time, and a dozen
    tests of the default tier each want a store of their own. (The tests of a store gcl creates
    itself, the demo's, a sweep's and the README's, do not take this.)"""
    import shutil

    target = Path(root) / name
    if not target.exists():
        shutil.copyfile(_store_template(), target)
    return f"sqlite:///{target}"


def tiny_job_config(synth_dir, root, *overrides, config: str = "tiny-cpu.yaml"):
    """The tiny CPU job on `synth_dir` (or another shipped `config`: minilm-efflite0.yaml, the
    pretrained towers), storing runs and MLflow under `root`, plus overrides."""
    from gcl.config import parse_config
    from gcl.job_config import JobConfig
    from workflows.cli import CONFIGS

    return parse_config(
        JobConfig,
        CONFIGS / config,
        [
            f"data.train={synth_dir}/train.parquet",
            f"data.eval={{in_domain: {synth_dir}/in_domain.parquet, zero_shot: {synth_dir}/zero_shot.parquet}}",
            f"data.validation={{in_domain: {synth_dir}/val_in_domain.parquet}}",  # one split: evaluation costs
            f"storage={root}/runs",
            f"mlflow.tracking_uri={mlflow_store(root)}",
            "train.batch_size=16",
            "train.epochs=2",
            "train.warmup_steps=2",
            *overrides,
        ],
    )


@pytest.fixture
def tiny_job(synth_dir, tmp_path):
    """Makes the tiny CPU job (tiny_job_config) under tmp_path."""
    return lambda *overrides: tiny_job_config(synth_dir, tmp_path, *overrides)


def register_tiny_model(root, uri: str | None = None) -> str:
    """A randomly initialised tiny model logged as gcl's pyfunc under `root` and registered as
    tiny@champion in a SQLite store there, or in the tracking server at `uri` (no training: for
    tests of what reads a registry). Returns the tracking URI."""
    import json

    import mlflow
    from mlflow import MlflowClient

    from gcl.config import FieldsConfig
    from gcl.model import ModelConfig, create_model, save_model
    from gcl.registry.models import log_embedding_model
    from gcl.tracking.runs import fluent_tracking_uri

    torch.manual_seed(0)
    tiny = create_model(ModelConfig(arch="gcl-tiny"))
    out = save_model(tiny.clip, tiny.model_cfg, root / "model")
    (out / "gcl_fields.json").write_text(json.dumps(FieldsConfig().model_dump()))
    client = MlflowClient(uri or mlflow_store(root))
    # A server keeps the artifacts it is given (mlflow-artifacts:); a SQLite store, under root.
    experiment = client.create_experiment("gcl", artifact_location=None if uri else str(root / "artifacts"))
    uri = uri or mlflow_store(root)
    run = client.create_run(experiment)
    model_uri = log_embedding_model(run.info.run_id, str(out), uri)
    client.set_terminated(run.info.run_id, "FINISHED")
    with fluent_tracking_uri(uri):
        version = mlflow.register_model(model_uri, "tiny").version
    client.set_registered_model_alias("tiny", "champion", version)
    return uri


def write_embeddings(
    directory, vectors, ids, extra: dict | None = None, files: int = 2, model_uri: str = "models:/m/1"
) -> str:
    """Embeddings as `gcl embed` writes them: id, fixed-size float32 vectors, gcl metadata naming
    `model_uri`, and `extra` columns, in `files` parquet files."""
    import json

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gcl.search.batch_embed import EMBEDDING_COLUMN, METADATA_KEY, SUMMARY_FILE

    os.makedirs(directory, exist_ok=True)
    vectors = np.asarray(vectors)
    meta = json.dumps(
        {
            "model_uri": model_uri,
            "model_version": "1",
            "side": "right",
            "dim": vectors.shape[1],
            "id_column": "product_id",
        }
    ).encode()
    for part, rows in enumerate(np.array_split(np.arange(len(vectors)), files)):
        flat = pa.array(vectors[rows].reshape(-1).astype(np.float32))
        table = pa.table(
            {
                "product_id": pa.array(np.asarray(ids)[rows]),
                EMBEDDING_COLUMN: pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]),
                **{k: pa.array(np.asarray(v)[rows]) for k, v in (extra or {}).items()},
            }
        )
        pq.write_table(table.replace_schema_metadata({METADATA_KEY: meta}), f"{directory}/part-{part}.parquet")
    summary = {**json.loads(meta), "rows": len(vectors)}  # written last, as gcl embed does: the output is whole
    (Path(directory) / SUMMARY_FILE).write_text(json.dumps(summary))
    return str(directory)


def wait_until_answers(
    url: str, process, what: str, timeout: float = 180, headers: dict | None = None, log=None
) -> None:
    """Poll `url` until it answers with a success; fail at once, with the process's output (piped,
    or the end of its `log` file), if `process` exits first, or after `timeout` seconds."""
    import time
    import urllib.request

    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5)
            return
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                process.kill()
                output = process.stdout.read() if process.stdout else ""
                if log is not None and os.path.exists(log):
                    output += Path(log).read_text(errors="replace")[-5000:]
                pytest.fail(
                    f"{what} did not come up ({'exited' if process.poll() is not None else 'timed out'}):\n{output}"
                )
            time.sleep(0.5)


def start_mlflow_server(port: int, root):
    """A real `mlflow server` on 127.0.0.1:`port`, its store and artifacts under `root` (a restart
    on the same port finds the same runs); returns its process, started in a session of its own."""
    import subprocess
    import sys

    command = [
        os.path.join(os.path.dirname(sys.executable), "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{root}/store.db",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--workers",
        "1",
    ]
    env = {
        **os.environ,
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
        # Without MLflow's job runner (huey consumers: its GenAI jobs, which gcl never asks for), a
        # start costs a few CPU-seconds less on a 2-core machine.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    log = root / "server.log"  # each start's output, appended: a failed start shows why
    with open(log, "a") as out:
        server = subprocess.Popen(
            command, env=env, cwd=root, start_new_session=True, stdout=out, stderr=subprocess.STDOUT
        )
    # A bound on a hang only: on a loaded machine a restart took over 120 s once.
    wait_until_answers(f"http://127.0.0.1:{port}/health", server, "mlflow server", timeout=600, log=log)
    return server


def stop_mlflow_server(server) -> None:
    """Kill the server and its uvicorn workers at once, as a crash would."""
    import signal

    os.killpg(server.pid, signal.SIGKILL)
    server.wait(timeout=30)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served_model(model_uri: str, tracking_uri: str, cwd):
    """`mlflow models serve` of `model_uri` (from `tracking_uri`) on a free loopback port, in this
    environment (--env-manager local), once it answers /ping: yields the port."""
    import subprocess
    import sys

    port = free_port()
    venv_bin = os.path.dirname(sys.executable)  # mlflow runs `uvicorn` from PATH
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
    }
    server = subprocess.Popen(
        [
            os.path.join(venv_bin, "mlflow"),
            "models",
            "serve",
            "-m",
            model_uri,
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until_answers(f"http://127.0.0.1:{port}/ping", server, "mlflow models serve", timeout=120)
        yield port
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="session")
def tiny():
    """gcl-tiny from random weights (seed 0), its logit scale at temperature 0.05: the model the
    model, checkpoint, embedding-model and evaluate tests share."""
    from gcl.model import ModelConfig, create_model

    torch.manual_seed(0)
    return create_model(ModelConfig(arch="gcl-tiny"), init_temperature=0.05)


# What the interrupted runs and their reference share: ZeRO-1, and 5 steps an epoch (184 pairs,
# 2 workers, batch 16: full batches only) in optimizer steps of 4 and 1 micro-batches, each micro-batch a
# cached-gradient step of 2 chunks (train.embed_chunk): resume restores those too.
FAULT_JOB = ("train.epochs=3", "data.eval={}", "deepspeed.zero_stage=1", "train.grad_accum=4", "train.embed_chunk=8")


@pytest.fixture(scope="session")
def uninterrupted_losses(ray_local, synth_dir, tmp_path_factory) -> dict[int, float]:
    """Per-step training losses of the fault tests' job run once without interruption."""
    from mlflow import MlflowClient

    from gcl.train.job import run_train

    job = tiny_job_config(synth_dir, tmp_path_factory.mktemp("reference"), "name=reference", *FAULT_JOB)
    result = run_train(job)
    client = MlflowClient(job.mlflow.resolved_uri())
    return {m.step: m.value for m in client.get_metric_history(result.run_id, "loss")}


def assert_trains_as_uninterrupted(client, run_id: str, reference: dict[int, float]) -> None:
    """The same steps as the uninterrupted run, each once, with the same losses (within 1e-5):
    data order, model, optimizer and schedule were all restored."""
    history = client.get_metric_history(run_id, "loss")
    losses = {m.step: m.value for m in history}
    assert len(history) == len(losses), "a step was logged twice"
    assert sorted(losses) == sorted(reference), "not the uninterrupted run's steps"
    worst = max(abs(losses[step] - reference[step]) for step in reference)
    assert worst <= 1e-5, f"per-step losses differ from the uninterrupted run's by up to {worst:.2e}"
