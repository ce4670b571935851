"""The two-page report, built only from <out>/metrics/*.json and <out>/figures/*.png.

Every number is read from the metrics files (none is typed in); a notebook that has not run shows
as "not run". A metrics file holding partial results (an interrupted training, `"complete":
false`), one that cannot be read and one lacking a value the report needs are left out and named
in red under the title; the rest of the report is built. Pages are laid out with matplotlib (no
LaTeX needed) and written to <out>/report.pdf, plus report-1.png / report-2.png previews; the old
ones are removed first, so a failed build never leaves an older report looking current.

    python -m helpers.report outputs/smoke
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.backends.backend_pdf import PdfPages  # noqa: E402

from helpers.config import MOST_DECAY_SCALE, REFERENCE_BATCH, REFERENCE_IMAGES, lr_for_batch  # noqa: E402
from helpers.experiment import T3Selection  # noqa: E402
from helpers.tasks import STEPS  # noqa: E402
from helpers.plots import missing, pct, plot_curves, save_figure  # noqa: E402

PAGE = (8.27, 11.69)  # A4, inches
MARGIN = 0.55
WIDTH = PAGE[0] - 2 * MARGIN
NAMES = tuple(step.name for step in STEPS)  # T1, T2, T3, T4, E1, E2
T1, T2, T3, T4, E1, E2 = NAMES
# what reading a metrics document of another shape raises (a missing key, a list for a dict, ...)
SHAPE_ERRORS = (KeyError, TypeError, IndexError, ValueError, AttributeError)


class Incomplete(Exception):
    """A notebook's metrics lack what a section of the report reads."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name, self.reason = name, reason


@contextmanager
def reading(name: str):
    """Turn a failed lookup in notebook `name`'s metrics into Incomplete(name, what they lack)."""
    try:
        yield
    except SHAPE_ERRORS as exc:
        if isinstance(exc, KeyError) and exc.args:
            reason = f"its metrics lack {exc.args[0]!r}"
        else:
            reason = (
                f"its metrics do not have the expected form ({type(exc).__name__}: {textwrap.shorten(str(exc), 80)})"
            )
        raise Incomplete(name, reason) from exc


class Page:
    """A top-down cursor on one A4 figure: headings, wrapped text, tables and images."""

    def __init__(self):
        self.fig = plt.figure(figsize=PAGE)
        self.y = PAGE[1] - MARGIN  # inches from the bottom
        self.content: list[str] = []  # every string drawn, in order (what the tests read)

    def _fy(self, inches: float) -> float:
        return inches / PAGE[1]

    def space(self, inches: float) -> None:
        self.y -= inches

    def text(
        self,
        content: str,
        size: float = 8.0,
        weight: str = "normal",
        colour: str = "black",
        indent: float = 0.0,
        family: str = "sans-serif",
    ) -> None:
        self.content.append(content)
        chars = int((WIDTH - indent) * 72 / (size * (0.6 if family == "monospace" else 0.5)))
        line = size * 1.32 / 72
        for paragraph in content.split("\n"):
            for row in textwrap.wrap(paragraph, chars) or [""]:
                self.y -= line
                self.fig.text(
                    (MARGIN + indent) / PAGE[0],
                    self._fy(self.y),
                    row,
                    fontsize=size,
                    weight=weight,
                    color=colour,
                    family=family,
                )
        self.y -= line * 0.3

    def heading(self, content: str) -> None:
        self.space(0.06)
        self.text(content, size=10.5, weight="bold", colour="#1f3b73")

    def table(self, headers: list[str], rows: list[list[str]], widths: list[float], size: float = 7.5) -> None:
        """Columns of relative `widths`; header bold with rules above and below, a rule at the end."""
        self.content += [" | ".join(map(str, r)) for r in [headers] + rows]
        line = size * 1.45 / 72
        total = sum(widths)
        xs = [MARGIN + WIDTH * sum(widths[:i]) / total for i in range(len(widths))]
        self._rule()
        for r, cells in enumerate([headers] + rows):
            self.y -= line
            for x, cell in zip(xs, cells):
                self.fig.text(
                    x / PAGE[0],
                    self._fy(self.y + line * 0.28),
                    str(cell),
                    fontsize=size,
                    weight="bold" if r == 0 else "normal",
                )
            if r == 0:
                self._rule(0.0)
        self._rule(0.0)
        self.space(0.08)

    def _rule(self, below: float = 0.02) -> None:
        self.y -= below
        self.fig.add_artist(
            plt.Line2D([MARGIN / PAGE[0], (MARGIN + WIDTH) / PAGE[0]], [self._fy(self.y)] * 2, lw=0.6, color="#555555")
        )

    def image(self, path: Path, height: float, caption: str = "") -> None:
        """An image scaled to `height` inches (narrower if its aspect demands), centred."""
        if not path.is_file():
            self.text(f"[figure {path.name} not available]", colour="#999999")
            return
        try:
            img = mpimg.imread(str(path))
        except (OSError, ValueError, SyntaxError):  # a truncated or foreign file
            self.text(f"[figure {path.name} not readable]", colour="#999999")
            return
        self.content.append(f"[figure {path.name}]")
        aspect = img.shape[1] / img.shape[0]
        w = min(WIDTH, height * aspect)
        h = w / aspect
        self.y -= h
        ax = self.fig.add_axes([(MARGIN + (WIDTH - w) / 2) / PAGE[0], self._fy(self.y), w / PAGE[0], h / PAGE[1]])
        ax.imshow(img)
        ax.axis("off")
        if caption:
            self.text(caption, size=7, colour="#444444")
        else:
            self.space(0.05)


def load(out: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """(complete metrics by notebook, {notebook: why it was left out}) from <out>/metrics."""
    metrics, refused = {}, {}
    for name in NAMES:
        path = out / "metrics" / f"{name}.json"
        if not path.is_file():
            continue
        try:
            document = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            refused[name] = f"unreadable ({type(exc).__name__})"
            continue
        if not isinstance(document, dict):
            refused[name] = "unreadable (not a metrics object)"
            continue
        if document.get("complete") is False:
            refused[name] = "partial results of " + ", ".join(
                map(str, document.get("partial") or ["an interrupted training"])
            )
            continue
        metrics[name] = document
    return metrics, refused


def num(value, digits: int = 3) -> str:
    return "n/a" if missing(value) else f"{value:.{digits}f}"


def provenance(metrics: dict[str, dict], out: Path) -> str:
    """Which data and profile produced the report, from the metrics files themselves."""
    if not metrics:
        return f"No metrics found in {out / 'metrics'}: run the pipeline first."
    profiles, datasets, commits, devices, precisions, times, torches = set(), set(), set(), set(), set(), [], []
    for name, m in metrics.items():
        with reading(name):
            r = m["run"]
            profiles.add(str(m["profile"]))
            datasets.add(str(m.get("data", {}).get("dataset", "?")))
            commits.add((r["git"]["commit"] or "unknown")[:10] + ("+changes" if r["git"].get("dirty") else ""))
            devices.add(str(r.get("gpu") or r["device"]))
            precisions.add(precision_label(r.get("precision"), measured_choices(m)))
            times.append(str(r["time"]))
            torches.append(str(r["torch"]))
    profiles, commits, devices, precisions = map(sorted, (profiles, commits, devices, precisions))
    datasets = data_lines(metrics)
    text = (
        f"Profile: {', '.join(profiles)}. Data: {'; '.join(datasets)}. Device: {', '.join(devices)}. Precision: {'; '.join(precisions)}. "
        f"Commit: {', '.join(commits)}; torch {torches[0]}; latest run {max(times)}. {budget_line(out)}"
        f"Every number below is read from {out.name}/metrics/*.json."
    )
    if "smoke" in profiles:
        text += " Smoke profile: generated stand-in data and a few CPU epochs; it shows that the pipeline runs, not what the models reach on real data."
    return text


def data_lines(metrics: dict[str, dict]) -> list[str]:
    """What data each dataset's runs used: classes, images (per class), image size, and whether it is
    a generated stand-in or a partial copy, e.g. "Tiny ImageNet: 200 classes, 19,000 train (95 per
    class) / 10,000 test images at 32 px"."""
    groups: dict[tuple[str, str], list[str]] = {}
    for name, m in metrics.items():
        d = m.get("data") or {}
        if not isinstance(d, dict) or not d:
            continue
        dataset = str(d.get("dataset", "?"))
        if "num_classes" in d:
            per_class = d.get("train_images", 0) // max(1, d["num_classes"])
            text = f"{d['num_classes']} classes, {d.get('train_images', 0):,} train ({per_class} per class) / {d.get('test_images', 0):,} test images"
        elif "train_classes" in d:
            text = f"{d['train_classes']} + {d['test_classes']} classes, {d['train_images']:,} train / {d['test_images']:,} test images"
        else:
            text = f"{d.get('train_images', 0) + d.get('heldout_images', 0):,} train / {d.get('test_images', 0):,} test images"
        if d.get("image_size"):
            text += f" at {d['image_size']} px"
        if d.get("partial"):
            text += f" ({d['partial'].split(';')[0].split(' missing')[0]} missing: PARTIAL)"
        groups.setdefault((dataset, text), []).append(name.split("_")[0])
    shapes = {}
    for dataset, _ in groups:
        shapes[dataset] = shapes.get(dataset, 0) + 1
    # one line per dataset; where notebooks used it in different shapes, each shape names its notebooks
    return [
        f"{dataset}{' (' + ', '.join(names) + ')' if shapes[dataset] > 1 else ''}: {text}"
        for (dataset, text), names in groups.items()
    ]


def budget_line(out: Path) -> str:
    """ "Budget: 60 min for the whole pipeline (took 59.3 min). " when pipeline.json records one."""
    try:
        budget = json.loads((out / "pipeline.json").read_text()).get("budget")
    except (OSError, json.JSONDecodeError, AttributeError):
        return ""
    if not isinstance(budget, dict) or "budget_s" not in budget:
        return ""
    took = f" (took {budget['measured_seconds'] / 60:.1f} min)" if budget.get("measured_seconds") else ""
    return (
        f"Budget: {budget['budget_s'] / 60:.0f} min for the whole pipeline{took}, shared out in the profile's proportions; "
        f"every training ran {budget['fraction']:.2g} x its profile's epochs. "
    )


def run_length(run: dict | None) -> str:
    """ "8 epochs (a 278 s budget)" or "30 epochs": the epochs a run really trained."""
    if not run:
        return "?"
    epochs = (run.get("training") or {}).get("epochs_done", run.get("epochs_run"))
    budget = run.get("budget")
    return f"{epochs} epochs (a {budget['budget_s']:.0f} s budget)" if budget else f"{epochs} epochs"


def measured_choices(m: dict) -> list[dict]:
    """The CPU precision choices (helpers.precision) the trainings of one metrics document recorded."""
    records = [r.get("training") for r in (m.get("models") or {}).values() if isinstance(r, dict)]
    records += list((m.get("training") or {}).values()) if isinstance(m.get("training"), dict) else []
    return [t["precision"] for t in records if isinstance(t, dict) and isinstance(t.get("precision"), dict)]


def precision_label(precision: dict | None, choices: list[dict] | None = None) -> str:
    """ "fp16 (auto: fp16 autocast with a gradient scaler (...))" from a metrics file's run.precision;
    on the CPU with "auto", what the runs measured and chose ("auto on cpu, measured per run: bf16 +
    channels_last in 3 runs (1.4-1.5x fp32), fp32 in 2")."""
    if choices:
        counts: dict[str, list[float]] = {}
        for c in choices:
            chosen = c["used"] + (" + channels_last" if c.get("channels_last") else "")
            timings = c.get("timings") or {}
            speedup = timings.get("fp32", 0) / timings[chosen] if timings.get(chosen) else None
            counts.setdefault(chosen, []).append(speedup)
        parts = []
        for chosen, speedups in sorted(counts.items()):
            known = [x for x in speedups if x]
            gain = f" ({min(known):.2g}-{max(known):.2g}x fp32)" if chosen != "fp32" and known else ""
            parts.append(f"{chosen} in {len(speedups)} run{'s' if len(speedups) > 1 else ''}{gain}")
        return "auto on cpu, measured per run: " + ", ".join(parts)
    if not precision:
        return "not recorded"
    return f"{precision['used']} ({precision['reason']})"


def first_model(m: dict | None) -> dict | None:
    return next(iter(m["models"].values())) if m and m.get("models") else None


def absent(name: str, left_out: dict[str, str]) -> str:
    """ "not run", or why the notebook's metrics were left out."""
    return f"left out ({left_out[name]})" if name in left_out else "not run"


def page_one(
    page: Page,
    metrics: dict,
    out: Path,
    refused: dict[str, str] | None = None,
    broken: dict[str, str] | None = None,
    curves: Path | None = None,
) -> None:
    refused, broken = refused or {}, broken or {}
    left_out = refused | broken
    page.text("Recognition and retrieval: Tiny ImageNet and Cars-196", size=15, weight="bold")
    page.text(provenance(metrics, out), size=7.5, colour="#333333")
    if refused:
        page.text(
            "Left out, not finished: "
            + "; ".join(f"{name} ({why})" for name, why in refused.items())
            + ". Rerun them (python -m helpers.pipeline ... --resume) to complete the report.",
            size=7.5,
            weight="bold",
            colour="#b00020",
        )
    for name, why in broken.items():
        page.text(
            f"{name}: left out, {why}. Rerun it (python -m helpers.pipeline ... --only {name.split('_')[0]}) to complete the report.",
            size=7.5,
            weight="bold",
            colour="#b00020",
        )
    t1, t2, t3 = (metrics.get(n) for n in (T1, T2, T3))

    page.heading("1  Architectures")
    with reading(T1):
        cnn = first_model(t1)
        cfg1 = (t1 or {}).get("config", {})
        page.text(
            f"Custom CNN (T1, our own design, {cnn['architecture']['parameters']:,} parameters, base width {cfg1.get('width')}): a two-conv "
            "stem at full resolution, three stride-2 stages of aggregation units (a chain of 3x3 conv-BN-SiLU layers whose outputs "
            "are concatenated and fused by a zero-initialised 1x1 conv, plus an identity skip), global average pooling, dropout, linear."
            if cnn
            else f"Custom CNN (T1): {absent(T1, left_out)}."
        )
    with reading(T2):
        r18 = first_model(t2)
        cfg2 = (t2 or {}).get("config", {})
        page.text(
            f"ResNet-18 (T2, written in the package, random init): BasicBlock x [2, 2, 2, 2]"
            f"{'' if cfg2.get('resnet_width', 64) == 64 else ', width ' + str(cfg2['resnet_width']) + ' (the published 64 narrowed)'}, {r18['architecture']['parameters']:,} "
            f"parameters, '{cfg2.get('stem')}' stem ({'3x3 stride-1 conv, no max-pool, for 64x64 input' if cfg2.get('stem') == 'small' else '7x7 stride-2 conv + max-pool, as torchvision'})."
            if r18
            else f"ResNet-18 (T2): {absent(T2, left_out)}."
        )
    with reading(T3):
        selection = T3Selection.from_metrics(t3) if t3 else None
        cfg3 = (t3 or {}).get("config", {})
        cubs_text(page, cfg3, selection)

    page.heading("2  Tiny ImageNet: accuracy and loss of every model")
    rows = []
    for notebook in (T1, T2, T3, E1):
        m = metrics.get(notebook)
        if not m:
            continue
        with reading(notebook):
            runs = dict(m["models"])
            if m.get("bonus"):
                runs[m["bonus"]["name"]] = m["bonus"]
            for name, r in runs.items():
                mark = " *" if selection and name == selection.best else ""
                rows.append(
                    [
                        name + mark,
                        f"{r['architecture']['parameters'] / 1e6:.2f} M",
                        pct(r["heldout"]["top1"]),
                        pct(r["test"]["top1"]),
                        pct(r["test"]["top5"]),
                        num(r["test"]["loss"]),
                        f"{r['best_epoch']}/{r['epochs_run']}",
                        f"{r['images_per_s']:.0f}",
                    ]
                )
    if rows:
        page.table(
            [
                "model",
                "params",
                "held-out top-1",
                "test top-1",
                "test top-5",
                "test loss",
                "best / epochs",
                "train img/s",
            ],
            rows,
            [2.45, 0.85, 1.3, 1.05, 1.05, 1.0, 1.25, 1.15],
        )
    else:
        page.text("No Tiny ImageNet notebook has run.")
    if t3:
        with reading(T3):
            page.text(
                f"* selected by held-out top-1 (the test split is never used for selection). {t3['gap_to_T2']['summary']}"
            )
    if r18:
        with reading(T2):
            confused = r18["test"]["most_confused"][:4]
            worst = r18["test"]["worst_classes"][:4]
            page.text(
                "T2 hardest classes (test): "
                + ", ".join(f"{c['name'].split(',')[0]} ({pct(c['accuracy'])})" for c in worst)
                + ". Most confused: "
                + ", ".join(
                    f"{p['true_name'].split(',')[0]} -> {p['predicted_name'].split(',')[0]} ({p['count']})"
                    for p in confused
                )
                + "."
            )

    page.heading("3  Training strategy")
    if cfg2:
        with reading(T2):
            training_text(page, cfg2, r18, (t2 or {}).get("data", {}).get("batch_size"))
    page.image(
        curves or report_curves(metrics, out),
        2.2,
        "Per-epoch training loss, training top-1, held-out top-1 and test top-1 of the Tiny ImageNet models.",
    )
    if selection:
        page.image(
            out / "figures" / "T3_classes.png",
            1.45,
            f"Best and worst test classes of the selected CUBS model ({selection.best}).",
        )


def cubs_text(page: Page, cfg3: dict, selection: T3Selection | None) -> None:
    page.text(
        "CUBS Block 1 (channel gate): g = GAP(X); q, k, v = Linear(C->N)(g); S = q k^T (N x N); column-wise softmax A; "
        "f_j = sum_i v_i A_ij; w = sigmoid(Linear(N->C)(f) + g); output X * w. CUBS Block 2 (spatial gate): q, k, v = three 1x1 "
        "convs C->1 over the HW positions; the same column-softmax similarity features, computed as fused attention or, where no fused kernel applies, an exact chunked kernel (the HW x HW "
        "matrix is never stored); output X * sigmoid(f) per pixel. Both act on the residual branch F(x) of all 8 blocks, before "
        f"the shortcut addition, in three fashions: parallel, serial 1->2, serial 2->1 (N = {cfg3.get('cubs_width') or 'C'} here). "
        + (f"Selected on held-out top-1: {selection.fashion}. " if selection else "")
        + "Bonus variant: each gate becomes 1 + s(2 sigmoid(z) - 1) with a learnable scalar s = 0 at init, so every block starts as "
        "the identity (a plain sigmoid gate halves every residual branch at init)."
    )


def recipe_text(cfg2: dict, run: dict | None, batch: int | None) -> str:
    """ "lr 0.1 for batch 128, weight decay 0.0005", or, when the recipe followed the training set
    (batch_size=0), the batch, lr and weight decay the run chose (its `followed_data` record)."""
    followed = (run or {}).get("followed_data")
    if not cfg2["batch_size"] and followed:
        return (
            f"lr {followed['lr']:.3g} for batch {followed['batch_size']} and weight decay {followed['weight_decay']:.2g}, "
            f"both chosen from the training set (lr {cfg2['lr']} per {REFERENCE_BATCH} images; decay {cfg2['weight_decay']} at "
            f"{REFERENCE_IMAGES:,} images or more, up to {MOST_DECAY_SCALE:g}x that for fewer)"
        )
    if cfg2["batch_size"] or not batch:  # a fixed batch, or a record from before followed_data
        return f"lr {cfg2['lr']} for batch {cfg2['batch_size'] or 'chosen from the data'}, weight decay {cfg2['weight_decay']}"
    return (
        f"lr {lr_for_batch(cfg2['lr'], batch):g} for batch {batch} (the batch follows the training set; lr {cfg2['lr']} "
        f"per {REFERENCE_BATCH} images), weight decay {cfg2['weight_decay']}"
    )


def training_text(page: Page, cfg2: dict, run: dict | None = None, batch: int | None = None) -> None:
    mixing = " and ".join(f"{name} (alpha {cfg2[name]})" for name in ("cutmix", "mixup") if cfg2.get(name))
    mixing = f", {mixing} on {100 * cfg2['mix_prob']:.0f}% of batches" if mixing else ""
    crop = f"random crop with {cfg2['padding']}-pixel padding" if cfg2["crop"] == "pad" else "random-resized crop"
    if cfg2["crop"] == "pad" and cfg2.get("crop_min_epochs"):
        dropped = ((run or {}).get("training") or {}).get("crop_dropped")
        crop += f" (dropped, flips kept, once a budget run is planned under {cfg2['crop_min_epochs']:g} epochs" + (
            "; this one was)" if dropped else "; this one was not)" if run else ")"
        )
    stopping = f" and early stopping (patience {cfg2['patience']})" if cfg2.get("patience") else ""
    page.text(
        f"One engine for every model: {cfg2['optimizer'].upper()} (momentum {cfg2['momentum']}, Nesterov) at {recipe_text(cfg2, run, batch)} (no decay on biases/BN), {run_length(run) if run else str(cfg2['epochs']) + ' epochs'}, linear warm-up "
        f"({cfg2['warmup_epochs']} epochs, at most a quarter of the run) then {cfg2['schedule']} decay, label smoothing {cfg2['label_smoothing']}. Augmentation on whole "
        f"batches on the device: {crop}{' + horizontal flip' if cfg2.get('flip', True) else ''}{mixing}, input {cfg2['image_size']} px. Model selection{stopping} on a "
        f"{100 * cfg2['heldout_fraction']:.0f}% stratified held-out part of train; atomic best/last checkpoints with exact resume; "
        f"Precision {cfg2.get('precision', 'auto')} (auto: bf16 autocast on GPUs with native bf16, fp16 with a gradient scaler on "
        "older ones, fp32 on MPS, on the CPU the fastest of fp32 and bf16 measured) and channels_last on CUDA (on the CPU where measured faster)."
    )


def report_curves(metrics: dict, out: Path) -> Path:
    """One figure with the curves of T1, T2 and the T3 models (made from the metrics histories)."""
    by_notebook = {}
    for name in (T1, T2, T3):
        m = metrics.get(name)
        if m:
            with reading(name):
                histories = {k: r["history"] for k, r in m["models"].items()}
                if m.get("bonus"):
                    histories[m["bonus"]["name"]] = m["bonus"]["history"]
                by_notebook[name] = histories
    path = out / "figures" / "report_curves.png"
    if not by_notebook:  # an older run's figure must not appear as this one's
        for stale in (path, path.with_suffix(".pdf")):
            stale.unlink(missing_ok=True)
        return path
    try:
        fig = plot_curves({k: v for histories in by_notebook.values() for k, v in histories.items()})
    except SHAPE_ERRORS:
        for name, histories in by_notebook.items():  # name the notebook whose histories cannot be drawn
            with reading(name):
                plt.close(plot_curves(histories))
        raise
    fig.set_size_inches(12, 3.1)
    save_figure(fig, out, "report_curves")
    plt.close(fig)
    return path


def t4_length(t4: dict, run: str, epochs: int, budget_s: float | None) -> str:
    """ "5 epochs (a 36 s budget)": what a T4 stage really trained (its training record)."""
    done = ((t4.get("training") or {}).get(run) or {}).get("epochs_done", epochs)
    return f"{done} epochs (a {budget_s:.0f} s budget)" if budget_s else f"{done} epochs"


def pretrain_length(e2: dict, c: dict) -> str:
    """E2's pretraining per layer as it ran: "2 epochs (a 1 s budget)"."""
    layers = e2.get("pretraining") or [{}]
    done = (layers[0].get("training") or {}).get("epochs_done", c["pretrain_epochs"])
    return (
        f"{done} epochs (a {c['pretrain_budget_s']:.0f} s budget)" if c.get("pretrain_budget_s") else f"{done} epochs"
    )


def page_two(page: Page, metrics: dict, out: Path, left_out: dict[str, str] | None = None) -> None:
    left_out = left_out or {}
    t4 = metrics.get(T4)
    page.heading("4  Cars-196 retrieval (T4): train classes 1-98, test classes 99-196")
    if t4:
        with reading(T4):
            c = t4["config"]
            init = t4["init"]
            page.text(
                f"From T3: {t4['t3'].replace(str(out) + '/', '')} Stage 1: the T3 architecture as a 98-way classifier ({t4_length(t4, 'classifier', c['cls_epochs'], c.get('cls_budget_s'))}, {c['cls_optimizer'].upper()} lr {c['cls_lr']}, "
                f"{c['image_size']} px random-resized crops of {c['resize']} px images + flip); 'before' = its pooled {8 * c.get('resnet_width', 64)}-d features. Stage 2: "
                f"classifier cropped, one {c['embedding_dim']}-d L2-normalised embedding layer, the whole network trained with the multi-similarity loss "
                f"(alpha {c['alpha']}, beta {c['beta']}, lambda {c['lam']}) on P x K = {c['pk_classes']} x {c['pk_images']} batches for {t4_length(t4, t4['miner'], c['emb_epochs'], c.get('emb_budget_s'))} "
                f"({c['emb_optimizer'].upper()} lr {c['emb_lr']})."
                + (f" Initialisation: {init.get('pretrained')} weights (pretrained)." if init.get("pretrained") else "")
            )
            ks = (1, 2, 4, 8)
            rows = [
                ["before: pooled features"]
                + [pct(t4["before"][f"recall@{k}"]) for k in ks]
                + [pct(t4["before"]["map@r"])],
                [f"after: MS loss + {t4['miner']} miner"]
                + [pct(t4["after"][f"recall@{k}"]) for k in ks]
                + [pct(t4["after"]["map@r"])],
            ]
            page.table(["features", "R@1", "R@2", "R@4", "R@8", "MAP@R"], rows, [3.2, 1, 1, 1, 1, 1])
            excluded = t4["after"].get("excluded_queries")
            page.text(
                (
                    f"Every test image is a query ({t4['after']['queries'] + excluded}); the {excluded} whose class has no other test image are "
                    "left out of every metric, as in pytorch-metric-learning. "
                    if excluded is not None
                    else ""
                )
                + "Recall@K: a query hits if one of its K nearest other test images has its class (it never falls with K). The assignment's "
                "literal formula, Precision@K, before -> after: "
                + ", ".join(
                    f"P@{k} {pct(t4['before'][f'precision@{k}'])} -> {pct(t4['after'][f'precision@{k}'])}" for k in ks
                )
                + "; it falls with K because each class has only so many other images to fill the top K."
            )
            page.text(
                f"Mining (ablation below, each a stage-2 run from the same stage 1): ms keeps a negative n of anchor i if S_in + eps > min_p S_ip "
                f"and a positive p if S_ip - eps < max_n S_in (eps = {c['epsilon']}); batch_hard keeps the hardest positive and negative; "
                "semi_hard keeps negatives within a margin below a positive; adaptive_ms sets eps per anchor from the spread of its "
                "similarities; xbm adds a cross-batch memory of recent embeddings as extra pairs, mined with ms."
            )
            rows = [[m] + [pct(v[f"recall@{k}"]) for k in ks] + [pct(v["map@r"])] for m, v in t4["ablation"].items()]
            page.table(["miner", "R@1", "R@2", "R@4", "R@8", "MAP@R"], rows, [3.2, 1, 1, 1, 1, 1])
            page.image(
                out / "figures" / "T4_nearest.png",
                1.75,
                "Nearest 10 test images of a few queries after training (green: same class), with cosine similarities.",
            )
            page.image(
                out / "figures" / "T4_tsne.png",
                2.0,
                "t-SNE of the test embeddings before (pooled classifier features) and after metric learning.",
            )
    else:
        page.text(f"T4: {absent(T4, left_out)}." if T4 in left_out else "T4 has not run.")

    e1, e2 = metrics.get(E1), metrics.get(E2)
    page.heading("5  Extra experiments")
    if e1:
        with reading(E1):
            c = e1["config"]
            rows = [
                [
                    r["architecture"].get("loss", name),
                    pct(r["heldout"]["top1"]),
                    pct(r["test"]["top1"]),
                    pct(r["test"]["top5"]),
                ]
                for name, r in e1["models"].items()
            ]
            page.text(
                f"E1, ResNet-18 on Tiny ImageNet with three losses ({c['optimizer'].upper()} lr {c['lr']}, {run_length(first_model(e1))} each; the triplet model "
                "is classified by the nearest class mean of train embeddings):"
            )
            page.table(["loss", "held-out top-1", "test top-1", "test top-5"], rows, [4, 1.3, 1.3, 1.3])
    if e2:
        with reading(E2):
            c = e2["config"]
            rows = [
                [name, pct(r["heldout"]["top1"]), pct(r["test"]["top1"]), num(r["test"]["loss"])]
                for name, r in e2["models"].items()
            ]
            page.text(
                f"E2, MLP 9216 -> {' -> '.join(map(str, c['hidden']))} -> 10 on STL-10 grayscale: greedy layer-wise autoencoder pretraining "
                f"({pretrain_length(e2, c)} per layer, earlier layers frozen) + fine-tuning vs the same MLP from scratch ({run_length(first_model(e2))} each):"
            )
            page.table(["model", "held-out accuracy", "test accuracy", "test loss"], rows, [4, 1.3, 1.3, 1.3])
    for name in (E1, E2):
        if name in left_out:
            page.text(f"{name.split('_')[0]}: {absent(name, left_out)}.")
    if not e1 and not e2 and not left_out.keys() & {E1, E2}:
        page.text("E1 and E2 have not run.")


def lay_out(out: str | Path) -> tuple[list[Page], dict[str, str]]:
    """The two pages for the metrics and figures under `out`, and {notebook: why it was left out}.

    A notebook whose metrics lack what a section reads is left out and the pages are laid out
    again without it, so no page keeps half of a section."""
    out = Path(out).resolve()  # (the metrics name absolute paths: a relative `out` would cut them in the middle)
    metrics, refused = load(out)
    broken: dict[str, str] = {}
    curves, curves_of = None, None
    while True:
        pages = [Page(), Page()]
        try:
            shown = [n for n in (T1, T2, T3) if n in metrics]
            if shown != curves_of:  # drawn again only when a notebook they show was left out
                curves, curves_of = report_curves(metrics, out), shown
            page_one(pages[0], metrics, out, refused, broken, curves)
            page_two(pages[1], metrics, out, refused | broken)
            return pages, refused | broken
        except Incomplete as exc:
            for page in pages:
                plt.close(page.fig)
            if metrics.pop(exc.name, None) is None:
                raise
            broken[exc.name] = exc.reason


def compose(out: str | Path) -> list[Page]:
    """The two laid-out pages for the metrics and figures under `out`."""
    return lay_out(out)[0]


def report_files(out: str | Path) -> list[Path]:
    """report.pdf, report-1.png and report-2.png under `out`."""
    return [Path(out) / "report.pdf"] + [Path(out) / f"report-{i}.png" for i in (1, 2)]


def build_report(out: str | Path) -> Path:
    """Write <out>/report.pdf (exactly two pages) and report-1.png / report-2.png; returns the PDF path.

    The old files are removed first and a failed build removes what it wrote, so whatever report
    is there was built from the current metrics."""
    out = Path(out)
    files = report_files(out)
    for path in files:
        path.unlink(missing_ok=True)
    pages: list[Page] = []
    try:
        pages, left_out = lay_out(out)
        for name, why in left_out.items():
            print(f"warning: the report leaves out {name}: {why}", file=sys.stderr)
        with PdfPages(files[0]) as document:
            for i, page in enumerate(pages, start=1):
                if page.y < MARGIN * 0.5:
                    print(f"warning: report page {i} overflows by {MARGIN * 0.5 - page.y:.2f} in", file=sys.stderr)
                document.savefig(page.fig)
                page.fig.savefig(files[i], dpi=110)
    except BaseException:
        for path in files:
            path.unlink(missing_ok=True)
        raise
    finally:
        for page in pages:
            plt.close(page.fig)
    return files[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m helpers.report",
        description="Build OUT/report.pdf (and report-1.png, report-2.png) from OUT/metrics/*.json.",
    )
    parser.add_argument(
        "out", metavar="OUT", help="a pipeline's output folder, the one holding metrics/ (e.g. outputs/smoke)"
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    problem = (
        "does not exist"
        if not out.exists()
        else "is not a folder"
        if not out.is_dir()
        else "has no metrics/ folder"
        if not (out / "metrics").is_dir()
        else ""
    )
    if problem:
        print(
            f"error: {out} {problem}: give the --out folder of a pipeline run (python -m helpers.pipeline ... --out OUT)",
            file=sys.stderr,
        )
        return 2
    try:
        pdf = build_report(out)
    except OSError as exc:
        print(f"error: the report could not be written in {out}: {exc}", file=sys.stderr)
        return 2
    print(pdf)
    return 0


if __name__ == "__main__":
    sys.exit(main())
