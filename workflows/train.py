"""`gcl train`: validate the data, then fine-tune with Ray Train workers running DeepSpeed,
evaluate every epoch, track everything in MLflow and export (and optionally register) the model."""

from __future__ import annotations

from dataclasses import dataclass

from gcl.job_config import JobConfig


@dataclass
class TrainResult:
    """What a finished training run produced."""

    run_id: str
    model_dir: str
    metrics: dict


def run_train(job: JobConfig) -> TrainResult:
    """Train `job` end to end and return the exported model and final metrics; registers the
    model when `mlflow.registered_model` is set."""
    import ray
    from mlflow import MlflowClient

    from gcl.cluster import init_ray
    from gcl.data.manifest import dataset_manifest
    from gcl.jobs import check_resources, export_model, fit, prepare
    from gcl.registry import register_run
    from gcl.tracking import flatten, start_run

    job, report = prepare(job)
    uri = job.mlflow.resolved_uri()
    init_ray()
    check_resources(job, ray.cluster_resources())
    run_id = start_run(uri, job.mlflow.experiment, job.name, flatten("", job.model_dump(mode="json"), {}))
    client = MlflowClient(uri)
    client.log_metric(run_id, "data_rows_skipped", len(report.bad_row_keys))
    try:
        result = fit(job, report, run_id)
    except Exception as err:  # the run says why it failed; the same command resumes it
        client.set_tag(run_id, "gcl.error", f"{type(err).__name__}: {err}"[:5000])
        client.set_terminated(run_id, "FAILED")
        raise
    model_dir = export_model(job, result.checkpoint, run_id, dataset_manifest(job.data))
    client.set_terminated(run_id)
    if job.mlflow.registered_model:
        register_run(run_id, job.mlflow.registered_model, uri)
    return TrainResult(run_id=run_id, model_dir=model_dir, metrics=dict(result.metrics))
