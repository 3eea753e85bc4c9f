"""Typed configuration: YAML files plus `--set section.key=value` overrides.

Every section is a pydantic model that forbids unknown keys and documents each field
with the docstring under it. Errors name the dotted key, what was given and what
would be accepted, before any expensive work starts.
"""

from __future__ import annotations

import copy
import difflib
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gcl.errors import ConfigError


class Section(BaseModel):
    """Base for config sections: unknown keys are errors, field docstrings become help."""

    # Finite numbers only: `train.lr=.inf` would pass `gt=0` and train to NaN.
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True, allow_inf_nan=False)


Modality = Literal["text", "image"]


class FieldSpec(Section):
    """One input field of a side (a column of the data) and its fusion weight."""

    modality: Modality = "text"
    """How the column is encoded: `text` (tokenized) or `image` (bytes or a path)."""
    weight: float = Field(1.0, ge=0.0)
    """Fusion weight of this field's embedding within its side."""


class FieldsConfig(Section):
    """Which columns form the left side (queries) and the right side (documents)."""

    left: dict[str, FieldSpec] = Field(default_factory=lambda: {"query": FieldSpec()})
    """Left-side fields by column name, e.g. `{query: {modality: text, weight: 1.0}}`."""
    right: dict[str, FieldSpec] = Field(
        default_factory=lambda: {
            "image": FieldSpec(modality="image", weight=0.9),
            "title": FieldSpec(modality="text", weight=0.1),
        }
    )
    """Right-side fields by column name, e.g. image 0.9 and title 0.1 as in the GCL paper."""

    @model_validator(mode="after")
    def _check_sides(self) -> FieldsConfig:
        for side in ("left", "right"):
            specs: dict[str, FieldSpec] = getattr(self, side)
            if not specs:
                raise ValueError(f"fields.{side} needs at least one field (a column name with a modality)")
            if sum(s.weight for s in specs.values()) <= 0:
                raise ValueError(f"fields.{side}: at least one field weight must be > 0")
        both = set(self.left) & set(self.right)
        if both:
            raise ValueError(f"column(s) {sorted(both)} are on both sides; a column belongs to one side")
        return self

    def weights(self, side: Literal["left", "right"]) -> dict[str, float]:
        """Field name -> fusion weight for one side."""
        return {name: spec.weight for name, spec in getattr(self, side).items()}

    def modalities(self) -> dict[str, str]:
        """Field name -> modality for both sides."""
        return {name: spec.modality for name, spec in {**self.left, **self.right}.items()}


# ---------------------------------------------------------------------------------------------
# Loading and overrides


class DuplicateKeyError(yaml.YAMLError):
    """A YAML mapping that gives a key twice."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (two `train:` sections):
    PyYAML keeps the last silently, and the first section's settings would be lost."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise DuplicateKeyError(
                    f"the key {key!r} is given twice in one mapping (lines {seen[key].line + 1} "
                    f"and {key_node.start_mark.line + 1}); merge them into one"
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _UniqueKeyLoader.construct_mapping)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict; an empty file is an empty config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except DuplicateKeyError as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested dict, in order."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        parts = key.strip().split(".")
        node = data
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(f"override {item!r}: {where} is a value, not a section")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {err}") from err
    return data


def _accepted_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names accepted at `loc` (a pydantic error location) within `model`."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(current, type) and issubclass(current, BaseModel) and isinstance(part, str):
            field = current.model_fields.get(part)
            if field is None:
                return []
            current = field.annotation
        # Unwrap dict[str, X], list[X] and X | None to reach the model that holds the key.
        while typing.get_origin(current) is not None:
            args = [a for a in typing.get_args(current) if a is not type(None)]
            current = args[-1] if args else None
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def format_validation_error(err: ValidationError, model: type[BaseModel], source: str) -> str:
    """Turn a pydantic error into lines naming the dotted key, the value and what is accepted."""
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            accepted = _accepted_keys(model, loc)
            hint = difflib.get_close_matches(str(loc[-1]), accepted, n=1)
            msg = f"  {key}: unknown key; accepted keys here: {', '.join(accepted)}"
            if hint:
                msg += f" (did you mean {hint[0]!r}?)"
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            msg = f"  {key}: {e['msg']}{shown}"
        lines.append(msg)
    return "\n".join(lines)


EXTENDS, SET = "extends", "set"  # a job config's overlay keys (see load_layers)


def load_layers(path: str | Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, dict[str, Any], list[str]]]:
    """The files a job config is made of, base first: (file, its sections, its `set` overrides).

    A config may name the files it extends (`extends: base.yaml`, or a list, relative to it); their
    sections are merged in order, a mapping key by key, anything else replaced, then its own, then
    every file's `set:` (KEY=VALUE, as `--set` takes them), base first: the way to replace a
    mapping whole, e.g. `fields.right={image: {modality: image}}`. So a small file can say what
    differs from a job ("CLIP's loss", "the towers' tuned GCL") and a person can read it."""
    path = Path(path).resolve()
    if path in seen:
        raise ConfigError(f"{path}: extends itself through {' -> '.join(map(str, seen))}")
    data = load_yaml(path)
    bases = data.pop(EXTENDS, [])
    sets = data.pop(SET, [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: {EXTENDS}: give a file, or a list of files, relative to this one")
    if not isinstance(sets, list) or not all(isinstance(o, str) for o in sets):
        raise ConfigError(f"{path}: {SET}: give a list of KEY=VALUE overrides, as --set takes them")
    layers = []
    for base in bases:
        layers.extend(load_layers(path.parent / base, (*seen, path)))
    return [*layers, (path, data, sets)]


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`: mappings merged key by key, anything else replaced."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_job_config(path: str | Path) -> tuple[dict[str, Any], list[str]]:
    """A job config file with the files it extends merged (load_layers): (sections, overrides)."""
    data: dict[str, Any] = {}
    sets: list[str] = []
    for _, sections, file_sets in load_layers(path):
        data = merge(data, sections)
        sets += file_sets
    return data, sets


def describe_layers(path: str | Path) -> list[str]:
    """What each file of a job config sets, base first, as YAML comments (`gcl config -c FILE`)."""
    lines = ["# made of, base first (a later file's values win):"]
    for file, sections, sets in load_layers(path):
        keys = [key.split("=", 1)[0] for key in overlay_leaves(sections)] + [o.split("=", 1)[0] for o in sets]
        lines.append(f"#   {file}: {', '.join(keys) if keys else 'nothing'}")
    return lines


def overlay_leaves(node: dict, prefix: str = "") -> list[str]:
    """KEY=VALUE for each leaf of nested config sections (lists and values as flow YAML)."""
    out = []
    for key, value in node.items():
        if isinstance(value, dict) and value:
            out += overlay_leaves(value, f"{prefix}{key}.")
        else:
            flow = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
            out.append(f"{prefix}{key}={flow}")
    return out


def overlay_overrides(path: str | Path) -> list[str]:
    """A job config file (with what it extends) as `--set` overrides, to layer it on another job:
    one KEY=VALUE per leaf of its sections, then its `set` list."""
    data, sets = load_job_config(path)
    return [*overlay_leaves(data), *sets]


def parse_config(model: type[BaseModel], path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """Load `path` (optional), apply overrides and validate into `model`. A job config may extend
    others (load_layers); a config of another kind (a sweep) is read as it is.

    Raises ConfigError with every problem listed by dotted key.
    """
    if path and EXTENDS not in model.model_fields and SET not in model.model_fields:
        data, sets = load_job_config(path)
        overrides = [*sets, *(overrides or [])]
    else:
        data = load_yaml(path) if path else {}
    source = str(path) if path else "defaults"
    return validate_config(model, data, overrides, source)


def validate_config(
    model: type[BaseModel], data: dict[str, Any], overrides: list[str] | None = None, source: str = "config"
) -> Any:
    """Apply `overrides` to a copy of `data` and validate it into `model` (ConfigError on problems)."""
    data = apply_overrides(copy.deepcopy(data), list(overrides or []))
    if overrides:
        source += " with --set " + " ".join(overrides)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, model, source)) from None


def describe(model: type[BaseModel], prefix: str = "") -> list[str]:
    """One line per config key: dotted name, type and docstring (for `gcl config --keys`); each
    section opens with where it is defined."""
    lines = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            module = ann.__module__.replace(".", "/") + ".py"
            lines.append(f"[{key}] {ann.__name__} in {module}")
            lines.extend(describe(ann, key + "."))
            continue
        type_name = getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
        lines.append(f"{key} ({type_name}): {field.description or ''}".rstrip())
    return lines
