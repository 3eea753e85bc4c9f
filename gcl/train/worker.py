"""What runs inside each Ray Train worker: a DeepSpeed engine fine-tuning an open_clip model with
the GCL loss on the worker's data shard, checkpointing every epoch.

Rank 0 evaluates retrieval after each epoch and logs metrics to MLflow; every rank writes its
ZeRO shard into the epoch's checkpoint, which Ray Train merges. The loop reads as Ray Train's
examples do: set up, restore, then per epoch train, evaluate, save and report.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from gcl import storage
from gcl.data.batches import ShardReader, WaitClock, train_batches
from gcl.data.locked_features import FeatureStore
from gcl.data.pipeline import epoch_dataset_name
from gcl.errors import TrainingError, explained_cause
from gcl.job_config import JobConfig
from gcl.loss import GCLLoss
from gcl.model import create_preprocessing
from gcl.retrieval import RowEncoder, evaluate_splits, objective_value
from gcl.tracking.names import (
    EVAL_SAMPLE_QUERIES,
    EVAL_SECONDS,
    OBJECTIVE,
    SAMPLE_PREFIX,
    TEST_OBJECTIVE,
    VALIDATION_PREFIX,
    WORKERS_TAG,
)
from gcl.tracking.runs import MetricsLogger
from gcl.train.checkpoint import (
    TrainState,
    checkpoint_state,
    has_zero_shards,
    restore_checkpoint,
    save_checkpoint,
)
from gcl.train.engine import setup_engine
from gcl.train.micro_batch import backward_micro_batch
from gcl.train.progress import ProgressPoster
from gcl.train.step_gate import StepGate
from gcl.train.worker_eval import evaluate_splits_on_workers

log = logging.getLogger(__name__)
Results = dict[str, dict[str, float]]  # split -> measure -> value


class EpochReaders:
    """Each epoch's ShardReader, made when the epoch starts or, with pipeline.prefetch_next_epoch,
    as soon as the previous epoch's first batch has arrived (its start-up then overlaps training)."""

    def __init__(self, job: JobConfig, pin_memory: bool):
        self.job = job
        self.pin_memory = pin_memory
        self._readers: dict[int, ShardReader] = {}

    def start(self, epoch: int) -> None:
        import ray.train

        if epoch < self.job.train.epochs and epoch not in self._readers:
            shard = ray.train.get_dataset_shard(epoch_dataset_name(epoch))
            self._readers[epoch] = ShardReader(
                shard,
                self.job.train.batch_size,
                pin_memory=self.pin_memory,
                local_shuffle_buffer=self.job.pipeline.local_shuffle_buffer,
                seed=self.job.seed * 1000 + epoch,
            )

    def take(self, epoch: int) -> ShardReader:
        self.start(epoch)
        return self._readers.pop(epoch)


@dataclass
class Worker:
    """What a training worker holds across epochs."""

    job: JobConfig
    engine: Any  # the DeepSpeed engine around a FieldEncoder
    scheduler: Any
    loss_fn: GCLLoss
    metrics_log: MetricsLogger
    readers: EpochReaders
    rank: int
    world: int
    progress: ProgressPoster  # rank 0 feeds the driver's progress bar
    gate: StepGate  # a test-only seam (gcl.train.step_gate): inert unless a fault test sets it
    features: FeatureStore | None = None  # a locked image tower's features (gcl.data.locked_features)


@dataclass
class EpochStats:
    """What one epoch measured on this rank (times from time.perf_counter)."""

    start: float
    end: float = 0.0
    loss_sum: float = 0.0  # the job's loss (every rank's valid pairs) x its valid pairs, over the epoch's steps
    loss_pairs: float = 0.0  # every rank's valid pairs over the epoch's steps
    steps: int = 0
    pairs: int = 0  # valid pairs trained on
    first_batch_at: float | None = None
    first_batch_pairs: int = 0
    data_wait: WaitClock | None = field(default=None, repr=False)  # seconds spent waiting for batches


def setup_worker(
    job: JobConfig,
    steps_per_epoch: int,
    tracking_uri: str | None,
    run_id: str | None,
    readers: EpochReaders,
    progress_board: str | None = None,
) -> Worker:
    """The engine, loss, metrics logger and progress poster of this rank, with its epoch readers."""
    import ray.train

    torch.set_num_threads(job.scaling.torch_threads)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    optimizer_steps = job.train.epochs * math.ceil(steps_per_epoch / job.train.grad_accum)
    # A resumed run keeps the ZeRO stage its checkpoint was saved at (see engine_zero_stage).
    checkpoint = ray.train.get_checkpoint()
    resumes_zero_shards = checkpoint is not None and has_zero_shards(checkpoint.path, checkpoint.filesystem)
    engine, scheduler, _ = setup_engine(job, optimizer_steps, resumes_zero_shards)
    loss_fn = GCLLoss(job.loss, job.fields.weights("left"), job.fields.weights("right"), rank=rank, world_size=world)
    metrics_log = MetricsLogger(
        tracking_uri,
        run_id,
        enabled=rank == 0,
        run_dir=storage.join(job.storage, job.name),
        flush_seconds=job.mlflow.flush_seconds,
    )
    metrics_log.check_run()
    metrics_log.set_tag(WORKERS_TAG, json.dumps(_worker_placement(device=str(engine.device))))
    progress = ProgressPoster(progress_board, enabled=rank == 0)
    return Worker(
        job,
        engine,
        scheduler,
        loss_fn,
        metrics_log,
        readers,
        rank,
        world,
        progress,
        StepGate(job.name, enabled=rank == 0),
    )


def restore(worker: Worker) -> TrainState:
    """Resume from the checkpoint Ray Train hands this attempt (after a restart or a re-run), if any."""
    import ray.train

    state = restore_checkpoint(worker.engine, ray.train.get_checkpoint())
    if state.step and worker.rank == 0:
        log.info("resumed from epoch %d, step %d", state.epoch, state.step)
    return state


def accumulation_groups(batches: Iterable[dict], grad_accum: int) -> Iterator[list[dict]]:
    """The epoch's batches in groups of `grad_accum` (the last one shorter when the epoch's steps do
    not divide by it): each group is one optimizer step, so every epoch, and so every checkpoint,
    ends on an optimizer step. Holds one group's batches at once, as Hugging Face's Trainer does."""
    group: list[dict] = []
    for batch in batches:
        group.append(batch)
        if len(group) == grad_accum:
            yield group
            group = []
    if group:
        yield group


def train_epoch(worker: Worker, epoch: int, step: int) -> tuple[EpochStats, int]:
    """Train one epoch of this rank's shard; returns its stats and the step (micro-batch) reached.
    Each optimizer step averages the gradients of its group's micro-batches."""
    job, engine = worker.job, worker.engine
    # What an epoch trains depends on the job, the epoch and the rank alone, not on what ran before
    # it in this process (an evaluation, a restore): the model's modes are set here, as open_clip's
    # loop sets them each epoch, and dropout's random stream is seeded from (seed, epoch, rank).
    engine.train()
    torch.manual_seed(training_seed(job.seed, epoch, worker.rank))
    stats = EpochStats(start=time.perf_counter(), data_wait=WaitClock(worker.readers.take(epoch)))
    batches = train_batches(stats.data_wait, job.train.batch_size, engine.device)
    for group in accumulation_groups(batches, job.train.grad_accum):
        if stats.first_batch_at is None:
            stats.first_batch_at = time.perf_counter()
            stats.first_batch_pairs = sum(int(batch["valid"].sum()) for batch in group)  # arrived in start-up
            if job.pipeline.prefetch_next_epoch:  # its start-up overlaps this epoch's training
                worker.readers.start(epoch + 1)
        for position, batch in enumerate(group):
            worker.gate.before_step(step + 1, while_waiting=worker.metrics_log.flush)
            tick = time.perf_counter()
            loss, terms, log_scale = backward_micro_batch(
                engine,
                worker.loss_fn,
                job.fields,
                batch,
                len(group),
                boundary=position == len(group) - 1,
                chunk=job.train.embed_chunk,
            )
            engine.step()  # the optimizer steps on the group's last micro-batch only
            step += 1
            loss_value, term_values, pairs = job_loss(loss, terms, batch["valid"])
            if not math.isfinite(loss_value):  # every rank has the same value: all stop here
                raise diverged(job, step, loss_value)
            stats.loss_sum += loss_value * pairs
            stats.loss_pairs += pairs
            stats.steps += 1
            stats.pairs += int(batch["valid"].sum())
            now = time.perf_counter()
            pairs_per_s = worker.world * job.train.batch_size / max(now - tick, 1e-9)
            worker.metrics_log.log(
                {
                    "loss": loss_value,
                    "lr": worker.scheduler.get_last_lr()[0],
                    "pairs_per_s": pairs_per_s,
                    "logit_scale": log_scale.exp().item(),
                    **{f"loss_{k}": v for k, v in term_values.items()},
                },
                step,
            )
            worker.progress.post(
                phase="training",
                epoch=epoch + 1,
                step=step,
                loss=loss_value,
                pairs_per_s=worker.world * stats.pairs / max(now - stats.start, 1e-9),
            )
    stats.end = time.perf_counter()
    stats.first_batch_at = stats.first_batch_at or stats.end
    return stats, step


def diverged(job: JobConfig, step: int, loss: float) -> TrainingError:
    """The error that stops a run whose loss is no longer a number: nothing after it can learn."""
    return TrainingError(
        f"run {job.name}: the loss is {loss} at step {step}: training diverged and stops here. Likely causes: a "
        f"learning rate too high for this model (train.lr={job.train.lr:g}; try a tenth), or scores in "
        f"{job.loss.weight_key!r} that overflow the weight function (loss.weight_fn={job.loss.weight_fn}; check the "
        "data's largest values, or set loss.score_range)"
    )


def training_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of rank `rank`'s random stream in epoch `epoch` (dropout, augmentation on the worker)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{epoch}:{rank}".encode(), digest_size=8).digest(), "little")


def job_loss(
    loss: torch.Tensor, terms: dict[str, torch.Tensor], valid: torch.Tensor
) -> tuple[float, dict[str, float], float]:
    """A micro-batch's loss and its terms over every rank's valid pairs, and those pairs' number:
    what a person reads as the job's loss. Each rank's loss is a mean over its batch's rows with
    padding rows weighing 0, so a rank whose shard ran out shows 0 and a partial last batch shows
    less than its pairs' loss; here each is weighted back by its rows and divided by all ranks'
    valid pairs (one all-reduce; every rank gets the same). loss: () tensor; terms: name -> ();
    valid: (B,) bool."""
    rows = valid.shape[0]
    packed = torch.stack(
        [loss.detach().float() * rows, *(t.detach().float() * rows for t in terms.values()), valid.sum().float()]
    )
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(packed)
    values = packed.tolist()
    pairs = values[-1]
    per_pair = [v / max(pairs, 1.0) for v in values[:-1]]
    return per_pair[0], dict(zip(terms, per_pair[1:], strict=True)), pairs


def epoch_metrics(stats: EpochStats, world: int, data_wait_seconds: float) -> dict[str, float]:
    """The epoch's training metrics. Data waits are included in its rates, evaluation is not;
    `steady`: after the first batch arrived, without the epoch's start-up (the pipeline's read,
    shuffle and first batch). data_wait_seconds: the longest any rank waited for batches."""
    elapsed = max(stats.end - stats.start, 1e-9)
    steady_pairs = stats.pairs - stats.first_batch_pairs
    return {
        "train_loss": stats.loss_sum / max(stats.loss_pairs, 1),
        "epoch_seconds": time.perf_counter() - stats.start,
        "epoch_pairs_per_s": world * stats.pairs / elapsed,
        "epoch_first_batch_seconds": stats.first_batch_at - stats.start,
        "epoch_data_wait_seconds": data_wait_seconds,
        "epoch_data_wait_fraction": data_wait_seconds / elapsed,
        "epoch_steady_pairs_per_s": world * steady_pairs / max(stats.end - stats.first_batch_at, 1e-9),
    }


def evaluation_plan(job: JobConfig, epoch: int) -> int | None:
    """What follows epoch `epoch` (from 0): the full evaluation (0), a quick one on this many queries
    per split, or none (None); the same on every rank."""
    if not job.data.eval:
        return None
    if epoch + 1 == job.train.epochs or (epoch + 1) % job.eval.every_n_epochs == 0:
        return 0
    return job.eval.sample_queries


def evaluation_metrics(test: Results, validation: Results, job: JobConfig, sample: int = 0) -> dict[str, float]:
    """The test splits' metrics ('<split>/<measure>'), the validation splits' ('validation/<split>/
    <measure>'), both under 'sample/' when measured on a `sample` of queries, the objective (on
    validation where given, else on the test splits) and the test objective beside it; empty
    without evaluation splits."""
    if not test:
        return {}
    prefix = SAMPLE_PREFIX if sample else ""
    metrics = {f"{prefix}{split}/{name}": value for split, values in test.items() for name, value in values.items()}
    metrics.update(
        {
            f"{prefix}{VALIDATION_PREFIX}{split}/{name}": value
            for split, values in validation.items()
            for name, value in values.items()
        }
    )
    metrics[EVAL_SAMPLE_QUERIES] = sample
    metrics[OBJECTIVE] = objective_value(validation or test, job.eval)
    metrics[TEST_OBJECTIVE] = objective_value(test, job.eval)
    return metrics


def save_and_report(worker: Worker, state: TrainState, metrics: dict[str, float]) -> None:
    """Log the epoch's metrics (rank 0), then save this rank's checkpoint and report it with the
    metrics to Ray Train, which commits the epoch once every rank has."""
    import ray.train

    worker.metrics_log.log(metrics, state.step)
    worker.metrics_log.flush()
    with tempfile.TemporaryDirectory() as directory:
        save_checkpoint(worker.engine, directory, state, worker.job.model_dump(mode="json"))
        report = {"epoch": state.epoch, "step": state.step, **metrics}
        ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(directory))


def train_worker(config: dict[str, Any]) -> None:
    """The Ray Train per-worker loop. config: job (a JobConfig dict), steps_per_epoch, tracking_uri
    and run_id (MLflow), progress_board (the driver's gcl.train.progress board, when it draws a bar). An
    error that gcl explains (a GclError, also one raised in a Ray Data task) is raised as itself,
    so that the driver can fail the run at once."""
    try:
        _train_worker(config)
    except Exception as err:
        cause = explained_cause(err)
        if cause is None or cause is err:
            raise
        raise cause from err


def _train_worker(config: dict[str, Any]) -> None:
    import ray.train

    job = JobConfig.model_validate(config["job"])
    # The first epoch's reading (its files, shuffle and first batches) starts now, while the engine
    # is built and the starting model evaluated: which rows each rank gets does not depend on when
    # reading starts.
    readers = EpochReaders(job, pin_memory=job.scaling.use_gpu)
    readers.start(checkpoint_state(ray.train.get_checkpoint()).epoch)
    worker = setup_worker(
        job,
        config["steps_per_epoch"],
        config.get("tracking_uri"),
        config.get("run_id"),
        readers,
        config.get("progress_board"),
    )
    if config.get("locked_features"):
        worker.features = FeatureStore(config["locked_features"])
    state = restore(worker)
    if state.step == 0 and job.eval.before_training and job.data.eval:
        evaluate_starting_model(worker)
    for epoch in range(state.epoch, job.train.epochs):
        stats, step = train_epoch(worker, epoch, state.step)
        # Always posted (a new phase): the epoch's last step, which the posting interval may have held back.
        worker.progress.post(phase="trained", epoch=epoch + 1, step=step, steps_per_epoch=stats.steps)
        data_wait = _slowest_rank(
            stats.data_wait.seconds, worker.engine.device
        )  # before the evaluation, which the ranks share
        metrics = epoch_metrics(stats, worker.world, data_wait)
        plan = evaluation_plan(job, epoch)
        if plan is not None:
            metrics.update(timed_evaluation(worker, epoch + 1, step, plan))
        state = TrainState(epoch=epoch + 1, step=step)
        save_and_report(worker, state, metrics)


def timed_evaluation(worker: Worker, epoch: int, step: int, sample: int) -> dict[str, float]:
    """The evaluation metrics after `epoch` (0: before training) on `sample` queries per split (0: all),
    with the seconds they took (EVAL_SECONDS); the progress bar says the workers evaluate."""
    worker.progress.post(phase="evaluating", epoch=epoch, step=step)
    start = time.perf_counter()
    test, validation = _evaluate_on_workers(worker.job, worker.engine, sample, worker.features)
    return {**evaluation_metrics(test, validation, worker.job, sample), EVAL_SECONDS: time.perf_counter() - start}


def evaluate_starting_model(worker: Worker) -> None:
    """The full evaluation of the model before any step, logged at step 0 as epoch 0 (rank 0); not
    reported to Ray Train, whose reports (and Tune's epochs) are the trained epochs'."""
    worker.metrics_log.log({**timed_evaluation(worker, 0, 0, 0), "epoch": 0}, 0)
    worker.metrics_log.flush()


def evaluate_model(
    job: JobConfig,
    module: torch.nn.Module,
    sample: int = 0,
    device: torch.device | None = None,
    features: FeatureStore | None = None,
) -> tuple[Results, Results]:
    """Retrieval metrics per evaluation (test) split and per validation split for the (full,
    unsharded) FieldEncoder `module`, on a seeded `sample` of each split's queries (0: all). In a
    torch.distributed group (training's workers), every rank must call it: each encodes its share
    and searches its documents (on `device`), and rank 0 gets the metrics ({} elsewhere).
    `features`: a locked image tower's store, looked up instead of encoding those images."""

    tokenizer, _, eval_transform = create_preprocessing(job.model)
    was_training = module.training
    module.eval()
    try:
        ids = {"left": job.data.query_id_column, "right": job.data.document_id_column}
        encoder = RowEncoder(module, tokenizer, eval_transform, job.fields, features=features, id_columns=ids)
        evaluate = evaluate_splits  # outside a worker group: one process does it all
        if torch.distributed.is_initialized():
            evaluate = functools.partial(evaluate_splits_on_workers, device=device or torch.device("cpu"))
        test = evaluate(encoder, job.data.eval, job.data, job.eval, sample, job.seed)
        return test, evaluate(encoder, job.data.validation, job.data, job.eval, sample, job.seed)
    finally:
        module.train(was_training)


def _evaluate_on_workers(job: JobConfig, engine, sample: int, features: FeatureStore | None = None):
    """(test, validation) metrics (on `sample` queries per split, 0: all) on rank 0 (empty
    elsewhere), every rank encoding and searching its share (gcl.train.worker_eval); under ZeRO-3 the
    ranks first gather the parameters."""
    if job.deepspeed.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            return evaluate_model(job, engine.module, sample, engine.device, features)
    return evaluate_model(job, engine.module, sample, engine.device, features)


def _worker_placement(device: str) -> list[dict]:
    """Where every rank runs (node, host, device), gathered from all workers: shows on the MLflow
    run whether the workers spread over the nodes as the scaling config asked."""
    import socket

    import ray

    context = ray.train.get_context()
    mine = {
        "rank": context.get_world_rank(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "host": socket.gethostname(),
        "device": device,
    }
    everyone: list = [None] * context.get_world_size()
    torch.distributed.all_gather_object(everyone, mine)
    return everyone


def _slowest_rank(seconds: float, device: torch.device) -> float:
    """The largest of every rank's `seconds`: ranks step together, so one rank's wait holds up all."""
    value = torch.tensor([seconds], dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return value.item()
