"""The main job, small: binary baseline, GCL-uniform and GCL on a local Ray cluster, then the registered
model served by `mlflow models serve` and queried over HTTP on loopback."""

import base64
import json
import os
import re
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import served_model
from mlflow import MlflowClient

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def demo(ray_local, tmp_path_factory):
    from workflows.demo import run_demo

    workdir = tmp_path_factory.mktemp("demo")
    cwd = os.getcwd()
    os.chdir(workdir)  # the default MLflow store is ./mlruns.db
    try:
        yield run_demo(quick=True, workdir=str(workdir / "gcl_runs"), tiny=True), workdir
    finally:
        os.chdir(cwd)


def test_gcl_beats_the_binary_baseline_in_domain(demo):
    result, workdir = demo
    assert result["gcl"]["in_domain"]["ndcg@10"] > result["binary"]["in_domain"]["ndcg@10"]
    splits = {"in_domain", "novel_query", "novel_document", "zero_shot"}
    assert set(result["gcl"]) == set(result["gcl-uniform"]) == splits
    # GCL-uniform is its own training: uniform weights with GCL's fields and masking.
    assert len(set(result["runs"].values())) == 3 and result["gcl-uniform"] != result["gcl"]
    assert os.path.getsize(result["plot"]) > 10_000
    client = MlflowClient(f"sqlite:///{workdir}/mlruns.db")
    assert result["registered_model"] == "gcl-demo-tiny"
    champion = client.get_model_version_by_alias("gcl-demo-tiny", "champion")
    assert champion.version == result["version"] and float(champion.tags["gcl.objective"]) > 0
    assert os.path.basename(result["plot"]) in {a.path for a in client.list_artifacts(result["runs"]["gcl"])}
    # Each variant trained at its own tuned settings, not at GCL's: the margins are over tuned baselines.
    params = {key: client.get_run(run_id).data.params for key, run_id in result["runs"].items()}
    assert len({p["train.lr"] for p in params.values()}) == 3
    assert "fields.right.title.weight" not in params["binary"] and params["binary"]["loss.weight_fn"] == "uniform"


def test_the_demo_fine_tunes_the_pretrained_towers_with_each_variant_at_its_own_settings(tmp_path):
    """`gcl demo` runs its three trainings from the pretrained towers (`--tiny`, the fixture above,
    with gcl-tiny): what it trains is built here (the towers' own training on Ray is
    tests/test_train_invariants.py's, the whole demo's figures the README's)."""
    from workflows.demo import demo_jobs

    jobs = demo_jobs(str(tmp_path), quick=False, stamp="t")
    assert {job.model.arch for job in jobs.values()} == {"towers"}
    assert jobs["gcl"].model.towers.text.hf.startswith("pypackage:") and jobs["gcl"].train.epochs == 2
    assert list(jobs["binary"].fields.right) == ["image"] and jobs["binary"].loss.weight_fn == "uniform"
    assert (
        list(jobs["gcl-uniform"].fields.right) == ["image", "title"] and jobs["gcl-uniform"].loss.weight_fn == "uniform"
    )
    assert jobs["gcl"].loss.weight_fn != "uniform"
    assert len({job.train.lr for job in jobs.values()}) == 3


def _post(port, payload):
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return np.array(json.loads(response.read())["predictions"], dtype=np.float32)


def test_registered_champion_serves_embeddings_equal_to_gcl_encoder(demo):
    import mlflow

    from gcl.data.readers import image_bytes

    result, workdir = demo
    uri = f"sqlite:///{workdir}/mlruns.db"
    with served_model("models:/gcl-demo-tiny@champion", uri, workdir) as port:
        pairs = pd.read_parquet(workdir / "gcl_runs" / "data" / "zero_shot.parquet").head(3)
        images = [base64.b64encode(image_bytes(v, None)).decode() for v in pairs["image"]]
        text = _post(port, {"dataframe_records": [{"query": q} for q in pairs["query"]]})
        docs = _post(
            port,
            {"dataframe_records": [{"title": t, "image": i} for t, i in zip(pairs["title"], images, strict=True)]},
        )
        image_only = _post(port, {"dataframe_records": [{"image": images[0]}]})

    mlflow.set_tracking_uri(uri)
    local = mlflow.pyfunc.load_model("models:/gcl-demo-tiny@champion")
    want_text = local.predict(pd.DataFrame({"query": pairs["query"]}))
    want_docs = local.predict(
        pd.DataFrame({"title": pairs["title"], "image": list(pairs["image"].map(lambda v: v["bytes"]))})
    )
    assert text.shape == (3, 64) and docs.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(text, want_text, atol=1e-5)
    np.testing.assert_allclose(docs, want_docs, atol=1e-5)

    # ...and equal to gcl's own encoder, fusing image 0.9 + title 0.1 as trained.
    from gcl.config import FieldsConfig
    from gcl.model import FieldEncoder, ModelConfig, create_model, create_preprocessing
    from gcl.retrieval import RowEncoder

    model_dir = os.path.join(
        workdir,
        "gcl_runs",
        "runs",
        [d for d in os.listdir(workdir / "gcl_runs" / "runs") if re.fullmatch(r"demo-gcl-[0-9-]+", d)][0],
        "model",
    )
    fields = FieldsConfig(**json.loads(Path(model_dir, "gcl_fields.json").read_text()))
    cfg = ModelConfig(pretrained=model_dir)
    tokenizer, _, transform = create_preprocessing(cfg)
    ours = RowEncoder(FieldEncoder(create_model(cfg).clip, fields.modalities()).eval(), tokenizer, transform, fields)
    np.testing.assert_allclose(docs, ours.encode(pairs[["title", "image"]], "right").numpy(), atol=1e-5)
    np.testing.assert_allclose(text, ours.encode(pairs[["query"]], "left").numpy(), atol=1e-5)
    assert not np.allclose(image_only[0], docs[0], atol=1e-3)  # the title changes the fused embedding
