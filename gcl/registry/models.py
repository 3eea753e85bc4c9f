"""MLflow model export and registry: log the pyfunc embedding model, register versions,
and promote a version to `champion` only if it beats the current one."""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path

import yaml

import gcl
from gcl.errors import ModelError
from gcl.job_config import JobConfig
from gcl.tracking.names import (
    CHALLENGER,
    CHAMPION,
    CONFIG_ARTIFACT,
    EMBEDDING_MODEL_ARTIFACT,
    MANIFEST_ARTIFACT,
    MODEL_URI_TAG,
    OBJECTIVE,
    OBJECTIVE_KEY_TAG,
    OBJECTIVE_TAG,
    VALIDATION_PREFIX,
)
from gcl.tracking.runs import fluent_tracking_uri

log = logging.getLogger(__name__)
SERVING_CODE = os.path.join(os.path.dirname(__file__), "embedding_model.py")
# What the served model's code imports (gcl.registry.embedding_model, gcl.retrieval, gcl.model and open_clip's
# transforms), by distribution name; pinned to the versions it was logged with.
SERVING_DISTRIBUTIONS = (
    "mlflow",
    "torch",
    "torchvision",
    "open_clip_torch",
    "numpy",
    "pandas",
    "pyarrow",
    "pillow",
    "pydantic",
    "pyyaml",
)


# What a model built from pretrained towers (gcl.towers) imports besides: timm's image tower and
# Hugging Face's text tower with its tokenizer.
TOWER_DISTRIBUTIONS = ("timm", "transformers", "tokenizers", "safetensors", "huggingface_hub")


def serving_requirements(model_dir: str | None = None) -> list[str]:
    """The served model's pip requirements, each pinned to the version installed here; with the
    towers' libraries where the exported model at `model_dir` was built from towers."""
    from importlib.metadata import version

    from gcl.model import CONFIG_FILE

    names = list(SERVING_DISTRIBUTIONS)
    if model_dir and "hf_model_name" in json.loads(Path(model_dir, CONFIG_FILE).read_text())["model_cfg"].get(
        "text_cfg", {}
    ):
        names += TOWER_DISTRIBUTIONS
    return [f"{name}=={version(name).split('+')[0]}" for name in names]


def copy_gcl_code(directory: str) -> str:
    """A copy of the gcl package (without bytecode) under `directory`, to travel inside a logged
    model: the model loads with the code it was trained with, and without gcl installed."""
    import shutil

    target = os.path.join(directory, "gcl")
    shutil.copytree(os.path.dirname(gcl.__file__), target, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def log_embedding_model(run_id: str, model_dir: str, tracking_uri: str, input_example=None) -> str:
    """Log `model_dir` (an exported gcl model) as a pyfunc defined from code; returns its model URI.

    The model carries gcl's code (`code/gcl`) and pinned requirements of what that code imports,
    so it installs and serves in any environment (`mlflow models serve`, `build-docker`).
    Logged without a signature (MLflow says it cannot infer one): under a signature, MLflow drops
    input columns the signature does not name with only a warning, so a misspelt field would be
    embedded as a row without it. The model's predict names unknown columns as an error instead.
    """
    import tempfile

    import mlflow

    with tempfile.TemporaryDirectory() as scratch, fluent_tracking_uri(tracking_uri), mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=EMBEDDING_MODEL_ARTIFACT,
            python_model=SERVING_CODE,
            artifacts={"model": model_dir},
            input_example=input_example,
            pip_requirements=serving_requirements(model_dir),
            code_paths=[copy_gcl_code(scratch)],
        )
    return info.model_uri


def register_version(
    model_uri: str, name: str, objective: float, tracking_uri: str, tags: dict | None = None, objective_key: str = ""
) -> tuple[str, str]:
    """Register `model_uri` as a new version of `name` with its tags, aliased as the champion gate
    says (champion_gate). Returns (version, alias)."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    with fluent_tracking_uri(tracking_uri):
        version = mlflow.register_model(model_uri, name).version
    for key, value in {**(tags or {}), OBJECTIVE_TAG: objective, OBJECTIVE_KEY_TAG: objective_key}.items():
        client.set_model_version_tag(name, version, key, str(value)[:5000])
    alias = champion_gate(client, name, objective, objective_key)
    client.set_registered_model_alias(name, alias, version)
    return version, alias


def champion_gate(client, name: str, objective: float, objective_key: str) -> str:
    """`champion` for a version whose objective beats the current champion's (higher is better)
    on the same `objective_key` (measure, splits and evaluation data), or when there is none; else
    `challenger`, and a warning where the two were scored on other data."""
    import mlflow

    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:
        current = None
    best = float(current.tags.get(OBJECTIVE_TAG, "-inf")) if current else float("-inf")
    comparable = current is None or current.tags.get(OBJECTIVE_KEY_TAG, "") == objective_key
    if not comparable:
        log.warning(
            "%s@champion (version %s) was scored on %r, this version on %r: not comparable, registering as challenger",
            name,
            current.version,
            current.tags.get(OBJECTIVE_KEY_TAG),
            objective_key,
        )
    alias = CHAMPION if current is None or (comparable and objective > best) else CHALLENGER
    log.info("%s: objective %.4f against the champion's %.4f: %s", name, objective, best, alias)
    return alias


def code_version() -> str:
    """gcl's version, plus the git commit when running from a checkout."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=os.path.dirname(__file__),
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{gcl.__version__}+{commit}" if commit else gcl.__version__


def _run_artifact(run_id: str, path: str, tracking_uri: str) -> str | None:
    """A local copy of one of the run's artifacts, None when the run has none at `path`."""
    import mlflow

    try:
        return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, tracking_uri=tracking_uri)
    except mlflow.exceptions.MlflowException:
        return None


def version_tags(run, job: JobConfig, manifest: dict) -> dict[str, str]:
    """A registered version's lineage: the data's content hashes (the full file list stays in the
    run's manifest artifact), loss config, per-split metrics, base model, code version, run id."""
    hashes = {
        "train": (manifest.get("train") or {}).get("sha256"),
        **{s: m["sha256"] for s, m in manifest.get("eval", {}).items()},
        **{VALIDATION_PREFIX + s: m["sha256"] for s, m in manifest.get("validation", {}).items()},
    }
    return {
        "dataset_manifest": json.dumps(hashes),
        "loss": job.loss.model_dump_json(),
        "metrics": json.dumps({k: v for k, v in run.data.metrics.items() if "/" in k}, sort_keys=True),
        "base_model": json.dumps({"arch": job.model.arch, "pretrained": job.model.pretrained}),
        "code_version": code_version(),
        "run_id": run.info.run_id,
    }


def objective_key_for(job: JobConfig, tags: dict[str, str]) -> str:
    """What the objective measures and on which data (the validation splits where the job has them,
    else the evaluation splits; their content hashes): only versions with the same key are
    compared for the champion alias."""
    hashes = json.loads(tags["dataset_manifest"])
    if job.data.validation:
        scored, kind = {s: h for s, h in hashes.items() if s.startswith(VALIDATION_PREFIX)}, "validation data"
    else:
        scored, kind = {s: h for s, h in hashes.items() if s != "train"}, "eval data"
    return f"{job.eval.objective_name()} | {kind} {json.dumps(scored, sort_keys=True)}"


def registered_version(client, name: str, run_id: str) -> tuple[str, str] | None:
    """(version, alias) if the run is registered under `name` already (a re-run of a finished sweep)."""
    for existing in client.search_model_versions(f"name = '{name}'"):
        if existing.tags.get("run_id") == run_id:
            # search results carry no aliases: read the version itself
            aliases = client.get_model_version(name, existing.version).aliases or ["none"]
            return existing.version, aliases[0]
    return None


def register_run(run_id: str, name: str, tracking_uri: str) -> tuple[str, str]:
    """Register the embedding model of a finished gcl run (train or a sweep's best trial) under
    `name`, gated on the run's final objective, with its lineage as tags (version_tags). Returns
    (version, alias)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    registered = registered_version(client, name, run_id)
    if registered:
        log.info("run %s is %s version %s already (@%s)", run_id, name, *registered)
        return registered
    run = client.get_run(run_id)
    model_uri = run.data.tags.get(MODEL_URI_TAG)
    if model_uri is None:
        raise ModelError(
            f"run {run_id} has no exported embedding model (tag {MODEL_URI_TAG}); "
            "register runs made by `gcl train` or `gcl tune`"
        )
    if OBJECTIVE not in run.data.metrics:
        raise ModelError(
            f"run {run_id} has no {OBJECTIVE!r} metric: it was trained without evaluation "
            "splits (data.eval), so it cannot be compared with the champion"
        )
    with open(_run_artifact(run_id, CONFIG_ARTIFACT, tracking_uri)) as f:
        job = JobConfig.model_validate(yaml.safe_load(f))
    manifest_file = _run_artifact(run_id, MANIFEST_ARTIFACT, tracking_uri)
    manifest = json.loads(Path(manifest_file).read_text()) if manifest_file else {}
    tags = version_tags(run, job, manifest)
    return register_version(
        model_uri, name, run.data.metrics[OBJECTIVE], tracking_uri, tags, objective_key_for(job, tags)
    )
