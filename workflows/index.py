"""`gcl index`: a FAISS index of `gcl embed`'s output, saved with its id map; with --register, the
embedding model and the index logged and registered as one servable search model."""

from __future__ import annotations

from gcl import storage
from gcl.console import say
from gcl.job_config import JobConfig
from gcl.registry.runs import check_tracking
from gcl.search.index import build_index
from gcl.train.job import resolve_job


def run_index(job: JobConfig, register: str | None = None) -> dict:
    """Build job.index; register it as `register` when given. Returns index.json's contents (and
    the registered version and alias)."""
    job = resolve_job(job)
    if register:  # the store answers before the index is built
        check_tracking(job.mlflow.resolved_uri())
    cfg = job.index.model_copy(update={"embeddings": storage.absolute(job.index.embeddings),
                                       "out": storage.absolute(job.index.out)})  # fmt: skip
    built = build_index(cfg)
    say(f"{built['kind']} index of {built['rows']} vectors ({built['dim']} dimensions) in {built['build_seconds']:.1f} s, "
        f"{built['index_bytes'] / 2**20:.1f} MiB: {cfg.out}")  # fmt: skip
    if register:
        from gcl.search.register import register_search_index

        version, alias = register_search_index(cfg.out, register, job.mlflow.resolved_uri(), job.mlflow.experiment)
        say(f"registered search model {register} version {version} as @{alias}")
        built.update(version=version, alias=alias)
    return built
