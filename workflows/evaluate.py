"""`gcl evaluate`: retrieval metrics per split for an exported model, a run's model or a
registered model (`models:/name@alias`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

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
    from gcl.config import FieldsConfig
    from gcl.model import FieldEncoder, ModelConfig, create_model, create_preprocessing
    from gcl.report import metrics_table
    from gcl.retrieval import RowEncoder, evaluate_splits

    model_dir = resolve_model_dir(model, job.mlflow.resolved_uri())
    fields_file = os.path.join(model_dir, "gcl_fields.json")
    fields = (
        FieldsConfig(**json.loads(Path(fields_file).read_text()))
        if os.path.exists(fields_file)
        else job.fields
    )
    cfg = ModelConfig(pretrained=model_dir)
    loaded = create_model(cfg)
    tokenizer, _, transform = create_preprocessing(cfg)
    encoder = RowEncoder(FieldEncoder(loaded.clip, fields.modalities()).eval(), tokenizer, transform, fields)
    results = evaluate_splits(encoder, job.data.eval, job.data, job.eval)
    print(metrics_table(results))
    return results
