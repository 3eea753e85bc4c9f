"""`gcl submit`: run a gcl command (train, tune, evaluate, ...) as a Ray Job on a cluster.

Wraps Ray's Job Submission SDK: the command runs on the cluster as
`python -m workflows.cli <command>` in the runtime environment (the working directory
uploaded, or the image's installed gcl), its logs stream here, and the exit status is the
job's (0 only for SUCCEEDED). `ray job submit` does the same; see cluster/README.md.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from pathlib import Path

import yaml

from gcl.errors import ClusterError, ConfigError

log = logging.getLogger("gcl.submit")
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Forwarded from this shell unless the runtime env sets them: where runs are tracked must be
# the same for the cluster as for the user (a known pitfall: jobs logging to a default local store).
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME")


def entrypoint(command: list[str]) -> str:
    """The shell command the job runs: gcl's CLI from the job's working directory or image."""
    return shlex.join(["python", "-m", "workflows.cli", *command])


def runtime_env(path: str | None, working_dir: str | None, env: list[str]) -> dict:
    """The job's runtime environment: `path` (YAML) if given, `working_dir` replacing its own,
    `env` (KEY=VALUE) and forwarded MLflow variables merged into env_vars."""
    spec: dict = {}
    if path:
        with open(path) as f:
            spec = yaml.safe_load(f) or {}
        if not isinstance(spec, dict):
            raise ConfigError(f"{path}: a runtime environment is a mapping (working_dir, env_vars, pip, ...)")
        if spec.get("working_dir") and not working_dir:  # relative to the file, like every config path
            spec["working_dir"] = str((Path(path).parent / spec["working_dir"]).resolve())
    if working_dir:
        spec["working_dir"] = str(Path(working_dir).resolve())
    env_vars = dict(spec.get("env_vars") or {})
    for name in FORWARDED_ENV:
        if os.environ.get(name) and name not in env_vars:
            env_vars[name] = os.environ[name]
    for item in env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--env {item!r}: expected KEY=VALUE")
        env_vars[key] = value
    if env_vars:
        spec["env_vars"] = {k: str(v) for k, v in env_vars.items()}
    return spec


def _auth_mode_for_token() -> None:
    """Ray clusters started with token auth (the default for local clusters since Ray 2.59) need
    the token on every request; Ray's client sends it only with RAY_AUTH_MODE=token."""
    if os.environ.get("RAY_AUTH_MODE"):
        return
    token_file = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.exists(token_file):
        os.environ["RAY_AUTH_MODE"] = "token"


PROBE = "import gcl.train.job, workflows.cli"  # what the job's command needs on the cluster


def check_cluster_imports_gcl(client, address: str, env_spec: dict, timeout: float = 300) -> None:
    """Before the job: a short probe job, in the same runtime environment, that imports what the
    job will run; a ClusterError says what the cluster lacks and how to give it, where otherwise
    the job would fail on the cluster with `No module named ...` in its log."""
    import time

    from ray.job_submission import JobStatus

    probe = client.submit_job(
        entrypoint=shlex.join(["python", "-c", PROBE]), runtime_env=env_spec or None, metadata={"gcl.probe": "imports"}
    )
    deadline = time.monotonic() + timeout
    while (status := client.get_job_status(probe)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        if time.monotonic() > deadline:
            raise ClusterError(
                f"the Ray cluster at {address} did not run a probe job within {timeout:.0f} s "
                f"(it stays {status.value}); is it out of resources?"
            )
        time.sleep(0.5)
    if status != JobStatus.SUCCEEDED:
        last = (client.get_job_logs(probe).strip().splitlines() or ["(no output)"])[-1]
        raise ClusterError(
            f"the Ray cluster at {address} cannot import gcl in this runtime environment ({last}); "
            "give it gcl: submit from the repository with --working-dir . --runtime-env "
            "cluster/runtime_env.yaml (which installs its dependencies), or run the cluster from "
            "the image the Dockerfile builds (cluster/README.md)"
        )


def submit(
    address: str | None, command: list[str], env_spec: dict, wait: bool = True, submission_id: str | None = None
) -> int:
    """Submit `command` as a Ray Job; with `wait`, stream its logs and return 0 only if it
    SUCCEEDED (1 otherwise). Without `wait`, return 0 once submitted."""
    import asyncio

    _auth_mode_for_token()  # before Ray is imported: it reads the auth mode once
    from ray.job_submission import JobStatus, JobSubmissionClient

    address = address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    try:
        client = JobSubmissionClient(address)
    except Exception as err:  # ConnectionError, auth errors: name the address
        raise ClusterError(f"cannot reach the Ray job server at {address}: {err}") from None
    check_cluster_imports_gcl(client, address, env_spec)
    job_id = client.submit_job(
        entrypoint=entrypoint(command),
        runtime_env=env_spec or None,
        submission_id=submission_id,
        metadata={"gcl.command": shlex.join(command)},
    )
    print(f"submitted {job_id} to {address}: {entrypoint(command)}", flush=True)
    if not wait:
        print(f"follow it with: ray job logs --address {address} --follow {job_id}")
        return 0

    async def stream() -> None:
        async for lines in client.tail_job_logs(job_id):
            sys.stdout.write(lines)
            sys.stdout.flush()

    try:
        asyncio.run(stream())
    except KeyboardInterrupt:
        print(f"\nstopped following; the job goes on. Stop it with: ray job stop --address {address} {job_id}")
        return 130
    status = client.get_job_status(job_id)
    info = client.get_job_info(job_id)
    print(f"job {job_id}: {status.value}" + (f" ({info.message})" if info.message else ""), flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1
