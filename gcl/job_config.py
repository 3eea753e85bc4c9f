"""The whole job's configuration: one section per component, loaded from YAML.

Every key is documented where it is defined; `gcl config --keys` lists them all.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from gcl.config import ConfigError, FieldsConfig, Section
from gcl.data.grades import GradesConfig
from gcl.data.pipeline import PipelineConfig
from gcl.data.schema import DataConfig
from gcl.loss import LossConfig
from gcl.model import ModelConfig
from gcl.retrieval import EvalConfig


class TrainConfig(Section):
    """Optimization."""

    epochs: int = Field(2, ge=1)
    """Passes over the training pairs."""
    batch_size: int = Field(32, ge=2)
    """Pairs per worker per step; in-batch negatives come from all workers' batches together."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches per optimizer step. Negatives stay within each micro-batch (across workers):
    accumulation grows the effective batch for the gradient, not the pool of negatives. Each step
    averages its micro-batches' gradients; an epoch whose steps do not divide by it ends with a
    shorter step, so that checkpoints (every epoch) fall on optimizer steps and resume exactly."""
    embed_chunk: int | None = Field(None, ge=1)
    """Pairs per chunk for cached-gradient steps: each micro-batch is embedded a chunk at a time
    without a graph, the loss is taken over the whole micro-batch (every worker's), and each chunk
    is embedded again with a graph and back-propagated with the loss's gradient. The pool of
    negatives is then the micro-batch while the activations held at once are one chunk's, for
    about one more forward pass per step; the loss and gradients are those of the whole batch.
    null (or the batch size or more): the whole micro-batch at once."""
    lr: float = Field(5e-4, gt=0)
    """Peak learning rate (AdamW)."""
    weight_decay: float = Field(0.1, ge=0)
    """AdamW weight decay (not applied to biases, norms, embeddings' scale or the logit scale)."""
    warmup_steps: int = Field(10, ge=0)
    """Linear warm-up steps before cosine decay to zero."""
    grad_clip: float = Field(1.0, ge=0)
    """Gradient norm clipping (0: off)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """`auto`: bf16 on GPUs that support it, else fp32."""
    max_failures: int = Field(2, ge=0)
    """Times Ray Train restarts the workers from the latest checkpoint after a worker dies."""


class ScalingConfig(Section):
    """How many Ray Train workers and what each gets."""

    num_workers: int = Field(2, ge=1)
    """Data-parallel training workers."""
    use_gpu: bool = False
    """One GPU per worker."""
    cpus_per_worker: float = Field(0.25, gt=0)
    """CPUs reserved per worker (fractional on small machines: leave room for Ray Data)."""
    torch_threads: int = Field(1, ge=1)
    """torch intra-op threads per worker, so workers do not oversubscribe the cores."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """How Ray places the workers on nodes: PACK fills nodes first; SPREAD / STRICT_SPREAD put
    workers on different nodes (STRICT: one per node, or wait until that is possible)."""


class DeepSpeedConfig(Section):
    """DeepSpeed engine settings."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    """ZeRO stage: 0 plain data parallel, 1 optimizer state, 2 + gradients, 3 + parameters sharded."""
    config: str | None = None
    """A DeepSpeed JSON config to start from (e.g. workflows/configs/deepspeed/zero3.json); gcl sets
    batch sizes, clipping, precision and the ZeRO stage from this file's other sections."""


class MlflowConfig(Section):
    """Experiment tracking and the model registry."""

    tracking_uri: str | None = None
    """MLflow tracking URI; null: MLFLOW_TRACKING_URI, else sqlite:///mlruns.db in the working directory
    of the command (resolved there once, and passed as it is to every trial, worker and job)."""
    experiment: str = "gcl"
    """MLflow experiment name."""
    registered_model: str | None = None
    """Register the exported model under this name (null: do not register)."""
    flush_seconds: float = Field(10.0, gt=0)
    """Training writes its metrics to MLflow at least this often (and every 200 metrics). While the
    store cannot be reached they wait in <storage>/<name>/tracking_buffer/ and are written once it
    answers again, or by `gcl sync`."""
    finish_wait_seconds: float = Field(120.0, ge=0)
    """When training is done but the store cannot be reached, keep trying this long to log the model
    and the run's end before the command ends with exit code 2 and says to run `gcl sync`."""

    def resolved_uri(self) -> str:
        """The tracking URI, which gcl.train.job.resolve_job fills in where the command started: a
        default computed anywhere else (a trial's or a worker's own directory) names another store."""
        if self.tracking_uri is None:
            raise ConfigError(
                "mlflow.tracking_uri is not resolved; resolve the job where the command starts "
                "(gcl.train.job.resolve_job) and pass the resolved job on"
            )
        return self.tracking_uri


class EmbedConfig(Section):
    """`gcl embed`: which model embeds which rows, and where the embeddings go."""

    model: str | None = None
    """The model: models:/<name>@<alias> or /<version>, runs:/<id>/model, or an exported directory."""
    input: str | None = None
    """The rows to embed: parquet, CSV or JSONL (a file, directory or glob; local or a URI)."""
    out: str | None = None
    """Output directory (local or a URI) for parquet files; a path ending in .lance writes a Lance
    dataset instead."""
    side: Literal["left", "right"] = "right"
    """`right`: documents (the model's right-side fields, e.g. title and image); `left`: queries."""
    id_column: str | None = None
    """The rows' id column (default: data.document_id_column, or data.query_id_column for left)."""
    keep: list[str] = Field(default_factory=list)
    """Input columns copied to the output as they are (e.g. a title to display with search results)."""
    batch_size: int = Field(256, ge=1)
    """Rows per forward pass."""
    actors: int = Field(1, ge=1)
    """Embedding actors (model replicas); each holds the model once."""
    cpus_per_actor: float = Field(1.0, gt=0)
    """CPUs reserved per actor; its torch threads are this, rounded down (at least 1)."""


class IndexConfig(Section):
    """The search index `gcl index` builds from `gcl embed`'s output."""

    embeddings: str | None = None
    """`gcl embed`'s output directory (local or a URI)."""
    out: str | None = None
    """Where the index directory goes (local)."""
    display: list[str] = Field(default_factory=list)
    """Columns of the embeddings (carried by embed.keep) stored with the ids and returned with the
    search model's results, e.g. [title]."""

    kind: Literal["flat", "hnsw", "ivf-pq"] = "hnsw"
    """`flat`: exact search (every vector scored; the reference). `hnsw`: a graph, the fastest
    search at high recall, holding every vector (4 x dim bytes each) plus the graph. `ivf-pq`:
    vectors in `ivf_lists` clusters, compressed to `pq_bytes` bytes each, re-ranked exactly over
    the best `refine_factor` x k candidates (which keeps the full vectors too): the kind that
    scales to corpora larger than memory once the re-ranking is turned off (refine_factor=0)."""
    hnsw_m: int = Field(32, ge=4)
    """HNSW: neighbours per node (more: higher recall, more memory, slower build)."""
    hnsw_ef_construction: int = Field(64, ge=8)
    """HNSW: candidates considered while building (more: a better graph, slower build)."""
    hnsw_ef_search: int = Field(128, ge=1)
    """HNSW: candidates considered per query (more: higher recall, slower search; at least k)."""
    ivf_lists: int | None = Field(None, ge=1)
    """IVF: clusters (default: 4 x sqrt(rows), at most rows / 39, FAISS's training minimum)."""
    ivf_probe: int = Field(8, ge=1)
    """IVF: clusters searched per query (more: higher recall, slower search)."""
    pq_bytes: int | None = Field(None, ge=1)
    """PQ: bytes per compressed vector (a divisor of the dimension; default: dimension / 4)."""
    refine_factor: int = Field(10, ge=0)
    """ivf-pq: candidates re-ranked with the full vectors per result (0: no re-ranking, the
    compressed scores are the result)."""
    train_sample: int = Field(100_000, ge=1000)
    """Vectors an ivf-pq index is trained on (a seeded sample of the corpus)."""
    batch_rows: int = Field(65_536, ge=1)
    """Vectors added to the index at once."""


class JobConfig(Section):
    """A gcl job: model, data, loss, training, evaluation, tracking."""

    name: str = "gcl"
    """Run name: MLflow run name and the folder for checkpoints (same name = resume)."""
    seed: int = 0
    """Seed for model init, data order and sampling."""
    storage: str = "gcl_runs"
    """Where checkpoints and Ray results go: a local directory, a shared mount or s3:// / gs://."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    fields: FieldsConfig = Field(default_factory=FieldsConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    grades: GradesConfig = Field(default_factory=GradesConfig)

    @model_validator(mode="after")
    def _check_objective_splits(self) -> JobConfig:
        for key, splits in (("eval", self.data.eval), ("validation", self.data.validation)):
            unknown = [s for s in self.eval.objective_splits if splits and s not in splits]
            if unknown:
                raise ValueError(f"eval.objective_splits: {unknown} are not data.{key} splits: {sorted(splits)}")
        return self

    @model_validator(mode="after")
    def _batches_hold_whole_runs(self) -> JobConfig:
        m = self.pipeline.docs_per_query
        if self.train.batch_size % m:
            raise ValueError(
                f"train.batch_size={self.train.batch_size} is not a multiple of pipeline.docs_per_query={m}: "
                "a batch holds batch_size / docs_per_query queries; "
                f"e.g. train.batch_size={m * max(1, self.train.batch_size // m)}"
            )
        return self

    @model_validator(mode="after")
    def _no_validation_without_evaluation(self) -> JobConfig:
        # data.eval={} turns evaluation off (validation included): nothing is scored or selected.
        if not self.data.eval and self.data.validation:
            self.data = self.data.model_copy(update={"validation": {}})
        return self

    @model_validator(mode="after")
    def _check_field_pair_terms(self) -> JobConfig:
        for i, term in enumerate(self.loss.field_pair_terms):
            if term.left not in self.fields.left:
                raise ValueError(
                    f"loss.field_pair_terms.{i}.left={term.left!r} is not a left field: {sorted(self.fields.left)}"
                )
            if term.right not in self.fields.right:
                raise ValueError(
                    f"loss.field_pair_terms.{i}.right={term.right!r} is not a right field: {sorted(self.fields.right)}"
                )
        return self
