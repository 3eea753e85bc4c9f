"""Faults and safe defaults on real local Ray clusters: a training worker killed mid-epoch, the
driver stopped and resumed (both must train exactly as an uninterrupted run), two `gcl train`
processes sharing one SQLite store, credentials kept out of MLflow."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import (
    FAULT_JOB,
    assert_trains_as_uninterrupted,
    free_port,
    ray_local_env,
    start_mlflow_server,
    stop_mlflow_server,
)
from mlflow import MlflowClient

from gcl.tracking.runs import runs_named
from gcl.train.checkpoint import committed_checkpoint

pytestmark = pytest.mark.integration
GCL = os.path.join(os.path.dirname(sys.executable), "gcl")


def _own_local_ray_env() -> dict[str, str]:
    """This environment without RAY_ADDRESS: a `gcl` subprocess starts its own local Ray."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def _run_named(client: MlflowClient, name: str):
    runs = runs_named(client, "gcl", name)
    return runs[0] if runs else None


def _train_workers() -> list[psutil.Process]:
    """The Ray Train workers of this session's cluster (ray_local starts it in this process, so its
    workers descend from it): never another suite's, on a machine that runs two at once."""
    workers = []
    for process in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(process.cmdline()):
                workers.append(process)
        except psutil.NoSuchProcess:
            pass
    return workers


def _steps_per_epoch(reference: dict[int, float]) -> int:
    """The fault job's steps (micro-batches) per epoch, from its uninterrupted run's 3 epochs."""
    return max(reference) // 3


@pytest.mark.slow
def test_worker_killed_mid_epoch_restores_and_trains_as_an_uninterrupted_run(
    ray_local, tiny_job, tmp_path, uninterrupted_losses, step_gates
):
    """A worker is killed 2 steps into epoch 2, while the run is held there (a step gate): Ray
    Train replaces the workers, which restore epoch 1's checkpoint and train on as the
    uninterrupted run."""
    from gcl.train.job import run_train

    job = tiny_job("name=killed", *FAULT_JOB, "train.max_failures=2")
    client = MlflowClient(job.mlflow.resolved_uri())
    held_at = _steps_per_epoch(uninterrupted_losses) + 2
    step_gates.hold("killed", held_at)
    killed = {}

    def kill_a_worker_in_epoch_two():
        deadline = time.time() + 600
        while time.time() < deadline:
            if step_gates.waiting("killed").get("killed") == held_at:
                worker = _train_workers()[0]
                run = _run_named(client, "killed")
                killed["pid"] = worker.pid
                killed["after_step"] = max(m.step for m in client.get_metric_history(run.info.run_id, "train_loss"))
                worker.kill()
                psutil.wait_procs([worker], timeout=60)
                step_gates.hold("killed", None)  # the restored workers train on
                return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_a_worker_in_epoch_two, daemon=True)
    killer.start()
    try:
        result = run_train(job)
    finally:
        step_gates.forget("killed")
    killer.join(timeout=5)
    assert "pid" in killed, "the test never saw the run held in epoch 2"
    assert not psutil.pid_exists(killed["pid"]) or psutil.Process(killed["pid"]).status() == psutil.STATUS_ZOMBIE

    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and result.metrics["epoch"] == 3
    assert_trains_as_uninterrupted(client, result.run_id, uninterrupted_losses)
    epoch_ends = sorted(m.step for m in client.get_metric_history(result.run_id, "train_loss"))
    assert len(epoch_ends) == 3 and epoch_ends[0] == killed["after_step"]


@pytest.mark.slow
def test_two_gcl_train_processes_share_one_sqlite_store_and_keep_credentials_out(tiny_job, tmp_path):
    """Two `gcl train` commands at once (each with its own local Ray) write to one SQLite store and
    both complete; credentials set in their environment appear in no param, tag or artifact.
    The first shows what a person sees by default: a few lines (where the full log is, the progress
    bar's final state, the summary) while its log file holds everything the workers printed; the
    second runs with -v and gets that full stream on the terminal instead."""
    import re

    import yaml

    secret = "gcl-test-secret-3f9c1d"
    env = _own_local_ray_env()
    env.update(MLFLOW_TRACKING_TOKEN=secret, AWS_SECRET_ACCESS_KEY=secret)
    commands = []
    for name, flags in (("first", []), ("second", ["-v"])):
        config = tmp_path / f"{name}.yaml"
        config.write_text(
            yaml.safe_dump(
                tiny_job(f"name={name}", "train.epochs=1", "data.eval={}", "data.validation={}").model_dump(mode="json")
            )
        )
        commands.append(
            subprocess.Popen(
                [GCL, *flags, "train", "-c", str(config)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        )
    # Bytes, decoded here: text mode would turn the bar's \r redraws into newlines.
    quiet, verbose = (process.communicate(timeout=900)[0].decode() for process in commands)
    log_file = Path(quiet.split("\n")[0].removeprefix("full log: "))
    full_log = log_file.read_text()
    for process, output in zip(commands, (full_log, verbose), strict=True):
        assert process.returncode == 0, output[-5000:]
        assert "database is locked" not in output
        assert "(RayTrainWorker pid=" in output  # the workers' own lines, forwarded by Ray
    assert log_file.parent == tmp_path / "runs/first/logs" and "(RayTrainWorker pid=" not in quiet
    # Lines as a terminal shows them (wc -l): the bar redraws its line with \r, which splitlines() splits on.
    assert quiet.count("\n") <= 8, quiet  # the log's path, the bar, the summary
    bars = re.findall(r"training epoch 1/1: 100%\|[^|]*\| (\d+)/(\d+) [^\r\n]*loss=[0-9.]+, pairs/s=\d+", quiet)
    bar = bars[-1] if bars else None  # the final state
    assert bar and bar[0] == bar[1], quiet
    run_line = re.search(r"^run first: MLflow run (\w+)$", quiet, re.M)
    assert run_line and "full log:" not in verbose

    client = MlflowClient(tiny_job().mlflow.resolved_uri())
    assert client.get_run(run_line[1]).data.tags["gcl.run_name"] == "first"
    steps = client.get_metric_history(run_line[1], "loss")
    assert int(bar[0]) == max(m.step for m in steps)  # the bar counted every step trained
    for name in ("first", "second"):
        run = _run_named(client, name)
        assert run.info.status == "FINISHED" and client.get_metric_history(run.info.run_id, "loss")
        assert secret not in json.dumps([run.data.params, run.data.tags])
        out = tmp_path / "artifacts" / name
        client.download_artifacts(run.info.run_id, "", str(out))
        for path in out.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path


def _descendants(process: subprocess.Popen) -> list[psutil.Process]:
    return psutil.Process(process.pid).children(recursive=True)


def _gone(processes: list[psutil.Process], timeout: float = 60) -> list[psutil.Process]:
    """Those of `processes` still alive after `timeout` seconds."""
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    return [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]


def _is_ray_agent(process: psutil.Process) -> bool:
    """Ray's dashboard and runtime-env agents. When the raylet and GCS die at once (the driver that
    started them was SIGKILLed), they notice the raylet's death but first try to report it to the
    dead GCS, which they retry for Ray's 60 s reconnect timeout before exiting."""
    try:
        return process.name().endswith("Agent")
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
def test_sigterm_sigkill_and_a_killed_raylet_each_resume_as_an_uninterrupted_run(
    tiny_job, tmp_path, uninterrupted_losses, step_gates
):
    """One run stopped three ways in a row, the same command each time: SIGTERM to `gcl train`
    (which marks the MLflow run KILLED, as Ctrl-C does) and SIGKILL to its local Ray cluster's
    raylet, both 2 steps into epoch 2, then SIGKILL to `gcl train` 2 steps into epoch 3; each time
    the run is held at that step (a step gate) until the test has stopped it. After each, Ray's
    processes are gone (its agents within two minutes, checked at the end), and the last command
    resumes the same MLflow run from the last committed
    checkpoint and trains exactly as an uninterrupted run, every step logged once. The job is
    ZeRO-1 with train.grad_accum=4 on 5 steps an epoch: each epoch ends on a shorter optimizer
    step, which the resume must reproduce."""
    import yaml

    config = tmp_path / "job.yaml"
    job = tiny_job("name=stopped", *FAULT_JOB, "mlflow.flush_seconds=0.2")
    config.write_text(yaml.safe_dump(job.model_dump(mode="json")))
    command = [GCL, "train", "-c", str(config)]
    env = _own_local_ray_env()
    client = MlflowClient(job.mlflow.resolved_uri())
    run_dir = str(tmp_path / "runs" / "stopped")
    steps_per_epoch = _steps_per_epoch(uninterrupted_losses)

    def committed_epoch() -> int:
        checkpoint = committed_checkpoint(run_dir)
        return checkpoint["metrics"]["epoch"] if checkpoint else 0

    def held_in(epoch: int):
        """Epoch `epoch` is committed and the run waits 2 steps past it."""
        step = epoch * steps_per_epoch + 2
        return lambda: step_gates.waiting("stopped").get("stopped") == step and committed_epoch() >= epoch

    def sigterm(process, _):
        process.send_signal(signal.SIGTERM)

    def sigkill(process, _):
        process.kill()

    def kill_raylet(_, ray_processes):
        next(p for p in ray_processes if p.name() == "raylet").kill()

    stops = [  # what, how, the epoch committed before it, the run's status after it
        ("SIGTERM to gcl train in epoch 2", sigterm, 1, "KILLED"),
        ("SIGKILL to the raylet in epoch 2", kill_raylet, 1, None),
        ("SIGKILL to gcl train in epoch 3", sigkill, 2, "RUNNING"),  # nothing ran to mark it
    ]
    agents = []  # checked at the end: they outlive a SIGKILLed cluster by about a minute
    try:
        for what, how, epoch, status in stops:
            step_gates.forget("stopped")  # the note the last stopped run left
            step_gates.hold("stopped", epoch * steps_per_epoch + 2)
            process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            _wait_for(held_in(epoch), what, process, timeout=600, logs=run_dir)
            ray_processes = _descendants(process)
            how(process, ray_processes)
            assert process.wait(120) != 0, f"{what}: gcl train exited 0"
            assert ray_processes, f"{what}: gcl train had started no Ray processes"
            agents += [p for p in ray_processes if _is_ray_agent(p)]
            core = [p for p in ray_processes if p not in agents]
            assert not _gone(core), f"{what}: Ray processes outlived gcl train"
            assert committed_epoch() == epoch, f"{what}: not stopped in epoch {epoch + 1}"
            if status:
                assert runs_named(client, "gcl", "stopped")[0].info.status == status, what
    finally:
        step_gates.forget("stopped")

    latest = committed_checkpoint(run_dir)["metrics"]
    last = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert last.returncode == 0, last.stdout[-3000:] + last.stderr[-3000:]
    runs = runs_named(client, "gcl", "stopped")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the same run, resumed
    assert_trains_as_uninterrupted(client, runs[0].info.run_id, uninterrupted_losses)
    epoch_ends = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "train_loss"))
    assert len(epoch_ends) == 3 and epoch_ends[-1] == max(uninterrupted_losses)
    assert (  # said on the terminal, and in the command's log
        f"run stopped resumes from its checkpoint at epoch {latest['epoch']}, step {latest['step']}" in last.stdout
    )
    assert not _gone(agents, timeout=120), "Ray's agents outlived their stopped cluster by over 2 minutes"


@pytest.mark.slow
def test_sweep_stopped_by_ctrl_c_mid_trial_resumes_without_running_finished_trials_again(
    ray_local, synth_dir, tmp_path, step_gates
):
    """`gcl tune` (on the session's Ray cluster) gets Ctrl-C (SIGINT to its process group, as a
    terminal sends it) while its second trial trains, held there by a step gate: it stops at once,
    its parent run and the interrupted trial's run KILLED, no trial's workers left training and
    nothing registered; the same command finishes the sweep under the same parent run, and the
    first trial is not run again."""
    import yaml
    from ray.tune import ExperimentAnalysis

    from workflows.cli import CONFIGS

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sweep, sweep_dir = tmp_path / "sweep.yaml", tmp_path / "runs" / "halted"
    sweep.write_text(
        yaml.safe_dump(
            {
                "name": "halted",
                "base": str(CONFIGS / "tiny-cpu.yaml"),
                "search": "random",
                "num_samples": 1,
                "asha": {"enabled": False},  # both trials run every epoch
                "registered_model": "halted-best",
                # One epoch: the second trial is stopped before its first checkpoint either way (resuming
                # from a checkpoint is the gcl train fault tests' part).
                "set": [
                    "train.epochs=1",
                    "train.batch_size=16",
                    "train.warmup_steps=2",
                    f"data.train={synth_dir}/train.parquet",
                    f"data.eval={{in_domain: {synth_dir}/in_domain.parquet}}",
                    f"storage={tmp_path}/runs",
                    f"data.validation={{in_domain: {synth_dir}/val_in_domain.parquet}}",
                    f"mlflow.tracking_uri={uri}",
                ],
                "space": {"loss.left_to_right": {"grid": [1.0, 0.5]}},
            }
        )
    )
    command = [GCL, "tune", "-c", str(sweep)]
    env = ray_local_env()
    client = MlflowClient(uri)

    def trial_runs() -> dict[str, object]:
        """Child run id -> its run."""
        parents = runs_named(client, "gcl", "halted")
        if not parents:
            return {}
        experiment = parents[0].info.experiment_id
        children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
        return {c.info.run_id: c for c in children}

    def trial_epochs() -> dict[str, int]:
        """Child run id -> epochs it has logged."""
        return {run_id: len(client.get_metric_history(run_id, "train_loss")) for run_id in trial_runs()}

    def saved_finished_trials() -> int:
        """Trials that Tune's saved sweep state records as finished (what a resumed sweep skips)."""
        try:
            return sum(t.status == "TERMINATED" for t in ExperimentAnalysis(str(sweep_dir)).trials)
        except (ValueError, FileNotFoundError):  # no state saved yet
            return 0

    step_gates.hold("halted", 2)  # every trial waits after its second step
    out = open(tmp_path / "first.out", "w")  # noqa: SIM115 (closed below, after the process ends)
    first = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(lambda: step_gates.waiting("halted"), "the first trial was held", first, timeout=600, logs=sweep_dir)
        (held,) = step_gates.waiting("halted")
        step_gates.hold(held, None)  # the first trial trains to its end
        _wait_for(
            lambda: (
                sorted(trial_epochs().values()) == [0, 1]
                and set(step_gates.waiting("halted")) - {held}
                and saved_finished_trials() == 1
            ),
            "the second trial was held after the first finished and Tune saved that",
            first,
            timeout=600,
            logs=sweep_dir,
        )
        epochs = trial_epochs()
        done = next(run_id for run_id, n in epochs.items() if n == 1)
        interrupted = next(run_id for run_id, n in epochs.items() if n == 0)
        done_steps = len(client.get_metric_history(done, "loss"))
        os.killpg(first.pid, signal.SIGINT)  # Ctrl-C
        assert first.wait(120) == 130
    finally:
        if first.poll() is None:
            first.kill()
        out.close()
        step_gates.forget("halted")
    said = (tmp_path / "first.out").read_text()
    assert "stopped: `gcl tune` with the same config resumes sweep halted" in said, said[-3000:]
    assert "Traceback" not in said, said[-3000:]
    assert runs_named(client, "gcl", "halted")[0].info.status == "KILLED"
    assert {run_id: run.info.status for run_id, run in trial_runs().items()} == {
        done: "FINISHED",
        interrupted: "KILLED",
    }
    assert not _gone(_train_workers()), "a trial's workers trained on after Ctrl-C"
    assert not client.search_registered_models("name = 'halted-best'")  # a stopped sweep registers nothing

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert len(runs_named(client, "gcl", "halted")) == 1  # the same parent run
    assert runs_named(client, "gcl", "halted")[0].info.status == "FINISHED"
    epochs = trial_epochs()
    assert len(epochs) == 2 and sorted(epochs.values()) == [1, 1]  # both trials complete, no third run
    assert len(client.get_metric_history(done, "loss")) == done_steps  # the finished trial did not run again
    for run_id in epochs:  # the interrupted trial resumed: each step once
        steps = [m.step for m in client.get_metric_history(run_id, "loss")]
        assert sorted(steps) == list(range(1, len(steps) + 1))
    assert client.search_registered_models("name = 'halted-best'")  # the finished sweep registers its best


def test_errors_no_restart_can_fix_fail_the_run_at_once_naming_their_cause(ray_local, tiny_job, synth_dir, tmp_path):
    """An undecodable image that only the pipeline meets (data.validate_images=false), a loss that
    diverges, and a tracking store that lacks the run: each ends training on its first attempt
    with gcl's own error. Had Ray Train restarted the workers (train.max_failures=2), fit would end in its
    WorkerGroupError after the third attempt instead."""
    import pandas as pd

    from gcl.errors import DataError, TrackingError, TrainingError
    from gcl.train.job import fit, prepare, run_train

    pairs = pd.read_parquet(synth_dir / "train.parquet")
    pairs.at[5, "image"] = {"bytes": b"not an image", "path": None}
    pairs.to_parquet(tmp_path / "broken.parquet")
    # One worker: which rank meets the image does not matter here.
    broken = tiny_job(
        "name=broken-image",
        "train.epochs=1",
        "data.eval={}",
        "train.max_failures=2",
        "scaling.num_workers=1",
        f"data.train={tmp_path}/broken.parquet",
        "data.validate_images=false",
    )
    with pytest.raises(DataError, match=rf"pair {int(pairs.at[5, 'pair_id'])}: image cannot be read or decoded"):
        run_train(broken)
    client = MlflowClient(broken.mlflow.resolved_uri())
    run = _run_named(client, "broken-image")
    assert run.info.status == "FAILED" and "image cannot be read" in run.data.tags["gcl.error"]

    # A loss that is no longer a number stops the run at that step, naming the likely causes.
    diverging = tiny_job(
        "name=diverging",
        "train.epochs=1",
        "data.eval={}",
        "train.max_failures=2",
        "scaling.num_workers=1",
        "train.lr=1e30",
        "train.warmup_steps=1",
    )
    with pytest.raises(
        TrainingError, match=r"the loss is (nan|inf) at step [0-9]+: training diverged.*train.lr=1e\+30"
    ):
        run_train(diverging)
    run = _run_named(client, "diverging")
    assert run.info.status == "FAILED" and "training diverged" in run.data.tags["gcl.error"]

    job, report = prepare(
        tiny_job("name=no-run", "train.epochs=1", "data.eval={}", "train.max_failures=2", "scaling.num_workers=1")
    )
    with pytest.raises(TrackingError, match=r"MLflow run f{32} is not in the tracking store"):
        fit(job, report, run_id="f" * 32)


def _wait_for(condition, what: str, process: subprocess.Popen, timeout: float = 300, logs=None) -> None:
    """Poll `condition` until it holds; fail at once if the command exits first, with the end of
    its newest log under `logs` (a run's or sweep's directory), or after `timeout` seconds."""
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None:
            newest = max(Path(logs).glob("logs/*.log"), key=os.path.getmtime, default=None) if logs else None
            said = newest.read_text(errors="replace")[-3000:] if newest else ""
            raise AssertionError(f"the command ended (exit {process.returncode}) before {what}\n{said}")
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.slow
def test_mlflow_server_going_away_mid_run_loses_no_step_and_gcl_sync_finishes_the_run(
    ray_local, tiny_job, tmp_path, step_gates
):
    """A real tracking server is killed twice during `gcl train` (on the session's Ray cluster): the
    first time after step 2, and it comes back while the run is held after step 4 (a step gate),
    so that the buffered metrics are written while training goes on; the second time it stays down
    to the end, so the command exports the model, exits 2 and says to run `gcl sync`, which (with
    the server back) finishes the run. The terminal shows the workers' warnings that the store went
    away and came back; the store then holds every step's loss exactly once."""
    import yaml

    port = free_port()
    server_root = tmp_path / "server"
    server_root.mkdir()
    uri = f"http://127.0.0.1:{port}"
    job = tiny_job(
        "name=outage",
        "train.epochs=2",
        "data.eval={}",
        f"mlflow.tracking_uri={uri}",
        "mlflow.flush_seconds=0.2",
        "mlflow.finish_wait_seconds=3",
    )
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(job.model_dump(mode="json")))
    run_dir = tmp_path / "runs" / "outage"
    spill = run_dir / "tracking_buffer"
    reader = MlflowClient(f"sqlite:///{server_root}/store.db")  # the server's own store, read directly

    def logged_steps() -> list[int]:
        run = _run_named(reader, "outage")
        return [m.step for m in reader.get_metric_history(run.info.run_id, "loss")] if run else []

    def held_after(step: int):
        return lambda: step_gates.waiting("outage").get("outage") == step

    step_gates.hold("outage", 2)
    server = start_mlflow_server(port, server_root)
    train = subprocess.Popen(
        [GCL, "train", "-c", str(config)],
        env=ray_local_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    reading = threading.Thread(target=lambda: output.extend(train.stdout), daemon=True)
    reading.start()
    try:
        _wait_for(held_after(2), "the run was held after step 2", train, logs=run_dir)
        assert logged_steps() == [1, 2]
        stop_mlflow_server(server)  # outage 1
        step_gates.hold("outage", 4)
        _wait_for(held_after(4), "the run was held after step 4", train, logs=run_dir)
        assert any(spill.iterdir()), "steps 3 and 4 were not spilled"
        server = start_mlflow_server(port, server_root)
        _wait_for(
            lambda: not any(spill.iterdir()) and max(logged_steps()) == 4,
            "the spilled metrics were replayed",
            train,
            logs=run_dir,
        )
        stop_mlflow_server(server)  # outage 2: down until training ends
        step_gates.hold("outage", None)
        assert train.wait(timeout=600) == 2
    finally:
        step_gates.forget("outage")
        if train.poll() is None:
            train.kill()
        if server.poll() is None:
            stop_mlflow_server(server)
    reading.join(timeout=60)  # the rest of the output, up to the end of the stream
    assert not reading.is_alive()
    text = "".join(output)
    assert "training finished and its model is in" in text and "`gcl sync`" in text, text[-5000:]
    # The workers' warnings, on the terminal once each (gcl.train.progress relays them).
    assert text.count("warning: MLflow tracking store unreachable (") == 1, text[-5000:]
    assert text.count("warning: MLflow tracking store answers again") == 1, text[-5000:]
    assert (tmp_path / "runs" / "outage" / "model" / "open_clip_config.json").is_file()

    server = start_mlflow_server(port, server_root)
    try:
        sync = subprocess.run([GCL, "sync", "-c", str(config)], capture_output=True, text=True, timeout=300)
        assert sync.returncode == 0, sync.stdout[-3000:] + sync.stderr[-3000:]
        again = subprocess.run([GCL, "sync", "-c", str(config)], capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]  # idempotent: nothing written twice
        assert "logged to MLflow: " in sync.stdout and "the model" in sync.stdout, sync.stdout
        assert "nothing to log: MLflow has it all" in again.stdout, again.stdout
    finally:
        stop_mlflow_server(server)
    run = _run_named(reader, "outage")
    assert run.info.status == "FINISHED" and "gcl.model_uri" in run.data.tags
    history = reader.get_metric_history(run.info.run_id, "loss")
    steps = sorted(m.step for m in history)
    total = max(m.step for m in reader.get_metric_history(run.info.run_id, "train_loss"))
    assert steps == list(range(1, total + 1)), "a step is missing or logged twice"
    assert not any(spill.iterdir())
