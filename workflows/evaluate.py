"""`gcl evaluate`: retrieval metrics per split for any model reference: an exported model, a
training checkpoint or a run's directory (its latest checkpoint; local or on storage such as
s3://), a run's model or a registered model (`models:/name@alias`); see gcl.checkpoint."""

from __future__ import annotations

import tempfile

from gcl.checkpoint import resolve_model_dir
from gcl.job_config import JobConfig
from gcl.jobs import resolve_job
from gcl.report import metrics_table
from gcl.retrieval import RowEncoder, evaluate_splits


def run_evaluate(job: JobConfig, model: str) -> dict[str, dict[str, float]]:
    """Evaluate `model` on the job's evaluation splits, print a table, return the metrics."""
    job = resolve_job(job)
    with tempfile.TemporaryDirectory(prefix="gcl-evaluate-") as scratch:
        model_dir = resolve_model_dir(model, scratch, job.mlflow.resolved_uri(), fallback_job=job)
        # A plain open_clip directory has no gcl_fields.json: the job's fields say how to feed it.
        encoder = RowEncoder.from_model_dir(model_dir, fields=job.fields)
    results = evaluate_splits(encoder, job.data.eval, job.data, job.eval)
    print(metrics_table(results))
    return results
