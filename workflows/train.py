"""`gcl train`: validate the data, then fine-tune with Ray Train workers running DeepSpeed,
evaluate every epoch, track everything in MLflow and export (and optionally register) the model.
The steps are gcl.jobs.run_train's; this recipe prints what they produced."""

from __future__ import annotations

import json

from gcl.job_config import JobConfig
from gcl.jobs import TrainResult, run_train


def train(job: JobConfig) -> TrainResult:
    """Train `job` end to end and print the run, the model's location and the final metrics."""
    result = run_train(job)
    summary = {"run_id": result.run_id, "model_dir": result.model_dir, "metrics": result.metrics}
    print(json.dumps(summary, indent=2))
    return result
