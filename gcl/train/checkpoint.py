"""What a gcl checkpoint is, in one place: its layout, saving and restoring it in the training
workers, finding a run's latest committed one, gathering its ZeRO shards into an open_clip model
directory (gcl.model_refs resolves any model reference to one).

A checkpoint directory, one per epoch, as Ray Train commits it under <storage>/<name>/:
  checkpoint/        DeepSpeed's files: every rank's ZeRO shard (CHECKPOINT_TAG)
  gcl_state.json     {"epoch", "step"} trained so far (STATE_FILE)
  gcl_job.json       the job that trained it: the model, fields and ZeRO stage to rebuild (JOB_FILE)
"""

from __future__ import annotations

import glob
import json
import logging
import os
import pickle
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from gcl import storage
from gcl.config import FieldsConfig
from gcl.errors import GclError, ModelError
from gcl.job_config import JobConfig
from gcl.model import (
    FIELDS_FILE,
    ModelConfig,
    create_model,
    model_config,
    save_model,
)

log = logging.getLogger(__name__)
CHECKPOINT_TAG = "checkpoint"
STATE_FILE = "gcl_state.json"
JOB_FILE = "gcl_job.json"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of the committed checkpoints


@dataclass(frozen=True)
class TrainState:
    """How far training got: epochs completed and optimizer steps taken."""

    epoch: int = 0
    step: int = 0


def deepspeed_checkpoint_globals() -> list:
    """The classes DeepSpeed stores in its checkpoints beside tensors and plain containers: small
    data records, allowed when loading them with weights_only."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(path: str, map_location=None, mmap: bool = False):
    """torch.load with weights_only=True for DeepSpeed's checkpoint files: tensors, containers and
    DeepSpeed's data records only, so a tampered checkpoint cannot run code when a run resumes.
    ModelError, naming the file, for anything else in it."""
    try:
        with torch.serialization.safe_globals(deepspeed_checkpoint_globals()):
            return torch.load(path, map_location=map_location, mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ModelError(f"{path}: refused: {refusal(err)}") from None


def refusal(err: pickle.UnpicklingError) -> str:
    """Why a weights_only load refused a file, in a line (torch's first line names the global)."""
    detail = next((line.strip() for line in str(err).splitlines() if "Unsupported global" in line), "")
    return (
        "the checkpoint holds objects other than tensors and DeepSpeed's records, which could run "
        f"code when loaded{f' ({detail})' if detail else ''}; only checkpoints gcl's training wrote are accepted"
    )


@contextmanager
def forced_weights_only():
    """Every torch.load in the block loads with weights_only=True whatever its caller passes (torch's
    TORCH_FORCE_WEIGHTS_ONLY_LOAD), DeepSpeed's data records allowed: DeepSpeed's zero_to_fp32
    passes weights_only=False."""
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_checkpoint_globals()):
            yield
    finally:
        if before is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before


def gather_zero_shards(checkpoint_dir: str) -> dict[str, torch.Tensor]:
    """The fp32 weights of a ZeRO 1-3 checkpoint, gathered from its shards by DeepSpeed's
    zero_to_fp32 with every file loaded weights_only; ModelError naming a file that holds
    anything else (its payload does not run)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        with forced_weights_only():
            return get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=CHECKPOINT_TAG)
    except pickle.UnpicklingError as err:
        # zero_to_fp32 does not say which file: find it (each loaded weights_only again; mmap
        # reads only the pickled records, not the tensors).
        for path in sorted(glob.glob(os.path.join(checkpoint_dir, CHECKPOINT_TAG, "*.pt"))):
            load_weights_only(path, map_location="cpu", mmap=True)
        raise ModelError(f"{checkpoint_dir}: refused: {refusal(err)}") from None


def use_weights_only_loader(engine) -> None:
    """Make the DeepSpeed engine load its checkpoints with load_weights_only: DeepSpeed's own loader
    unpickles anything (weights_only=False)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if isinstance(engine.checkpoint_engine, TorchCheckpointEngine):
        engine.checkpoint_engine.load = load_weights_only


def save_checkpoint(engine, directory: str, state: TrainState, job_json: dict) -> None:
    """Write this rank's ZeRO shard, the training state and the job into `directory` (every rank
    writes its own shard; Ray Train merges the ranks' directories)."""
    engine.save_checkpoint(directory, tag=CHECKPOINT_TAG)
    with open(os.path.join(directory, STATE_FILE), "w") as f:
        json.dump({"epoch": state.epoch, "step": state.step}, f)
    with open(os.path.join(directory, JOB_FILE), "w") as f:
        json.dump(job_json, f)


def restore_checkpoint(engine, checkpoint) -> TrainState:
    """Load model, optimizer and schedule from a Ray Train checkpoint into `engine`; the state
    it was saved at. No checkpoint: a fresh start."""
    if checkpoint is None:
        return TrainState()
    with checkpoint.as_directory() as directory:
        engine.load_checkpoint(directory, tag=CHECKPOINT_TAG)
        return read_state(directory)


def checkpoint_state(checkpoint) -> TrainState:
    """The training state a Ray Train checkpoint (local or in storage) was saved at, read without
    loading it; a fresh start without one."""
    if checkpoint is None:
        return TrainState()
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path.rstrip('/')}/{STATE_FILE}") as stream:
        state = json.loads(stream.read().decode())
    return TrainState(epoch=state["epoch"], step=state["step"])


def read_state(directory: str) -> TrainState:
    """The training state saved in a local checkpoint directory."""
    with open(os.path.join(directory, STATE_FILE)) as f:
        state = json.load(f)
    return TrainState(epoch=state["epoch"], step=state["step"])


def committed_checkpoint(run_dir: str) -> dict | None:
    """The latest checkpoint Ray Train committed under `run_dir` (a local path or a storage URI such
    as s3://bucket/runs/name): its directory name and reported metrics, from Ray Train's
    checkpoint snapshot; None when there is none."""
    text = storage.read_text(storage.join(run_dir, RAY_SNAPSHOT))
    try:
        return json.loads(text).get("latest_checkpoint_result") if text else None
    except ValueError:
        return None


def log_resume(run_dir: str) -> dict:
    """Say (on the terminal too) whether this run resumes, and from where (uncommitted checkpoints:
    local storage only). Returns the committed checkpoint's metrics ({} when none)."""
    import glob

    from gcl.console import say

    latest = committed_checkpoint(run_dir)
    if latest:
        metrics = latest.get("metrics", {})
        message = (
            f"run {os.path.basename(run_dir)} resumes from its checkpoint at epoch {metrics.get('epoch')}, "
            f"step {metrics.get('step')} ({os.path.join(run_dir, latest.get('checkpoint_dir_name', ''))})"
        )
        log.info("%s", message)
        say(message)
        return metrics
    if glob.glob(os.path.join(run_dir, "checkpoint_*")):
        log.warning(
            "%s holds checkpoint directories that Ray Train never committed (the run stopped while "
            "saving one): training starts from the beginning",
            run_dir,
        )
    return {}


def has_zero_shards(checkpoint_dir: str, filesystem=None) -> bool:
    """Whether a checkpoint directory (local, or on `filesystem`, a pyarrow FileSystem) holds ZeRO
    1-3 shards; an engine at stage 0 saves the whole module instead (also a one-worker job at
    stage 1 or 2 in fp32, which trains at stage 0: gcl.train.engine.engine_zero_stage)."""
    from pyarrow import fs

    selector = fs.FileSelector(os.path.join(checkpoint_dir, CHECKPOINT_TAG), allow_not_found=True)
    infos = (filesystem or fs.LocalFileSystem()).get_file_info(selector)
    return any(os.path.basename(info.path).startswith("zero_pp_rank_") for info in infos)


def consolidate_checkpoint(checkpoint_dir: str, out_dir: str, model: ModelConfig, fields: FieldsConfig) -> str:
    """Gather a local checkpoint's ZeRO shards (or its whole module, saved at stage 0) into fp32
    weights and write an open_clip model directory with gcl's field config (see
    gcl.model.save_model). Returns `out_dir`."""
    # Stage 0 saved the whole module, in fp32 whatever the precision (bf16 trains under autocast:
    # gcl.train.engine.deepspeed_config); a checkpoint from before that may hold bf16 weights.
    try:
        if not has_zero_shards(checkpoint_dir):
            path = os.path.join(checkpoint_dir, CHECKPOINT_TAG, "mp_rank_00_model_states.pt")
            module = load_weights_only(path, map_location="cpu")["module"]
            state = {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
        else:
            state = gather_zero_shards(checkpoint_dir)
        loaded = create_model(model)
        loaded.clip.load_state_dict({k.removeprefix("clip."): v for k, v in state.items()})
    except GclError:
        raise
    except (OSError, EOFError, KeyError, ValueError, RuntimeError) as err:
        detail = " ".join(str(err).split())[:300]
        raise ModelError(
            f"checkpoint {checkpoint_dir}: its model states could not be read ({type(err).__name__}: "
            f"{detail}); a checkpoint that is not whole: give another (a run keeps its last two)"
        ) from None
    save_model(loaded.clip, model_config(model), out_dir)
    with open(os.path.join(out_dir, FIELDS_FILE), "w") as f:
        json.dump(fields.model_dump(), f, indent=2)
    return out_dir


def training_checkpoint(model: str) -> str | None:
    """The checkpoint `model` (a local path or a storage URI) names: itself if it is a gcl training
    checkpoint, the latest committed one if it is a run's directory (storage/name), else None."""
    if storage.is_file(storage.join(model, STATE_FILE)):
        return model
    latest = committed_checkpoint(model)
    return storage.join(model, latest["checkpoint_dir_name"]) if latest else None


def export_checkpoint(
    checkpoint_dir: str, out_dir: str, fallback_job: JobConfig | None = None, source: str | None = None
) -> str:
    """Gather a local checkpoint's ZeRO shards into `out_dir`/model, as training exports its final
    model: with the model, fields and ZeRO stage of the job saved in the checkpoint, or of
    `fallback_job` for checkpoints from before gcl saved it. `source`: where the checkpoint came
    from, for the log (by default `checkpoint_dir`)."""
    state = read_state(checkpoint_dir)
    log.info("evaluating %s: epoch %s, step %s", source or checkpoint_dir, state.epoch, state.step)
    job = fallback_job
    saved = os.path.join(checkpoint_dir, JOB_FILE)
    if os.path.isfile(saved):
        with open(saved) as f:
            job = JobConfig.model_validate(json.load(f))
    if job is None:
        raise ModelError(f"{source or checkpoint_dir}: no {JOB_FILE}; give the job config that trained it")
    return consolidate_checkpoint(checkpoint_dir, os.path.join(out_dir, "model"), job.model, job.fields)
