"""Connecting to Ray: a cluster at RAY_ADDRESS, or a local one whose dashboard is on 127.0.0.1."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)
# Every worker process: keep each tokenizer from oversubscribing the cores.
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false"}
# Ray Train on one machine that gcl started: no preemption to watch for, and the controller checks
# on its workers every 0.5 s instead of 2 s (each phase of a run, from placement to the end, waits
# for a check: 2 s a check cost a tiny training a quarter of its time).
LOCAL_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """A ClusterError, in seconds, when nothing answers at the Ray address (host:port of its GCS, or
    ray://host:port); Ray's own connect would retry for a minute or more first."""
    import socket

    from gcl.errors import ClusterError

    if address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(
            f"RAY_ADDRESS={address}: expected host:port of the cluster's head (e.g. 10.0.0.5:6379) "
            "or ray://host:10001; unset it to start a local cluster"
        )
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise ClusterError(
            f"RAY_ADDRESS={address}: no Ray cluster answers there ({err.strerror or err}); start it "
            "(ray start --head), correct the address, or unset RAY_ADDRESS to start a local cluster"
        ) from None


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to the cluster at `address` / RAY_ADDRESS, or start a local one.

    The local cluster's dashboard and job API listen on 127.0.0.1 only. Its gRPC servers (GCS,
    raylet, workers) listen on every interface: Ray replaces a loopback node address with the
    machine's (`services.resolve_ip_for_localhost`), so there is no loopback-only local cluster;
    they refuse clients without the cluster's token (token auth is on for local clusters).
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address)
        env_vars = dict(WORKER_ENV)
        if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
            # A submitted Ray Job: its runtime env already applies here, and Ray refuses a ray.init
            # runtime env that sets the same variables again.
            env_vars = {k: v for k, v in env_vars.items() if k not in os.environ}
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, runtime_env={"env_vars": env_vars} if env_vars else None, log_to_driver=True)
        return
    # A local cluster's processes inherit this process's environment. Set there rather than as a
    # job runtime env, the workers Ray starts ahead of time serve the job's first actors (a runtime
    # env would give every task and actor a new process).
    for key, value in {**WORKER_ENV, **LOCAL_TRAIN_ENV}.items():
        os.environ.setdefault(key, value)
    # The dashboard serves Ray's state API, which Ray Train's placement-group cleaner needs to free
    # the workers of a trial that Tune stopped early; it listens on loopback only.
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        configure_logging=True,
        logging_level=logging.WARNING,
    )
