"""Losses against naive float64 loop references (plain Python over anchors and pairs)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from helpers.losses import (
    CenterLoss,
    CrossBatchMemory,
    MultiSimilarityLoss,
    TripletLoss,
    log1p_sum_exp,
    multi_similarity_loss,
    pairwise_euclidean,
)
from helpers.miners import MultiSimilarityMiner, get_miner

# ----------------------------------------------------------------------------- loop references


def normalise_rows(x):
    return [row / np.linalg.norm(row) for row in np.asarray(x, dtype=np.float64)]


def ref_ms_loss(emb, labels, alpha, beta, lam, keep=None, ref_emb=None, ref_labels=None, self_mask=None):
    """Multi-similarity loss with plain loops; keep(i, j) -> bool restricts the pairs."""
    x = normalise_rows(emb)
    refs = x if ref_emb is None else normalise_rows(ref_emb)
    ref_labels = list(labels) if ref_labels is None else list(ref_labels)
    if ref_emb is None:
        self_mask = np.eye(len(x), dtype=bool)
    total = 0.0
    for i in range(len(x)):
        pos_sum, neg_sum = 0.0, 0.0
        for j in range(len(refs)):
            if self_mask is not None and self_mask[i][j]:
                continue
            if keep is not None and not keep(i, j):
                continue
            s = float(np.dot(x[i], refs[j]))
            if ref_labels[j] == labels[i]:
                pos_sum += math.exp(-alpha * (s - lam))
            else:
                neg_sum += math.exp(beta * (s - lam))
        total += math.log(1 + pos_sum) / alpha + math.log(1 + neg_sum) / beta
    return total / len(x)


def ref_ms_loss_with_ms_miner(emb, labels, alpha, beta, lam, epsilon):
    """Independent full loop: MS mining then MS loss, nothing from the package."""
    x = normalise_rows(emb)
    n = len(x)
    sim = [[float(np.dot(x[i], x[j])) for j in range(n)] for i in range(n)]
    total = 0.0
    for i in range(n):
        pos = [j for j in range(n) if j != i and labels[j] == labels[i]]
        neg = [j for j in range(n) if labels[j] != labels[i]]
        min_pos = min((sim[i][p] for p in pos), default=math.inf)
        max_neg = max((sim[i][q] for q in neg), default=-math.inf)
        pos_sum = sum(math.exp(-alpha * (sim[i][p] - lam)) for p in pos if sim[i][p] - epsilon < max_neg)
        neg_sum = sum(math.exp(beta * (sim[i][q] - lam)) for q in neg if sim[i][q] + epsilon > min_pos)
        total += math.log1p(pos_sum) / alpha + math.log1p(neg_sum) / beta
    return total / n


def ref_triplet(emb, labels, margin, soft_margin=False):
    x = np.asarray(emb, dtype=np.float64)
    losses = []
    for i in range(len(x)):
        pos = [np.linalg.norm(x[i] - x[j]) for j in range(len(x)) if j != i and labels[j] == labels[i]]
        neg = [np.linalg.norm(x[i] - x[j]) for j in range(len(x)) if labels[j] != labels[i]]
        if not pos or not neg:
            continue
        gap = max(pos) - min(neg)
        losses.append(math.log1p(math.exp(gap)) if soft_margin else max(gap + margin, 0.0))
    return sum(losses) / len(losses) if losses else 0.0


def ref_center(features, labels, centers):
    total = 0.0
    for x, y in zip(np.asarray(features, np.float64), labels):
        total += 0.5 * float(np.sum((x - np.asarray(centers, np.float64)[y]) ** 2))
    return total / len(labels)


# ----------------------------------------------------------------------------- data


def batch(b=12, d=8, num_classes=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(b, d, generator=g, dtype=dtype)
    labels = torch.arange(b) % num_classes
    return emb, labels


EDGE_BATCHES = {
    "random": batch(),
    "singletons": (batch(6)[0], torch.tensor([0, 1, 2, 3, 3, 4])),  # classes 0, 1, 2, 4 have no positive
    "one_class": (batch(5)[0], torch.zeros(5, dtype=torch.long)),  # no negatives
    "single_item": (batch(1)[0], torch.tensor([3])),
    "duplicates": (batch(3)[0].repeat(2, 1), torch.tensor([0, 1, 2, 0, 1, 2])),  # exact ties, S = 1
}
EDGE_IDS = list(EDGE_BATCHES)
EDGE_VALUES = list(EDGE_BATCHES.values())


def assert_finite_grad(loss, *tensors):
    loss.backward()
    for t in tensors:
        assert t.grad is not None and torch.isfinite(t.grad).all()


# ----------------------------------------------------------------------------- multi-similarity


@pytest.mark.parametrize("params", [(2.0, 50.0, 0.5), (1.0, 10.0, 0.0), (5.0, 200.0, 0.8)])
@pytest.mark.parametrize("case", EDGE_VALUES, ids=EDGE_IDS)
def test_ms_loss_matches_reference_without_miner(case, params):
    emb, labels = case
    alpha, beta, lam = params
    emb = emb.clone().requires_grad_()
    loss = MultiSimilarityLoss(alpha, beta, lam)(emb, labels)
    expected = ref_ms_loss(emb.detach().numpy(), labels.tolist(), alpha, beta, lam)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)
    assert_finite_grad(loss, emb)


@pytest.mark.parametrize("miner_name", ["ms", "batch_hard", "semi_hard", "adaptive_ms"])
@pytest.mark.parametrize("case", EDGE_VALUES, ids=EDGE_IDS)
def test_ms_loss_with_each_miner_matches_reference(case, miner_name):
    # The miners themselves are checked against loops in test_miners.py; here: the composition.
    emb, labels = case
    emb = emb.clone().requires_grad_()
    miner = get_miner(miner_name)
    loss = MultiSimilarityLoss(miner=miner)(emb, labels)
    x = torch.nn.functional.normalize(emb.detach(), dim=1)
    pos, neg = miner(x @ x.T, labels)
    kept = (pos | neg).numpy()
    expected = ref_ms_loss(emb.detach().numpy(), labels.tolist(), 2.0, 50.0, 0.5, keep=lambda i, j: kept[i, j])
    assert loss.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)
    assert_finite_grad(loss, emb)


@pytest.mark.parametrize("epsilon", [0.1, 0.5])
@pytest.mark.parametrize("case", EDGE_VALUES, ids=EDGE_IDS)
def test_ms_loss_with_ms_miner_matches_independent_loop(case, epsilon):
    emb, labels = case
    loss = MultiSimilarityLoss(2.0, 50.0, 0.5, miner=MultiSimilarityMiner(epsilon))(emb, labels)
    expected = ref_ms_loss_with_ms_miner(emb.numpy(), labels.tolist(), 2.0, 50.0, 0.5, epsilon)
    assert loss.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_ms_loss_mining_changes_the_value():
    emb, labels = batch(16, 4, 4, seed=1)
    plain = MultiSimilarityLoss()(emb, labels)
    mined = MultiSimilarityLoss(miner=MultiSimilarityMiner(0.1))(emb, labels)
    assert mined.item() < plain.item()


def test_ms_loss_float32_close_to_float64_reference():
    emb, labels = batch(32, 16, 8, seed=2, dtype=torch.float32)
    loss = MultiSimilarityLoss()(emb, labels)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref_ms_loss(emb.numpy(), labels.tolist(), 2.0, 50.0, 0.5), rel=1e-5)


@pytest.mark.parametrize("beta", [1e3, 1e4])
def test_ms_loss_large_beta_does_not_overflow(beta):
    # near-identical embeddings with different labels: S ~ 1, beta * (S - lam) ~ beta / 2
    g = torch.Generator().manual_seed(3)
    base = torch.randn(1, 16, generator=g)
    emb = (base + 1e-3 * torch.randn(8, 16, generator=g)).requires_grad_()
    labels = torch.arange(8) % 4
    loss = MultiSimilarityLoss(beta=beta)(emb, labels)
    assert torch.isfinite(loss)
    assert_finite_grad(loss, emb)
    if beta == 1e3:  # exp(500) still fits a float64 for the naive reference
        expected = ref_ms_loss(emb.detach().double().numpy(), labels.tolist(), 2.0, beta, 0.5)
        assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_log1p_sum_exp_masked_entries_get_exactly_zero_gradient():
    z = torch.tensor([[1e4, -3.0, 2.0], [5.0, 6.0, 7.0], [0.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, False, True], [False, False, False], [True, True, True]])
    out = log1p_sum_exp(z, mask)
    assert out[1].item() == 0.0  # empty set: log(1 + 0)
    assert out[0].item() == pytest.approx(1e4)
    assert out[2].item() == pytest.approx(math.log(4.0))
    out.sum().backward()
    assert torch.isfinite(z.grad).all()
    assert (z.grad[~mask] == 0).all()
    assert z.grad[0, 0].item() == pytest.approx(1.0)
    assert z.grad[2].tolist() == pytest.approx([0.25, 0.25, 0.25])


def test_ms_core_zero_gradient_for_pairs_not_kept():
    g = torch.Generator().manual_seed(4)
    sim = (torch.rand(5, 5, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_()
    pos = torch.rand(5, 5, generator=g) < 0.3
    neg = ~pos & (torch.rand(5, 5, generator=g) < 0.5)
    neg[2] = False
    pos[2] = False  # a row with nothing kept
    multi_similarity_loss(sim, pos, neg, 2.0, 1e4, 0.5).backward()
    assert torch.isfinite(sim.grad).all()
    assert (sim.grad[~(pos | neg)] == 0).all()
    assert (sim.grad[2] == 0).all()


def test_ms_loss_gradcheck():
    emb, labels = batch(6, 3, 3, seed=5)
    loss = MultiSimilarityLoss(2.0, 10.0, 0.5)
    assert torch.autograd.gradcheck(lambda e: loss(e, labels), (emb.clone().requires_grad_(),))


def test_ms_loss_with_references_matches_reference():
    emb, labels = batch(6, 5, 3, seed=6)
    refs, ref_labels = batch(10, 5, 3, seed=7)
    loss = MultiSimilarityLoss()(emb, labels, refs, ref_labels)
    expected = ref_ms_loss(
        emb.numpy(), labels.tolist(), 2.0, 50.0, 0.5, ref_emb=refs.numpy(), ref_labels=ref_labels.tolist()
    )
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    with pytest.raises(ValueError):
        MultiSimilarityLoss()(emb, labels, refs)


def test_ms_loss_runs_in_float32_under_autocast():
    emb, labels = batch(8, 4, 2, seed=8, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = MultiSimilarityLoss()(emb.bfloat16(), labels)
    assert loss.dtype == torch.float32


# ----------------------------------------------------------------------------- cross-batch memory


def test_cross_batch_memory_matches_reference_over_steps():
    torch.manual_seed(0)
    memory_size, dim = 10, 5
    xbm = CrossBatchMemory(MultiSimilarityLoss(miner=MultiSimilarityMiner(0.1)), dim, memory_size)
    history_emb, history_lab = [], []
    for step in range(5):  # 4 items per step: the FIFO wraps around at step 3
        emb, labels = batch(4, dim, 2, seed=100 + step, dtype=torch.float32)
        labels = labels + step % 3
        emb.requires_grad_()
        loss = xbm(emb, labels)
        memory_emb = [e for b_ in history_emb for e in b_][-memory_size:]
        memory_lab = [y for b_ in history_lab for y in b_][-memory_size:]
        refs = np.concatenate([emb.detach().numpy(), np.array(memory_emb).reshape(-1, dim)])
        ref_labels = labels.tolist() + memory_lab
        self_mask = np.zeros((4, len(refs)), dtype=bool)
        self_mask[:, :4] = np.eye(4, dtype=bool)
        x, r = normalise_rows(emb.detach().numpy()), normalise_rows(refs)
        sim = [[float(np.dot(x[i], r[j])) for j in range(len(r))] for i in range(4)]

        def keep(i, j):  # MS mining over batch + memory, self excluded
            pos = [sim[i][k] for k in range(len(r)) if ref_labels[k] == labels[i] and not self_mask[i][k]]
            neg = [sim[i][k] for k in range(len(r)) if ref_labels[k] != labels[i]]
            if ref_labels[j] == labels[i]:
                return sim[i][j] - 0.1 < max(neg, default=-math.inf)
            return sim[i][j] + 0.1 > min(pos, default=math.inf)

        expected = ref_ms_loss(
            emb.detach().numpy(),
            labels.tolist(),
            2.0,
            50.0,
            0.5,
            keep=keep,
            ref_emb=refs,
            ref_labels=ref_labels,
            self_mask=self_mask,
        )
        assert loss.item() == pytest.approx(expected, rel=1e-4, abs=1e-6), step
        assert_finite_grad(loss, emb)
        history_emb.append(list(emb.detach().numpy()))
        history_lab.append(labels.tolist())
    assert xbm.num_filled == memory_size


def test_cross_batch_memory_fifo_state_and_eval_mode():
    xbm = CrossBatchMemory(MultiSimilarityLoss(), embedding_dim=2, memory_size=5, warmup_steps=2)
    for step in range(3):
        emb = torch.full((2, 2), float(step)) + torch.tensor([[0.0, 1.0], [1.0, 0.0]])
        xbm(emb, torch.tensor([step, step]))
    # 6 items written into 5 slots: the first one was overwritten by the last
    assert xbm.memory_labels.tolist() == [2, 0, 1, 1, 2]
    assert (xbm.num_filled, xbm.next_slot, xbm.steps) == (5, 1, 3)
    state = xbm.state_dict()
    clone = CrossBatchMemory(MultiSimilarityLoss(), embedding_dim=2, memory_size=5, warmup_steps=2)
    clone.load_state_dict(state)
    assert (clone.num_filled, clone.next_slot, clone.steps) == (5, 1, 3)
    assert torch.equal(clone.memory_embeddings, xbm.memory_embeddings)
    clone.eval()
    clone(torch.randn(2, 2), torch.tensor([0, 1]))
    assert clone.steps == 3 and torch.equal(clone.memory_embeddings, xbm.memory_embeddings)
    big = torch.arange(14.0).reshape(7, 2)  # a batch larger than the memory keeps its last 5 rows
    clone.train()
    clone.enqueue(big, torch.arange(7))
    assert sorted(clone.memory_labels.tolist()) == [2, 3, 4, 5, 6]


def test_cross_batch_memory_warmup_uses_batch_only():
    xbm = CrossBatchMemory(MultiSimilarityLoss(), embedding_dim=4, memory_size=8, warmup_steps=1)
    emb, labels = batch(4, 4, 2, seed=9, dtype=torch.float32)
    first = xbm(emb, labels)
    assert first.item() == pytest.approx(MultiSimilarityLoss()(emb, labels).item())
    second = xbm(emb, labels)  # now against batch + memory (the same items once more)
    assert second.item() != pytest.approx(first.item())


# ----------------------------------------------------------------------------- triplet


@pytest.mark.parametrize("soft_margin", [False, True])
@pytest.mark.parametrize("margin", [0.2, 1.0])
@pytest.mark.parametrize("case", EDGE_VALUES, ids=EDGE_IDS)
def test_triplet_matches_reference(case, margin, soft_margin):
    emb, labels = case
    emb = emb.clone().requires_grad_()
    loss = TripletLoss(margin, soft_margin)(emb, labels)
    expected = ref_triplet(emb.detach().numpy(), labels.tolist(), margin, soft_margin)
    assert loss.item() == pytest.approx(expected, rel=1e-6, abs=1e-6)
    assert loss.requires_grad
    assert_finite_grad(loss, emb)


def test_triplet_identical_embeddings_have_finite_gradient():
    emb = torch.ones(6, 4, requires_grad=True)  # every distance is exactly 0
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    loss = TripletLoss(margin=0.2)(emb, labels)
    assert loss.item() == pytest.approx(0.2)
    assert_finite_grad(loss, emb)
    d = pairwise_euclidean(emb)
    assert (d == 0).all()


def test_triplet_no_valid_anchor_gives_grad_connected_zero():
    emb = torch.randn(4, 3, requires_grad=True)
    for labels in [torch.zeros(4, dtype=torch.long), torch.arange(4)]:
        loss = TripletLoss()(emb, labels)
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
        assert torch.equal(emb.grad, torch.zeros_like(emb))


def test_triplet_uses_unnormalised_euclidean_distance():
    emb = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 0.0]])  # anchor 0: pos at 5, neg at 1
    labels = torch.tensor([0, 0, 1])
    loss = TripletLoss(margin=0.5)(emb, labels)
    # anchors 0: 5 - 1 + .5; 1: 5 - sqrt(4 + 16) + .5; 2: no positive
    assert loss.item() == pytest.approx((4.5 + 5.5 - math.sqrt(20)) / 2, rel=1e-6)


def test_pairwise_euclidean_matches_loop_and_gradcheck():
    emb, _ = batch(7, 5, seed=10)
    d = pairwise_euclidean(emb)
    x = emb.numpy()
    for i in range(7):
        for j in range(7):
            assert d[i, j].item() == pytest.approx(np.linalg.norm(x[i] - x[j]), abs=1e-7)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0])
    assert torch.autograd.gradcheck(lambda e: TripletLoss(0.3, True)(e, labels), (emb.clone().requires_grad_(),))


# ----------------------------------------------------------------------------- center loss


@pytest.mark.parametrize("case", EDGE_VALUES, ids=EDGE_IDS)
def test_center_loss_matches_reference(case):
    emb, labels = case
    center = CenterLoss(num_classes=5, dim=emb.shape[1]).double()
    features = emb.clone().requires_grad_()
    loss = center(features, labels)
    expected = ref_center(emb.numpy(), labels.tolist(), center.centers.detach().numpy())
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert_finite_grad(loss, features, center.centers)


def test_center_loss_gradient_wrt_centers():
    torch.manual_seed(0)
    center = CenterLoss(num_classes=4, dim=3)
    assert isinstance(center.centers, torch.nn.Parameter) and center.centers.shape == (4, 3)
    features = torch.randn(9, 3)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 1])  # class 3 absent
    center(features, labels).backward()
    c, x = center.centers.detach().numpy().astype(np.float64), features.numpy().astype(np.float64)
    expected = np.zeros_like(c)
    for xi, yi in zip(x, labels.tolist()):  # d/dc_k 0.5/B sum ||x_i - c_k||^2 = -(x_i - c_k)/B
        expected[yi] -= (xi - c[yi]) / len(x)
    np.testing.assert_allclose(center.centers.grad.numpy(), expected, rtol=1e-5, atol=1e-7)
    assert (center.centers.grad[3] == 0).all()


def test_center_loss_gradient_is_bit_identical_when_repeated():
    """Many samples of few classes: the centers' gradient sums repeated labels, and must do so in a
    fixed order (advanced indexing's backward on the CPU does not), or a rerun is not exact."""
    torch.manual_seed(0)
    center = CenterLoss(num_classes=20, dim=512)
    features, labels = torch.randn(256, 512), torch.randint(0, 20, (256,))
    grads = []
    for _ in range(30):
        center.centers.grad = None
        center(features, labels).backward()
        grads.append(center.centers.grad.clone())
    assert all(torch.equal(grads[0], g) for g in grads[1:])


def test_center_loss_gradcheck():
    center = CenterLoss(3, 4).double()
    labels = torch.tensor([0, 2, 2, 1])
    feats = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f: center(f, labels), (feats,))
