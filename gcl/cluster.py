"""Connecting to Ray: a cluster at RAY_ADDRESS, or a local one whose dashboard is on 127.0.0.1."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


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
    # Worker processes inherit this: keep each from oversubscribing the cores.
    env_vars = {"TOKENIZERS_PARALLELISM": "false"}
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
        # A submitted Ray Job: its runtime env already applies here, and Ray refuses a ray.init
        # runtime env that sets the same variables again.
        env_vars = {k: v for k, v in env_vars.items() if k not in os.environ}
    runtime_env = {"env_vars": env_vars} if env_vars else None
    if address:
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        return
    # The dashboard serves Ray's state API, which Ray Train's placement-group cleaner needs to free
    # the workers of a trial that Tune stopped early; it listens on loopback only.
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        runtime_env=runtime_env,
        configure_logging=True,
        logging_level=logging.WARNING,
    )
