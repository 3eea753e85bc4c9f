"""open_clip model wrapper: tiny configs, field encoding, save/load in open_clip's format."""

import os
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from gcl.model import (
    WEIGHTS_FILE,
    FieldEncoder,
    ModelConfig,
    create_model,
    load_model,
    register_gcl_configs,
    save_model,
)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model(ModelConfig(arch="gcl-tiny"), init_temperature=0.05)


def _inputs(loaded):
    tokens = loaded.tokenizer(["red round shoe", "blue striped bag", "green hat"])
    images = torch.stack(
        [loaded.preprocess_val(Image.new("RGB", (40, 40), color)) for color in ("red", "blue", "green")]
    )
    return tokens, images


def test_tiny_model_has_vector_logit_scale_and_temperature_init(tiny):
    assert tiny.clip.logit_scale.shape == (1,)
    assert tiny.clip.logit_scale.exp().item() == pytest.approx(20.0)
    assert sum(p.numel() for p in tiny.clip.parameters()) < 5_000_000
    assert tiny.tokenizer(["x"]).shape == (1, tiny.model_cfg["text_cfg"]["context_length"])


def test_registering_configs_is_idempotent_and_only_adds_gcl_architectures():
    register_gcl_configs()
    before = open_clip.list_models()
    register_gcl_configs()
    assert open_clip.list_models() == before
    assert {"gcl-tiny", "gcl-small", "ViT-B-32"} <= set(before)


def test_field_encoder_batches_fields_per_modality_and_normalizes(tiny):
    tokens, images = _inputs(tiny)
    encoder = FieldEncoder(tiny.clip, {"query": "text", "title": "text", "image": "image"}).eval()
    with torch.no_grad():
        out, log_scale = encoder({"query": tokens, "title": tokens.flip(0), "image": images})
        alone = torch.nn.functional.normalize(tiny.clip.encode_text(tokens.flip(0)), dim=-1)
    assert set(out) == {"query", "title", "image"}
    for emb in out.values():
        assert emb.shape == (3, tiny.model_cfg["embed_dim"])
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out["title"], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(log_scale, tiny.clip.logit_scale)
    with pytest.raises(KeyError, match="no modality"):
        encoder({"colour": tokens})


def test_field_encoder_normalizes_uint8_pixels_as_the_image_transform_does(tiny):
    """Training sends resized, cropped uint8 pixels; the encoder normalizes them with the model's
    mean and std to exactly the transform's pixels, so both give the same embeddings."""
    import copy

    from gcl.data.pipeline import pil_stages

    photos = [Image.new("RGB", (40, 48), color) for color in ("red", "teal", "beige")]
    raw = torch.stack([torch.from_numpy(np.array(pil_stages(tiny.preprocess_val)(p))).permute(2, 0, 1) for p in photos])
    normalized = torch.stack([tiny.preprocess_val(p) for p in photos])
    encoder = FieldEncoder(tiny.clip, {"image": "image"}).eval()
    with torch.no_grad():
        from_raw, _ = encoder({"image": raw})
        from_normalized, _ = encoder({"image": normalized})
    assert raw.dtype == torch.uint8
    torch.testing.assert_close(from_raw["image"], from_normalized["image"], rtol=0, atol=0)
    assert set(encoder._pixel_stats) == {torch.device("cpu")}  # built once, kept for later steps
    bare = copy.deepcopy(tiny.clip)
    del bare.visual.preprocess_cfg
    with torch.no_grad(), pytest.raises(ValueError, match="preprocess_cfg mean and std"):
        FieldEncoder(bare, {"image": "image"})({"image": raw})


def test_field_encoder_feeds_fp32_pixels_to_bf16_towers_and_returns_fp32(tiny):
    """DeepSpeed's bf16 mode casts the module, not the batch: the encoder casts the pixels."""
    import copy

    tokens, images = _inputs(tiny)
    fields = {"query": tokens, "image": images}
    modalities = {"query": "text", "image": "image"}
    with torch.no_grad():
        fp32, _ = FieldEncoder(tiny.clip, modalities).eval()(fields)
        bf16, log_scale = FieldEncoder(copy.deepcopy(tiny.clip).bfloat16(), modalities).eval()(fields)
    assert {e.dtype for e in bf16.values()} == {torch.float32} and log_scale.dtype == torch.float32
    for name in fields:
        cosine = (bf16[name] * fp32[name]).sum(dim=-1)
        assert cosine.min() > 0.99, (name, cosine)


def test_field_encoder_moves_cpu_inputs_to_the_towers_device(tiny):
    """Evaluation and serving build token ids and pixels on the CPU; on a GPU worker the towers
    sit on the GPU. The 'meta' device stands in for the GPU these CPU machines lack (torch
    refuses to mix it with CPU tensors as it refuses to mix CUDA and CPU)."""
    import copy

    tokens, images = _inputs(tiny)
    encoder = FieldEncoder(copy.deepcopy(tiny.clip).to("meta"), {"query": "text", "image": "image"}).eval()
    with torch.no_grad():
        out, log_scale = encoder({"query": tokens, "image": images})
    assert {name: (e.device.type, tuple(e.shape)) for name, e in out.items()} == {
        "query": ("meta", (3, tiny.model_cfg["embed_dim"])),
        "image": ("meta", (3, tiny.model_cfg["embed_dim"])),
    }
    assert log_scale.device.type == "meta"


def test_saved_model_loads_with_open_clip_and_gives_same_embeddings(tiny, tmp_path):
    tokens, images = _inputs(tiny)
    tiny.clip.eval()
    with torch.no_grad():
        want_text, want_image = tiny.clip.encode_text(tokens), tiny.clip.encode_image(images)
    out = save_model(tiny.clip, tiny.model_cfg, tmp_path / "export")

    # 1) open_clip's own loader, local-dir layout (no gcl code involved).
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(tokens), want_text)
        torch.testing.assert_close(model.encode_image(images), want_image)
    assert preprocess.transforms[0].size == tiny.model_cfg["vision_cfg"]["image_size"]
    # 2) open_clip by architecture name with the weights file as `pretrained`.
    model2, _, _ = open_clip.create_model_and_transforms("gcl-tiny", pretrained=str(out / WEIGHTS_FILE))
    model2.eval()
    with torch.no_grad():
        torch.testing.assert_close(model2.encode_image(images), want_image)
    # 3) gcl's loader keeps the (1,) logit scale and the learned temperature.
    again = load_model(out)
    assert again.clip.logit_scale.shape == (1,)
    torch.testing.assert_close(again.clip.logit_scale, tiny.clip.logit_scale.detach())
    again.clip.eval()
    with torch.no_grad():
        torch.testing.assert_close(again.clip.encode_text(again.tokenizer(["red round shoe"])), want_text[:1])


def test_bad_model_source_is_reported(tmp_path):
    with pytest.raises(ValueError, match="model.arch='ViT-Q-99' is not an open_clip architecture"):
        create_model(ModelConfig(arch="ViT-Q-99"))
    from gcl.errors import ModelError

    with pytest.raises(ModelError, match="has no open_clip_config.json"):
        create_model(ModelConfig(pretrained=str(tmp_path)))

    with pytest.raises(ModelError, match="model.pretrained=no_such_tag: .*not a known tag or valid file path; give"):
        create_model(ModelConfig(arch="gcl-tiny", pretrained="no_such_tag"))


def _touch(path):
    open(path, "w").close()


class _Payload:
    """Stands for any object a tampered checkpoint could make torch.load import and call: unpickled
    with weights_only=False, it creates the file `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return _touch, (self.marker,)


def test_deepspeed_checkpoints_load_with_weights_only(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    from gcl.errors import ModelError
    from gcl.train.checkpoint import load_weights_only

    torch.save({"optimizer": {"loss_scaler": LossScaler(1.0)}, "weights": torch.ones(2)}, tmp_path / "ok.pt")
    assert load_weights_only(str(tmp_path / "ok.pt"))["weights"].tolist() == [1.0, 1.0]
    torch.save({"optimizer": _Payload(str(tmp_path / "ran"))}, tmp_path / "bad.pt")
    with pytest.raises(ModelError, match=r"bad.pt: refused: .*Unsupported global: GLOBAL test_model._touch"):
        load_weights_only(str(tmp_path / "bad.pt"))
    assert not (tmp_path / "ran").exists()


def _zero_rank(rank, world, init_file, out_dir):
    import torch.distributed as dist

    from gcl.config import parse_config
    from gcl.job_config import JobConfig
    from gcl.train.checkpoint import TrainState, save_checkpoint
    from gcl.train.engine import setup_engine
    from workflows import CONFIGS

    torch.set_num_threads(1)
    os.environ["LOCAL_RANK"] = str(rank)  # DeepSpeed asks for it; Ray Train sets it in training
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    job = parse_config(JobConfig, CONFIGS / "tiny-cpu.yaml", ["deepspeed.zero_stage=1"])
    engine, _, _ = setup_engine(job, total_steps=10)
    save_checkpoint(engine, out_dir, TrainState(), job.model_dump(mode="json"))
    if rank == 0:  # ZeRO-1 shards only the optimizer: every rank holds the whole module
        torch.save({k: v.detach().clone() for k, v in engine.module.state_dict().items()}, f"{out_dir}/module.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_zero_shards_are_gathered_weights_only_and_a_shard_carrying_code_is_refused(tmp_path):
    # A real ZeRO-1 checkpoint of two gloo ranks (each rank's optimizer shard in its own file).
    import torch.multiprocessing as mp

    from gcl.errors import ModelError
    from gcl.train.checkpoint import CHECKPOINT_TAG, gather_zero_shards, load_weights_only

    mp.spawn(_zero_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    module = torch.load(tmp_path / "module.pt", weights_only=True)
    gathered = gather_zero_shards(str(tmp_path))
    assert gathered.keys() == module.keys()
    for name, weight in module.items():
        torch.testing.assert_close(gathered[name], weight.float(), atol=0, rtol=0, msg=name)

    shard = tmp_path / CHECKPOINT_TAG / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    if not shard.exists():
        shard = tmp_path / CHECKPOINT_TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    tampered = load_weights_only(str(shard))
    tampered["payload"] = _Payload(str(tmp_path / "ran"))
    torch.save(tampered, shard)
    with pytest.raises(ModelError, match=rf"{shard}: refused: .*test_model._touch"):
        gather_zero_shards(str(tmp_path))
    assert not (tmp_path / "ran").exists()
    # What zero_to_fp32 alone would do with the same file: the payload runs.
    torch.load(shard, weights_only=False)
    assert (tmp_path / "ran").exists()


def test_files_handed_to_gcl_from_elsewhere_cannot_run_code(tiny, tmp_path):
    """A pickle payload planted in each file gcl reads besides checkpoints (the two tests above):
    an exported model's weights, a tower's weights, an index directory's FAISS index and id map, an
    embeddings directory's parquet. Each is refused naming the file, and the payload never runs."""
    import json
    import pickle

    import faiss

    from gcl.errors import ModelError, SearchIndexError
    from gcl.search.faiss_index import IDS_FILE, INDEX_FILE, INFO_FILE, SearchIndex, embedding_files
    from gcl.towers import load_image_weights

    marker = tmp_path / "ran"
    planted = pickle.dumps({"state_dict": _Payload(str(marker))})

    model_dir = save_model(tiny.clip, tiny.model_cfg, tmp_path / "model")
    (model_dir / WEIGHTS_FILE).write_bytes(planted)
    with pytest.raises(ModelError, match=r"refused: the weights file holds objects other than tensors"):
        load_model(model_dir)
    (tmp_path / "tower.pth").write_bytes(planted)
    with pytest.raises(ModelError, match=r"tower.pth.*not a plain state dict of tensors"):
        load_image_weights(torch.nn.Linear(2, 2), str(tmp_path / "tower.pth"))

    index_dir = tmp_path / "index"
    index_dir.mkdir()
    (index_dir / INFO_FILE).write_text(json.dumps({"id_column": "product_id", "dim": 4}))
    faiss.write_index(faiss.IndexFlatIP(4), str(index_dir / INDEX_FILE))
    (index_dir / IDS_FILE).write_bytes(planted)  # a real FAISS index, a planted id map
    with pytest.raises(SearchIndexError, match=rf"{index_dir}: cannot be read as an index"):
        SearchIndex(str(index_dir))
    (index_dir / INDEX_FILE).write_bytes(planted)  # and a planted FAISS index
    with pytest.raises(SearchIndexError, match=rf"{index_dir}: cannot be read as an index"):
        SearchIndex(str(index_dir))

    embeddings = tmp_path / "embeddings"
    embeddings.mkdir()
    (embeddings / "part-0.parquet").write_bytes(planted)
    with pytest.raises(SearchIndexError, match=r"part-0.parquet: cannot be read as parquet"):
        embedding_files(str(embeddings))

    assert not marker.exists()
    pickle.loads(planted)  # the payload is live: a plain unpickling runs it
    assert marker.exists()


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


def test_evaluate_names_a_directory_that_holds_no_model_or_checkpoint(tmp_path):
    from gcl.errors import ModelError
    from gcl.train.checkpoint import resolve_model_dir

    with pytest.raises(ModelError, match="not a model directory .*, a training checkpoint .* committed checkpoint"):
        resolve_model_dir(str(tmp_path), str(tmp_path / "scratch"))


def test_gcl_evaluate_on_an_exported_model_prints_and_writes_the_metrics(tiny, tmp_path, capsys):
    """The `gcl evaluate` command on a model directory: the table on stdout and the JSON file hold
    what evaluate_splits computes from the same directory."""
    import json

    from gcl.config import FieldsConfig
    from gcl.data.schema import DataConfig
    from gcl.data.synth import SynthConfig, synthesize
    from gcl.retrieval import EvalConfig, RowEncoder, evaluate_splits
    from workflows.cli import main

    synthesize(tmp_path / "data", SynthConfig(products=40, queries=20, docs_per_query=4, seed=6))
    out = save_model(tiny.clip, tiny.model_cfg, tmp_path / "export")
    (out / "gcl_fields.json").write_text(json.dumps(FieldsConfig().model_dump()))
    splits = {
        "in_domain": str(tmp_path / "data" / "in_domain.parquet"),
        "zero_shot": str(tmp_path / "data" / "zero_shot.parquet"),
    }
    written = tmp_path / "metrics.json"
    code = main(["evaluate", "--set", f"data.eval={json.dumps(splits)}", "--model", str(out), "-o", str(written)])
    assert code == 0
    want = evaluate_splits(RowEncoder.from_model_dir(str(out)), splits, DataConfig(), EvalConfig())
    saved = json.loads(written.read_text())
    assert saved["model"] == str(out) and set(saved["metrics"]) == set(splits)
    for split in splits:
        assert saved["metrics"][split] == pytest.approx(want[split], abs=1e-9), split
    table = capsys.readouterr().out
    assert all(f"{want[s]['ndcg@10']:.4f}" in table for s in splits)


def test_gcl_evaluate_compares_models_against_the_first_including_open_clip_base_models(tiny, tmp_path, capsys):
    """Several --model flags: an exported model, the same weights named as an open_clip base model
    (architecture + weights file, fed with the config's fields) and the bare architecture. The
    first two score the same, the table gives each model's change from the first, and the plot is
    saved and logged to an MLflow run."""
    import json

    from mlflow import MlflowClient

    from gcl.config import FieldsConfig
    from gcl.data.synth import SynthConfig, synthesize
    from workflows.cli import main

    synthesize(tmp_path / "data", SynthConfig(products=120, queries=40, docs_per_query=8, seed=6))
    out = save_model(tiny.clip, tiny.model_cfg, tmp_path / "export")
    (out / "gcl_fields.json").write_text(json.dumps(FieldsConfig().model_dump()))
    models = [str(out), f"open_clip:gcl-tiny:{out / WEIGHTS_FILE}", "open_clip:gcl-tiny"]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    written = tmp_path / "metrics.json"
    code = main(
        [
            "evaluate",
            "--set",
            f"data.eval={{in_domain: {tmp_path}/data/in_domain.parquet}}",
            "--set",
            f"storage={tmp_path}/runs",
            "--set",
            f"mlflow.tracking_uri={uri}",
            "--set",
            "seed=3",
            *[a for m in models for a in ("--model", m)],
            "-o",
            str(written),
        ]
    )
    assert code == 0
    results = json.loads(written.read_text())["models"]
    assert list(results) == models
    assert results[models[1]]["in_domain"] == pytest.approx(results[models[0]]["in_domain"], abs=1e-6)
    assert results[models[2]]["in_domain"] != results[models[0]]["in_domain"]  # weights drawn from seed 3
    table = capsys.readouterr().out
    assert f"open_clip:gcl-tiny vs {out}" in table and "+0.0%" in table
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("gcl").experiment_id])[0]
    assert run.data.params["model_2"] == "open_clip:gcl-tiny" and run.info.run_name.startswith("evaluate-")
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {f"{run.info.run_name}.png", "evaluation.json"}
    assert [p.name for p in (tmp_path / "runs").rglob("*.png")] == [f"{run.info.run_name}.png"]
    assert (
        main(
            [
                "evaluate",
                "--set",
                f"data.eval={{in_domain: {tmp_path}/data/in_domain.parquet}}",
                "--set",
                f"mlflow.tracking_uri={uri}",
                "--model",
                str(out),
                "--model",
                "open_clip:",
            ]
        )
        == 2
    )  # no architecture named
    assert "give an open_clip architecture" in capsys.readouterr().err


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
