"""A dataset manifest: which files a model was trained and evaluated on, with content hashes,
so that a registered model version says exactly what data produced it."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from gcl.data.readers import resolve_files
from gcl.data.schema import DataConfig
from gcl.storage import file_sha256


def spec_manifest(spec: str, files: list[str] | None = None) -> dict:
    """{'spec', 'files': [{'path', 'sha256'}], 'sha256'} for a file, directory or glob (its
    `files`, listed here when not given)."""
    hashed = [{"path": f, "sha256": file_sha256(f)} for f in files or resolve_files(spec)]
    combined = hashlib.sha256("".join(f["sha256"] for f in hashed).encode()).hexdigest()
    return {"spec": spec, "files": hashed, "sha256": combined}


def dataset_manifest(
    data: DataConfig,
    train_files: list[str] | None = None,
    eval_files: Mapping[str, list[str]] | None = None,
    validation_files: Mapping[str, list[str]] | None = None,
) -> dict:
    """Manifest of the training data, every evaluation split and every validation split, from their
    files as validation listed them (listed here where not given)."""
    manifest = {"train": spec_manifest(data.train, train_files) if data.train else None}
    for key, splits, files in (
        ("eval", data.eval, eval_files),
        ("validation", data.validation, validation_files),
    ):
        manifest[key] = {name: spec_manifest(spec, (files or {}).get(name)) for name, spec in splits.items()}
    return manifest
