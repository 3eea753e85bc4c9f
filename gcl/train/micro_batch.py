"""One micro-batch's forward and backward: whole, or in chunks with cached gradients.

With `train.embed_chunk` the micro-batch's pairs are embedded a chunk at a time without a graph,
the loss (with its gathers across workers) is taken on all the embeddings at once, its gradient
with respect to the embeddings and the logit scale is kept, and each chunk is embedded again,
this time with a graph, and back-propagated with that gradient (Gao et al., 2021, "Scaling Deep
Contrastive Learning Batch Size under Memory Limited Setup"). The pool of negatives is then the
whole micro-batch while the activations held at once are one chunk's: exact, not an
approximation (for a deterministic model; the random state each chunk met in the first pass is
restored for its second, and batch norms that train update their running statistics in the
second pass only, once per chunk, from the chunk's statistics, as in Gao et al.'s GradCache).

Under DeepSpeed every chunk's backward is a micro-step of the engine: the gradients accumulate
over the chunks (and the micro-batches of a grad_accum group) and are reduced across workers on
the group's last one, whatever the ZeRO stage.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from gcl.config import FieldsConfig
from gcl.data.pipeline import PRESENT
from gcl.loss import GCLLoss


def split_sides(fields: FieldsConfig, batch: dict[str, torch.Tensor], embeddings: dict[str, torch.Tensor]):
    """(left embeddings, right embeddings, left presence, right presence) from a pipeline batch."""
    left = {n: embeddings[n] for n in fields.left}
    right = {n: embeddings[n] for n in fields.right}
    left_present = {n: batch[n + PRESENT] for n in fields.left}
    right_present = {n: batch[n + PRESENT] for n in fields.right}
    return left, right, left_present, right_present


def batch_loss_from_embeddings(
    loss_fn: GCLLoss,
    fields: FieldsConfig,
    batch: dict[str, torch.Tensor],
    embeddings: dict[str, torch.Tensor],
    log_scale: torch.Tensor,
):
    """(loss, its terms) of a pipeline batch whose fields are embedded."""
    left, right, left_present, right_present = split_sides(fields, batch, embeddings)
    return loss_fn(
        left,
        right,
        batch["score"],
        log_scale,
        batch["query_key"],
        batch["document_key"],
        left_present,
        right_present,
        valid=batch["valid"],
    )


def batch_loss(model, loss_fn: GCLLoss, fields: FieldsConfig, batch: dict[str, torch.Tensor]):
    """(loss, its terms, the log logit scale) of one pipeline batch: the model (a FieldEncoder, or a
    DeepSpeed engine or DDP module around one) embeds every field, the loss weighs the pairs."""
    embeddings, log_scale = model(model_inputs(fields, batch))
    loss, terms = batch_loss_from_embeddings(loss_fn, fields, batch, embeddings, log_scale)
    return loss, terms, log_scale


def model_inputs(fields: FieldsConfig, batch: dict[str, torch.Tensor], rows: slice = slice(None)):
    """The batch's field columns (rows `rows`), as the model takes them."""
    return {name: batch[name][rows] for name in fields.modalities()}


def backward_micro_batch(
    engine,
    loss_fn: GCLLoss,
    fields: FieldsConfig,
    batch: dict[str, torch.Tensor],
    divisor: int,
    boundary: bool,
    chunk: int | None = None,
):
    """Forward and backward of one micro-batch on a DeepSpeed engine, the loss divided by `divisor`
    (the micro-batches of its optimizer step); `boundary`: the step's last micro-batch, whose
    backward reduces the gradients. With `chunk` (pairs) below the batch's size, in chunks with
    cached gradients; the engine's step() follows every chunk but the last, which the caller
    steps as it would a whole micro-batch. Returns (loss, its terms, the log logit scale), detached."""
    rows = batch["valid"].shape[0]
    if not chunk or chunk >= rows:
        engine.set_gradient_accumulation_boundary(boundary)
        loss, terms, log_scale = batch_loss(engine, loss_fn, fields, batch)
        engine.backward(loss / divisor, scale_wrt_gas=False)
        return loss.detach(), terms, log_scale.detach()
    chunks = [slice(start, min(start + chunk, rows)) for start in range(0, rows, chunk)]
    embeddings, log_scale, random_states = _embed_without_graph(engine, fields, batch, chunks)
    leaves = {name: value.requires_grad_() for name, value in embeddings.items()}
    log_scale_leaf = log_scale.requires_grad_()
    loss, terms = batch_loss_from_embeddings(loss_fn, fields, batch, leaves, log_scale_leaf)
    # Every worker runs this backward: the loss's gathers reduce the embeddings' gradients across workers.
    (loss / divisor).backward()
    for position, (rows_of_chunk, state) in enumerate(zip(chunks, random_states, strict=True)):
        last = position == len(chunks) - 1
        engine.set_gradient_accumulation_boundary(boundary and last)
        with _random_state(state):
            chunk_embeddings, chunk_log_scale = engine(model_inputs(fields, batch, rows_of_chunk))
        # The surrogate whose gradient with respect to the chunk's embeddings is the loss's (a field
        # the loss does not use, one of fusion weight 0, has none).
        surrogate = sum(
            (chunk_embeddings[name] * leaf.grad[rows_of_chunk]).sum()
            for name, leaf in leaves.items()
            if leaf.grad is not None
        )
        if position == 0:  # the logit scale is a parameter: its gradient joins once
            surrogate = surrogate + (chunk_log_scale * log_scale_leaf.grad).sum()
        engine.backward(surrogate, scale_wrt_gas=False)
        if not last:
            engine.step()  # a micro-step: the optimizer steps on the boundary only
    return loss.detach(), terms, log_scale.detach()


def _embed_without_graph(engine, fields: FieldsConfig, batch: dict[str, torch.Tensor], chunks: list[slice]):
    """(field -> every row's embedding, the log logit scale, the random state before each chunk)."""
    parts: dict[str, list[torch.Tensor]] = {}
    random_states = []
    log_scale = None
    statistics = _running_statistics(engine.module)
    with torch.no_grad():
        for rows in chunks:
            random_states.append(_capture_random_state(engine.device))
            embeddings, log_scale = engine(model_inputs(fields, batch, rows))
            for name, value in embeddings.items():
                parts.setdefault(name, []).append(value)
        for statistic, before in statistics:  # the second pass updates them, as a whole step would once
            statistic.copy_(before)
    # A copy: under ZeRO-3 the returned scale is the gathered parameter, released after the forward.
    return {name: torch.cat(values) for name, values in parts.items()}, log_scale.detach().clone(), random_states


def _running_statistics(module: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(buffer, a copy of it) for the running statistics that a forward in training mode updates:
    those of batch norms that train (a locked one is in eval mode: gcl.model.FieldEncoder.train)."""
    from torch.nn.modules.batchnorm import _NormBase

    norms = [m for m in module.modules() if isinstance(m, _NormBase) and m.training and m.track_running_stats]
    return [(b, b.clone()) for norm in norms for b in norm.buffers(recurse=False)]


def _capture_random_state(device: torch.device) -> dict:
    state = {"device": device, "cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _restore_random_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], state["device"])


@contextmanager
def _random_state(state: dict):
    """Run the block from `state` (the random state a chunk met in the first pass), then carry on
    from where the random streams were."""
    now = _capture_random_state(state["device"])
    _restore_random_state(state)
    try:
        yield
    finally:
        _restore_random_state(now)
