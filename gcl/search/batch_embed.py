"""`gcl embed`: a catalog's embeddings as a Ray Data batch-inference job.

Read tasks read the input's row groups (parquet, CSV or JSONL; local or a URI); an actor pool,
each actor holding the model once (one GPU each with `scaling.use_gpu`; the driver fetches the
model and hands its files to the actors through Ray's object store), embeds the rows as the
served model does (gcl.retrieval.RowEncoder); the output is parquet (or a Lance dataset): the id
column, a fixed-size float32 `embedding` column and any `keep` columns, with the model's URI and
version in each file's metadata. No row passes through the driver, only counts.

Rows are checked first, as `gcl data validate` checks them (an id, a value in a field of the
side, images that decode), in Ray Data tasks: bad rows stop the job before the model loads, named
by file, row and column, or are skipped and counted with `data.on_bad_rows: skip`.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import threading

import numpy as np
import pyarrow as pa

from gcl.config import FieldsConfig
from gcl.errors import ConfigError, ModelError
from gcl.job_config import EmbedConfig
from gcl.outputs import OutputKind, check_output, replaced_whole

log = logging.getLogger(__name__)
EMBEDDING_COLUMN = "embedding"
METADATA_KEY = b"gcl"  # each output file's metadata: model URI and version, side, id column, dim
SUMMARY_FILE = "_gcl_embeddings.json"  # the same with the counts, next to the parquet files
EMBED_OUTPUT = OutputKind("a finished gcl embed output", "embed.out (--out)", SUMMARY_FILE)


def pinned_model(model: str, tracking_uri: str) -> tuple[str, str | None]:
    """(a URI that names one model version for good, that version) for `model`: an alias
    (models:/name@alias) is resolved to its version now, so that every actor loads the same one
    and the output names it; other references stay as they are (version None)."""
    if not model.startswith("models:/") or "@" not in model:
        version = model.rstrip("/").rsplit("/", 1)[-1] if model.startswith("models:/") else None
        return model, version
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name, alias = model.removeprefix("models:/").split("@", 1)
    try:
        version = MlflowClient(tracking_uri).get_model_version_by_alias(name, alias.strip("/")).version
    except MlflowException as err:
        raise ModelError(f"--model {model}: no such registered model or alias in {tracking_uri} ({err})") from err
    return f"models:/{name}/{version}", str(version)


def _row_counter():
    import ray

    @ray.remote(num_cpus=0)
    class RowCounter:
        """Rows embedded so far, posted by the actors; read by the driver's progress bar."""

        def __init__(self) -> None:
            self.rows = 0

        def add(self, rows: int) -> None:
            self.rows += rows

        def read(self) -> int:
            return self.rows

    return RowCounter.remote()


class Embedder:
    """A Ray Data actor: loads the model once, then embeds batches of rows of one side."""

    def __init__(
        self,
        model_files: list,
        fields: dict,
        side: str,
        id_column: str,
        keep: list[str],
        batch_size: int,
        base_dir: str | None,
        threads: int,
        use_gpu: bool,
        metadata: bytes,
        counter,
    ):
        import tempfile

        import ray
        import torch

        from gcl.retrieval import RowEncoder

        torch.set_num_threads(threads)
        self.scratch = tempfile.TemporaryDirectory(prefix="gcl-embed-")
        model_dir = _write_files(ray.get(model_files[0]), self.scratch.name)  # [ref]: Ray passes it unresolved
        device = "cuda" if use_gpu else "cpu"
        self.encoder = RowEncoder.from_model_dir(model_dir, fields=FieldsConfig(**fields), device=device)
        self.encoder.base_dir = base_dir
        self.side, self.id_column, self.keep, self.batch_size = side, id_column, keep, batch_size
        self.metadata, self.counter = metadata, counter

    def __call__(self, batch: pa.Table) -> pa.Table:
        frame = batch.to_pandas()
        vectors = self.encoder.encode(frame, self.side, self.batch_size).numpy().astype(np.float32)
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
        out = pa.table(
            {
                self.id_column: batch.column(self.id_column),
                EMBEDDING_COLUMN: embedding,
                **{c: batch.column(c) for c in self.keep},
            }
        )
        if self.counter is not None:
            self.counter.add.remote(len(frame))
        return out.replace_schema_metadata({METADATA_KEY: self.metadata})


def _read_units(batch: dict, units: list, columns: list[str], skip: dict[str, set[int]]):
    """The rows of the batch's units (only `columns`), without those in `skip` ({file: rows})."""
    from gcl.data.units import unit_batches

    for i in batch["unit"]:
        unit = units[int(i)]
        bad = skip.get(unit.file, ())
        for offset, part in unit_batches(unit, columns):
            table = pa.Table.from_batches([part])
            if bad:
                rows = np.arange(offset, offset + part.num_rows)
                table = table.filter(pa.array(~np.isin(rows, list(bad))))
            if table.num_rows:
                yield table


def _check_units(batch: dict, units: list, rules, side: str, id_column: str, listed: int | None) -> dict:
    from gcl.data.readers import image_base_dir
    from gcl.data.row_checks import CheckResult, check_side_batch
    from gcl.data.units import unit_batches

    results = []
    for i in batch["unit"]:
        unit, result = units[int(i)], CheckResult(listed=listed)
        base_dir = image_base_dir(unit.file, rules.data.image_root)
        for offset, part in unit_batches(unit, [id_column, *getattr(rules.fields, side)]):
            check_side_batch(unit.file, offset, part, rules, side, id_column, base_dir, result)
        results.append(pickle.dumps(result))
    return {"result": np.array(results, dtype=object)}


def check_rows(spec: str, units: list, files: list[str], rules, side: str, id_column: str, cpus: float):
    """Every row's checks, as Ray Data tasks over the units: a ValidationReport; DataError listing
    the first bad rows unless data.on_bad_rows is skip (then all of them are listed, to skip)."""
    from gcl.data.row_checks import CheckResult
    from gcl.data.units import units_dataset
    from gcl.data.validate import MAX_LISTED, ValidationReport, bad_rows_error

    listed = None if rules.data.on_bad_rows == "skip" else MAX_LISTED
    found = CheckResult(listed=None)
    checks = units_dataset(len(units)).map_batches(
        _check_units,
        fn_kwargs={"units": units, "rules": rules, "side": side, "id_column": id_column, "listed": listed},
        batch_size=1,
        num_cpus=cpus,
    )
    for row in checks.iter_rows():
        found.add(pickle.loads(row["result"]))
    order = {f: i for i, f in enumerate(files)}
    report = ValidationReport(
        files=files,
        rows=found.rows,
        bad=sorted(found.bad, key=lambda b: (order[b.file], b.row)),
        bad_rows=found.bad_rows,
        reason_counts=found.reasons,
    )
    if report.bad_rows and rules.data.on_bad_rows == "error":
        raise bad_rows_error(spec, report)
    if report.bad_rows:
        log.warning("%s: skipping bad rows: %s", spec, report.summary())
    return report


def embed_rows(job, cfg: EmbedConfig, tracking_uri: str, use_gpu: bool = False, progress=None) -> dict:
    """Embed `cfg.input` with `cfg.model` into `cfg.out` (see the module docstring); returns a summary
    (rows, bad rows, model URI and version, dimension, output). `progress(rows_done, rows_total)` is
    called from a thread while the job runs."""
    import tempfile

    from gcl import storage
    from gcl.data.readers import image_base_dir, resolve_files
    from gcl.data.row_checks import RowRules
    from gcl.data.units import plan_units
    from gcl.data.validate import check_schema
    from gcl.model import CONFIG_FILE, trained_fields
    from gcl.model_refs import resolve_model_dir

    for key in ("model", "input", "out"):
        if not getattr(cfg, key):
            raise ConfigError(f"embed.{key} is not set: give --{key} (or embed.{key} in the config)")
    if not cfg.out.rstrip("/").endswith(".lance"):  # Lance's own create mode refuses an existing dataset
        check_output(cfg.out, EMBED_OUTPUT, inputs=[cfg.input])
    model_uri, version = pinned_model(cfg.model, tracking_uri)
    # The model is fetched here, once: the actors get its files through Ray's object store, so the
    # tracking store is not asked by every actor, and may go away once Ray work has started.
    with tempfile.TemporaryDirectory(prefix="gcl-embed-") as scratch:
        model_dir = resolve_model_dir(model_uri, scratch, tracking_uri, fallback_job=job)
        fields = trained_fields(model_dir, job.fields)
        with open(os.path.join(model_dir, CONFIG_FILE)) as f:
            dim = int(json.load(f)["model_cfg"]["embed_dim"])
        model_files = _read_files(model_dir)
    id_column = cfg.id_column or (job.data.document_id_column if cfg.side == "right" else job.data.query_id_column)
    files = resolve_files(cfg.input)
    rules = RowRules(job.data, fields, weight_key="")
    expected = {c: w for c, w in rules.expected_columns().items() if c in {id_column, *getattr(fields, cfg.side)}}
    units = []
    for file in files:
        schema, file_units = plan_units(file, 4096)
        check_schema(file, schema, expected)
        missing = [c for c in cfg.keep if c not in schema.names]
        if missing:
            raise ConfigError(f"embed.keep: {file} has no column(s) {missing}; it has {schema.names}")
        units.extend(file_units)
    import ray

    from gcl.cluster import init_ray

    init_ray()  # the first Ray work, once the model and the input's files and columns have been checked
    model_ref = ray.put(model_files)
    del model_files
    report = check_rows(cfg.input, units, files, rules, cfg.side, id_column, job.pipeline.cpus_per_task)
    skip: dict[str, set[int]] = {}
    for bad in report.bad:
        skip.setdefault(bad.file, set()).add(bad.row)
    metadata = json.dumps(
        {
            "model_uri": model_uri,
            "model_version": version,
            "side": cfg.side,
            "dim": dim,
            "id_column": id_column,
            "fields": fields.model_dump(),
            "input": cfg.input,
        }
    ).encode()
    columns = list(dict.fromkeys([id_column, *getattr(fields, cfg.side), *cfg.keep]))
    summary = {
        "rows": report.rows_valid,
        "bad_rows": report.bad_rows,
        "bad_reasons": dict(report.reasons()),
        "model_uri": model_uri,
        "model_version": version,
        "dim": dim,
        "out": cfg.out,
    }
    counter = _row_counter()
    rows = _read_dataset(units, columns, skip, job.pipeline.cpus_per_task)
    embedded = rows.map_batches(
        Embedder,
        fn_constructor_kwargs=dict(
            model_files=[model_ref],
            fields=fields.model_dump(),
            side=cfg.side,
            id_column=id_column,
            keep=cfg.keep,
            batch_size=cfg.batch_size,
            base_dir=image_base_dir(files[0], job.data.image_root),
            threads=max(1, int(cfg.cpus_per_actor)),
            use_gpu=use_gpu,
            metadata=metadata,
            counter=counter,
        ),
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        compute=_actor_pool(cfg.actors),
        num_cpus=cfg.cpus_per_actor,
        num_gpus=1 if use_gpu else 0,
    )
    with _Polling(counter, report.rows_valid, progress):
        if cfg.out.rstrip("/").endswith(".lance"):
            embedded.write_lance(cfg.out, mode="create")
            return summary
        with replaced_whole(cfg.out) as partial:  # a write that fails (a full disk) leaves the old output
            embedded.write_parquet(partial)
            # Written last: it marks the output whole (gcl index refuses a directory without it).
            storage.write_text(
                storage.join(partial, SUMMARY_FILE), json.dumps({**json.loads(metadata), **summary}, indent=2)
            )
    return summary


def _read_files(directory: str) -> dict[str, bytes]:
    """Every file under `directory`, by its path relative to it."""
    files = {}
    for parent, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(parent, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, directory)] = f.read()
    return files


def _write_files(files: dict[str, bytes], directory: str) -> str:
    """`files` (from _read_files) written under `directory`, which is returned."""
    for relative, data in files.items():
        path = os.path.join(directory, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    return directory


def _read_dataset(units: list, columns: list[str], skip: dict[str, set[int]], cpus: float):
    from gcl.data.units import units_dataset

    return units_dataset(len(units)).map_batches(
        _read_units,
        fn_kwargs={"units": units, "columns": columns, "skip": skip},
        batch_size=1,
        num_cpus=cpus,
        batch_format="numpy",
    )


def _actor_pool(actors: int):
    from ray.data import ActorPoolStrategy

    return ActorPoolStrategy(size=actors)


class _Polling:
    """Calls progress(rows done, rows total) every half second from a thread while the block runs."""

    def __init__(self, counter, total: int, progress):
        self.counter, self.total, self.progress = counter, total, progress
        self.stop = threading.Event()

    def _poll(self) -> None:
        import ray

        while not self.stop.wait(0.5):
            try:
                self.progress(ray.get(self.counter.read.remote(), timeout=10), self.total)
            except Exception:  # a slow cluster: try again at the next poll
                continue

    def __enter__(self):
        if self.progress is not None:
            self.thread = threading.Thread(target=self._poll, name="gcl-embed-progress", daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        import ray

        self.stop.set()
        if self.progress is not None:
            self.thread.join(timeout=15)
            if exc[0] is None:
                self.progress(ray.get(self.counter.read.remote()), self.total)
        ray.kill(self.counter)
