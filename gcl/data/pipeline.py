"""The Ray Data pipeline: read -> drop rejected rows -> shuffle -> decode, transform and
tokenize in Ray Data tasks -> fixed-shape numpy batches for the trainers.

Train workers read their shards with gcl.data.batches. This module does not import torch at
module level: Ray Data's split coordinators import it to unpickle the datasets.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from gcl import storage
from gcl.config import FieldsConfig, Section
from gcl.data.keys import stable_keys
from gcl.data.locked_features import FeatureStore, LockedFeatures
from gcl.data.readers import DataError, field_text, image_base_dir, image_bytes, read_pairs, resolve_files
from gcl.data.schema import DataConfig

PRESENT = "__present"  # suffix of the per-field presence columns


class PipelineConfig(Section):
    """How the data pipeline runs."""

    preprocess_tasks: int = Field(1, ge=1)
    """Preprocessing tasks at once (decoding images, tokenizing text); each worker process that
    runs them loads the tokenizer and transforms once and keeps them across epochs."""
    cpus_per_task: float = Field(0.5, gt=0)
    """CPUs reserved per read, shuffle and preprocessing task (fractional on small machines, so
    that a task does not wait for a whole free core)."""
    preprocess_batch_size: int = Field(256, ge=1)
    """Rows per preprocessing call."""
    shuffle: Literal["auto", "global", "blocks", "none"] = "auto"
    """How each epoch's pairs are ordered. `global`: a full shuffle, an all-to-all of every row
    (images included) through Ray's object store before the first batch: right while the training
    files fit in the object store. `blocks`: a new order of the files every epoch and the rows of
    each block read (about 128 MB) shuffled, streaming, with no all-to-all: for data larger than
    that (Marqo-GS-10M); a batch then draws from few files, so add local_shuffle_buffer to mix
    them. `none`: file order. `auto`: global up to global_shuffle_max_gb of training files,
    blocks above."""
    global_shuffle_max_gb: float = Field(2.0, ge=0)
    """With shuffle=auto: the most training data (bytes of its files, in GB) shuffled globally."""
    local_shuffle_buffer: int = Field(0, ge=0)
    """Rows in each worker's local shuffle buffer, which mixes the batches it draws (0: off; each
    row holds its preprocessed pixels, 150 kB at 224 x 224)."""
    augment_images: bool = False
    """Use open_clip's training augmentation (random resized crop) instead of the eval transform."""
    docs_per_query: int = Field(1, ge=1)
    """Query-grouped batches: with m > 1, each epoch lays a query's pairs side by side in runs of m
    (a seeded order within the query, the runs in a random order), so that a batch holds about
    batch_size / m queries with m of their documents each, the documents a listwise loss
    (loss.target=listwise) ranks against each other. Every pair is still used once per epoch. The
    grouping takes the place of the shuffle (global or blocks): two all-to-alls of the pairs
    through the object store per epoch (Ray Data's groupby, then a sort of the runs). A query
    with fewer than m pairs left makes a shorter run, so runs do not always line up with batches.
    No local shuffle buffer (it would scatter the runs). 1: pairs in a plain shuffle."""
    cache_locked_features: bool = True
    """Compute a wholly locked image tower's features once per document (a Ray Data job, its store
    reused by later runs on the same tower and data) and train and evaluate on them instead of
    decoding and encoding every pair's image every epoch (gcl/data/locked_features.py). Only where
    the tower is a fixed function of the image: locked, no unlocked groups, no augmentation."""
    locked_features_dtype: Literal["float32", "float16"] = "float32"
    """How the store keeps the features: float32 trains exactly as the tower's own output (within
    float rounding: the same model); float16 halves the store (Marqo-GS-10M's ~5M images at
    1,280 dimensions: ~13 GB instead of ~26 GB) for a rounding of about 1e-3 of each feature."""
    prefetch_next_epoch: bool = True
    """Start the next epoch's pipeline (its read, global shuffle and first batches) as soon as this
    epoch's first batch has arrived, so that its start-up overlaps training instead of stalling
    the trainers between epochs. Costs a second epoch's shuffle in the object store for a while."""

    @model_validator(mode="after")
    def _runs_stay_together(self) -> PipelineConfig:
        if self.docs_per_query > 1 and self.local_shuffle_buffer:
            raise ValueError(
                f"pipeline.docs_per_query={self.docs_per_query} lays a query's pairs side by side, "
                f"which pipeline.local_shuffle_buffer={self.local_shuffle_buffer} would scatter: "
                "set one of them off (docs_per_query=1 or local_shuffle_buffer=0)"
            )
        return self


class TokenCache:
    """One text field's token rows by text, kept across batches and epochs by a preprocessing
    process: a query's text comes back in every pair of that query (about 100 in Marqo-GS-10M),
    every text in every epoch, and open_clip's tokenizer (ftfy, a regex and BPE per text) took
    28% of the preprocessing's time (profiled on the synthetic data). Beyond `max_texts` the
    least recently used are forgotten; one cache per field, so that titles, which seldom come
    back within an epoch, do not push out the queries."""

    def __init__(self, tokenizer, max_texts: int = 100_000):
        self.tokenizer = tokenizer
        self.max_texts = max_texts
        self._rows: OrderedDict[str, np.ndarray] = OrderedDict()  # int32: half the memory of int64

    def __call__(self, texts: list[str]) -> np.ndarray:
        """(B, context_length) int64 token rows of `texts`, as the tokenizer gives them."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._rows]
        if missing:
            for text, row in zip(missing, self.tokenizer(missing).numpy().astype(np.int32), strict=True):
                self._rows[text] = row
        for text in texts:
            self._rows.move_to_end(text)
        rows = np.stack([self._rows[t] for t in texts]).astype(np.int64)
        while len(self._rows) > self.max_texts:
            self._rows.popitem(last=False)
        return rows


def pil_stages(transform):
    """The stages of an open_clip image transform before its ToTensor and Normalize: the
    preprocessing sends the trainers uint8 pixels (a quarter of float32's bytes through Ray's
    object store and to the GPU), which the model normalizes (gcl.model.normalize_pixels)."""
    from open_clip.transform import MaybeConvertMode
    from torchvision.transforms import Compose, Normalize, ToTensor

    stages = list(getattr(transform, "transforms", []))
    if len(stages) < 2 or not isinstance(stages[-2], ToTensor) or not isinstance(stages[-1], Normalize):
        raise ValueError(f"image transform {transform!r} does not end with ToTensor and Normalize as open_clip's do")
    # Images are converted to RGB on decoding, and resizing and cropping keep the mode: a second
    # conversion would only copy each image.
    return Compose([s for s in stages[:-2] if not (isinstance(s, MaybeConvertMode) and s.mode == "RGB")])


class PairPreprocessor:
    """Ray Data callable class: raw pair rows -> model-ready numpy arrays.

    Output per field: `<field>` ((B, L) int64 tokens or (B, 3, H, W) uint8 pixels, resized and
    cropped, not yet normalized) and
    `<field>__present` (B,) bool; plus `score` (B,) float32 and int64 `query_key`,
    `document_key`, `pair_key`.
    """

    def __init__(
        self,
        model_cfg: dict,
        fields: dict,
        weight_key: str,
        data_cfg: dict,
        base_dir: str | None,
        augment: bool,
        locked_features: str | None = None,
    ):
        from gcl.model import ModelConfig, create_preprocessing

        tokenizer, train_tf, eval_tf = create_preprocessing(ModelConfig(**model_cfg))
        self.tokenizer = tokenizer
        self.image_transform = pil_stages(train_tf if augment else eval_tf)
        self.fields = FieldsConfig(**fields).modalities()
        # A tokenizer that reduces long texts at random (open_clip's reduction_fn) must run every time.
        deterministic = getattr(tokenizer, "reduction_fn", None) is None
        self.tokens = {n: TokenCache(tokenizer) for n, m in self.fields.items() if m == "text" and deterministic}
        self.weight_key = weight_key
        self.data = DataConfig(**data_cfg)
        self.base_dir = base_dir
        self.augment = augment
        # Locked towers' features, looked up by document or query instead of running the tower.
        self.features = FeatureStore(locked_features) if locked_features else None

    def _image(self, value, pair_id, pair_key: int, seed: int) -> np.ndarray | None:
        """One pair's image, resized and cropped: (H, W, 3) uint8; None when absent."""
        import torch
        from PIL import Image

        try:
            raw = image_bytes(value, self.base_dir)
            if raw is None:
                return None
            if self.augment:  # the same random crop for this pair and epoch seed in every run
                torch.manual_seed(hash((seed, int(pair_key))) & 0x7FFF_FFFF_FFFF_FFFF)
            with Image.open(io.BytesIO(raw)) as img:
                return np.asarray(self.image_transform(img.convert("RGB")))
        except Exception as err:
            pair_id = pair_id.item() if isinstance(pair_id, np.generic) else pair_id  # 6, not np.int64(6)
            raise DataError(f"pair {pair_id!r}: image cannot be read or decoded ({type(err).__name__}: {err})") from err

    def __call__(self, batch: Mapping[str, np.ndarray], seed: int = 0) -> dict[str, np.ndarray]:
        """seed: the epoch's seed, which draws the random crops when augmenting."""
        pair_ids = batch[self.data.pair_id_column]
        pair_keys = stable_keys(pair_ids)
        document_keys = stable_keys(batch[self.data.document_id_column])
        query_keys = stable_keys(batch[self.data.query_id_column])
        out: dict[str, np.ndarray] = {}
        for name, modality in self.fields.items():
            if self.features is not None and name in self.features.side_of:  # (B, D) float32 features
                keys = document_keys if self.features.side_of[name] == "right" else query_keys
                out[name], out[name + PRESENT] = self.features.lookup(name, keys)
                continue
            values = batch[name]
            if modality == "text":
                texts = [field_text(v) for v in values]
                present = np.array([t is not None for t in texts])
                padded = [t or "" for t in texts]
                tokens = self.tokens[name](padded) if self.tokens else self.tokenizer(padded).numpy()
                out[name] = tokens.astype(np.int64, copy=False)
            else:
                images = [
                    self._image(v, pid, key, seed) for v, pid, key in zip(values, pair_ids, pair_keys, strict=True)
                ]
                present = np.array([img is not None for img in images])
                out[name] = self._pixels(images, present)
            out[name + PRESENT] = present
        out["score"] = np.asarray(batch[self.weight_key], dtype=np.float32)
        out["query_key"] = query_keys
        out["document_key"] = document_keys
        out["pair_key"] = pair_keys
        return out

    def _pixels(self, images: list, present: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) uint8 pixels of a batch's images (from _image), zeros where absent."""
        given = [img for img in images if img is not None]
        if given:
            shape = given[0].shape
        else:
            size = self.image_transform.transforms[0].size
            shape = (*((size, size) if isinstance(size, int) else size), 3)
        out = np.zeros((len(images), 3, *shape[:2]), np.uint8)
        if given:
            out[present] = np.stack(given).transpose(0, 3, 1, 2)
        return out


@functools.lru_cache(maxsize=4)
def _preprocessor(settings: str) -> PairPreprocessor:
    return PairPreprocessor(**json.loads(settings))


def preprocess_batch(batch: Mapping[str, np.ndarray], settings: str, seed: int) -> dict[str, np.ndarray]:
    """Ray Data task: PairPreprocessor(**settings) on `batch`. Tasks run in Ray's pooled worker
    processes, which outlive an epoch: each builds the tokenizer and transforms once and keeps
    them (an actor pool would start new processes, and load them again, every epoch)."""
    return _preprocessor(settings)(batch, seed=seed)


@dataclass(frozen=True)
class PairSource:
    """The training pairs a job reads and how: `files` (listed once, by validation) of the
    dataset `spec`, the columns `fields`, `weight_key` and the data config's ids name, the model's
    preprocessing, and the pair ids validation rejected (dropped)."""

    spec: str
    files: tuple[str, ...]
    data: DataConfig
    fields: FieldsConfig
    weight_key: str
    model_cfg: dict
    pipeline: PipelineConfig
    skip_pair_ids: frozenset = frozenset()
    locked_features: LockedFeatures | None = None

    @classmethod
    def of_job(
        cls, job, files: list[str] | None = None, skip_pair_ids=(), locked_features: LockedFeatures | None = None
    ) -> PairSource:
        """The training pairs of a JobConfig; files: resolved from job.data.train when not given;
        locked_features: a store whose features stand in for those image fields (not read)."""
        return cls(
            spec=job.data.train,
            files=tuple(files or resolve_files(job.data.train)),
            data=job.data,
            fields=job.fields,
            weight_key=job.loss.weight_key,
            model_cfg=job.model.model_dump(),
            pipeline=job.pipeline,
            skip_pair_ids=frozenset(skip_pair_ids),
            locked_features=locked_features,
        )


def shuffle_mode(source: PairSource) -> str:
    """pipeline.shuffle, with `auto` decided by the size of the training files."""
    mode = source.pipeline.shuffle
    if mode != "auto":
        return mode
    size = sum(storage.file_size(f) for f in source.files)
    return "global" if size <= source.pipeline.global_shuffle_max_gb * 1e9 else "blocks"


def read_training_pairs(source: PairSource, *, file_order_seed: int | None = None):
    """(raw pairs, preprocessing settings) of `source`, its files in a random order drawn with
    `file_order_seed` (None: as listed).

    The raw pairs hold only the columns training needs, rows rejected by validation dropped;
    read tasks reserve `pipeline.cpus_per_task`. The settings (JSON) are what `preprocess_batch`
    builds its PairPreprocessor from.
    """
    import pandas as pd

    data, fields = source.data, source.fields
    cached = source.locked_features.fields if source.locked_features else ()
    read = [name for name in fields.modalities() if name not in cached]  # a cached field is never read
    columns = list(
        dict.fromkeys([*read, source.weight_key, data.query_id_column, data.document_id_column, data.pair_id_column])
    )
    files = list(source.files)
    if file_order_seed is not None:
        files = [files[i] for i in np.random.default_rng(file_order_seed).permutation(len(files))]
    ds = read_pairs(source.spec, files, columns, source.pipeline.cpus_per_task)
    if source.skip_pair_ids:
        skip = sorted(source.skip_pair_ids, key=str)
        pair_col = data.pair_id_column

        def drop_rejected(df: pd.DataFrame) -> pd.DataFrame:
            return df[~df[pair_col].isin(skip)]

        ds = ds.map_batches(drop_rejected, batch_format="pandas")
    settings = dict(
        model_cfg=source.model_cfg,
        fields=fields.model_dump(),
        weight_key=source.weight_key,
        data_cfg=data.model_dump(),
        base_dir=image_base_dir(source.files[0], data.image_root),
        augment=source.pipeline.augment_images,
        locked_features=source.locked_features.location if source.locked_features else None,
    )
    return ds, json.dumps(settings, sort_keys=True)


def shuffle_block_rows(block, seed: int, pair_col: str):
    """Ray Data task: a read block's rows in a random order, drawn from `seed` and the block's
    first pair id (the same block is shuffled the same way in every run)."""
    import pyarrow as pa

    if block.num_rows < 2:
        return block
    first = int(stable_keys(np.asarray(block.column(pair_col)[:1].to_pylist()))[0])
    order = np.random.default_rng([seed, first & 0x7FFF_FFFF]).permutation(block.num_rows)
    return block.take(pa.array(order))


GROUP_KEY, GROUP_ORDER = "__group", "__group_order"


def runs_of_query(group, seed: int, docs_per_query: int, query_col: str, pair_col: str):
    """Ray Data map_groups task: one query's pairs in a seeded order (drawn from the seed and the
    query's id, over the pairs sorted by id: the same whatever order they arrived in), cut into
    runs of `docs_per_query`, each run given a random sort key."""
    import pyarrow as pa

    rows = group.num_rows
    if rows == 0:
        return group
    by_id = np.argsort(stable_keys(np.asarray(group.column(pair_col).to_pylist())), kind="stable")
    query = int(stable_keys(np.asarray(group.column(query_col)[:1].to_pylist()))[0]) & 0x7FFF_FFFF
    rng = np.random.default_rng([seed, query])
    group = group.take(pa.array(by_id[rng.permutation(rows)]))
    runs = np.arange(rows) // docs_per_query
    keys = rng.integers(0, 2**62, size=int(runs[-1]) + 1, dtype=np.int64)
    return group.append_column(GROUP_KEY, pa.array(keys[runs])).append_column(GROUP_ORDER, pa.array(np.arange(rows)))


def group_by_query(raw, seed: int, docs_per_query: int, query_col: str, pair_col: str, cpus: float, partitions: int):
    """`raw` pairs reordered so that each query's pairs come in runs of `docs_per_query`, the runs in a
    random order drawn from `seed` (see PipelineConfig.docs_per_query); the groupby hashes the
    queries into `partitions` (Ray Data's default of 200 costs seconds of tasks on small data)."""
    grouped = raw.groupby(query_col, num_partitions=partitions).map_groups(
        runs_of_query,
        fn_kwargs={"seed": seed, "docs_per_query": docs_per_query, "query_col": query_col, "pair_col": pair_col},
        batch_format="pyarrow",
        num_cpus=cpus,
    )
    return grouped.sort([GROUP_KEY, GROUP_ORDER]).drop_columns([GROUP_KEY, GROUP_ORDER])


def preprocess(raw, settings: str, pipeline: PipelineConfig, *, seed: int = 0, shuffle: str = "global", files: int = 1):
    """Shuffle `raw` pairs with `seed` (`shuffle`: global, blocks or none; see PipelineConfig), then
    decode, transform and tokenize them in Ray Data tasks. Lazy: runs each time it is consumed, in
    the same order. (For blocks, the files' order is drawn where they are read.)"""
    from ray.data import TaskPoolStrategy

    if pipeline.docs_per_query > 1 and shuffle != "none":
        data_cfg = json.loads(settings)["data_cfg"]
        raw = group_by_query(
            raw,
            seed,
            pipeline.docs_per_query,
            data_cfg["query_id_column"],
            data_cfg["pair_id_column"],
            pipeline.cpus_per_task,
            max(1, min(200, files)),
        )
    elif shuffle == "global":
        raw = raw.random_shuffle(seed=seed, num_cpus=pipeline.cpus_per_task)
    elif shuffle == "blocks":
        pair_col = json.loads(settings)["data_cfg"]["pair_id_column"]
        raw = raw.map_batches(
            shuffle_block_rows,
            fn_kwargs={"seed": seed, "pair_col": pair_col},
            batch_size=None,
            batch_format="pyarrow",
            num_cpus=pipeline.cpus_per_task,
        )
    # Blocks of one preprocessing batch: the preprocessing streams (the first batches reach the
    # trainers while later ones are decoded) and the split can hand every worker a share even of a
    # small dataset. A whole file or shuffle partition is one block otherwise.
    raw = raw.repartition(target_num_rows_per_block=pipeline.preprocess_batch_size)
    ds = raw.map_batches(
        preprocess_batch,
        fn_kwargs={"settings": settings, "seed": seed},
        compute=TaskPoolStrategy(size=pipeline.preprocess_tasks),
        num_cpus=pipeline.cpus_per_task,
        batch_size=pipeline.preprocess_batch_size,
        batch_format="numpy",
    )
    # Blocks leave in a fixed order, so the split hands each worker the same rows every time
    # (it gives the next block to the worker with the fewest rows so far).
    ds.context.execution_options.preserve_order = True
    # A DataError (an image that does not decode) reaches the trainers as itself, not as Ray Data's
    # UserCodeException, which keeps only its text: training then fails at once naming the pair.
    ds.context.raise_original_map_exception = True
    return ds


def build_dataset(source: PairSource, *, seed: int = 0, shuffle: bool = True):
    """The preprocessed Ray Dataset of `source`'s pairs, shuffled with `seed` as its pipeline says
    (lazy); in file order without `shuffle`."""
    return _shuffled_dataset(source, seed, shuffle_mode(source) if shuffle else "none")


def _shuffled_dataset(source: PairSource, seed: int, mode: str):
    raw, settings = read_training_pairs(source, file_order_seed=seed if mode == "blocks" else None)
    return preprocess(raw, settings, source.pipeline, seed=seed, shuffle=mode, files=len(source.files))


def epoch_dataset_name(epoch: int) -> str:
    """The Ray Train dataset that epoch `epoch` (from 0) reads."""
    return f"train_epoch_{epoch}"


def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffle seed of epoch `epoch`: a function of the job's seed and the epoch only."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{epoch}".encode(), digest_size=4).digest(), "little")


def epoch_datasets(source: PairSource, *, epochs: int, seed: int = 0) -> dict:
    """One lazy dataset per epoch, each shuffled with `epoch_seed(seed, epoch)`.

    Epoch e's order, and so each worker's batches, depend only on the seed and e: a run resumed
    at epoch e trains on the same batches as an uninterrupted one, and every epoch has its own
    shuffle. (Ray Data reseeds a single dataset per execution, counting from 0 in every new
    worker group, which a resumed run would restart.)
    """
    mode = shuffle_mode(source)  # once: `auto` asks storage for every file's size
    return {epoch_dataset_name(e): _shuffled_dataset(source, epoch_seed(seed, e), mode) for e in range(epochs)}


def equal_split_data_config():
    """Ray Train DataConfig that splits the training datasets (`train*`) into equal shards, one per
    worker, always in the same way.

    Equal, so that every rank has the same number of full batches (gcl.data.batches: an epoch
    trains full batches only; the fewer than `workers` rows the split leaves out wait for the
    next epoch's shuffle). Unlike Ray Train's default split, without locality hints: which rows
    a worker gets must not depend on which node made them, or a run would not repeat.
    """
    from ray.train import DataConfig as RayDataConfig

    class EqualSplit(RayDataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            output = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                if name.startswith("train"):
                    for i, split in enumerate(ds.streaming_split(world_size, equal=True)):
                        output[i][name] = split
                else:
                    for i in range(world_size):
                        output[i][name] = ds.iterator()
            return output

    return EqualSplit()
