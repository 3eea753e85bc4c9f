"""The exported model and its MLflow pyfunc (gcl/registry/embedding_model.py): loaded with its fields on
the chosen device, embedding as gcl does, naming bad input, installing into a fresh environment."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gcl.model import (
    FieldEncoder,
    save_model,
)


def test_an_exported_model_loads_with_its_fields_on_the_chosen_device(tiny, tmp_path, monkeypatch):
    """`gcl evaluate` and the served MLflow model load through RowEncoder.from_model_dir."""
    import json

    import pandas as pd

    from gcl.config import FieldsConfig, FieldSpec
    from gcl.retrieval import RowEncoder

    fields = FieldsConfig(
        right={"title": FieldSpec(modality="text", weight=0.3), "image": FieldSpec(modality="image", weight=0.7)}
    )
    out = save_model(tiny.clip, tiny.model_cfg, tmp_path / "export")
    plain = RowEncoder.from_model_dir(str(out), fields=FieldsConfig())  # open_clip dir: the job's fields
    assert plain.fields == FieldsConfig()
    with pytest.raises(FileNotFoundError, match="gcl_fields.json is missing"):
        RowEncoder.from_model_dir(str(out))
    (out / "gcl_fields.json").write_text(json.dumps(fields.model_dump()))

    loaded = RowEncoder.from_model_dir(str(out), fields=FieldsConfig())  # the exported fields win
    assert loaded.fields == fields and not loaded.encoder.training
    assert {p.device.type for p in loaded.encoder.parameters()} == {"cpu"}  # no CUDA on this machine
    images = [Image.new("RGB", (40, 40), c) for c in ("red", "blue")]
    rows = pd.DataFrame({"title": ["red round shoe", "blue striped bag"], "image": [_png(im) for im in images]})
    direct = RowEncoder(
        FieldEncoder(tiny.clip, fields.modalities()).eval(), tiny.tokenizer, tiny.preprocess_val, fields
    )
    torch.testing.assert_close(loaded.encode(rows, "right"), direct.encode(rows, "right"))

    # A GPU host: 'meta' stands in for the GPU these machines lack.
    on_meta = RowEncoder.from_model_dir(str(out), device="meta")
    assert {p.device.type for p in on_meta.encoder.parameters()} == {"meta"}
    # By default the encoder goes to CUDA when torch sees it (mocked here: this torch has no GPU to use).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    moved = []
    monkeypatch.setattr(FieldEncoder, "to", lambda self, device: moved.append(device) or self)
    RowEncoder.from_model_dir(str(out))
    assert moved == ["cuda"]


def _png(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _logged_tiny_model(tiny, root) -> tuple[str, str]:
    """The tiny model with title and image fields, exported under `root` and logged as gcl's
    pyfunc to a real SQLite store there: (exported directory, model URI)."""
    import json

    from mlflow import MlflowClient

    from gcl.config import FieldsConfig, FieldSpec
    from gcl.registry.models import log_embedding_model

    fields = FieldsConfig(
        right={"title": FieldSpec(modality="text", weight=0.3), "image": FieldSpec(modality="image", weight=0.7)}
    )
    out = save_model(tiny.clip, tiny.model_cfg, root / "export")
    (out / "gcl_fields.json").write_text(json.dumps(fields.model_dump()))
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("model"))
    model_uri = log_embedding_model(run.info.run_id, str(out), uri)
    client.set_terminated(run.info.run_id)
    return str(out), model_uri


def _rows():
    """(documents, queries): a title with an image, an image alone; two queries."""
    import pandas as pd

    docs = pd.DataFrame(
        {"title": ["red round shoe", None], "image": [_png(Image.new("RGB", (40, 40), c)) for c in ("red", "blue")]}
    )
    return docs, pd.DataFrame({"query": ["red shoe", "blue bag"]})


def test_the_logged_pyfunc_embeds_as_gcl_does_and_names_bad_input(tiny, tmp_path):
    """The MLflow model (from code, a real SQLite store): queries and fused documents equal
    RowEncoder's; no rows give (0, dim); a misspelt column or a row with both sides is an error."""
    import mlflow
    import numpy as np
    import pandas as pd

    from gcl.retrieval import RowEncoder
    from gcl.tracking.runs import fluent_tracking_uri

    out, model_uri = _logged_tiny_model(tiny, tmp_path)
    with fluent_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db"):
        model = mlflow.pyfunc.load_model(model_uri)
    direct = RowEncoder.from_model_dir(out)
    docs, queries = _rows()
    np.testing.assert_allclose(model.predict(docs), direct.encode(docs, "right").numpy(), atol=1e-6)
    np.testing.assert_allclose(model.predict(queries), direct.encode(queries, "left").numpy(), atol=1e-6)
    assert model.predict(pd.DataFrame({"query": []})).shape == (0, tiny.model_cfg["embed_dim"])
    with pytest.raises(ValueError, match=r"unknown input columns \['qury'\]; this model takes"):
        model.predict(pd.DataFrame({"qury": ["red shoe"]}))
    with pytest.raises(ValueError, match="fields of exactly one side"):
        model.predict(pd.DataFrame({"query": ["red shoe"], "title": ["red round shoe"]}))


def test_a_null_text_field_is_left_out_not_read_as_the_text_nan(tiny):
    """pandas 3 reads a text column's nulls as NaN: evaluation and serving leave the field out of
    the fusion, as training (which gets None from Ray Data) does."""
    import pandas as pd
    import pyarrow as pa

    from gcl.config import FieldsConfig, FieldSpec
    from gcl.retrieval import RowEncoder

    fields = FieldsConfig(
        right={"title": FieldSpec(modality="text", weight=0.3), "image": FieldSpec(modality="image", weight=0.7)}
    )
    encoder = RowEncoder(
        FieldEncoder(tiny.clip, fields.modalities()).eval(), tiny.tokenizer, tiny.preprocess_val, fields
    )
    image = _png(Image.new("RGB", (40, 40), "red"))
    from_parquet = pa.table({"title": pa.array([None], pa.string()), "image": [image]}).to_pandas()
    missing = pd.DataFrame({"title": pd.Series([None], dtype=object), "image": [image]})
    as_text = pd.DataFrame({"title": ["nan"], "image": [image]})
    torch.testing.assert_close(encoder.encode(from_parquet, "right"), encoder.encode(missing, "right"))
    assert not torch.allclose(encoder.encode(from_parquet, "right"), encoder.encode(as_text, "right"))


@pytest.mark.integration
@pytest.mark.slow
def test_the_logged_model_installs_into_a_fresh_environment_and_embeds_there_as_here(tiny, tmp_path):
    """The logged model's own requirements (pinned; not the unrelated `gcl` of the package index)
    install into a new virtual environment without gcl; there, in another process, the model loads
    with the gcl code it carries and embeds documents and queries as it does in this process."""
    import subprocess
    import sys
    import textwrap

    import mlflow

    from gcl.registry.models import SERVING_DISTRIBUTIONS
    from gcl.tracking.runs import fluent_tracking_uri

    _, model_uri = _logged_tiny_model(tiny, tmp_path)
    with fluent_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db"):  # models:/ resolves through it
        model_dir = mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path / "downloaded"))
    requirements = (Path(model_dir) / "requirements.txt").read_text().split()
    names = {r.split("==")[0].lower().replace("_", "-") for r in requirements}
    assert all("==" in r for r in requirements) and "gcl" not in names, requirements
    assert {d.replace("_", "-") for d in SERVING_DISTRIBUTIONS} <= names
    assert (Path(model_dir) / "code/gcl/registry/embedding_model.py").exists()

    docs, queries = _rows()
    docs.to_pickle(tmp_path / "docs.pkl")
    queries.to_pickle(tmp_path / "queries.pkl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin/python")
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # --no-compile: no byte-compiling of every installed file (torch has thousands); Python compiles
    # what it imports when it imports it.
    install = subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-compile", "-r", f"{model_dir}/requirements.txt"],
        env=clean,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    script = textwrap.dedent(f"""
        import importlib.util, sys
        import numpy as np, pandas as pd, mlflow
        assert importlib.util.find_spec("gcl") is None, "gcl is installed in the fresh environment"
        model = mlflow.pyfunc.load_model({model_dir!r})
        assert sys.modules["gcl"].__file__.startswith({model_dir!r}), sys.modules["gcl"].__file__
        np.save({str(tmp_path / "docs.npy")!r}, model.predict(pd.read_pickle({str(tmp_path / "docs.pkl")!r})))
        np.save({str(tmp_path / "queries.npy")!r}, model.predict(pd.read_pickle({str(tmp_path / "queries.pkl")!r})))
    """)
    there = subprocess.run([python, "-c", script], cwd=tmp_path, env=clean, capture_output=True, text=True, timeout=300)
    assert there.returncode == 0, there.stderr[-3000:]

    here = mlflow.pyfunc.load_model(model_dir)
    np.testing.assert_allclose(np.load(tmp_path / "docs.npy"), here.predict(docs), atol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "queries.npy"), here.predict(queries), atol=1e-6)
