"""`gcl train` end to end on a real local Ray cluster: 2 DeepSpeed workers, MLflow on SQLite."""

import glob
import json
import os
import time

import pytest
import torch
from mlflow import MlflowClient

from gcl.errors import TrackingError

pytestmark = pytest.mark.integration


def _losses(uri, run_id):
    return [
        (m.step, m.value) for m in sorted(MlflowClient(uri).get_metric_history(run_id, "loss"), key=lambda m: m.step)
    ]


def _pairs_with_image_files(synth_dir, directory, suffix: str) -> str:
    """The synthetic training pairs as a CSV or JSONL file, their images as files beside it under
    relative paths (as pairs exported from a catalog come)."""
    import pandas as pd

    pairs = pd.read_parquet(synth_dir / "train.parquet")
    (directory / "images").mkdir()
    paths = []
    for pair_id, image in zip(pairs["pair_id"], pairs["image"], strict=True):
        paths.append(f"images/{pair_id}.png")
        (directory / paths[-1]).write_bytes(image["bytes"])
    pairs = pairs.assign(image=paths)
    file = directory / f"pairs.{suffix}"
    if suffix == "csv":
        pairs.to_csv(file, index=False)
    else:
        pairs.to_json(file, orient="records", lines=True)
    return str(file)


def _trained_on_every_pair(client, run_id: str) -> list[float]:
    """The run's per-step losses, after checking that it finished with no row skipped and every
    step trained on real pairs."""
    import math

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["data_rows_skipped"] == 0
    losses = [v for _, v in _losses(client.tracking_uri, run_id)]
    # 184 pairs, 2 workers, 16 a step: 5 full steps an epoch, every one trained on real pairs.
    assert len(losses) >= 3 and all(math.isfinite(v) and v > 0 for v in losses)
    return losses


def test_zero2_trains_from_csv_tracks_exports_and_evaluates_consistently(ray_local, tiny_job, synth_dir, tmp_path):
    """ZeRO-2 training on pairs given as CSV with image files under relative paths (validated,
    read by Ray Data's CSV reader, decoded from the paths): tracked, exported and evaluated
    consistently with what training reported."""
    from gcl.train.job import run_train
    from workflows.evaluate import run_evaluate

    # A quick evaluation on 5 queries per split after epoch 1, the full one after epochs 2 and 3.
    pairs = _pairs_with_image_files(synth_dir, tmp_path, "csv")
    job = tiny_job(
        "deepspeed.zero_stage=2",
        "name=z2",
        "train.epochs=3",
        "eval.every_n_epochs=2",
        "eval.sample_queries=5",
        f"data.train={pairs}",
    )
    result = run_train(job)
    uri = job.mlflow.resolved_uri()
    client = MlflowClient(uri)
    run = client.get_run(result.run_id)
    assert (
        run.data.params["deepspeed.zero_stage"] == "2" and run.data.params["loss.weight_fn"] == "exponential"
    )  # tiny-cpu.yaml's
    _trained_on_every_pair(client, result.run_id)
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"model", "config.yaml", "deepspeed.json"} <= artifacts
    assert "in_domain/ndcg_at_10" in run.data.metrics and "pairs_per_s" in run.data.metrics
    assert 0 < result.metrics["epoch_data_wait_seconds"] < result.metrics["epoch_seconds"]
    assert 0 < result.metrics["epoch_data_wait_fraction"] < 1

    losses = [v for _, v in _losses(uri, result.run_id)]
    steps_per_epoch = len(losses) // 3
    first, last = losses[:steps_per_epoch], losses[-steps_per_epoch:]
    assert sum(last) / len(last) < sum(first) / len(first)  # the loss goes down
    assert [s for s, _ in _losses(uri, result.run_id)] == list(range(1, len(losses) + 1))

    # The logged model, evaluated by `gcl evaluate`, scores what training's evaluation reported;
    # so does the run's directory (its latest checkpoint, exported on the fly), also as a storage
    # URI (file:// stands in for s3:// here: the checkpoint is copied through pyarrow either way).
    run_dir = os.path.join(job.storage, job.name)
    for model in (f"runs:/{result.run_id}/model", run_dir, f"file://{run_dir}"):
        again = run_evaluate(job, model)
        for split, values in again.items():
            for measure, value in values.items():
                assert value == pytest.approx(result.metrics[f"{split}/{measure}"], abs=1e-6), (model, split)
    # An earlier checkpoint (two are kept: epochs 2 and 3) scores what its epoch reported.
    # The starting model is evaluated first, at step 0 (eval.before_training), then epochs 2 and 3.
    starting, *history = sorted(client.get_metric_history(result.run_id, "in_domain/ndcg_at_10"), key=lambda m: m.step)
    sampled = client.get_metric_history(result.run_id, "sample/in_domain/ndcg_at_10")
    assert starting.step == 0 and starting.value != history[-1].value
    assert len(history) == 2 and len(sampled) == 1 and 0 < sampled[0].step < history[0].step
    assert [
        m.value for m in sorted(client.get_metric_history(result.run_id, "eval_sample_queries"), key=lambda m: m.step)
    ] == [0, 5, 0, 0]
    assert [m.step for m in client.get_metric_history(result.run_id, "test_objective")][0] == 0
    assert all(m.value > 0 for m in client.get_metric_history(result.run_id, "eval_seconds"))
    earlier = min(glob.glob(os.path.join(run_dir, "checkpoint_*")))  # named by the time they were saved
    with open(os.path.join(earlier, "gcl_state.json")) as f:
        assert json.load(f)["epoch"] == 2
    again = run_evaluate(job, earlier)
    assert again["in_domain"]["ndcg@10"] == pytest.approx(history[0].value, abs=1e-6)

    # A run's name means one run: the same name with another learning rate is refused before any
    # training, naming the key, instead of resuming this run's checkpoint and overwriting its model.
    from gcl.errors import ConfigError

    other = job.model_copy(update={"train": job.train.model_copy(update={"lr": 0.5})})
    with pytest.raises(ConfigError, match=r"run z2 in .* was trained with another config \(train.lr 0.002 -> 0.5\)"):
        run_train(other)
    assert client.get_run(result.run_id).info.status == "FINISHED"


def test_a_run_whose_loss_is_zero_at_every_step_is_refused_not_finished(tmp_path, tiny_job):
    """Every pair weighing 0, or no negative in any batch: the loss is 0 at every step and nothing
    is learned. The run says so and is not exported, finished or registered; a run that learned
    anything passes (a real SQLite store, the metrics as the workers log them)."""
    from gcl.errors import TrainingError
    from gcl.tracking.runs import start_run
    from gcl.train.job import check_learned

    job = tiny_job()
    uri = job.mlflow.resolved_uri()
    client = MlflowClient(uri)
    nothing, something = (start_run(uri, "gcl", name, {}) for name in ("nothing", "something"))
    for step, (zero, learned) in enumerate([(0.0, 2.1), (0.0, 0.0)]):
        client.log_metric(nothing, "train_loss", zero, step=step)
        client.log_metric(something, "train_loss", learned, step=step)
    with pytest.raises(TrainingError, match=r"the loss was 0 at every step of 2 epoch\(s\): nothing was learned"):
        check_learned(job, client, nothing)
    check_learned(job, client, something)


def test_zero3_in_bf16_trains_from_jsonl_and_loss_goes_down(ray_local, tiny_job, synth_dir, tmp_path):
    """ZeRO-3 in bf16, as the GPU config trains (autocast runs on CPU too): fp32 weight shards,
    the towers' products in bf16, fp32 weights gathered from the shards at export; the pairs as JSONL
    with image files (validated, read by Ray Data's JSON reader, decoded from the paths)."""
    from gcl.train.job import run_train

    pairs = _pairs_with_image_files(synth_dir, tmp_path, "jsonl")
    job = tiny_job(
        "deepspeed.zero_stage=3",
        "deepspeed.config=workflows/configs/deepspeed/zero3.json",
        "name=z3",
        "train.epochs=2",
        "data.eval={}",
        "train.precision=bf16",
        f"data.train={pairs}",
    )
    result = run_train(job)
    losses = _trained_on_every_pair(MlflowClient(job.mlflow.resolved_uri()), result.run_id)
    half = len(losses) // 2  # epoch 2's mean loss against epoch 1's
    assert sum(losses[-half:]) / half < sum(losses[:half]) / half
    from gcl.model import load_model

    exported = load_model(result.model_dir).clip
    assert exported.logit_scale.shape == (1,)
    assert {p.dtype for p in exported.parameters()} == {torch.float32}

    # `gcl evaluate` on a checkpoint gathers the same weights, with the ZeRO stage the checkpoint
    # was trained with, whatever the evaluating config says.
    from gcl.train.checkpoint import export_checkpoint, training_checkpoint

    checkpoint = training_checkpoint(os.path.join(job.storage, job.name))
    gathered = load_model(
        export_checkpoint(checkpoint, str(tmp_path), fallback_job=tiny_job("deepspeed.zero_stage=0"))
    ).clip
    for (name, want), got in zip(exported.state_dict().items(), gathered.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("stage", [2, 3])
def test_one_gpu_worker_trains_in_bf16_and_evaluates_consistently(ray_local, tiny_job, stage):
    """Needs CUDA (skipped on the CPU machines the suite runs on): a GPU worker over NCCL with its
    batches moved to the GPU by Ray Data, the towers' products in bf16 under autocast, the per-epoch
    evaluation encoding on the GPU (under ZeRO-3 inside the parameter gather); `gcl evaluate` of
    the logged model then scores about what training's evaluation reported."""

    from gcl.train.job import run_train
    from workflows.evaluate import run_evaluate

    job = tiny_job(
        f"deepspeed.zero_stage={stage}",
        f"name=gpu-z{stage}",
        "scaling.use_gpu=true",
        "scaling.num_workers=1",
        "train.epochs=2",
    )
    result = run_train(job)
    run = MlflowClient(job.mlflow.resolved_uri()).get_run(result.run_id)
    assert [w["device"] for w in json.loads(run.data.tags["gcl.workers"])] == ["cuda:0"]
    losses = [v for _, v in _losses(job.mlflow.resolved_uri(), result.run_id)]
    assert all(v == v for v in losses) and losses[-1] < losses[0]
    again = run_evaluate(job, f"runs:/{result.run_id}/model")
    for split, values in again.items():
        assert values["ndcg@10"] == pytest.approx(result.metrics[f"{split}/ndcg@10"], abs=0.05), split


def test_unreachable_tracking_store_fails_fast_naming_the_uri(tiny_job, tmp_path):
    from gcl.train.job import run_train

    job = tiny_job("mlflow.tracking_uri=http://127.0.0.1:9", "name=nope")
    start = time.perf_counter()
    with pytest.raises(TrackingError, match=r"MLflow tracking store 'http://127.0.0.1:9' is not reachable"):
        run_train(job)
    assert time.perf_counter() - start < 60


def _job_loss_rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from gcl.train.worker import job_loss

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    # Rank 0: 3 valid pairs of a batch of 4, each pair's loss 1, 2, 3 (its loss: their mean over 4
    # rows, padding weighing 0); rank 1: all padding, as when its shard has run out.
    valid = torch.tensor([True, True, True, False]) if rank == 0 else torch.zeros(4, dtype=torch.bool)
    per_row = torch.tensor([1.0, 2.0, 3.0, 0.0]) if rank == 0 else torch.zeros(4)
    loss = per_row.mean()
    result = job_loss(loss, {"left_to_right": loss / 2}, valid)
    torch.save(result, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_the_logged_loss_is_the_mean_over_every_ranks_valid_pairs(tmp_path):
    """What the bar, MLflow's `loss` and `train_loss` show: the mean over the valid pairs of every
    rank (2 gloo processes), the same on each, not rank 0's mean over its rows with padding."""
    import torch.multiprocessing as mp

    mp.spawn(_job_loss_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        loss, terms, pairs = torch.load(tmp_path / f"rank{rank}.pt")
        assert pairs == 3 and loss == pytest.approx(2.0) and terms == {"left_to_right": pytest.approx(1.0)}


def test_deepspeeds_cpu_extension_is_built_once_per_python_environment(monkeypatch):
    """DeepSpeed builds its shared-memory all-reduce into a directory of this environment's own:
    a second environment (a fresh clone's .venv) does not make the first rebuild it (35 s on 2
    cores, measured); TORCH_EXTENSIONS_DIR, where set, is kept."""
    import sys

    from gcl.train.engine import extensions_dir_per_environment

    seen = []
    for prefix in ("/a/.venv", "/b/.venv", "/a/.venv"):
        monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
        monkeypatch.setattr(sys, "prefix", prefix)
        seen.append(extensions_dir_per_environment())
    assert seen[0] == seen[2] != seen[1]
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/chosen")
    assert extensions_dir_per_environment() == "/chosen"
