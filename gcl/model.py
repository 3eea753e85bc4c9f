"""open_clip models for GCL: create, encode fields, save and load.

A model is an open_clip CLIP model created from an architecture name and either a
pretrained tag (downloaded by open_clip), a local checkpoint file, an exported model
directory, or nothing (random init). gcl ships tiny architectures (`gcl-tiny`,
`gcl-small`) that train on a CPU in seconds.

Saved models use open_clip's own layout (`open_clip_config.json` + weights), so they
load with `open_clip.create_model_and_transforms("local-dir:DIR")`, or with
`create_model_and_transforms(arch, pretrained="DIR/open_clip_pytorch_model.bin")`.
"""

from __future__ import annotations

import contextlib
import json
import math
import pickle
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import model_validator

from gcl.config import ConfigError, Section
from gcl.errors import ModelError
from gcl.towers import (
    TowersConfig,
    guard_padding_rows,
    image_mean_std,
    load_image_weights,
    lock_towers,
    register_config,
    resolve_text_tower,
    save_text_tower,
    towers_model_config,
)

GCL_MODEL_CONFIGS = Path(__file__).parent / "model_configs"
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_pytorch_model.bin"
FIELDS_FILE = "gcl_fields.json"  # gcl's field config beside the open_clip files, for gcl's readers


class ModelConfig(Section):
    """Which open_clip model to fine-tune."""

    arch: str = "gcl-tiny"
    """open_clip architecture name (e.g. `ViT-B-32`), gcl's tiny `gcl-tiny` / `gcl-small`, or
    `towers`: a dual encoder built from pretrained towers (model.towers)."""
    pretrained: str | None = None
    """open_clip pretrained tag (e.g. `laion2b_s34b_b79k`), a local checkpoint file, an exported
    model directory, or null for random initialization."""
    cache_dir: str | None = None
    """Where open_clip caches downloaded weights (null: its default)."""
    towers: TowersConfig | None = None
    """With arch: towers, the image and text towers, their weights and locks (gcl/towers.py)."""

    @model_validator(mode="after")
    def _towers_go_with_their_arch(self) -> ModelConfig:
        if (self.arch == TOWERS_ARCH) != (self.towers is not None):
            raise ConfigError("model.towers: give it with model.arch=towers, and model.arch=towers with it")
        if self.towers is not None and self.pretrained:
            raise ConfigError(
                "model.pretrained: a model built from towers takes its weights per tower "
                "(model.towers.image.weights, model.towers.text.hf); leave model.pretrained null"
            )
        return self


TOWERS_ARCH = "towers"
BASE_MODEL_PREFIX = "open_clip:"  # a model reference naming an open_clip model, not a gcl export


def base_model_config(reference: str, job_model: ModelConfig | None = None) -> ModelConfig | None:
    """The ModelConfig of a base-model reference, `open_clip:ARCH` (random weights),
    `open_clip:ARCH:TAG` (a pretrained tag, e.g. open_clip:ViT-B-32:laion2b_s34b_b79k),
    `open_clip:ARCH:/path/weights.bin`, or `open_clip:towers`: the job's own model built from its
    pretrained towers (`job_model`), as its training starts; None for any other reference."""
    if not reference.startswith(BASE_MODEL_PREFIX):
        return None
    arch, _, pretrained = reference.removeprefix(BASE_MODEL_PREFIX).partition(":")
    if arch == TOWERS_ARCH:
        if job_model is None or job_model.towers is None:
            raise ModelError(f"--model {reference}: the config has no model.towers to build the base model from")
        return job_model
    if not arch:
        raise ModelError(
            f"--model {reference!r}: give an open_clip architecture, e.g. "
            "open_clip:ViT-B-32:laion2b_s34b_b79k or open_clip:gcl-tiny:/path/weights.bin"
        )
    return ModelConfig(arch=arch, pretrained=pretrained or None)


_registered = False


def register_gcl_configs() -> None:
    """Make gcl's tiny architectures known to open_clip (idempotent; names start with `gcl-`)."""
    global _registered
    if _registered:
        return
    import open_clip

    for path in sorted(GCL_MODEL_CONFIGS.glob("*.json")):
        if path.stem not in open_clip.list_models():
            open_clip.add_model_config(path)
    _registered = True


@dataclass
class LoadedModel:
    """An open_clip model with what is needed to feed and save it."""

    clip: torch.nn.Module
    """The open_clip model, with a (1,)-shaped `logit_scale` (DeepSpeed cannot broadcast 0-dim)."""
    model_cfg: dict[str, Any]
    """open_clip's architecture config, written out on save."""
    tokenizer: Callable[..., torch.Tensor]
    """Text -> (B, context_length) token ids."""
    preprocess_train: Callable
    """PIL image -> (3, H, W) tensor, with open_clip's training augmentation."""
    preprocess_val: Callable
    """PIL image -> (3, H, W) tensor, deterministic."""


def _open_clip_source(cfg: ModelConfig) -> tuple[str, str | None, dict[str, Any]]:
    """(model name for open_clip, pretrained argument, architecture config) for a ModelConfig."""
    import open_clip

    pretrained = cfg.pretrained
    if pretrained and Path(pretrained).is_dir():
        config_path = Path(pretrained) / CONFIG_FILE
        if not config_path.is_file():
            raise ModelError(
                f"model.pretrained={pretrained}: the directory has no {CONFIG_FILE}; give a model "
                "directory written by gcl (<storage>/<name>/model) or by open_clip"
            )
        weights = model_weights(pretrained)
        model_cfg = json.loads(config_path.read_text())["model_cfg"]
        if "hf_model_name" not in model_cfg.get("text_cfg", {}):
            return f"local-dir:{pretrained}", None, model_cfg
        # Built from towers: its text tower's config and tokenizer travel in the directory.
        model_cfg = resolve_text_tower(model_cfg, Path(pretrained))
        return register_config("gcl-towers", model_cfg), weights, model_cfg
    if cfg.towers is not None:
        model_cfg = towers_model_config(cfg.towers)
        return register_config("gcl-towers", model_cfg), None, model_cfg
    model_cfg = open_clip.get_model_config(cfg.arch)
    if model_cfg is None:
        raise ValueError(
            f"model.arch={cfg.arch!r} is not an open_clip architecture; known: gcl-tiny, gcl-small, towers, "
            f"ViT-B-32, ViT-B-16, ... ({len(open_clip.list_models())} in open_clip.list_models())"
        )
    return cfg.arch, pretrained, model_cfg


OPEN_CLIP_WEIGHTS_FILES = (WEIGHTS_FILE, "open_clip_model.safetensors")  # what open_clip's local-dir: loads


def model_weights(directory: str | Path) -> str:
    """The weights file of a model directory (gcl's or open_clip's layout). A ModelError where it
    has none: open_clip would build the model with random weights and only log a warning."""
    for name in OPEN_CLIP_WEIGHTS_FILES:
        path = Path(directory) / name
        if path.is_file() and path.stat().st_size > 0:
            # torch.save writes a zip whose directory comes last: a file cut short has none (read here
            # from the file's end, before any model is built). Other files go to torch's own reader.
            if path.suffix == ".bin" and _starts_with(path, b"PK") and not zipfile.is_zipfile(path):
                raise ModelError(
                    f"model {directory}: {path.name} is not a whole weights file (cut short, or not "
                    "written by torch.save); give the whole model directory gcl or open_clip saved"
                )
            return str(path)
    raise ModelError(
        f"model {directory}: no weights ({WEIGHTS_FILE} is missing or empty); a model directory "
        "without them would be a model of random weights; give a whole model directory "
        "(gcl writes <storage>/<name>/model) or a checkpoint"
    )


def _starts_with(path: Path, magic: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(len(magic)) == magic


FETCH_HINT = (
    "give model.pretrained as a local weights file or an exported model directory, or fill open_clip's "
    "cache (model.cache_dir) on a machine that reaches the model hub and copy it here; with a "
    "filled cache, HF_HUB_OFFLINE=1 keeps every library from trying the network"
)


def check_model_source(cfg: ModelConfig) -> None:
    """Fail before any expensive work when the model's weights cannot be had: an unknown
    architecture or pretrained tag, a missing file, weights the model hub cannot be reached for
    (fetched here into the cache when it can), a tower's package or directory that is not there.
    A ModelError names the key and says how to give the weights."""
    import open_clip
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg, list_pretrained_tags_by_model

    register_gcl_configs()
    if cfg.towers is not None:
        from gcl.towers import check_tower_sources

        check_tower_sources(cfg.towers)
        return
    pretrained = cfg.pretrained
    if pretrained and Path(pretrained).is_dir():
        if not (Path(pretrained) / CONFIG_FILE).is_file():
            raise ModelError(
                f"model.pretrained={pretrained}: the directory has no {CONFIG_FILE}; give a model "
                "directory written by gcl (<storage>/<name>/model) or by open_clip"
            )
        return
    if open_clip.get_model_config(cfg.arch) is None:
        raise ModelError(
            f"model.arch={cfg.arch!r} is not an open_clip architecture; known: gcl-tiny, gcl-small, "
            f"towers, ViT-B-32, ViT-B-16, ... ({len(open_clip.list_models())} in open_clip.list_models())"
        )
    if not pretrained or Path(pretrained).is_file():
        return
    tag = get_pretrained_cfg(cfg.arch, pretrained)
    if not tag:
        known = ", ".join(list_pretrained_tags_by_model(cfg.arch)) or "none"
        raise ModelError(
            f"model.pretrained={pretrained!r}: neither a file nor a pretrained tag of {cfg.arch} (its tags: {known})"
        )
    try:
        download_pretrained(tag, cache_dir=cfg.cache_dir)
    except Exception as err:
        raise ModelError(
            f"model.pretrained={pretrained}: the weights of {cfg.arch} could not be fetched "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}); {FETCH_HINT}"
        ) from None


def model_config(cfg: ModelConfig) -> dict[str, Any]:
    """open_clip's architecture config for `cfg` (no weights are loaded)."""
    register_gcl_configs()
    return dict(_open_clip_source(cfg)[2])


def create_model(cfg: ModelConfig, init_temperature: float | None = None) -> LoadedModel:
    """Create the open_clip model, tokenizer and image transforms described by `cfg`.

    init_temperature: if given, the logit scale starts at log(1 / init_temperature).
    """
    import open_clip

    register_gcl_configs()
    name, pretrained, model_cfg = _open_clip_source(cfg)
    towers = cfg.towers
    options: dict[str, Any] = {}
    if towers is not None:
        mean, std = image_mean_std(towers)
        options = {
            "image_mean": mean,
            "image_std": std,
            "pretrained_image": towers.image.weights == "timm",
            "pretrained_text": True,
        }
    try:
        clip, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, cache_dir=cfg.cache_dir, nonscalar_logit_scale=True, **options
        )
    except (RuntimeError, EOFError) as err:  # open_clip's, for weights it could not fetch; torch's, for a bad file
        if "download" in str(err) or "not a known tag" in str(err):
            raise ModelError(f"model.pretrained={pretrained}: {str(err).splitlines()[0][:300]}; {FETCH_HINT}") from err
        if not (pretrained or cfg.pretrained):
            raise
        detail = " ".join(str(err).split())[:160]
        raise ModelError(
            f"model {cfg.pretrained or pretrained}: its weights could not be loaded into {name} "
            f"({type(err).__name__}: {detail}): a truncated file, or weights that do not fit the "
            "model's config; give the whole model gcl or open_clip saved"
        ) from None
    except pickle.UnpicklingError as err:  # open_clip loads weights_only: a file carrying objects
        raise ModelError(
            f"model {name} ({pretrained}): refused: the weights file holds objects other than "
            f"tensors, which could run code when loaded ({str(err).splitlines()[0][:200]}); give "
            "weights that gcl or open_clip saved"
        ) from None
    except OSError as err:  # transformers' or timm's: weights or files not found, not reachable
        raise ModelError(
            f"model {name}: the weights could not be loaded ({str(err).splitlines()[0][:300]}); "
            "give a local directory or file, or fill the model hub's cache where the hub is "
            "reachable and set HF_HUB_OFFLINE=1"
        ) from err
    if towers is not None:
        if towers.image.weights and towers.image.weights != "timm":
            load_image_weights(clip.visual.trunk, towers.image.weights)
        lock_towers(clip, towers)
    guard_padding_rows(clip)
    if init_temperature is not None:
        with torch.no_grad():
            clip.logit_scale.fill_(math.log(1.0 / init_temperature))
    tokenizer = open_clip.get_tokenizer(name)
    return LoadedModel(clip, dict(model_cfg), tokenizer, preprocess_train, preprocess_val)


def create_preprocessing(cfg: ModelConfig) -> tuple[Callable, Callable, Callable]:
    """(tokenizer, train image transform, eval image transform) for `cfg`, without building the
    model or fetching weights: what data-loading workers need."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

    register_gcl_configs()
    name, pretrained, model_cfg = _open_clip_source(cfg)
    preprocess = merge_preprocess_dict(PreprocessCfg(), {})
    if cfg.pretrained and Path(cfg.pretrained).is_dir():
        saved = json.loads((Path(cfg.pretrained) / CONFIG_FILE).read_text()).get("preprocess_cfg", {})
        preprocess = merge_preprocess_dict(preprocess, saved)
    elif cfg.towers is not None:
        mean, std = image_mean_std(cfg.towers)
        preprocess = merge_preprocess_dict(preprocess, {"mean": mean, "std": std})
    elif pretrained:
        preprocess = merge_preprocess_dict(preprocess, open_clip.get_pretrained_cfg(cfg.arch, pretrained) or {})
    preprocess["size"] = model_cfg["vision_cfg"]["image_size"]
    pp = PreprocessCfg(**preprocess)
    return (
        open_clip.get_tokenizer(name),
        image_transform_v2(pp, is_train=True),
        image_transform_v2(pp, is_train=False),
    )


def normalize_pixels(
    pixels: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> float32, as torchvision's ToTensor then Normalize(mean, std) make
    them image by image (the same element-wise operations, so the same values). mean, std: (3,)."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=pixels.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=pixels.device).view(1, -1, 1, 1)
    return pixels.to(torch.float32).div(255).sub_(mean_t).div_(std_t)


class FieldEncoder(torch.nn.Module):
    """Encodes named fields with the model's text or image tower.

    The module's forward is what the training engine calls, so the logit scale is
    returned from it (under ZeRO-3 parameters are only materialized inside forward).
    """

    def __init__(self, clip: torch.nn.Module, modalities: Mapping[str, str]):
        super().__init__()
        self.clip = clip
        self.modalities = dict(modalities)
        # What the model's image transforms normalize with: open_clip sets it on every model.
        preprocess = getattr(getattr(clip, "visual", None), "preprocess_cfg", None) or {}
        self.pixel_mean_std = (preprocess["mean"], preprocess["std"]) if {"mean", "std"} <= set(preprocess) else None
        self._pixel_stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # made once per device
        # The libraries leave their towers in modes of their own (timm's in training, Hugging Face's
        # in eval): a new encoder starts in training mode with its locked parts in eval, as train() sets.
        self.train()

    def forward(self, fields: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """fields: name -> (B, L) token ids for text; for images (B, 3, H, W) pixels, either uint8
        (resized and cropped, as the training pipeline sends them; normalized here, on the towers'
        device) or float (the image transform's output, already normalized), or (B, F) float: a
        locked image tower's trunk output, computed once (gcl.data.locked_features), which goes
        through the tower's head only. A text field may likewise be (B, F) float: a locked text
        tower's pooled output, which goes through its projection only.

        Returns name -> (B, D) L2-normalized embeddings, and the (1,) log logit scale.
        Fields of one modality go through their tower in a single call, and through the
        CLIP module's own forward, so that ZeRO-3 gathers every parameter it owns.
        """
        unknown = set(fields) - set(self.modalities)
        if unknown:
            raise KeyError(f"fields {sorted(unknown)} have no modality; known fields: {sorted(self.modalities)}")
        groups = {m: [n for n in fields if self.modalities[n] == m] for m in ("text", "image")}
        stacked = {m: torch.cat([fields[n] for n in names]) if names else None for m, names in groups.items()}
        # Inputs go where the towers are (a no-op for training batches, already on the worker's
        # device; evaluation and serving build theirs on the CPU). Pixels are normalized in fp32;
        # towers cast to bf16 take bf16.
        param = self._first_float_parameter()
        if stacked["text"] is not None:
            stacked["text"] = stacked["text"].to(param.device, non_blocking=True)
        image_features = stacked["image"] is not None and stacked["image"].dim() == 2
        text_features = stacked["text"] is not None and stacked["text"].is_floating_point()
        if stacked["image"] is not None:
            pixels = stacked["image"].to(param.device, non_blocking=True)
            if pixels.dtype == torch.uint8:
                pixels = normalize_pixels(pixels, *self._mean_std_on(pixels.device))
            stacked["image"] = pixels.to(param.dtype)
        with contextlib.ExitStack() as skipped:
            if image_features:
                skipped.enter_context(_trunk_skipped(self.clip))
            if text_features:
                stacked["text"] = stacked["text"].to(param.dtype)
                skipped.enter_context(_text_encoder_skipped(self.clip))
            result = self.clip(image=stacked["image"], text=stacked["text"])
        if isinstance(result, dict):
            image_emb, text_emb, scale = (
                result["image_features"],
                result["text_features"],
                result["logit_scale"],
            )
        else:
            image_emb, text_emb, scale = result[:3]
        out: dict[str, torch.Tensor] = {}
        for modality, embedded in (("text", text_emb), ("image", image_emb)):
            if embedded is not None:
                sizes = [fields[n].shape[0] for n in groups[modality]]
                out.update(zip(groups[modality], embedded.float().split(sizes), strict=True))
        # The loss, its gather across workers and retrieval run in fp32 whatever the towers' dtype.
        return out, torch.log(scale.float()).reshape(1)

    def train(self, mode: bool = True) -> FieldEncoder:
        """As torch's, except that every locked part of the model (a module none of whose parameters
        train) stays in eval mode: a locked tower is a fixed function while the rest trains, its
        batch norms keep their pretrained statistics and its dropout is off (LiT's locked tower)."""
        super().train(mode)
        if mode:
            for part in locked_parts(self.clip):
                part.eval()
        return self

    def _mean_std_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's pixel mean and std as fp32 tensors on `device`, built on the first batch
        there rather than copied to it at every step."""
        if self.pixel_mean_std is None:
            raise ValueError(
                "uint8 pixels need the model's preprocess_cfg mean and std, which this model "
                "lacks; pass pixels normalized by its image transform (float) instead"
            )
        if device not in self._pixel_stats:
            self._pixel_stats[device] = tuple(
                torch.tensor(v, dtype=torch.float32, device=device) for v in self.pixel_mean_std
            )
        return self._pixel_stats[device]

    def _first_float_parameter(self) -> torch.nn.Parameter:
        """Its dtype is the towers' (fp32 as gcl trains, under autocast in bf16; bf16 where someone
        cast the module), its device theirs."""
        return next(p for p in self.clip.parameters() if p.is_floating_point())


@contextlib.contextmanager
def _trunk_skipped(clip: torch.nn.Module):
    """The image tower's trunk passes its input through for the block: the input is the trunk's
    output, computed once for a locked tower. Inside the CLIP module's own forward, so that ZeRO-3
    gathers every parameter it owns as usual."""
    trunk = getattr(getattr(clip, "visual", None), "trunk", None)
    if trunk is None:
        raise ValueError("image features stand in for a timm tower's trunk output; this model has no trunk")
    trunk.forward = _pass_through
    try:
        yield
    finally:
        del trunk.forward


def _pass_through(x: torch.Tensor) -> torch.Tensor:
    return x


@contextlib.contextmanager
def _text_encoder_skipped(clip: torch.nn.Module):
    """The text tower takes its encoder's pooled output (B, F), computed once for a locked tower,
    and applies its projection only, for the block (inside the CLIP module's own forward)."""
    text = getattr(clip, "text", None)
    if text is None or not hasattr(text, "proj"):
        raise ValueError("text features stand in for a Hugging Face text tower's pooled output; this model has none")
    projection = text.proj
    text.forward = lambda pooled: projection(pooled)  # a function: a module here would register as a child
    try:
        yield
    finally:
        del text.forward


def locked_parts(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The largest submodules of `module` that hold parameters, none of which trains (requires_grad
    False): a locked tower, or the locked layers of a partly locked one."""
    parameters = list(module.parameters())
    if parameters and not any(p.requires_grad for p in parameters):
        return [module]
    return [part for child in module.children() for part in locked_parts(child)]


def save_model(
    clip: torch.nn.Module,
    model_cfg: Mapping[str, Any],
    out_dir: str | Path,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write an open_clip checkpoint directory: `open_clip_config.json` and the weights.

    state_dict: weights to write instead of `clip.state_dict()` (e.g. gathered ZeRO-3 shards).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    preprocess_cfg = dict(getattr(clip.visual, "preprocess_cfg", {}) or {})
    if "hf_model_name" in model_cfg.get("text_cfg", {}):  # its text tower's config and tokenizer go along
        model_cfg = save_text_tower(dict(model_cfg), out)
    config = {"model_cfg": dict(model_cfg), "preprocess_cfg": preprocess_cfg}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    weights = {k: v.detach().cpu().float().contiguous() for k, v in (state_dict or clip.state_dict()).items()}
    torch.save(weights, out / WEIGHTS_FILE)
    return out


def trained_fields(model_dir: str | Path, fallback=None):
    """The FieldsConfig an exported model was trained with (its gcl_fields.json), else `fallback`
    (a plain open_clip directory has none)."""
    from gcl.config import FieldsConfig

    path = Path(model_dir) / FIELDS_FILE
    if not path.exists():
        return fallback
    return FieldsConfig(**json.loads(path.read_text()))


def load_model(model_dir: str | Path) -> LoadedModel:
    """Load a model saved by `save_model` (open_clip `local-dir:` layout)."""
    return create_model(ModelConfig(arch="local", pretrained=str(model_dir)))
