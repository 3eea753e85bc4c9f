"""Generalized Contrastive Learning loss (Clark, Jung, Zhu, 2024; arXiv 2404.08535).

Each (query, document) pair in a batch carries a relevance score that is mapped to a
weight on its contrastive term: a weighted cross-entropy over in-batch negatives, so
that pairs with higher weight incur a greater penalty. Each side may have several
fields (title, image, ...) whose normalized embeddings are fused with field weights.

Distributed: embeddings are gathered from every rank with gradient and each rank scores
its own rows against all columns. With equal per-rank batch sizes, the mean of the
per-rank losses (what data-parallel gradient averaging optimizes) equals the loss of
one process on the concatenated batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from gcl.config import Section

WeightFn = Literal["uniform", "linear", "reciprocal", "power", "exponential"]
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's clamp: logits are at most 100 x cosine


class FieldPairTerm(Section):
    """An extra contrastive term between one left field and one right field (unfused)."""

    left: str
    """Left-side field name, e.g. `query`."""
    right: str
    """Right-side field name, e.g. `title`."""
    weight: float = Field(0.1, ge=0.0)
    """Weight of this term (the mean of its two directions) in the total loss."""


class LossConfig(Section):
    """How relevance becomes weight, and which contrastive terms make up the loss."""

    weight_key: str = "score_linear"
    """Numeric column holding each pair's relevance score or rank position."""
    weight_fn: WeightFn = "linear"
    """Score -> weight: `uniform` (CLIP-style binary baseline), `linear` (min-max to [weight_min, 1]),
    `reciprocal` (1/position), `power` (min-max score ** power_exponent) or `exponential`
    (exp((min-max score - 1) / temperature))."""
    weight_min: float = Field(0.0, ge=0.0, le=1.0)
    """Lowest weight `linear` maps to (the score range's minimum)."""
    score_range: tuple[float, float] | None = None
    """[lowest, highest] score for min-max scaling; null takes it from the training data."""
    power_exponent: float = Field(2.0, gt=0.0)
    """Exponent of the `power` weight function."""
    temperature: float = Field(0.5, gt=0.0)
    """Temperature of the `exponential` weight function (smaller = sharper)."""
    left_to_right: float = Field(0.5, ge=0.0)
    """Weight of the left->right (query->document) term on fused embeddings."""
    right_to_left: float = Field(0.5, ge=0.0)
    """Weight of the right->left (document->query) term on fused embeddings."""
    field_pair_terms: list[FieldPairTerm] = Field(default_factory=list)
    """Extra terms between single fields, e.g. `[{left: query, right: title, weight: 0.1}]`."""
    mask_same_query: bool = True
    """Remove other pairs of the same query from a row's negatives (they are positives too)."""
    mask_same_document: bool = True
    """Remove other pairs of the same document from a row's negatives."""
    init_temperature: float | None = Field(None, gt=0.0)
    """Start the learnable logit scale at 1/init_temperature; null keeps the model's own."""
    target: Literal["diagonal", "listwise"] = "diagonal"
    """`diagonal`: each pair's own document is its row's target, weighted by the pair's weight
    (GCL's pointwise loss; other pairs of the query are masked out with mask_same_query).
    `listwise`: a row's target is every document of its query in the batch (gathered from all
    workers), in proportion to their weights, a softmax cross-entropy against that distribution
    (ListNet-style), so that a query's documents are ranked against each other; the
    document-to-query direction and the field-pair terms likewise (a document's queries in the
    batch). With one document per query in the batch it equals `diagonal`. Pairs with
    pipeline.docs_per_query > 1 put several documents of a query in each batch."""

    @model_validator(mode="after")
    def _check(self) -> LossConfig:
        if self.left_to_right + self.right_to_left + sum(t.weight for t in self.field_pair_terms) <= 0:
            raise ValueError("loss: all term weights are 0 (left_to_right, right_to_left, field_pair_terms)")
        if self.score_range is not None and not self.score_range[0] < self.score_range[1]:
            raise ValueError(
                f"loss.score_range must be [lowest, highest] with lowest < highest, got {self.score_range}"
            )
        return self


def score_to_weight(scores: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """Map relevance scores (or rank positions) to contrastive weights.

    scores: (B,) float. Returns (B,) non-negative weights.
    """
    scores = scores.float()
    if cfg.weight_fn == "uniform":
        return torch.ones_like(scores)
    if cfg.weight_fn == "reciprocal":
        if bool((scores < 1).any()):
            raise ValueError(f"loss.weight_fn=reciprocal needs rank positions >= 1 in {cfg.weight_key!r}")
        return 1.0 / scores
    if cfg.score_range is None:
        raise ValueError(f"loss.weight_fn={cfg.weight_fn} needs loss.score_range (set it, or let training derive it)")
    low, high = cfg.score_range
    unit = ((scores - low) / (high - low)).clamp(0.0, 1.0)
    if cfg.weight_fn == "linear":
        return cfg.weight_min + (1.0 - cfg.weight_min) * unit
    if cfg.weight_fn == "power":
        return unit**cfg.power_exponent
    return torch.exp((unit - 1.0) / cfg.temperature)  # exponential


def fuse_fields(
    embeddings: Mapping[str, torch.Tensor],
    field_weights: Mapping[str, float],
    present: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Weighted sum of normalized field embeddings, normalized again.

    embeddings: name -> (B, D) L2-normalized. present: name -> (B,) bool; a missing value
    gets weight 0 and the row's remaining weights are renormalized. Returns (B, D).
    """
    names = [n for n in field_weights if field_weights[n] > 0]
    stacked = torch.stack([embeddings[n] for n in names], dim=1)  # (B, F, D)
    weights = torch.tensor([field_weights[n] for n in names], dtype=stacked.dtype, device=stacked.device)
    weights = weights.expand(stacked.shape[0], -1)  # (B, F)
    if present is not None:
        mask = torch.stack([present[n] for n in names], dim=1).to(stacked.dtype)
        weights = weights * mask
    total = weights.sum(dim=1, keepdim=True)
    if bool((total <= 0).any()):
        rows = (total.squeeze(1) <= 0).nonzero().flatten().tolist()
        raise ValueError(f"rows {rows[:10]} have no present field with weight > 0 among {names}")
    if len(names) == 1:
        return stacked[:, 0]  # already unit-norm; normalizing again would only project its gradient
    fused = (weights / total).unsqueeze(-1).mul(stacked).sum(dim=1)
    return F.normalize(fused, dim=-1)


Gather = Callable[[torch.Tensor], torch.Tensor]


class _AllGather(torch.autograd.Function):
    """all_gather along dim 0 whose backward gives each rank the sum, over every rank's loss, of
    the gradient for its own rows (torch.distributed.nn's all_gather does the same, but torch
    2.14 deprecates it for a private API). Backward all-reduces the whole gradient and keeps this
    rank's slice: gloo has no reduce-scatter, and embeddings are small beside the model's gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        ctx.rows = tensor.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every rank along dim 0 (the same number of rows on each);
    gradients flow back to each rank."""
    return _AllGather.apply(tensor)


def weighted_contrastive(
    rows: torch.Tensor,
    columns: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    logit_scale: torch.Tensor,
    negatives_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted cross-entropy of each row against all columns.

    rows: (B, D), columns: (N, D), weights: (B,), targets: (B,) the positive's column index, or
    (B, N) a target distribution over the columns (each row sums to 1); negatives_mask: (B, N)
    True where a column must not count as a negative (never where a row's target is > 0).
    Returns the mean over the B rows of weight x cross-entropy.
    """
    logits = logit_scale * rows @ columns.T
    if negatives_mask is not None:
        logits = logits.masked_fill(negatives_mask, float("-inf"))
    if targets.dim() == 1:
        ce = F.cross_entropy(logits, targets, reduction="none")
    else:  # masked columns have target 0: leave them out rather than multiply 0 by -inf
        log_p = torch.log_softmax(logits, dim=1)
        ce = -torch.where(targets > 0, targets * log_p, torch.zeros_like(log_p)).sum(dim=1)
    return (weights * ce).mean()


def listwise_targets(groups: torch.Tensor, column_weights: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """(B, N) target distributions: row i spread over the columns of its group (groups: (B, N)
    bool, e.g. the pairs of row i's query) in proportion to their weights (column_weights: (N,),
    no gradient). A group whose weights are all 0 (padding) falls back to the row's own column
    (own: (B, N) bool, one True per row)."""
    mass = groups.to(column_weights.dtype) * column_weights.unsqueeze(0)
    total = mass.sum(dim=1, keepdim=True)
    mass = torch.where(total > 0, mass, own.to(mass.dtype))
    return mass / mass.sum(dim=1, keepdim=True)


def _and_valid(present, embeddings, valid):
    """Presence masks with padding rows marked present (their weight is 0 anyway), so fusion
    never fails on them."""
    if present is None:
        return None
    return {name: present.get(name, valid) | ~valid for name in embeddings}


class GCLLoss(torch.nn.Module):
    """The GCL objective over fused and per-field embeddings.

    Args:
        cfg: loss configuration (weight function, term weights, masking).
        left_fields / right_fields: field name -> fusion weight for each side.
        rank / world_size: this process's place in the data-parallel group.
        gather: concatenates a (B, ...) tensor over ranks with gradient; defaults to
            torch.distributed's all-gather when world_size > 1 (tests pass a stand-in).
    """

    def __init__(
        self,
        cfg: LossConfig,
        left_fields: Mapping[str, float],
        right_fields: Mapping[str, float],
        *,
        rank: int = 0,
        world_size: int = 1,
        gather: Gather | None = None,
    ):
        super().__init__()
        for term in cfg.field_pair_terms:
            if term.left not in left_fields or term.right not in right_fields:
                raise ValueError(
                    f"loss.field_pair_terms: {term.left}<->{term.right} needs {term.left!r} among left fields "
                    f"{sorted(left_fields)} and {term.right!r} among right fields {sorted(right_fields)}"
                )
        self.cfg = cfg
        self.left_fields = dict(left_fields)
        self.right_fields = dict(right_fields)
        self.rank = rank
        self.world_size = world_size
        if gather is None:
            gather = all_gather_with_grad if world_size > 1 else (lambda t: t)
        self.gather = gather

    def forward(
        self,
        left: Mapping[str, torch.Tensor],
        right: Mapping[str, torch.Tensor],
        scores: torch.Tensor,
        logit_scale: torch.Tensor,
        query_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        left_present: Mapping[str, torch.Tensor] | None = None,
        right_present: Mapping[str, torch.Tensor] | None = None,
        valid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Compute the loss for this rank's rows.

        left / right: field name -> (B, D) L2-normalized embeddings. scores: (B,) relevance
        score or rank position (`cfg.weight_key`). logit_scale: learnable log-scale, shape ()
        or (1,), clamped as in CLIP. query_ids / document_ids: (B,) int64, for masking.
        *_present: field name -> (B,) bool, False where the row has no value for that field.
        valid: (B,) bool, False for padding rows: they get weight 0 and are nobody's negative.
        Returns the scalar loss and its terms (detached) for logging.
        """
        cfg = self.cfg
        batch = scores.shape[0]
        if valid is not None:  # padding rows carry score 0, which no weight function needs to accept
            scores = torch.where(valid, scores, torch.ones_like(scores))
        scale = logit_scale.clamp(0, MAX_LOGIT_SCALE).exp().reshape(())
        weights = score_to_weight(scores, cfg).to(left[next(iter(left))].dtype)
        targets = torch.arange(batch, device=scores.device) + self.rank * batch
        mask = self._negatives_mask(batch, targets, query_ids, document_ids, valid)
        if valid is not None:
            weights = weights * valid.to(weights.dtype)
            left_present = _and_valid(left_present, left, valid)
            right_present = _and_valid(right_present, right, valid)

        fused_left = fuse_fields(left, self.left_fields, left_present)
        fused_right = fuse_fields(right, self.right_fields, right_present)
        all_left, all_right = self.gather(fused_left), self.gather(fused_right)
        if cfg.target == "listwise":
            directions = self._listwise(batch, targets, weights, query_ids, document_ids, valid)
        else:
            directions = _Directions(targets, mask, mask)

        terms: dict[str, torch.Tensor] = {}
        total = fused_left.new_zeros(())
        if cfg.left_to_right > 0:
            terms["left_to_right"] = weighted_contrastive(
                fused_left, all_right, directions.to_right(), weights, scale, directions.mask_to_right
            )
            total = total + cfg.left_to_right * terms["left_to_right"]
        if cfg.right_to_left > 0:
            terms["right_to_left"] = weighted_contrastive(
                fused_right, all_left, directions.to_left(), weights, scale, directions.mask_to_left
            )
            total = total + cfg.right_to_left * terms["right_to_left"]
        for term in cfg.field_pair_terms:
            if term.weight <= 0:
                continue
            value = self._field_pair(term, left, right, directions, weights, scale, left_present, right_present)
            terms[f"{term.left}_{term.right}"] = value
            total = total + term.weight * value
        return total, {name: value.detach() for name, value in terms.items()}

    def _negatives_mask(
        self,
        batch: int,
        targets: torch.Tensor,
        query_ids: torch.Tensor | None,
        document_ids: torch.Tensor | None,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """(B, N) True where column j shares the row's query or document, or is padding
        (never the row's own pair)."""
        shared = None
        if valid is not None:
            shared = ~self._gather_no_grad(valid).unsqueeze(0).expand(batch, -1)
        for ids, wanted in (
            (query_ids, self.cfg.mask_same_query),
            (document_ids, self.cfg.mask_same_document),
        ):
            if not wanted:
                continue
            if ids is None:
                raise ValueError("loss masking is on but the batch has no ids; pass query_ids/document_ids")
            all_ids = self._gather_no_grad(ids)
            same = ids.unsqueeze(1) == all_ids.unsqueeze(0)
            shared = same if shared is None else shared | same
        if shared is None:
            return None
        own = torch.zeros_like(shared)
        own[torch.arange(batch, device=targets.device), targets] = True
        return shared & ~own

    def _listwise(self, batch, targets, weights, query_ids, document_ids, valid) -> _Directions:
        """Targets and masks of the listwise loss: a row's group is its query's pairs (to the right)
        or its document's pairs (to the left) in the gathered batch; a column sharing the row's
        document (or query) outside that group is masked when mask_same_document (or
        mask_same_query) says so, padding always."""
        if query_ids is None or document_ids is None:
            raise ValueError("loss.target=listwise needs the batch's query_ids and document_ids")
        own = torch.zeros(batch, batch * self.world_size, dtype=torch.bool, device=targets.device)
        own[torch.arange(batch, device=targets.device), targets] = True
        padding = torch.zeros_like(own)
        if valid is not None:
            padding = ~self._gather_no_grad(valid).unsqueeze(0).expand(batch, -1)
        same_query = query_ids.unsqueeze(1) == self._gather_no_grad(query_ids).unsqueeze(0)
        same_document = document_ids.unsqueeze(1) == self._gather_no_grad(document_ids).unsqueeze(0)
        by_query, by_document = (same_query & ~padding) | own, (same_document & ~padding) | own
        mask_right, mask_left = padding.clone(), padding.clone()
        if self.cfg.mask_same_document:
            mask_right |= same_document & ~by_query
        if self.cfg.mask_same_query:
            mask_left |= same_query & ~by_document
        return _Directions(
            targets,
            mask_right & ~by_query,
            mask_left & ~by_document,
            own=own,
            groups_right=by_query,
            groups_left=by_document,
            column_weights=self._gather_no_grad(weights.detach()),
        )

    def _gather_no_grad(self, tensor: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.gather(tensor)

    def _field_pair(self, term, left, right, directions: _Directions, weights, scale, left_present, right_present):
        """Both directions between one left and one right field; rows or columns lacking a value drop out."""
        rows_l, rows_r = left[term.left], right[term.right]
        batch = rows_l.shape[0]
        ones = torch.ones(batch, dtype=torch.bool, device=rows_l.device)
        has_l = left_present[term.left] if left_present and term.left in left_present else ones
        has_r = right_present[term.right] if right_present and term.right in right_present else ones
        all_l, all_r = self.gather(rows_l), self.gather(rows_r)
        all_has_l, all_has_r = self._gather_no_grad(has_l), self._gather_no_grad(has_r)
        valid_weights = weights * (has_l & has_r).to(weights.dtype)
        to_right_targets = directions.to_right(all_has_r)
        to_left_targets = directions.to_left(all_has_l)
        lr_mask = ~all_has_r.unsqueeze(0).expand(batch, -1)
        rl_mask = ~all_has_l.unsqueeze(0).expand(batch, -1)
        if directions.mask_to_right is not None:
            lr_mask = lr_mask | directions.mask_to_right
        if directions.mask_to_left is not None:
            rl_mask = rl_mask | directions.mask_to_left
        # A row whose own pair lacks a value has weight 0; keep its target finite.
        lr_mask = lr_mask & ~_target_columns(to_right_targets, lr_mask.shape[1])
        rl_mask = rl_mask & ~_target_columns(to_left_targets, rl_mask.shape[1])
        to_right = weighted_contrastive(rows_l, all_r, to_right_targets, valid_weights, scale, lr_mask)
        to_left = weighted_contrastive(rows_r, all_l, to_left_targets, valid_weights, scale, rl_mask)
        return (to_right + to_left) / 2


class _Directions:
    """A batch's targets and negatives masks in each direction: the diagonal (each row's own pair,
    `targets` (B,) column indices) or listwise (row groups spread by column weights)."""

    def __init__(
        self, targets, mask_to_right, mask_to_left, own=None, groups_right=None, groups_left=None, column_weights=None
    ):
        self.targets, self.mask_to_right, self.mask_to_left = targets, mask_to_right, mask_to_left
        self.own, self.groups_right, self.groups_left = own, groups_right, groups_left
        self.column_weights = column_weights

    def _targets(self, groups, present):
        if groups is None:
            return self.targets
        if present is not None:
            groups = groups & present.unsqueeze(0)
        return listwise_targets(groups, self.column_weights, self.own)

    def to_right(self, present: torch.Tensor | None = None) -> torch.Tensor:
        """Targets of the left rows over the right columns; present: (N,) columns with a value."""
        return self._targets(self.groups_right, present)

    def to_left(self, present: torch.Tensor | None = None) -> torch.Tensor:
        return self._targets(self.groups_left, present)


def _target_columns(targets: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width) True at each row's target columns (never to be masked)."""
    if targets.dim() == 2:
        return targets > 0
    batch = targets.shape[0]
    cols = torch.zeros(batch, width, dtype=torch.bool, device=targets.device)
    cols[torch.arange(batch, device=targets.device), targets] = True
    return cols
