"""`gcl train`: validate the data, then fine-tune with Ray Train workers running DeepSpeed,
evaluate every epoch, track everything in MLflow and export (and optionally register) the model.
The steps are gcl.train.job.run_train's; this recipe prints what they produced."""

from __future__ import annotations

from gcl.console import say
from gcl.job_config import JobConfig
from gcl.report import metrics_table, relative_change, split_metrics
from gcl.tracking.names import OBJECTIVE, TEST_OBJECTIVE, VALIDATION_PREFIX
from gcl.train.job import TrainResult, resolve_job, run_train


def train(job: JobConfig) -> TrainResult:
    """Train `job` end to end and print the run, the model's location and the final metrics."""
    job = resolve_job(job)  # the tracking URI, for the summary's look-up below
    result = run_train(job)
    say(f"\nrun {job.name}: MLflow run {result.run_id}")
    say(f"model: {result.model_dir}")
    for title, prefix in (("test splits", ""), ("validation splits", VALIDATION_PREFIX)):
        results = split_metrics(result.metrics, prefix)
        if results:
            say(f"\n{title}, last epoch:\n{metrics_table(results)}")
    if TEST_OBJECTIVE in result.metrics:
        scores = f"test {result.metrics[TEST_OBJECTIVE]:.4f}"
        if job.data.validation:
            scores = f"validation {result.metrics[OBJECTIVE]:.4f}, {scores}"
        start = _starting_test_objective(job, result.run_id)
        if start is not None:
            change = relative_change(result.metrics[TEST_OBJECTIVE], start)
            scores += f"; the starting model: test {start:.4f}" + ("" if change is None else f" ({change:+.1f}%)")
        say(f"\n{job.eval.objective_name()}: {scores}")
    return result


def _starting_test_objective(job: JobConfig, run_id: str) -> float | None:
    """The test objective of the model before training (epoch 0, eval.before_training), if logged."""
    from mlflow import MlflowClient

    history = MlflowClient(job.mlflow.resolved_uri()).get_metric_history(run_id, TEST_OBJECTIVE)
    return next((m.value for m in history if m.step == 0), None)
