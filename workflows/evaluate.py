"""`gcl evaluate`: retrieval metrics per split for an exported model, a training checkpoint or a
run's directory (its latest checkpoint; local or on storage such as s3://), a run's model or a
registered model (`models:/name@alias`)."""

from __future__ import annotations

import json
import logging
import os
import tempfile

from gcl.job_config import JobConfig

log = logging.getLogger(__name__)


def training_checkpoint(model: str) -> str | None:
    """The checkpoint `model` (a local path or a storage URI) names: itself if it is a gcl training
    checkpoint, the latest committed one if it is a run's directory (storage/name), else None."""
    from pyarrow import fs

    from gcl.data.readers import storage_filesystem
    from gcl.jobs import committed_checkpoint
    from gcl.training import STATE_FILE

    filesystem, path = storage_filesystem(model)
    if filesystem.get_file_info(f"{path}/{STATE_FILE}").type == fs.FileType.File:
        return model
    latest = committed_checkpoint(model)
    return f"{model.rstrip('/')}/{latest['checkpoint_dir_name']}" if latest else None


def local_directory(location: str, scratch: str) -> str:
    """`location` itself if it is a local path; for a storage URI (s3://, gs://, file://), a copy
    of what it holds under `scratch`."""
    if "://" not in location:
        return location
    from pyarrow import fs

    from gcl.data.readers import storage_filesystem

    filesystem, path = storage_filesystem(location)
    local = os.path.join(scratch, "checkpoint")
    fs.copy_files(path, local, source_filesystem=filesystem, destination_filesystem=fs.LocalFileSystem())
    return local


def export_checkpoint(checkpoint_dir: str, job: JobConfig, out_dir: str, source: str | None = None) -> str:
    """Gather `checkpoint_dir`'s ZeRO shards into a model directory under `out_dir`, as training
    exports its final model: with the model, fields and ZeRO stage of the job that trained it
    (saved in the checkpoint), or of `job` for checkpoints from before gcl saved it. `source`:
    where the checkpoint came from, for the log (by default `checkpoint_dir`)."""
    from gcl.training import JOB_FILE, STATE_FILE, consolidate_checkpoint

    with open(os.path.join(checkpoint_dir, STATE_FILE)) as f:
        state = json.load(f)
    log.info("evaluating %s: epoch %s, step %s", source or checkpoint_dir, state["epoch"], state["step"])
    saved = os.path.join(checkpoint_dir, JOB_FILE)
    if os.path.isfile(saved):
        with open(saved) as f:
            job = JobConfig.model_validate(json.load(f))
    return consolidate_checkpoint(checkpoint_dir, job, os.path.join(out_dir, "model"))


def resolve_model_dir(model: str, job: JobConfig, scratch: str) -> str:
    """A local model directory for a model directory, a checkpoint or a run's directory (local or
    a storage URI; exported into `scratch`), or an MLflow URI (runs:/..., models:/...)."""
    from gcl.model import CONFIG_FILE
    from gcl.training import STATE_FILE

    if model.startswith(("runs:/", "models:/")):
        import mlflow

        mlflow.set_tracking_uri(job.mlflow.resolved_uri())
        local = mlflow.artifacts.download_artifacts(artifact_uri=model)
        # A pyfunc model keeps the open_clip weights under artifacts/model.
        nested = os.path.join(local, "artifacts", "model")
        return nested if os.path.isdir(nested) else local
    checkpoint = training_checkpoint(model)
    if checkpoint:
        return export_checkpoint(local_directory(checkpoint, scratch), job, scratch, source=checkpoint)
    if os.path.isfile(os.path.join(model, CONFIG_FILE)):
        return model
    raise SystemExit(
        f"--model {model!r}: not a model directory (no {CONFIG_FILE}), a training checkpoint (no {STATE_FILE}), "
        "a run's directory with a committed checkpoint, or an MLflow runs:/ or models:/ URI"
    )


def run_evaluate(job: JobConfig, model: str) -> dict[str, dict[str, float]]:
    """Evaluate `model` on the job's evaluation splits, print a table, return the metrics."""
    from gcl.jobs import resolve_job
    from gcl.report import metrics_table
    from gcl.retrieval import RowEncoder, evaluate_splits

    job = resolve_job(job)
    with tempfile.TemporaryDirectory(prefix="gcl-evaluate-") as scratch:
        model_dir = resolve_model_dir(model, job, scratch)
        # A plain open_clip directory has no gcl_fields.json: the job's fields say how to feed it.
        encoder = RowEncoder.from_model_dir(model_dir, fields=job.fields)
    results = evaluate_splits(encoder, job.data.eval, job.data, job.eval)
    print(metrics_table(results))
    return results
