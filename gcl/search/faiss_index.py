"""Approximate-nearest-neighbour indexes (FAISS) over `gcl embed`'s output, saved with their id
map, and searched by the served search model and by `gcl evaluate --index`.

An index directory holds:
  index.faiss   the FAISS index (inner product: cosine on gcl's L2-normalized embeddings)
  ids.parquet   row i of the index is the id (and display fields) of row i here
  index.json    kind, parameters, dimension, rows, the embedding model's URI and version, the
                embeddings' content hash, build seconds and bytes

The embeddings stream into the index a file batch at a time: besides the index itself, the
builder holds one batch of vectors, the id map and, for the trained kinds (ivf-pq), a training
sample of `train_sample` vectors.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gcl.errors import SearchIndexError
from gcl.job_config import IndexConfig
from gcl.outputs import OutputKind, check_output, replaced_whole
from gcl.search.batch_embed import EMBEDDING_COLUMN, METADATA_KEY, SUMMARY_FILE

log = logging.getLogger(__name__)
INDEX_FILE, IDS_FILE, INFO_FILE = "index.faiss", "ids.parquet", "index.json"
INDEX_OUTPUT = OutputKind("a gcl index", "index.out (--out)", INFO_FILE)


def build_faiss(cfg: IndexConfig, dim: int, rows: int, sample):
    """An empty FAISS index of `cfg.kind` for `rows` vectors of `dim`, trained on `sample`
    (a callable returning (n, dim) float32 vectors) where the kind needs training."""
    import faiss

    metric = faiss.METRIC_INNER_PRODUCT
    if cfg.kind == "flat":
        return faiss.IndexFlatIP(dim)
    if cfg.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, metric)
        index.hnsw.efConstruction = cfg.hnsw_ef_construction
        index.hnsw.efSearch = cfg.hnsw_ef_search
        return index
    lists = cfg.ivf_lists or max(1, min(int(4 * np.sqrt(rows)), rows // 39))
    code_bytes = cfg.pq_bytes or max(1, dim // 4)
    if dim % code_bytes:
        raise SearchIndexError(
            f"index.pq_bytes={code_bytes} does not divide the embedding dimension {dim}; "
            f"accepted: a divisor of {dim}, e.g. {dim // 4}"
        )
    index = faiss.index_factory(
        dim, f"IVF{lists},PQ{code_bytes}x8np", metric
    )  # np: no polysemous training (7x the time)
    training = sample()
    if len(training) < lists * 39 and len(training) < rows:
        log.warning("training %d IVF lists on %d vectors (FAISS wants 39 per list)", lists, len(training))
    try:
        index.train(training)
    except RuntimeError as err:  # FAISS's: too few vectors for its lists or its codebooks
        detail = " ".join(str(err).split())[:200]
        raise SearchIndexError(
            f"index.kind={cfg.kind}: {lists} IVF lists and {code_bytes}-byte codes (256 centroids "
            f"each) cannot be trained on {len(training)} vectors ({detail}); for a catalog this "
            "small use index.kind=flat or hnsw, or lower index.ivf_lists"
        ) from None
    faiss.extract_index_ivf(index).nprobe = cfg.ivf_probe
    if cfg.refine_factor:
        index = faiss.IndexRefineFlat(index)
        index.k_factor = cfg.refine_factor
    return index


EMBEDDINGS_ACCEPTED = "the output of `gcl embed` (parquet files with an id, an embedding column and gcl's metadata)"


def embedding_files(spec: str) -> list[str]:
    """The parquet files of `gcl embed`'s output at `spec` (a directory, file or glob), each one's
    footer read now: a file that is not such output is named before any index is built."""
    from gcl.data.readers import resolve_files
    from gcl.errors import DataError

    try:
        found = resolve_files(spec)
    except DataError as err:
        raise SearchIndexError(f"{err}; give {EMBEDDINGS_ACCEPTED}") from None
    # Names starting with _ or . are not data, as for Arrow's and Spark's datasets: gcl embed's own
    # summary (_gcl_embeddings.json), _SUCCESS markers, hidden files.
    found = [f for f in found if not os.path.basename(f).startswith(("_", "."))]
    files = [f for f in found if f.endswith(".parquet")]
    if not files or len(files) < len(found):
        other = sorted(set(found) - set(files))[:3]
        raise SearchIndexError(
            f"{spec}: {'holds ' + ', '.join(other) + ', not parquet' if other else 'no parquet files'}; "
            f"give {EMBEDDINGS_ACCEPTED}"
        )
    for file in files:
        embeddings_info([file])
    _check_finished(spec, files)
    return files


def _check_finished(spec: str, files: list[str]) -> None:
    """A directory from `gcl embed` is whole: its summary, written last, is there and counts the
    rows its files hold (a run that failed while writing, e.g. on a full disk, wrote no summary)."""
    if not os.path.isdir(spec):
        return
    summary_path = os.path.join(spec, SUMMARY_FILE)
    try:
        with open(summary_path) as f:
            expected = int(json.load(f)["rows"])
    except (OSError, ValueError, KeyError, TypeError):
        raise SearchIndexError(
            f"{spec}: no readable {SUMMARY_FILE}: `gcl embed` did not finish writing these embeddings; "
            "run it again (into a new or the same directory)"
        ) from None
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    if rows != expected:
        raise SearchIndexError(
            f"{spec}: its files hold {rows} rows where {SUMMARY_FILE} counts {expected}: files "
            "were lost or added since `gcl embed` wrote them; run it again"
        ) from None


def embeddings_info(files: list[str]) -> dict:
    """What `gcl embed` recorded about its output (model URI and version, side, id column, dim)."""
    try:
        schema = pq.read_schema(files[0])
    except (pa.ArrowException, OSError) as err:
        raise SearchIndexError(
            f"{files[0]}: cannot be read as parquet ({' '.join(str(err).split())[:200]}); give {EMBEDDINGS_ACCEPTED}"
        ) from None
    metadata = schema.metadata or {}
    if METADATA_KEY not in metadata or EMBEDDING_COLUMN not in schema.names:
        raise SearchIndexError(f"{files[0]}: no gcl metadata: not written by `gcl embed`; give {EMBEDDINGS_ACCEPTED}")
    return json.loads(metadata[METADATA_KEY])


def _vectors(batch: pa.RecordBatch, file: str, dim: int) -> np.ndarray:
    column = batch.column(EMBEDDING_COLUMN)
    if column.null_count:
        raise SearchIndexError(f"{file}: {column.null_count} rows have no {EMBEDDING_COLUMN}")
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)


def _batches(files: list[str], columns: list[str], batch_rows: int):
    for file in files:
        for batch in pq.ParquetFile(file).iter_batches(batch_rows, columns=columns):
            yield file, batch


def _sample(files: list[str], dim: int, rows: int, count: int, batch_rows: int, seed: int = 0) -> np.ndarray:
    """A seeded uniform sample of `count` of the corpus's `rows` vectors, read a batch at a time."""
    chosen = np.sort(np.random.default_rng(seed).choice(rows, min(count, rows), replace=False))
    parts, offset = [], 0
    for file, batch in _batches(files, [EMBEDDING_COLUMN], batch_rows):
        local = chosen[(chosen >= offset) & (chosen < offset + batch.num_rows)] - offset
        if len(local):
            parts.append(_vectors(batch, file, dim)[local])
        offset += batch.num_rows
    return np.concatenate(parts)


def build_index(cfg: IndexConfig) -> dict:
    """Build a `cfg.kind` index of `cfg.embeddings` (`gcl embed`'s output) in `cfg.out`, with the
    id map and `cfg.display` columns (carried by `gcl embed --keep`); returns
    index.json's contents. An id that comes back (a catalog read from pairs, where a document
    appears once per query) is indexed once, from its first row; how many rows repeated an id is
    logged and recorded as `repeated_rows`."""
    import faiss

    for key in ("embeddings", "out"):
        if not getattr(cfg, key):
            raise SearchIndexError(f"index.{key} is not set: give --{key} (or index.{key} in the config)")
    embeddings, out_dir, display = cfg.embeddings, cfg.out, list(cfg.display)
    check_output(out_dir, INDEX_OUTPUT, inputs=[embeddings])
    files = embedding_files(embeddings)
    info = embeddings_info(files)
    id_column, dim = info["id_column"], int(info["dim"])
    missing = [c for c in display if c not in pq.read_schema(files[0]).names]
    if missing:
        raise SearchIndexError(
            f"{embeddings}: no column(s) {missing} to display; `gcl embed --keep COLUMN` "
            f"carries input columns; its output has {pq.read_schema(files[0]).names}"
        )
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    start = time.perf_counter()
    first = _first_occurrences(files, id_column, cfg.batch_rows)
    index = build_faiss(cfg, dim, len(first), lambda: _sample(files, dim, rows, cfg.train_sample, cfg.batch_rows))
    digest, kept = hashlib.sha256(), []
    for file, batch, keep in _first_rows(files, [id_column, EMBEDDING_COLUMN, *display], first, cfg.batch_rows):
        vectors = np.ascontiguousarray(_vectors(batch, file, dim)[keep])
        index.add(vectors)
        digest.update(vectors.tobytes())
        kept.append(pa.Table.from_batches([batch]).select([id_column, *display]).filter(pa.array(keep)))
    id_map = pa.concat_tables(kept)
    if id_map.num_rows < rows:
        log.warning(
            "%s: %d of %d rows repeat an id indexed already (a catalog read from pairs?); each id is "
            "indexed once, from its first row",
            embeddings,
            rows - id_map.num_rows,
            rows,
        )
    digest.update(pc.cast(id_map[id_column], pa.string()).to_numpy(zero_copy_only=False).astype(str).tobytes())
    built = {
        **cfg.model_dump(exclude={"embeddings", "out", "display"}),
        "dim": dim,
        "rows": id_map.num_rows,
        "repeated_rows": rows - id_map.num_rows,
        "id_column": id_column,
        "display": display,
        "embeddings": embeddings,
        "corpus_sha256": digest.hexdigest(),
        "build_seconds": time.perf_counter() - start,
        **{k: info[k] for k in ("model_uri", "model_version", "side", "fields") if k in info},
    }
    with _written_whole(out_dir) as partial:
        faiss.write_index(index, os.path.join(partial, INDEX_FILE))
        pq.write_table(id_map, os.path.join(partial, IDS_FILE))
        built["index_bytes"] = os.path.getsize(os.path.join(partial, INDEX_FILE))
        with open(os.path.join(partial, INFO_FILE), "w") as f:
            json.dump(built, f, indent=2)
    return built


@contextlib.contextmanager
def _written_whole(out_dir: str):
    """A directory beside `out_dir` to write into, moved into place once whole (gcl.outputs); a
    write that fails (a full disk) leaves `out_dir` as it was: never a directory that looks like
    an index and is not one."""
    try:
        with replaced_whole(out_dir) as partial:
            os.makedirs(partial)
            yield partial
    except (OSError, RuntimeError) as err:  # RuntimeError: FAISS's writer
        raise SearchIndexError(
            f"{out_dir}: the index could not be written ({' '.join(str(err).split())[:200]}); nothing was written there"
        ) from None


def _first_occurrences(files: list[str], id_column: str, batch_rows: int) -> np.ndarray:
    """Sorted positions (over all `files`, in order) of each id's first row."""
    ids = pa.concat_arrays([b.column(id_column) for _, b in _batches(files, [id_column], batch_rows)])
    table = pa.table({"id": ids, "position": np.arange(len(ids))})
    return np.sort(table.group_by("id", use_threads=False).aggregate([("position", "min")])["position_min"].to_numpy())


def _first_rows(files: list[str], columns: list[str], first: np.ndarray, batch_rows: int):
    """(file, batch of `columns`, mask of the batch's rows that are their id's first) over `files`."""
    offset = 0
    for file, batch in _batches(files, columns, batch_rows):
        yield file, batch, np.isin(np.arange(offset, offset + batch.num_rows), first, assume_unique=True)
        offset += batch.num_rows


class SearchIndex:
    """A saved index with its id map: top-k ids and scores for query embeddings."""

    def __init__(self, directory: str):
        import faiss

        self.check_directory(directory)
        # JSON, FAISS's own format and parquet only: an index directory from elsewhere runs no code.
        try:
            with open(os.path.join(directory, INFO_FILE)) as f:
                self.info = json.load(f)
            self.index = faiss.read_index(os.path.join(directory, INDEX_FILE))
            self.id_map = pq.read_table(os.path.join(directory, IDS_FILE))
        except (ValueError, RuntimeError, pa.ArrowException, OSError) as err:  # JSON, FAISS, parquet
            raise SearchIndexError(
                f"{directory}: cannot be read as an index written by `gcl index` ({' '.join(str(err).split())[:200]})"
            ) from None
        self.ids = self.id_map[self.info["id_column"]].to_numpy(zero_copy_only=False)
        self.display = {c: self.id_map[c].to_numpy(zero_copy_only=False) for c in self.info.get("display", [])}

    @classmethod
    def in_memory(
        cls, ids: np.ndarray, vectors: np.ndarray, id_column: str, display: dict[str, np.ndarray] | None = None
    ) -> SearchIndex:
        """An exact (flat) index of `vectors` held in this process, without a directory: gcl ui's
        search of a small catalog embedded at start."""
        import faiss

        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        index = cls.__new__(cls)
        index.info = {"kind": "flat", "dim": int(vectors.shape[1]), "id_column": id_column, "rows": len(vectors)}
        index.index = faiss.IndexFlatIP(vectors.shape[1])
        index.index.add(vectors)
        index.ids, index.display = np.asarray(ids), dict(display or {})
        return index

    @staticmethod
    def check_directory(directory: str) -> None:
        """A SearchIndexError unless `directory` holds an index written by `gcl index`."""
        if not os.path.isdir(directory):
            raise SearchIndexError(f"{directory}: no such directory; give a directory written by `gcl index`")
        for name in (INDEX_FILE, IDS_FILE, INFO_FILE):
            if not os.path.exists(os.path.join(directory, name)):
                raise SearchIndexError(f"{directory}: no {name}; give a directory written by `gcl index`")

    @property
    def dim(self) -> int:
        return int(self.info["dim"])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries: (Q, dim) L2-normalized. Returns (scores (Q, k'), row positions (Q, k')), best
        first, k' = min(k, rows); a position of -1 is a slot the index could not fill."""
        import faiss

        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise SearchIndexError(f"queries of shape {queries.shape}: this index holds {self.dim}-dimensional vectors")
        k = min(int(k), self.index.ntotal)
        if self.info["kind"] == "hnsw":
            faiss.downcast_index(self.index).hnsw.efSearch = max(self.info["hnsw_ef_search"], k)
        return self.index.search(queries, k)


def corpus_vectors(index: SearchIndex) -> np.ndarray:
    """The (rows, dim) float32 vectors an index was built from, in its row order: reconstructed
    from the index where it holds them exactly (flat, hnsw, ivf-pq with re-ranking), else read
    again from the embeddings it was built from."""
    import faiss

    inner = faiss.downcast_index(index.index)
    if isinstance(inner, faiss.IndexRefineFlat):
        inner = faiss.downcast_index(inner.refine_index)
    if isinstance(inner, faiss.IndexFlat | faiss.IndexHNSWFlat):
        return inner.reconstruct_n(0, inner.ntotal)
    files, batch_rows = embedding_files(index.info["embeddings"]), index.info["batch_rows"]
    first = _first_occurrences(files, index.info["id_column"], batch_rows)
    return np.concatenate(
        [
            _vectors(batch, file, index.dim)[keep]
            for file, batch, keep in _first_rows(files, [EMBEDDING_COLUMN], first, batch_rows)
        ]
    )
