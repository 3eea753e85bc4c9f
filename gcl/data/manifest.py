"""A dataset manifest: which files a model was trained and evaluated on, with content hashes,
so that a registered model version says exactly what data produced it."""

from __future__ import annotations

import hashlib

from gcl.data.readers import resolve_files, storage_filesystem
from gcl.data.schema import DataConfig


def file_sha256(file: str, chunk_bytes: int = 1 << 22) -> str:
    """sha256 of a local or remote (pyarrow URI) file's bytes, read in chunks."""
    filesystem, path = storage_filesystem(file)
    digest = hashlib.sha256()
    with filesystem.open_input_stream(path) as stream:
        while chunk := stream.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def spec_manifest(spec: str) -> dict:
    """{'spec', 'files': [{'path', 'sha256'}], 'sha256'} for a file, directory or glob."""
    files = [{"path": f, "sha256": file_sha256(f)} for f in resolve_files(spec)]
    combined = hashlib.sha256("".join(f["sha256"] for f in files).encode()).hexdigest()
    return {"spec": spec, "files": files, "sha256": combined}


def dataset_manifest(data: DataConfig) -> dict:
    """Manifest of the training data and every evaluation split."""
    manifest = {"train": spec_manifest(data.train) if data.train else None}
    manifest["eval"] = {name: spec_manifest(spec) for name, spec in data.eval.items()}
    return manifest
