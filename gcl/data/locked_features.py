"""Features of a locked image tower, computed once per document instead of once per pair and epoch.

A wholly locked image tower (`model.towers.image.lock`, no unlocked groups) trains in eval mode
(gcl.model.FieldEncoder.train), so with images not augmented (`pipeline.augment_images: false`)
it is a fixed function of the image: LiT's locked tower, whose output its users precompute by
hand. gcl does it for them: one Ray Data job reads the training, evaluation and validation data's
documents, keeps one row per distinct document (a product in 100 pairs is encoded once), runs the
tower's trunk on its image (gcl embed's batch-inference shape: an actor pool that loads the tower
once), and writes the features sorted by document key. Training's preprocessing then looks each
pair's features up instead of decoding and encoding its image, and the evaluations do the same;
the projection on top of the trunk, the other tower and everything that trains run as before.
The exported and served models are the whole model and take raw images.

A store is keyed by the tower's identity (architecture, weights' sha256, image size, pixel
normalization, transform) and the data files' identity (path, size, modification time): a second
run with the same tower and data reuses it, a changed tower, transform or file never does. It
lives under `<storage>/locked_features/<key>/`:

    part-00000.keys.npy             (n,) int64 document keys, sorted (gcl.data.keys.stable_keys)
    part-00000.<field>.npy          (n, D) features of the field's image (pipeline.locked_features_dtype)
    part-00000.<field>.present.npy  (n,) bool: whether the document has that image
    store.json                      identities, parts (their first and last keys), rows, seconds; last

Lookups memory-map the parts: a process holds the parts' key ranges, not the features, and reads
the rows its batches need from disk (the page cache shares them between a node's processes). A
store on object storage is copied to the node's local disk once, for memory-mapping.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from gcl import storage
from gcl.data.keys import stable_keys
from gcl.data.readers import DataError, image_base_dir

log = logging.getLogger(__name__)
STORE_FILE = "store.json"
STORE_DIR = "locked_features"
VERSION = 1  # of the store's layout and of what it holds: a change makes every store new
KEY = "__document_key"


@dataclass(frozen=True)
class LockedFeatures:
    """What a training reads instead of a locked tower's images: the store's location and fields."""

    location: str
    fields: tuple[str, ...]


def why_not_cached(job) -> str | None:
    """Why the job's image features cannot be computed once (None: they can): the tower must be a
    wholly locked timm image tower, and its input deterministic."""
    towers = job.model.towers
    images = [n for n, m in job.fields.modalities().items() if m == "image"]
    if not job.pipeline.cache_locked_features:
        return "pipeline.cache_locked_features is off"
    if not images:
        return "no field is an image"
    if towers is None:
        return f"model.arch={job.model.arch}: only a towers model's locked image tower is cached"
    if not towers.image.lock or towers.image.unlocked_groups:
        return "the image tower trains (model.towers.image.lock, unlocked_groups)"
    if job.pipeline.augment_images:
        return "pipeline.augment_images draws a new crop every epoch: the tower's input is not fixed"
    if any(name in job.fields.left for name in images):
        return "an image field is on the left (query) side"
    return None


def tower_identity(job) -> dict:
    """What the features depend on: the tower's architecture and weights (sha256), its input size,
    pixel normalization and transform, and what the store holds (dtype, layout version)."""
    from gcl.model import create_preprocessing
    from gcl.towers import image_mean_std, package_path

    image = job.model.towers.image
    weights = image.weights
    if weights and weights != "timm":
        weights = storage.file_sha256(package_path(weights, "model.towers.image.weights"))
    _, _, transform = create_preprocessing(job.model)
    return {
        "version": VERSION,
        "timm": image.timm,
        "weights": weights,
        "image_size": image.image_size,
        "mean_std": image_mean_std(job.model.towers),
        "transform": repr(transform),
        "dtype": job.pipeline.locked_features_dtype,
    }


def files_identity(files: list[str]) -> list[tuple[str, int, int]]:
    """(path, bytes, modification time in ns) of each data file: a file written again is another."""
    out = []
    for file in sorted(set(files)):
        store, path = storage.filesystem(file)
        info = store.get_file_info(path)
        out.append((file, int(info.size or 0), int(info.mtime_ns or 0)))
    return out


def store_location(job, files: list[str]) -> str:
    """<storage>/locked_features/<key>: the key a digest of the tower's and the files' identities."""
    digest = hashlib.sha256(json.dumps([tower_identity(job), files_identity(files)], default=str).encode())
    return storage.join(job.storage, STORE_DIR, digest.hexdigest()[:24])


def prepare_locked_features(job, data) -> LockedFeatures | None:
    """The store of the job's locked image features (data: gcl.train.job.CheckedData), built by a
    Ray Data job the first time, reused after; None where they cannot be cached (the reason logged)."""
    reason = why_not_cached(job)
    if reason:
        log.info("the image tower's features are computed at every step: %s", reason)
        return None
    from gcl.console import say

    files = [
        *data.train.files,
        *(f for fs in data.eval_files.values() for f in fs),
        *(f for fs in data.validation_files.values() for f in fs),
    ]
    location = store_location(job, files)
    fields = tuple(n for n, m in job.fields.modalities().items() if m == "image")
    if storage.read_text(storage.join(location, STORE_FILE)):
        log.info("the locked image tower's features are in %s (reused)", location)
        return LockedFeatures(location, fields)
    say(f"computing the locked image tower's features once per document, for this and later runs: {location}")
    built = _outside_placement_groups(build_store, job, files, location, fields)
    say(f"{built['rows']} documents in {built['seconds']:.0f} s ({built['rows'] / max(built['seconds'], 1e-9):.0f}/s)")
    return LockedFeatures(location, fields)


def _outside_placement_groups(function, *args):
    """`function(*args)`, in a task of its own where this process runs in a placement group (a sweep's
    trial): Ray Data's tasks (a sort's shuffle takes a whole CPU) would otherwise have to fit into
    the trial's bundles, which hold none."""
    import ray
    from ray.util.placement_group import get_current_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from gcl.cluster import init_ray

    init_ray()
    if get_current_placement_group() is None:
        return function(*args)
    escaped = PlacementGroupSchedulingStrategy(placement_group=None)
    return ray.get(ray.remote(function).options(num_cpus=0, scheduling_strategy=escaped).remote(*args))


def build_store(job, files: list[str], location: str, fields: tuple[str, ...]) -> dict:
    """Compute and write the store (see the module docstring) as one Ray Data job over the distinct
    documents of `files`; returns store.json's contents. Written beside `location`, moved in whole."""
    from ray.data import ActorPoolStrategy

    from gcl.cluster import init_ray
    from gcl.data.pipeline import read_pairs
    from gcl.outputs import replaced_whole

    init_ray()
    start = time.perf_counter()
    cpus, doc_col = job.pipeline.cpus_per_task, job.data.document_id_column
    groups: dict[tuple[str, str | None], list[str]] = {}  # one read per file type and image directory
    for file in sorted(set(files)):
        groups.setdefault((os.path.splitext(file)[1], image_base_dir(file, job.data.image_root)), []).append(file)
    reads = [
        read_pairs(kind, group, [doc_col, *fields], cpus).map_batches(
            _first_of_each_document,
            fn_kwargs={"doc_col": doc_col, "base_dir": base_dir},
            batch_format="pyarrow",
            num_cpus=cpus,
        )
        for (kind, base_dir), group in groups.items()
    ]
    firsts = reads[0].union(*reads[1:]) if len(reads) > 1 else reads[0]
    distinct = firsts.groupby(KEY, num_partitions=max(1, min(64, len(files)))).map_groups(
        _first_row, batch_format="pyarrow", num_cpus=cpus
    )
    settings = {
        "model": job.model.model_dump(mode="json"),
        "fields": list(fields),
        "dtype": job.pipeline.locked_features_dtype,
        "threads": max(1, int(cpus)),
    }
    encoded = distinct.map_batches(
        TowerFeatures,
        fn_constructor_kwargs={"settings": settings},
        batch_size=job.pipeline.preprocess_batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=job.pipeline.preprocess_tasks),
        num_cpus=cpus,
    )
    with replaced_whole(location) as partial:
        parts = (
            encoded.sort(KEY)
            .map_batches(
                _write_part,
                fn_kwargs={"out": partial, "fields": list(fields)},
                batch_size=None,
                batch_format="pyarrow",
                num_cpus=cpus,
            )
            .take_all()
        )
        parts = sorted((p for p in parts if p["rows"]), key=lambda p: p["first"])
        built = {
            "tower": tower_identity(job),
            "files": files_identity(files),
            "fields": list(fields),
            "parts": parts,
            "rows": sum(p["rows"] for p in parts),
            "dim": parts[0]["dim"] if parts else 0,
            "seconds": time.perf_counter() - start,
        }
        storage.write_text(storage.join(partial, STORE_FILE), json.dumps(built, indent=1, default=str))  # last
    return built


def _first_of_each_document(table, doc_col: str, base_dir: str | None):
    """A block's first row of each document, with its key and where its image paths are relative
    to: most repeats go before the shuffle."""
    import pyarrow as pa

    # As the training pipeline keys its numpy batches: integers as they are, other ids hashed.
    keys = stable_keys(table.column(doc_col).to_numpy(zero_copy_only=False))
    _, first = np.unique(keys, return_index=True)
    first = np.sort(first)
    table = table.take(pa.array(first)).append_column(KEY, pa.array(keys[first]))
    return table.append_column("__base_dir", pa.array([base_dir] * len(first), pa.string()))


def _first_row(group):
    return group.slice(0, 1)


class TowerFeatures:
    """A Ray Data actor: loads the locked image tower once, then computes its trunk's output for
    batches of documents (their first row's image)."""

    def __init__(self, settings: dict):
        import torch

        from gcl.model import ModelConfig, create_model, create_preprocessing

        torch.set_num_threads(settings["threads"])
        torch.manual_seed(0)  # the projections are random: only the trunk, loaded from its weights, is used
        config = ModelConfig(**settings["model"])
        self.trunk = create_model(config).clip.visual.trunk.eval()
        _, _, self.transform = create_preprocessing(config)
        self.fields = settings["fields"]
        self.dtype = np.dtype(settings["dtype"])

    def __call__(self, table):
        import io

        import pyarrow as pa
        import torch
        from PIL import Image

        from gcl.data.readers import image_bytes

        out = {KEY: table.column(KEY)}
        for field in self.fields:
            images, present = [], []
            for value, base_dir in zip(
                table.column(field).to_pylist(), table.column("__base_dir").to_pylist(), strict=True
            ):
                raw = image_bytes(value, base_dir)
                try:
                    images.append(None if raw is None else self.transform(Image.open(io.BytesIO(raw)).convert("RGB")))
                except Exception:  # validation names it where it matters (a pair it keeps)
                    images.append(None)
                present.append(images[-1] is not None)
            given = [im for im in images if im is not None]
            with torch.no_grad():
                features = self.trunk(torch.stack(given)).float().numpy() if given else np.zeros((0, 1), np.float32)
            dim = features.shape[1]
            rows = np.zeros((len(images), dim), self.dtype)
            rows[np.asarray(present, bool)] = features.astype(self.dtype)
            out[field] = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), dim)
            out[field + ".present"] = pa.array(present)
        return pa.table(out)


def _write_part(table, out: str, fields: list[str]):
    """Ray Data task: one block of the sorted features written as a part's .npy files, named by its
    first key (so that names sort as keys do); a summary row comes back."""
    import io

    import pyarrow as pa

    keys = table.column(KEY).to_numpy()
    if not len(keys):
        return pa.table({"name": [""], "rows": [0], "first": [0], "last": [0], "dim": [0]})
    name = f"part-{int(keys[0]):020d}"
    arrays = {"keys": keys}
    dim = 0
    for field in fields:
        column = table.column(field).combine_chunks()
        dim = column.type.list_size
        arrays[field] = column.flatten().to_numpy().reshape(-1, dim)
        arrays[f"{field}.present"] = table.column(field + ".present").to_numpy(zero_copy_only=False)
    store, root = storage.filesystem(out)
    store.create_dir(root, recursive=True)
    for suffix, array in arrays.items():
        buffer = io.BytesIO()
        np.save(buffer, array)
        with store.open_output_stream(f"{root}/{name}.{suffix}.npy") as stream:
            stream.write(buffer.getvalue())
    return pa.table(
        {"name": [name], "rows": [len(keys)], "first": [int(keys[0])], "last": [int(keys[-1])], "dim": [dim]}
    )


class FeatureStore:
    """Lookups into a store: (features, present) of documents by key, from memory-mapped parts."""

    def __init__(self, location: str):
        self.location = location
        self.directory = _local_copy(location)
        with open(os.path.join(self.directory, STORE_FILE)) as f:
            self.info = json.load(f)
        self.parts = self.info["parts"]
        self.firsts = np.array([p["first"] for p in self.parts], np.int64)
        self._open: dict[tuple[int, str], np.ndarray] = {}

    @property
    def fields(self) -> list[str]:
        return self.info["fields"]

    def _array(self, part: int, suffix: str) -> np.ndarray:
        if (part, suffix) not in self._open:
            path = os.path.join(self.directory, f"{self.parts[part]['name']}.{suffix}.npy")
            self._open[part, suffix] = np.load(path, mmap_mode="r")
        return self._open[part, suffix]

    def lookup(self, field: str, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, D) float32 features of `field` and (B,) present of the documents with `keys`; a
        DataError for a document the store does not hold (data that changed since it was built)."""
        keys = np.asarray(keys, np.int64)
        features = np.zeros((len(keys), self.info["dim"]), np.float32)
        present = np.zeros(len(keys), bool)
        parts = np.searchsorted(self.firsts, keys, side="right") - 1
        for part in np.unique(parts):
            rows = np.nonzero(parts == part)[0]
            held = self._array(int(part), "keys") if part >= 0 else np.zeros(0, np.int64)
            at = np.minimum(np.searchsorted(held, keys[rows]), max(len(held) - 1, 0))
            missing = (len(held) == 0) | (held[at] != keys[rows]) if len(held) else np.ones(len(rows), bool)
            if np.any(missing):
                raise DataError(
                    f"{self.location}: no locked image features for document key {keys[rows][missing][0]}: "
                    "the store does not hold every document of this data; delete it to build it again"
                )
            features[rows] = self._array(int(part), field)[at]
            present[rows] = self._array(int(part), f"{field}.present")[at]
        return features, present


def _local_copy(location: str) -> str:
    """The store as a local directory (memory-mapping needs one): itself, or a copy of it on this
    node's disk, made once (a directory per store, renamed into place whole)."""
    local = storage.local_path(location)
    if local is not None:
        return local
    cache = os.path.join(tempfile.gettempdir(), "gcl-locked-features", location.rstrip("/").rsplit("/", 1)[-1])
    if not os.path.exists(os.path.join(cache, STORE_FILE)):
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        scratch = tempfile.mkdtemp(dir=os.path.dirname(cache))
        copied = storage.download_directory(location, scratch)
        with contextlib.suppress(OSError):  # another process of this node copied it first
            os.rename(copied, cache)
    return cache
