"""Launching one training job on Ray Train: check everything before training (paths, tracking
store, data), fit the TorchTrainer, and export the consolidated model to MLflow.

`gcl train`, `gcl tune` (one job per trial) and `gcl demo` are built from these steps.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import tempfile

import yaml

from gcl.errors import GclError
from gcl.job_config import JobConfig
from gcl.tracking import check_tracking, resolve_tracking_uri

log = logging.getLogger(__name__)


def job_resources(job: JobConfig) -> dict[str, float]:
    """What one training holds at once: its workers, preprocessing tasks, and one CPU for Ray
    Data's read and shuffle tasks."""
    cpus = (
        job.scaling.num_workers * job.scaling.cpus_per_worker
        + job.pipeline.preprocess_tasks * job.pipeline.cpus_per_task
        + 1.0
    )
    return {"CPU": cpus, "GPU": float(job.scaling.num_workers if job.scaling.use_gpu else 0)}


def check_resources(job: JobConfig, cluster: dict[str, float], can_grow: bool | None = None) -> None:
    """Fail before training when the job can never fit the cluster (a local one cannot grow);
    on a remote cluster, which may autoscale, only warn. can_grow: default, whether gcl connected
    to a cluster at RAY_ADDRESS rather than starting a local one (see gcl.cluster.init_ray)."""
    from gcl.config import ConfigError

    if can_grow is None:
        can_grow = bool(os.environ.get("RAY_ADDRESS"))
    need = job_resources(job)
    short = {name: (amount, cluster.get(name, 0.0)) for name, amount in need.items()
             if amount > cluster.get(name, 0.0) + 1e-9}  # fmt: skip
    if not short:
        return
    detail = ", ".join(
        f"{amount:g} {name} needed, {have:g} available" for name, (amount, have) in short.items()
    )
    message = (f"the job does not fit the Ray cluster: {detail} (scaling.num_workers={job.scaling.num_workers} x "
               f"scaling.cpus_per_worker={job.scaling.cpus_per_worker}, use_gpu={job.scaling.use_gpu}, plus "
               f"pipeline.preprocess_tasks={job.pipeline.preprocess_tasks} x pipeline.cpus_per_task="
               f"{job.pipeline.cpus_per_task} and 1 CPU for Ray Data); lower them or use a bigger cluster")  # fmt: skip
    if not can_grow:
        raise ConfigError(message)
    log.warning("%s; waiting for the cluster to scale up", message)


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


def _absolute(path: str | None) -> str | None:
    """Local paths made absolute (Ray workers run in another directory); URIs unchanged."""
    if path is None or "://" in path or os.path.isabs(path):
        return path
    return os.path.abspath(path)


def resolve_job(job: JobConfig) -> JobConfig:
    """The job with every default that depends on the working directory or the environment
    resolved, here, in the process the user started: local data, model, DeepSpeed-config and
    storage paths made absolute, and the tracking URI filled in (see resolve_tracking_uri).
    Trials, workers and jobs run in directories of their own and get the job as it is."""
    data = job.data.model_copy(update={
        "train": _absolute(job.data.train), "image_root": _absolute(job.data.image_root),
        "eval": {k: _absolute(v) for k, v in job.data.eval.items()},
    })  # fmt: skip
    pretrained = job.model.pretrained
    if pretrained and os.path.exists(pretrained):
        pretrained = _absolute(pretrained)
    return job.model_copy(update={
        "data": data, "storage": _absolute(job.storage),
        "mlflow": job.mlflow.model_copy(update={"tracking_uri": resolve_tracking_uri(job.mlflow.tracking_uri)}),
        "model": job.model.model_copy(update={"pretrained": pretrained}),
        "deepspeed": job.deepspeed.model_copy(update={"config": _absolute(job.deepspeed.config)}),
    })  # fmt: skip


def with_score_range(job: JobConfig, report) -> JobConfig:
    """Score-based weight functions need the score range: take it from the data when unset."""
    if job.loss.score_range is None and job.loss.weight_fn in ("linear", "power", "exponential"):
        score_range = (report.score_min, report.score_max)
        return job.model_copy(update={"loss": job.loss.model_copy(update={"score_range": score_range})})
    return job


def prepare(job: JobConfig):
    """Everything resolved and checked before any training: paths and the tracking URI (resolve_job), a reachable tracking store,
    valid data. Returns (job, validation report of the training data)."""
    job = resolve_job(job)
    check_tracking(job.mlflow.resolved_uri())
    report = validate_data(job)
    return with_score_range(job, report), report


def committed_checkpoint(run_dir: str) -> dict | None:
    """The latest checkpoint Ray Train committed under `run_dir` (a local path or a storage URI such
    as s3://bucket/runs/name): its directory name and reported metrics, from Ray Train's
    checkpoint snapshot; None when there is none."""
    from gcl.data.readers import storage_filesystem

    filesystem, path = storage_filesystem(run_dir)
    try:
        with filesystem.open_input_stream(f"{path}/checkpoint_manager_snapshot.json") as f:
            return json.loads(f.read()).get("latest_checkpoint_result")
    except (OSError, ValueError):
        return None


def _log_resume(run_dir: str) -> None:
    """Say whether this run resumes, and from where (uncommitted checkpoints: local storage only)."""
    latest = committed_checkpoint(run_dir)
    if latest:
        metrics = latest.get("metrics", {})
        log.info("run %s resumes from its checkpoint at epoch %s, step %s (%s)", os.path.basename(run_dir),
                 metrics.get("epoch"), metrics.get("step"), os.path.join(run_dir, latest.get("checkpoint_dir_name", "")))  # fmt: skip
    elif glob.glob(os.path.join(run_dir, "checkpoint_*")):
        log.warning("%s holds checkpoint directories that Ray Train never committed (the run stopped while "
                    "saving one): training starts from the beginning", run_dir)  # fmt: skip


def fail_fast_callback():
    """A Ray Train callback that ends training at once when a worker fails with an error gcl
    explains (a GclError: bad config or data, a tracking store without the run), which restarting
    the workers from the checkpoint would only meet again, train.max_failures times. Raised in
    the Train controller, the error ends the run as a controller error, which is never retried."""
    from ray.train import UserCallback

    class FailFast(UserCallback):
        def after_exception(self, run_context, worker_exceptions) -> None:
            for error in worker_exceptions.values():
                # Ray Train wraps the worker's exception with its traceback as _base_exc.
                original = getattr(error, "_base_exc", error)
                if isinstance(original, GclError):
                    raise original

    return FailFast()


def fit(job: JobConfig, report, run_id: str, callbacks=()):
    """Run the Ray Train job for `job` (checkpoints under storage/name) and return its Result.
    A GclError in a worker is raised here as itself, after one attempt."""
    from ray.train import CheckpointConfig, ControllerError, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from gcl.data.pipeline import epoch_datasets, unsplit_data_config
    from gcl.training import train_worker

    world = job.scaling.num_workers
    steps_per_epoch = max(1, math.ceil(report.rows_valid / (world * job.train.batch_size)))
    datasets = epoch_datasets(job.data.train, job.data, job.fields, job.loss.weight_key, job.model.model_dump(),
                              job.pipeline, epochs=job.train.epochs, skip_pair_ids=report.bad_pair_ids,
                              seed=job.seed)  # fmt: skip
    _log_resume(os.path.join(job.storage, job.name))
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"job": job.model_dump(mode="json"), "steps_per_epoch": steps_per_epoch,
                           "tracking_uri": job.mlflow.resolved_uri(), "run_id": run_id},
        scaling_config=ScalingConfig(num_workers=world, use_gpu=job.scaling.use_gpu,
                                     resources_per_worker={"CPU": job.scaling.cpus_per_worker},
                                     placement_strategy=job.scaling.placement_strategy),
        datasets=datasets,
        dataset_config=unsplit_data_config(),
        run_config=RunConfig(name=job.name, storage_path=job.storage, callbacks=[fail_fast_callback(), *callbacks],
                             failure_config=FailureConfig(max_failures=job.train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )  # fmt: skip
    try:
        result = trainer.fit()
    except ControllerError as err:
        if isinstance(err.controller_failure, GclError):
            raise err.controller_failure from None
        raise
    if result.error:
        raise result.error
    return result


def export_model(job: JobConfig, checkpoint, run_id: str, manifest: dict | None = None) -> str:
    """Consolidate `checkpoint`'s ZeRO shards into an open_clip model directory, log it with the
    resolved config, DeepSpeed config and data manifest, and log the pyfunc embedding model
    (its URI goes in the run's `gcl.model_uri` tag). Returns the model directory."""
    from mlflow import MlflowClient

    from gcl.registry import MODEL_URI_TAG, log_embedding_model
    from gcl.training import consolidate_checkpoint, deepspeed_config

    uri = job.mlflow.resolved_uri()
    client = MlflowClient(uri)
    local_root = job.storage if "://" not in job.storage else os.path.abspath("gcl_runs")
    model_dir = os.path.join(local_root, job.name, "model")
    with checkpoint.as_directory() as checkpoint_dir:
        consolidate_checkpoint(checkpoint_dir, job, model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        files = {"config.yaml": yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False),
                 "deepspeed.json": json.dumps(deepspeed_config(job), indent=2)}  # fmt: skip
        if manifest is not None:
            files["dataset_manifest.json"] = json.dumps(manifest, indent=2)
        for name, text in files.items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
            client.log_artifact(run_id, os.path.join(tmp, name))
    client.log_artifacts(run_id, model_dir, "model")
    client.set_tag(run_id, MODEL_URI_TAG, log_embedding_model(run_id, model_dir, uri))
    return model_dir
