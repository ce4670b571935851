"""The retrieval grid: which neighbours it shows (against a float64 loop reference, ties and the
farthest included) and the one-image mosaic it draws them as."""

import math

import matplotlib
import numpy as np
import pytest
from PIL import Image

from helpers.plots import plot_retrieval_grid, retrieval_rows

matplotlib.use("Agg")


def reference_rows(queries, embeddings, labels, n, farthest):
    """Cosine similarity to every other image by loops in float64; stable order on ties."""
    x = [[float(v) for v in row] for row in embeddings]
    norms = [math.sqrt(sum(v * v for v in row)) for row in x]
    rows = []
    for q in queries:
        others = []
        for i in range(len(x)):
            if i != q:
                similarity = sum(a * b for a, b in zip(x[q], x[i])) / (norms[q] * norms[i])
                others.append((similarity, i))
        others.sort(key=lambda t: (t[0] if farthest else -t[0], t[1]))
        rows.append([(i, s, labels[i] == labels[q]) for s, i in others[:n]])
    return rows


@pytest.mark.parametrize("farthest", [False, True])
def test_the_grid_shows_the_nearest_or_farthest_other_images(farthest):
    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((30, 5)).astype(np.float32)
    embeddings[7] = 2 * embeddings[3]  # a tie with the query's own direction: similarity 1, not the query itself
    embeddings[8] = embeddings[7]  # and a tie between two images: gallery order
    labels = rng.integers(0, 4, 30)
    queries = [3, 0, 29]
    rows = retrieval_rows(queries, embeddings, labels, n=6, farthest=farthest)
    expected = reference_rows(queries, embeddings, labels, 6, farthest)
    for got, want in zip(rows, expected):
        assert [i for i, _, _ in got] == [i for i, _, _ in want]
        assert [s for _, s, _ in got] == pytest.approx([s for _, s, _ in want], abs=1e-5)
        assert [same for _, _, same in got] == [same for _, _, same in want]
    if not farthest:
        assert [i for i, _, _ in rows[0][:2]] == [7, 8], "the query itself is never its own neighbour"


def test_the_grid_is_one_image_with_a_caption_per_thumbnail():
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (20 + i, 40, 3), dtype=np.uint8)) for i in range(12)]
    embeddings, labels = rng.standard_normal((12, 4)), np.arange(12) % 3
    fig = plot_retrieval_grid([0, 5], embeddings, labels, images.__getitem__, n=4, title="nearest 4")
    (ax,) = fig.axes
    assert len(ax.images) == 1, "one mosaic, not an axes per thumbnail"
    texts = [t for t in ax.texts]
    assert len(texts) == 2 * 5 and [t.get_text() for t in texts[::5]] == ["query", "query"]
    rows = retrieval_rows([0, 5], embeddings, labels, n=4)
    colours = [matplotlib.colors.to_hex(t.get_color()) for t in texts if t.get_text() != "query"]
    expected = [matplotlib.colors.to_hex("tab:green" if same else "tab:red") for row in rows for _, _, same in row]
    assert colours == expected and [t.get_text() for t in texts[1:5]] == [f"{s:.2f}" for _, s, _ in rows[0]]
    mosaic = ax.images[0].get_array()
    assert mosaic.dtype == np.uint8 and mosaic.shape[0] > 2 * 96 and mosaic.shape[1] > 5 * 96


def test_a_tsne_map_is_kept_for_the_same_embeddings_and_computed_afresh_for_others(tmp_path, monkeypatch):
    """A notebook run again on a finished run's embeddings draws its maps without recomputing them."""
    import sklearn.manifold

    from helpers.plots import tsne_2d

    x = np.random.default_rng(0).standard_normal((40, 6)).astype(np.float32)
    first, index = tsne_2d(x, max_points=30, seed=1, cache_dir=tmp_path)
    assert first.shape == (30, 2) and len(list(tmp_path.glob("tsne-*.npy"))) == 1

    class Refused:
        def __init__(self, *args, **kwargs):
            raise AssertionError("t-SNE was computed again for the same embeddings")

    monkeypatch.setattr(sklearn.manifold, "TSNE", Refused)
    again, again_index = tsne_2d(x, max_points=30, seed=1, cache_dir=tmp_path)
    assert np.array_equal(again, first) and np.array_equal(again_index, index)
    changed = x.copy()
    changed[index[0], 0] += 1e-3
    for other in ((changed, 1), (x, 2)):  # other embeddings, another seed
        with pytest.raises(AssertionError, match="computed again"):
            tsne_2d(other[0], max_points=30, seed=other[1], cache_dir=tmp_path)
    next(tmp_path.glob("tsne-*.npy")).write_bytes(b"damaged")  # an unreadable map is computed again
    with pytest.raises(AssertionError, match="computed again"):
        tsne_2d(x, max_points=30, seed=1, cache_dir=tmp_path)


def test_plot_tsne_keeps_its_maps_under_the_output_folder(tmp_path):
    from helpers.plots import plot_tsne

    x, labels = np.random.default_rng(0).standard_normal((30, 4)), np.arange(30) % 3
    plot_tsne({"a": (x, labels), "b": (2 * x + 1, labels)}, max_points=20, out_dir=tmp_path)
    assert len(list((tmp_path / "tsne").glob("tsne-*.npy"))) == 2
