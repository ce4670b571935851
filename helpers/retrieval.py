"""T4 on Cars-196: batch sources, backbone initialisation (scratch, T3's checkpoint, ImageNet), the
two training stages (98-way classifier, then a 512-d embedding trained with the multi-similarity
loss and a miner on P x K batches, each stage with its own FitConfig and run key) and the
retrieval evaluation. Built on the shared layer (helpers.experiment); T3's selection arrives as a
`T3Selection` record, never through the recognition module."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn as nn
import torchvision

from helpers import distributed
from helpers.config import RetrievalConfig
from helpers.data import BatchAugment, Cars196, PKBatchSampler, ToUint8Tensor
from helpers.data.cache import decode_all
from helpers.data.loaders import BatchSource
from helpers.engine import FitResult
from helpers.evaluation import RetrievalEvaluator
from helpers.checkpoint import load_best
from helpers.errors import CheckpointError, SettingsError
from helpers.experiment import (
    T3Selection,
    batch_source,
    board_dir,
    data_fingerprint,
    embed_split,
    file_sha1,
    fit_stage,
    locate_data,
    metrics_path,
    resolve_data_path,
)
from helpers.losses import CrossBatchMemory, MultiSimilarityLoss
from helpers.metrics import retrieval_metrics
from helpers.miners import get_miner
from helpers.models import EmbeddingNet, load_torchvision_resnet18, resnet18
from helpers.objectives import MetricObjective
from helpers.board import open_board
from helpers.runinfo import Runtime, notice

KS = (1, 2, 4, 8)
# init="imagenet" without a weights path: torchvision's ResNet-18 ImageNet-1k weights (acc@1 69.8%)
IMAGENET_WEIGHTS = torchvision.models.ResNet18_Weights.IMAGENET1K_V1


@dataclass
class RetrievalData:
    """Cars-196 batch sources: `train` (shuffled, for the classifier), `train_pk` (P x K batches for
    the metric loss) and `test` (classes 99..196, in order), plus the test dataset for image grids."""

    train: BatchSource
    train_pk: BatchSource
    test: BatchSource
    augment: BatchAugment
    num_train_classes: int
    test_dataset: Cars196
    class_names: list[str]
    info: dict = field(default_factory=dict)


def build_cars196(cfg: RetrievalConfig) -> RetrievalData:
    """Batch sources for a (resolved) retrieval config. Images are decoded, resized (shorter side to
    `resize`) and centre-cropped to resize x resize once per item; the random-resized crop to
    `image_size` and the flip run on whole batches on the device. data_path "cached"/"gpu" decode
    every image once into memory (CPU or GPU); "lazy" decodes per item in DataLoader workers."""
    root, generated = locate_data(cfg.data_dir, "cars")
    prep = ToUint8Tensor(resize=cfg.resize, crop=cfg.resize)
    train_set = Cars196(root, "train", bbox_crop=cfg.bbox_crop, transform=prep)
    test_set = Cars196(root, "test", bbox_crop=cfg.bbox_crop, transform=prep)
    if train_set.partial:
        notice(
            f"{train_set.partial.split(';')[0]}: {len(train_set)} train / {len(test_set)} test images (the report says so)"
        )
    path = resolve_data_path(cfg.data_path, cfg.device)
    train_labels = np.asarray(train_set.targets)
    sampler = PKBatchSampler(train_labels, cfg.pk_classes, cfg.pk_images, seed=cfg.seed, drop_small_classes=True)

    def source(dataset, labels, batch_size, shuffle, batch_sampler=None, images=None):
        return batch_source(
            path,
            cfg.device,
            labels,
            batch_size,
            shuffle=shuffle,
            drop_last=shuffle,
            seed=cfg.seed,
            images=images,
            dataset=dataset,
            batch_sampler=batch_sampler,
            num_workers=cfg.num_workers,
        )

    train_images = test_images = None
    if path in ("cached", "gpu"):
        train_images = decode_all(train_set, num_workers=cfg.num_workers)
        test_images = decode_all(test_set, num_workers=cfg.num_workers)
    test_labels = np.asarray(test_set.targets)
    data = RetrievalData(
        train=source(train_set, train_labels, cfg.batch_size, True, images=train_images),
        train_pk=source(train_set, train_labels, cfg.pk_classes * cfg.pk_images, True, sampler, train_images),
        test=source(test_set, test_labels, max(cfg.batch_size, 128), False, images=test_images),
        augment=BatchAugment(crop="rrc", size=cfg.image_size, scale=(cfg.rrc_scale_min, 1.0)),
        num_train_classes=len(train_set.classes),
        test_dataset=Cars196(root, "test", bbox_crop=cfg.bbox_crop),
        class_names=list(train_set.class_names),
        info={
            "dataset": "Cars-196" + (" (generated stand-in)" if generated else ""),
            "root": str(root),
            "layout": train_set.layout,
            "generated": generated,
            "data_path": path,
            "train_images": len(train_set),
            "train_classes": len(train_set.classes),
            "test_images": len(test_set),
            "test_classes": len(test_set.classes),
            "image_size": cfg.image_size,
            "resize": cfg.resize,
            "bbox_crop": cfg.bbox_crop,
            "partial": train_set.partial or None,
            "fingerprint": data_fingerprint(cfg),
        },
    )
    return data


def load_backbone(model: nn.Module, state_dict: dict) -> dict:
    """Copy every tensor of `state_dict` whose name and shape match into `model`, except the
    classifier; report what was loaded and what kept its initialisation (e.g. a 3x3 small stem
    checkpoint into a 7x7 ImageNet-stem model leaves conv1/bn1 at their init)."""
    target = model.state_dict()
    loaded, kept = [], []
    for key, value in state_dict.items():
        if key.startswith("fc."):
            continue
        if key in target and target[key].shape == value.shape:
            target[key] = value
            loaded.append(key)
        else:
            kept.append(key)
    model.load_state_dict(target)
    untouched = [k for k in target if k not in set(loaded) and not k.startswith("fc.")]
    return {"loaded": len(loaded), "kept_init": sorted(set(kept) | set(untouched))}


def build_backbone(cfg: RetrievalConfig, fashion: str | None, num_classes: int) -> tuple[nn.Module, dict]:
    """The T3 architecture (ResNet-18 + CUBS in `fashion`) with the requested initialisation.

    init "scratch": random; "tinyimagenet": the T3 checkpoint `cfg.checkpoint` (our own weights;
    a stem that does not match is left at init and reported); "imagenet": torchvision's ImageNet
    ResNet-18 weights (IMAGENET1K_V1) from the file `cfg.imagenet_weights`, or when that is "" from
    torchvision's download cache, downloaded once (`imagenet_weights_file`); pretrained: labelled as
    such, with the file used under "weights"."""
    torch.manual_seed(cfg.seed)
    model = resnet18(
        num_classes, stem=cfg.stem, cubs=fashion, cubs_width=cfg.cubs_width or None, width=cfg.resnet_width
    )
    report = {"init": cfg.init}
    if cfg.init == "tinyimagenet":
        if not cfg.checkpoint or not Path(cfg.checkpoint).is_file():
            raise SettingsError(
                f"init='tinyimagenet' needs a T3 checkpoint; checkpoint={cfg.checkpoint!r} does not exist. "
                "Run T3 first (its metrics name the selected checkpoint) or pass checkpoint=<path to best.pt>."
            )
        state = load_best(Path(cfg.checkpoint), "cpu", remedy="pass another checkpoint, or rerun T3")
        width = state["model"]["bn1.weight"].shape[0] if "bn1.weight" in state["model"] else cfg.resnet_width
        if width != cfg.resnet_width:
            raise SettingsError(
                f"the T3 checkpoint {cfg.checkpoint} is a ResNet-18 of width {width}, this one of resnet_width={cfg.resnet_width}; "
                f"pass resnet_width={width}, or init='scratch'"
            )
        report.update(load_backbone(model, state["model"]), checkpoint=cfg.checkpoint)
    elif cfg.init == "imagenet":
        if cfg.resnet_width != 64:
            raise SettingsError(
                f"init='imagenet' loads torchvision's ResNet-18, of width 64; resnet_width={cfg.resnet_width} cannot take its weights: "
                "pass resnet_width=64, or another init"
            )
        weights = imagenet_weights_file(cfg.imagenet_weights)
        loaded = load_torchvision_resnet18(model, weights)
        report.update(
            loaded=len(loaded["loaded"]),
            kept_init=loaded["missing"],
            weights=str(weights),
            pretrained="ImageNet-1k (torchvision)",
        )
    return model, report


def imagenet_cache_file() -> Path:
    """Where torchvision's download-once cache keeps `IMAGENET_WEIGHTS`: torch.hub's checkpoint
    folder + the file name of the weights' URL, i.e. $TORCH_HOME/hub/checkpoints/resnet18-f37072fd.pth
    (TORCH_HOME defaults to $XDG_CACHE_HOME/torch, i.e. ~/.cache/torch). Resolved at each call, as
    torch.hub does (torch.hub.set_dir overrides the hub folder)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(IMAGENET_WEIGHTS.url).path).name


def imagenet_weights_file(path: str = "", progress: bool = True) -> Path:
    """The file init="imagenet" starts from, for both `build_backbone` and `init_weights_key`.

    `path` given: that file (it must exist). `path` "": torchvision's cached copy of
    `IMAGENET_WEIGHTS` (`imagenet_cache_file()`), downloaded first when absent through torchvision's
    weights API (torch.hub: SHA-256 prefix of the URL's file name checked on download, written to a
    temporary file and moved into place only when complete). A file already in the cache is used as
    is. Raises ValueError, saying where to put the file, when the download fails (e.g. offline)."""
    if path:
        if not Path(path).is_file():
            raise SettingsError(
                f"init='imagenet' needs torchvision's resnet18 ImageNet weights as a file; imagenet_weights="
                f"{path!r} does not exist. Pass the path of {imagenet_cache_file().name} (torchvision), or leave "
                f"imagenet_weights empty to use torchvision's download cache ({imagenet_cache_file()})."
            )
        return Path(path)
    cached = imagenet_cache_file()
    if not cached.is_file():
        try:
            IMAGENET_WEIGHTS.get_state_dict(progress=progress, check_hash=True, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError) as error:  # URLError, HTTPError, timeouts: OSError; a wrong hash: RuntimeError
            raise SettingsError(
                f"init='imagenet': downloading torchvision's ResNet-18 ImageNet weights from {IMAGENET_WEIGHTS.url} "
                f"failed ({error}). Without internet, copy that file (downloaded elsewhere) to {cached} "
                "(torchvision's cache: $TORCH_HOME/hub/checkpoints), or pass imagenet_weights=<path of the file>."
            ) from None
    return cached


def init_weights_key(cfg: RetrievalConfig) -> dict:
    """The checksum of the weights stage 1 starts from, for both stages' run keys: a rerun T3
    rewrites its best.pt at the same path, and T4 must not resume runs begun from the old one.
    init "imagenet": the file `imagenet_weights_file` names (the cached download unless a path is
    given; fetched first if absent, so the checksum is always of the file actually loaded)."""
    if cfg.init == "tinyimagenet":
        path = cfg.checkpoint
    elif cfg.init == "imagenet":
        path = imagenet_weights_file(cfg.imagenet_weights)
    else:
        return {}
    return {"init_weights_sha1": file_sha1(path)} if path else {}


def ms_objective(cfg: RetrievalConfig, miner: str) -> MetricObjective:
    """The multi-similarity loss with a miner by name; "xbm" = MS miner + a cross-batch memory."""
    if miner == "xbm":
        loss = MultiSimilarityLoss(cfg.alpha, cfg.beta, cfg.lam, miner=get_miner("ms", epsilon=cfg.epsilon))
        return MetricObjective(CrossBatchMemory(loss, cfg.embedding_dim, cfg.memory_size, cfg.memory_warmup_steps))
    kwargs = {"epsilon": cfg.epsilon} if miner in ("ms",) else {}
    return MetricObjective(MultiSimilarityLoss(cfg.alpha, cfg.beta, cfg.lam, miner=get_miner(miner, **kwargs)))


def retrieval_summary(embeddings: torch.Tensor, labels: torch.Tensor) -> dict[str, float | int]:
    """Recall@1,2,4,8, MAP@R and Precision@1,2,4,8 (leave-one-out over the test classes, cosine),
    plus "queries" (evaluated) and "excluded_queries" (images whose class has no other test
    image: left out of every metric). embeddings (N, D), labels (N,). This dict is what the
    T4 metrics JSON stores under "before", "after" and "ablation"."""
    return retrieval_metrics(embeddings, labels, ks=KS)


def train_classifier_stage(
    model: nn.Module, data: RetrievalData, cfg: RetrievalConfig, name: str = "T4_classifier"
) -> FitResult:
    """Stage 1: cross-entropy on the 98 train classes. Test recall of the pooled features is
    recorded per epoch as a curve only; nothing is selected on it (the last epoch is used)."""
    evaluator = RetrievalEvaluator(
        {"test": data.test}, data.augment, embed=lambda m: m.forward_features, ks=KS, runtime=Runtime.of(cfg)
    )
    return fit_stage(
        name, model, data.train, data.augment, cfg, "classifier", key_extra=init_weights_key(cfg), evaluate=evaluator
    )


def train_embedding_stage(
    backbone: nn.Module, data: RetrievalData, cfg: RetrievalConfig, miner: str, name: str
) -> tuple[nn.Module, FitResult]:
    """Stage 2: a copy of the trained backbone, classifier cropped, + a 512-d L2-normalised
    embedding layer, trained whole with the multi-similarity loss and `miner` on P x K batches."""
    torch.manual_seed(cfg.seed)
    net = EmbeddingNet(copy.deepcopy(backbone), cfg.embedding_dim)
    evaluator = RetrievalEvaluator({"test": data.test}, data.augment, ks=KS, runtime=Runtime.of(cfg))
    result = fit_stage(
        name,
        net,
        data.train_pk,
        data.augment,
        cfg,
        "embedding",
        key_extra=init_weights_key(cfg),
        objective=ms_objective(cfg, miner),
        evaluate=evaluator,
    )
    return net, result


def apply_t3_selection(cfg: RetrievalConfig) -> tuple[RetrievalConfig, str]:
    """Fill what the configuration leaves to T3: the fashion T3 selected (fashion=""), its
    checkpoint (init "tinyimagenet"/"auto" without checkpoint), resolved in cfg.out_dir (the output
    folder may have been moved or copied), and init "auto": tinyimagenet when T3 has run in this
    output folder, else scratch. A SettingsError when T3's metrics name a checkpoint that is missing
    or was rewritten by another run (never a silent start from scratch). Returns the concrete config
    and a sentence saying so."""
    selection = T3Selection.load(cfg.out_dir)
    notes = []
    fashion = cfg.fashion or (selection.fashion if selection else "serial12")
    notes.append(
        f"fashion {fashion} "
        + (
            "(given)"
            if cfg.fashion
            else "(T3's held-out selection)"
            if selection
            else "(default: T3 has not run in this output folder)"
        )
    )
    from_t3 = selection is not None and not cfg.checkpoint and cfg.init in ("auto", "tinyimagenet")
    checkpoint = cfg.checkpoint or (str(selection.checkpoint_in(cfg.out_dir)) if selection else "")
    if from_t3:
        check_t3_checkpoint(Path(checkpoint), selection, metrics_path(cfg.out_dir, "T3_cubs_resnet18"))
    init = cfg.init
    if init == "auto":
        init = "tinyimagenet" if from_t3 or (checkpoint and Path(checkpoint).is_file()) else "scratch"
    if init == "tinyimagenet" and selection and not cfg.checkpoint and selection.stem != cfg.stem:
        notes.append(f"T3 used the {selection.stem} stem: the {cfg.stem} stem here starts from its own init")
    notes.append(f"init {init}" + (f" from {checkpoint}" if init == "tinyimagenet" else ""))
    return dataclasses.replace(cfg, fashion=fashion, init=init, checkpoint=checkpoint), "; ".join(notes) + "."


def check_t3_checkpoint(path: Path, selection: T3Selection, metrics: Path) -> None:
    """T3's selected best.pt is there and is the one T3's metrics describe, else a SettingsError saying what to do."""
    remedy = "rerun T3 into this output folder, or pass init='scratch' or init='imagenet' (or checkpoint=<a best.pt>) explicitly"
    if not path.is_file():
        raise SettingsError(f"T3's metrics ({metrics}) name the checkpoint {path}, which is missing; {remedy}")
    try:
        load_best(path, "cpu", selection.run_id or None, remedy=remedy)
    except CheckpointError as exc:
        raise SettingsError(f"T3's metrics ({metrics}) name {exc}") from None


@dataclass
class EmbeddingRun:
    """One stage-2 run: the trained net, its fit result, its test embeddings (N, D) and labels (N,)
    on the CPU, and their retrieval metrics (`retrieval_summary`)."""

    net: nn.Module
    result: FitResult
    embeddings: torch.Tensor
    labels: torch.Tensor
    metrics: dict


def embedding_run(backbone: nn.Module, data: RetrievalData, cfg: RetrievalConfig, miner: str) -> EmbeddingRun:
    """One stage-2 run with `miner` from the stage-1 backbone, evaluated on the test split."""
    name = f"T4_embedding_{miner}"
    net, result = train_embedding_stage(backbone, data, cfg, miner, name)
    net.eval()
    embeddings, labels = embed_split(net, data.test, data.augment, cfg)
    if miner == cfg.miner and distributed.is_main() and (board := open_board(board_dir(cfg.out_dir, name))) is not None:
        board.embedding(embeddings.cpu(), labels.cpu(), "test_embeddings")  # TensorBoard's projector, of the main run
        board.close()
    return EmbeddingRun(net, result, embeddings.cpu(), labels.cpu(), retrieval_summary(embeddings, labels))


def t4_payload(
    cfg: RetrievalConfig,
    t3_note: str,
    init_report: dict,
    before: dict,
    classifier: FitResult,
    runs: dict[str, EmbeddingRun],
) -> dict:
    """What T4's metrics JSON holds besides the configuration: the initialisation, retrieval before
    (pooled classifier features) and after stage 2 (the main miner), the ablation, every history and
    training record."""
    return {
        "t3": t3_note,
        "init": {k: v for k, v in init_report.items() if k != "kept_init"}
        | {"kept_init": init_report.get("kept_init", [])},
        "before": before,
        "after": runs[cfg.miner].metrics,
        "miner": cfg.miner,
        "ablation": {m: r.metrics for m, r in runs.items()},
        "histories": {"classifier": classifier.history, **{m: r.result.history for m, r in runs.items()}},
        "training": {"classifier": classifier.record(), **{m: r.result.record() for m, r in runs.items()}},
        "train_seconds": classifier.train_seconds + sum(r.result.train_seconds for r in runs.values()),
    }


def grid_queries(labels, count: int) -> list[int]:
    """`count` query indices from evenly spaced distinct classes (first image of each)."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    picked = classes[np.linspace(0, len(classes) - 1, num=min(count, len(classes))).round().astype(int)]
    return [int(np.flatnonzero(labels == c)[0]) for c in picked]
