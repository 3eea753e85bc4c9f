"""MLflow model export and registry: log the pyfunc embedding model, register versions,
and promote a version to `champion` only if it beats the current one."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)
SERVING_CODE = os.path.join(os.path.dirname(__file__), "serving.py")
OBJECTIVE_TAG = "gcl.objective"


def log_embedding_model(run_id: str, model_dir: str, tracking_uri: str, input_example=None) -> str:
    """Log `model_dir` (an exported gcl model) as a pyfunc defined from code; returns its model URI."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="embedding_model",
            python_model=SERVING_CODE,
            artifacts={"model": model_dir},
            input_example=input_example,
            pip_requirements=["gcl"],
        )
    return info.model_uri


def register(
    model_uri: str, name: str, objective: float, tracking_uri: str, tags: dict | None = None
) -> tuple[str, str]:
    """Register `model_uri` as a new version of `name`; alias it `champion` if its objective beats
    the current champion's (higher is better), else `challenger`. Returns (version, alias)."""
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    version = mlflow.register_model(model_uri, name).version
    for key, value in {**(tags or {}), OBJECTIVE_TAG: objective}.items():
        client.set_model_version_tag(name, version, key, str(value))
    try:
        current = client.get_model_version_by_alias(name, "champion")
        best = float(current.tags.get(OBJECTIVE_TAG, "-inf"))
    except mlflow.exceptions.MlflowException:
        current, best = None, float("-inf")
    alias = "champion" if objective > best else "challenger"
    client.set_registered_model_alias(name, alias, version)
    log.info(
        "registered %s version %s as %s (objective %.4f vs champion %.4f)",
        name,
        version,
        alias,
        objective,
        best,
    )
    return version, alias
