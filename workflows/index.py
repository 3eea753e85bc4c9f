"""`gcl index`: a FAISS index of `gcl embed`'s output, saved with its id map; with --register, the
embedding model and the index logged and registered as one servable search model."""

from __future__ import annotations

from gcl import storage
from gcl.console import say
from gcl.errors import TrackingError
from gcl.job_config import JobConfig
from gcl.search.faiss_index import build_index
from gcl.tracking.runs import check_tracking
from gcl.train.job import resolve_job


def run_index(job: JobConfig, register: str | None = None) -> dict:
    """Build job.index; register it as `register` when given. Returns index.json's contents (and
    the registered version and alias)."""
    job = resolve_job(job)
    if register:  # the store answers before the index is built
        check_tracking(job.mlflow.resolved_uri())
    cfg = job.index.model_copy(
        update={"embeddings": storage.absolute(job.index.embeddings), "out": storage.absolute(job.index.out)}
    )
    built = build_index(cfg)
    say(
        f"{built['kind']} index of {built['rows']} vectors ({built['dim']} dimensions) "
        f"in {built['build_seconds']:.1f} s, "
        f"{built['index_bytes'] / 2**20:.1f} MiB: {cfg.out}"
    )
    if register:
        version, alias = _register(job, cfg.out, register)
        say(f"registered search model {register} version {version} as @{alias}")
        built.update(version=version, alias=alias)
    return built


def _register(job: JobConfig, index_dir: str, name: str) -> tuple[str, str]:
    """register_search_index, tried again while the tracking store is out (for up to
    mlflow.finish_wait_seconds); then an error saying the index is complete and nothing registered."""
    from gcl.search.register import register_search_index
    from gcl.tracking.buffer import is_outage, while_unreachable

    uri = job.mlflow.resolved_uri()
    try:
        return while_unreachable(
            lambda: register_search_index(index_dir, name, uri, job.mlflow.experiment),
            job.mlflow.finish_wait_seconds,
            "while registering the search model",
        )
    except Exception as err:
        if not is_outage(err):
            raise
        raise TrackingError(
            f"the index is complete in {index_dir}, but the MLflow tracking store {uri} cannot be reached "
            f"({type(err).__name__}: {str(err)[:200]}) to register it: no version of {name} was "
            "registered. When the store answers, the same command registers it (and ends the run "
            f"index-{name} if this one left it unfinished)"
        ) from None
