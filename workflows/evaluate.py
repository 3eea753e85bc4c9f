"""`gcl evaluate`: retrieval metrics per split for an exported model, a training checkpoint (or
a run's directory: its latest checkpoint), a run's model or a registered model
(`models:/name@alias`)."""

from __future__ import annotations

import json
import logging
import os
import tempfile

from gcl.job_config import JobConfig

log = logging.getLogger(__name__)


def training_checkpoint(path: str) -> str | None:
    """`path` if it is a gcl training checkpoint, the latest committed checkpoint if it is a run's
    directory (storage/name), else None."""
    from gcl.jobs import committed_checkpoint
    from gcl.training import STATE_FILE

    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return path
    latest = committed_checkpoint(path)
    return os.path.join(path, latest["checkpoint_dir_name"]) if latest else None


def export_checkpoint(checkpoint_dir: str, job: JobConfig, out_dir: str) -> str:
    """Gather `checkpoint_dir`'s ZeRO shards into a model directory under `out_dir`, as training
    exports its final model: with the model, fields and ZeRO stage of the job that trained it
    (saved in the checkpoint), or of `job` for checkpoints from before gcl saved it."""
    from gcl.training import JOB_FILE, STATE_FILE, consolidate_checkpoint

    with open(os.path.join(checkpoint_dir, STATE_FILE)) as f:
        state = json.load(f)
    log.info("evaluating %s: epoch %s, step %s", checkpoint_dir, state["epoch"], state["step"])
    saved = os.path.join(checkpoint_dir, JOB_FILE)
    if os.path.isfile(saved):
        with open(saved) as f:
            job = JobConfig.model_validate(json.load(f))
    return consolidate_checkpoint(checkpoint_dir, job, os.path.join(out_dir, "model"))


def resolve_model_dir(model: str, job: JobConfig, scratch: str) -> str:
    """A local model directory for a model directory, a checkpoint or run directory (exported
    into `scratch`), or an MLflow URI (runs:/..., models:/...)."""
    if os.path.isdir(model):
        from gcl.model import CONFIG_FILE
        from gcl.training import STATE_FILE

        checkpoint = training_checkpoint(model)
        if checkpoint:
            return export_checkpoint(checkpoint, job, scratch)
        if not os.path.isfile(os.path.join(model, CONFIG_FILE)):
            raise SystemExit(
                f"--model {model!r}: not a model directory (no {CONFIG_FILE}), a training checkpoint (no "
                f"{STATE_FILE}) or a run's directory with a committed checkpoint"
            )
        return model
    if model.startswith(("runs:/", "models:/")):
        import mlflow

        mlflow.set_tracking_uri(job.mlflow.resolved_uri())
        local = mlflow.artifacts.download_artifacts(artifact_uri=model)
        # A pyfunc model keeps the open_clip weights under artifacts/model.
        nested = os.path.join(local, "artifacts", "model")
        return nested if os.path.isdir(nested) else local
    raise SystemExit(
        f"--model {model!r} is neither a directory (a model, a checkpoint or a run's) nor an MLflow "
        "runs:/ or models:/ URI"
    )


def run_evaluate(job: JobConfig, model: str) -> dict[str, dict[str, float]]:
    """Evaluate `model` on the job's evaluation splits, print a table, return the metrics."""
    from gcl.report import metrics_table
    from gcl.retrieval import RowEncoder, evaluate_splits

    with tempfile.TemporaryDirectory(prefix="gcl-evaluate-") as scratch:
        model_dir = resolve_model_dir(model, job, scratch)
        # A plain open_clip directory has no gcl_fields.json: the job's fields say how to feed it.
        encoder = RowEncoder.from_model_dir(model_dir, fields=job.fields)
    results = evaluate_splits(encoder, job.data.eval, job.data, job.eval)
    print(metrics_table(results))
    return results
