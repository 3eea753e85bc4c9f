"""Worker-side reading of the training data: each Ray Train worker reads its shard of an epoch
through a `ShardReader` (reading starts at once, so the next epoch's start-up can run while this
epoch trains) and `train_batches`, which keeps all ranks stepping together on full batches.

An epoch trains full batches only, as open_clip's loader does (drop_last): the shards are equal
(gcl.data.pipeline.equal_split_data_config) and each rank's partial last batch, fewer pairs than
a batch, waits for the next epoch's shuffle. A contrastive step over a few pairs has few
negatives, and over one pair none: its loss is 0 while the optimizer still steps on it.

Kept apart from gcl.data.pipeline, which defines the datasets: that module is imported by every
process that unpickles a dataset (Ray Data's split coordinators, one per epoch) and stays free
of torch, whose import costs ~2 s of CPU and ~500 MiB per process here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator

import torch


class ShardReader:
    """Torch batches of one worker's shard (one pass), reading started at once in a thread.

    An epoch's first batch waits for the pipeline's start-up: listing and reading the files, the
    global shuffle's all-to-all and the first preprocessing. A reader made for the next epoch
    while this one trains hides that wait. Which rows each worker gets does not depend on when
    it asks (the split assigns blocks in a fixed order), so prefetching keeps runs deterministic.
    """

    def __init__(
        self,
        shard,
        batch_size: int,
        *,
        local_shuffle_buffer: int = 0,
        seed: int | None = None,
        pin_memory: bool = False,
    ):
        # On a GPU worker Ray Data moves each batch to the worker's GPU ("auto" device), from
        # pinned memory when asked, in its prefetch threads.
        self._batches = iter(
            shard.iter_torch_batches(
                batch_size=batch_size,
                drop_last=True,
                pin_memory=pin_memory,
                local_shuffle_buffer_size=local_shuffle_buffer or None,
                local_shuffle_seed=seed if local_shuffle_buffer else None,
            )
        )
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
    batches: Iterable[dict[str, torch.Tensor]], batch_size: int, device: torch.device | str = "cpu"
) -> Iterator[dict[str, torch.Tensor]]:
    """Full batches of `batch_size` rows from a worker's shard (`batches`: a ShardReader of it),
    ranks in lockstep, on `device` (the worker's: NCCL reduces only CUDA tensors), each with a
    `valid` column (all True: the loss takes a mask).

    Each step all ranks agree (an all-reduce) that every rank has a full batch; the epoch ends at
    the first step where one has not, so no rank waits in a collective that another has left.
    """
    import torch.distributed as dist

    iterator = iter(batches)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    while True:
        batch = next(iterator, None)
        full = torch.tensor(
            [int(batch is not None and len(batch["score"]) == batch_size)], device=device if distributed else "cpu"
        )
        if distributed:
            dist.all_reduce(full, op=dist.ReduceOp.MIN)
        if not full.item():
            return
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        yield {**batch, "valid": torch.ones(batch_size, dtype=torch.bool, device=device)}
