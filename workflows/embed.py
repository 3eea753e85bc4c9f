"""`gcl embed`: a catalog (or a list of queries) embedded by a model on the Ray cluster, written as
parquet (or Lance) for `gcl index` or a vector database; see gcl.search.batch_embed."""

from __future__ import annotations

import os

from tqdm import tqdm

from gcl import storage
from gcl.console import say, terminal
from gcl.job_config import JobConfig
from gcl.search.batch_embed import embed_rows
from gcl.tracking.runs import check_tracking
from gcl.train.job import resolve_job


def run_embed(job: JobConfig) -> dict:
    """Embed job.embed.input with job.embed.model into job.embed.out; print and return the summary."""
    job = resolve_job(job)
    check_tracking(job.mlflow.resolved_uri())
    cfg = job.embed
    model = cfg.model
    if model and not model.startswith(("models:/", "runs:/")) and os.path.exists(model):
        model = os.path.abspath(model)
    cfg = cfg.model_copy(
        update={"model": model, "input": storage.absolute(cfg.input), "out": storage.absolute(cfg.out)}
    )
    bars: list[tqdm] = []  # drawn from the first rows embedded: a bad model or input fails before any bar

    def progress(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(desc="embedding", unit="row", file=terminal(), dynamic_ncols=True, mininterval=0.5))
        bars[0].total = total
        bars[0].update(done - bars[0].n)

    try:
        summary = embed_rows(job, cfg, job.mlflow.resolved_uri(), use_gpu=job.scaling.use_gpu, progress=progress)
    finally:
        for bar in bars:
            bar.close()
    skipped = f", {summary['bad_rows']} bad rows skipped ({summary['bad_reasons']})" if summary["bad_rows"] else ""
    say(f"embedded {summary['rows']} rows with {summary['model_uri']} ({summary['dim']} dimensions){skipped}")
    say(f"embeddings: {summary['out']}")
    return summary
