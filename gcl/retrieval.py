"""Full-corpus retrieval evaluation: encode queries and documents, exact top-k, metrics.

An evaluation split is a set of scored pairs (the ground truth); its distinct documents
form the corpus and its distinct queries the query set. Embeddings are fused across
fields exactly as in training.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Mapping

import numpy as np
import pandas as pd
import torch
from pydantic import Field, model_validator

from gcl.config import FieldsConfig, Section
from gcl.data.keys import stable_keys
from gcl.data.readers import DataError, field_text, image_base_dir, image_bytes, resolve_files
from gcl.data.schema import DataConfig
from gcl.loss import fuse_fields
from gcl.metrics import evaluate

log = logging.getLogger(__name__)


class EvalConfig(Section):
    """Retrieval evaluation after each epoch and in `gcl evaluate`."""

    k: int = Field(1000, ge=1)
    """Documents retrieved per query."""
    measures: list[str] = Field(
        default_factory=lambda: ["ndcg@10", "map@1000", "mrr@1000", "recall@10", "p@10", "err", "rbp@0.8"]
    )
    """Metrics to report (see gcl.metrics)."""
    grade_column: str = "score_linear"
    """Column holding each judged pair's relevance grade (gain for NDCG, ERR and RBP)."""
    relevance_level: float = Field(1e-6, gt=0)
    """Grade at or above which a judged document counts as relevant for MAP, MRR, Recall and P
    (default: any positive grade)."""
    batch_size: int = Field(256, ge=1)
    """Rows encoded per forward pass."""
    chunk_size: int = Field(2048, ge=1)
    """Documents scored at once in top-k search."""
    query_block: int = Field(1024, ge=1)
    """Most queries a search thread scores at once; search memory is bounded by query_block x
    (chunk_size scores + a 2k-slot reservoir) per thread."""
    objective: str = "ndcg@10"
    """The measure that ranks runs, sweep trials and registered versions (one of `measures`)."""
    objective_splits: list[str] = Field(default_factory=list)
    """Splits the objective averages over (empty: every evaluation split), so that a setting that
    wins in-domain but collapses on novel queries does not win."""
    every_n_epochs: int = Field(1, ge=1)
    """Full evaluation after every n-th epoch and after the last; the epochs between get the quick
    evaluation (sample_queries) or none."""
    before_training: bool = True
    """Evaluate the starting model before the first step, logged as epoch 0 (step 0), so that a
    run shows its own gain; skipped by sweep trials, which all start from the same model."""
    sample_queries: int | None = Field(None, ge=1)
    """Quick evaluation between full ones: a seeded sample of this many queries per split (the same
    ones every epoch; e.g. 2,000, as the GCL paper's evaluation samples), searched against the
    split's whole corpus. Logged as sample/<split>/<measure>, with eval_sample_queries; the
    objective of such an epoch is the sample's."""

    @model_validator(mode="after")
    def _objective_is_measured(self) -> EvalConfig:
        if self.objective not in self.measures:
            raise ValueError(f"eval.objective={self.objective!r} is not in eval.measures: {self.measures}")
        return self

    def objective_name(self) -> str:
        """e.g. 'mean ndcg@10 over in_domain, zero_shot' (or 'over all splits')."""
        splits = ", ".join(self.objective_splits) if self.objective_splits else "all splits"
        return f"mean {self.objective} over {splits}"


def exact_top_k(
    queries: torch.Tensor, docs: torch.Tensor, k: int, chunk_size: int = 2048, query_block: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by inner product (cosine for normalized embeddings), in bounded memory.

    queries: (Q, D), docs: (N, D). Returns (scores (Q, k'), indices (Q, k')) with k' = min(k, N),
    best first. Each thread takes a block of up to `query_block` queries and scores it against
    the corpus in chunks of `chunk_size` documents: besides the inputs and outputs, memory is one
    (block x chunk_size) score buffer and a 2k-slot reservoir per query of the block, per thread.
    A compiled kernel (gcl.reservoir) reads each chunk's scores once, keeping only the scores
    above the query's k-th best so far, as FAISS's exact index does for large k. A NaN score
    never ranks; a query with fewer than k finite scores is an error.
    """
    import numba  # imported here, with the kernel, so that importing gcl does not import numba
    import scipy.linalg.cython_blas  # noqa: F401  loads the BLAS numba's np.dot calls, for threadpool_limits
    from threadpoolctl import threadpool_limits

    from gcl.reservoir import search

    n_queries, n_docs = queries.shape[0], docs.shape[0]
    k = min(k, n_docs)
    # The kernel runs on torch's thread count, so that a Ray worker's thread budget holds for it.
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(threads)
    # Blocks small enough that every thread has one, but no larger than query_block.
    block = max(1, min(query_block, -(-n_queries // threads)))
    query_array = np.ascontiguousarray(queries.detach().cpu().float().numpy())
    doc_array = np.ascontiguousarray(docs.detach().cpu().float().numpy())
    out_scores = np.empty((n_queries, k), dtype=np.float32)
    out_index = np.empty((n_queries, k), dtype=np.int64)
    found = np.empty(n_queries, dtype=np.int64)
    with threadpool_limits(1, user_api="blas"):  # each kernel thread runs its own product
        search(query_array, doc_array, k, chunk_size, block, out_scores, out_index, found)
    if (found < k).any():  # every finite score enters until a reservoir holds k
        raise ValueError(
            f"exact_top_k: query {int(np.argmax(found < k))} has NaN or -inf scores: "
            "its embedding or the documents' are not finite (a diverged model?)"
        )
    return torch.from_numpy(out_scores), torch.from_numpy(out_index)


def load_split(
    files: list[str], data: DataConfig, fields: FieldsConfig, grade_column: str, shard: tuple[int, int] = (0, 1)
):
    """(queries, documents, qrels) of an evaluation split stored in `files`.

    queries / documents: DataFrames of distinct ids with their side's field columns, only those
    whose ids fall to shard (rank, world) (`shard_of`); qrels: {query id: {document id: grade}} as
    strings, for the whole split. Read a batch at a time: a shard holds only its own fields.
    """
    from gcl.data.units import plan_units, unit_batches

    qcol, dcol = data.query_id_column, data.document_id_column
    rank, world = shard
    ids = list(dict.fromkeys([qcol, dcol, grade_column]))
    query_parts, doc_parts, qrels = [], [], {}
    for file in files:
        for unit in plan_units(file, 1)[1]:
            for _, batch in unit_batches(unit, list(dict.fromkeys([*ids, *fields.left, *fields.right]))):
                pairs = batch.to_pandas()
                for q, d, g in zip(
                    pairs[qcol].astype(str), pairs[dcol].astype(str), pairs[grade_column].astype(float), strict=True
                ):
                    qrels.setdefault(q, {})[d] = g
                query_parts.append(pairs.loc[shard_of(pairs[qcol], world) == rank, [qcol, *fields.left]])
                doc_parts.append(pairs.loc[shard_of(pairs[dcol], world) == rank, [dcol, *fields.right]])
    queries = pd.concat(query_parts).drop_duplicates(qcol).reset_index(drop=True)
    documents = pd.concat(doc_parts).drop_duplicates(dcol).reset_index(drop=True)
    return queries, documents, qrels


def shard_of(ids, world: int) -> np.ndarray:
    """The rank (of `world`) that encodes each id's query or document in a sharded evaluation."""
    from gcl.data.keys import stable_keys

    return stable_keys(np.asarray(ids)) % world if world > 1 else np.zeros(len(ids), np.int64)


class RowEncoder:
    """Encodes DataFrame rows of one side into fused embeddings, as in training."""

    def __init__(
        self,
        encoder: torch.nn.Module,
        tokenizer: Callable,
        image_transform: Callable,
        fields: FieldsConfig,
        base_dir: str | None = None,
        features=None,
        id_columns: Mapping[str, str] | None = None,
    ):
        """features: a gcl.data.locked_features.FeatureStore whose fields are looked up by the rows'
        ids (`id_columns`: side -> column) instead of encoded (locked towers', in training's
        evaluations)."""
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.image_transform = image_transform
        self.fields = fields
        self.base_dir = base_dir
        self.features, self.id_columns = features, dict(id_columns or {})

    @classmethod
    def from_model_dir(
        cls, model_dir: str, fields: FieldsConfig | None = None, device: torch.device | str | None = None
    ) -> RowEncoder:
        """The encoder of an exported gcl model (`gcl evaluate`, the served MLflow model): its
        weights, preprocessing and field config (`gcl_fields.json`, or `fields` for a plain
        open_clip directory without one). device: by default the first GPU where CUDA is
        available (hide the GPUs with CUDA_VISIBLE_DEVICES= to stay on the CPU), else the CPU;
        a large corpus encodes many times faster on a GPU. Embeddings come back on the CPU."""
        import os

        from gcl.model import FIELDS_FILE, ModelConfig, trained_fields

        fields = trained_fields(model_dir, fields)
        if fields is None:
            raise FileNotFoundError(f"{os.path.join(model_dir, FIELDS_FILE)} is missing: not a model exported by gcl")
        return cls.from_model(ModelConfig(pretrained=model_dir), fields, device)

    @classmethod
    def from_model(cls, cfg, fields: FieldsConfig, device: torch.device | str | None = None) -> RowEncoder:
        """The encoder of the open_clip model `cfg` (a gcl.model.ModelConfig: an architecture with a
        pretrained tag or weights file, or an exported directory), fed as `fields` say; device as
        in from_model_dir."""
        from gcl.model import FieldEncoder, create_model, create_preprocessing

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        tokenizer, _, transform = create_preprocessing(cfg)
        encoder = FieldEncoder(create_model(cfg).clip, fields.modalities()).to(device).eval()
        return cls(encoder, tokenizer, transform, fields)

    def _field_tensor(self, modality: str, values) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        if modality == "text":
            texts = [field_text(v) for v in values]
            return self.tokenizer([t or "" for t in texts]), torch.tensor([t is not None for t in texts])
        images = []
        for v in values:
            raw = image_bytes(v, self.base_dir)
            images.append(None if raw is None else self.image_transform(Image.open(io.BytesIO(raw)).convert("RGB")))
        shape = next((im.shape for im in images if im is not None), None)
        present = torch.tensor([im is not None for im in images])
        if shape is None:
            return torch.zeros(len(values), 1), present
        return torch.stack([im if im is not None else torch.zeros(shape) for im in images]), present

    @torch.no_grad()
    def encode(self, rows: pd.DataFrame, side: str, batch_size: int = 256) -> torch.Tensor:
        """rows: a DataFrame with the side's field columns. Returns (N, D) fused, L2-normalized."""
        specs = getattr(self.fields, side)
        weights = self.fields.weights(side)
        out = []
        for start in range(0, len(rows), batch_size):
            chunk = rows.iloc[start : start + batch_size]
            inputs, present = {}, {}
            for name, spec in specs.items():
                if self.features is not None and name in self.features.side_of:
                    keys = stable_keys(chunk[self.id_columns[side]].to_numpy())
                    features, shown = self.features.lookup(name, keys)
                    inputs[name], present[name] = torch.from_numpy(features), torch.from_numpy(shown)
                    continue
                inputs[name], present[name] = self._field_tensor(spec.modality, chunk[name].tolist())
            usable = {n: t for n, t in inputs.items() if present[n].any()}
            embeddings, _ = self.encoder(usable)
            embeddings = {n: e.cpu() for n, e in embeddings.items()}  # the search runs on the CPU
            dim = next(iter(embeddings.values())).shape[1]
            for name in inputs:
                embeddings.setdefault(name, torch.zeros(len(chunk), dim))
            out.append(fuse_fields(embeddings, weights, present).float())
        return torch.cat(out)


def sample_query_ids(qrels: Mapping[str, object], count: int, seed: int) -> set[str]:
    """`count` of the split's query ids (all when there are no more), chosen by a seeded hash of
    the ids: the same ones in every epoch, run and shard, whatever the order they were read in."""
    if len(qrels) <= count:
        return set(qrels)
    from gcl.data.splits import unit_interval

    ids = np.array(sorted(qrels), dtype=object)
    return set(ids[np.argsort(unit_interval(ids, seed, "eval_sample"), kind="stable")[:count]].tolist())


def prepare_split(
    row_encoder: RowEncoder,
    spec: str,
    data: DataConfig,
    cfg: EvalConfig,
    sample: int | None,
    seed: int,
    shard: tuple[int, int] = (0, 1),
):
    """(queries, documents, qrels) of a split for evaluation: a shard of them, and a seeded
    `sample` of the queries (with their qrels only) when asked; sets the encoder's image base."""
    files = resolve_files(spec)
    queries, documents, qrels = load_split(files, data, row_encoder.fields, cfg.grade_column, shard)
    if sample:
        kept = sample_query_ids(qrels, sample, seed)
        queries = queries[queries[data.query_id_column].astype(str).isin(kept)].reset_index(drop=True)
        qrels = {q: docs for q, docs in qrels.items() if q in kept}
    row_encoder.base_dir = image_base_dir(files[0], data.image_root)
    return queries, documents, qrels


def evaluate_split(
    row_encoder: RowEncoder, spec: str, data: DataConfig, cfg: EvalConfig, sample: int | None = None, seed: int = 0
) -> dict[str, float]:
    """Retrieve the split's corpus for each of its queries (a seeded `sample` of them) and score the
    ranking."""
    queries, documents, qrels = prepare_split(row_encoder, spec, data, cfg, sample, seed)
    q_emb = row_encoder.encode(queries, "left", cfg.batch_size)
    d_emb = row_encoder.encode(documents, "right", cfg.batch_size)
    scores, index = exact_top_k(q_emb, d_emb, cfg.k, cfg.chunk_size, cfg.query_block)
    doc_ids = documents[data.document_id_column].astype(str).to_numpy()
    run = {
        str(qid): dict(zip(doc_ids[idx].tolist(), sc.tolist(), strict=True))
        for qid, idx, sc in zip(queries[data.query_id_column], index.numpy(), scores.numpy(), strict=True)
    }
    return evaluate(judged_queries(qrels, spec, cfg), run, cfg.measures, relevance_level=cfg.relevance_level)


def judged_queries(qrels: dict[str, dict[str, float]], spec: str, cfg: EvalConfig) -> dict[str, dict[str, float]]:
    """The qrels of the queries with at least one relevant document (grade >= relevance_level).

    A query without one has no right answer: NDCG, MAP and MRR are undefined for it, and counting
    it as 0 would lower every model's score alike. It is left out of the means, with a warning
    giving the count; a split where no query has one is an error.
    """
    judged = {q: docs for q, docs in qrels.items() if max(docs.values()) >= cfg.relevance_level}
    if not judged:
        raise DataError(
            f"{spec}: no query has a document with {cfg.grade_column} >= {cfg.relevance_level} "
            f"(eval.relevance_level): nothing to evaluate; check eval.grade_column"
        )
    if len(judged) < len(qrels):
        example = next(q for q in qrels if q not in judged)
        log.warning(
            "%s: %d of %d queries have no document with %s >= %g and are left out of the means (e.g. query %s)",
            spec,
            len(qrels) - len(judged),
            len(qrels),
            cfg.grade_column,
            cfg.relevance_level,
            example,
        )
    return judged


def evaluate_splits(
    row_encoder: RowEncoder,
    splits: Mapping[str, str],
    data: DataConfig,
    cfg: EvalConfig,
    sample: int | None = None,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """{split: {measure: value}} for every evaluation split (on a seeded `sample` of its queries)."""
    return {name: evaluate_split(row_encoder, spec, data, cfg, sample, seed) for name, spec in splits.items()}


def mean_over_splits(results: Mapping[str, Mapping[str, float]], measure: str) -> float:
    """A measure averaged over splits (the default tuning objective uses ndcg@10)."""
    return float(np.mean([r[measure] for r in results.values()]))


def objective_value(results: Mapping[str, Mapping[str, float]], cfg: EvalConfig) -> float:
    """The configured objective: `cfg.objective` averaged over `cfg.objective_splits` (or all)."""
    splits = cfg.objective_splits or list(results)
    missing = [s for s in splits if s not in results]
    if missing:
        raise ValueError(f"eval.objective_splits: {missing} not evaluated; evaluated splits: {list(results)}")
    return mean_over_splits({s: results[s] for s in splits}, cfg.objective)
