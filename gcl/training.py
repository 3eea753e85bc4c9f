"""What runs inside each Ray Train worker: a DeepSpeed engine fine-tuning an open_clip
model with the GCL loss on the worker's data shard, checkpointing every epoch.

Rank 0 evaluates retrieval after each epoch and logs metrics to MLflow; every rank
writes its ZeRO shard into the epoch's checkpoint, which Ray Train merges.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from typing import Any

import torch

from gcl.errors import TrackingError, explained_cause
from gcl.job_config import JobConfig
from gcl.loss import GCLLoss
from gcl.model import FIELDS_FILE, FieldEncoder, create_model, create_preprocessing
from gcl.retrieval import objective_value

log = logging.getLogger(__name__)
CHECKPOINT_TAG = "checkpoint"
STATE_FILE = "gcl_state.json"
JOB_FILE = "gcl_job.json"  # the training job in each checkpoint: what `gcl evaluate` rebuilds the model from


# Communication buckets sized for CLIP-scale models (0.1-1B parameters), in elements. DeepSpeed's
# defaults (5e8 for the reduce and all-gather buckets, 1e9 live parameters under ZeRO-3) exceed a
# ViT-B-32's whole gradient, so its buffers alone outweighed what ZeRO-3 saves.
ZERO_BUCKETS = {
    "reduce_bucket_size": 5_000_000,
    "allgather_bucket_size": 5_000_000,
    "stage3_prefetch_bucket_size": 5_000_000,
    "stage3_max_live_parameters": 10_000_000,
    "stage3_max_reuse_distance": 10_000_000,
}


def use_bf16(job: JobConfig) -> bool:
    """bf16 on a CUDA device that supports it when precision is auto; fp32 on CPU."""
    if job.train.precision == "bf16":
        return True
    return job.train.precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def deepspeed_config(job: JobConfig) -> dict[str, Any]:
    """The DeepSpeed config: the optional base JSON, with gcl's batch, clipping, precision and ZeRO stage."""
    config: dict[str, Any] = {}
    if job.deepspeed.config:
        with open(job.deepspeed.config) as f:
            config = json.load(f)
    zero = config.setdefault("zero_optimization", {})
    zero["stage"] = job.deepspeed.zero_stage
    for key, value in ZERO_BUCKETS.items():  # the base config's own values win
        zero.setdefault(key, value)
    config.update(
        train_micro_batch_size_per_gpu=job.train.batch_size,
        gradient_accumulation_steps=job.train.grad_accum,
        gradient_clipping=job.train.grad_clip,
        bf16={"enabled": use_bf16(job)},
        zero_allow_untested_optimizer=True,
    )
    config.setdefault("steps_per_print", 10**9)
    return config


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms, 1-d gains and the logit scale (as CLIP)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "logit_scale" in name or "ln" in name or "bias" in name else decay).append(
            p
        )
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """torch's AdamW with its fused kernel: one pass per parameter tensor, no temporaries the size
    of the parameters. Under ZeRO the optimizer steps one flat partition, where the default
    implementation's temporaries would add a partition-sized peak."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, fused=True)


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup: int, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up for `warmup` steps, then cosine decay to zero at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def deepspeed_checkpoint_globals() -> list:
    """The classes DeepSpeed stores in its checkpoints beside tensors and plain containers: small
    data records, allowed when loading them with weights_only."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(path: str, map_location=None):
    """torch.load with weights_only=True for DeepSpeed's checkpoint files: tensors, containers and
    DeepSpeed's data records only, so a tampered checkpoint cannot run code when a run resumes."""
    with torch.serialization.safe_globals(deepspeed_checkpoint_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


def setup_engine(job: JobConfig, total_steps: int):
    """Model, AdamW, schedule and the DeepSpeed engine around a FieldEncoder."""
    import deepspeed

    torch.manual_seed(job.seed)
    loaded = create_model(job.model, init_temperature=job.loss.init_temperature)
    encoder = FieldEncoder(loaded.clip, job.fields.modalities())
    optimizer = adamw(encoder, job.train.lr, job.train.weight_decay)
    scheduler = warmup_cosine(optimizer, job.train.warmup_steps, total_steps)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=encoder, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(job),
        dist_init_required=False,
    )  # fmt: skip
    # DeepSpeed's own loader unpickles anything (weights_only=False).
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if isinstance(engine.checkpoint_engine, TorchCheckpointEngine):
        engine.checkpoint_engine.load = load_weights_only
    return engine, scheduler, loaded


def split_sides(job: JobConfig, batch: dict[str, torch.Tensor], embeddings: dict[str, torch.Tensor]):
    """(left embeddings, right embeddings, left presence, right presence) from a pipeline batch."""
    from gcl.data.pipeline import PRESENT

    left = {n: embeddings[n] for n in job.fields.left}
    right = {n: embeddings[n] for n in job.fields.right}
    left_present = {n: batch[n + PRESENT] for n in job.fields.left}
    right_present = {n: batch[n + PRESENT] for n in job.fields.right}
    return left, right, left_present, right_present


def mlflow_metric_name(name: str) -> str:
    """MLflow forbids '@' in metric names: 'in_domain/ndcg@10' -> 'in_domain/ndcg_at_10'."""
    return name.replace("@", "_at_")


class MetricsLogger:
    """Buffers metrics on rank 0 and writes them to the MLflow run in batches."""

    def __init__(self, tracking_uri: str | None, run_id: str | None, enabled: bool):
        self.client = None
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.pending: list = []
        self.logged_through: dict[str, int] = {}  # metric -> last step already in MLflow
        if enabled and tracking_uri and run_id:
            from mlflow import MlflowClient

            self.client = MlflowClient(tracking_uri)

    def skip_logged_steps(self) -> None:
        """Steps logged by an earlier attempt of this run are not logged again: after a restore, the
        steps past the checkpoint are trained again, and a run whose checkpoint was never committed
        starts over. Training is deterministic, so the values logged first are the same."""
        if self.client is not None:
            for key in self._run().data.metrics:
                history = self.client.get_metric_history(self.run_id, key)
                self.logged_through[key] = max((m.step for m in history), default=0)

    def _run(self):
        """The MLflow run, or a TrackingError when this worker's view of the store lacks it: a
        restart cannot fix that (a SQLite file that is not the driver's, on a node of its own)."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(self.run_id)
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise TrackingError(
                f"MLflow run {self.run_id} is not in the tracking store {self.tracking_uri!r} as the training "
                "workers see it, though the driver created it there; on a cluster of several nodes use a "
                "tracking server that every node reaches (mlflow.tracking_uri: http://...), not a local file"
            ) from None

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        names = {mlflow_metric_name(k): v for k, v in metrics.items()}
        self.pending.extend(Metric(name, float(v), now, step) for name, v in names.items()
                            if step > self.logged_through.get(name, -1))  # fmt: skip
        if len(self.pending) >= 200:
            self.flush()

    def set_tag(self, key: str, value: str) -> None:
        if self.client is not None:
            self.client.set_tag(self.run_id, key, value)

    def flush(self) -> None:
        if self.client is not None and self.pending:
            self.client.log_batch(self.run_id, metrics=self.pending)
            self.pending = []


def evaluate_model(job: JobConfig, module: torch.nn.Module) -> dict[str, dict[str, float]]:
    """Retrieval metrics per evaluation split for the (full, unsharded) FieldEncoder `module`."""
    from gcl.retrieval import RowEncoder, evaluate_splits

    tokenizer, _, eval_transform = create_preprocessing(job.model)
    was_training = module.training
    module.eval()
    try:
        encoder = RowEncoder(module, tokenizer, eval_transform, job.fields)
        return evaluate_splits(encoder, job.data.eval, job.data, job.eval)
    finally:
        module.train(was_training)


def _evaluate_on_rank_zero(job: JobConfig, engine, rank: int) -> dict[str, dict[str, float]] | None:
    """Evaluate on rank 0; under ZeRO-3 every rank first joins in gathering the parameters."""
    if not job.data.eval:
        return None
    if job.deepspeed.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            return evaluate_model(job, engine.module) if rank == 0 else None
    return evaluate_model(job, engine.module) if rank == 0 else None


def _worker_placement(device: str) -> list[dict]:
    """Where every rank runs (node, host, device), gathered from all workers: shows on the MLflow
    run whether the workers spread over the nodes as the scaling config asked."""
    import socket

    import ray

    context = ray.train.get_context()
    mine = {"rank": context.get_world_rank(), "node_id": ray.get_runtime_context().get_node_id(),
            "host": socket.gethostname(), "device": device}  # fmt: skip
    everyone: list = [None] * context.get_world_size()
    torch.distributed.all_gather_object(everyone, mine)
    return everyone


def _slowest_rank(seconds: float, device: torch.device) -> float:
    """The largest of every rank's `seconds`: ranks step together, so one rank's wait holds up all."""
    value = torch.tensor([seconds], dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return value.item()


def train_worker(config: dict[str, Any]) -> None:
    """The Ray Train per-worker loop. config: job (a JobConfig dict), steps_per_epoch,
    tracking_uri and run_id (MLflow). An error that gcl explains (a GclError, also one raised in
    a Ray Data task) is raised as itself, so that the driver can fail the run at once."""
    try:
        _train_worker(config)
    except Exception as err:
        cause = explained_cause(err)
        if cause is None or cause is err:
            raise
        raise cause from err


def _train_worker(config: dict[str, Any]) -> None:
    import ray.train

    from gcl.data.batches import ShardReader, WaitClock, batch_template, train_batches
    from gcl.data.pipeline import epoch_dataset_name

    job = JobConfig.model_validate(config["job"])
    torch.set_num_threads(job.scaling.torch_threads)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    steps_per_epoch = config["steps_per_epoch"]
    engine, scheduler, loaded = setup_engine(job, job.train.epochs * steps_per_epoch // job.train.grad_accum)
    loss_fn = GCLLoss(
        job.loss, job.fields.weights("left"), job.fields.weights("right"), rank=rank, world_size=world
    )
    metrics_log = MetricsLogger(config.get("tracking_uri"), config.get("run_id"), enabled=rank == 0)
    metrics_log.skip_logged_steps()  # one history point per step however often the run restarts
    metrics_log.set_tag("gcl.workers", json.dumps(_worker_placement(device=str(engine.device))))

    start_epoch, step = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            engine.load_checkpoint(directory, tag=CHECKPOINT_TAG)
            with open(os.path.join(directory, STATE_FILE)) as f:
                state = json.load(f)
        start_epoch, step = state["epoch"], state["step"]
        if rank == 0:
            log.info("resumed from epoch %d, step %d", start_epoch, step)

    text_cfg, vision_cfg = loaded.model_cfg["text_cfg"], loaded.model_cfg["vision_cfg"]
    template = batch_template(job.fields, text_cfg.get("context_length", 77), vision_cfg["image_size"])
    device = engine.device
    readers: dict[int, ShardReader] = {}

    def start_reading(epoch: int) -> None:
        if epoch < job.train.epochs and epoch not in readers:
            readers[epoch] = ShardReader(ray.train.get_dataset_shard(epoch_dataset_name(epoch)), job.train.batch_size,
                                         local_shuffle_buffer=job.pipeline.local_shuffle_buffer,
                                         seed=job.seed * 1000 + epoch, pin_memory=device.type == "cuda")  # fmt: skip

    for epoch in range(start_epoch, job.train.epochs):
        start_reading(epoch)
        epoch_loss, epoch_steps, epoch_pairs, start = 0.0, 0, 0, time.perf_counter()
        first_batch_at, first_batch_pairs = None, 0
        data_wait = WaitClock(readers.pop(epoch))
        for batch in train_batches(data_wait, job.train.batch_size, template, device):
            if first_batch_at is None:
                first_batch_at, first_batch_pairs = time.perf_counter(), int(batch["valid"].sum())
                if job.pipeline.prefetch_next_epoch:  # its start-up overlaps this epoch's training
                    start_reading(epoch + 1)
            tick = time.perf_counter()
            inputs = {name: batch[name] for name in job.fields.modalities()}
            embeddings, log_scale = engine(inputs)
            left, right, left_present, right_present = split_sides(job, batch, embeddings)
            loss, terms = loss_fn(left, right, batch["score"], log_scale, batch["query_key"], batch["document_key"],
                                  left_present, right_present, valid=batch["valid"])  # fmt: skip
            engine.backward(loss)
            engine.step()
            step += 1
            epoch_loss += loss.item()
            epoch_steps += 1
            epoch_pairs += int(batch["valid"].sum())
            pairs_per_s = world * job.train.batch_size / max(time.perf_counter() - tick, 1e-9)
            metrics_log.log({"loss": loss.item(), "lr": scheduler.get_last_lr()[0], "pairs_per_s": pairs_per_s,
                             "logit_scale": log_scale.exp().item(), **{f"loss_{k}": v.item() for k, v in terms.items()}},
                            step)  # fmt: skip
        end = time.perf_counter()
        first_batch_at = first_batch_at or end
        data_wait_seconds = _slowest_rank(data_wait.seconds, device)  # before rank 0 evaluates alone
        results = _evaluate_on_rank_zero(job, engine, rank)
        metrics = {"epoch": epoch + 1, "step": step, "train_loss": epoch_loss / max(epoch_steps, 1),
                   "epoch_seconds": time.perf_counter() - start,
                   # Data waits included, evaluation not; "steady": after the first batch arrived,
                   # without the epoch's start-up (the pipeline's read, shuffle and first batch).
                   "epoch_pairs_per_s": world * epoch_pairs / max(end - start, 1e-9),
                   "epoch_first_batch_seconds": first_batch_at - start,
                   # Seconds training waited for batches (the first included), on the rank that
                   # waited longest.
                   "epoch_data_wait_seconds": data_wait_seconds,
                   "epoch_data_wait_fraction": data_wait_seconds / max(end - start, 1e-9),
                   "epoch_steady_pairs_per_s": world * (epoch_pairs - first_batch_pairs) / max(end - first_batch_at, 1e-9)}  # fmt: skip
        for split, values in (results or {}).items():
            metrics.update({f"{split}/{name}": value for name, value in values.items()})
        if results:
            metrics["objective"] = objective_value(results, job.eval)
        metrics_log.log({k: v for k, v in metrics.items() if k not in ("epoch", "step")}, step)
        metrics_log.flush()
        with tempfile.TemporaryDirectory() as directory:
            engine.save_checkpoint(directory, tag=CHECKPOINT_TAG)
            with open(os.path.join(directory, STATE_FILE), "w") as f:
                json.dump({"epoch": epoch + 1, "step": step}, f)
            with open(os.path.join(directory, JOB_FILE), "w") as f:
                json.dump(job.model_dump(mode="json"), f)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def consolidate_checkpoint(checkpoint_dir: str, job: JobConfig, out_dir: str) -> str:
    """Gather a DeepSpeed checkpoint's ZeRO shards into fp32 weights and write an open_clip
    model directory (see gcl.model.save_model). Returns `out_dir`."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from gcl.model import model_config, save_model

    # ZeRO-0 saved the whole module; in bf16 these are the bf16 weights the engine computed with
    # (its fp32 master copy sits in the bf16 optimizer's own files, which zero_to_fp32 cannot read).
    if job.deepspeed.zero_stage == 0:
        path = os.path.join(checkpoint_dir, CHECKPOINT_TAG, "mp_rank_00_model_states.pt")
        module = load_weights_only(path, map_location="cpu")["module"]
        state = {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
    else:
        state = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=CHECKPOINT_TAG)
    clip_state = {k.removeprefix("clip."): v for k, v in state.items()}
    loaded = create_model(job.model)
    loaded.clip.load_state_dict(clip_state)
    save_model(loaded.clip, model_config(job.model), out_dir)
    with open(os.path.join(out_dir, FIELDS_FILE), "w") as f:
        json.dump(job.fields.model_dump(), f, indent=2)
    return out_dir
