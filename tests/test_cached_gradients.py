"""Cached-gradient steps (train.embed_chunk) are exact: on 2 gloo workers running real DeepSpeed
engines at every ZeRO stage, in fp32 and bf16, the loss and every parameter's gradient of a
chunked step equal the whole step's, across a grad_accum group of two micro-batches."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
from conftest import FAULT_JOB, assert_trains_as_uninterrupted
from mlflow import MlflowClient

from gcl.data.pipeline import PRESENT

CHUNK = 3  # does not divide the batch of 8: the last chunk is shorter
BATCH = 8
LEARNING_RATE = 2e-3
CASES = [(stage, precision) for stage in (0, 1, 2, 3) for precision in ("fp32", "bf16")]


def _batch(fields, seed: int, rank: int) -> dict[str, torch.Tensor]:
    """A pipeline batch of the tiny model's fields: repeated queries and documents (masking), a
    title missing (presence) and, on rank 1, a padding row."""
    from gcl.bench.cached import random_batch

    batch = random_batch(fields, BATCH, context_length=32, image_size=32, seed=seed * 10 + rank)
    batch["query_key"] = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4]) + 10 * rank
    batch["document_key"] = torch.tensor([5, 6, 7, 8, 5, 9, 10, 11]) + 10 * seed
    batch["title" + PRESENT][2] = False
    if rank == 1:
        batch["valid"][-1] = False
    return batch


def _one_step(job, rank: int, world: int, chunk: int | None):
    """The loss of each micro-batch of one optimizer step (grad_accum 2) and every parameter's full
    gradient before the optimizer steps."""
    from deepspeed.utils import safe_get_full_grad

    from gcl.loss import GCLLoss
    from gcl.train.engine import setup_engine
    from gcl.train.micro_batch import backward_micro_batch

    engine, _, _ = setup_engine(job, total_steps=10)
    loss_fn = GCLLoss(job.loss, job.fields.weights("left"), job.fields.weights("right"), rank=rank, world_size=world)
    losses = []
    for position in range(2):
        loss, _, _ = backward_micro_batch(
            engine,
            loss_fn,
            job.fields,
            _batch(job.fields, position, rank),
            divisor=2,
            boundary=position == 1,
            chunk=chunk,
        )
        losses.append(loss.float().item())
        if position == 0:
            engine.step()
    grads = {name: safe_get_full_grad(p).float().clone() for name, p in engine.module.named_parameters()}
    engine.step()
    return losses, grads, engine.global_steps


def _rank_main(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from gcl.config import parse_config
    from gcl.job_config import JobConfig
    from workflows import CONFIGS

    torch.set_num_threads(1)
    os.environ["LOCAL_RANK"] = str(rank)  # DeepSpeed asks for it; Ray Train sets it in training
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = {}
    for stage, precision in CASES:
        job = parse_config(
            JobConfig,
            CONFIGS / "tiny-cpu.yaml",
            [
                f"deepspeed.zero_stage={stage}",
                f"train.precision={precision}",
                f"train.batch_size={BATCH}",
                "train.grad_accum=2",
                "loss.score_range=[0, 1]",
                "loss.field_pair_terms=[{left: query, right: title, weight: 0.2}]",
            ],
        )
        results[(stage, precision)] = {
            "whole": _one_step(job, rank, world, None),
            "chunked": _one_step(job, rank, world, CHUNK),
        }
    # A field of fusion weight 0 is embedded but unused by the loss: it has no gradient to cache.
    job = parse_config(
        JobConfig,
        CONFIGS / "tiny-cpu.yaml",
        [
            "deepspeed.zero_stage=0",
            "train.precision=fp32",
            f"train.batch_size={BATCH}",
            "train.grad_accum=2",
            "loss.score_range=[0, 1]",
            "fields.right.title.weight=0",
        ],
    )
    results["unused field"] = {
        "whole": _one_step(job, rank, world, None),
        "chunked": _one_step(job, rank, world, CHUNK),
    }
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def steps():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank_main, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        yield [torch.load(f"{tmp}/rank{rank}.pt", weights_only=False) for rank in range(2)]


def _compare(steps, stage: int, precision: str, case=None):
    for rank, results in enumerate(steps):
        whole_losses, whole_grads, whole_steps = results[case or (stage, precision)]["whole"]
        chunked_losses, chunked_grads, chunked_steps = results[case or (stage, precision)]["chunked"]
        # Each side took one optimizer step for its group of two micro-batches (of 3 chunks each).
        assert whole_steps == chunked_steps == 1
        assert chunked_losses == pytest.approx(whole_losses, abs=1e-5), f"rank {rank}"
        assert whole_grads.keys() == chunked_grads.keys()
        assert any(g.abs().max() > 1e-3 for g in whole_grads.values())  # gradients worth comparing
        yield rank, whole_grads, chunked_grads, results[(stage, "fp32")]["whole"][1]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_chunked_step_equals_the_whole_step_in_fp32(steps, stage):
    for rank, whole, chunked, _ in _compare(steps, stage, "fp32"):
        for name, grad in whole.items():
            torch.testing.assert_close(chunked[name], grad, atol=1e-5, rtol=0, msg=f"rank {rank} {name}")


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_chunked_step_in_bf16_is_as_close_to_fp32_as_the_whole_step(steps, stage):
    # bf16 sums a weight's gradient over the rows in another order when the rows come in chunks,
    # so the two bf16 gradients differ by bf16's rounding (up to one unit in the last place, 2**-7
    # at 1), as the whole bf16 step differs from the fp32 one; atol 1e-5 is below bf16's
    # resolution. What chunking must not do is add error: against the same step in fp32, the
    # chunked bf16 gradients are as close as the whole bf16 step's.
    for rank, whole, chunked, reference in _compare(steps, stage, "bf16"):
        whole_error = sum(float((whole[n] - reference[n]).norm() ** 2) for n in reference) ** 0.5
        chunked_error = sum(float((chunked[n] - reference[n]).norm() ** 2) for n in reference) ** 0.5
        gradient_norm = sum(float(g.norm() ** 2) for g in reference.values()) ** 0.5
        assert whole_error < 0.05 * gradient_norm  # bf16's own error: a few percent
        assert chunked_error < 1.05 * whole_error, f"rank {rank}"
        for name, grad in reference.items():
            own = float((whole[name] - grad).norm())
            assert float((chunked[name] - grad).norm()) <= 1.5 * own + 1e-3 * float(grad.norm()), f"rank {rank} {name}"


def test_a_field_the_loss_does_not_use_is_left_out_of_the_chunked_backward(steps):
    for rank, whole, chunked, _ in _compare(steps, 0, "fp32", case="unused field"):
        for name, grad in whole.items():
            torch.testing.assert_close(chunked[name], grad, atol=1e-5, rtol=0, msg=f"rank {rank} {name}")


def _tiny_job(precision: str, *overrides: str):
    """The tiny job in `precision` at the tests' batch, with `overrides`."""
    from gcl.config import parse_config
    from gcl.job_config import JobConfig
    from workflows import CONFIGS

    return parse_config(
        JobConfig,
        CONFIGS / "tiny-cpu.yaml",
        [f"train.precision={precision}", f"train.batch_size={BATCH}", "loss.score_range=[0, 1]", *overrides],
    )


def _three_steps(engine, job) -> list[float]:
    """Three optimizer steps of `engine` on fixed batches; their losses."""
    from gcl.loss import GCLLoss
    from gcl.train.micro_batch import backward_micro_batch

    loss_fn = GCLLoss(job.loss, job.fields.weights("left"), job.fields.weights("right"))
    losses = []
    for position in range(3):
        loss, _, _ = backward_micro_batch(
            engine, loss_fn, job.fields, _batch(job.fields, position, 0), divisor=1, boundary=True, chunk=None
        )
        engine.step()
        losses.append(loss.item())
    return losses


def _zero0_with_and_without_all_reduce() -> dict:
    """Three optimizer steps of gcl's ZeRO-0 engine on one worker, as gcl runs it (no gradient
    all-reduce) and with DeepSpeed's all-reduce put back: per-step losses and the final weights."""
    from gcl.train.engine import setup_engine

    job = _tiny_job("fp32", "deepspeed.zero_stage=0")
    results = {}
    for allreduce in (False, True):
        engine, _, _ = setup_engine(job, total_steps=10)
        skipped = not engine.enable_backward_allreduce
        engine.enable_backward_allreduce = allreduce
        losses = _three_steps(engine, job)
        weights = {name: p.detach().clone() for name, p in engine.module.named_parameters()}
        results[allreduce] = {"skipped": skipped, "losses": losses, "weights": weights}
    return results


def _zero2_as_gcl_runs_it_and_as_deepspeed_does(out_dir: str, precision: str) -> dict:
    """Three optimizer steps of a one-worker job at ZeRO-2 in `precision`: as gcl runs it (stage 0)
    and on DeepSpeed's ZeRO-2 engine (what a run resumed from ZeRO shards keeps); per-step losses,
    weights and their dtype, the stage, and the weights each checkpoint exports."""
    from gcl.model import load_model
    from gcl.train.checkpoint import TrainState, consolidate_checkpoint, has_zero_shards, save_checkpoint
    from gcl.train.engine import setup_engine

    job = _tiny_job(precision, "deepspeed.zero_stage=2", f"train.lr={LEARNING_RATE}")
    results = {}
    for resumes_zero_shards in (False, True):
        engine, _, _ = setup_engine(job, total_steps=10, resumes_zero_shards=resumes_zero_shards)
        losses = _three_steps(engine, job)
        directory = os.path.join(out_dir, f"checkpoint-{precision}-{resumes_zero_shards}")
        save_checkpoint(engine, directory, TrainState(epoch=1, step=3), job.model_dump(mode="json"))
        exported = consolidate_checkpoint(
            directory, os.path.join(out_dir, f"model-{precision}-{resumes_zero_shards}"), job.model, job.fields
        )
        results[resumes_zero_shards] = {
            "stage": engine.zero_optimization_stage(),
            "allreduce": engine.enable_backward_allreduce,
            "dtypes": {p.dtype for p in engine.module.parameters()},
            "shards": has_zero_shards(directory),
            "losses": losses,
            "weights": {name.removeprefix("clip."): p.detach().clone() for name, p in engine.module.named_parameters()},
            "exported": {name: p.detach().clone() for name, p in load_model(exported).clip.named_parameters()},
        }
    return results


def _one_worker_main(rank: int, init_file: str, out_dir: str) -> None:
    """Both one-worker comparisons in one spawned process: a gloo group of one (this process)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["LOCAL_RANK"] = "0"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
    results = {
        "zero0": _zero0_with_and_without_all_reduce(),
        "zero2": {p: _zero2_as_gcl_runs_it_and_as_deepspeed_does(out_dir, p) for p in ("fp32", "bf16")},
    }
    torch.save(results, os.path.join(out_dir, "out.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def one_worker():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_one_worker_main, args=(os.path.join(tmp, "init"), tmp), nprocs=1, join=True)
        yield torch.load(f"{tmp}/out.pt", weights_only=False)


def test_one_worker_at_zero0_skips_the_gradient_all_reduce_and_trains_exactly_as_with_it(one_worker):
    """DeepSpeed's ZeRO-0 engine flattens every gradient into buckets, all-reduces them and copies
    them back each step, which on one worker changes nothing and costs 5-15% of a ViT-B-32 step on
    CPU (gcl bench --preset vitb32-cpu): gcl's engine skips it there, with the same losses and
    weights, bit for bit."""
    results = one_worker["zero0"]
    assert results[False]["skipped"]
    assert results[False]["losses"] == results[True]["losses"]
    for name, weight in results[True]["weights"].items():
        assert torch.equal(results[False]["weights"][name], weight), name


def test_one_worker_at_zero2_in_fp32_trains_at_stage0_as_zero2_does_and_exports_its_weights(one_worker):
    """With one worker ZeRO-1/2 have nothing to partition and their flat copies of every parameter
    and gradient cost about a third of a ViT-B-32 step on CPU: gcl's engine runs such a job at
    stage 0. Per-step losses and weights match DeepSpeed's ZeRO-2 engine within float rounding
    (1e-6), each checkpoint exports the weights its engine trained, and a run resumed from ZeRO
    shards keeps ZeRO-2."""
    ours, zero2 = one_worker["zero2"]["fp32"][False], one_worker["zero2"]["fp32"][True]
    assert (ours["stage"], ours["allreduce"], ours["shards"]) == (0, False, False)
    assert (zero2["stage"], zero2["shards"]) == (2, True)
    assert ours["losses"] == pytest.approx(zero2["losses"], rel=1e-6, abs=1e-6)
    # Rounding differs (gradients summed and clipped as flat buffers or per tensor), and Adam turns
    # the rounding noise of a gradient that is exactly zero in theory (attention's key biases:
    # softmax ignores a shift) into steps of the learning rate's size: there the weights may differ
    # by a few of those steps. Everywhere else they agree within 1e-5 (about 1e-7 in most tensors).
    difference = sum(float((ours["weights"][n] - w).norm() ** 2) for n, w in zero2["weights"].items()) ** 0.5
    assert difference < 1e-5 * sum(float(w.norm() ** 2) for w in zero2["weights"].values()) ** 0.5
    for name, weight in zero2["weights"].items():
        if name.endswith("attn.in_proj_bias"):
            query, key, value = (ours["weights"][name] - weight).abs().chunk(3)
            assert float(key.max()) < 3 * 2 * LEARNING_RATE and max(float(query.max()), float(value.max())) < 1e-5
        else:
            torch.testing.assert_close(ours["weights"][name], weight, atol=1e-5, rtol=0, msg=name)
    for run in (ours, zero2):
        for name, weight in run["weights"].items():
            assert torch.equal(run["exported"][name], weight.reshape(run["exported"][name].shape)), name


def test_one_worker_in_bf16_trains_fp32_weights_under_autocast_at_stage0_and_exports_them(one_worker):
    """bf16 is mixed precision as open_clip trains it: fp32 weights, bf16 matrix products under
    autocast (DeepSpeed's torch_autocast mode), so one worker at ZeRO-2 in bf16 also runs at stage 0
    and its checkpoint holds the fp32 weights it trained (with DeepSpeed's bf16 mode it held the
    bf16 copies). Losses and weights match DeepSpeed's ZeRO-2 engine in the same mode within float
    rounding (measured: equal losses, weights 3e-8 apart), and the products are bf16's: each loss
    differs from the fp32 run's by bf16's rounding (measured about 3e-4 relative), not by nothing."""
    ours, zero2 = one_worker["zero2"]["bf16"][False], one_worker["zero2"]["bf16"][True]
    fp32 = one_worker["zero2"]["fp32"][False]
    assert (ours["stage"], ours["allreduce"], ours["shards"]) == (0, False, False)
    assert (zero2["stage"], zero2["shards"]) == (2, True)
    assert ours["dtypes"] == zero2["dtypes"] == {torch.float32}
    assert ours["losses"] == pytest.approx(zero2["losses"], rel=1e-6, abs=1e-6)
    for name, weight in zero2["weights"].items():
        torch.testing.assert_close(ours["weights"][name], weight, atol=1e-6, rtol=0, msg=name)
    assert ours["losses"] != fp32["losses"]
    assert ours["losses"] == pytest.approx(fp32["losses"], rel=1e-2)
    for run in (ours, zero2):
        for name, weight in run["weights"].items():
            assert torch.equal(run["exported"][name], weight.reshape(run["exported"][name].shape)), name


def test_the_graph_free_pass_leaves_batch_norm_statistics_to_the_pass_that_trains():
    """Each chunk is embedded twice: once without a graph, once with it. A batch norm that trains
    (an unlocked EfficientNet) updates its running statistics in the second pass only, as a whole
    step would once; a locked one (eval mode) is never touched."""
    from gcl.config import parse_config
    from gcl.job_config import JobConfig
    from gcl.model import FieldEncoder, create_model
    from gcl.train.micro_batch import _embed_without_graph
    from workflows import CONFIGS

    job = parse_config(
        JobConfig,
        CONFIGS / "minilm-efflite0.yaml",
        [
            "model.towers.image.lock=false",
            "model.towers.image.image_size=32",
            "fields.right={image: {modality: image}}",
        ],
    )
    encoder = FieldEncoder(create_model(job.model).clip, job.fields.modalities())
    engine = type(
        "Engine", (), {"module": encoder, "device": torch.device("cpu"), "__call__": lambda s, x: encoder(x)}
    )()
    statistics = lambda: {k: v.clone() for k, v in encoder.state_dict().items() if "running" in k}  # noqa: E731
    batch = {
        "query": torch.randint(0, 1000, (6, 16)),
        "image": torch.randint(0, 255, (6, 3, 32, 32), dtype=torch.uint8),
    }
    before = statistics()
    _embed_without_graph(engine, job.fields, batch, [slice(0, 3), slice(3, 6)])
    assert all(torch.equal(before[k], v) for k, v in statistics().items())
    encoder(batch)  # the pass with a graph, in training mode: it moves them
    assert not all(torch.equal(before[k], v) for k, v in statistics().items())


@pytest.mark.slow
def test_a_cached_gradient_run_trains_as_the_whole_batch_run(tiny_job, uninterrupted_losses):
    """The fault tests' job (cached-gradient steps of 2 chunks per micro-batch) against the same job
    with whole micro-batches, through Ray Train and Ray Data: the same steps and losses."""
    from gcl.train.job import run_train

    plain = [override for override in FAULT_JOB if not override.startswith("train.embed_chunk")]
    job = tiny_job("name=whole-batches", *plain)
    result = run_train(job)
    assert_trains_as_uninterrupted(MlflowClient(job.mlflow.resolved_uri()), result.run_id, uninterrupted_losses)
