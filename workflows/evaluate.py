"""`gcl evaluate`: retrieval metrics per split for an exported model, a run's model or a
registered model (`models:/name@alias`)."""

from __future__ import annotations

import os

from gcl.job_config import JobConfig


def resolve_model_dir(model: str, tracking_uri: str) -> str:
    """A local model directory for a path or an MLflow URI (runs:/..., models:/...)."""
    if os.path.isdir(model):
        return model
    if model.startswith(("runs:/", "models:/")):
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)
        local = mlflow.artifacts.download_artifacts(artifact_uri=model)
        # A pyfunc model keeps the open_clip weights under artifacts/model.
        nested = os.path.join(local, "artifacts", "model")
        return nested if os.path.isdir(nested) else local
    raise SystemExit(f"--model {model!r} is neither a directory nor an MLflow runs:/ or models:/ URI")


def run_evaluate(job: JobConfig, model: str) -> dict[str, dict[str, float]]:
    """Evaluate `model` on the job's evaluation splits, print a table, return the metrics."""
    from gcl.report import metrics_table
    from gcl.retrieval import RowEncoder, evaluate_splits

    model_dir = resolve_model_dir(model, job.mlflow.resolved_uri())
    # A plain open_clip directory has no gcl_fields.json: the job's fields say how to feed it.
    encoder = RowEncoder.from_model_dir(model_dir, fields=job.fields)
    results = evaluate_splits(encoder, job.data.eval, job.data, job.eval)
    print(metrics_table(results))
    return results
