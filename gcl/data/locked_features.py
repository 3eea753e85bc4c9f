"""Features of a locked tower, computed once per document or query instead of once per pair and epoch.

A wholly locked tower trains in eval mode (gcl.model.FieldEncoder.train), so it is a fixed function
of its input: the image tower (`model.towers.image.lock`, no unlocked groups) when images are not
augmented (`pipeline.augment_images: false`), the text tower (`model.towers.text.lock`, no unlocked
layers) always. LiT's locked tower, whose output its users precompute by hand; gcl does it for
them. One Ray Data job per side reads the training, evaluation and validation data, keeps one row
per distinct document (the right side's fields, by document id) or query (the left side's, by
query id): a product in 100 pairs is encoded once. It runs the tower up to its projection (the
image trunk's pooled output; the text encoder and its pooling) in an actor pool that loads the
towers once (gcl embed's batch-inference shape), and writes the features sorted by key. Training's
preprocessing then looks each pair's features up instead of decoding an image or tokenizing a
text and running the tower on it, and its evaluations do the same; the projections and everything
that trains run as before. The exported and served models are whole and take raw images and text.

A store is keyed by the towers' identity (architecture, weights' sha256, input size, pixel
normalization, transform, context length, pooling) and the data files' identity (path, size,
modification time): a later run with the same towers and data reuses it, a changed tower,
transform or file never does. It lives under `<storage>/locked_features/<key>/`:

    <side>/part-<first key>.keys.npy          (n,) int64 keys, sorted (gcl.data.keys.stable_keys of the ids)
    <side>/part-<first key>.<field>.npy       (n, D) features (pipeline.locked_features_dtype)
    <side>/part-<first key>.<field>.present.npy  (n,) bool: whether the row has a value of that field
    store.json                                identities, each side's fields and parts; written last

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
from pathlib import Path

import numpy as np

from gcl import storage
from gcl.data.keys import stable_keys
from gcl.data.readers import DataError, image_base_dir

log = logging.getLogger(__name__)
STORE_FILE = "store.json"
STORE_DIR = "locked_features"
VERSION = 1  # of the store's layout and of what it holds: a change makes every store new
KEY = "__document_key"


SIDES = ("left", "right")


@dataclass(frozen=True)
class LockedFeatures:
    """What a training reads instead of its locked towers' inputs: the store's location, and the
    fields it holds with their side (left: keyed by query id, right: by document id)."""

    location: str
    sides: tuple[tuple[str, str], ...]  # (field, side)

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(field for field, _ in self.sides)


def cached_fields(job) -> dict[str, str]:
    """The job's fields whose tower is a fixed function of its input (field -> side); why the
    others are not cached is logged."""
    towers, modalities = job.model.towers, job.fields.modalities()
    if not job.pipeline.cache_locked_features:
        reasons = {"image": "pipeline.cache_locked_features is off", "text": "pipeline.cache_locked_features is off"}
    elif towers is None:
        reasons = dict.fromkeys(("image", "text"), f"model.arch={job.model.arch}: only a towers model's locked towers")
    else:
        reasons = {
            "image": "the image tower trains (model.towers.image.lock, unlocked_groups)"
            if not towers.image.lock or towers.image.unlocked_groups
            else "pipeline.augment_images draws a new crop every epoch"
            if job.pipeline.augment_images
            else None,
            "text": "the text tower trains (model.towers.text.lock, unlocked_layers)"
            if not towers.text.lock or towers.text.unlocked_layers
            else None,
        }
    for modality in sorted(set(modalities.values())):
        if reasons[modality]:
            log.info("the %s tower runs at every step: %s", modality, reasons[modality])
    return {
        name: "left" if name in job.fields.left else "right"
        for name, modality in modalities.items()
        if not reasons[modality]
    }


def tower_identity(job, modalities: set[str]) -> dict:
    """What the features depend on: each cached tower's architecture and weights (sha256), its
    input (image size, pixel normalization, transform; tokenizer, context length, pooling), and what
    the store holds (dtype, layout version)."""
    from gcl.model import create_preprocessing
    from gcl.towers import image_mean_std, package_path

    towers = job.model.towers
    identity: dict = {"version": VERSION, "dtype": job.pipeline.locked_features_dtype}
    if "image" in modalities:
        weights = towers.image.weights
        if weights and weights != "timm":
            weights = storage.file_sha256(package_path(weights, "model.towers.image.weights"))
        _, _, transform = create_preprocessing(job.model)
        identity["image"] = {
            "timm": towers.image.timm,
            "weights": weights,
            "image_size": towers.image.image_size,
            "mean_std": image_mean_std(towers),
            "transform": repr(transform),
        }
    if "text" in modalities:
        location = package_path(towers.text.hf, "model.towers.text.hf")
        files = sorted(Path(location).glob("*.safetensors")) + sorted(Path(location).glob("*.bin"))
        weights = [storage.file_sha256(str(f)) for f in files] or towers.text.hf  # a hub name: its name
        identity["text"] = {
            "hf": towers.text.hf,
            "weights": weights,
            "pooling": towers.text.pooling,
            "context_length": towers.text.context_length,
        }
    return identity


def files_identity(files: list[str]) -> list[tuple[str, int, int]]:
    """(path, bytes, modification time in ns) of each data file: a file written again is another."""
    out = []
    for file in sorted(set(files)):
        store, path = storage.filesystem(file)
        info = store.get_file_info(path)
        out.append((file, int(info.size or 0), int(info.mtime_ns or 0)))
    return out


def store_location(job, files: list[str], fields: dict[str, str]) -> str:
    """<storage>/locked_features/<key>: the key a digest of the towers', fields' and files' identities."""
    modalities = {job.fields.modalities()[name] for name in fields}
    identity = [tower_identity(job, modalities), sorted(fields.items()), files_identity(files)]
    digest = hashlib.sha256(json.dumps(identity, default=str).encode())
    return storage.join(job.storage, STORE_DIR, digest.hexdigest()[:24])


def prepare_locked_features(job, data) -> LockedFeatures | None:
    """The store of the job's locked towers' features (data: gcl.train.job.CheckedData), built by a
    Ray Data job the first time, reused after; None where no tower can be cached (why: logged)."""
    fields = cached_fields(job)
    if not fields:
        return None
    from gcl.console import say

    files = [
        *data.train.files,
        *(f for fs in data.eval_files.values() for f in fs),
        *(f for fs in data.validation_files.values() for f in fs),
    ]
    location = store_location(job, files, fields)
    features = LockedFeatures(location, tuple(sorted(fields.items())))
    if storage.read_text(storage.join(location, STORE_FILE)):
        log.info("the locked towers' features of %s are in %s (reused)", ", ".join(fields), location)
        return features
    say(
        f"computing the locked towers' features of {', '.join(fields)} once per document and query, for this "
        f"and later runs: {location}"
    )
    built = _outside_placement_groups(build_store, job, files, location, fields)
    rows = sum(side["rows"] for side in built["sides"].values())
    say(f"{rows} documents and queries in {built['seconds']:.0f} s ({rows / max(built['seconds'], 1e-9):.0f}/s)")
    return features


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


def build_store(job, files: list[str], location: str, fields: dict[str, str]) -> dict:
    """Compute and write the store (see the module docstring) as one Ray Data job per side over
    the distinct documents or queries of `files` (fields: field -> side); returns store.json's
    contents. Written beside `location`, moved in whole."""
    from gcl.cluster import init_ray
    from gcl.outputs import replaced_whole

    init_ray()
    start = time.perf_counter()
    key_columns = {"left": job.data.query_id_column, "right": job.data.document_id_column}
    built: dict = {
        "tower": tower_identity(job, {job.fields.modalities()[n] for n in fields}),
        "files": files_identity(files),
        "sides": {},
    }
    with replaced_whole(location) as partial:
        for side in SIDES:
            names = [name for name, where in fields.items() if where == side]
            if names:
                built["sides"][side] = _build_side(job, files, storage.join(partial, side), key_columns[side], names)
        built["seconds"] = time.perf_counter() - start
        storage.write_text(storage.join(partial, STORE_FILE), json.dumps(built, indent=1, default=str))  # last
    return built


def _build_side(job, files: list[str], out: str, key_column: str, fields: list[str]) -> dict:
    """One side's parts in `out`: the distinct rows by `key_column`, each field's features."""
    from ray.data import ActorPoolStrategy

    from gcl.data.readers import read_pairs

    cpus = job.pipeline.cpus_per_task
    groups: dict[tuple[str, str | None], list[str]] = {}  # one read per file type and image directory
    for file in sorted(set(files)):
        groups.setdefault((os.path.splitext(file)[1], image_base_dir(file, job.data.image_root)), []).append(file)
    reads = [
        read_pairs(kind, group, [key_column, *fields], cpus).map_batches(
            _first_of_each_document,
            fn_kwargs={"doc_col": key_column, "base_dir": base_dir, "keep_doc_col": key_column in fields},
            batch_format="pyarrow",
            num_cpus=cpus,
        )
        for (kind, base_dir), group in groups.items()
    ]
    firsts = reads[0].union(*reads[1:]) if len(reads) > 1 else reads[0]
    distinct = firsts.groupby(KEY, num_partitions=max(1, min(64, len(files)))).map_groups(
        _first_row, batch_format="pyarrow", num_cpus=cpus
    )
    modalities = job.fields.modalities()
    settings = {
        "model": job.model.model_dump(mode="json"),
        "fields": {name: modalities[name] for name in fields},
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
    parts = encoded.sort(KEY).map_batches(
        _write_part, fn_kwargs={"out": out, "fields": fields}, batch_size=None, batch_format="pyarrow", num_cpus=cpus
    )
    parts = sorted((p for p in parts.take_all() if p["rows"]), key=lambda p: p["first"])
    dims = json.loads(parts[0]["dims"]) if parts else {}
    for part in parts:
        del part["dims"]
    return {
        "fields": fields,
        "key_column": key_column,
        "parts": parts,
        "dims": dims,
        "rows": sum(p["rows"] for p in parts),
    }


def _first_of_each_document(table, doc_col: str, base_dir: str | None, keep_doc_col: bool):
    """A block's first row of each document, with its key and where its image paths are relative
    to: most repeats go before the shuffle."""
    import pyarrow as pa

    # As the training pipeline keys its numpy batches: integers as they are, other ids hashed.
    keys = stable_keys(table.column(doc_col).to_numpy(zero_copy_only=False))
    _, first = np.unique(keys, return_index=True)
    first = np.sort(first)
    table = table.take(pa.array(first)).append_column(KEY, pa.array(keys[first]))
    if not keep_doc_col:  # the key replaces it: files whose ids differ in type (`gcl data grades`'
        table = table.drop_columns([doc_col])  # string query ids, a split's integers) then union
    return table.append_column("__base_dir", pa.array([base_dir] * len(first), pa.string()))


def _first_row(group):
    return group.slice(0, 1)


class TowerFeatures:
    """A Ray Data actor: loads the towers once, then computes each field's features (the locked
    tower's output before its projection) for batches of distinct documents or queries."""

    def __init__(self, settings: dict):
        import torch

        from gcl.model import ModelConfig, create_model, create_preprocessing

        torch.set_num_threads(settings["threads"])
        torch.manual_seed(0)  # the projections are random: only what the weights files load is used
        config = ModelConfig(**settings["model"])
        self.clip = create_model(config).clip.eval()
        self.tokenizer, _, self.transform = create_preprocessing(config)
        self.fields = settings["fields"]
        self.dtype = np.dtype(settings["dtype"])

    def _images(self, values, base_dirs):
        import io

        from PIL import Image

        from gcl.data.readers import image_bytes

        images = []
        for value, base_dir in zip(values, base_dirs, strict=True):
            raw = image_bytes(value, base_dir)
            try:
                images.append(None if raw is None else self.transform(Image.open(io.BytesIO(raw)).convert("RGB")))
            except Exception:  # validation names it where it matters (a pair it keeps)
                images.append(None)
        return images

    def __call__(self, table):
        import pyarrow as pa
        import torch

        from gcl.data.readers import field_text

        out = {KEY: table.column(KEY)}
        for field, modality in self.fields.items():
            values = table.column(field).to_pylist()
            if modality == "image":
                inputs = self._images(values, table.column("__base_dir").to_pylist())
                present = np.array([x is not None for x in inputs], bool)
                given = [x for x in inputs if x is not None]
                with torch.no_grad():
                    features = self.clip.visual.trunk(torch.stack(given)) if given else torch.zeros(0, 1)
            else:
                texts = [field_text(v) for v in values]
                present = np.array([t is not None for t in texts], bool)
                given = [t for t in texts if t is not None]
                with torch.no_grad(), _projection_skipped(self.clip.text):
                    features = self.clip.text(self.tokenizer(given)) if given else torch.zeros(0, 1)
            features = features.float().numpy()
            dim = features.shape[1]
            rows = np.zeros((len(values), dim), self.dtype)
            rows[present] = features.astype(self.dtype)
            out[field] = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), dim)
            out[field + ".present"] = pa.array(present)
        return pa.table(out)


@contextlib.contextmanager
def _projection_skipped(text_tower):
    """The text tower's output before its projection, by open_clip's own forward (its pooling)."""
    import torch

    projection = text_tower.proj
    text_tower.proj = torch.nn.Identity()
    try:
        yield
    finally:
        text_tower.proj = projection


def _write_part(table, out: str, fields: list[str]):
    """Ray Data task: one block of the sorted features written as a part's .npy files, named by its
    first key (so that names sort as keys do); a summary row comes back."""
    import io

    import pyarrow as pa

    keys = table.column(KEY).to_numpy()
    if not len(keys):
        return pa.table({"name": [""], "rows": [0], "first": [0], "last": [0], "dims": ["{}"]})
    name = f"part-{int(keys[0]):020d}"
    arrays, dims = {"keys": keys}, {}
    for field in fields:
        column = table.column(field).combine_chunks()
        dims[field] = column.type.list_size
        arrays[field] = column.flatten().to_numpy().reshape(-1, dims[field])
        arrays[f"{field}.present"] = table.column(field + ".present").to_numpy(zero_copy_only=False)
    store, root = storage.filesystem(out)
    store.create_dir(root, recursive=True)
    for suffix, array in arrays.items():
        buffer = io.BytesIO()
        np.save(buffer, array)
        with store.open_output_stream(f"{root}/{name}.{suffix}.npy") as stream:
            stream.write(buffer.getvalue())
    summary = {"name": [name], "rows": [len(keys)], "first": [int(keys[0])], "last": [int(keys[-1])]}
    return pa.table({**summary, "dims": [json.dumps(dims)]})


class FeatureStore:
    """Lookups into a store: (features, present) of rows by key, from memory-mapped parts."""

    def __init__(self, location: str):
        self.location = location
        self.directory = _local_copy(location)
        with open(os.path.join(self.directory, STORE_FILE)) as f:
            self.info = json.load(f)
        self.side_of = {field: side for side, held in self.info["sides"].items() for field in held["fields"]}
        self.firsts = {
            side: np.array([p["first"] for p in held["parts"]], np.int64) for side, held in self.info["sides"].items()
        }
        self._open: dict[tuple[str, int, str], np.ndarray] = {}

    @property
    def fields(self) -> list[str]:
        return list(self.side_of)

    def _array(self, side: str, part: int, suffix: str) -> np.ndarray:
        if (side, part, suffix) not in self._open:
            name = self.info["sides"][side]["parts"][part]["name"]
            self._open[side, part, suffix] = np.load(
                os.path.join(self.directory, side, f"{name}.{suffix}.npy"), mmap_mode="r"
            )
        return self._open[side, part, suffix]

    def lookup(self, field: str, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, D) float32 features of `field` and (B,) present for the rows with `keys` (document keys
        for a right-side field, query keys for a left-side one); a DataError for a key the store
        does not hold (data that changed since it was built)."""
        side = self.side_of[field]
        keys = np.asarray(keys, np.int64)
        features = np.zeros((len(keys), self.info["sides"][side]["dims"][field]), np.float32)
        present = np.zeros(len(keys), bool)
        parts = np.searchsorted(self.firsts[side], keys, side="right") - 1
        for part in np.unique(parts):
            rows = np.nonzero(parts == part)[0]
            held = self._array(side, int(part), "keys") if part >= 0 else np.zeros(0, np.int64)
            at = np.minimum(np.searchsorted(held, keys[rows]), max(len(held) - 1, 0))
            missing = (held[at] != keys[rows]) if len(held) else np.ones(len(rows), bool)
            if np.any(missing):
                raise DataError(
                    f"{self.location}: no locked features of {field} for key {keys[rows][missing][0]}: the store "
                    "does not hold every row of this data; delete it to build it again"
                )
            features[rows] = self._array(side, int(part), field)[at]
            present[rows] = self._array(side, int(part), f"{field}.present")[at]
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
