"""Metric-learning losses: multi-similarity (+ cross-batch memory), batch-hard triplet, center loss.

Every loss is a small ``nn.Module`` around a pure, loop-free function. Pair selection (which
positives / negatives an anchor sees) lives in ``helpers.miners`` and follows its convention:
similarities (B, M) of B anchors to M references, bool masks (B, M).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from helpers.miners import pair_masks

__all__ = [
    "log1p_sum_exp",
    "multi_similarity_loss",
    "MultiSimilarityLoss",
    "CrossBatchMemory",
    "pairwise_euclidean",
    "batch_hard_triplet_loss",
    "TripletLoss",
    "CenterLoss",
]

MinerFn = Callable[..., tuple[Tensor, Tensor]]  # see helpers.miners


def _loss_dtype(x: Tensor) -> Tensor:
    """Losses run in float32 at least (float64 stays float64), whatever autocast produced."""
    return x if x.dtype == torch.float64 else x.float()


def log1p_sum_exp(z: Tensor, mask: Tensor) -> Tensor:
    """Row-wise log(1 + sum_{j in mask} exp(z_j)), stable for any z. z, mask (B, M) -> (B,).

    Computed as logsumexp over [0, z masked to -inf]: the constant 0 column keeps the maximum
    finite, so a fully masked row gives exactly log(1) = 0, and masked entries get exactly zero
    gradient (exp(-inf) = 0, and torch.where sends no gradient to the unselected branch).
    """
    z = torch.where(mask, z, torch.full_like(z, float("-inf")))
    return torch.logsumexp(torch.cat([torch.zeros_like(z[:, :1]), z], dim=1), dim=1)


def multi_similarity_loss(
    sim: Tensor, pos_mask: Tensor, neg_mask: Tensor, alpha: float, beta: float, lam: float
) -> Tensor:
    """Multi-similarity loss (Wang et al., CVPR 2019) from a similarity matrix. Scalar.

    sim (B, M); pos_mask, neg_mask (B, M) bool: the pairs each anchor uses.
    L = 1/B sum_i [ 1/alpha log(1 + sum_{p} exp(-alpha (S_ip - lam)))
                  + 1/beta  log(1 + sum_{n} exp( beta (S_in - lam))) ];
    an empty set contributes 0.
    """
    pos_term = log1p_sum_exp(-alpha * (sim - lam), pos_mask) / alpha
    neg_term = log1p_sum_exp(beta * (sim - lam), neg_mask) / beta
    return (pos_term + neg_term).sum() / sim.shape[0]


class MultiSimilarityLoss(nn.Module):
    """Multi-similarity loss on cosine similarities, with an optional miner.

    ``loss(embeddings (B, D), labels (B,))`` -> scalar. Embeddings are L2-normalised inside and
    S = cosine similarity (B, B); for anchor i, P_i = same label and not i, N_i = other labels,
    restricted to the pairs the miner keeps. Runs in float32 (float64 stays) with autocast off.

    Optional references (a cross-batch memory): ``loss(embeddings, labels, ref_embeddings (M, D),
    ref_labels (M,), self_mask (B, M))`` uses S = anchors x references instead; ``self_mask``
    marks references that are the anchor itself (never a pair).
    """

    def __init__(self, alpha: float = 2.0, beta: float = 50.0, lam: float = 0.5, miner: MinerFn | None = None) -> None:
        super().__init__()
        if alpha <= 0 or beta <= 0:
            raise ValueError(f"alpha and beta must be > 0, got alpha={alpha}, beta={beta}")
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.lam = float(lam)
        self.miner = miner

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref_embeddings: Tensor | None = None,
        ref_labels: Tensor | None = None,
        self_mask: Tensor | None = None,
    ) -> Tensor:
        if (ref_embeddings is None) != (ref_labels is None):
            raise ValueError("pass both ref_embeddings and ref_labels, or neither")
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            x = F.normalize(_loss_dtype(embeddings), dim=1)
            refs = x if ref_embeddings is None else F.normalize(ref_embeddings.to(x.dtype), dim=1)
            sim = x @ refs.T
            pos, neg = pair_masks(labels, ref_labels, self_mask)
            if self.miner is not None:
                mined_pos, mined_neg = (
                    self.miner(sim.detach(), labels)
                    if ref_labels is None
                    else self.miner(sim.detach(), labels, ref_labels, self_mask=self_mask)
                )
                pos, neg = pos & mined_pos, neg & mined_neg
            return multi_similarity_loss(sim, pos, neg, self.alpha, self.beta, self.lam)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, lam={self.lam}, miner={self.miner!r}"


class CrossBatchMemory(nn.Module):
    """Cross-batch memory (Wang et al., "Cross-Batch Memory for Embedding Learning", CVPR 2020).

    A FIFO of the ``memory_size`` most recent detached embeddings and labels. Each anchor of a
    batch is compared with B + (filled memory) references: the current batch (with gradient,
    self excluded) followed by the memory (no gradient), in ONE multi-similarity loss, so the
    miner ranks batch and memory pairs together. Slow feature drift makes past embeddings good
    stand-ins for the current ones, which gives far more (and harder) negatives than a batch.

    ``memory(embeddings (B, D), labels (B,))`` -> scalar. The memory is used from call
    ``warmup_steps`` on (early features drift fast) and filled only in training mode, after the
    loss is computed. Memory and pointer are in the state_dict, so a resumed run is exact.
    """

    def __init__(
        self, loss: MultiSimilarityLoss, embedding_dim: int, memory_size: int = 4096, warmup_steps: int = 0
    ) -> None:
        super().__init__()
        if memory_size < 1:
            raise ValueError(f"memory_size must be >= 1, got {memory_size}")
        self.loss = loss
        self.memory_size = int(memory_size)
        self.warmup_steps = int(warmup_steps)
        self.register_buffer("memory_embeddings", torch.zeros(memory_size, embedding_dim))
        self.register_buffer("memory_labels", torch.zeros(memory_size, dtype=torch.long))
        # Python ints: slicing the memory needs no device sync.
        self.num_filled = 0
        self.next_slot = 0
        self.steps = 0

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        if self.steps >= self.warmup_steps and self.num_filled > 0:
            b = embeddings.shape[0]
            refs = torch.cat([embeddings, self.memory_embeddings[: self.num_filled].to(embeddings.dtype)])
            ref_labels = torch.cat([labels, self.memory_labels[: self.num_filled]])
            self_mask = torch.eye(b, refs.shape[0], dtype=torch.bool, device=embeddings.device)
            loss = self.loss(embeddings, labels, refs, ref_labels, self_mask)
        else:
            loss = self.loss(embeddings, labels)
        if self.training:
            self.enqueue(embeddings.detach(), labels)
            self.steps += 1
        return loss

    @torch.no_grad()
    def enqueue(self, embeddings: Tensor, labels: Tensor) -> None:
        """Write a batch into the FIFO, overwriting the oldest entries (keeps the last
        memory_size rows when the batch is larger than the memory)."""
        embeddings, labels = embeddings[-self.memory_size :], labels[-self.memory_size :]
        b = embeddings.shape[0]
        slots = (torch.arange(b, device=self.memory_labels.device) + self.next_slot) % self.memory_size
        self.memory_embeddings.index_copy_(0, slots, embeddings.to(self.memory_embeddings))
        self.memory_labels.index_copy_(0, slots, labels.to(self.memory_labels))
        self.next_slot = (self.next_slot + b) % self.memory_size
        self.num_filled = min(self.num_filled + b, self.memory_size)

    def reset(self) -> None:
        """Empty the memory (e.g. when the embedding changes abruptly)."""
        self.num_filled = self.next_slot = self.steps = 0

    def get_extra_state(self) -> dict[str, int]:
        return {"num_filled": self.num_filled, "next_slot": self.next_slot, "steps": self.steps}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.num_filled = int(state["num_filled"])
        self.next_slot = int(state["next_slot"])
        self.steps = int(state["steps"])

    def extra_repr(self) -> str:
        return f"memory_size={self.memory_size}, warmup_steps={self.warmup_steps}"


def pairwise_euclidean(x: Tensor) -> Tensor:
    """(B, D) -> (B, B) Euclidean (not squared) distances with a finite gradient everywhere.

    sqrt has an infinite derivative at 0 (identical embeddings, and always the diagonal): where
    the squared distance is <= 0 the distance is set to exactly 0 through a double torch.where,
    so neither the value nor the gradient of the masked branch can be inf or NaN.
    """
    sq_norm = (x * x).sum(dim=1)
    sq_dist = (sq_norm[:, None] + sq_norm[None, :] - 2 * (x @ x.T)).clamp(min=0)
    positive = sq_dist > 0
    safe = torch.where(positive, sq_dist, torch.ones_like(sq_dist))
    return torch.where(positive, safe.sqrt(), torch.zeros_like(sq_dist))


def batch_hard_triplet_loss(dist: Tensor, labels: Tensor, margin: float, soft_margin: bool = False) -> Tensor:
    """Batch-hard triplet loss (Hermans et al., 2017) from a distance matrix. Scalar.

    dist (B, B), labels (B,). Per anchor with >= 1 positive and >= 1 negative:
    relu(max_p d_ip - min_n d_in + margin), or softplus(max_p d_ip - min_n d_in) with a soft
    margin; the mean over those anchors, a grad-connected 0 when there is none.
    """
    pos, neg = pair_masks(labels)
    has_pos, has_neg = pos.any(dim=1), neg.any(dim=1)
    valid = has_pos & has_neg
    hardest_pos = torch.where(has_pos, dist.masked_fill(~pos, float("-inf")).amax(dim=1), torch.zeros_like(dist[:, 0]))
    hardest_neg = torch.where(has_neg, dist.masked_fill(~neg, float("inf")).amin(dim=1), torch.zeros_like(dist[:, 0]))
    gap = hardest_pos - hardest_neg
    per_anchor = F.softplus(gap) if soft_margin else F.relu(gap + margin)
    per_anchor = torch.where(valid, per_anchor, torch.zeros_like(per_anchor))
    return per_anchor.sum() / valid.sum().clamp(min=1)


class TripletLoss(nn.Module):
    """Batch-hard triplet loss on Euclidean distances of the embeddings as given (no normalisation).

    ``loss(embeddings (B, D), labels (B,))`` -> scalar. See ``batch_hard_triplet_loss``.
    Batches should be class-balanced (P classes x K images) so every anchor has positives.
    """

    def __init__(self, margin: float = 0.2, soft_margin: bool = False) -> None:
        super().__init__()
        self.margin = float(margin)
        self.soft_margin = bool(soft_margin)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            dist = pairwise_euclidean(_loss_dtype(embeddings))
            return batch_hard_triplet_loss(dist, labels, self.margin, self.soft_margin)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, soft_margin={self.soft_margin}"


class CenterLoss(nn.Module):
    """Center loss (Wen et al., ECCV 2016): 0.5 * mean_i ||x_i - c_{y_i}||^2. Scalar.

    ``loss(features (B, dim), labels (B,))``; ``centers`` is an nn.Parameter (num_classes, dim),
    initialised randn. Used as cross-entropy + lambda * center loss, with ``centers`` in their
    own optimizer parameter group (own learning rate, usually no weight decay): the engine builds
    that group from ``center_loss.parameters()``.
    """

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.centers = nn.Parameter(torch.randn(num_classes, dim))

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        with torch.autocast(device_type=features.device.type, enabled=False):
            x = _loss_dtype(features)
            # index_select, not centers[labels]: the backward of advanced indexing accumulates
            # repeated labels with atomic adds on the CPU, so two identical runs would differ
            diff = x - self.centers.to(x.dtype).index_select(0, labels)
            return 0.5 * (diff * diff).sum(dim=1).mean()

    def extra_repr(self) -> str:
        num_classes, dim = self.centers.shape
        return f"num_classes={num_classes}, dim={dim}"
