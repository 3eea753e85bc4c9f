"""The `gcl` command line. Each subcommand parses its arguments and calls one workflow;
workflows are imported lazily so that `gcl --help` is instant."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

CONFIGS = Path(__file__).parent / "configs"


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        "-c",
        help="YAML config (e.g. workflows/configs/tiny-cpu.yaml); default: built-in defaults",
    )
    parser.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.epochs=3 --set loss.weight_fn=reciprocal")  # fmt: skip


def _job(args):
    from gcl.config import parse_config
    from gcl.job_config import JobConfig

    return parse_config(JobConfig, args.config, args.overrides)


def cmd_config(args) -> int:
    import yaml

    from gcl.config import describe
    from gcl.job_config import JobConfig

    if args.keys:
        print("\n".join(describe(JobConfig)))
        return 0
    print(yaml.safe_dump(_job(args).model_dump(mode="json"), sort_keys=False), end="")
    return 0


def cmd_data_synth(args) -> int:
    from gcl.data.splits import SplitConfig
    from gcl.data.synth import SynthConfig, synthesize

    cfg = SynthConfig(
        products=args.products, queries=args.queries, docs_per_query=args.docs_per_query, seed=args.seed
    )
    manifest = synthesize(args.out, cfg, SplitConfig(seed=args.seed))
    for name, info in manifest["splits"].items():
        print(
            f"{name:15s} {info['rows']:7d} pairs  {info['queries']:6d} queries  {info['documents']:6d} documents  -> {Path(args.out) / info['file']}"
        )
    return 0


def cmd_data_split(args) -> int:
    import pandas as pd

    from gcl.data.readers import read_table, resolve_files
    from gcl.data.splits import SplitConfig, build_splits
    from gcl.data.synth import write_splits

    cfg = SplitConfig(novel_query_fraction=args.novel_query_fraction, novel_document_fraction=args.novel_document_fraction,
                      in_domain_fraction=args.in_domain_fraction, seed=args.seed)  # fmt: skip
    pairs = pd.concat([read_table(f).to_pandas() for f in resolve_files(args.input)], ignore_index=True)
    splits = build_splits(pairs, args.query_column, args.document_column, cfg)
    manifest = write_splits(splits, args.out, {"source": args.input, "split": cfg.model_dump()},
                            query_col=args.query_column, doc_col=args.document_column)  # fmt: skip
    print(json.dumps(manifest["splits"], indent=2))
    return 0


def cmd_data_validate(args) -> int:
    from workflows.train import validate_data

    report = validate_data(_job(args))
    print(report.summary())
    return 0


def cmd_train(args) -> int:
    from workflows.train import run_train

    result = run_train(_job(args))
    print(
        json.dumps(
            {"run_id": result.run_id, "model_dir": result.model_dir, "metrics": result.metrics}, indent=2
        )
    )
    return 0


def cmd_evaluate(args) -> int:
    from workflows.evaluate import run_evaluate

    run_evaluate(_job(args), args.model)
    return 0


def cmd_demo(args) -> int:
    from workflows.demo import run_demo

    run_demo(quick=args.quick, workdir=args.workdir)
    return 0


def cmd_bench(args) -> int:
    from workflows.bench import run_bench

    run_bench(args.only.split(",") if args.only else None, args.workdir)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gcl",
        description="Generalized Contrastive Learning: fine-tune open_clip models for retrieval and ranking "
        "from graded relevance, on Ray with DeepSpeed, tracked in MLflow.",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("config", help="print the resolved config, or every key with its meaning (--keys)")
    _add_config_args(p)
    p.add_argument("--keys", action="store_true", help="list every config key with its type and meaning")
    p.set_defaults(func=cmd_config)

    data = sub.add_parser("data", help="generate, split and validate scored-pair data").add_subparsers(
        dest="data_command", required=True, metavar="ACTION"
    )
    p = data.add_parser("synth", help="write the synthetic shopping benchmark (train + 4 evaluation splits)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--products", type=int, default=2000)
    p.add_argument("--queries", type=int, default=700)
    p.add_argument("--docs-per-query", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data_synth)
    p = data.add_parser(
        "split", help="split your pairs into train / in_domain / novel_query / novel_document / zero_shot"
    )
    p.add_argument("--input", required=True, help="parquet file, directory or glob (or .csv / .jsonl)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--query-column", default="query_id")
    p.add_argument("--document-column", default="product_id")
    p.add_argument("--novel-query-fraction", type=float, default=0.2)
    p.add_argument("--novel-document-fraction", type=float, default=0.2)
    p.add_argument("--in-domain-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data_split)
    p = data.add_parser("validate", help="check a config's training and evaluation data, naming bad rows")
    _add_config_args(p)
    p.set_defaults(func=cmd_data_validate)

    p = sub.add_parser("train", help="fine-tune with Ray Train + DeepSpeed; resumes a run of the same name")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "evaluate", help="retrieval metrics per split for a model directory or MLflow model URI"
    )
    _add_config_args(p)
    p.add_argument(
        "--model", required=True, help="exported model dir, runs:/<id>/model or models:/<name>@<alias>"
    )
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "demo", help="the main job: synthetic data, binary baseline vs GCL, table, plot, registry"
    )
    p.add_argument("--quick", action="store_true", help="a smaller, faster variant")
    p.add_argument("--workdir", default="gcl_runs/demo", help="where data, runs and the plot go")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("bench", help="performance ratios measured side by side (data, pipeline, memory)")
    p.add_argument("--only", help="comma-separated subset of: data,pipeline,memory")
    p.add_argument("--workdir", help="scratch directory (default: a new temporary one)")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    from gcl.config import ConfigError
    from gcl.data.readers import DataError

    try:
        return args.func(args)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
