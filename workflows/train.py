"""`gcl train`: validate the data, then fine-tune with Ray Train workers running DeepSpeed,
evaluate every epoch, track everything in MLflow and export the model."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass

import yaml

from gcl.job_config import JobConfig

log = logging.getLogger("gcl.train")


@dataclass
class TrainResult:
    """What a finished training run produced."""

    run_id: str
    model_dir: str
    metrics: dict


def flatten(prefix: str, value, out: dict) -> dict:
    """Nested config -> {'section.key': value} for MLflow params."""
    if isinstance(value, dict):
        for k, v in value.items():
            flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = json.dumps(value) if isinstance(value, list | tuple) else value
    return out


def check_tracking(uri: str) -> None:
    """Fail fast, before any training, if the MLflow tracking store cannot be reached."""
    from mlflow import MlflowClient

    # One quick try: the client's default retries back off for minutes on a wrong URI.
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as err:
        raise SystemExit(
            f"MLflow tracking store {uri!r} is not reachable: {type(err).__name__}: {err}"
        ) from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def validate_data(job: JobConfig):
    """Validate the training and evaluation data; returns the training report."""
    from gcl.data.validate import validate_pairs

    min_score = 1.0 if job.loss.weight_fn == "reciprocal" else 0.0
    report = validate_pairs(job.data.train, job.data, job.fields, job.loss.weight_key, min_score=min_score)
    log.info("training data %s: %s", job.data.train, report.summary())
    strict = job.data.model_copy(update={"on_bad_rows": "error"})  # evaluation data is never trimmed
    for spec in job.data.eval.values():
        validate_pairs(spec, strict, job.fields, job.eval.grade_column)
    return report


def start_run(job: JobConfig, uri: str) -> str:
    """The MLflow run for this job: an unfinished run of the same name is resumed."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    experiment = mlflow.set_experiment(job.mlflow.experiment)
    runs = mlflow.search_runs([experiment.experiment_id], filter_string=f"tags.`gcl.run_name` = '{job.name}'",
                              order_by=["start_time DESC"], max_results=1, output_format="list")  # fmt: skip
    if runs and runs[0].info.status != "FINISHED":
        log.info("resuming MLflow run %s", runs[0].info.run_id)
        return runs[0].info.run_id
    client = mlflow.MlflowClient(uri)
    run = client.create_run(experiment.experiment_id, run_name=job.name, tags={"gcl.run_name": job.name})
    params = flatten("", job.model_dump(mode="json"), {})
    from mlflow.entities import Param

    client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    return run.info.run_id


def _absolute(path: str | None) -> str | None:
    """Local paths made absolute (Ray workers run in another directory); URIs unchanged."""
    if path is None or "://" in path or os.path.isabs(path):
        return path
    return os.path.abspath(path)


def with_absolute_paths(job: JobConfig) -> JobConfig:
    """The job with every local data, model and storage path absolute."""
    data = job.data.model_copy(update={
        "train": _absolute(job.data.train), "image_root": _absolute(job.data.image_root),
        "eval": {k: _absolute(v) for k, v in job.data.eval.items()},
    })  # fmt: skip
    pretrained = job.model.pretrained
    if pretrained and os.path.exists(pretrained):
        pretrained = _absolute(pretrained)
    return job.model_copy(update={
        "data": data, "storage": _absolute(job.storage),
        "model": job.model.model_copy(update={"pretrained": pretrained}),
        "deepspeed": job.deepspeed.model_copy(update={"config": _absolute(job.deepspeed.config)}),
    })  # fmt: skip


def run_train(job: JobConfig) -> TrainResult:
    """Train `job` end to end and return the exported model and final metrics."""
    import mlflow
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from gcl.cluster import init_ray
    from gcl.data.pipeline import build_dataset, unsplit_data_config
    from gcl.training import consolidate_checkpoint, deepspeed_config, train_worker

    job = with_absolute_paths(job)
    uri = job.mlflow.resolved_uri()
    check_tracking(uri)
    report = validate_data(job)
    if job.loss.score_range is None and job.loss.weight_fn in ("linear", "power", "exponential"):
        job = job.model_copy(
            update={"loss": job.loss.model_copy(update={"score_range": (report.score_min, report.score_max)})}
        )
    init_ray()
    run_id = start_run(job, uri)
    client = mlflow.MlflowClient(uri)
    client.log_metric(run_id, "data_rows_skipped", len(report.bad_row_keys))

    world = job.scaling.num_workers
    steps_per_epoch = max(1, math.ceil(report.rows_valid / (world * job.train.batch_size)))
    dataset = build_dataset(job.data.train, job.data, job.fields, job.loss.weight_key, job.model.model_dump(),
                            job.pipeline, skip_pair_ids=report.bad_pair_ids, seed=job.seed)  # fmt: skip
    storage = job.storage
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"job": job.model_dump(mode="json"), "steps_per_epoch": steps_per_epoch,
                           "tracking_uri": uri, "run_id": run_id},
        scaling_config=ScalingConfig(num_workers=world, use_gpu=job.scaling.use_gpu,
                                     resources_per_worker={"CPU": job.scaling.cpus_per_worker}),
        datasets={"train": dataset},
        dataset_config=unsplit_data_config(),
        run_config=RunConfig(name=job.name, storage_path=storage, failure_config=FailureConfig(max_failures=2),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )  # fmt: skip
    result = trainer.fit()
    if result.error:
        raise result.error

    local_root = storage if "://" not in storage else os.path.abspath("gcl_runs")
    model_dir = os.path.join(local_root, job.name, "model")
    with result.checkpoint.as_directory() as checkpoint_dir:
        consolidate_checkpoint(checkpoint_dir, job, model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "config.yaml"), "w") as f:
            yaml.safe_dump(job.model_dump(mode="json"), f, sort_keys=False)
        with open(os.path.join(tmp, "deepspeed.json"), "w") as f:
            json.dump(deepspeed_config(job), f, indent=2)
        client.log_artifacts(run_id, model_dir, "model")
        client.log_artifact(run_id, os.path.join(tmp, "config.yaml"))
        client.log_artifact(run_id, os.path.join(tmp, "deepspeed.json"))
    client.set_terminated(run_id)
    return TrainResult(run_id=run_id, model_dir=model_dir, metrics=dict(result.metrics))
