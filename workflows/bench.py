"""`gcl bench`: performance ratios measured side by side in one run on this machine.

data      Ray Data pipeline pairs/s (1 and 2 preprocessing tasks at once) / training consumption pairs/s
pipeline  whole pipeline (Ray Data -> Ray Train -> DeepSpeed, 2 workers) pairs/s / a bare
          single-process torch loop on the same model, global batch and cores: over a whole warm
          epoch, and in its steady state (after its first batch, without the epoch's start-up);
          MFU of both (FLOPs per pair from torch's FlopCounterMode / the device's peak)
memory    per-worker peak memory, ZeRO-3 / ZeRO-0, 2 workers, a ViT-B-32-sized model: peak RSS,
          and the peak beyond what the worker held before building the model (its libraries)
steps     the same training steps in plain processes (no Ray, no Ray Data), 2 side by side on 1
          core each: without communication, torch DDP, DeepSpeed ZeRO-0 and ZeRO-2 / the bare loop
retrieval exact top-k search queries/s / FAISS IndexFlatIP on the same embeddings (100k documents),
          and the search's extra peak memory at 1M vs 100k documents (bounded by the chunk size)

On a CUDA machine the training figures run on the GPUs in bf16 (the bare loop under autocast,
gcl's engines in DeepSpeed's bf16 mode), one worker per GPU up to 2; memory is then the
per-worker peak of allocated GPU memory. On one GPU the steps section runs 1 process, and the
memory section (ZeRO-3 shards over 2 workers) is left out.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import torch

from gcl.config import FieldsConfig, parse_config
from gcl.data.synth import SynthConfig, synthesize
from gcl.job_config import JobConfig

BATCH = 32  # per worker
# About 15,400 training pairs: an epoch long enough that its fixed start (listing and reading
# the files, the shuffle's all-to-all, starting the preprocessing) does not stand for the rate,
# as it did with the 2,300 pairs the bench trained on until 2026-11-25 (4 s of a 9 s pass).
BENCH_DATA = SynthConfig(products=2000, queries=1000, docs_per_query=24)
CPU = torch.device("cpu")


def _batch_from_pipeline(job: JobConfig, rows: int):
    """One preprocessed batch of `rows` pairs, as the trainers receive it."""
    from gcl.data.pipeline import PipelineConfig, build_dataset

    ds = build_dataset(job.data.train, job.data, job.fields, job.loss.weight_key, job.model.model_dump(),
                       PipelineConfig(cpus_per_task=1), shuffle=False)  # fmt: skip
    batch = next(iter(ds.iter_torch_batches(batch_size=rows)))
    batch["valid"] = torch.ones(rows, dtype=torch.bool)
    return batch


def _training_step(job: JobConfig, batch: dict, mode: str, rank: int = 0, world: int = 1,
                   device: torch.device = CPU):  # fmt: skip
    """One GCL training step on `batch` as a callable. mode: `plain` (torch AdamW, no
    communication; the loss sees only this process's batch), `ddp` (torch DDP, the loss gathers
    every rank's embeddings) or `zero0`/`zero2` (gcl's DeepSpeed engine, on DeepSpeed's device).
    On CUDA the torch modes run under bf16 autocast, as gcl's engines run in bf16 there."""
    from gcl.loss import GCLLoss
    from gcl.model import FieldEncoder, create_model
    from gcl.training import adamw, setup_engine, split_sides

    torch.manual_seed(0)
    if mode.startswith("zero"):
        job = job.model_copy(update={"deepspeed": job.deepspeed.model_copy(update={"zero_stage": int(mode[4:])}),
                                     "train": job.train.model_copy(update={"batch_size": len(batch["score"])})})  # fmt: skip
        model, _, _ = setup_engine(job, total_steps=1000)
        backward, optimizer_step = model.backward, model.step
        device = model.device
    else:
        model = FieldEncoder(create_model(job.model).clip, job.fields.modalities()).to(device)
        if mode == "ddp":
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device] if device.type == "cuda" else None
            )
        optimizer = adamw(model, lr=1e-4, weight_decay=0.1)

        def backward(loss):
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)

        optimizer_step = optimizer.step
    gathers = mode != "plain"
    loss_fn = GCLLoss(job.loss, job.fields.weights("left"), job.fields.weights("right"),
                      rank=rank if gathers else 0, world_size=world if gathers else 1)  # fmt: skip

    batch = {k: v.to(device) for k, v in batch.items()}
    autocast = torch.autocast(
        "cuda", torch.bfloat16, enabled=device.type == "cuda" and not mode.startswith("zero")
    )

    def step():
        with autocast:
            embeddings, log_scale = model({n: batch[n] for n in job.fields.modalities()})
            left, right, lp, rp = split_sides(job, batch, embeddings)
            loss, _ = loss_fn(left, right, batch["score"], log_scale, batch["query_key"], batch["document_key"],
                              lp, rp, valid=batch["valid"])  # fmt: skip
        backward(loss)
        optimizer_step()

    return step


def _wait_for_device(barrier=lambda: None) -> None:
    """Let queued GPU work finish (CUDA runs asynchronously), then wait for the other ranks."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    barrier()


def _pairs_per_s(step, pairs_per_step: int, steps: int = 20, barrier=lambda: None) -> float:
    for _ in range(3):
        step()
    _wait_for_device(barrier)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _wait_for_device(barrier)
    return steps * pairs_per_step / (time.perf_counter() - start)


def bench_device() -> torch.device:
    """Where the training figures run: the first GPU if there is one, else the CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def bare_loop_pairs_per_s(job: JobConfig, batch: dict, threads: int, steps: int = 20,
                          device: torch.device = CPU) -> float:  # fmt: skip
    """Single-process torch training (no Ray, no DeepSpeed) on in-memory batches."""
    torch.set_num_threads(threads)
    return _pairs_per_s(_training_step(job, batch, "plain", device=device), len(batch["score"]), steps)


# Dense bf16 tensor-core peaks (TFLOP/s) from NVIDIA's data sheets, most specific name first.
GPU_PEAK_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100": 989.4,
    "H200": 989.4,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
}


def gpu_peak_flops_per_s(name: str) -> float | None:
    """The data-sheet dense bf16 peak of a GPU by its CUDA name, None for one not listed."""
    return next((tflops * 1e12 for key, tflops in GPU_PEAK_TFLOPS.items() if key in name), None)


def peak_flops_per_s(device: torch.device) -> tuple[float, str]:
    """(peak FLOP/s, where it comes from) that MFU divides by: the data sheet's dense bf16 peak
    for a known GPU, otherwise a measured square matrix product on `device` with this process's
    threads (fp32 on CPU), which is what the machine can do at best on this work."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if (peak := gpu_peak_flops_per_s(name)) is not None:
            return peak, f"{name}, dense bf16 data-sheet peak"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(2048, 2048, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ a
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * 2048**3 / best, f"measured 2048x2048 {dtype} matrix product, {torch.get_num_threads()} threads"


def train_flops_per_pair(job: JobConfig, batch: dict) -> float:
    """FLOPs of one training step (forward and backward) per pair, counted by torch's
    FlopCounterMode on the bench batch: matrix products, convolutions and attention, as MFU
    counts them (elementwise work and the optimizer are left out)."""
    from torch.utils.flop_counter import FlopCounterMode

    step = _training_step(job, batch, "plain")
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / len(batch["score"])


def _data_parallel_process(
    rank: int, world: int, mode: str, job_json: str, batch: dict, port: int, results
) -> None:
    """One of `world` 1-thread processes (no Ray, no Ray Data) timing `mode` steps on its slice
    of `batch`, on GPU `rank` over NCCL where CUDA exists, else on the CPU over gloo; rank 0 puts
    the pairs/s of all ranks together on `results`."""
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank) if cuda else "0")  # fmt: skip
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    rows = len(batch["score"]) // world
    local = {k: v[rank * rows : (rank + 1) * rows] for k, v in batch.items()}
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    step = _training_step(JobConfig.model_validate_json(job_json), local, mode, rank, world, device)
    rate = _pairs_per_s(step, rows * world, barrier=dist.barrier)
    if rank == 0:
        results.put(rate)
    dist.destroy_process_group()


def data_parallel_pairs_per_s(job: JobConfig, batch: dict, world: int) -> dict:
    """Pairs/s of `world` plain processes (1 thread each) training side by side on the batch's
    slices: without communication, with torch DDP, and with DeepSpeed ZeRO-0 and ZeRO-2. Where
    the pipeline's ratio to the bare loop goes before Ray and Ray Data."""
    import socket

    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    figures = {}
    for mode in ("plain", "ddp", "zero0", "zero2"):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        results = context.Queue()
        processes = [context.Process(target=_data_parallel_process,
                                     args=(rank, world, mode, job.model_dump_json(), batch, port, results))
                     for rank in range(world)]  # fmt: skip
        for process in processes:
            process.start()
        rate = results.get(timeout=600)
        for process in processes:
            process.join()
        figures[f"steps_{world}proc_{mode}_pairs_per_s"] = rate
    return figures


def data_pipeline_pass(job: JobConfig, tasks: int, epochs: int = 3) -> tuple[float, float]:
    """(pairs/s, seconds to the first batch) of read -> shuffle -> decode/tokenize with `tasks`
    1-CPU tasks at once, over a whole epoch's pass (its shuffle and start-up included); the
    fastest pass after the first, which also starts Ray's worker processes, as in training after
    epoch 1."""
    from gcl.data.pipeline import PipelineConfig, build_dataset

    pipeline = PipelineConfig(preprocess_tasks=tasks, cpus_per_task=1)
    passes = []
    for epoch in range(epochs):
        ds = build_dataset(job.data.train, job.data, job.fields, job.loss.weight_key, job.model.model_dump(),
                           pipeline, seed=epoch)  # fmt: skip
        start, first, rows = time.perf_counter(), None, 0
        for batch in ds.iter_batches(batch_size=256, batch_format="numpy"):
            first = first or time.perf_counter() - start
            rows += len(batch["score"])
        passes.append((rows / (time.perf_counter() - start), first))
    return max(passes[1:])


def preprocessor_pairs_per_s(job: JobConfig, rows: int = 512) -> float:
    """Pairs/s of the decode/transform/tokenize step alone, in this process (one core)."""
    import pandas as pd

    from gcl.data.pipeline import PairPreprocessor

    frame = pd.read_parquet(job.data.train).head(rows)
    pre = PairPreprocessor(job.model.model_dump(), job.fields.model_dump(), job.loss.weight_key,
                           job.data.model_dump(), None, augment=False)  # fmt: skip
    batch = {c: frame[c].to_numpy() for c in frame.columns}
    start = time.perf_counter()
    pre(batch)
    return len(frame) / (time.perf_counter() - start)


def _rss_mib() -> float:
    """This process's resident memory now, in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak_rss() -> None:
    """Restart this process's peak resident memory from its resident memory now, so that what a
    reused process (a Ray worker) held before does not count."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_mib() -> float:
    """This process's peak resident memory, in MiB. Not getrusage's ru_maxrss: Linux carries that
    over from the parent through fork and exec, so a small child of a large parent reports the
    parent's size."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def _memory_worker(config: dict) -> None:
    """Two optimizer steps of a ViT-B-32-sized model under DeepSpeed; reports the peak memory:
    allocated GPU memory on a GPU, else the process's RSS."""
    import ray.train

    from gcl.training import setup_engine

    job = JobConfig.model_validate(config["job"])
    torch.set_num_threads(1)
    cuda = job.scaling.use_gpu
    # What the process holds before the model: Python, torch, Ray, DeepSpeed (on a GPU, nothing).
    if cuda:
        baseline_mib = torch.cuda.memory_allocated() / 2**20
    else:
        _reset_peak_rss()  # the peak counts from here, whatever a reused worker held before
        baseline_mib = _rss_mib()
    engine, _, loaded = setup_engine(job, total_steps=10)
    size = loaded.model_cfg["vision_cfg"]["image_size"]
    length = loaded.model_cfg["text_cfg"]["context_length"]
    inputs = {"query": torch.randint(1, 49000, (4, length)), "image": torch.randn(4, 3, size, size)}
    inputs = {k: v.to(engine.device) for k, v in inputs.items()}
    for _ in range(2):
        embeddings, log_scale = engine(inputs)
        loss = -(embeddings["query"] * embeddings["image"]).sum() * log_scale.exp().squeeze()
        engine.backward(loss)
        engine.step()
    peak_mib = torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_rss_mib()
    rank = ray.train.get_context().get_world_rank()
    with open(os.path.join(config["out"], f"rank{rank}.json"), "w") as f:
        json.dump({"peak_mib": peak_mib, "baseline_mib": baseline_mib}, f)


def zero_peak_memory_mib(
    stage: int, storage: str, precision: str = "auto", use_gpu: bool = False
) -> tuple[float, float]:
    """Max over the 2 workers of peak memory (MiB; RSS, or allocated GPU memory with `use_gpu`) for
    ZeRO `stage` on ViT-B-32 (random init), and of that peak beyond the worker's memory before
    the model was built."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    job = parse_config(JobConfig, None, [
        "model.arch=ViT-B-32", f"deepspeed.zero_stage={stage}", "train.batch_size=4",
        "fields.left={query: {modality: text}}", "fields.right={image: {modality: image}}",
        f"train.precision={precision}", f"scaling.use_gpu={str(use_gpu).lower()}",
    ])  # fmt: skip
    out = tempfile.mkdtemp(prefix=f"zero{stage}-", dir=storage)
    trainer = TorchTrainer(_memory_worker, train_loop_config={"job": job.model_dump(mode="json"), "out": out},
                           scaling_config=ScalingConfig(num_workers=2, use_gpu=use_gpu,
                                                        resources_per_worker={"CPU": 0.5}),
                           run_config=RunConfig(name=f"bench-zero{stage}-{time.time_ns()}", storage_path=storage))  # fmt: skip
    trainer.fit()
    ranks = []
    for rank in range(2):
        with open(os.path.join(out, f"rank{rank}.json")) as f:
            ranks.append(json.load(f))
    return max(r["peak_mib"] for r in ranks), max(r["peak_mib"] - r["baseline_mib"] for r in ranks)


def zero_memory_figures(storage: str, precision: str, use_gpu: bool, suffix: str = "") -> dict:
    """ZeRO-3 against ZeRO-0: each one's peak, and the peak beyond the libraries, with ratios;
    `suffix` tells one precision's figures from another's."""
    zero0, zero0_model = zero_peak_memory_mib(0, storage, precision, use_gpu)
    zero3, zero3_model = zero_peak_memory_mib(3, storage, precision, use_gpu)
    label = ("gpu_mib" if use_gpu else "rss_mib") + suffix
    return {f"peak_{label}_zero0": zero0, f"peak_{label}_zero3": zero3, f"zero3_over_zero0{suffix}": zero3 / zero0,
            f"training_{label}_zero0": zero0_model, f"training_{label}_zero3": zero3_model,
            f"zero3_over_zero0_training{suffix}": zero3_model / zero0_model}  # fmt: skip


def _unit_rows(rows: int, dim: int, seed: int) -> torch.Tensor:
    """Random L2-normalized embeddings, generated in place (no full-size temporaries)."""
    out = torch.empty(rows, dim)
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, rows, 65536):
        block = out[start : start + 65536]
        block.normal_(generator=generator)
        block.div_(block.norm(dim=1, keepdim=True))
    return out


def retrieval_queries_per_s(n_docs: int = 100_000, n_queries: int = 1000, dim: int = 512, k: int = 1000,
                            repeats: int = 3) -> dict:  # fmt: skip
    """gcl's exact_top_k and FAISS's exact IndexFlatIP on the same embeddings, same threads, best of
    `repeats`, interleaved so that both see the same machine load."""
    import faiss

    from gcl.retrieval import EvalConfig, exact_top_k

    cfg = EvalConfig()
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    docs, queries = _unit_rows(n_docs, dim, 0), _unit_rows(n_queries, dim, 1)
    index = faiss.IndexFlatIP(dim)
    index.add(docs.numpy())
    exact_top_k(queries[:10], docs[:10_000], k)  # compiles the kernels (or loads them from numba's cache)
    gcl_s, faiss_s = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        exact_top_k(queries, docs, k, cfg.chunk_size, cfg.query_block)
        gcl_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        index.search(queries.numpy(), k)
        faiss_s.append(time.perf_counter() - start)
    gcl_qps, faiss_qps = n_queries / min(gcl_s), n_queries / min(faiss_s)
    return {"retrieval_gcl_queries_per_s": gcl_qps, "retrieval_faiss_queries_per_s": faiss_qps,
            "retrieval_gcl_over_faiss": gcl_qps / faiss_qps}  # fmt: skip


def search_memory_child(n_docs: int, n_queries: int, dim: int, k: int) -> None:
    """Run in a fresh process: print the search's peak memory beyond its inputs, in MiB."""
    from gcl.retrieval import EvalConfig, exact_top_k

    docs, queries = _unit_rows(n_docs, dim, 0), _unit_rows(n_queries, dim, 1)
    before = _rss_mib()
    cfg = EvalConfig()
    exact_top_k(queries, docs, k, cfg.chunk_size, cfg.query_block)
    peak = _peak_rss_mib()
    print(json.dumps({"extra_mib": peak - before}))


def search_peak_memory(n_queries: int = 1000, dim: int = 512, k: int = 1000) -> dict:
    """The search's extra peak memory (beyond corpus and queries) at 100k and at 1M documents:
    bounded by the chunk size, it must not grow with the corpus."""
    import subprocess
    import sys

    extra = {}
    for n_docs in (100_000, 1_000_000):
        code = f"from workflows.bench import search_memory_child; search_memory_child({n_docs}, {n_queries}, {dim}, {k})"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        extra[n_docs] = json.loads(out.strip().splitlines()[-1])["extra_mib"]
    return {"search_extra_peak_mib_100k": extra[100_000], "search_extra_peak_mib_1m": extra[1_000_000],
            "search_extra_peak_1m_over_100k": extra[1_000_000] / extra[100_000]}  # fmt: skip


def bench_job(workdir: str, gpus: int, overrides: list[str] | None = None) -> JobConfig:
    """The job the data, steps and pipeline sections time: the tiny CPU config on the bench's
    generated data, one worker per GPU up to 2 (else 2 CPU workers), then `overrides` (KEY=VALUE,
    as `gcl train --set` takes them, e.g. model.arch=ViT-B-32 or train.batch_size=128)."""
    job = parse_config(JobConfig, os.path.join(os.path.dirname(__file__), "configs", "tiny-cpu.yaml"), [
        f"data.train={workdir}/data/train.parquet", "data.eval={}", f"storage={workdir}/runs",
        f"mlflow.tracking_uri=sqlite:///{workdir}/mlflow.db", f"train.batch_size={BATCH}", "train.epochs=2",
        "loss.score_range=[0, 1]",
        *(["scaling.use_gpu=true", f"scaling.num_workers={min(2, gpus)}"] if gpus else []),
        *(overrides or []),
    ])  # fmt: skip
    assert isinstance(job.fields, FieldsConfig)
    return job


def run_bench(
    only: list[str] | None = None, workdir: str | None = None, overrides: list[str] | None = None
) -> dict:
    """Run the benchmarks, print a table and JSON, return the figures. `overrides` apply to the
    data, steps and pipeline sections' job (see bench_job); the memory section keeps its own."""
    from gcl.cluster import init_ray
    from workflows.train import run_train

    only = only or ["data", "steps", "pipeline", "memory", "retrieval"]
    device, gpus = bench_device(), torch.cuda.device_count()
    figures: dict = {
        "machine": f"{os.cpu_count()} CPU cores, CUDA={torch.cuda.is_available()}",
        "device": str(device),
    }
    if gpus:
        figures["gpu"] = f"{gpus} x {torch.cuda.get_device_name(0)}"
    training = set(only) - {"retrieval"}
    if training:  # a bad --set fails here, before any section runs
        workdir = os.path.abspath(workdir or tempfile.mkdtemp(prefix="gcl-bench-"))
        job = bench_job(workdir, gpus, overrides)
    if "retrieval" in only:  # first, before Ray's processes share the cores
        figures.update(retrieval_queries_per_s())
        figures.update(search_peak_memory())
    if not training:
        return _report(figures)
    os.makedirs(f"{workdir}/runs", exist_ok=True)
    synthesize(f"{workdir}/data", BENCH_DATA)
    init_ray()
    world = job.scaling.num_workers  # 2, or one per GPU up to 2
    per_worker_batch = job.train.batch_size
    if {"data", "pipeline", "steps"} & set(only):
        batch = _batch_from_pipeline(job, per_worker_batch * world)
    if "data" in only:
        per_worker = {k: v[:per_worker_batch] for k, v in batch.items()}
        consume_one = bare_loop_pairs_per_s(job, per_worker, threads=1, device=device)
        figures["train_consumption_pairs_per_s"] = world * consume_one  # each worker: 1 core or 1 GPU
        figures["preprocessor_alone_pairs_per_s"] = preprocessor_pairs_per_s(job)
        for tasks in (1, 2):
            rate, first = data_pipeline_pass(job, tasks)
            figures[f"data_pairs_per_s_{tasks}cpu"] = rate
            figures[f"data_first_batch_s_{tasks}cpu"] = first
        figures["data_over_consumption"] = (
            figures["data_pairs_per_s_2cpu"] / figures["train_consumption_pairs_per_s"]
        )
    if {"steps", "pipeline"} & set(only):  # the one bare loop every ratio below divides by
        figures["bare_loop_pairs_per_s"] = bare_loop_pairs_per_s(job, batch, threads=world, device=device)
        peak, figures["peak_flops_source"] = peak_flops_per_s(device)
        figures["peak_tflops_per_s"] = peak / 1e12
        figures["train_gflops_per_pair"] = train_flops_per_pair(job, batch) / 1e9
        figures["bare_loop_mfu"] = (
            figures["bare_loop_pairs_per_s"] * figures["train_gflops_per_pair"] * 1e9 / peak
        )
    if "steps" in only:  # one process per worker: 2, or 1 on a single GPU (NCCL takes one rank per GPU)
        steps = data_parallel_pairs_per_s(job, batch, world)
        figures.update(steps)
        bare = figures["bare_loop_pairs_per_s"]
        figures.update({k.replace("_pairs_per_s", "_over_bare"): v / bare for k, v in steps.items()})
    if "pipeline" in only:
        result = run_train(job.model_copy(update={"name": f"bench-{time.time_ns()}"}))
        figures["pipeline_pairs_per_s"] = float(result.metrics["epoch_pairs_per_s"])  # epoch 2: warm
        figures["pipeline_steady_pairs_per_s"] = float(result.metrics["epoch_steady_pairs_per_s"])
        figures["pipeline_epoch_first_batch_s"] = float(result.metrics["epoch_first_batch_seconds"])
        # How much of the warm epoch the trainers spent waiting for data (0: never starved).
        figures["pipeline_data_wait_fraction"] = float(result.metrics["epoch_data_wait_fraction"])
        figures["pipeline_over_bare"] = figures["pipeline_pairs_per_s"] / figures["bare_loop_pairs_per_s"]
        figures["pipeline_steady_over_bare"] = (
            figures["pipeline_steady_pairs_per_s"] / figures["bare_loop_pairs_per_s"]
        )
        figures["pipeline_mfu"] = (
            figures["pipeline_pairs_per_s"] * figures["train_gflops_per_pair"] * 1e9 / peak
        )
    if "memory" in only and gpus == 1:
        figures["memory"] = "left out: needs 2 GPUs"
    elif "memory" in only and gpus:
        figures.update(zero_memory_figures(f"{workdir}/runs", "auto", use_gpu=True))
    elif "memory" in only:  # fp32 as gcl trains on CPU, and bf16 as the GPU config trains
        figures.update(zero_memory_figures(f"{workdir}/runs", "fp32", use_gpu=False))
        figures.update(zero_memory_figures(f"{workdir}/runs", "bf16", use_gpu=False, suffix="_bf16"))

    return _report(figures)


def _report(figures: dict) -> dict:
    goals = {"data_over_consumption": ">= 2", "pipeline_over_bare": ">= 0.9", "pipeline_steady_over_bare": ">= 0.9", "zero3_over_zero0": "<= 0.6", "zero3_over_zero0_training": "<= 0.6", "zero3_over_zero0_bf16": "<= 0.6", "zero3_over_zero0_training_bf16": "<= 0.6",
             "retrieval_gcl_over_faiss": ">= 1.0", "search_extra_peak_1m_over_100k": "~1 (bounded)"}  # fmt: skip
    print(f"\n{'figure':34s}{'value':>12s}  goal")
    for key, value in figures.items():
        if isinstance(value, float):  # small figures (a tiny model's MFU on a GPU) in exponent form
            shown = f"{value:12.3f}" if value == 0 or abs(value) >= 0.01 else f"{value:12.2e}"
        else:
            shown = f"{value!s:>12s}"
        print(f"{key:34s}{shown}  {goals.get(key, '')}")
    print(json.dumps(figures, indent=2))
    return figures
