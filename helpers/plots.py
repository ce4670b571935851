"""Figures and tables of the notebooks. Every figure is saved as PNG and PDF under out_dir/figures."""

from __future__ import annotations

import hashlib
import json
import math
from importlib.metadata import version
from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np

from helpers.atomic import atomic_save_npy

CURVES = (
    ("train_loss", "training loss", False),
    ("train_top1", "training top-1 (%)", True),
    ("heldout_top1", "held-out top-1 (%)", True),
    ("test_top1", "test top-1 (%)", True),
)


def save_figure(fig: plt.Figure, out_dir: str | Path, name: str) -> list[Path]:
    """Save `fig` as out_dir/figures/<name>.png and .pdf; returns both paths."""
    folder = Path(out_dir) / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.png", folder / f"{name}.pdf"]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    return paths


def plot_curves(histories: dict[str, list[dict]], curves=CURVES, title: str = "") -> plt.Figure:
    """One panel per metric (training loss, training accuracy, held-out and test accuracy) per epoch,
    one line per model. histories: {model name: fit history (list of per-epoch dicts)}."""
    present = [c for c in curves if any(h.get(c[0]) is not None for hist in histories.values() for h in hist)]
    fig, axes = plt.subplots(1, len(present), figsize=(3.6 * len(present), 3.0), squeeze=False)
    try:
        for ax, (key, label, percent) in zip(axes[0], present):
            for name, history in histories.items():
                points = [(h["epoch"], h[key]) for h in history if h.get(key) is not None]
                if points:
                    epochs, values = zip(*points)
                    ax.plot(epochs, [100 * v for v in values] if percent else values, marker="o", ms=3, label=name)
            ax.set_xlabel("epoch")
            ax.set_title(label, fontsize=10)
            ax.grid(alpha=0.3)
    except BaseException:  # histories of another shape: no half-drawn figure stays open
        plt.close(fig)
        raise
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def plot_class_accuracy(report: dict, n: int = 10, title: str = "") -> plt.Figure:
    """Horizontal bars: the n best and n worst classes of a classification report, by name."""
    best, worst = report["best_classes"][:n], report["worst_classes"][:n]
    fig, axes = plt.subplots(1, 2, figsize=(9, 0.28 * max(len(best), 4) + 1.0))
    for ax, rows, colour, label in (
        (axes[0], best, "tab:green", "best classes"),
        (axes[1], worst, "tab:red", "worst classes"),
    ):
        names = [_short(r["name"]) for r in rows][::-1]
        ax.barh(names, [100 * r["accuracy"] for r in rows][::-1], color=colour)
        ax.set_xlim(0, 100)
        ax.set_xlabel("test accuracy (%)")
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="y", labelsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def plot_confusion(confusion: Sequence[Sequence[int]], class_names: Sequence[str], title: str = "") -> plt.Figure:
    """Row-normalised confusion matrix (rows: true class)."""
    cm = np.asarray(confusion, dtype=float)
    cm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(min(2 + 0.35 * k, 12), min(1.6 + 0.35 * k, 11)))
    image = ax.imshow(cm, cmap="Blues", vmin=0, vmax=1)
    if k <= 30:
        ax.set_xticks(range(k), [_short(n, 14) for n in class_names], rotation=90, fontsize=7)
        ax.set_yticks(range(k), [_short(n, 14) for n in class_names], fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(image, ax=ax, fraction=0.046)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def _short(name: str, width: int = 28) -> str:
    name = name.split(",")[0]
    return name if len(name) <= width else name[: width - 1] + "…"


def markdown_table(rows: Sequence[Sequence], headers: Sequence[str]) -> str:
    """A Markdown table (display it with IPython.display.Markdown)."""

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.4g}" if abs(value) >= 1 or value == 0 else f"{value:.3f}"
        return str(value).replace("|", "/")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def missing(value) -> bool:
    """None or NaN: a number that was not (or could not be) measured."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def pct(value: float | None, digits: int = 1) -> str:
    """A fraction as a percentage ("12.3%"); "n/a" when missing."""
    return "n/a" if missing(value) else f"{100 * value:.{digits}f}%"


def classifier_results_markdown(run, n: int = 5) -> str:
    """Final numbers of one classifier run (a helpers.experiment.RunSummary): accuracy/loss table,
    best/worst classes, most confused pairs."""
    test, held = run.test, run.heldout
    lines = [
        f"**{run.name}** ({run.architecture['class']}, {run.architecture['parameters']:,} parameters), "
        f"best held-out epoch {run.best_epoch} of {run.epochs_run}",
        "",
        markdown_table(
            [
                [
                    "held-out",
                    pct(held["top1"]),
                    pct(held["top5"]),
                    "n/a" if held["loss"] is None else f"{held['loss']:.3f}",
                ],
                ["test", pct(test["top1"]), pct(test["top5"]), f"{test['loss']:.3f}"],
            ],
            ["split", "top-1", "top-5", "loss"],
        ),
        "",
        "Best classes: "
        + ", ".join(f"{_short(c['name'])} ({pct(c['accuracy'], 0)})" for c in test["best_classes"][:n]),
        "",
        "Worst classes: "
        + ", ".join(f"{_short(c['name'])} ({pct(c['accuracy'], 0)})" for c in test["worst_classes"][:n]),
        "",
        "Most confused (true → predicted, count): "
        + ", ".join(
            f"{_short(p['true_name'], 20)} → {_short(p['predicted_name'], 20)} ({p['count']})"
            for p in test["most_confused"][:n]
        ),
    ]
    return "\n".join(lines)


def tsne_2d(embeddings, max_points: int = 2000, seed: int = 0, cache_dir: str | Path | None = None):
    """2-D t-SNE of at most `max_points` rows (a seeded subset): returns (points (n, 2), chosen indices).

    With `cache_dir`, a map is kept there under a key of the exact rows and settings, so a notebook
    run again on the same embeddings (a resumed, finished run) draws it without recomputing; any
    other input computes afresh."""
    x = np.asarray(embeddings, dtype=np.float32)
    rng = np.random.default_rng(seed)
    index = np.sort(rng.choice(len(x), size=min(max_points, len(x)), replace=False))
    perplexity = float(min(30.0, max(2.0, (len(index) - 1) / 3)))
    cached = None
    if cache_dir is not None:
        rows = np.ascontiguousarray(x[index])
        settings = {"shape": rows.shape, "perplexity": perplexity, "seed": seed, "sklearn": version("scikit-learn")}
        key = hashlib.sha1(rows.tobytes() + json.dumps(settings).encode()).hexdigest()
        cached = Path(cache_dir) / f"tsne-{key}.npy"
        try:
            points = np.load(cached)
            if points.shape == (len(index), 2):
                return points, index
        except (OSError, ValueError):
            pass  # not there, or unreadable: computed again
    from sklearn.manifold import TSNE  # (1 s to import: not for a map kept from before)

    points = TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(x[index])
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_npy(cached, points)
    return points, index


def plot_tsne(
    panels: dict[str, tuple],
    max_points: int = 2000,
    seed: int = 0,
    title: str = "",
    out_dir: str | Path | None = None,
) -> plt.Figure:
    """Side-by-side t-SNE maps. panels: {title: (embeddings (N, D), labels (N,))}; colour = class.
    With out_dir, the maps are kept under out_dir/tsne for a rerun on the same embeddings (tsne_2d),
    as save_figure keeps figures under out_dir/figures."""
    cache_dir = Path(out_dir) / "tsne" if out_dir is not None else None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.0), squeeze=False)
    for ax, (name, (embeddings, labels)) in zip(axes[0], panels.items()):
        points, index = tsne_2d(embeddings, max_points, seed, cache_dir)
        labels = np.asarray(labels)[index]
        ax.scatter(points[:, 0], points[:, 1], c=labels % 20, cmap="tab20", s=4, alpha=0.8, linewidths=0)
        ax.set_title(f"{name} ({len(index)} points, {len(np.unique(labels))} classes)", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def retrieval_rows(queries: Sequence[int], embeddings, labels, n: int = 10, farthest: bool = False) -> list[list]:
    """For each query: [(gallery index, cosine similarity, same class), ...] of its n most (or
    least) similar other gallery images, most (least) similar first; ties in gallery order.
    embeddings (N, D), labels (N,)."""
    import torch

    e = torch.nn.functional.normalize(torch.as_tensor(np.asarray(embeddings, dtype=np.float32)), dim=1)
    labels = np.asarray(labels)
    rows = []
    for q in queries:
        sims = (e @ e[q]).numpy()
        sims[q] = np.inf if farthest else -np.inf  # never retrieve the query itself
        order = np.argsort(sims if farthest else -sims, kind="stable")[:n]
        rows.append([(int(i), float(sims[i]), bool(labels[i] == labels[q])) for i in order])
    return rows


def plot_retrieval_grid(
    queries: Sequence[int], embeddings, labels, load_image, n: int = 10, farthest: bool = False, title: str = ""
) -> plt.Figure:
    """For each query (a row): the query, then its n most (or least) similar other gallery images,
    captioned with the cosine similarity; green = same class as the query, red = another class.
    embeddings (N, D), labels (N,), load_image(i) -> PIL image. Drawn as one image (a mosaic of
    96 px thumbnails): one axes per thumbnail took 3 s a figure to draw and save."""
    from matplotlib.colors import to_rgb
    from PIL import ImageOps

    rows = retrieval_rows(queries, embeddings, labels, n, farthest)
    tile, frame, caption = 96, 3, 16  # thumbnail, coloured frame and caption band, in pixels
    cell_w, cell_h = tile + 2 * frame + 4, tile + 2 * frame + caption
    canvas = np.full((cell_h * len(rows), cell_w * (n + 1), 3), 255, dtype=np.uint8)
    captions = []
    for r, (q, row) in enumerate(zip(queries, rows)):
        cells = [(q, "query", "black")] + [
            (i, f"{sim:.2f}", "tab:green" if same else "tab:red") for i, sim, same in row
        ]
        for c, (index, text, colour) in enumerate(cells):
            thumb = np.asarray(ImageOps.contain(load_image(index).convert("RGB"), (tile, tile)))
            top, left = r * cell_h + caption, c * cell_w + 2
            h, w = thumb.shape[:2]
            canvas[top : top + h + 2 * frame, left : left + w + 2 * frame] = np.multiply(to_rgb(colour), 255)
            canvas[top + frame : top + frame + h, left + frame : left + frame + w] = thumb
            captions.append((left + frame + w / 2, top - 2, text, colour))
    fig, ax = plt.subplots(figsize=(1.25 * (n + 1), 1.35 * len(rows)))
    ax.imshow(canvas, interpolation="nearest")
    for x, y, text, colour in captions:
        ax.text(x, y, text, fontsize=7, color=colour, ha="center", va="bottom")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_retrieval_curves(histories: dict[str, list[dict]], title: str = "") -> plt.Figure:
    """Training loss and test Recall@1 per epoch for each run."""
    curves = (
        ("train_loss", "training loss", False),
        ("test_recall@1", "test Recall@1 (%)", True),
        ("test_map@r", "test MAP@R (%)", True),
    )
    return plot_curves(histories, curves=curves, title=title)


def plot_accuracy_vs_time(records: Sequence[dict], title: str = "") -> plt.Figure:
    """Proof runs: accuracy (%) against training seconds, one thin line per run and side ("who"),
    from each record's `curve` [(seconds, top1), ...]; the final points are marked."""
    fig, ax = plt.subplots(figsize=(6, 4))
    colours = {"project": "tab:blue", "peer": "tab:orange"}
    seen = set()
    for record in records:
        who = record["who"]
        seconds, top1 = zip(*record["curve"]) if record["curve"] else ((), ())
        ax.plot(
            seconds,
            [100 * a for a in top1],
            "-o",
            color=colours.get(who, "grey"),
            lw=1,
            ms=3,
            alpha=0.8,
            label=None if who in seen else who,
        )
        seen.add(who)
    ax.set_xlabel("training seconds (evaluation excluded)")
    ax.set_ylabel("top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    return fig
