"""The search model in the registry: `gcl index --register` logs the embedding model and the index as
one MLflow pyfunc (gcl/search/search_model.py, defined from code, with gcl's code and pinned
requirements as the embedding model) and registers it with the embedding model's lineage."""

from __future__ import annotations

import json
import os

from gcl.errors import ModelError
from gcl.model_refs import resolve_model_dir
from gcl.registry.models import copy_gcl_code, register_version, serving_requirements
from gcl.search.faiss_index import INFO_FILE
from gcl.tracking.buffer import is_outage
from gcl.tracking.names import OBJECTIVE_KEY_TAG, OBJECTIVE_TAG, SEARCH_MODEL_ARTIFACT
from gcl.tracking.runs import fluent_tracking_uri, start_run

SEARCH_SERVING_CODE = os.path.join(os.path.dirname(__file__), "search_model.py")


def log_search_model(run_id: str, model_dir: str, index_dir: str, tracking_uri: str) -> str:
    """Log the search model (gcl/search/search_model.py: the exported model at `model_dir` and the
    `gcl index` directory `index_dir`) to the run, as log_embedding_model logs the embedding
    model, plus faiss-cpu and a signature that takes `k` as a param. Returns its model URI."""
    import tempfile
    from importlib.metadata import version

    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec

    # No input schema: as for the embedding model, an unknown column is the model's error to name.
    signature = ModelSignature(inputs=None, params=ParamSchema([ParamSpec("k", "long", 10)]))
    requirements = [*serving_requirements(model_dir), f"faiss-cpu=={version('faiss-cpu')}"]
    with tempfile.TemporaryDirectory() as scratch, fluent_tracking_uri(tracking_uri), mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=SEARCH_MODEL_ARTIFACT,
            python_model=SEARCH_SERVING_CODE,
            artifacts={"model": model_dir, "index": index_dir},
            signature=signature,
            pip_requirements=requirements,
            code_paths=[copy_gcl_code(scratch)],
        )
    return info.model_uri


def register_search_index(index_dir: str, name: str, tracking_uri: str, experiment: str) -> tuple[str, str]:
    """Log and register the search model of a `gcl index` directory under `name`: a run named
    index-<name> holds it with the index's build parameters; the version carries the embedding
    model's lineage and objective (the registered version it was built with, which the champion
    gate compares), the index's parameters and the corpus's content hash. Returns (version, alias)."""
    import tempfile

    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    with open(os.path.join(index_dir, INFO_FILE)) as f:
        info = json.load(f)
    model_uri = info.get("model_uri") or ""
    if not model_uri.startswith("models:/") or info.get("side") != "right":
        raise ModelError(
            f"{index_dir}: built from embeddings of {model_uri or 'an unknown model'} ({info.get('side')} side); "
            "a search model is registered from documents embedded with a registered model: "
            "gcl embed --model models:/<name>@<alias> (the default side, right)"
        )
    client = MlflowClient(tracking_uri)
    model_name, model_version = model_uri.removeprefix("models:/").split("/", 1)
    try:
        embedding_version = client.get_model_version(model_name, model_version)
    except MlflowException as err:
        if is_outage(err):  # the store did not answer: it may yet, and the caller may try again
            raise
        raise ModelError(f"{model_uri}: not in {tracking_uri} ({err})") from err
    embedding_tags = embedding_version.tags
    build = {
        k: info[k]
        for k in (
            "kind",
            "hnsw_m",
            "hnsw_ef_construction",
            "hnsw_ef_search",
            "ivf_lists",
            "ivf_probe",
            "pq_bytes",
            "refine_factor",
            "rows",
            "dim",
        )
    }
    run_id = start_run(tracking_uri, experiment, f"index-{name}", {f"index.{k}": v for k, v in build.items()})
    with tempfile.TemporaryDirectory(prefix="gcl-index-") as scratch:
        search_uri = log_search_model(
            run_id, resolve_model_dir(model_uri, scratch, tracking_uri), index_dir, tracking_uri
        )
    client.set_terminated(run_id)
    lineage = {k: v for k, v in embedding_tags.items() if k not in (OBJECTIVE_TAG, OBJECTIVE_KEY_TAG)}
    tags = {
        **lineage,
        "embedding_model": model_uri,
        "index": json.dumps(build),
        "corpus_sha256": info["corpus_sha256"],
        "index_run_id": run_id,
    }
    objective = float(embedding_tags.get(OBJECTIVE_TAG, "-inf"))
    return register_version(search_uri, name, objective, tracking_uri, tags, embedding_tags.get(OBJECTIVE_KEY_TAG, ""))
