"""A locked tower's features computed once (gcl/data/locked_features.py): they stand in for the
tower's input exactly, the store holds each document and query once and looks them up by key, and
only a tower that is a fixed function of its input is cached."""

import numpy as np
import pytest
import torch

from gcl.config import parse_config
from gcl.job_config import JobConfig
from workflows import CONFIGS

# minilm-efflite0.yaml with the text tower wholly locked too (as the binary baseline's sweeps may
# choose): both towers are fixed functions of their inputs.
LOCKED = ["model.towers.text.unlocked_layers=0", "model.towers.image.image_size=32"]


def test_features_stand_in_for_the_locked_towers_inputs():
    """The encoder's embeddings from the towers' outputs before their projections equal its
    embeddings from the images and texts, within float rounding, and are not the same tensors'
    identity (the trunk and the text encoder were skipped)."""
    from gcl.data.locked_features import _projection_skipped
    from gcl.model import FieldEncoder, create_model, create_preprocessing, normalize_pixels

    job = parse_config(JobConfig, CONFIGS / "minilm-efflite0.yaml", LOCKED)
    torch.manual_seed(0)
    clip = create_model(job.model).clip
    encoder = FieldEncoder(clip, job.fields.modalities()).eval()
    tokenizer, _, _ = create_preprocessing(job.model)
    texts = ["red striped circle", "blue dotted square", "green triangle"]
    pixels = torch.randint(0, 255, (3, 3, 32, 32), dtype=torch.uint8)
    raw = {"query": tokenizer(texts), "title": tokenizer(texts[::-1]), "image": pixels}
    with torch.no_grad(), _projection_skipped(clip.text):
        features = {"query": clip.text(raw["query"]), "title": clip.text(raw["title"])}
    with torch.no_grad():
        features["image"] = clip.visual.trunk(normalize_pixels(pixels, *encoder.pixel_mean_std))
        from_inputs, _ = encoder(raw)
        from_features, _ = encoder(features)
    assert features["image"].shape == (3, 1280) and features["query"].shape == (3, 384)
    for name in raw:
        torch.testing.assert_close(from_features[name], from_inputs[name], atol=1e-6, rtol=0)
    assert clip.text.forward.__func__ is type(clip.text).forward  # the patches are gone
    assert "forward" not in vars(clip.visual.trunk)


def test_only_a_tower_that_is_a_fixed_function_of_its_input_is_cached():
    from gcl.data.locked_features import cached_fields

    towers = parse_config(JobConfig, CONFIGS / "minilm-efflite0.yaml")  # MiniLM's top layers train
    assert cached_fields(towers) == {"image": "right"}
    locked = parse_config(JobConfig, CONFIGS / "minilm-efflite0.yaml", LOCKED)
    assert cached_fields(locked) == {"image": "right", "query": "left", "title": "right"}
    for off in ("pipeline.augment_images=true", "model.towers.image.lock=false"):
        assert "image" not in cached_fields(parse_config(JobConfig, CONFIGS / "minilm-efflite0.yaml", [off]))
    assert (
        cached_fields(
            parse_config(JobConfig, CONFIGS / "minilm-efflite0.yaml", [*LOCKED, "pipeline.cache_locked_features=false"])
        )
        == {}
    )
    assert cached_fields(parse_config(JobConfig, CONFIGS / "tiny-cpu.yaml")) == {}


@pytest.mark.integration
def test_a_store_holds_each_document_and_query_once_and_looks_them_up(ray_local, synth_dir, tmp_path):
    """One Ray Data job per side over the training and evaluation files: a row per distinct
    document (title, image) and query, the features the towers give for them, found by key; a key
    the store does not hold is an error naming the store."""
    import pandas as pd

    from gcl.data.keys import stable_keys
    from gcl.data.locked_features import FeatureStore, TowerFeatures, build_store, cached_fields
    from gcl.data.readers import DataError

    job = parse_config(JobConfig, CONFIGS / "minilm-efflite0.yaml", [*LOCKED, f"storage={tmp_path}"])
    # Query ids as `gcl data grades` writes them (strings) in one file, a split's integers in the other.
    graded = pd.read_parquet(synth_dir / "in_domain.parquet").astype({"query_id": str})
    graded.to_parquet(tmp_path / "graded.parquet")
    files = [str(synth_dir / "train.parquet"), str(tmp_path / "graded.parquet")]
    built = build_store(job, files, str(tmp_path / "store"), cached_fields(job))
    pairs = pd.concat([pd.read_parquet(f) for f in files])
    assert built["sides"]["right"]["rows"] == pairs.product_id.nunique()
    # Each file's ids keyed as training keys them: "7" and 7 are two keys.
    assert built["sides"]["left"]["rows"] == pairs.query_id.map(lambda q: (type(q), q)).nunique()
    store = FeatureStore(str(tmp_path / "store"))
    documents = pairs.drop_duplicates("product_id").head(5)
    actor = TowerFeatures(
        {
            "model": job.model.model_dump(mode="json"),
            "dtype": "float32",
            "threads": 1,
            "fields": {"image": "image", "title": "text"},
        }
    )
    import pyarrow as pa

    table = pa.table(
        {
            "__document_key": stable_keys(documents.product_id.to_numpy()),
            "image": documents.image.tolist(),
            "title": documents.title.tolist(),
            "__base_dir": [None] * len(documents),
        }
    )
    direct = actor(table)
    for field in ("image", "title"):
        found, present = store.lookup(field, stable_keys(documents.product_id.to_numpy()))
        expected = direct.column(field).combine_chunks().flatten().to_numpy().reshape(len(documents), -1)
        assert present.all()
        # Within convolution's and matmul's rounding, which depends on the batch each ran in.
        np.testing.assert_allclose(found, expected, atol=2e-5, rtol=2e-5)
    queries, present = store.lookup("query", stable_keys(pd.read_parquet(files[0]).query_id.unique()[:3]))
    assert queries.shape == (3, 384) and present.all()
    assert store.lookup("query", stable_keys(graded.query_id.to_numpy()))[1].all()
    with pytest.raises(DataError, match=r"store.*no locked features of image for key 12345"):
        store.lookup("image", np.array([12345]))
