"""The data pipeline timed alone: a whole epoch's pass through Ray Data (read, shuffle, decode,
transform, tokenize) with 1 or 2 preprocessing tasks, and the preprocessing step alone in one
process."""

from __future__ import annotations

import time

import torch

from gcl.data.pipeline import PairPreprocessor, PairSource, PipelineConfig, build_dataset
from gcl.job_config import JobConfig


def batch_from_pipeline(job: JobConfig, rows: int):
    """One preprocessed batch of `rows` pairs, as the trainers receive it."""
    source = PairSource.of_job(job.model_copy(update={"pipeline": PipelineConfig(cpus_per_task=1)}))
    ds = build_dataset(source, shuffle=False)
    batch = next(iter(ds.iter_torch_batches(batch_size=rows)))
    batch["valid"] = torch.ones(rows, dtype=torch.bool)
    return batch


def data_pipeline_pass(job: JobConfig, tasks: int, epochs: int = 3) -> tuple[float, float]:
    """(pairs/s, seconds to the first batch) of read -> shuffle -> decode/tokenize with `tasks`
    1-CPU tasks at once, over a whole epoch's pass (its shuffle and start-up included); the
    fastest pass after the first, which also starts Ray's worker processes, as in training after
    epoch 1."""
    pipeline = PipelineConfig(preprocess_tasks=tasks, cpus_per_task=1)
    source = PairSource.of_job(job.model_copy(update={"pipeline": pipeline}))
    passes = []
    for epoch in range(epochs):
        ds = build_dataset(source, seed=epoch)
        start, first, rows = time.perf_counter(), None, 0
        for batch in ds.iter_batches(batch_size=256, batch_format="numpy"):
            first = first or time.perf_counter() - start
            rows += len(batch["score"])
        passes.append((rows / (time.perf_counter() - start), first))
    return max(passes[1:])


def preprocessor_pairs_per_s(job: JobConfig, rows: int = 512) -> float:
    """Pairs/s of the decode/transform/tokenize step alone, in this process (one core)."""
    import pandas as pd

    frame = pd.read_parquet(job.data.train).head(rows)
    pre = PairPreprocessor(
        job.model.model_dump(), job.fields.model_dump(), job.loss.weight_key, job.data.model_dump(), None, augment=False
    )
    batch = {c: frame[c].to_numpy() for c in frame.columns}
    start = time.perf_counter()
    pre(batch)
    return len(frame) / (time.perf_counter() - start)
