"""Every command, every kind of bad input: one line that names the input and what would be
accepted, exit code 2, no traceback on the terminal (it is in the command's log, where it has one),
and nothing half-written (no output directory, registered version or MLflow run left RUNNING).

The cases run one after the other in one subprocess (tests/cli_driver.py), each as the `gcl`
console script runs a command, so that the matrix pays Python's and gcl's imports once. Nothing
here needs a Ray cluster: every bad input is refused before one would start."""

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import register_tiny_model, write_embeddings
from mlflow import MlflowClient

from workflows import CONFIGS

TINY = str(CONFIGS / "tiny-cpu.yaml")
DRIVER = Path(__file__).with_name("cli_driver.py")


class _Answers500(http.server.BaseHTTPRequestHandler):
    def _fail(self):
        self.send_response(500)
        self.end_headers()
        self.wfile.write(b"internal error")

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _fail

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Data, bad files, a store with a registered model (tiny@champion), and a tracking server that
    answers 500."""
    from gcl.data.synth import SynthConfig, synthesize

    root = tmp_path_factory.mktemp("bad-input")
    synthesize(root / "data", SynthConfig(products=80, queries=30, docs_per_query=6, seed=3))
    train = root / "data/train.parquet"
    pairs = pd.read_parquet(train)
    (root / "bytes.parquet").write_bytes(b"these bytes are not parquet")
    (root / "truncated.parquet").write_bytes(train.read_bytes()[: train.stat().st_size // 2])
    (root / "blob.csv").write_bytes(b"query,title,score_linear\nred,\x00\xff\xfe\x01,0.5,9,9\n")
    (root / "list.json").write_text("[1, 2, 3]\n")
    (root / "list.jsonl").write_text("[1, 2, 3]\n")
    (root / "empty.parquet").write_bytes(b"")
    (root / "empty_dir").mkdir()
    (root / "mixed_dir").mkdir()
    pairs.to_parquet(root / "mixed_dir/a.parquet")
    pairs.head(5).drop(columns=["image"]).to_csv(root / "mixed_dir/b.csv", index=False)
    pairs.drop(columns=["title"]).to_parquet(root / "missing_col.parquet")
    pairs.rename(columns={"query": "q"}).to_parquet(root / "renamed_col.parquet")
    pairs.assign(score_linear=pairs["score_linear"].astype(str)).to_parquet(root / "mistyped.parquet")
    (root / "emb_bad").mkdir()
    (root / "emb_bad/part-0.parquet").write_bytes(b"not parquet")
    (root / "emb_plain").mkdir()
    pq.write_table(pq.read_table(train).select(["product_id"]), root / "emb_plain/part-0.parquet")
    # A gcl embed output whose run failed before its summary (written last) was: not whole.
    write_embeddings(root / "emb_unfinished", np.eye(4, 8), [f"p{i}" for i in range(4)])
    (root / "emb_unfinished/_gcl_embeddings.json").unlink()
    (root / "sweep.yaml").write_text(
        json.dumps({"name": "s", "base": TINY, "space": {"loss.no_such_key": {"grid": [1]}}})
    )

    uri = register_tiny_model(root)
    _outputs_and_models(root, pairs)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answers500)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, uri, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _outputs_and_models(root: Path, pairs: pd.DataFrame) -> None:
    """What the data-safety cases need: a user's directory, an earlier split, finished embeddings,
    models without (whole) weights, a checkpoint without its model states, evaluation splits that
    are wrong in the ways training refuses, and data whose scores make no weights."""
    import shutil

    from gcl.data.split_job import split_dataset
    from gcl.data.splits import SplitConfig

    (root / "notes").mkdir()
    (root / "notes/notes.txt").write_text("keep me\n")
    (root / "a_file").write_text("a user's file\n")
    split_dataset(
        str(root / "data/train.parquet"),
        str(root / "split_prev"),
        "query_id",
        "product_id",
        SplitConfig(validation_query_fraction=0, validation_document_fraction=0),
    )
    write_embeddings(root / "emb_ok", np.eye(8, 8), [f"p{i}" for i in range(8)])
    for name in ("model_no_weights", "model_truncated"):
        shutil.copytree(root / "model", root / name)
    (root / "model_no_weights/open_clip_pytorch_model.bin").unlink()
    weights = root / "model_truncated/open_clip_pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (root / "ckpt_no_states/checkpoint").mkdir(parents=True)
    (root / "ckpt_no_states/gcl_state.json").write_text(json.dumps({"epoch": 1, "step": 5}))
    pairs.head(0).to_parquet(root / "eval_empty.parquet")
    judged = pd.read_parquet(root / "data/in_domain.parquet")
    judged.assign(score_linear=judged["score_linear"].where(judged.index != 2)).to_parquet(root / "eval_nan.parquet")
    image = judged.at[3, "image"]
    judged.assign(
        image=[{**image, "bytes": image["bytes"][:40]} if i == 3 else v for i, v in enumerate(judged["image"])]
    ).to_parquet(root / "eval_bad_image.parquet")
    twice = judged.iloc[[0]].assign(pair_id=10**9, score_linear=1.0 - judged["score_linear"].iloc[0])
    pd.concat([judged, twice]).to_parquet(root / "eval_twice.parquet")
    pairs.assign(score_linear=0.5).to_parquet(root / "constant_score.parquet")
    pairs.assign(score_linear=pairs["score_linear"].where(pairs.index != 4, 1e300)).to_parquet(root / "outlier.parquet")
    (root / "twice.yaml").write_text("train:\n  lr: 0.001\nmodel:\n  arch: gcl-tiny\ntrain:\n  epochs: 2\n")
    (root / "runs/locked").mkdir(parents=True)
    import socket

    (root / "runs/locked/train.lock").write_text(
        json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": "2026-12-07 09:00:00"})
    )


# Every file under these (relative to the workspace) must come out of the matrix byte for byte.
KEPT = ("notes", "a_file", "split_prev", "emb_ok", "data")


def _contents(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for name in KEPT
        for p in sorted([root / name, *(root / name).rglob("*")])
        if p.is_file()
    }


def _cases(root: Path, server_500: str) -> list[dict]:
    """(name, argv, env, what the message must name, paths that must not exist after)."""
    data = ["--set", f"data.train={root}/data/train.parquet", "--set", "data.eval={}", "--set", "data.validation={}"]
    job = ["-c", TINY, *data, "--set", f"storage={root}/runs"]
    judged = [*job, "--set", "data.eval={in_domain: data/in_domain.parquet}"]  # gcl evaluate's splits
    cases = [
        ("config: no such file", ["config", "-c", "missing.yaml"], {}, "missing.yaml", []),
        ("config: a JSON list", ["config", "-c", "list.json"], {}, "list.json", []),
        ("config: unknown key", ["config", "--set", "train.epoch=3"], {}, "train.epoch", []),
        ("bench: unknown key", ["bench", "--set", "train.epoch=3"], {}, "train.epoch", []),
        (
            "data split: not parquet",
            ["data", "split", "--input", "bytes.parquet", "--out", "split_out"],
            {},
            "bytes.parquet",
            ["split_out"],
        ),
        (
            "data split: no such column",
            ["data", "split", "--input", "data/train.parquet", "--out", "split_out", "--query-column", "qid"],
            {},
            "qid",
            ["split_out"],
        ),
    ]
    bad_data = {
        "missing path": "missing.parquet",
        "empty file": "empty.parquet",
        "bytes named .parquet": "bytes.parquet",
        "truncated parquet": "truncated.parquet",
        "CSV with a binary blob": "blob.csv",
        "JSON that is a list": "list.jsonl",
        "directory with no data": "empty_dir",
        "directory of mixed files": "mixed_dir",
        "missing column": "missing_col.parquet",
        "renamed column": "renamed_col.parquet",
        "mistyped column": "mistyped.parquet",
    }
    named = {"missing column": "title", "renamed column": "query", "mistyped column": "score_linear"}
    for kind, file in bad_data.items():
        cases.append(
            (
                f"data validate: {kind}",
                ["data", "validate", "-c", TINY, "--set", f"data.train={file}"],
                {},
                named.get(kind, file),
                [],
            )
        )
    cases += [
        (
            "train: bad data",
            ["train", *job, "--set", "data.train=bytes.parquet", "--set", "name=t1"],
            {},
            "bytes.parquet",
            ["runs/t1/model"],
        ),
        (
            "train: tracking refuses",
            ["train", *job, "--set", "mlflow.tracking_uri=http://127.0.0.1:1"],
            {},
            "http://127.0.0.1:1",
            [],
        ),
        (
            "train: tracking answers 500",
            ["train", *job, "--set", f"mlflow.tracking_uri={server_500}"],
            {},
            server_500,
            [],
        ),
        (
            "train: nothing at the Ray address",
            ["train", *job],
            {"RAY_ADDRESS": "127.0.0.1:1"},
            "RAY_ADDRESS=127.0.0.1:1",
            [],
        ),
        (
            "train: weights that cannot be fetched",
            ["train", *job, "--set", "model.arch=ViT-B-32", "--set", "model.pretrained=laion2b_s34b_b79k"],
            {},
            "laion2b_s34b_b79k",
            [],
        ),
        (
            "train: a tower package not installed",
            [
                "train",
                *job,
                "--set",
                "model.arch=towers",
                "--set",
                "model.towers={text: {hf: 'pypackage:no_such_package/model'}}",
            ],
            {},
            "no_such_package",
            [],
        ),
        ("tune: no such sweep file", ["tune", "-c", "missing_sweep.yaml"], {}, "missing_sweep.yaml", []),
        ("tune: unknown key in the space", ["tune", "-c", "sweep.yaml"], {}, "loss.no_such_key", ["runs/s"]),
        (
            "evaluate: unknown registered model",
            ["evaluate", *judged, "--model", "models:/nope@champion"],
            {},
            "nope",
            [],
        ),
        ("evaluate: unknown version", ["evaluate", *judged, "--model", "models:/tiny/99"], {}, "models:/tiny/99", []),
        ("evaluate: unknown alias", ["evaluate", *judged, "--model", "models:/tiny@nope"], {}, "models:/tiny@nope", []),
        ("evaluate: unknown run", ["evaluate", *judged, "--model", f"runs:/{'0' * 32}/model"], {}, "0" * 32, []),
        ("evaluate: a directory with no model", ["evaluate", *judged, "--model", "empty_dir"], {}, "empty_dir", []),
        (
            "evaluate: weights that cannot be fetched",
            ["evaluate", *judged, "--model", "open_clip:ViT-B-32:laion2b_s34b_b79k"],
            {},
            "laion2b_s34b_b79k",
            [],
        ),
        ("evaluate --index: no such directory", ["evaluate", *judged, "--index", "idx_missing"], {}, "idx_missing", []),
        ("evaluate --index: not an index", ["evaluate", *judged, "--index", "empty_dir"], {}, "empty_dir", []),
        ("register: unknown run", ["register", "--run", "nope", "--name", "x"], {}, "nope", []),
        (
            "register: tracking refuses",
            ["register", "--run", "x", "--name", "y", "--tracking-uri", "http://127.0.0.1:1"],
            {},
            "http://127.0.0.1:1",
            [],
        ),
        (
            "embed: unknown registered model",
            ["embed", "--model", "models:/nope@champion", "--input", "data/*.parquet", "--out", "emb_out"],
            {},
            "nope",
            ["emb_out"],
        ),
        (
            "embed: input not parquet",
            ["embed", "--model", "models:/tiny@champion", "--input", "bytes.parquet", "--out", "emb_out"],
            {},
            "bytes.parquet",
            ["emb_out"],
        ),
        (
            "embed: input without the model's fields",
            ["embed", "--model", "models:/tiny@champion", "--input", "missing_col.parquet", "--out", "emb_out"],
            {},
            "title",
            ["emb_out"],
        ),
        (
            "index: a file that is not parquet",
            ["index", "--embeddings", "emb_bad", "--out", "idx_out"],
            {},
            "part-0.parquet",
            ["idx_out"],
        ),
        (
            "index: parquet not from gcl embed",
            ["index", "--embeddings", "emb_plain", "--out", "idx_out"],
            {},
            "emb_plain",
            ["idx_out"],
        ),
        (
            "index: no embeddings",
            ["index", "--embeddings", "empty_dir", "--out", "idx_out"],
            {},
            "empty_dir",
            ["idx_out"],
        ),
        (
            "index: embeddings gcl embed did not finish",
            ["index", "--embeddings", "emb_unfinished", "--out", "idx_out"],
            {},
            "_gcl_embeddings.json",
            ["idx_out"],
        ),
        (
            "embed: an output directory holding other files",
            ["embed", "--model", "models:/tiny@champion", "--input", "data/train.parquet", "--out", "mixed_dir"],
            {},
            "mixed_dir",
            [],
        ),
        (
            "index: tracking refuses the registration",
            [
                "index",
                "--embeddings",
                "emb_plain",
                "--out",
                "idx_out",
                "--register",
                "s",
                "--set",
                "mlflow.tracking_uri=http://127.0.0.1:1",
            ],
            {},
            "http://127.0.0.1:1",
            ["idx_out"],
        ),
        (
            "submit: nothing at the address",
            ["submit", "--address", "http://127.0.0.1:1", "--", "config"],
            {},
            "http://127.0.0.1:1",
            [],
        ),
        ("sync: no such run", ["sync", *job, "--set", "name=nope"], {}, "nope", []),
        ("ui: unknown registered model", ["ui", "--model", "models:/nope@champion"], {}, "nope", []),
        (
            "ui: an embedding model without a catalog",
            ["ui", "--model", "models:/tiny@champion"],
            {},
            "give --catalog or --eval-split",
            [],
        ),
        ("ui: no such index directory", ["ui", "--model", "idx_missing"], {}, "idx_missing", []),
        ("ui: a directory that is not an index", ["ui", "--model", "empty_dir"], {}, "empty_dir", []),
        ("ui: four models", ["ui", *["--model", "empty_dir"] * 4], {}, "--model given 4 times", []),
        (
            "ui: tracking refuses",
            ["ui", "--model", "models:/tiny@champion", "--set", "mlflow.tracking_uri=http://127.0.0.1:1"],
            {},
            "http://127.0.0.1:1",
            [],
        ),
        # Nothing a user has is replaced, and a failed write leaves the earlier output as it was (KEPT).
        (
            "index: --out holds a user's files",
            ["index", "--embeddings", "emb_ok", "--out", "notes"],
            {},
            "notes.txt",
            [],
        ),
        (
            "index: --out is the working directory",
            ["index", "--embeddings", "emb_ok", "--out", "."],
            {},
            "the working directory",
            [],
        ),
        ("index: --out is the embeddings", ["index", "--embeddings", "emb_ok", "--out", "emb_ok"], {}, "emb_ok", []),
        ("index: --out is a file", ["index", "--embeddings", "emb_ok", "--out", "a_file"], {}, "a_file", []),
        (
            "index: ivf-pq on a catalog too small",
            ["index", "--embeddings", "emb_ok", "--out", "idx_pq", "--kind", "ivf-pq"],
            {},
            "index.kind=ivf-pq",
            ["idx_pq"],
        ),
        (
            "data split: fractions that leave train empty, over an earlier split",
            [
                "data",
                "split",
                "--input",
                "data/train.parquet",
                "--out",
                "split_prev",
                "--novel-query-fraction",
                "0.9",
                "--validation-query-fraction",
                "0.9",
            ],
            {},
            "novel_query_fraction 0.9",
            [],
        ),
        (
            "data split: --out a user's directory",
            ["data", "split", "--input", "data/train.parquet", "--out", "notes"],
            {},
            "notes",
            [],
        ),
        (
            "data split: --out is the input's directory",
            ["data", "split", "--input", "data/train.parquet", "--out", "data"],
            {},
            "data",
            [],
        ),
        (
            "data split: --out is a file",
            ["data", "split", "--input", "data/train.parquet", "--out", "a_file"],
            {},
            "a_file",
            [],
        ),
        ("data synth: --out is a file", ["data", "synth", "--out", "a_file"], {}, "a_file", []),
        ("data synth: --out a user's directory", ["data", "synth", "--out", "notes"], {}, "notes.txt", []),
        (
            "embed: --out is the input",
            ["embed", "--model", "models:/tiny@champion", "--input", "data/train.parquet", "--out", "data"],
            {},
            "data",
            [],
        ),
        (
            "evaluate: -o into a missing directory",
            ["evaluate", *judged, "--model", "model", "-o", "no_dir/m.json"],
            {},
            "no_dir",
            [],
        ),
        (
            "evaluate: -o over a user's file",
            ["evaluate", *judged, "--model", "model", "-o", "a_file"],
            {},
            "a_file",
            [],
        ),
        # A model is its weights.
        (
            "evaluate: a model directory without its weights",
            ["evaluate", *judged, "--model", "model_no_weights"],
            {},
            "open_clip_pytorch_model.bin",
            [],
        ),
        ("evaluate: truncated weights", ["evaluate", *judged, "--model", "model_truncated"], {}, "model_truncated", []),
        (
            "embed: a model directory without its weights",
            ["embed", "--model", "model_no_weights", "--input", "data/train.parquet", "--out", "emb_new"],
            {},
            "open_clip_pytorch_model.bin",
            ["emb_new"],
        ),
        (
            "evaluate: a checkpoint without its model states",
            ["evaluate", *judged, "--model", "ckpt_no_states"],
            {},
            "ckpt_no_states",
            [],
        ),
        # Numbers that would train to nothing.
        ("train: an infinite learning rate", ["train", *job, "--set", "train.lr=.inf"], {}, "train.lr", []),
        (
            "train: an infinite field weight",
            ["train", *job, "--set", "fields.right.image.weight=.inf"],
            {},
            "fields.right.image.weight",
            [],
        ),
        (
            "train: one score in every pair",
            ["train", *job, "--set", "data.train=constant_score.parquet"],
            {},
            "loss.weight_fn=uniform",
            [],
        ),
        (
            "train: a score float32 cannot hold",
            ["train", *job, "--set", "data.train=outlier.parquet"],
            {},
            "1e+300",
            [],
        ),
        ("config: a section given twice", ["config", "-c", "twice.yaml"], {}, "given twice", []),
        (
            "train: a run another process trains",
            ["train", *job, "--set", "name=locked"],
            {},
            "runs/locked/train.lock",
            [],
        ),
        # gcl evaluate checks its splits as training does, before any model loads.
        (
            "evaluate: an empty split",
            ["evaluate", *judged, "--set", "data.eval={e: eval_empty.parquet}", "--model", "model"],
            {},
            "eval_empty.parquet",
            [],
        ),
        (
            "evaluate: a NaN grade",
            ["evaluate", *judged, "--set", "data.eval={e: eval_nan.parquet}", "--model", "model"],
            {},
            "eval_nan.parquet",
            [],
        ),
        (
            "evaluate: an image cut short",
            ["evaluate", *judged, "--set", "data.eval={e: eval_bad_image.parquet}", "--model", "model"],
            {},
            "row 3",
            [],
        ),
        (
            "evaluate: a pair judged twice with other grades",
            ["evaluate", *judged, "--set", "data.eval={e: eval_twice.parquet}", "--model", "model"],
            {},
            "judged twice",
            [],
        ),
        (
            "ui: a port out of range",
            ["ui", "--model", "models:/tiny@champion", "--port", "70000"],
            {},
            "--port 70000",
            [],
        ),
        (
            "ui: a port in use",
            ["ui", "--model", "models:/tiny@champion", "--port", server_500.rsplit(":", 1)[1]],
            {},
            "give another --port",
            [],
        ),
    ]
    return [
        {
            "name": name,
            "argv": argv,
            "env": {"MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db", **env},
            "cwd": str(root),
            "named": named_input,
            "absent": absent,
        }
        for name, argv, env, named_input, absent in cases
    ]


def test_every_command_refuses_every_bad_input_in_one_line_and_writes_nothing(workspace, tmp_path):
    root, uri, server_500 = workspace
    cases = _cases(root, server_500)
    kept = _contents(root)
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    # The model hub out of reach, as on an air-gapped cluster (huggingface_hub reads this once, at import).
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")},
        "HF_HUB_OFFLINE": "1",
    }
    done = subprocess.run(
        [sys.executable, str(DRIVER), str(tmp_path / "cases.json"), str(tmp_path / "results.json")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = {r["name"]: r for r in json.loads((tmp_path / "results.json").read_text())}
    failures = []
    for case in cases:
        result = results[case["name"]]
        terminal = result["terminal"]
        lines = [line for line in terminal.replace("\r", "\n").splitlines() if line.strip()]
        problems = []
        if result["code"] != 2:
            problems.append(f"exit code {result['code']}")
        if "Traceback" in terminal:
            problems.append("a traceback on the terminal")
        if len(terminal.strip().splitlines()) > 3:
            problems.append(f"{len(terminal.strip().splitlines())} lines")
        if case["named"] not in terminal:
            problems.append(f"the message does not name {case['named']!r}")
        if not any(line.startswith("error: ") for line in lines):
            problems.append("no `error:` line")
        if result["log"] and "Traceback" not in Path(result["log"]).read_text(errors="replace"):
            problems.append(f"no traceback in its log {result['log']}")
        problems += [f"{path} was written" for path in case["absent"] if (root / path).exists()]
        if problems:
            failures.append(f"{case['name']}: {'; '.join(problems)}\n    {terminal.strip()[:600]}")
    assert not failures, "\n".join(failures)
    assert sorted(os.listdir(root / "mixed_dir")) == ["a.parquet", "b.csv"]  # another's files: not replaced
    after = _contents(root)
    assert after.keys() == kept.keys() and all(after[k] == kept[k] for k in kept), sorted(
        k for k in kept.keys() | after.keys() if after.get(k) != kept.get(k)
    )[:5]
    assert not list(root.glob("*.partial-*")) and not list(root.glob("*.old-*"))  # nothing left beside them
    # Nothing half-written in the store: no run left RUNNING, no version registered.
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
    assert [str(v.version) for v in client.search_model_versions()] == ["1"]
