"""Miners against naive float64 loop references (plain Python over anchors and references)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from helpers.miners import (
    AdaptiveMSMiner,
    BatchHardMiner,
    MultiSimilarityMiner,
    SemiHardMiner,
    get_miner,
    pair_masks,
)

# ----------------------------------------------------------------------------- loop references


def ref_pairs(labels, ref_labels=None, self_mask=None):
    """Lists of positive / negative reference indices per anchor."""
    labels = list(labels)
    refs = labels if ref_labels is None else list(ref_labels)
    if ref_labels is None and self_mask is None:
        self_mask = np.eye(len(labels), dtype=bool)
    pos, neg = [], []
    for i, yi in enumerate(labels):
        is_self = (lambda j: bool(self_mask[i][j])) if self_mask is not None else (lambda j: False)
        pos.append([j for j, yj in enumerate(refs) if yj == yi and not is_self(j)])
        neg.append([j for j, yj in enumerate(refs) if yj != yi])
    return pos, neg


def to_masks(selected, shape):
    mask = np.zeros(shape, dtype=bool)
    for i, cols in enumerate(selected):
        for j in cols:
            mask[i, j] = True
    return mask


def ref_ms_miner(sim, labels, ref_labels=None, self_mask=None, epsilon=0.1, per_anchor_eps=None):
    pos, neg = ref_pairs(labels, ref_labels, self_mask)
    keep_pos, keep_neg = [], []
    for i in range(len(pos)):
        eps = epsilon if per_anchor_eps is None else per_anchor_eps[i]
        min_pos = min((sim[i][p] for p in pos[i]), default=math.inf)
        max_neg = max((sim[i][n] for n in neg[i]), default=-math.inf)
        keep_neg.append([n for n in neg[i] if sim[i][n] + eps > min_pos])
        keep_pos.append([p for p in pos[i] if sim[i][p] - eps < max_neg])
    return to_masks(keep_pos, sim.shape), to_masks(keep_neg, sim.shape)


def ref_adaptive_eps(sim, labels, ref_labels=None, self_mask=None, scale=0.5, min_epsilon=0.0):
    pos, neg = ref_pairs(labels, ref_labels, self_mask)
    eps = []
    for i in range(len(pos)):
        values = [sim[i][j] for j in pos[i] + neg[i]]
        std = float(np.std(values)) if values else 0.0
        eps.append(max(scale * std, min_epsilon))
    return eps


def ref_batch_hard(sim, labels, ref_labels=None, self_mask=None):
    pos, neg = ref_pairs(labels, ref_labels, self_mask)
    keep_pos, keep_neg = [], []
    for i in range(len(pos)):
        best_p = None
        for p in pos[i]:  # first index wins ties
            if best_p is None or sim[i][p] < sim[i][best_p]:
                best_p = p
        best_n = None
        for n in neg[i]:
            if best_n is None or sim[i][n] > sim[i][best_n]:
                best_n = n
        keep_pos.append([] if best_p is None else [best_p])
        keep_neg.append([] if best_n is None else [best_n])
    return to_masks(keep_pos, sim.shape), to_masks(keep_neg, sim.shape)


def ref_semi_hard(sim, labels, ref_labels=None, self_mask=None, margin=0.1):
    pos, neg = ref_pairs(labels, ref_labels, self_mask)
    keep_pos, keep_neg = set(), set()
    for i in range(len(pos)):
        for p in pos[i]:
            for n in neg[i]:
                if sim[i][n] < sim[i][p] < sim[i][n] + margin:
                    keep_pos.add((i, p))
                    keep_neg.add((i, n))
    pos_mask, neg_mask = np.zeros(sim.shape, bool), np.zeros(sim.shape, bool)
    for i, j in keep_pos:
        pos_mask[i, j] = True
    for i, j in keep_neg:
        neg_mask[i, j] = True
    return pos_mask, neg_mask


# ----------------------------------------------------------------------------- cases


def random_case(b, m=None, num_classes=4, seed=0, ties=False, with_refs=False):
    """float64 similarities (B, M) in [-1, 1], labels, optional ref labels."""
    g = torch.Generator().manual_seed(seed)
    m = b if m is None else m
    sim = torch.rand(b, m, generator=g, dtype=torch.float64) * 2 - 1
    if ties:  # a coarse grid: many exact ties, and exact hits on the +-eps boundaries
        sim = torch.round(sim * 10) / 10
    labels = torch.randint(num_classes, (b,), generator=g)
    ref_labels = torch.randint(num_classes, (m,), generator=g) if with_refs else None
    return sim, labels, ref_labels


def edge_cases():
    cases = {
        "random": random_case(12, seed=1),
        "ties": random_case(12, seed=2, ties=True),
        "singletons": (random_case(6, seed=3)[0], torch.tensor([0, 1, 2, 3, 3, 4]), None),
        "one_class": (random_case(5, seed=4)[0], torch.zeros(5, dtype=torch.long), None),
        "single_item": (torch.ones(1, 1, dtype=torch.float64), torch.tensor([7]), None),
        "refs": random_case(8, 20, seed=5, with_refs=True),
        "refs_ties": random_case(8, 20, seed=6, ties=True, with_refs=True),
    }
    return list(cases.items())


CASES = edge_cases()
CASE_IDS = [name for name, _ in CASES]
CASE_VALUES = [value for _, value in CASES]


def run(miner, sim, labels, ref_labels, self_mask=None):
    pos, neg = miner(sim, labels, ref_labels, self_mask=self_mask)
    assert pos.dtype == torch.bool and neg.dtype == torch.bool
    assert pos.shape == sim.shape and neg.shape == sim.shape
    return pos.numpy(), neg.numpy()


def np_args(sim, labels, ref_labels):
    return sim.numpy(), labels.tolist(), None if ref_labels is None else ref_labels.tolist()


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("case", CASE_VALUES, ids=CASE_IDS)
def test_pair_masks_match_reference(case):
    sim, labels, ref_labels = case
    pos, neg = pair_masks(labels, ref_labels)
    ref_pos, ref_neg = ref_pairs(labels.tolist(), None if ref_labels is None else ref_labels.tolist())
    np.testing.assert_array_equal(pos.numpy(), to_masks(ref_pos, sim.shape))
    np.testing.assert_array_equal(neg.numpy(), to_masks(ref_neg, sim.shape))


@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("case", CASE_VALUES, ids=CASE_IDS)
def test_ms_miner_matches_reference(case, epsilon):
    sim, labels, ref_labels = case
    pos, neg = run(MultiSimilarityMiner(epsilon), sim, labels, ref_labels)
    ref_pos, ref_neg = ref_ms_miner(*np_args(sim, labels, ref_labels), epsilon=epsilon)
    np.testing.assert_array_equal(pos, ref_pos)
    np.testing.assert_array_equal(neg, ref_neg)


def test_ms_miner_keeps_nothing_without_the_other_side():
    sim, _, _ = random_case(5, seed=7)
    pos, neg = MultiSimilarityMiner(10.0)(sim, torch.zeros(5, dtype=torch.long))  # no negatives
    assert not pos.any() and not neg.any()
    pos, neg = MultiSimilarityMiner(10.0)(sim, torch.arange(5))  # no positives
    assert not pos.any() and not neg.any()


def test_ms_miner_strict_inequality_on_exact_boundary():
    # anchor 0: positive at 0.5, negatives at 0.25 (= 0.5 - eps, dropped) and 0.375 (kept).
    sim = torch.tensor([[1.0, 0.5, 0.25, 0.375]], dtype=torch.float64)
    sim = torch.cat([sim, torch.zeros(3, 4, dtype=torch.float64)])
    labels = torch.tensor([0, 0, 1, 1])
    pos, neg = MultiSimilarityMiner(0.25)(sim, labels)
    assert neg[0].tolist() == [False, False, False, True]
    assert pos[0].tolist() == [False, True, False, False]  # 0.5 - 0.25 < 0.375


@pytest.mark.parametrize("case", CASE_VALUES, ids=CASE_IDS)
def test_batch_hard_matches_reference(case):
    sim, labels, ref_labels = case
    pos, neg = run(BatchHardMiner(), sim, labels, ref_labels)
    ref_pos, ref_neg = ref_batch_hard(*np_args(sim, labels, ref_labels))
    np.testing.assert_array_equal(pos, ref_pos)
    np.testing.assert_array_equal(neg, ref_neg)
    assert (pos.sum(1) <= 1).all() and (neg.sum(1) <= 1).all()


@pytest.mark.parametrize("margin", [0.1, 0.5])
@pytest.mark.parametrize("case", CASE_VALUES, ids=CASE_IDS)
def test_semi_hard_matches_reference(case, margin):
    sim, labels, ref_labels = case
    pos, neg = run(SemiHardMiner(margin), sim, labels, ref_labels)
    ref_pos, ref_neg = ref_semi_hard(*np_args(sim, labels, ref_labels), margin=margin)
    np.testing.assert_array_equal(pos, ref_pos)
    np.testing.assert_array_equal(neg, ref_neg)


def test_semi_hard_selects_something_on_random_data():
    sim, labels, _ = random_case(32, num_classes=4, seed=8)
    pos, neg = SemiHardMiner(0.2)(sim, labels)
    assert pos.any() and neg.any()
    all_pos, all_neg = pair_masks(labels)
    assert (pos & ~all_pos).sum() == 0 and (neg & ~all_neg).sum() == 0
    assert pos.sum() < all_pos.sum() and neg.sum() < all_neg.sum()


@pytest.mark.parametrize("scale,min_epsilon", [(0.5, 0.0), (1.0, 0.05), (0.0, 0.1)])
@pytest.mark.parametrize("case", [c for n, c in CASES if "ties" not in n], ids=[n for n in CASE_IDS if "ties" not in n])
def test_adaptive_ms_matches_reference(case, scale, min_epsilon):
    # (no tie cases: numpy's and torch's std may differ in the last bit, which matters exactly
    # on a boundary)
    sim, labels, ref_labels = case
    miner = AdaptiveMSMiner(scale, min_epsilon)
    args = np_args(sim, labels, ref_labels)
    eps = ref_adaptive_eps(*args, scale=scale, min_epsilon=min_epsilon)
    pos_all, neg_all = pair_masks(labels, ref_labels)
    np.testing.assert_allclose(miner.epsilons(sim, pos_all, neg_all).numpy(), eps, rtol=1e-12, atol=1e-15)
    pos, neg = run(miner, sim, labels, ref_labels)
    ref_pos, ref_neg = ref_ms_miner(*args, per_anchor_eps=eps)
    np.testing.assert_array_equal(pos, ref_pos)
    np.testing.assert_array_equal(neg, ref_neg)


def test_adaptive_ms_is_invariant_to_affine_rescaling_of_similarities():
    sim, labels, _ = random_case(16, num_classes=3, seed=9)
    sim = sim * 0.5  # keep a*S + b away from the float boundary effects of large values
    miner = AdaptiveMSMiner(scale=0.7)
    a = torch.linspace(0.1, 3.0, 16, dtype=torch.float64)[:, None]  # one scale per anchor
    b = torch.linspace(-0.5, 0.5, 16, dtype=torch.float64)[:, None]
    pos, neg = miner(sim, labels)
    pos2, neg2 = miner(a * sim + b, labels)
    assert torch.equal(pos, pos2) and torch.equal(neg, neg2)
    # the fixed-epsilon miner is not invariant: it keeps far more pairs on a squeezed scale
    fixed = MultiSimilarityMiner(0.1)
    squeezed = 0.05 * sim
    assert fixed(squeezed, labels)[1].sum() > fixed(sim, labels)[1].sum()
    assert torch.equal(miner(squeezed, labels)[1], neg)


def test_self_mask_excludes_self_pairs_among_references():
    # references = the batch followed by a memory; self pairs sit in the first B columns
    sim, labels, _ = random_case(6, 10, seed=10)
    ref_labels = torch.cat([labels, torch.tensor([0, 1, 2, 3])])
    self_mask = torch.eye(6, 10, dtype=torch.bool)
    sim[:, :6].fill_diagonal_(1.0)
    args = (sim.numpy(), labels.tolist(), ref_labels.tolist(), self_mask.numpy())
    for miner, ref in [
        (MultiSimilarityMiner(0.1), lambda *a: ref_ms_miner(*a, epsilon=0.1)),
        (BatchHardMiner(), ref_batch_hard),
        (SemiHardMiner(0.1), lambda *a: ref_semi_hard(*a, margin=0.1)),
    ]:
        pos, neg = run(miner, sim, labels, ref_labels, self_mask)
        ref_pos, ref_neg = ref(*args)
        np.testing.assert_array_equal(pos, ref_pos)
        np.testing.assert_array_equal(neg, ref_neg)
        assert not (pos & self_mask.numpy()).any()


def test_miners_ignore_gradients_and_accept_float32():
    sim, labels, _ = random_case(10, seed=11)
    sim32 = sim.float().requires_grad_()
    for name in ["ms", "batch_hard", "semi_hard", "adaptive_ms"]:
        pos, neg = get_miner(name)(sim32, labels)
        ref_pos, ref_neg = get_miner(name)(sim32.detach().double(), labels)
        # float32 rounding can move a pair across a boundary only on a near tie; none here
        assert torch.equal(pos, ref_pos) and torch.equal(neg, ref_neg)


def test_get_miner_names_and_errors():
    assert get_miner("none") is None
    assert isinstance(get_miner("ms", epsilon=0.2), MultiSimilarityMiner)
    assert get_miner("ms", epsilon=0.2).epsilon == 0.2
    assert isinstance(get_miner("batch_hard"), BatchHardMiner)
    assert isinstance(get_miner("semi_hard", margin=0.3), SemiHardMiner)
    assert isinstance(get_miner("adaptive_ms"), AdaptiveMSMiner)
    with pytest.raises(ValueError, match="none, ms, batch_hard, semi_hard, adaptive_ms"):
        get_miner("hardest")
    with pytest.raises(ValueError):
        SemiHardMiner(0.0)


def test_input_validation():
    sim = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="ref_labels"):
        MultiSimilarityMiner()(sim, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError):
        MultiSimilarityMiner()(sim, torch.zeros(2, dtype=torch.long), torch.zeros(4, dtype=torch.long))
