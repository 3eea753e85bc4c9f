"""`gcl tune`: sweep configs are checked before any trial; a real sweep on local Ray with MLflow
parent/child runs, a failing trial that fails alone, resume, and champion/challenger gating."""

import json
import os

import pytest
import yaml
from mlflow import MlflowClient

from gcl.config import ConfigError
from gcl.train.job import job_resources
from gcl.tune.sweep import Domain, load_sweep, trial_concurrency, trial_overrides
from workflows.cli import CONFIGS


def _sweep_file(tmp_path, **fields) -> str:
    sweep = {
        "name": "s",
        "base": str(CONFIGS / "tiny-cpu.yaml"),
        "space": {"loss.left_to_right": {"uniform": [0, 1]}},
    }
    sweep.update(fields)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return str(path)


@pytest.mark.parametrize(
    ("domain", "message"),
    [
        ({}, "exactly one"),
        ({"uniform": [0, 1], "choice": [1]}, "exactly one"),
        ({"uniform": [1, 0]}, "low must be below high"),
        ({"loguniform": [0, 1]}, "low must be > 0"),
        ({"grid": []}, "at least one value"),
    ],
)
def test_bad_search_domains_are_rejected(domain, message):
    with pytest.raises(ValueError, match=message):
        Domain.model_validate(domain)


def test_sweep_keys_are_checked_against_the_base_job_before_any_trial(tmp_path):
    path = _sweep_file(tmp_path, space={"loss.left_to_rigth": {"uniform": [0, 1]}})
    with pytest.raises(ConfigError, match=r"space.loss.left_to_rigth.*did you mean 'loss.left_to_right'"):
        load_sweep(path)
    path = _sweep_file(tmp_path, space={"loss.weight_fn": {"grid": ["linear", "power"]}})
    with pytest.raises(ConfigError, match="need search: random"):
        load_sweep(path)
    with pytest.raises(ConfigError, match="data.eval is empty"):
        load_sweep(_sweep_file(tmp_path), ['set=["data.eval={}"]'])
    with pytest.raises(ConfigError, match="space is empty"):
        load_sweep(_sweep_file(tmp_path, space={}))


def test_sampled_values_become_validated_overrides(tmp_path):
    from gcl.tune.tuner import trial_job

    sweep, job = load_sweep(_sweep_file(tmp_path))
    params = {
        "loss.left_to_right": 0.25,
        "loss.weight_fn": "power",
        "train.lr": 1e-3,
        "loss.mask_same_query": False,
    }
    assert trial_overrides(params)[1] == 'loss.weight_fn="power"'
    trial = trial_job(job.model_dump(mode="json"), params, "s-0")
    assert (trial.loss.left_to_right, trial.loss.weight_fn, trial.train.lr, trial.loss.mask_same_query) == (
        0.25,
        "power",
        1e-3,
        False,
    )
    with pytest.raises(ConfigError, match=r"trial s-1.*loss.left_to_right"):
        trial_job(job.model_dump(mode="json"), {"loss.left_to_right": -1.0}, "s-1")


def test_trial_concurrency_follows_the_cluster_and_the_job_scaling(tmp_path):
    _, job = load_sweep(_sweep_file(tmp_path))
    per_trial = job_resources(job)["CPU"]  # workers + preprocessing tasks + Ray Data's read
    assert per_trial == pytest.approx(
        job.scaling.num_workers * job.scaling.cpus_per_worker + job.pipeline.cpus_per_task + 1.0
    )
    assert trial_concurrency({"CPU": 2.0}, job, None) == 1
    assert trial_concurrency({"CPU": 4 * per_trial + 0.5}, job, None) == 4
    assert trial_concurrency({"CPU": 1.0}, job, None) == 1  # never 0: the trial waits for resources
    assert trial_concurrency({"CPU": 64.0}, job, 3) == 3
    _, gpu_job = load_sweep(_sweep_file(tmp_path), ['set=["scaling.use_gpu=true", "scaling.num_workers=4"]'])
    assert trial_concurrency({"CPU": 64.0, "GPU": 8.0}, gpu_job, None) == 2


def test_trials_tune_stopped_are_finished_in_mlflow_and_only_errored_trials_stay_failed(tmp_path):
    """Tune stops a trial by removing its resources; its driver may see the Train controller die
    first and mark its run failed (a race seen in CI). Tune's verdict wins when the sweep ends."""
    from gcl.tune.tuner import close_child_runs

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.create_experiment("e")
    parent = client.create_run(experiment).info.run_id

    def child(trial: str, status: str, error: str | None = None) -> str:
        tags = {"mlflow.parentRunId": parent, "gcl.trial_id": trial}
        if error:
            tags["gcl.error"] = error
        run_id = client.create_run(experiment, tags=tags).info.run_id
        if status != "RUNNING":
            client.set_terminated(run_id, status)
        return run_id

    runs = {
        "cut_killed": child("cut_killed", "RUNNING"),
        "cut_raced": child("cut_raced", "FAILED", "ActorDiedError: TrainController died"),
        "last_epoch": child("last_epoch", "RUNNING"),
        "errored": child("errored", "FAILED", "ConfigError: bad weight"),
        "finished": child("finished", "FINISHED"),
    }
    rows = [
        {"trial": "cut_killed", "epochs": 1, "status": "OK"},
        {"trial": "cut_raced", "epochs": 1, "status": "OK"},
        {"trial": "last_epoch", "epochs": 3, "status": "OK"},
        {"trial": "errored", "epochs": None, "status": "ERROR"},
        {"trial": "finished", "epochs": 3, "status": "OK"},
    ]
    close_child_runs(client, "e", parent, rows, epochs=3)

    after = {trial: client.get_run(run_id) for trial, run_id in runs.items()}
    status = {trial: run.info.status for trial, run in after.items()}
    assert status == {
        "cut_killed": "FINISHED",
        "cut_raced": "FINISHED",
        "last_epoch": "FINISHED",
        "errored": "FAILED",
        "finished": "FINISHED",
    }
    early = {trial for trial, run in after.items() if run.data.tags.get("gcl.stopped_early") == "true"}
    assert early == {"cut_killed", "cut_raced"}
    assert "gcl.error" not in after["cut_raced"].data.tags
    assert after["errored"].data.tags["gcl.error"] == "ConfigError: bad weight"


@pytest.mark.integration
def test_sweep_runs_fails_one_trial_alone_registers_the_best_and_resumes(ray_local, synth_dir, tmp_path, monkeypatch):
    """On the embedded default tracking store, as a newcomer runs it: no tracking URI in the config
    or the environment, so the sweep's ./mlruns.db is the one every trial must log to (each trial
    runs in a directory of its own, where that default would name another, empty store)."""
    from workflows.tune import run_tune

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    data = synth_dir
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    path = _sweep_file(
        tmp_path,
        name="sw",
        search="random",
        num_samples=1,
        registered_model="sw-model",
        set=[
            "train.epochs=1",
            "train.batch_size=16",
            "train.warmup_steps=2",
            "scaling.num_workers=1",  # what a sweep does, not how a trial shards (test_train.py)
            f"data.train={data}/train.parquet",
            f"data.eval={{in_domain: {data}/in_domain.parquet, zero_shot: {data}/zero_shot.parquet}}",
            f"data.validation={{in_domain: {data}/val_in_domain.parquet, zero_shot: {data}/val_zero_shot.parquet}}",
            "storage=runs",
        ],
        space={"loss.left_to_right": {"grid": [1.0, 0.5, -1.0]}},  # -1: an invalid weight
    )
    result = run_tune(path)
    # MLflow's set_tracking_uri exports MLFLOW_TRACKING_URI: a later job in this process must not
    # inherit the sweep's store as its default (the demo's runs went to this test's store).
    assert "MLFLOW_TRACKING_URI" not in os.environ

    by_value = {row["params"]["loss.left_to_right"]: row for row in result.trials}
    assert set(by_value) == {1.0, 0.5, -1.0}
    assert by_value[-1.0]["status"] == "ERROR" and "left_to_right" in by_value[-1.0]["error"]
    assert {by_value[v]["status"] for v in (1.0, 0.5)} == {"OK"}
    assert result.best["objective"] == max(by_value[v]["objective"] for v in (1.0, 0.5))

    client = MlflowClient(uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["best_objective"] == result.best["objective"]
    assert {"trials.json", "trials.png"} <= {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert (tmp_path / "runs/sw/trials.png").stat().st_size > 10_000
    experiment = parent.info.experiment_id
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    assert len(children) == 3
    failed = [c for c in children if c.info.status == "FAILED"]
    assert len(failed) == 1 and "loss.left_to_right" in failed[0].data.tags["gcl.error"]
    for child in children:
        if child.info.status != "FAILED":  # the sampled value is a param; per-split metrics per epoch
            assert child.data.params["loss.left_to_right"] in ("1.0", "0.5")
            assert "in_domain/ndcg_at_10" in child.data.metrics and "zero_shot/ndcg_at_10" in child.data.metrics
            history = client.get_metric_history(child.info.run_id, "objective")
            assert [m.step for m in history] == sorted(m.step for m in history) and history
            # Selected on validation, the test splits reported beside it.
            metrics = child.data.metrics
            on = {
                kind: [metrics[f"{prefix}{s}/ndcg_at_10"] for s in ("in_domain", "zero_shot")]
                for kind, prefix in (("validation", "validation/"), ("test", ""))
            }
            assert metrics["objective"] == pytest.approx(sum(on["validation"]) / 2)
            assert metrics["test_objective"] == pytest.approx(sum(on["test"]) / 2)
            assert metrics["objective"] != metrics["test_objective"]
    row = next(r for r in result.trials if r["trial"] == result.best["trial"])
    assert row["test_objective"] == pytest.approx(client.get_run(result.best["run_id"]).data.metrics["test_objective"])

    # The best trial's model is registered as champion, with its provenance as tags.
    version, alias = result.registered
    assert alias == "champion"
    registered = client.get_model_version_by_alias("sw-model", "champion")
    assert registered.version == version and registered.tags["run_id"] == result.best["run_id"]
    assert json.loads(registered.tags["loss"])["left_to_right"] == result.best["params"]["loss.left_to_right"]
    manifest = json.loads(registered.tags["dataset_manifest"])
    splits = {"in_domain", "zero_shot"}
    assert set(manifest) == {"train", *splits, *(f"validation/{s}" for s in splits)} and all(
        len(h) == 64 for h in manifest.values()
    )
    assert float(registered.tags["gcl.objective"]) == pytest.approx(result.best["objective"])
    assert "| validation data {" in registered.tags["gcl.objective_key"]  # the champion gate: on validation

    # Re-running the finished sweep resumes it: no trial runs again, nothing is registered twice.
    again = run_tune(path)
    assert again.parent_run_id == result.parent_run_id and again.registered == (version, "champion")
    assert len(client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")) == 3
    assert len(client.search_model_versions("name = 'sw-model'")) == 1

    # Gating: a lower objective, or one scored on other data, never takes the champion alias.
    from gcl.registry.models import OBJECTIVE_KEY_TAG, register_version

    model_uri = client.get_run(result.best["run_id"]).data.tags["gcl.model_uri"]
    key = registered.tags[OBJECTIVE_KEY_TAG]
    assert (
        register_version(model_uri, "sw-model", result.best["objective"] - 0.1, uri, objective_key=key)[1]
        == "challenger"
    )
    assert register_version(model_uri, "sw-model", 2.0, uri, objective_key=key + " other data")[1] == "challenger"
    assert client.get_model_version_by_alias("sw-model", "champion").version == version
    better = register_version(model_uri, "sw-model", result.best["objective"] + 0.1, uri, objective_key=key)
    assert better[1] == "champion" and client.get_model_version_by_alias("sw-model", "champion").version == better[0]


def test_the_trial_table_marks_objectives_measured_on_a_sample():
    from gcl.tune.tuner import trial_table

    row = {"params": {"loss.temperature": 0.07}, "epochs": 1, "test_objective": 0.2, "status": "OK", "error": None}
    table = trial_table(
        [
            {**row, "trial": "full", "objective": 0.5, "sampled_queries": 0},
            {**row, "trial": "cut", "objective": 0.3, "sampled_queries": 2000},
        ]
    )
    assert "| 0.5000 |" in table and "| 0.3000* | 0.2000* |" in table
    assert table.endswith("* on a sample of 2000 queries per split (eval.sample_queries)")


def _scored_by_the_sampled_value(config: dict, objective_splits: list[str]) -> None:
    """A Tune trainable that reports what an epoch's evaluation would, without training: NDCG@10
    per validation split as a function of the sampled x (in_domain rises with x, zero_shot falls
    with it, the mean over both rises), scored into the objective by gcl's own evaluation_metrics."""
    from ray import tune

    from gcl.config import parse_config
    from gcl.job_config import JobConfig
    from gcl.train.worker import evaluation_metrics

    job = parse_config(JobConfig, CONFIGS / "tiny-cpu.yaml", [f"eval.objective_splits={objective_splits}"])
    x = config["loss.left_to_right"]
    measure = job.eval.objective
    validation = {"in_domain": {measure: x}, "zero_shot": {measure: 0.6 * (1 - x)}}
    tune.report({**evaluation_metrics(validation, validation, job), "epoch": 1})


@pytest.mark.integration
def test_optuna_samples_the_space_and_objective_splits_choose_their_own_best_trial(ray_local, tmp_path):
    """The sweep's default search (Optuna, seeded) on real Ray Tune samples distinct values inside
    the domain, the same ones again for the same seed; ranking those trials on
    eval.objective_splits=[zero_shot] picks another best trial than the mean over all splits."""
    from ray import tune

    from gcl.config import parse_config
    from gcl.job_config import JobConfig
    from gcl.tune.sweep import SweepConfig
    from gcl.tune.tuner import build_tuner, trial_rows

    job = parse_config(JobConfig, CONFIGS / "tiny-cpu.yaml", [f"storage={tmp_path}"])
    best, sampled = {}, {}
    for splits in ([], ["zero_shot"]):
        sweep = SweepConfig(
            name=f"optuna-{len(splits)}",
            num_samples=4,
            asha={"enabled": False},
            space={"loss.left_to_right": {"uniform": [0.2, 0.9]}},
        )
        assert sweep.search == "optuna"
        trainable = tune.with_resources(
            tune.with_parameters(_scored_by_the_sampled_value, objective_splits=splits), {"CPU": 0.5}
        )
        rows = trial_rows(build_tuner(sweep, job, trainable, concurrency=1).fit(), sweep)
        assert all(r["status"] == "OK" for r in rows) and len(rows) == 4
        sampled[len(splits)] = sorted(r["params"]["loss.left_to_right"] for r in rows)
        best[len(splits)] = rows[0]["params"]["loss.left_to_right"]

    values = sampled[0]
    assert all(0.2 <= v <= 0.9 for v in values) and len(set(values)) == 4
    assert sampled[1] == values  # the search's seed decides the samples
    assert best[0] == max(values) and best[1] == min(values)


def _epoch_results(config: dict) -> None:
    """A Ray Train worker's loop that reports three epochs whose objective is the sampled x."""
    import time

    import ray.train

    for epoch in (1, 2, 3):
        time.sleep(1)
        ray.train.report({"objective": config["x"], "epoch": epoch})


def _trial_on_ray_train(config: dict, storage: str) -> None:
    """A trial as gcl's trial driver runs one: a Ray Train run (one worker) whose reports reach
    Tune through TuneReportCallback. Tune cannot interrupt the run of a trial it stops."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    TorchTrainer(
        _epoch_results,
        train_loop_config={"x": config["loss.left_to_right"]},
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.25}),
        run_config=RunConfig(storage_path=storage, callbacks=[TuneReportCallback()]),
    ).fit()


@pytest.mark.slow
def test_a_trial_asha_stops_ends_with_its_process_and_the_sweep_goes_on(ray_local, tmp_path):
    """ASHA stops the second trial after its first epoch (below the first trial's result) and the
    third after its second, while their Ray Train runs go on: Tune's queue for a trial's results
    holds one, so a stopped run's second report after the stop waits for good. Reusing such a
    trial's process for the next trial failed, and the sweep hung, the next trial waiting for
    good. Under ASHA each trial has a process of its own, which ends with the trial, and its Ray
    Train run with it."""
    import threading

    from ray import tune

    from gcl.config import parse_config
    from gcl.job_config import JobConfig
    from gcl.tune.sweep import SweepConfig
    from gcl.tune.tuner import build_tuner, trial_rows

    job = parse_config(JobConfig, CONFIGS / "tiny-cpu.yaml", [f"storage={tmp_path}", "train.epochs=3"])
    sweep = SweepConfig(
        name="asha-stop",
        search="random",
        num_samples=1,
        asha={"grace_period": 1, "reduction_factor": 2},
        space={"loss.left_to_right": {"grid": [0.9, 0.1, 0.5]}},
    )
    trainable = tune.with_resources(tune.with_parameters(_trial_on_ray_train, storage=str(tmp_path)), {"CPU": 0.25})
    fitted = {}
    sweeping = threading.Thread(
        target=lambda: fitted.update(grid=build_tuner(sweep, job, trainable, 1).fit()), daemon=True
    )
    sweeping.start()
    sweeping.join(600)  # bounds a hang: three trials of 1-second epochs take about a minute
    assert "grid" in fitted, "the sweep did not finish after ASHA stopped a trial"
    rows = {row["params"]["loss.left_to_right"]: row for row in trial_rows(fitted["grid"], sweep)}
    assert {x: (row["status"], row["epochs"]) for x, row in rows.items()} == {
        0.9: ("OK", 3),
        0.1: ("OK", 1),
        0.5: ("OK", 2),
    }


@pytest.mark.integration
def test_placement_groups_left_by_stopped_trials_are_released_and_no_other(ray_local):
    """A trial Tune stops leaves its Ray Train workers' placement group reserved for as long as the
    sweep runs (twelve towers trials on 2 cores hung the next one). As each trial ends the sweep
    removes the created groups no actor has used for a while: not one whose actor runs, nor one still
    pending, nor one made a moment ago (a starting trial's, before its workers are placed)."""
    import ray
    from ray.util import placement_group, placement_group_table, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from gcl.tune.tuner import release_idle_placement_groups

    left = placement_group([{"CPU": 0.25}, {"CPU": 0.25}])
    used = placement_group([{"CPU": 0.25}])
    ray.get([left.ready(), used.ready()])
    pending = placement_group([{"CPU": 64}])  # more than the cluster has: never created

    @ray.remote(num_cpus=0.25)
    class Worker:
        def ping(self):
            return "alive"

    worker = Worker.options(scheduling_strategy=PlacementGroupSchedulingStrategy(used)).remote()
    assert ray.get(worker.ping.remote()) == "alive"
    try:
        idle_since = {}
        assert release_idle_placement_groups(idle_since, idle_for_s=3600) == 0  # just made: spared
        assert left.id.hex() in idle_since and used.id.hex() not in idle_since
        # At least `left`: a group an earlier test's run left idle on the session's cluster goes too.
        assert release_idle_placement_groups(idle_since, idle_for_s=0) >= 1
        states = placement_group_table()
        assert states[left.id.hex()]["state"] == "REMOVED" and states[used.id.hex()]["state"] == "CREATED"
        assert states[pending.id.hex()]["state"] == "PENDING" and ray.get(worker.ping.remote()) == "alive"
    finally:
        ray.kill(worker)
        for group in (used, pending):
            remove_placement_group(group)
