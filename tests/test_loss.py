"""GCL loss against references: open_clip's ClipLoss and plain per-row loops."""

import math
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from gcl.config import ConfigError, parse_config
from gcl.loss import FieldPairTerm, GCLLoss, LossConfig, fuse_fields, score_to_weight


def _normed(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def _plain_cfg(**kw):
    base = dict(weight_fn="uniform", mask_same_query=False, mask_same_document=False)
    return LossConfig(**{**base, **kw})


def test_uniform_single_field_equals_open_clip_cliploss_value_and_grads():
    left = _normed(16, 8, seed=0).requires_grad_()
    right = _normed(16, 8, seed=1).requires_grad_()
    log_scale = torch.tensor([math.log(1 / 0.07)], dtype=torch.float64, requires_grad=True)
    loss, _ = GCLLoss(_plain_cfg(), {"q": 1.0}, {"d": 1.0})(
        {"q": left}, {"d": right}, torch.rand(16, dtype=torch.float64), log_scale
    )
    loss.backward()
    ours = (left.grad.clone(), right.grad.clone(), log_scale.grad.clone())

    left2, right2 = left.detach().clone().requires_grad_(), right.detach().clone().requires_grad_()
    log_scale2 = log_scale.detach().clone().requires_grad_()
    ref = ClipLoss()(left2, right2, log_scale2.exp().squeeze())
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-6
    for got, want in zip(ours, (left2.grad, right2.grad, log_scale2.grad), strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def _reference_direction(rows, cols, weights, scale, q_ids, d_ids, mask_q, mask_d):
    """Per-row loop: weighted -log softmax of the positive among unmasked columns."""
    total = 0.0
    for i in range(rows.shape[0]):
        logits = []
        for j in range(cols.shape[0]):
            if j != i and ((mask_q and q_ids[i] == q_ids[j]) or (mask_d and d_ids[i] == d_ids[j])):
                continue
            logits.append((j, scale * float(rows[i] @ cols[j])))
        denom = math.log(sum(math.exp(v) for _, v in logits))
        positive = next(v for j, v in logits if j == i)
        total += weights[i] * (denom - positive)
    return total / rows.shape[0]


@pytest.mark.parametrize("weight_fn", ["linear", "power", "exponential"])
def test_weighted_masked_loss_matches_per_row_reference(weight_fn):
    n = 12
    left, right = _normed(n, 6, seed=2), _normed(n, 6, seed=3)
    scores = torch.linspace(0.0, 1.0, n, dtype=torch.float64)[
        torch.randperm(n, generator=torch.Generator().manual_seed(0))
    ]
    q_ids = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 4, 5, 5, 5])
    d_ids = torch.tensor([10, 11, 12, 10, 13, 14, 15, 16, 11, 17, 18, 19])
    cfg = LossConfig(weight_fn=weight_fn, score_range=(0.0, 1.0), weight_min=0.2, left_to_right=0.7, right_to_left=0.3)
    log_scale = torch.tensor([math.log(10.0)], dtype=torch.float64)
    loss, terms = GCLLoss(cfg, {"q": 1.0}, {"d": 1.0})({"q": left}, {"d": right}, scores, log_scale, q_ids, d_ids)

    w = score_to_weight(scores, cfg).tolist()
    lr = _reference_direction(left, right, w, 10.0, q_ids.tolist(), d_ids.tolist(), True, True)
    rl = _reference_direction(right, left, w, 10.0, q_ids.tolist(), d_ids.tolist(), True, True)
    assert terms["left_to_right"].item() == pytest.approx(lr, abs=1e-9)
    assert terms["right_to_left"].item() == pytest.approx(rl, abs=1e-9)
    assert loss.item() == pytest.approx(0.7 * lr + 0.3 * rl, abs=1e-9)
    # Masking changes the value: there are shared queries and documents in this batch.
    unmasked, _ = GCLLoss(
        cfg.model_copy(update={"mask_same_query": False, "mask_same_document": False}), {"q": 1.0}, {"d": 1.0}
    )({"q": left}, {"d": right}, scores, log_scale)
    assert unmasked.item() > loss.item()


def test_padding_rows_count_for_nothing_whatever_their_score():
    """The last batch of an epoch is padded with invalid rows of score 0: with rank-position
    weights (1/position, positions from 1) the loss is that of the valid rows alone (averaged over
    the whole batch), and a padded row is nobody's negative. `gcl train --set
    loss.weight_fn=reciprocal` failed on them."""
    n, pad = 6, 3
    left, right = _normed(n + pad, 4, seed=6), _normed(n + pad, 4, seed=7)
    positions = torch.tensor([1.0, 2, 3, 1, 2, 4, 0, 0, 0], dtype=torch.float64)
    valid = torch.arange(n + pad) < n
    log_scale = torch.tensor([math.log(10.0)], dtype=torch.float64)
    loss_fn = GCLLoss(_plain_cfg(weight_fn="reciprocal"), {"q": 1.0}, {"d": 1.0})
    padded, _ = loss_fn({"q": left}, {"d": right}, positions, log_scale, valid=valid)
    alone, _ = loss_fn({"q": left[:n]}, {"d": right[:n]}, positions[:n], log_scale)
    assert padded.item() == pytest.approx(alone.item() * n / (n + pad), abs=1e-9)


def test_higher_weight_pairs_incur_greater_penalty():
    left, right = _normed(8, 4, seed=4), _normed(8, 4, seed=5)
    log_scale = torch.tensor([2.0], dtype=torch.float64)
    cfg = LossConfig(weight_fn="linear", score_range=(0, 1), mask_same_query=False, mask_same_document=False)
    loss_fn = GCLLoss(cfg, {"q": 1.0}, {"d": 1.0})
    low, _ = loss_fn({"q": left}, {"d": right}, torch.full((8,), 0.2, dtype=torch.float64), log_scale)
    high, _ = loss_fn({"q": left}, {"d": right}, torch.full((8,), 0.9, dtype=torch.float64), log_scale)
    assert high.item() == pytest.approx(low.item() * 0.9 / 0.2)


def test_score_to_weight_functions():
    s = torch.tensor([0.0, 0.5, 1.0, 2.0])
    lin = score_to_weight(s, LossConfig(weight_fn="linear", score_range=(0, 1), weight_min=0.1))
    torch.testing.assert_close(lin, torch.tensor([0.1, 0.55, 1.0, 1.0]))
    pos = torch.tensor([1.0, 2.0, 4.0])
    torch.testing.assert_close(score_to_weight(pos, LossConfig(weight_fn="reciprocal")), torch.tensor([1.0, 0.5, 0.25]))
    torch.testing.assert_close(score_to_weight(s, LossConfig(weight_fn="uniform")), torch.ones(4))
    power = score_to_weight(s, LossConfig(weight_fn="power", score_range=(0, 2), power_exponent=2))
    torch.testing.assert_close(power, torch.tensor([0.0, 0.0625, 0.25, 1.0]))
    expo = score_to_weight(s, LossConfig(weight_fn="exponential", score_range=(0, 1), temperature=0.5))
    torch.testing.assert_close(expo, torch.exp((torch.tensor([0.0, 0.5, 1.0, 1.0]) - 1) / 0.5))
    with pytest.raises(ValueError, match="rank positions >= 1"):
        score_to_weight(torch.tensor([0.0]), LossConfig(weight_fn="reciprocal"))
    with pytest.raises(ValueError, match="score_range"):
        score_to_weight(s, LossConfig(weight_fn="linear"))


def test_fuse_fields_renormalizes_rows_with_missing_values():
    img, title = _normed(3, 5, seed=6), _normed(3, 5, seed=7)
    present = {"image": torch.tensor([True, False, True]), "title": torch.tensor([True, True, False])}
    fused = fuse_fields({"image": img, "title": title}, {"image": 0.9, "title": 0.1}, present)
    torch.testing.assert_close(fused[0], F.normalize(0.9 * img[0] + 0.1 * title[0], dim=-1))
    torch.testing.assert_close(fused[1], title[1])  # only the title is there
    torch.testing.assert_close(fused[2], img[2])
    with pytest.raises(ValueError, match="no present field"):
        fuse_fields({"image": img}, {"image": 1.0}, {"image": torch.tensor([True, False, True])})


def test_field_pair_term_matches_reference_and_skips_missing():
    n = 6
    q, img, title = _normed(n, 4, seed=8), _normed(n, 4, seed=9), _normed(n, 4, seed=10)
    has_title = torch.tensor([True, True, False, True, True, True])
    cfg = _plain_cfg(
        left_to_right=0.0,
        right_to_left=0.0,
        field_pair_terms=[FieldPairTerm(left="q", right="title", weight=1.0)],
    )
    loss, terms = GCLLoss(cfg, {"q": 1.0}, {"image": 0.5, "title": 0.5})(
        {"q": q},
        {"image": img, "title": title},
        torch.ones(n, dtype=torch.float64),
        torch.tensor([0.0], dtype=torch.float64),
        right_present={"image": torch.ones(n, dtype=torch.bool), "title": has_title},
    )
    keep = has_title.nonzero().flatten().tolist()
    # Row 2 has no title: it contributes 0 and is no negative for others; mean is over all n rows.
    to_right = sum(-F.log_softmax(torch.stack([q[i] @ title[j] for j in keep]), 0)[keep.index(i)] for i in keep) / n
    to_left = sum(-F.log_softmax(torch.stack([title[i] @ q[j] for j in range(n)]), 0)[i] for i in keep) / n
    assert loss.item() == pytest.approx(float((to_right + to_left) / 2), abs=1e-9)
    assert set(terms) == {"q_title"}


def test_logit_scale_is_clamped_like_clip():
    left, right = _normed(4, 3, seed=11), _normed(4, 3, seed=12)
    cfg = _plain_cfg()
    loss_fn = GCLLoss(cfg, {"q": 1.0}, {"d": 1.0})
    at_max, _ = loss_fn({"q": left}, {"d": right}, torch.ones(4), torch.tensor([math.log(100.0)], dtype=torch.float64))
    beyond, _ = loss_fn({"q": left}, {"d": right}, torch.ones(4), torch.tensor([10.0], dtype=torch.float64))
    assert beyond.item() == pytest.approx(at_max.item())


def test_loss_config_rejects_bad_values_naming_the_key():
    with pytest.raises(ConfigError, match=r"loss\.weight_fn.*'uniform', 'linear'"):
        parse_config(_Wrapper, overrides=["loss.weight_fn=sigmoid"])
    with pytest.raises(ConfigError, match=r"loss\.left_to_right: .*greater than or equal to 0"):
        parse_config(_Wrapper, overrides=["loss.left_to_right=-1"])
    with pytest.raises(ConfigError, match=r"loss\.wieght_key: unknown key.*did you mean 'weight_key'"):
        parse_config(_Wrapper, overrides=["loss.wieght_key=x"])
    with pytest.raises(ValueError, match=r"q<->title needs .*'title' among right fields \['d'\]"):
        GCLLoss(LossConfig(field_pair_terms=[{"left": "q", "right": "title"}]), {"q": 1.0}, {"d": 1.0})


class _Wrapper(LossConfig.__base__):
    loss: LossConfig = LossConfig()


# ------------------------------------------------------------------------------------------
# Distributed: the per-rank losses average to the single-process loss on the whole batch.


def _shard_inputs(world):
    n = 8 * world
    left, right = _normed(n, 6, seed=20), _normed(n, 6, seed=21)
    scores = torch.rand(n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    q_ids = torch.arange(n) // 3
    d_ids = torch.arange(n) % 7
    return left, right, scores, q_ids, d_ids


_CFG = dict(weight_fn="linear", score_range=(0.0, 1.0), weight_min=0.1, left_to_right=0.6, right_to_left=0.4)


TARGETS = ("diagonal", "listwise")
WORLD = 2


def _rank_main(rank, world, init_file, out_dir):
    """Each target's loss and gradients on this rank's rows (one spawn serves both targets)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    left, right, scores, q_ids, d_ids = _shard_inputs(world)
    rows = slice(rank * 8, (rank + 1) * 8)
    out = {}
    for target in TARGETS:
        l_local = left[rows].clone().requires_grad_()
        r_local = right[rows].clone().requires_grad_()
        log_scale = torch.tensor([1.5], dtype=torch.float64, requires_grad=True)
        loss_fn = GCLLoss(LossConfig(**_CFG, target=target), {"q": 1.0}, {"d": 1.0}, rank=rank, world_size=world)
        loss, _ = loss_fn({"q": l_local}, {"d": r_local}, scores[rows], log_scale, q_ids[rows], d_ids[rows])
        loss.backward()
        out[target] = {"loss": loss.detach(), "l": l_local.grad, "r": r_local.grad, "s": log_scale.grad}
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def gloo_parts() -> list[dict]:
    """Per rank, per target: the loss and gradients two gloo processes computed."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank_main, args=(WORLD, os.path.join(tmp, "init"), tmp), nprocs=WORLD, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]


@pytest.mark.parametrize("target", TARGETS)
def test_two_gloo_processes_equal_single_process_loss_and_grads(gloo_parts, target):
    """Both targets; in the listwise one a query's documents sit on both ranks (q_ids = n // 3)."""
    parts = [by_target[target] for by_target in gloo_parts]

    left, right, scores, q_ids, d_ids = _shard_inputs(WORLD)
    left.requires_grad_()
    right.requires_grad_()
    log_scale = torch.tensor([1.5], dtype=torch.float64, requires_grad=True)
    full, _ = GCLLoss(LossConfig(**_CFG, target=target), {"q": 1.0}, {"d": 1.0})(
        {"q": left}, {"d": right}, scores, log_scale, q_ids, d_ids
    )
    full.backward()
    if target == "listwise":  # and the single process matches the per-row reference
        reference = _listwise_reference(
            left.detach(),
            right.detach(),
            score_to_weight(scores, LossConfig(**_CFG)),
            1.5,
            q_ids,
            d_ids,
            LossConfig(**_CFG, target=target),
        )
        assert full.item() == pytest.approx(reference, abs=1e-9)

    assert sum(p["loss"] for p in parts).item() / WORLD == pytest.approx(full.item(), abs=1e-10)
    # Data-parallel training averages gradients over ranks; gather-with-grad routes every
    # rank's loss gradient back to the rank that owns each embedding.
    torch.testing.assert_close(torch.cat([p["l"] for p in parts]) / WORLD, left.grad)
    torch.testing.assert_close(torch.cat([p["r"] for p in parts]) / WORLD, right.grad)
    torch.testing.assert_close(sum(p["s"] for p in parts) / WORLD, log_scale.grad)


# ------------------------------------------------------------------------------------------
# The listwise target


def _listwise_reference(left, right, weights, log_scale, q_ids, d_ids, cfg, valid=None):
    """Per-row loop of the listwise loss on single-field sides: row i's target is spread over its
    group (the pairs of its query to the right, of its document to the left) by weight; columns
    sharing the row's document (query) outside the group, and padding, are left out."""
    n = left.shape[0]
    scale = math.exp(min(log_scale, math.log(100.0)))
    valid = [True] * n if valid is None else valid.tolist()
    w, q, d = weights.tolist(), q_ids.tolist(), d_ids.tolist()

    def direction(rows, cols, group_ids, other_ids, mask_other):
        total = 0.0
        for i in range(n):
            group = [j for j in range(n) if (group_ids[j] == group_ids[i] and valid[j]) or j == i]
            kept = [
                j for j in range(n) if j in group or (valid[j] and not (mask_other and other_ids[j] == other_ids[i]))
            ]
            logits = {j: scale * float(rows[i] @ cols[j]) for j in kept}
            log_norm = math.log(sum(math.exp(v) for v in logits.values()))
            mass = sum(w[j] for j in group)
            target = {j: w[j] / mass for j in group} if mass > 0 else {i: 1.0}
            ce = -sum(t * (logits[j] - log_norm) for j, t in target.items() if t > 0)
            total += (w[i] if valid[i] else 0.0) * ce
        return total / n

    to_right = direction(left, right, q, d, cfg.mask_same_document)
    to_left = direction(right, left, d, q, cfg.mask_same_query)
    return cfg.left_to_right * to_right + cfg.right_to_left * to_left


def _listwise_batch():
    """Queries with 3, 2, 1, 3 and 2 judged documents; document 11 judged for two queries."""
    q_ids = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 4, 4])
    d_ids = torch.tensor([10, 11, 12, 13, 11, 14, 15, 16, 17, 18, 19])
    scores = torch.tensor([1.0, 0.6, 0.2, 0.9, 0.4, 0.7, 0.8, 0.5, 0.1, 1.0, 0.3], dtype=torch.float64)
    return _normed(11, 6, seed=30), _normed(11, 6, seed=31), scores, q_ids, d_ids


@pytest.mark.parametrize("mask", [True, False])
def test_listwise_loss_matches_a_per_row_reference(mask):
    left, right, scores, q_ids, d_ids = _listwise_batch()
    cfg = LossConfig(
        weight_fn="linear",
        score_range=(0.0, 1.0),
        weight_min=0.1,
        left_to_right=0.7,
        right_to_left=0.3,
        target="listwise",
        mask_same_query=mask,
        mask_same_document=mask,
    )
    log_scale = torch.tensor([math.log(10.0)], dtype=torch.float64)
    loss, _ = GCLLoss(cfg, {"q": 1.0}, {"d": 1.0})({"q": left}, {"d": right}, scores, log_scale, q_ids, d_ids)
    want = _listwise_reference(left, right, score_to_weight(scores, cfg), math.log(10.0), q_ids, d_ids, cfg)
    assert loss.item() == pytest.approx(want, abs=1e-9)
    # It is not the diagonal loss: a query's documents are each other's targets here.
    diagonal, _ = GCLLoss(cfg.model_copy(update={"target": "diagonal"}), {"q": 1.0}, {"d": 1.0})(
        {"q": left}, {"d": right}, scores, log_scale, q_ids, d_ids
    )
    assert abs(diagonal.item() - loss.item()) > 1e-3


def test_listwise_with_padding_matches_the_reference():
    left, right, scores, q_ids, d_ids = _listwise_batch()
    valid = torch.tensor([True] * 9 + [False] * 2)
    cfg = LossConfig(weight_fn="reciprocal", weight_key="position", target="listwise")
    positions = torch.where(valid, (scores * 10).ceil(), torch.zeros_like(scores))
    log_scale = torch.tensor([math.log(10.0)], dtype=torch.float64)
    loss, _ = GCLLoss(cfg, {"q": 1.0}, {"d": 1.0})(
        {"q": left}, {"d": right}, positions, log_scale, q_ids, d_ids, valid=valid
    )
    weights = score_to_weight(positions.clamp(min=1), cfg) * valid  # 1 / position, 0 for padding
    want = _listwise_reference(left, right, weights, math.log(10.0), q_ids, d_ids, cfg, valid)
    assert loss.item() == pytest.approx(want, abs=1e-9)


def test_listwise_equals_diagonal_with_one_document_per_query():
    """docs_per_query = 1: every group is the row's own pair, so the listwise loss is GCL's, value and
    gradients, field-pair terms and missing fields included."""
    n = 10
    g = torch.Generator().manual_seed(4)
    left = {"q": _normed(n, 6, seed=40).requires_grad_()}
    right = {"title": _normed(n, 6, seed=41).requires_grad_(), "image": _normed(n, 6, seed=42).requires_grad_()}
    right_present = {"title": torch.rand(n, generator=g) > 0.3, "image": torch.ones(n, dtype=torch.bool)}
    scores = torch.rand(n, generator=g, dtype=torch.float64)
    q_ids, d_ids = torch.arange(n), torch.arange(n) + 100
    log_scale = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    base = LossConfig(
        weight_fn="linear",
        score_range=(0.0, 1.0),
        field_pair_terms=[FieldPairTerm(left="q", right="title", weight=0.2)],
    )
    results = []
    for target in ("diagonal", "listwise"):
        loss_fn = GCLLoss(base.model_copy(update={"target": target}), {"q": 1.0}, {"title": 0.3, "image": 0.7})
        loss, terms = loss_fn(left, right, scores, log_scale, q_ids, d_ids, right_present=right_present)
        grads = torch.autograd.grad(loss, [left["q"], right["title"], right["image"], log_scale])
        results.append((loss, terms, grads))
    (loss_d, terms_d, grads_d), (loss_l, terms_l, grads_l) = results
    assert loss_l.item() == pytest.approx(loss_d.item(), abs=1e-12)
    assert terms_l.keys() == terms_d.keys() and "q_title" in terms_l
    for got, want in zip(grads_l, grads_d, strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_listwise_needs_the_ids():
    left, right, scores, _, _ = _listwise_batch()
    loss_fn = GCLLoss(
        LossConfig(weight_fn="uniform", target="listwise", mask_same_query=False, mask_same_document=False),
        {"q": 1.0},
        {"d": 1.0},
    )
    with pytest.raises(ValueError, match="loss.target=listwise needs the batch's query_ids and document_ids"):
        loss_fn({"q": left}, {"d": right}, scores, torch.tensor([1.0], dtype=torch.float64))
