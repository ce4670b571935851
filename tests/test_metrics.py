"""Metrics against naive float64 loop references (plain Python over queries).

Retrieval convention (pytorch-metric-learning's): a query whose class has no other item has no
positive and is excluded from every retrieval metric; NaN when no query is left."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from helpers.metrics import (
    confusion_matrix,
    knn_predict,
    map_at_r,
    most_confused_pairs,
    nearest_class_mean_predict,
    per_class_accuracy,
    precision_at_k,
    recall_at_k,
    retrieval_metrics,
    topk_accuracy,
)

KS = (1, 2, 3, 4, 8, 16)

# ----------------------------------------------------------------------------- loop references


def ref_ranked_relevance(emb, labels):
    """For each query, the relevance (1 = same label) of every other item in ranked order.

    Cosine similarity in float64; pessimistic ties: among equal similarities the different-label
    items come first."""
    x = [row / np.linalg.norm(row) for row in np.asarray(emb, dtype=np.float64)]
    ranked = []
    for q in range(len(x)):
        others = []
        for j in range(len(x)):
            if j != q:
                same = labels[j] == labels[q]
                others.append((-float(np.dot(x[q], x[j])), same))  # False sorts before True
        others.sort()
        ranked.append([int(same) for _, same in others])
    return ranked


def ref_evaluated(emb, labels):
    """Ranked relevance of the queries that have at least one positive, and how many had none."""
    ranked = ref_ranked_relevance(emb, labels)
    evaluated = [rel for rel in ranked if sum(rel) > 0]
    return evaluated, len(ranked) - len(evaluated)


def ref_recall(emb, labels, ks):
    evaluated, _ = ref_evaluated(emb, labels)
    if not evaluated:
        return {k: math.nan for k in ks}
    return {k: sum(1 for rel in evaluated if any(rel[:k])) / len(evaluated) for k in ks}


def ref_precision(emb, labels, ks):
    evaluated, _ = ref_evaluated(emb, labels)
    if not evaluated:
        return {k: math.nan for k in ks}
    return {k: sum(sum(rel[:k]) / k for rel in evaluated) / len(evaluated) for k in ks}


def ref_map_at_r(emb, labels):
    aps = []
    for rel in ref_ranked_relevance(emb, labels):
        r = sum(rel)
        if r == 0:
            continue
        hits, ap = 0, 0.0
        for i in range(r):
            if rel[i]:
                hits += 1
                ap += hits / (i + 1)
        aps.append(ap / r)
    return sum(aps) / len(aps) if aps else math.nan


# ----------------------------------------------------------------------------- data


def clustered(n=60, d=6, num_classes=7, noise=1.0, seed=0):
    """Class centres plus noise: neither perfect nor hopeless retrieval."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    centres = rng.normal(size=(num_classes, d))
    return centres[labels] + noise * rng.normal(size=(n, d)), labels


def axis_ties():
    """Unit axis vectors (some scaled, which normalises back exactly): similarities are exactly
    0, 1 or -1, so there are exact ties everywhere, between and across classes."""
    e = np.eye(3)
    emb = np.array([e[0], 2 * e[0], e[0], e[1], 3 * e[1], -e[0], e[2], e[2], -e[1]])
    labels = np.array([0, 1, 0, 1, 0, 2, 2, 3, 3])
    return emb, labels


def axis_ties_with_singleton():
    """``axis_ties`` plus a lone class-4 item equal to items 6 and 7 (classes 2 and 3): it ties with
    their positives, is excluded as a query and still ranks as a negative for the others."""
    emb, labels = axis_ties()
    return np.vstack([emb, np.eye(3)[2]]), np.append(labels, 4)


def hand_example():
    """Points on the unit circle (degrees, label); ranking computed by hand in the test."""
    angles = np.radians([0, 10, 25, 45, 100, 210])
    return np.stack([np.cos(angles), np.sin(angles)], axis=1), np.array([0, 1, 0, 0, 1, 2])


CASES = {
    "clustered": clustered(),
    "clustered_noisy": clustered(50, 4, 3, noise=3.0, seed=1),
    "ties": axis_ties(),
    "ties_with_singleton": axis_ties_with_singleton(),
    "singletons": (clustered(12, seed=2)[0], np.array([0, 1, 2, 3, 4, 5, 5, 5, 6, 6, 7, 8])),
    "one_class": (clustered(8, seed=3)[0], np.zeros(8, dtype=int)),
    "all_singletons": (clustered(5, seed=4)[0], np.arange(5)),
    "single_item": (np.array([[1.0, 2.0]]), np.array([0])),
    "two_items": (np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([4, 4])),
}
CASE_IDS = list(CASES)
CASE_VALUES = list(CASES.values())


def assert_same_dict(actual, expected):
    assert list(actual) == list(expected)
    for k in expected:
        assert actual[k] == pytest.approx(expected[k], abs=1e-12, nan_ok=True), k


# ----------------------------------------------------------------------------- retrieval


@pytest.mark.parametrize("case", CASE_VALUES, ids=CASE_IDS)
def test_recall_at_k_matches_reference(case):
    emb, labels = case
    assert_same_dict(recall_at_k(torch.from_numpy(emb), torch.from_numpy(labels), KS), ref_recall(emb, labels, KS))


@pytest.mark.parametrize("case", CASE_VALUES, ids=CASE_IDS)
def test_precision_at_k_matches_reference(case):
    emb, labels = case
    assert_same_dict(
        precision_at_k(torch.from_numpy(emb), torch.from_numpy(labels), KS), ref_precision(emb, labels, KS)
    )


@pytest.mark.parametrize("case", CASE_VALUES, ids=CASE_IDS)
def test_map_at_r_matches_reference(case):
    emb, labels = case
    expected = ref_map_at_r(emb, labels)
    actual = map_at_r(torch.from_numpy(emb), torch.from_numpy(labels))
    if math.isnan(expected):
        assert math.isnan(actual)
    else:
        assert actual == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("case", CASE_VALUES, ids=CASE_IDS)
def test_retrieval_metrics_one_pass_agrees(case):
    emb, labels = case
    out = retrieval_metrics(emb, labels, KS, chunk_size=3)
    recall, precision = ref_recall(emb, labels, KS), ref_precision(emb, labels, KS)
    for k in KS:
        assert out[f"recall@{k}"] == pytest.approx(recall[k], abs=1e-12, nan_ok=True)
        assert out[f"precision@{k}"] == pytest.approx(precision[k], abs=1e-12, nan_ok=True)
    expected_map = ref_map_at_r(emb, labels)
    assert out["map@r"] == pytest.approx(expected_map, abs=1e-12, nan_ok=True)
    evaluated, excluded = ref_evaluated(emb, labels)
    assert (out["queries"], out["excluded_queries"]) == (len(evaluated), excluded)
    assert type(out["queries"]) is int and type(out["excluded_queries"]) is int
    assert list(out) == [f"recall@{k}" for k in KS] + [f"precision@{k}" for k in KS] + [
        "map@r",
        "queries",
        "excluded_queries",
    ]


def test_hand_example():
    # Angles (label): A 0 (0), B 10 (1), C 25 (0), D 45 (0), E 100 (1), F 210 (2, alone).
    # Ranked neighbours:   A: B C D E F -> rel 0 1 1 0 0   (R = 2, AP = (0 + 1/2) / 2 = 1/4)
    #                      B: A C D E F -> rel 0 0 0 1 0   (R = 1, AP = 0)
    #                      C: B D A E F -> rel 0 1 1 0 0   (R = 2, AP = 1/4)
    #                      D: C B A E F -> rel 1 0 1 0 0   (R = 2, AP = (1 + 0) / 2 = 1/2)
    #                      E: D C B A F -> rel 0 0 1 0 0   (R = 1, AP = 0)
    #                      F: no other item of class 2: excluded from every metric (5 queries)
    emb, labels = hand_example()
    assert_same_dict(recall_at_k(emb, labels, (1, 2, 4)), {1: 1 / 5, 2: 3 / 5, 4: 5 / 5})
    assert_same_dict(precision_at_k(emb, labels, (1, 2, 4)), {1: 1 / 5, 2: 1.5 / 5, 4: 2 / 5})
    assert map_at_r(emb, labels) == pytest.approx(0.2)
    out = retrieval_metrics(emb, labels, (1, 2, 4))
    assert (out["queries"], out["excluded_queries"]) == (5, 1)


def test_singleton_is_excluded_as_query_but_ranks_as_negative():
    # angles 0 and 20 (class 0), 10 (class 1, alone): each class-0 query has the lone item nearest
    angles = np.radians([0, 20, 10])
    emb, labels = np.stack([np.cos(angles), np.sin(angles)], axis=1), np.array([0, 0, 1])
    out = retrieval_metrics(emb, labels, (1, 2))
    assert out == {
        "recall@1": 0.0,
        "recall@2": 1.0,
        "precision@1": 0.0,
        "precision@2": 0.5,
        "map@r": 0.0,
        "queries": 2,
        "excluded_queries": 1,
    }
    # without the lone item both queries hit at once: it took rank 1 as a negative
    assert recall_at_k(emb[:2], labels[:2], (1,)) == {1: 1.0}


@pytest.mark.parametrize(
    "labels", [np.arange(5), np.array([3]), np.zeros(0, dtype=int)], ids=["all_singletons", "single_item", "empty"]
)
def test_no_query_with_a_positive_gives_nan_and_counts_them(labels):
    emb = clustered(len(labels), seed=4)[0] if len(labels) else np.zeros((0, 6))
    for values in (recall_at_k(emb, labels, (1, 2)), precision_at_k(emb, labels, (1, 2))):
        assert list(values) == [1, 2] and all(math.isnan(v) for v in values.values())
    assert math.isnan(map_at_r(emb, labels))
    out = retrieval_metrics(emb, labels, (1, 2))
    assert all(math.isnan(out[key]) for key in ("recall@1", "recall@2", "precision@1", "precision@2", "map@r"))
    assert (out["queries"], out["excluded_queries"]) == (0, len(labels))


def test_one_class_only_evaluates_every_query():
    emb, _ = clustered(8, seed=3)
    out = retrieval_metrics(emb, np.full(8, 7), (1, 4, 7, 8))
    # every other item is a positive: R = 7 for all 8 queries
    assert (out["queries"], out["excluded_queries"]) == (8, 0)
    assert [out[f"recall@{k}"] for k in (1, 4, 7, 8)] == [1.0, 1.0, 1.0, 1.0]
    assert [out[f"precision@{k}"] for k in (1, 4, 7, 8)] == pytest.approx([1.0, 1.0, 1.0, 7 / 8])
    assert out["map@r"] == 1.0


def test_tie_between_a_positive_and_an_excluded_singleton():
    # query 0's positive (item 1) and the lone class-2 item 2 are equally similar: the tie goes
    # against query 0; item 2 is not a query
    emb = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    labels = np.array([0, 0, 2])
    out = retrieval_metrics(emb, labels, (1, 2))
    assert (out["recall@1"], out["recall@2"], out["queries"], out["excluded_queries"]) == (0.5, 1.0, 2, 1)


def test_precision_falls_while_recall_stays_for_a_perfect_embedding():
    # 10 classes of 2 images, each pair identical and far from the others: a perfect embedding.
    emb = np.repeat(np.eye(10), 2, axis=0)
    labels = np.repeat(np.arange(10), 2)
    ks = (1, 2, 4, 8)
    assert_same_dict(recall_at_k(emb, labels, ks), {k: 1.0 for k in ks})
    assert_same_dict(precision_at_k(emb, labels, ks), {k: 1 / k for k in ks})
    assert map_at_r(emb, labels) == 1.0


def test_pessimistic_ties():
    # query 0 has a positive (item 1) and a negative (item 2) at exactly the same similarity
    emb = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [-1.0, 0.0]])
    labels = np.array([0, 0, 1, 2])
    assert recall_at_k(emb, labels, (1, 2))[1] == 0.0  # the tie goes against the query
    # items 0-2 only: query 0 misses at K=1 (tie), query 1 hits (0 > -1), query 2 has no
    # positive and is excluded
    assert recall_at_k(emb[:3], labels[:3], (1, 2)) == {1: 1 / 2, 2: 2 / 2}
    # recall also ignores where the tied items sit in the input order
    perm = np.array([0, 2, 1, 3])
    assert recall_at_k(emb[perm], labels[perm], (1, 2, 3)) == recall_at_k(emb, labels, (1, 2, 3))


def test_recall_never_decreases_with_k():
    emb, labels = clustered(200, 8, 20, noise=2.0, seed=5)
    ks = tuple(range(1, 60))
    values = list(recall_at_k(emb, labels, ks).values())
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert values[0] < values[-1]
    # the literal formula does fall: Precision@K at large K is below Precision@1
    precision = precision_at_k(emb, labels, (1, 50))
    assert precision[50] < precision[1]


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64, 10_000])
def test_results_identical_for_any_chunk_size(chunk_size):
    emb, labels = clustered(70, 5, 6, noise=1.5, seed=6)
    labels[[4, 30, 61]] = [100, 101, 102]  # three lone items: excluded queries in several chunks
    emb = torch.from_numpy(emb).float()
    labels = torch.from_numpy(labels)
    base = retrieval_metrics(emb, labels, KS, chunk_size=1024)
    assert (base["queries"], base["excluded_queries"]) == (67, 3)
    assert retrieval_metrics(emb, labels, KS, chunk_size=chunk_size) == base
    assert recall_at_k(emb, labels, KS, chunk_size=chunk_size) == recall_at_k(emb, labels, KS)
    assert map_at_r(emb, labels, chunk_size=chunk_size) == map_at_r(emb, labels)
    assert precision_at_k(emb, labels, KS, chunk_size=chunk_size) == precision_at_k(emb, labels, KS)


def test_numpy_and_torch_inputs_agree_and_scale_is_ignored():
    emb, labels = clustered(40, 5, 4, seed=7)
    from_numpy = retrieval_metrics(emb, labels)
    from_torch = retrieval_metrics(torch.from_numpy(emb), torch.from_numpy(labels))
    assert from_numpy == from_torch
    scaled = emb * np.linspace(0.5, 4.0, 40)[:, None]  # cosine: per-row scale is irrelevant
    assert retrieval_metrics(scaled, labels)["map@r"] == pytest.approx(from_numpy["map@r"], abs=1e-12)


def test_input_validation():
    with pytest.raises(ValueError):
        recall_at_k(np.zeros((3, 2)), np.zeros(4))
    with pytest.raises(ValueError):
        recall_at_k(np.zeros((3, 2)), np.zeros(3), ks=(0, 1))
    with pytest.raises(ValueError):
        map_at_r(np.zeros(3), np.zeros(3))


@pytest.mark.slow
def test_recall_on_16k_embeddings():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(16_000, 128, generator=g)
    labels = torch.randint(0, 98, (16_000,), generator=g)
    recall = recall_at_k(
        emb, labels
    )  # (the full Cars-196 test size, in bounded memory; its speed is the bench's business)
    # random embeddings: Recall@K close to 1 - (1 - 1/98)^K
    for k, value in recall.items():
        assert value == pytest.approx(1 - (1 - 1 / 98) ** k, abs=0.01)


# ----------------------------------------------------------------------------- classification


def test_topk_accuracy_matches_reference():
    rng = np.random.default_rng(8)
    logits = rng.normal(size=(50, 7))
    labels = rng.integers(0, 7, 50)
    expected = {}
    for k in (1, 3, 5, 10):
        hits = 0
        for row, y in zip(logits, labels):
            top = sorted(range(7), key=lambda c: -row[c])[:k]
            hits += int(y in top)
        expected[k] = hits / 50
    assert_same_dict(topk_accuracy(torch.from_numpy(logits), torch.from_numpy(labels), (1, 3, 5, 10)), expected)
    assert_same_dict(topk_accuracy(logits, labels, (1, 3, 5, 10)), expected)


def test_confusion_per_class_and_most_confused():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    preds = np.array([0, 1, 1, 1, 0, 2, 0, 0, 2])
    cm = confusion_matrix(torch.from_numpy(preds), torch.from_numpy(labels), num_classes=4)
    expected = np.zeros((4, 4), dtype=np.int64)
    for t, p in zip(labels, preds):
        expected[t, p] += 1
    assert cm.dtype == torch.long
    np.testing.assert_array_equal(cm.numpy(), expected)
    acc = per_class_accuracy(cm)
    np.testing.assert_allclose(acc[:3].numpy(), [1 / 3, 1 / 2, 2 / 4])
    assert math.isnan(acc[3].item())  # class 3 has no samples
    # off-diagonal cells: (0,1)=2, (2,0)=2, (1,0)=1; ties in row-major order
    assert most_confused_pairs(cm, n=10) == [(0, 1, 2), (2, 0, 2), (1, 0, 1)]
    assert most_confused_pairs(cm, n=1) == [(0, 1, 2)]
    with pytest.raises(ValueError):
        confusion_matrix(np.array([4]), np.array([0]), num_classes=4)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_nearest_class_mean_matches_reference(metric):
    train, train_labels = clustered(40, 4, 5, seed=9)
    train_labels[train_labels == 3] = 4  # class 3 has no training item
    query, _ = clustered(15, 4, 5, seed=10)
    preds, scores = nearest_class_mean_predict(
        torch.from_numpy(train), torch.from_numpy(train_labels), torch.from_numpy(query), metric
    )
    assert scores.shape == (15, 5)
    for q in range(15):
        best, best_score = None, -math.inf
        for c in range(5):
            members = [train[i] for i in range(40) if train_labels[i] == c]
            if not members:
                assert scores[q, c].item() == -math.inf
                continue
            if metric == "euclidean":
                score = -float(np.linalg.norm(query[q] - np.mean(members, axis=0)))
            else:
                mean = np.mean([m / np.linalg.norm(m) for m in members], axis=0)
                score = float(np.dot(query[q], mean) / np.linalg.norm(query[q]) / np.linalg.norm(mean))
            assert scores[q, c].item() == pytest.approx(score, abs=1e-9)
            if score > best_score:
                best, best_score = c, score
        assert preds[q].item() == best
    with pytest.raises(ValueError, match="cosine"):
        nearest_class_mean_predict(train, train_labels, query, metric="manhattan")


def test_knn_predict_matches_reference():
    train, train_labels = clustered(60, 4, 4, noise=2.0, seed=11)
    query, _ = clustered(20, 4, 4, seed=12)
    k = 5
    preds, scores = knn_predict(train, train_labels, query, k=k, chunk_size=7)
    xt = [t / np.linalg.norm(t) for t in train]
    for q in range(20):
        xq = query[q] / np.linalg.norm(query[q])
        sims = sorted(((float(np.dot(xq, xt[i])), i) for i in range(60)), reverse=True)[:k]
        votes, sim_sum = [0] * 4, [0.0] * 4
        for s, i in sims:
            votes[train_labels[i]] += 1
            sim_sum[train_labels[i]] += s
        best = max(range(4), key=lambda c: (votes[c], sim_sum[c]))
        assert preds[q].item() == best
        assert int(scores[q].argmax()) == best
        np.testing.assert_allclose(np.floor(scores[q].numpy() + 0.5), votes)  # votes dominate


def test_knn_tie_broken_by_similarity():
    train = np.array([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]])
    train_labels = np.array([0, 1, 1, 0])
    preds, scores = knn_predict(train, train_labels, np.array([[1.0, 0.05]]), k=2)
    assert scores[0, 0] > scores[0, 1] and preds.tolist() == [0]  # 1 vote each, class 0 is nearer
