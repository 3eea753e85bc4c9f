"""open_clip models for GCL (gcl/model.py): tiny configs, field encoding, save and load in open_clip's
format."""

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
