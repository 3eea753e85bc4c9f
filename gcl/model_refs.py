"""Any model reference a user gives (`--model`) to a local open_clip model directory: a model
directory, a training checkpoint or a run's directory (local or a storage URI), or an MLflow URI
(runs:/..., models:/...). Search, evaluation, the search page and registration all take one."""

from __future__ import annotations

import os

from gcl import storage
from gcl.errors import ModelError
from gcl.job_config import JobConfig
from gcl.model import CONFIG_FILE, model_weights
from gcl.tracking.runs import fluent_tracking_uri
from gcl.train.checkpoint import STATE_FILE, export_checkpoint, training_checkpoint


def pyfunc_model_dir(local: str) -> str:
    """The open_clip directory inside a downloaded MLflow model: gcl's pyfuncs keep it under
    artifacts/ (as `model`, or the exported directory's name), a plain model is the directory."""
    artifacts = os.path.join(local, "artifacts")
    if os.path.isdir(artifacts):
        for name in ["model", *sorted(os.listdir(artifacts))]:
            if os.path.isfile(os.path.join(artifacts, name, CONFIG_FILE)):
                return os.path.join(artifacts, name)
    return local


def resolve_model_dir(
    model: str, scratch: str, tracking_uri: str | None = None, fallback_job: JobConfig | None = None
) -> str:
    """A local model directory for any model reference: a model directory, a training checkpoint
    or a run's directory (local or a storage URI; exported into `scratch`), or an MLflow URI
    (runs:/..., models:/..., read from `tracking_uri`)."""
    if model.startswith(("runs:/", "models:/")):
        import mlflow
        from mlflow.exceptions import MlflowException

        # A models:/ URI is resolved through the process-wide tracking URI, whatever is passed.
        try:
            with fluent_tracking_uri(tracking_uri):
                local = mlflow.artifacts.download_artifacts(artifact_uri=model)
        except (MlflowException, OSError) as err:
            raise ModelError(
                f"--model {model}: not found in the tracking store {tracking_uri} "
                f"({' '.join(str(err).split())[:200]}); give models:/NAME@ALIAS or models:/NAME/VERSION "
                "of a registered model, or runs:/RUN_ID/model of a run that logged one"
            ) from None
        return pyfunc_model_dir(local)
    checkpoint = training_checkpoint(model)
    if checkpoint:
        local = storage.download_directory(checkpoint, scratch)
        return export_checkpoint(local, scratch, fallback_job, source=checkpoint)
    if os.path.isfile(os.path.join(model, CONFIG_FILE)):
        model_weights(model)  # a directory without its weights is not a model
        return model
    raise ModelError(
        f"--model {model!r}: not a model directory (no {CONFIG_FILE}), a training checkpoint (no {STATE_FILE}), "
        "a run's directory with a committed checkpoint, or an MLflow runs:/ or models:/ URI"
    )
