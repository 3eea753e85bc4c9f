"""`gcl evaluate`: retrieval metrics per split for one or more models: an exported model, a training
checkpoint or a run's directory (its latest checkpoint; local or on storage such as s3://), a run's
model or a registered model (`models:/name@alias`), or an open_clip base model
(`open_clip:ARCH[:TAG or weights file]`, fed as the config's fields say); see gcl.train.checkpoint.
Several models: one table per split with each model's change from the first, and a plot."""

from __future__ import annotations

import os
import tempfile
import time

import torch
from mlflow import MlflowClient
from tqdm import tqdm

from gcl import storage
from gcl.console import say, terminal
from gcl.errors import ConfigError
from gcl.job_config import JobConfig
from gcl.model import ModelConfig, base_model_config, check_model_source
from gcl.model_refs import resolve_model_dir
from gcl.report import comparison_plot, comparison_table, metrics_table
from gcl.retrieval import RowEncoder, evaluate_splits
from gcl.tracking.buffer import is_outage, while_unreachable
from gcl.tracking.runs import check_tracking, start_run
from gcl.train.job import resolve_job, validate_splits

Results = dict[str, dict[str, float]]


def resolve_model(job: JobConfig, model: str, scratch: str) -> ModelConfig | str:
    """What a model reference `gcl evaluate` takes stands for, checked: an open_clip base model's
    config (its weights at hand), or a local model directory (downloaded from MLflow or exported
    from a checkpoint into `scratch`). A bad reference fails here, before any evaluation."""
    base = base_model_config(model, job.model)
    if base is not None:
        check_model_source(base)
        return base
    return resolve_model_dir(model, scratch, job.mlflow.resolved_uri(), fallback_job=job)


def row_encoder(job: JobConfig, resolved: ModelConfig | str) -> RowEncoder:
    """The encoder of a resolved model (resolve_model)."""
    if isinstance(resolved, ModelConfig):
        torch.manual_seed(job.seed)  # an architecture without weights starts from the job's seed
        return RowEncoder.from_model(resolved, job.fields)
    # A plain open_clip directory has no gcl_fields.json: the job's fields say how to feed it.
    return RowEncoder.from_model_dir(resolved, fields=job.fields)


def run_evaluate_index(job: JobConfig, index_dir: str, model: str | None = None) -> dict[str, Results]:
    """Each evaluation split searched with the index at `index_dir` and exactly over the same
    vectors (gcl.search.index_eval), with the index's model (or `model`, which must be the one that
    embedded the catalog); prints both side by side and returns {search: {split: metrics}}."""
    import json

    from gcl.search.faiss_index import INFO_FILE, SearchIndex
    from gcl.search.index_eval import NEIGHBOURS, evaluate_index

    job = resolve_job(job)
    SearchIndex.check_directory(index_dir)
    check_tracking(job.mlflow.resolved_uri())
    validate_splits(job, job.data.eval)
    with open(os.path.join(index_dir, INFO_FILE)) as f:
        model = model or json.load(f).get("model_uri")
    with tempfile.TemporaryDirectory(prefix="gcl-evaluate-") as scratch:
        encoder = row_encoder(job, resolve_model(job, model, scratch))
    results = evaluate_index(encoder, index_dir, job.data.eval, job.data, job.eval)
    measures = [*job.eval.measures, f"neighbours_recall@{NEIGHBOURS}"]
    say(f"{model}: exact search and the index {index_dir}, over the same catalog")
    say(comparison_table(results, measures))
    return results


def run_evaluate(job: JobConfig, model: str | list[str]) -> Results | dict[str, Results]:
    """Evaluate each model on the job's evaluation splits and print the results: one model's
    metrics ({split: {measure: value}}, a table), or several models' ({model: metrics}, a
    comparison table per split against the first, and a plot under <storage>/<name>/ that an
    MLflow run named evaluate-<time> holds too)."""
    job = resolve_job(job)
    check_tracking(job.mlflow.resolved_uri())
    if not job.data.eval:
        raise ConfigError("data.eval names no split to evaluate on; give data.eval={name: path, ...}")
    validate_splits(job, job.data.eval)  # as training checks them, before any model is loaded
    models = [model] if isinstance(model, str) else list(model)
    results: dict[str, Results] = {}
    with tempfile.TemporaryDirectory(prefix="gcl-evaluate-") as scratch:
        # Every reference resolved first: a bad one fails before any model is evaluated.
        resolved = {reference: resolve_model(job, reference, tempfile.mkdtemp(dir=scratch)) for reference in models}
        with tqdm(
            total=len(models) * len(job.data.eval), desc="evaluating", unit="split", file=terminal(), dynamic_ncols=True
        ) as bar:
            for reference in models:
                encoder = row_encoder(job, resolved[reference])
                results[reference] = {}
                for split, spec in job.data.eval.items():
                    bar.set_postfix_str(f"{reference} {split}")
                    results[reference].update(evaluate_splits(encoder, {split: spec}, job.data, job.eval))
                    bar.update()
    if len(models) == 1:
        say(metrics_table(results[models[0]]))
        return results[models[0]]
    say(comparison_table(results, job.eval.measures))
    name = f"evaluate-{time.strftime('%Y%m%d-%H%M%S')}"
    directory = storage.local_path(storage.join(job.storage, job.name)) or tempfile.mkdtemp(prefix="gcl-")
    os.makedirs(directory, exist_ok=True)
    plot = comparison_plot(results, job.eval.objective, os.path.join(directory, f"{name}.png"))
    try:
        while_unreachable(
            lambda: _log_comparison(job, name, models, results, plot),
            job.mlflow.finish_wait_seconds,
            "while logging the comparison",
        )
    except Exception as err:
        if not is_outage(err):
            raise
        say(
            f"\nplot: {plot}\nwarning: the comparison was not logged to MLflow: the tracking store "
            f"{job.mlflow.resolved_uri()} cannot be reached ({type(err).__name__})"
        )
        return results
    say(f"\nplot: {plot} (and in MLflow run {name})")
    return results


def _log_comparison(job: JobConfig, name: str, models: list[str], results: dict, plot: str) -> None:
    """An MLflow run `name` holding the comparison's plot and figures (a retry resumes it)."""
    uri = job.mlflow.resolved_uri()
    run_id = start_run(uri, job.mlflow.experiment, name, {f"model_{i}": m for i, m in enumerate(models)})
    client = MlflowClient(uri)
    client.log_artifact(run_id, plot)
    client.log_dict(run_id, results, "evaluation.json")
    client.set_terminated(run_id)
