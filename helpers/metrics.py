"""Evaluation metrics: retrieval (Recall@K, MAP@R, Precision@K) and classification.

Retrieval metrics rank, for each query, every OTHER item of the same set (leave-one-out, the
query itself excluded) by cosine similarity. Queries without a positive (their class has no
other item in the set) are EXCLUDED from every retrieval metric, the convention of
pytorch-metric-learning's AccuracyCalculator and of the metric-learning literature: such a
query can only miss, and counting it would penalise the data, not the embedding.
``retrieval_metrics`` reports how many queries were evaluated and how many were excluded; when
no query has a positive every metric is NaN (no error, so a per-epoch evaluation keeps going).

Similarities are computed ``chunk_size`` query rows at a time, so an N x N matrix never sits in
memory (16,185 x 16,185 floats would be 1 GB). All functions accept torch tensors (computed on
their device) or numpy arrays (computed on the CPU).

Tie policy (all retrieval metrics): pessimistic. Items with exactly equal similarity to the query
are ranked with the different-label items first, so a tie never helps the score. The result is a
lower bound that does not depend on sort stability, item order or chunk size. With it the metrics
need no full sort: the k-th most similar positive of a query sits at rank
    rank_k = k + #{negatives with similarity >= that positive's similarity},
and only the top max(K, R) positives and negatives of each query are needed (``torch.topk``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "recall_at_k",
    "precision_at_k",
    "map_at_r",
    "retrieval_metrics",
    "topk_accuracy",
    "confusion_matrix",
    "per_class_accuracy",
    "most_confused_pairs",
    "nearest_class_mean_predict",
    "knn_predict",
]

ArrayLike = Any  # torch.Tensor or numpy.ndarray


# ----------------------------------------------------------------------------- input handling


def _as_tensor(x: ArrayLike, device: torch.device | None = None) -> Tensor:
    if isinstance(x, Tensor):
        return x if device is None else x.to(device)
    return torch.as_tensor(np.asarray(x), device=device)


def _embeddings_and_labels(embeddings: ArrayLike, labels: ArrayLike) -> tuple[Tensor, Tensor]:
    """(N, D) float (float64 kept, anything else float32) and (N,) long labels on one device."""
    emb = _as_tensor(embeddings).detach()
    if emb.dim() != 2:
        raise ValueError(f"embeddings must be (N, D), got shape {tuple(emb.shape)}")
    emb = emb if emb.dtype == torch.float64 else emb.float()
    lab = _as_tensor(labels, emb.device).detach().long().reshape(-1)
    if lab.shape[0] != emb.shape[0]:
        raise ValueError(f"{emb.shape[0]} embeddings but {lab.shape[0]} labels")
    return emb, lab


def _check_ks(ks: Sequence[int] | int) -> tuple[int, ...]:
    ks = (ks,) if isinstance(ks, int) else tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    return ks


def _check_chunk_size(chunk_size: int) -> int:
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return int(chunk_size)


# ----------------------------------------------------------------------------- retrieval


def _class_members(labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Items grouped by class, for gathering each query's same-label similarities.

    labels (N,). Returns order (N,) (item indices sorted by label, stable), start (N,) and
    count (N,): the members of item i's class are order[start[i] : start[i] + count[i]].
    """
    order = torch.argsort(labels, stable=True)
    _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    class_start = torch.cumsum(counts, dim=0) - counts
    return order, class_start[inverse], counts[inverse]


def _positive_ranks(
    sim: Tensor, query_index: Tensor, order: Tensor, start: Tensor, count: Tensor, width: int, neg_depth: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Pessimistic ranks of every positive of each query in a chunk, without a full sort.

    sim (c, N) similarities of the chunk's queries to all items (overwritten: same-label
    entries become -inf); query_index (c,) their item indices; order / start / count from
    ``_class_members``, restricted to the chunk for start and count; width W = the largest class
    size. Returns rank (c, W) long, 1-based, of each query's W most similar positives, valid
    (c, W) bool (False past the query's R positives) and R (c,). A rank is exact when <= neg_depth and
    otherwise only known to be > neg_depth, which is all the callers need.
    """
    slot = torch.arange(width, device=sim.device)
    in_class = slot[None, :] < count[:, None]
    members = order[(start[:, None] + slot[None, :]).clamp(max=order.shape[0] - 1)]
    keep = in_class & (members != query_index[:, None])
    neg_inf = float("-inf")
    top_pos = sim.gather(1, members).masked_fill_(~keep, neg_inf).sort(dim=1, descending=True).values
    # Same-label entries (self included) -> -inf, touching only c x W entries; padding slots
    # repeat the class's first member, so duplicate writes agree.
    sim.scatter_(1, torch.where(in_class, members, members[:, :1]), neg_inf)
    top_neg = sim.topk(neg_depth, dim=1).values
    # Negatives with similarity >= the positive's (ties count against the query).
    negatives_before = neg_depth - torch.searchsorted(top_neg.flip(1).contiguous(), top_pos, side="left")
    r = count - 1
    return slot[None, :] + 1 + negatives_before, slot[None, :] < r[:, None], r


def _retrieval_sums(
    embeddings: ArrayLike, labels: ArrayLike, ks: tuple[int, ...], chunk_size: int, with_map: bool
) -> dict[str, Any]:
    """One chunked pass over the queries. Returns per-query results, summed once at the end so
    the totals do not depend on chunk_size: hit (N, len(ks)) bool, precision (N, len(ks))
    float64, ap (N,) float64 (AP@R, only with with_map) and r (N,) long (R, the number of other
    same-label items). Queries with R = 0 have hit, precision and ap 0: the callers leave them
    out through r."""
    emb, lab = _embeddings_and_labels(embeddings, labels)
    chunk_size = _check_chunk_size(chunk_size)
    n, device = emb.shape[0], emb.device
    hit = torch.zeros(n, len(ks), dtype=torch.bool, device=device)
    precision = torch.zeros(n, len(ks), dtype=torch.float64, device=device)
    ap = torch.zeros(n, dtype=torch.float64, device=device)
    r = torch.zeros(n, dtype=torch.long, device=device)
    out = {"hit": hit, "precision": precision, "ap": ap, "r": r}
    if n == 0:
        return out

    x = F.normalize(emb, dim=1)
    order, start, count = _class_members(lab)
    r.copy_(count - 1)
    width = int(count.max())  # the one device sync
    neg_depth = max(ks)
    if with_map:
        neg_depth = max(neg_depth, width - 1)
    neg_depth = max(1, min(neg_depth, n))
    ks_t = torch.tensor(ks, device=device)
    for begin in range(0, n, chunk_size):
        rows = slice(begin, min(begin + chunk_size, n))
        sim = x[rows] @ x.T  # (c, N)
        query_index = torch.arange(rows.start, rows.stop, device=device)
        rank, valid, r_chunk = _positive_ranks(sim, query_index, order, start[rows], count[rows], width, neg_depth)
        depth = min(rank.shape[1], max(ks))
        in_top_k = valid[:, :depth, None] & (rank[:, :depth, None] <= ks_t)  # (c, depth, len(ks))
        hit[rows] = in_top_k[:, 0, :]
        precision[rows] = in_top_k.sum(dim=1).double() / ks_t
        if with_map:
            in_top_r = valid & (rank <= r_chunk[:, None])
            precision_at_rank = torch.arange(1, rank.shape[1] + 1, device=device, dtype=torch.float64) / rank
            ap[rows] = (precision_at_rank * in_top_r).sum(dim=1) / r_chunk.clamp(min=1)
    return out


def _fractions(per_query: Tensor, r: Tensor, ks: tuple[int, ...]) -> dict[int, float]:
    """Column means of (N, len(ks)) per-query values over the queries with R > 0 (r (N,)) as
    {K: float}; NaN for every K when no query has a positive."""
    has_positive = r > 0
    queries = int(has_positive.sum())
    if queries == 0:
        return {k: float("nan") for k in ks}
    values = (per_query[has_positive].double().sum(dim=0) / queries).tolist()
    return dict(zip(ks, values))


def _map_value(out: dict[str, Tensor]) -> float:
    """Mean AP@R over the queries with R > 0; NaN when there are none."""
    has_positive = out["r"] > 0
    queries = int(has_positive.sum())
    return float(out["ap"][has_positive].sum()) / queries if queries > 0 else float("nan")


def recall_at_k(
    embeddings: ArrayLike, labels: ArrayLike, ks: Sequence[int] = (1, 2, 4, 8), chunk_size: int = 1024
) -> dict[int, float]:
    """Standard retrieval Recall@K, leave-one-out, cosine similarity. {K: fraction in [0, 1]}.

    embeddings (N, D), labels (N,). For each query every OTHER item is ranked; the query hits at
    K if at least one of its K most similar items has its label; Recall@K = hits / Q over the Q
    queries that have a positive. A query whose class has no other item is excluded (not a
    miss), though it still ranks as a negative for the others; NaN for every K when Q = 0
    (``retrieval_metrics`` also reports Q and the excluded count). Pessimistic ties: with s+ the
    query's highest similarity to a same-label item, it hits at K iff fewer than K different-label
    items have similarity >= s+. Never decreases with K.
    """
    ks = _check_ks(ks)
    sums = _retrieval_sums(embeddings, labels, ks, chunk_size, with_map=False)
    return _fractions(sums["hit"], sums["r"], ks)


def precision_at_k(
    embeddings: ArrayLike, labels: ArrayLike, ks: Sequence[int] = (1, 2, 4, 8), chunk_size: int = 1024
) -> dict[int, float]:
    """Precision@K (the assignment's literal "recall" formula). {K: fraction in [0, 1]}.

    embeddings (N, D), labels (N,). The mean of (number of same-label items among the top K) / K
    over the queries that have a positive (queries whose class has no other item are excluded,
    as in ``recall_at_k``; NaN when none is left), leave-one-out, cosine similarity, pessimistic
    ties; the denominator is K even when fewer than K other items exist.

    It falls as K grows, unlike Recall@K: a class has only so many other images (about 80 per
    Cars-196 class), and even a perfect embedding ranks other classes next once those run out,
    so the top K must contain more and more other classes. It measures how pure the top K is,
    not whether a correct match was found.
    """
    ks = _check_ks(ks)
    sums = _retrieval_sums(embeddings, labels, ks, chunk_size, with_map=False)
    return _fractions(sums["precision"], sums["r"], ks)


def map_at_r(embeddings: ArrayLike, labels: ArrayLike, chunk_size: int = 1024) -> float:
    """MAP@R (Musgrave et al., "A Metric Learning Reality Check", ECCV 2020), leave-one-out, cosine.

    embeddings (N, D), labels (N,). For each query, R = number of OTHER items with its label and
    AP@R = (1/R) sum_{i=1..R} P(i) rel(i) over the top R retrieved items (P(i) = precision at
    rank i, rel(i) = 1 if the item at rank i has the query's label). Queries with R = 0 are
    excluded, as in ``recall_at_k``; the result is the mean over the others (NaN if none).
    Pessimistic ties as in ``recall_at_k``. Needs the top max(R) neighbours of each query (topk, not a full sort).
    """
    return _map_value(_retrieval_sums(embeddings, labels, (1,), chunk_size, with_map=True))


def retrieval_metrics(
    embeddings: ArrayLike, labels: ArrayLike, ks: Sequence[int] = (1, 2, 4, 8), chunk_size: int = 1024
) -> dict[str, float | int]:
    """All retrieval metrics in one chunked pass, embeddings (N, D), labels (N,):
    {"recall@K", "precision@K" for K in ks, "map@r"} (floats) plus "queries" (int, the Q queries
    with a positive that every metric averages over) and "excluded_queries" (int, N - Q: queries
    whose class has no other item, left out of every metric).

    Same definitions and tie policy as ``recall_at_k``, ``precision_at_k`` and ``map_at_r``; every
    metric is NaN when Q = 0.
    """
    ks = _check_ks(ks)
    sums = _retrieval_sums(embeddings, labels, ks, chunk_size, with_map=True)
    recall = _fractions(sums["hit"], sums["r"], ks)
    precision = _fractions(sums["precision"], sums["r"], ks)
    out: dict[str, float | int] = {f"recall@{k}": recall[k] for k in ks}
    out.update({f"precision@{k}": precision[k] for k in ks})
    out["map@r"] = _map_value(sums)
    queries = int((sums["r"] > 0).sum())
    out["queries"] = queries
    out["excluded_queries"] = int(sums["r"].shape[0]) - queries
    return out


# ----------------------------------------------------------------------------- classification


def topk_accuracy(logits: ArrayLike, labels: ArrayLike, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Top-K accuracy. logits (N, C), labels (N,) -> {K: fraction of rows whose label is among
    the K highest scores}. K larger than C counts as C. Ties among scores: torch.topk's choice."""
    ks = _check_ks(ks)
    scores = _as_tensor(logits).detach()
    target = _as_tensor(labels, scores.device).long().reshape(-1)
    if scores.dim() != 2 or scores.shape[0] != target.shape[0]:
        raise ValueError(
            f"logits must be (N, C) with N = len(labels), got {tuple(scores.shape)} and {tuple(target.shape)}"
        )
    num_classes = scores.shape[1]
    top = scores.topk(min(max(ks), num_classes), dim=1).indices
    correct = (top == target[:, None]).cumsum(dim=1).clamp(max=1)  # (N, k): hit within the first j
    n = max(target.shape[0], 1)
    return {k: float(correct[:, min(k, num_classes) - 1].sum()) / n for k in ks}


def confusion_matrix(preds: ArrayLike, labels: ArrayLike, num_classes: int) -> Tensor:
    """LongTensor (C, C) of counts: rows = true class, columns = predicted class.

    preds (N,), labels (N,), integers in [0, num_classes)."""
    p = _as_tensor(preds).long().reshape(-1)
    t = _as_tensor(labels, p.device).long().reshape(-1)
    if p.shape != t.shape:
        raise ValueError(f"{p.shape[0]} predictions but {t.shape[0]} labels")
    if p.numel() and (min(int(p.min()), int(t.min())) < 0 or max(int(p.max()), int(t.max())) >= num_classes):
        raise ValueError(f"predictions and labels must lie in [0, {num_classes})")
    flat = torch.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def per_class_accuracy(confusion: ArrayLike) -> Tensor:
    """(C,) float64 recall of each true class: diagonal / row sum; NaN for a class with no samples."""
    cm = _as_tensor(confusion).double()
    support = cm.sum(dim=1)
    return torch.where(support > 0, cm.diagonal() / support.clamp(min=1), torch.full_like(support, float("nan")))


def most_confused_pairs(confusion: ArrayLike, n: int = 10) -> list[tuple[int, int, int]]:
    """The n largest off-diagonal cells as (true, predicted, count), count descending (ties:
    row-major order); cells with count 0 are left out."""
    cm = _as_tensor(confusion).long()
    num_classes = cm.shape[0]
    off_diagonal = cm.clone()
    off_diagonal.fill_diagonal_(0)
    counts, flat_index = off_diagonal.reshape(-1).sort(descending=True, stable=True)
    keep = min(int(n), int((counts > 0).sum()))
    rows = (flat_index[:keep] // num_classes).tolist()
    cols = (flat_index[:keep] % num_classes).tolist()
    return list(zip(rows, cols, counts[:keep].tolist()))


def _num_classes(train_labels: Tensor, num_classes: int | None) -> int:
    return int(train_labels.max()) + 1 if num_classes is None else int(num_classes)


def nearest_class_mean_predict(
    train_embeddings: ArrayLike,
    train_labels: ArrayLike,
    query_embeddings: ArrayLike,
    metric: str = "euclidean",
    num_classes: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Classify by the nearest class mean in embedding space.

    train_embeddings (N, D), train_labels (N,), query_embeddings (Q, D). metric "euclidean":
    scores = -||q - mean_c|| over plain means; "cosine": scores = cos(q, mean_c) over the means of
    L2-normalised embeddings. A class without training items scores -inf. Returns predictions
    (Q,) long and scores (Q, C) (higher is better, usable with ``topk_accuracy``).
    """
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"unknown metric {metric!r}; valid: 'euclidean', 'cosine'")
    train, lab = _embeddings_and_labels(train_embeddings, train_labels)
    query = _as_tensor(query_embeddings, train.device).detach().to(train.dtype)
    c = _num_classes(lab, num_classes)
    if metric == "cosine":
        train, query = F.normalize(train, dim=1), F.normalize(query, dim=1)
    sums = torch.zeros(c, train.shape[1], dtype=train.dtype, device=train.device).index_add_(0, lab, train)
    counts = torch.bincount(lab, minlength=c)
    means = sums / counts.clamp(min=1)[:, None].to(train.dtype)
    if metric == "cosine":
        scores = query @ F.normalize(means, dim=1).T
    else:
        scores = -torch.cdist(query, means)
    scores = scores.masked_fill(counts[None, :] == 0, float("-inf"))
    return scores.argmax(dim=1), scores


def knn_predict(
    train_embeddings: ArrayLike,
    train_labels: ArrayLike,
    query_embeddings: ArrayLike,
    k: int = 5,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> tuple[Tensor, Tensor]:
    """k-nearest-neighbour majority vote by cosine similarity, in query chunks.

    train_embeddings (N, D), train_labels (N,), query_embeddings (Q, D). Returns predictions
    (Q,) long and scores (Q, C) = votes + (summed similarity of the voters) / (2k + 1), so the
    vote count decides and the summed similarity only breaks ties (it is < 1 in magnitude
    relative to one vote). k larger than N counts as N.
    """
    train, lab = _embeddings_and_labels(train_embeddings, train_labels)
    query = _as_tensor(query_embeddings, train.device).detach().to(train.dtype)
    chunk_size = _check_chunk_size(chunk_size)
    c = _num_classes(lab, num_classes)
    k = max(1, min(int(k), train.shape[0]))
    train, query = F.normalize(train, dim=1), F.normalize(query, dim=1)
    scores = []
    for start in range(0, query.shape[0], chunk_size):
        sim, index = (query[start : start + chunk_size] @ train.T).topk(k, dim=1)
        voter_labels = lab[index]
        votes = torch.zeros(sim.shape[0], c, dtype=train.dtype, device=train.device)
        votes.scatter_add_(1, voter_labels, torch.ones_like(sim))
        sim_sum = torch.zeros_like(votes).scatter_add_(1, voter_labels, sim)
        scores.append(votes + sim_sum / (2 * k + 1))
    all_scores = torch.cat(scores) if scores else torch.zeros(0, c, dtype=train.dtype, device=train.device)
    return all_scores.argmax(dim=1), all_scores
