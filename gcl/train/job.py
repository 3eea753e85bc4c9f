"""One training job on Ray Train, end to end: resolve and check everything before training (paths,
tracking store, data), fit the TorchTrainer, export the consolidated model to MLflow and register it.

`gcl train` and `gcl demo` run `run_train`; `gcl tune` runs `fit` once per trial.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field

import numpy
import yaml

from gcl import storage
from gcl.cluster import init_ray
from gcl.data.locked_features import prepare_locked_features
from gcl.data.manifest import dataset_manifest
from gcl.data.pipeline import PairSource, epoch_datasets, equal_split_data_config
from gcl.data.validate import ValidationReport, check_judgements, validate_pairs
from gcl.errors import ConfigError, GclError, ModelError, TrackingError, TrainingError
from gcl.job_config import JobConfig
from gcl.model import CONFIG_FILE, check_model_source
from gcl.outputs import replaced_whole
from gcl.registry.models import log_embedding_model, register_run, registered_version
from gcl.tracking.buffer import SPILL_DIR, SpillFiles, is_outage, replay, while_unreachable
from gcl.tracking.names import (
    CONFIG_ARTIFACT,
    DEEPSPEED_ARTIFACT,
    MANIFEST_ARTIFACT,
    MODEL_ARTIFACT,
    MODEL_URI_TAG,
    ROWS_SKIPPED,
)
from gcl.tracking.runs import (
    check_tracking,
    end_interrupted,
    flatten,
    mark_finished,
    resolve_tracking_uri,
    runs_named,
    start_run,
)
from gcl.train.checkpoint import committed_checkpoint, consolidate_checkpoint, log_resume
from gcl.train.engine import deepspeed_config
from gcl.train.entry import train_worker
from gcl.train.progress import TrainingBar
from gcl.train.run_lock import run_lock

log = logging.getLogger(__name__)
RUN_FILES = "run_files"  # <storage>/<name>/run_files/: what finish_run logs beside the model


@dataclass
class CheckedData:
    """The job's data as validation found it: the training data's report (its files, listed once,
    bad rows, score range) and every evaluation and validation split's files."""

    train: ValidationReport
    eval_files: dict[str, list[str]] = field(default_factory=dict)
    validation_files: dict[str, list[str]] = field(default_factory=dict)

    def manifest(self, job: JobConfig) -> dict:
        """The dataset manifest (sha256 of every file) of these files."""
        return dataset_manifest(job.data, self.train.files, self.eval_files, self.validation_files)


@dataclass
class TrainResult:
    """What a finished training run produced."""

    run_id: str
    model_dir: str
    metrics: dict


def resolve_job(job: JobConfig) -> JobConfig:
    """The job with every default that depends on the working directory or the environment
    resolved, here, in the process the user started: local data, model, DeepSpeed-config and
    storage paths made absolute, and the tracking URI filled in (see resolve_tracking_uri).
    Trials, workers and jobs run in directories of their own and get the job as it is."""
    data = job.data.model_copy(
        update={
            "train": storage.absolute(job.data.train),
            "image_root": storage.absolute(job.data.image_root),
            "eval": {k: storage.absolute(v) for k, v in job.data.eval.items()},
            "validation": {k: storage.absolute(v) for k, v in job.data.validation.items()},
        }
    )
    pretrained = job.model.pretrained
    if pretrained and os.path.exists(pretrained):
        pretrained = storage.absolute(pretrained)
    return job.model_copy(
        update={
            "data": data,
            "storage": storage.absolute(job.storage),
            "mlflow": job.mlflow.model_copy(update={"tracking_uri": resolve_tracking_uri(job.mlflow.tracking_uri)}),
            "model": job.model.model_copy(update={"pretrained": pretrained}),
            "deepspeed": job.deepspeed.model_copy(update={"config": storage.absolute(job.deepspeed.config)}),
        }
    )


RETRAIN_SUFFIX = "-retrain"


def retrain_job(reference: str, overrides: list[str]) -> JobConfig:
    """`gcl train --from-run`: the job a run trained (its logged config; gcl.tracking.runs.logged_job),
    named <name>-retrain so that it does not resume the run itself, with `overrides` applied last.
    The run is looked up in the tracking store and experiment the overrides name, else the default
    ones (resolve_tracking_uri)."""
    from gcl.config import validate_config
    from gcl.tracking.runs import logged_job

    given = dict(item.split("=", 1) for item in overrides if "=" in item)
    uri = resolve_tracking_uri(given.get("mlflow.tracking_uri"))
    experiment = given.get("mlflow.experiment", JobConfig().mlflow.experiment)
    logged = logged_job(uri, reference, experiment)
    name = f"name={logged.get('name', 'run')}{RETRAIN_SUFFIX}"
    return validate_config(JobConfig, logged, [name, *overrides], source=f"the config of run {reference}")


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
    if can_grow is None:
        can_grow = bool(os.environ.get("RAY_ADDRESS"))
    need = job_resources(job)
    short = {
        name: (amount, cluster.get(name, 0.0))
        for name, amount in need.items()
        if amount > cluster.get(name, 0.0) + 1e-9
    }
    if not short:
        return
    detail = ", ".join(f"{amount:g} {name} needed, {have:g} available" for name, (amount, have) in short.items())
    message = (
        f"the job does not fit the Ray cluster: {detail} (scaling.num_workers={job.scaling.num_workers} x "
        f"scaling.cpus_per_worker={job.scaling.cpus_per_worker}, use_gpu={job.scaling.use_gpu}, plus "
        f"pipeline.preprocess_tasks={job.pipeline.preprocess_tasks} x pipeline.cpus_per_task="
        f"{job.pipeline.cpus_per_task} and 1 CPU for Ray Data); lower them or use a bigger cluster"
    )
    if not can_grow:
        raise ConfigError(message)
    log.warning("%s; waiting for the cluster to scale up", message)


def validate_data(job: JobConfig) -> CheckedData:
    """Validate the training, evaluation and validation data, listing each dataset's files once."""
    min_score = 1.0 if job.loss.weight_fn == "reciprocal" else 0.0
    report = validate_pairs(job.data.train, job.data, job.fields, job.loss.weight_key, min_score=min_score)
    log.info("training data %s: %s", job.data.train, report.summary())
    return CheckedData(
        train=report,
        eval_files=validate_splits(job, job.data.eval),
        validation_files=validate_splits(job, job.data.validation),
    )


def validate_splits(job: JobConfig, splits: dict[str, str]) -> dict[str, list[str]]:
    """Check evaluation (or validation) splits as `gcl train` and `gcl evaluate` both do: every row
    (an evaluation split is never trimmed: a bad row is an error naming its file and row) and one
    grade per (query, document) pair. Returns each split's files."""
    strict = job.data.model_copy(update={"on_bad_rows": "error"})
    found = {}
    for name, spec in splits.items():
        found[name] = validate_pairs(spec, strict, job.fields, job.eval.grade_column, trimmable=False).files
        check_judgements(spec, found[name], job.data, job.eval.grade_column)
    return found


def with_score_range(job: JobConfig, report: ValidationReport) -> JobConfig:
    """Score-based weight functions need the score range: take it from the data when unset. A
    ConfigError, before any training, where the data's range cannot make weights: one value in
    every pair (no range), or a span float32 cannot hold (an outlier: every weight would be 0)."""
    loss = job.loss
    if loss.score_range is not None or loss.weight_fn not in ("linear", "power", "exponential"):
        return job
    low, high = report.score_min, report.score_max
    where = f"loss.weight_fn={loss.weight_fn} maps the training data's {loss.weight_key!r} range to weights"
    if not low < high:
        raise ConfigError(
            f"{where}, but every training pair has {loss.weight_key} {low:g}: one value has no range; "
            "use loss.weight_fn=uniform (every pair alike) or give another loss.weight_key"
        )
    if max(abs(low), abs(high)) * 2 > float(numpy.finfo(numpy.float32).max):
        raise ConfigError(
            f"{where}, but it spans {low:g} to {high:g}, more than float32 holds: every weight would be "
            "0; check the data for an outlier, or give loss.score_range to clamp the scores to"
        )
    return job.model_copy(update={"loss": loss.model_copy(update={"score_range": (low, high)})})


def steps_in_an_epoch(job: JobConfig, pairs: int) -> int:
    """The steps (micro-batches) of an epoch over `pairs` valid training pairs: full batches only
    (gcl.data.batches), so floor(pairs / workers / batch_size). A ConfigError, before any
    training, when the data does not fill one step."""
    world, batch_size = job.scaling.num_workers, job.train.batch_size
    steps = pairs // world // batch_size
    if steps == 0:
        raise ConfigError(
            f"train.batch_size={batch_size} x scaling.num_workers={world}: a step takes "
            f"{batch_size * world} pairs, but the training data {job.data.train} has {pairs} valid "
            "pairs; lower train.batch_size (an epoch trains full batches only)"
        )
    left = pairs - steps * world * batch_size
    if left:
        log.info(
            "an epoch trains %d steps of %d x %d pairs; the other %d wait for the next epoch's shuffle",
            steps,
            world,
            batch_size,
            left,
        )
    return steps


def prepare(job: JobConfig) -> tuple[JobConfig, CheckedData]:
    """Everything resolved and checked before any training: paths and the tracking URI
    (resolve_job), a reachable tracking store, the model's weights at hand, valid data. Returns the
    job, with the score range from the data where its weights need one, and what validation found."""
    job = resolve_job(job)
    check_tracking(job.mlflow.resolved_uri())
    check_model_source(job.model)
    data = validate_data(job)
    steps_in_an_epoch(job, data.train.rows_valid)
    return with_score_range(job, data.train), data


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


def fit(job: JobConfig, data: CheckedData, run_id: str, callbacks=(), progress: bool = False):
    """Run the Ray Train job for `job` (checkpoints under storage/name) and return its Result;
    with `progress`, draw the workers' progress as a bar on the terminal (gcl.train.progress).
    A GclError in a worker is raised here as itself, after one attempt."""
    from ray.train import CheckpointConfig, ControllerError, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    world = job.scaling.num_workers
    steps_per_epoch = steps_in_an_epoch(job, data.train.rows_valid)
    features = prepare_locked_features(job, data)  # a locked tower's features, once per document
    source = PairSource.of_job(job, data.train.files, data.train.bad_pair_ids, locked_features=features)
    datasets = epoch_datasets(source, epochs=job.train.epochs, seed=job.seed)
    resumed = log_resume(os.path.join(job.storage, job.name))
    bar = (
        TrainingBar(
            f"{job.name}-{run_id}",
            job.train.epochs * steps_per_epoch,
            job.train.epochs,
            start_step=resumed.get("step", 0),
        )
        if progress
        else contextlib.nullcontext()
    )
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "job": job.model_dump(mode="json"),
            "steps_per_epoch": steps_per_epoch,
            "tracking_uri": job.mlflow.resolved_uri(),
            "run_id": run_id,
            "locked_features": features.location if features else None,
            "progress_board": bar.board_name if progress else None,
        },
        scaling_config=ScalingConfig(
            num_workers=world,
            use_gpu=job.scaling.use_gpu,
            resources_per_worker={"CPU": job.scaling.cpus_per_worker},
            placement_strategy=job.scaling.placement_strategy,
        ),
        datasets=datasets,
        dataset_config=equal_split_data_config(),
        run_config=RunConfig(
            name=job.name,
            storage_path=job.storage,
            callbacks=[fail_fast_callback(), *callbacks],
            failure_config=FailureConfig(max_failures=job.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    try:
        with bar:
            result = trainer.fit()
    except ControllerError as err:
        if isinstance(err.controller_failure, GclError):
            raise err.controller_failure from None
        raise
    if result.error:
        raise result.error
    return result


def export_to_storage(job: JobConfig, checkpoint, manifest: dict | None = None) -> str:
    """Consolidate `checkpoint`'s ZeRO shards into an open_clip model directory at
    <storage>/<name>/model, with the resolved config, DeepSpeed config and data manifest that
    finish_run logs beside it under <storage>/<name>/run_files/. Needs no tracking store. Returns
    the model's location (a local directory, or a URI where the storage is remote)."""
    location = storage.join(job.storage, job.name, MODEL_ARTIFACT)
    files = {
        CONFIG_ARTIFACT: yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False),
        DEEPSPEED_ARTIFACT: json.dumps(deepspeed_config(job), indent=2),
    }
    if manifest is not None:
        files[MANIFEST_ARTIFACT] = json.dumps(manifest, indent=2)
    with tempfile.TemporaryDirectory() as tmp:
        # Written beside the model an earlier export left and moved in whole (gcl.outputs).
        with replaced_whole(location) as partial:
            model_dir = storage.local_path(partial) or os.path.join(tmp, MODEL_ARTIFACT)
            with checkpoint.as_directory() as checkpoint_dir:
                consolidate_checkpoint(checkpoint_dir, model_dir, job.model, job.fields)
            storage.upload_directory(model_dir, partial)
        run_files = os.path.join(tmp, RUN_FILES)
        os.makedirs(run_files)
        for name, text in files.items():
            with open(os.path.join(run_files, name), "w") as f:
                f.write(text)
        storage.upload_directory(run_files, storage.join(job.storage, job.name, RUN_FILES))
    return storage.local_path(location) or location


def finish_run(job: JobConfig, run_id: str, location: str, register: bool = True) -> list[str]:
    """Everything training leaves to MLflow once the workers are done: the metrics buffered during
    an outage (gcl.tracking.buffer), the exported model at `location` with its run files and the
    pyfunc embedding model (its URI in the run's MODEL_URI_TAG tag), the run's end and, where
    `mlflow.registered_model` is set and `register`, its registration. Each step is skipped where it is done
    already, so `gcl sync` can repeat it after an outage. Returns what it did, in words."""
    from mlflow import MlflowClient

    uri = job.mlflow.resolved_uri()
    client = MlflowClient(uri)
    run_dir = storage.join(job.storage, job.name)
    done = []
    ended = client.get_run(run_id).info.status == "FINISHED"  # logging the model below may end it too
    replayed = replay(client, run_id, SpillFiles(run_dir))
    if replayed:
        done.append(f"{replayed} buffered metric values")
    if MODEL_URI_TAG not in client.get_run(run_id).data.tags:
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = storage.download_directory(location, os.path.join(tmp, MODEL_ARTIFACT))
            run_files = storage.download_directory(storage.join(run_dir, RUN_FILES), os.path.join(tmp, RUN_FILES))
            for name in sorted(os.listdir(run_files)):
                client.log_artifact(run_id, os.path.join(run_files, name))
            client.log_artifacts(run_id, model_dir, MODEL_ARTIFACT)
            client.set_tag(run_id, MODEL_URI_TAG, log_embedding_model(run_id, model_dir, uri))
        done.append("the model")
    mark_finished(client, run_id)  # also clears the error an earlier attempt left
    if not ended:
        done.append("the run's end")
    name = job.mlflow.registered_model
    if register and name and registered_version(client, name, run_id) is None:
        version, alias = register_run(run_id, name, uri)
        done.append(f"{name} version {version} @{alias}")
    return done


def finish_despite_outage(job: JobConfig, run_id: str, location: str) -> None:
    """finish_run, tried again with backoff for up to `mlflow.finish_wait_seconds` while the store
    cannot be reached; then a TrackingError that says where everything is and to run `gcl sync`."""
    try:
        while_unreachable(
            lambda: finish_run(job, run_id, location), job.mlflow.finish_wait_seconds, "at the end of training"
        )
    except Exception as err:
        if not is_outage(err):
            raise
        raise tracking_lost(job, location, err) from None


def tracking_lost(job: JobConfig, location: str, err: Exception) -> TrackingError:
    """The error a command ends with when training finished but MLflow could not be reached to
    record it: where the model and the buffered metrics are, and how to log them later."""
    return TrackingError(
        f"training finished and its model is in {location}, but the MLflow tracking store "
        f"{job.mlflow.resolved_uri()} cannot be reached ({type(err).__name__}: {str(err)[:300]}); the metrics it "
        f"missed wait in {storage.join(job.storage, job.name, SPILL_DIR)}. When the store answers again, "
        "`gcl sync` with this command's config and overrides logs them, the model and the run's end"
        + (" and registers the model" if job.mlflow.registered_model else "")
    )


def sync_run(job: JobConfig) -> tuple[str, list[str]]:
    """`gcl sync`: finish the MLflow run of a `gcl train` whose tracking store went away (finish_run),
    from what the run left in storage. Returns the run id and what was logged, in words."""
    from mlflow import MlflowClient

    job = resolve_job(job)
    uri = job.mlflow.resolved_uri()
    check_tracking(uri)
    runs = runs_named(MlflowClient(uri), job.mlflow.experiment, job.name)
    if not runs:
        raise TrackingError(f"no run named {job.name!r} in experiment {job.mlflow.experiment!r} of {uri}")
    location = storage.join(job.storage, job.name, MODEL_ARTIFACT)
    if not storage.is_file(storage.join(location, CONFIG_FILE)):
        raise ModelError(
            f"no exported model at {location}: training did not finish; `gcl train` with the same config resumes it"
        )
    return runs[0].info.run_id, finish_run(job, runs[0].info.run_id, location)


# What decides the weights a run trains: a run resumed with any of these changed would be a mix of two
# runs. Not the keys below it (where evaluation data is, retries, how many tasks preprocess).
TRAINING_KEYS = (
    "seed",
    "model.",
    "fields.",
    "loss.",
    "data.",
    "pipeline.",
    "train.",
    "scaling.num_workers",
    "deepspeed.",
)
NOT_TRAINING_KEYS = (
    "data.eval",
    "data.validation",
    "train.max_failures",
    "pipeline.preprocess_tasks",
    "pipeline.cpus_per_task",
    "pipeline.prefetch_next_epoch",
)


def check_same_run(job: JobConfig) -> None:
    """A run's name means one run: a ConfigError, before any training, when <storage>/<name> holds
    a checkpoint trained with another config (other data, learning rate, loss, model...), which
    `gcl train` would otherwise resume and mix with this one."""
    from gcl.train.checkpoint import JOB_FILE

    run_dir = storage.join(job.storage, job.name)
    latest = committed_checkpoint(run_dir)
    saved = latest and storage.read_text(storage.join(run_dir, latest.get("checkpoint_dir_name", ""), JOB_FILE))
    if not saved:
        return
    before, now = flatten("", json.loads(saved), {}), flatten("", job.model_dump(mode="json"), {})
    changed = [
        key
        for key in sorted(set(before) | set(now))
        if key.startswith(TRAINING_KEYS) and not key.startswith(NOT_TRAINING_KEYS) and before.get(key) != now.get(key)
    ]
    if changed:
        shown = ", ".join(f"{key} {before.get(key)!r} -> {now.get(key)!r}" for key in changed[:3])
        raise ConfigError(
            f"run {job.name} in {run_dir} was trained with another config ({shown}"
            f"{', ...' if len(changed) > 3 else ''}); the same config resumes it. To train this one, "
            f"give it a name of its own (--set name={job.name}-2)"
        )


def run_train(job: JobConfig, progress: bool = True) -> TrainResult:
    """Train `job` end to end and return the exported model and final metrics; registers the
    model when `mlflow.registered_model` is set. A run that fails is marked FAILED with its cause
    (the same command resumes it). `progress`: draw a progress bar on the terminal."""

    job, data = prepare(job)
    with run_lock(storage.join(job.storage, job.name), job.name):
        check_same_run(job)
        return _train_checked(job, data, progress)


def _train_checked(job: JobConfig, data: CheckedData, progress: bool) -> TrainResult:
    """run_train's work once the job is checked and the run is this process's."""
    import ray
    from mlflow import MlflowClient

    uri = job.mlflow.resolved_uri()
    init_ray()
    check_resources(job, ray.cluster_resources())
    run_id = start_run(uri, job.mlflow.experiment, job.name, flatten("", job.model_dump(mode="json"), {}))
    client = MlflowClient(uri)
    client.log_metric(run_id, ROWS_SKIPPED, len(data.train.bad_row_keys))
    try:
        result = fit(job, data, run_id, progress=progress)
        check_learned(job, client, run_id)
    except BaseException as err:
        end_interrupted(client, run_id, err)
        raise
    model_dir = export_to_storage(job, result.checkpoint, data.manifest(job))
    finish_despite_outage(job, run_id, model_dir)
    return TrainResult(run_id=run_id, model_dir=model_dir, metrics=dict(result.metrics))


def check_learned(job: JobConfig, client, run_id: str) -> None:
    """A TrainingError when the loss was 0 in every epoch: no step had a pair to learn from, and
    the model is its starting one with weight decay applied. Such a run is not exported, finished
    or registered."""
    from gcl.tracking.buffer import fail_fast_requests, is_outage

    try:
        # One quick try: with MLflow's own retries an unreachable store held this for about 4 minutes.
        with fail_fast_requests():
            losses = [m.value for m in client.get_metric_history(run_id, "train_loss")]
    except Exception as err:  # an outage: the check waits for gcl sync's replay rather than fail the run
        if is_outage(err):
            return
        raise
    if losses and all(loss == 0 for loss in losses):
        raise TrainingError(
            f"run {job.name}: the loss was 0 at every step of {len(losses)} epoch(s): nothing was learned, and the "
            "model is not exported or registered. Every pair weighed 0, or had no negative: check the weights "
            f"({job.loss.weight_key!r} with loss.weight_fn={job.loss.weight_fn}), loss.mask_same_query / "
            "mask_same_document (a batch of one query's pairs has no negative then), and the fields' weights"
        )
