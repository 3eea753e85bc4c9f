"""The `gcl` command line. Each subcommand parses its arguments and calls one workflow;
workflows are imported lazily so that `gcl --help` is instant. Errors gcl explains (GclError)
are printed as one message, with exit code 2."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import NoReturn

from workflows import CONFIGS

__all__ = ["CONFIGS", "build_parser", "check_command", "main"]
log = logging.getLogger("gcl.cli")


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        "-c",
        help="YAML config (e.g. workflows/configs/tiny-cpu.yaml); default: built-in defaults",
    )
    _add_set_arg(parser, "override a config key, e.g. --set train.epochs=3 --set loss.weight_fn=reciprocal")


def _add_set_arg(parser: argparse.ArgumentParser, help: str) -> None:
    """--set KEY=VALUE, repeatable, into args.overrides."""
    parser.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def _job(args):
    from gcl.config import parse_config
    from gcl.job_config import JobConfig

    if getattr(args, "from_run", None):
        from gcl.errors import ConfigError
        from gcl.train.job import retrain_job

        if args.config:
            raise ConfigError("give --config or --from-run, not both: --from-run takes the whole config the run logged")
        return retrain_job(args.from_run, args.overrides)
    return parse_config(JobConfig, args.config, args.overrides)


def _quiet(args, storage_root: str, name: str):
    """The terminal shows gcl's progress and results; everything else goes to
    <storage>/<name>/logs/<command>-<time>.log (under ./gcl_runs/logs/ when storage is remote).
    -v leaves the full stream on the terminal."""
    import time

    from gcl import storage
    from gcl.console import quiet_console

    root = storage.local_path(storage_root) or os.path.abspath("gcl_runs")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return quiet_console(os.path.join(root, name, "logs", f"{args.command}-{stamp}.log"), verbose=args.verbose > 0)


def cmd_config(args) -> int:
    import yaml

    from gcl.config import describe
    from gcl.job_config import JobConfig

    if args.keys:
        print("\n".join(describe(JobConfig)))
        return 0
    print(yaml.safe_dump(_job(args).model_dump(mode="json"), sort_keys=False), end="")
    if args.config and not getattr(args, "from_run", None):
        from gcl.config import describe_layers

        print("\n".join(describe_layers(args.config)))
    return 0


def cmd_data_synth(args) -> int:
    from gcl.data.splits import SplitConfig
    from gcl.data.synth import LogConfig, SynthConfig, synthesize

    cfg = SynthConfig(products=args.products, queries=args.queries, docs_per_query=args.docs_per_query, seed=args.seed)
    search_log = (
        LogConfig(sessions_per_query=args.log_sessions, sponsored=args.log_sponsored, seed=args.seed)
        if args.log_sessions
        else None
    )
    manifest = synthesize(args.out, cfg, SplitConfig(seed=args.seed), log=search_log)
    for name, info in manifest["splits"].items():
        print(
            f"{name:19s} {info['rows']:7d} pairs  {info['queries']:6d} queries  {info['documents']:6d} documents"
            f"  -> {Path(args.out) / info['file']}"
        )
    if search_log:
        print(f"search log {Path(args.out) / 'log/impressions.parquet'}, catalog {Path(args.out) / 'catalog.parquet'}")
    return 0


def cmd_data_grades(args) -> int:
    from gcl.config import parse_config
    from gcl.job_config import JobConfig
    from workflows.data_grades import run_grades

    overrides = _with_flags(args, "grades", {"log": args.log, "catalog": args.catalog, "out": args.out})
    run_grades(parse_config(JobConfig, args.config, overrides))
    return 0


def cmd_data_split(args) -> int:
    from gcl.config import validate_config
    from gcl.data.split_job import split_dataset
    from gcl.data.splits import SplitConfig

    fractions = ("novel_query", "novel_document", "in_domain", "validation_query", "validation_document")
    values = {f"{name}_fraction": getattr(args, f"{name}_fraction") for name in fractions}
    cfg = validate_config(SplitConfig, {**values, "seed": args.seed}, source="gcl data split")
    extra = {"source": args.input, "split": cfg.model_dump()}
    manifest = split_dataset(args.input, args.out, args.query_column, args.document_column, cfg, extra)
    for name, info in manifest["splits"].items():
        print(
            f"{name:19s} {info['rows']:9d} pairs  {info['queries']:7d} queries  {info['documents']:8d} documents"
            f"  -> {Path(args.out) / info['file']} ({info['files']} files)"
        )
    print(
        f"{manifest['unused_pairs']} pairs in no split (a test-novel query with a validation-novel document, "
        "or the reverse)"
    )
    return 0


def cmd_data_validate(args) -> int:
    from gcl.train.job import validate_data

    print(validate_data(_job(args)).train.summary())
    return 0


def cmd_train(args) -> int:
    from workflows.train import train

    job = _job(args)
    try:
        with _quiet(args, job.storage, job.name):
            train(job)
    except (KeyboardInterrupt, SystemExit) as stop:
        print(
            f"stopped: `gcl train` with the same config resumes run {job.name} from its last checkpoint",
            file=sys.stderr,
        )
        _exit_stopped(stop)
    return 0


def _exit_stopped(stop: KeyboardInterrupt | SystemExit) -> NoReturn:
    """Exit now, as a command its user stopped: 130 for Ctrl-C, as shells use; 15 for SIGTERM,
    which Ray's driver turns into sys.exit(15). Its runs are marked, Ray is shut down and the log
    is written by then; what is left is the interpreter's teardown of an interrupted Ray Tune or
    Train driver, which took over two minutes of garbage collection once (a busy machine)."""
    from gcl.console import end_ray

    end_ray()  # done already where the console was quiet; with -v, here: a local cluster goes with it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(stop.code if isinstance(stop, SystemExit) and isinstance(stop.code, int) else 130)


def cmd_sync(args) -> int:
    from gcl.train.job import sync_run

    run_id, done = sync_run(_job(args))
    print(f"run {run_id}: " + (f"logged to MLflow: {', '.join(done)}" if done else "nothing to log: MLflow has it all"))
    return 0


def cmd_tune(args) -> int:
    from gcl.tune.sweep import load_sweep
    from workflows.tune import run_tune

    sweep, job = load_sweep(args.config, args.overrides)
    try:
        with _quiet(args, job.storage, sweep.name):
            run_tune(args.config, args.overrides)
    except (KeyboardInterrupt, SystemExit) as stop:
        print(
            f"stopped: `gcl tune` with the same config resumes sweep {sweep.name}; its finished trials are "
            "not run again",
            file=sys.stderr,
        )
        _exit_stopped(stop)
    return 0


def cmd_register(args) -> int:
    from gcl.registry.models import register_run
    from gcl.tracking.runs import check_tracking, find_run, resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    check_tracking(uri)
    version, alias = register_run(find_run(uri, args.run, args.experiment), args.name, uri)
    print(f"registered {args.name} version {version} as @{alias}")
    return 0


def check_command(command: list[str], working_dir: str | None) -> None:
    """Parse a command for `gcl submit` with gcl's own parser and validate its config here, before
    submitting, so that a typo fails in a second instead of after the cluster scheduled the job."""
    from gcl.config import parse_config
    from gcl.errors import ConfigError
    from gcl.job_config import JobConfig

    if not command:
        raise ConfigError("give the gcl command to run after --, e.g. gcl submit -- train -c <config>")
    try:
        args = build_parser().parse_args(command)
    except SystemExit as err:  # argparse's way of saying no
        raise ConfigError(f"not a gcl command: {shlex.join(command)}") from err
    config = getattr(args, "config", None)
    if not config:
        return
    local = Path(working_dir or ".") / config if not os.path.isabs(config) else Path(config)
    if not local.exists():  # it may exist only in the image; the job reports it then
        log.warning("config %s is not here; not checked before submitting", local)
        return
    if args.command == "tune":
        from gcl.tune.sweep import load_sweep

        load_sweep(local, args.overrides)
    else:
        parse_config(JobConfig, local, args.overrides)


def cmd_submit(args) -> int:
    from workflows.submit import runtime_env, submit

    command = args.gcl_command[1:] if args.gcl_command[:1] == ["--"] else args.gcl_command
    env_spec = runtime_env(args.runtime_env, args.working_dir, args.env)
    check_command(command, env_spec.get("working_dir"))
    return submit(args.address, command, env_spec, wait=not args.no_wait, submission_id=args.submission_id)


def cmd_evaluate(args) -> int:
    from gcl.errors import ConfigError
    from gcl.outputs import EVALUATION_OUTPUT, check_output_file, write_file_whole
    from workflows.evaluate import run_evaluate

    job = _job(args)
    if args.output:  # before any work: a typo in -o does not cost an evaluation
        check_output_file(args.output, EVALUATION_OUTPUT, _is_evaluation_output)
    if args.index:
        from workflows.evaluate import run_evaluate_index

        if len(args.model) > 1:
            raise ConfigError("--index evaluates one model (by default the index's own); give at most one --model")
        with _quiet(args, job.storage, job.name):
            results = run_evaluate_index(job, args.index, (args.model or [None])[0])
        if args.output:
            write_file_whole(args.output, json.dumps({"index": args.index, "searches": results}, indent=2) + "\n")
        return 0
    if not args.model:
        raise ConfigError("give --model (repeat it to compare models), or --index DIR")
    with _quiet(args, job.storage, job.name):
        results = run_evaluate(job, args.model)
    if args.output:
        one = len(args.model) == 1
        written = {"model": args.model[0], "metrics": results} if one else {"models": results}
        write_file_whole(args.output, json.dumps(written, indent=2) + "\n")
    return 0


def _is_evaluation_output(text: str) -> bool:
    """Whether a file holds what `gcl evaluate -o` writes (so that -o may replace it)."""
    written = json.loads(text)
    return isinstance(written, dict) and bool({"metrics", "models", "searches"} & set(written))


def cmd_demo(args) -> int:
    from workflows.demo import run_demo

    workdir = args.workdir or ("gcl_runs/demo-tiny" if args.tiny else "gcl_runs/demo")
    with _quiet(args, workdir, ""):
        run_demo(quick=args.quick, workdir=workdir, tiny=args.tiny)
    return 0


def _with_flags(args, section: str, flags: dict) -> list[str]:
    """The config overrides plus `section.key=value` for each flag given on the command line."""
    import yaml

    given = [
        f"{section}.{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
        for key, value in flags.items()
        if value not in (None, [])
    ]
    return [*args.overrides, *given]


def cmd_embed(args) -> int:
    from gcl.config import parse_config
    from gcl.job_config import JobConfig
    from workflows.embed import run_embed

    overrides = _with_flags(
        args, "embed", {"model": args.model, "input": args.input, "out": args.out, "side": args.side, "keep": args.keep}
    )
    job = parse_config(JobConfig, args.config, overrides)
    with _quiet(args, job.storage, job.name):
        run_embed(job)
    return 0


def cmd_index(args) -> int:
    from gcl.config import parse_config
    from gcl.job_config import JobConfig
    from workflows.index import run_index

    overrides = _with_flags(
        args, "index", {"embeddings": args.embeddings, "out": args.out, "kind": args.kind, "display": args.display}
    )
    job = parse_config(JobConfig, args.config, overrides)
    with _quiet(args, job.storage, job.name):
        run_index(job, args.register)
    return 0


def cmd_ui(args) -> int:
    import contextlib

    from workflows.ui import run_ui

    job = _job(args)
    with contextlib.suppress(KeyboardInterrupt), _quiet(args, job.storage, "ui"):  # Ctrl-C stops the page
        run_ui(job, args.model, args.eval_split, args.catalog, args.host, args.port)
    return 0


def cmd_bench(args) -> int:
    from workflows.bench import run_bench

    if args.gpu_check:
        from gcl.bench.gpu_check import main as gpu_check

        return gpu_check(["--out", args.gpu_check])
    run_bench(args.only.split(",") if args.only else None, args.workdir, args.overrides, args.search_rows, args.preset)
    return 0


def _add_config(sub) -> None:
    p = sub.add_parser(
        "config",
        help="print the resolved config and the files it is made of, or every key "
        "with its meaning and where its section is defined (--keys)",
    )
    _add_config_args(p)
    p.add_argument("--keys", action="store_true", help="list every config key with its type and meaning")
    p.set_defaults(func=cmd_config)


def _add_data(sub) -> None:
    data = sub.add_parser("data", help="generate, split and validate scored-pair data").add_subparsers(
        dest="data_command", required=True, metavar="ACTION"
    )
    p = data.add_parser("synth", help="write the synthetic shopping benchmark (train, 4 test and 4 validation splits)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--products", type=int, default=2000)
    p.add_argument("--queries", type=int, default=700)
    p.add_argument("--docs-per-query", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--log-sessions",
        type=int,
        default=0,
        metavar="N",
        help="also a search log over the training queries, N searches each, drawn from their known "
        "grades (<out>/log/, with its truth), and the catalog (<out>/catalog.parquet)",
    )
    p.add_argument(
        "--log-sponsored",
        type=int,
        default=0,
        metavar="K",
        help="the log's lists open with K sponsored products of other queries' results (true grade 0)",
    )
    p.set_defaults(func=cmd_data_synth)
    p = data.add_parser(
        "grades",
        help="graded pairs from a search log (impressions, clicks, carts, purchases), "
        "position bias taken out; the pairs `gcl data split` and `gcl train` take",
    )
    _add_config_args(p)
    p.add_argument("--log", help="the impression log (file, directory or glob); grades.log")
    p.add_argument("--catalog", help="the products (id, title, image, ...); grades.catalog")
    p.add_argument("--out", help="output directory for the graded pairs; grades.out")
    p.set_defaults(func=cmd_data_grades)
    p = data.add_parser(
        "split",
        help="split your pairs into train, the test splits (in_domain, novel_query, novel_document, "
        "zero_shot) and validation splits of their own (val_*)",
    )
    p.add_argument("--input", required=True, help="parquet file, directory or glob (or .csv / .jsonl)")
    p.add_argument(
        "--out",
        required=True,
        help="output directory (local or a URI): <out>/<split>/ parquet directories and manifest.json",
    )
    p.add_argument("--query-column", default="query_id")
    p.add_argument("--document-column", default="product_id")
    p.add_argument("--novel-query-fraction", type=float, default=0.2)
    p.add_argument("--novel-document-fraction", type=float, default=0.2)
    p.add_argument("--in-domain-fraction", type=float, default=0.2)
    p.add_argument(
        "--validation-query-fraction",
        type=float,
        default=0.1,
        help="queries held out for the val_* splits, apart from the test splits' (0: none)",
    )
    p.add_argument(
        "--validation-document-fraction",
        type=float,
        default=0.1,
        help="documents held out for the val_* splits likewise (0: none)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data_split)
    p = data.add_parser("validate", help="check a config's training and evaluation data, naming bad rows")
    _add_config_args(p)
    p.set_defaults(func=cmd_data_validate)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="fine-tune with Ray Train + DeepSpeed; resumes a run of the same name")
    _add_config_args(p)
    p.add_argument(
        "--from-run",
        metavar="RUN",
        help="train again with the config a run logged: a run name or id, "
        "or a registered model (models:/NAME@ALIAS); as run <name>-retrain unless --set name=...",
    )
    p.set_defaults(func=cmd_train)


def _add_sync(sub) -> None:
    p = sub.add_parser(
        "sync",
        help="after an MLflow outage: log what a finished `gcl train` could not "
        "(buffered metrics, the model, the run's end, its registration)",
    )
    _add_config_args(p)
    p.set_defaults(func=cmd_sync)


def _add_tune(sub) -> None:
    p = sub.add_parser("tune", help="sweep loss weights with Ray Tune (Optuna + ASHA); registers the best model")
    p.add_argument("--config", "-c", required=True, help="sweep YAML (e.g. workflows/configs/sweep-tiny.yaml)")
    _add_set_arg(
        p, "override a sweep key, or with job. a key of its base job, e.g. --set num_samples=4 --set job.train.epochs=1"
    )
    p.set_defaults(func=cmd_tune)


def _add_register(sub) -> None:
    p = sub.add_parser("register", help="register a run's model; @champion only if it beats the current one")
    p.add_argument(
        "--run",
        required=True,
        help="a `gcl train` run or a sweep's trial: its name (the job's `name`; the newest run of it) or MLflow run id",
    )
    p.add_argument(
        "--experiment", default="gcl", help="the MLflow experiment of a run given by name (mlflow.experiment)"
    )
    p.add_argument("--name", required=True, help="registered model name")
    p.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI, else sqlite:///mlruns.db here")
    p.set_defaults(func=cmd_register)


def _add_submit(sub) -> None:
    p = sub.add_parser(
        "submit",
        help="run a gcl command on a Ray cluster as a Ray Job, streaming its logs",
        description="e.g. gcl submit --address http://head:8265 --runtime-env cluster/runtime_env.yaml "
        "-- train -c workflows/configs/tiny-cpu.yaml --set train.epochs=3",
    )
    p.add_argument("--address", help="Ray dashboard address (default: RAY_ADDRESS, else http://127.0.0.1:8265)")
    p.add_argument("--runtime-env", help="runtime environment YAML (e.g. cluster/runtime_env.yaml)")
    p.add_argument("--working-dir", help="directory uploaded as the job's working directory (overrides the file's)")
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment variable for the job (MLFLOW_TRACKING_URI is forwarded from here when set)",
    )
    p.add_argument("--no-wait", action="store_true", help="return once submitted instead of streaming the logs")
    p.add_argument("--submission-id", help="job id to use (default: generated)")
    p.add_argument("gcl_command", nargs=argparse.REMAINDER, help="-- then the gcl command, e.g. -- train -c ...")
    p.set_defaults(func=cmd_submit)


def _add_embed(sub) -> None:
    p = sub.add_parser(
        "embed", help="embed a catalog (or queries) with a model: Ray Data batch inference to parquet or Lance"
    )
    _add_config_args(p)
    p.add_argument(
        "--model",
        help="models:/<name>@<alias> (or /<version>), runs:/<id>/model, or an exported model directory (embed.model)",
    )
    p.add_argument(
        "--input", help="rows to embed: parquet, CSV or JSONL; a file, directory or glob, local or a URI (embed.input)"
    )
    p.add_argument(
        "--out", help="output directory of parquet files, or a path ending in .lance for a Lance dataset (embed.out)"
    )
    p.add_argument("--side", choices=["right", "left"], help="right: documents (default); left: queries (embed.side)")
    p.add_argument(
        "--keep",
        action="append",
        default=[],
        metavar="COLUMN",
        help="copy an input column to the output, e.g. a title to display (embed.keep; repeatable)",
    )
    p.set_defaults(func=cmd_embed)


def _add_index(sub) -> None:
    p = sub.add_parser(
        "index",
        help="build a FAISS index (flat, hnsw, ivf-pq) of `gcl embed`'s output; "
        "--register NAME makes it a servable search model",
    )
    _add_config_args(p)
    p.add_argument("--embeddings", help="`gcl embed`'s output directory (index.embeddings)")
    p.add_argument("--out", help="index directory to write (index.out)")
    p.add_argument("--kind", choices=["flat", "hnsw", "ivf-pq"], help="index kind (index.kind; default hnsw)")
    p.add_argument(
        "--display",
        action="append",
        default=[],
        metavar="COLUMN",
        help="a column kept by `gcl embed --keep` to return with results (index.display; repeatable)",
    )
    p.add_argument("--register", metavar="NAME", help="log and register the model and index as search model NAME")
    p.set_defaults(func=cmd_index)


def _add_ui(sub) -> None:
    p = sub.add_parser(
        "ui",
        help="a search page over 1 to 3 search models side by side, with grades and NDCG@10 from an evaluation split",
    )
    _add_config_args(p)
    p.add_argument(
        "--model",
        action="append",
        default=[],
        required=True,
        help="a registered search model (models:/NAME@ALIAS, from gcl index --register) or a gcl index "
        "directory; repeat for up to 3 columns",
    )
    p.add_argument(
        "--eval-split",
        help="pairs with grades (a split of gcl data split): grades, NDCG@10 and the split's queries on the page",
    )
    p.add_argument("--catalog", help="the documents' rows with their images (default: the evaluation split's)")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default loopback only)")
    p.add_argument("--port", type=int, default=8765)
    p.set_defaults(func=cmd_ui)


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="retrieval metrics per split for one or more models (gcl's, MLflow's or open_clip's)"
    )
    _add_config_args(p)
    p.add_argument(
        "--model",
        action="append",
        default=[],
        help="exported model dir, a training checkpoint or a run's dir (its latest checkpoint; "
        "a path or a storage URI such as s3://...), runs:/<id>/model, models:/<name>@<alias>, or an open_clip "
        "base model open_clip:ARCH[:TAG or weights file] fed with the config's fields; repeat --model to "
        "compare models, each against the first",
    )
    p.add_argument(
        "--index",
        metavar="DIR",
        help="a `gcl index` directory: search each split's queries with it "
        "and exactly over the same catalog, side by side (the model: the index's, unless --model)",
    )
    p.add_argument(
        "--output",
        "-o",
        metavar="FILE",
        help="also write the metrics per split to FILE as JSON "
        "({model, metrics}; with several models {models: {model: metrics}})",
    )
    p.set_defaults(func=cmd_evaluate)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the main job: synthetic data, binary baseline vs GCL, table, plot, registry")
    p.add_argument("--quick", action="store_true", help="a smaller, faster variant")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="train gcl-tiny (3.4M parameters) from random weights instead of fine-tuning the pretrained "
        "towers (MiniLM text, EfficientNet-Lite0 image; the `pretrained` extra)",
    )
    p.add_argument(
        "--workdir", help="where data, runs and the plot go (default: gcl_runs/demo, or gcl_runs/demo-tiny with --tiny)"
    )
    p.set_defaults(func=cmd_demo)


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench", help="performance ratios measured side by side (data, pipeline, memory, cached, retrieval)"
    )
    p.add_argument(
        "--only",
        help="comma-separated subset of: data,steps,pipeline,memory,cached,retrieval (the default "
        "set), and search (embedding and indexes; minutes at 1M vectors)",
    )
    p.add_argument("--search-rows", type=int, default=1_000_000, help="vectors the search section indexes (default 1M)")
    p.add_argument("--workdir", help="scratch directory (default: a new temporary one)")
    _add_set_arg(
        p,
        "override the timed job's config (data, steps, pipeline), e.g. --set model.arch=ViT-B-32 "
        "--set train.batch_size=128 --set pipeline.preprocess_tasks=8",
    )
    p.add_argument(
        "--preset",
        choices=["vitb32-cpu", "vitb32-cpu-job", "towers-locked"],
        help="vitb32-cpu: the steps section at ViT-B-32 size on this CPU (a few minutes); "
        "vitb32-cpu-job: with `gcl train` on one worker against open_clip's loop (about 10 minutes); "
        "towers-locked: the demo's towers trained with their locked features computed once and not",
    )
    p.add_argument(
        "--gpu-check",
        metavar="OUT.json",
        help="the GPU check (gcl.bench.gpu_check: open_clip's loop against gcl's steps at ViT-B-32, "
        "batches 256 and 512, on the first GPU) into one JSON file; nothing else runs",
    )
    p.set_defaults(func=cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gcl",
        description="Generalized Contrastive Learning: fine-tune open_clip models for retrieval and ranking "
        "from graded relevance, on Ray with DeepSpeed, tracked in MLflow.",
    )
    parser.add_argument(
        "--verbose",
        "-v",
        action="count",
        default=0,
        help="-v: everything Ray, Ray Data, DeepSpeed and open_clip print on the terminal too "
        "(by default it goes to the command's log file); -vv: debug logging",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _add_config,
        _add_data,
        _add_train,
        _add_sync,
        _add_tune,
        _add_register,
        _add_submit,
        _add_embed,
        _add_index,
        _add_ui,
        _add_evaluate,
        _add_demo,
        _add_bench,
    ):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose > 1 else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    from gcl import console
    from gcl.errors import GclError

    try:
        return args.func(args)
    except GclError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        if console.last_log_file is None:  # no log to hold the traceback: the terminal gets it
            raise
        print(
            f"error: {type(err).__name__}: {' '.join(str(err).split())[:300]}; gcl stopped on an error it does "
            f"not explain: please report it with the traceback in {console.last_log_file}",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
