"""Pair miners for metric learning: which (anchor, reference) pairs a pair-based loss keeps.

One interface for every miner::

    pos_keep, neg_keep = miner(sim, labels, ref_labels=None, self_mask=None)

* ``sim`` (B, M): similarity of B anchors to M reference items (the miner never needs gradients;
  losses pass ``sim.detach()``).
* ``labels`` (B,): anchor labels. ``ref_labels`` (M,): reference labels. When ``ref_labels`` is
  None the references ARE the anchors (M = B) and the diagonal is self, never a pair.
* ``self_mask`` (B, M) bool, optional: pairs that are an item with itself when the references
  contain the anchors among other items (a cross-batch memory concatenates the batch with past
  embeddings: the first B columns are the anchors). Defaults to the identity when ``ref_labels``
  is None and to "no self pairs" otherwise.
* Returns two bool (B, M) masks: positive pairs (same label, not self) and negative pairs
  (different label) to keep. A miner only ever removes pairs, it never adds any.

Every miner is a small class whose ``select(sim, pos, neg)`` is the pure, loop-free core.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "pair_masks",
    "Miner",
    "MultiSimilarityMiner",
    "AdaptiveMSMiner",
    "BatchHardMiner",
    "SemiHardMiner",
    "MINER_NAMES",
    "get_miner",
]


def pair_masks(
    labels: Tensor, ref_labels: Tensor | None = None, self_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """All positive and negative pairs of B anchors against M references.

    labels (B,), ref_labels (M,) or None (references = anchors, self on the diagonal),
    self_mask (B, M) bool or None. Returns (pos, neg), bool (B, M): pos = same label and not
    self, neg = different label.
    """
    if ref_labels is None:
        ref_labels = labels
        if self_mask is None:
            self_mask = torch.eye(labels.shape[0], dtype=torch.bool, device=labels.device)
    same = labels[:, None] == ref_labels[None, :]
    pos = same & ~self_mask if self_mask is not None else same
    return pos, ~same


def _check_inputs(sim: Tensor, labels: Tensor, ref_labels: Tensor | None, self_mask: Tensor | None) -> None:
    if sim.dim() != 2:
        raise ValueError(f"sim must be (B, M), got shape {tuple(sim.shape)}")
    b, m = sim.shape
    if labels.shape != (b,):
        raise ValueError(f"labels must be ({b},) to match sim {tuple(sim.shape)}, got {tuple(labels.shape)}")
    if ref_labels is None and m != b:
        raise ValueError(f"sim is {tuple(sim.shape)}: pass ref_labels when the references are not the anchors")
    if ref_labels is not None and ref_labels.shape != (m,):
        raise ValueError(f"ref_labels must be ({m},) to match sim {tuple(sim.shape)}, got {tuple(ref_labels.shape)}")
    if self_mask is not None and self_mask.shape != sim.shape:
        raise ValueError(f"self_mask must be {tuple(sim.shape)}, got {tuple(self_mask.shape)}")


class Miner:
    """Base class: validates inputs, builds all pairs, and lets ``select`` prune them."""

    def __call__(
        self,
        sim: Tensor,
        labels: Tensor,
        ref_labels: Tensor | None = None,
        self_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        _check_inputs(sim, labels, ref_labels, self_mask)
        pos, neg = pair_masks(labels, ref_labels, self_mask)
        return self.select(sim.detach(), pos, neg)

    def select(self, sim: Tensor, pos: Tensor, neg: Tensor) -> tuple[Tensor, Tensor]:
        """Pure core. sim (B, M); pos, neg (B, M) bool: all pairs. Returns kept (pos, neg)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


def _hardest_positive_and_negative(sim: Tensor, pos: Tensor, neg: Tensor) -> tuple[Tensor, Tensor]:
    """(B,) lowest positive and highest negative similarity; +inf / -inf for an empty set."""
    min_pos = sim.masked_fill(~pos, float("inf")).amin(dim=1)
    max_neg = sim.masked_fill(~neg, float("-inf")).amax(dim=1)
    return min_pos, max_neg


def _ms_rule(sim: Tensor, pos: Tensor, neg: Tensor, epsilon: Tensor | float) -> tuple[Tensor, Tensor]:
    """The multi-similarity pair rule with a scalar or per-anchor (B, 1) epsilon."""
    min_pos, max_neg = _hardest_positive_and_negative(sim, pos, neg)
    neg_keep = neg & (sim + epsilon > min_pos[:, None])
    pos_keep = pos & (sim - epsilon < max_neg[:, None])
    return pos_keep, neg_keep


class MultiSimilarityMiner(Miner):
    """Multi-similarity pair mining (Wang et al., CVPR 2019), with strict inequalities.

    Keep negative n of anchor i if S_in + epsilon > min_p S_ip, and positive p if
    S_ip - epsilon < max_n S_in, the min / max running over ALL positives / negatives of i.
    min over no positives = +inf and max over no negatives = -inf: an anchor without positives
    keeps no negatives and an anchor without negatives keeps no positives.
    """

    def __init__(self, epsilon: float = 0.1) -> None:
        self.epsilon = float(epsilon)

    def select(self, sim: Tensor, pos: Tensor, neg: Tensor) -> tuple[Tensor, Tensor]:
        return _ms_rule(sim, pos, neg, self.epsilon)


class AdaptiveMSMiner(Miner):
    """Multi-similarity mining with a hardness-adaptive, per-anchor epsilon (this project's idea).

    epsilon_i = max(scale * std_i, min_epsilon), with std_i the (population) standard deviation
    of anchor i's similarities to all its references (positives and negatives, never self);
    then the MultiSimilarityMiner rule with epsilon_i.

    Why: the fixed epsilon = 0.1 of MS mining is an absolute slack in cosine units, but the spread
    of cosine similarities changes a lot during training. At the start (pretrained backbone, fresh
    embedding layer) the similarities of an anchor are squeezed into a narrow band, so 0.1 is
    several standard deviations wide and almost every pair passes: no mining at all. Late in
    training the spread is large and 0.1 keeps only a thin boundary layer. Measuring the slack in
    units of each anchor's own spread keeps the mined hardness constant: the selection is
    invariant to S_i -> a S_i + b (a > 0) for every anchor row, so it tracks the geometry of the
    embedding rather than its scale. It costs one masked mean and variance per anchor.
    Whether it beats the fixed epsilon is an empirical question for the ablation table.
    """

    def __init__(self, scale: float = 0.5, min_epsilon: float = 0.0) -> None:
        self.scale = float(scale)
        self.min_epsilon = float(min_epsilon)

    def epsilons(self, sim: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
        """(B,) per-anchor epsilon; 0 spread (and min_epsilon) for an anchor with < 2 references."""
        ref = pos | neg
        count = ref.sum(dim=1).clamp(min=1)
        mean = sim.masked_fill(~ref, 0).sum(dim=1) / count
        var = ((sim - mean[:, None]) ** 2).masked_fill(~ref, 0).sum(dim=1) / count
        return (self.scale * var.sqrt()).clamp(min=self.min_epsilon)

    def select(self, sim: Tensor, pos: Tensor, neg: Tensor) -> tuple[Tensor, Tensor]:
        return _ms_rule(sim, pos, neg, self.epsilons(sim, pos, neg)[:, None])


class BatchHardMiner(Miner):
    """Per anchor, the hardest positive (lowest S) and the hardest negative (highest S).

    An anchor keeps its hardest positive if it has one and its hardest negative if it has one
    (so a pair loss still sees the positive of an anchor that has no negative). Ties: the first
    reference index wins.
    """

    def select(self, sim: Tensor, pos: Tensor, neg: Tensor) -> tuple[Tensor, Tensor]:
        hardest_pos = sim.masked_fill(~pos, float("inf")).argmin(dim=1, keepdim=True)
        hardest_neg = sim.masked_fill(~neg, float("-inf")).argmax(dim=1, keepdim=True)
        pos_keep = torch.zeros_like(pos).scatter_(1, hardest_pos, pos.any(dim=1, keepdim=True))
        neg_keep = torch.zeros_like(neg).scatter_(1, hardest_neg, neg.any(dim=1, keepdim=True))
        return pos_keep, neg_keep


class SemiHardMiner(Miner):
    """Semi-hard mining (FaceNet, Schroff et al. 2015) in similarity terms.

    A negative n of anchor i is semi-hard w.r.t. a positive p of i if
        S_in < S_ip < S_in + margin,
    i.e. it is less similar than the positive (the triplet is already ordered correctly) but
    within the margin (the triplet still violates it). Kept: every negative that is semi-hard for
    at least one positive of its anchor, and every positive that has at least one semi-hard
    negative. Loop-free: per anchor, count the positives / negatives inside an open interval
    with searchsorted on sorted similarities, O(B M log M), no (B, M, M) tensor.
    """

    def __init__(self, margin: float = 0.1) -> None:
        if margin <= 0:
            raise ValueError(f"SemiHardMiner needs margin > 0, got {margin}")
        self.margin = float(margin)

    def select(self, sim: Tensor, pos: Tensor, neg: Tensor) -> tuple[Tensor, Tensor]:
        inf = float("inf")
        # Excluded entries become +inf: they sort last and never fall inside a finite interval.
        pos_sorted = sim.masked_fill(~pos, inf).sort(dim=1).values
        neg_sorted = sim.masked_fill(~neg, inf).sort(dim=1).values
        sim_c = sim.contiguous()
        # For negative n: #{p : S_in < S_ip < S_in + margin}.
        upper = torch.searchsorted(pos_sorted, (sim_c + self.margin).contiguous(), side="left")
        lower = torch.searchsorted(pos_sorted, sim_c, side="right")
        neg_keep = neg & (upper > lower)
        # For positive p: #{n : S_in < S_ip} - #{n : S_in + margin <= S_ip}.
        below = torch.searchsorted(neg_sorted, sim_c, side="left")
        too_far = torch.searchsorted((neg_sorted + self.margin).contiguous(), sim_c, side="right")
        pos_keep = pos & (below > too_far)
        return pos_keep, neg_keep


MINER_NAMES: dict[str, type[Miner] | None] = {
    "none": None,
    "ms": MultiSimilarityMiner,
    "batch_hard": BatchHardMiner,
    "semi_hard": SemiHardMiner,
    "adaptive_ms": AdaptiveMSMiner,
}


def get_miner(name: str, **kwargs) -> Miner | None:
    """The miner called ``name`` built with ``kwargs``; "none" gives None (keep every pair).

    Valid names: none, ms, batch_hard, semi_hard, adaptive_ms. Anything else raises ValueError.
    """
    key = str(name).strip().lower()
    if key not in MINER_NAMES:
        raise ValueError(f"unknown miner {name!r}; valid names: {', '.join(MINER_NAMES)}")
    miner_cls = MINER_NAMES[key]
    if miner_cls is None:
        if kwargs:
            raise ValueError(f"miner 'none' takes no arguments, got {sorted(kwargs)}")
        return None
    return miner_cls(**kwargs)
