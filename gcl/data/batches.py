"""Worker-side reading of the training data: each Ray Train worker reads its shard of an epoch
through a `ShardReader` (reading starts at once, so the next epoch's start-up can run while this
epoch trains) and `train_batches`, which pads the last batch with invalid rows and keeps all
ranks stepping together, so every valid row is used exactly once per epoch and no row is
dropped to make shards equal.

Kept apart from gcl.data.pipeline, which defines the datasets: that module is imported by every
process that unpickles a dataset (Ray Data's split coordinators, one per epoch) and stays free
of torch, whose import costs ~2 s of CPU and ~500 MiB per process here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from gcl.config import FieldsConfig
from gcl.data.pipeline import PRESENT


def _pad(batch: dict[str, torch.Tensor], size: int) -> dict[str, torch.Tensor]:
    """Pad a batch to `size` rows; padded rows have valid=False."""
    n = len(batch["score"])
    out = {}
    for key, value in batch.items():
        pad = torch.zeros((size - n, *value.shape[1:]), dtype=value.dtype, device=value.device)
        out[key] = torch.cat([value, pad]) if n < size else value
    valid = torch.zeros(size, dtype=torch.bool, device=batch["score"].device)
    valid[:n] = True
    out["valid"] = valid
    return out


class ShardReader:
    """Torch batches of one worker's shard (one pass), reading started at once in a thread.

    An epoch's first batch waits for the pipeline's start-up: listing and reading the files, the
    global shuffle's all-to-all and the first preprocessing. A reader made for the next epoch
    while this one trains hides that wait. Which rows each worker gets does not depend on when
    it asks (the split assigns blocks in a fixed order), so prefetching keeps runs deterministic.
    """

    def __init__(self, shard, batch_size: int, *, local_shuffle_buffer: int = 0, seed: int | None = None,
                 pin_memory: bool = False):  # fmt: skip
        # On a GPU worker Ray Data moves each batch to the worker's GPU ("auto" device), from
        # pinned memory when asked, in its prefetch threads.
        self._batches = iter(
            shard.iter_torch_batches(
                batch_size=batch_size, drop_last=False, pin_memory=pin_memory,
                local_shuffle_buffer_size=local_shuffle_buffer or None,
                local_shuffle_seed=seed if local_shuffle_buffer else None,
            )
        )  # fmt: skip
        self._first: dict | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._fetch_first, name="gcl-shard-reader", daemon=True)
        self._thread.start()

    def _fetch_first(self) -> None:
        try:
            self._first = next(self._batches, None)
        except BaseException as err:  # re-raised in the training thread
            self._error = err

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._first is not None:
            yield self._first
            yield from self._batches


class WaitClock:
    """Iterates `batches`, adding up the seconds spent waiting for each (`seconds`): the time a
    trainer is starved of data, which work done between batches does not count towards."""

    def __init__(self, batches: Iterable):
        self._batches = iter(batches)
        self.seconds = 0.0

    def __iter__(self) -> WaitClock:
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self._batches)
        finally:
            self.seconds += time.perf_counter() - start


def train_batches(
    batches: Iterable[dict[str, torch.Tensor]],
    batch_size: int,
    template: dict[str, tuple[tuple[int, ...], torch.dtype]],
    device: torch.device | str = "cpu",
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of exactly `batch_size` rows from a worker's shard (`batches`: a ShardReader of
    it, batch_size rows each), ranks in lockstep, on `device` (the worker's: NCCL reduces only
    CUDA tensors, and padding must sit where the batch does).

    Each step all ranks agree (an all-reduce) whether any rank still has data; a rank
    that has run out contributes an all-invalid batch built from `template`
    (column -> (row shape, dtype)). The last partial batch is padded with invalid rows.
    """
    import torch.distributed as dist

    iterator = iter(batches)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    while True:
        batch = next(iterator, None)
        more = torch.tensor([0 if batch is None else 1], device=device)
        if distributed:
            dist.all_reduce(more, op=dist.ReduceOp.MAX)
        if not more.item():
            return
        if batch is None:
            batch = {k: torch.zeros((0, *shape), dtype=dtype) for k, (shape, dtype) in template.items()}
        yield _pad({k: v.to(device, non_blocking=True) for k, v in batch.items()}, batch_size)


def batch_template(
    fields: FieldsConfig, context_length: int, image_size: int
) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Column -> (row shape, dtype) of the pipeline's output, for padding."""
    template: dict[str, tuple[tuple[int, ...], Any]] = {}
    for name, modality in fields.modalities().items():
        shape = (context_length,) if modality == "text" else (3, image_size, image_size)
        template[name] = (shape, torch.int64 if modality == "text" else torch.uint8)
        template[name + PRESENT] = ((), torch.bool)
    template.update(score=((), torch.float32), query_key=((), torch.int64), document_key=((), torch.int64),
                    pair_key=((), torch.int64))  # fmt: skip
    return template
