"""`gcl data grades`: graded pairs from a search log, position bias taken out (gcl.data.grades);
this recipe prints the report and logs it, with its plot, to an MLflow run `grades-<time>`."""

from __future__ import annotations

import json
import os
import tempfile
import time

from gcl.console import say
from gcl.data.grades import GradesReport, make_grades, report_lines
from gcl.job_config import JobConfig
from gcl.report import grades_plot
from gcl.train.job import resolve_job


def run_grades(job: JobConfig) -> GradesReport:
    """Grade job.grades.log into job.grades.out, print the report and log it to MLflow."""
    job = resolve_job(job)
    report = make_grades(job.grades, job.pipeline.cpus_per_task)
    for line in report_lines(report):
        say(line)
    _log(job, report)
    return report


def _log(job: JobConfig, report: GradesReport) -> None:
    """An MLflow run holding the report (JSON), its plot and the grading's settings as params."""
    from mlflow import MlflowClient

    from gcl.tracking.runs import check_tracking, flatten, start_run

    uri = job.mlflow.resolved_uri()
    check_tracking(uri)
    name = f"grades-{time.strftime('%Y%m%d-%H%M%S')}"
    run_id = start_run(uri, job.mlflow.experiment, name, flatten("grades", job.grades.model_dump(mode="json"), {}))
    client = MlflowClient(uri)
    with tempfile.TemporaryDirectory() as scratch:
        client.log_artifact(run_id, grades_plot(report, os.path.join(scratch, "grades.png")))
        with open(os.path.join(scratch, "grades-report.json"), "w") as f:
            json.dump(report.__dict__, f, indent=2, default=str)
        client.log_artifact(run_id, f.name)
    client.log_metric(run_id, "several_positions_share", report.several_positions_share)
    client.log_metric(run_id, "pairs_written", report.written)
    client.set_terminated(run_id)
    say(f"report and plot in MLflow run {name} ({uri})")
