import dataclasses
import hashlib
import json
import urllib.error

import numpy as np
import pytest
import torch
import torchvision

from helpers.config import RetrievalConfig
from helpers.errors import SettingsError
from helpers.models import resnet18
from helpers.retrieval import (
    apply_t3_selection,
    build_backbone,
    build_cars196,
    embedding_run,
    grid_queries,
    imagenet_cache_file,
    init_weights_key,
    load_backbone,
    ms_objective,
    train_classifier_stage,
)


def config(root, tmp_path, **kw):
    options = dict(
        data_dir=str(root),
        out_dir=str(tmp_path),
        device="cpu",
        resize=24,
        image_size=16,
        cls_epochs=1,
        emb_epochs=1,
        batch_size=32,
        pk_classes=4,
        pk_images=2,
        cubs_width=8,
        num_workers=0,
    )
    return RetrievalConfig.build("T4", "smoke", **(options | kw))


def test_cars_sources_follow_the_class_split(cars_devkit_root, tmp_path):
    cfg = config(cars_devkit_root, tmp_path)
    data = build_cars196(cfg)
    assert data.num_train_classes == 98 and set(data.test.labels.tolist()) == set(range(98, 196))
    x, y = next(data.train_pk.epoch(0))
    assert x.shape == (8, 3, 24, 24) and sorted(np.bincount(y.numpy())[np.bincount(y.numpy()) > 0]) == [2, 2, 2, 2]
    assert data.augment.train(x, y, __import__("helpers").data.AugmentRNG(0))[0].shape == (8, 3, 16, 16)
    lazy = build_cars196(config(cars_devkit_root, tmp_path, data_path="lazy"))
    assert torch.equal(next(lazy.test.epoch(0))[0], next(data.test.epoch(0))[0]), "lazy and cached paths agree"


def test_two_stages_and_every_miner_run(cars_devkit_root, tmp_path):
    cfg = config(cars_devkit_root, tmp_path, fashion="serial21", init="scratch")
    data = build_cars196(cfg)
    backbone, report = build_backbone(cfg, cfg.fashion, data.num_train_classes)
    assert report == {"init": "scratch"} and backbone.num_classes == 98
    stage1 = train_classifier_stage(backbone, data, cfg)
    assert "test_recall@1" in stage1.history[0] and "test_map@r" in stage1.history[0]
    for miner in ("none", "ms", "batch_hard", "semi_hard", "adaptive_ms", "xbm"):
        run = embedding_run(backbone, data, cfg, miner)
        assert run.embeddings.shape == (data.test.num_samples, 512) and run.result.record()["complete"]
        assert torch.allclose(run.embeddings.norm(dim=1), torch.ones(data.test.num_samples), atol=1e-4)
        m = run.metrics
        assert m["recall@1"] <= m["recall@2"] <= m["recall@4"] <= m["recall@8"] and 0 <= m["map@r"] <= 1
    assert isinstance(backbone.fc, torch.nn.Linear), "stage 2 works on a copy: the classifier is untouched"


def test_each_stage_trains_for_its_own_budget(cars_devkit_root, tmp_path, monkeypatch):
    """cls_budget_s reaches stage 1's `fit` and emb_budget_s every stage-2 run's (pipeline --budget
    sets them; the end-to-end budget test runs T2 and E2, whose runners share this `fit_stage`)."""
    import helpers.experiment

    budgets = []

    def fit(*args, **kwargs):
        budgets.append(args[3].budget_s)
        return real_fit(*args, **kwargs)

    real_fit = helpers.experiment.fit
    monkeypatch.setattr(helpers.experiment, "fit", fit)
    cfg = config(cars_devkit_root, tmp_path, fashion="serial21", init="scratch", cls_budget_s=1.5, emb_budget_s=1.0)
    data = build_cars196(cfg)
    backbone = build_backbone(cfg, cfg.fashion, data.num_train_classes)[0]
    stage1 = train_classifier_stage(backbone, data, cfg)
    run = embedding_run(backbone, data, cfg, "ms")
    assert budgets == [1.5, 1.0], budgets
    assert stage1.record()["complete"] and run.result.record()["complete"]
    assert stage1.history[-1]["steps"] >= 5 <= run.result.history[-1]["steps"], "a budget run plans after 5 steps"


def test_each_stage_resumes_unless_a_setting_it_reads_changed(cars_devkit_root, tmp_path):
    """Stage 1 (classifier) and stage 2 (embedding) have their own run keys: a stage-2 setting such
    as alpha leaves stage 1 resumable; a stage-1 setting invalidates both (stage 2 starts from it)."""
    cfg = config(cars_devkit_root, tmp_path, fashion="serial12", init="scratch")
    data = build_cars196(cfg)

    def stage1(c):
        return train_classifier_stage(build_backbone(c, c.fashion, data.num_train_classes)[0], data, c)

    first = stage1(cfg)
    assert first.resumed_from is None
    embedding_run(first_backbone := build_backbone(cfg, cfg.fashion, 98)[0], data, cfg, "ms")
    new_alpha = dataclasses.replace(cfg, alpha=3.0)
    assert stage1(new_alpha).resumed_from == {"epoch": 1, "step": 0}, "stage 1 resumes after a stage-2 change"
    with pytest.raises(ValueError, match="different configuration.*alpha"):
        embedding_run(first_backbone, data, new_alpha, "ms")
    new_lr = dataclasses.replace(cfg, cls_lr=0.01)
    with pytest.raises(ValueError, match="different configuration.*cls_lr"):
        stage1(new_lr)
    with pytest.raises(ValueError, match="different configuration.*cls_lr"):
        embedding_run(first_backbone, data, new_lr, "ms")
    assert cfg.fit_config("embedding").warmup_epochs == 0.25 and cfg.fit_config("classifier").lr == cfg.cls_lr


def test_stage_one_is_not_resumed_from_other_t3_weights_at_the_same_path(cars_devkit_root, tmp_path):
    """A rerun of T3 rewrites its best.pt in place: T4's runs begun from the old file are refused."""
    ckpt = tmp_path / "t3_best.pt"
    torch.manual_seed(0)
    torch.save({"model": resnet18(20, stem="imagenet", cubs="serial12", cubs_width=8, width=16).state_dict()}, ckpt)
    cfg = config(cars_devkit_root, tmp_path, fashion="serial12", init="tinyimagenet", checkpoint=str(ckpt))
    data = build_cars196(cfg)

    def stage1():
        return train_classifier_stage(build_backbone(cfg, cfg.fashion, data.num_train_classes)[0], data, cfg)

    stage1()
    assert stage1().resumed_from == {"epoch": 1, "step": 0}, "the same weights: resumed"
    torch.manual_seed(1)
    torch.save({"model": resnet18(20, stem="imagenet", cubs="serial12", cubs_width=8, width=16).state_dict()}, ckpt)
    with pytest.raises(ValueError, match="different configuration.*init_weights_sha1"):
        stage1()
    torch.save({"model": resnet18(20, stem="imagenet", cubs="serial12", cubs_width=8).state_dict()}, ckpt)
    with pytest.raises(
        SettingsError, match="is a ResNet-18 of width 64, this one of resnet_width=16; pass resnet_width=64"
    ):
        build_backbone(cfg, cfg.fashion, data.num_train_classes)
    with pytest.raises(SettingsError, match="init='imagenet' loads torchvision's ResNet-18, of width 64"):
        build_backbone(dataclasses.replace(cfg, init="imagenet"), cfg.fashion, data.num_train_classes)
    with pytest.raises(SettingsError, match="init='imagenet' loads torchvision's ResNet-18, of width 64"):
        RetrievalConfig.build("T4", "smoke", device="cpu", init="imagenet")  # (smoke: width 16) before any data is read


def test_xbm_objective_state_is_checkpointed():
    objective = ms_objective(RetrievalConfig.build("T4", "smoke", device="cpu", memory_size=16), "xbm")
    objective.train()
    objective(torch.nn.Identity(), torch.randn(8, 512), torch.arange(4).repeat(2))
    state = objective.state_dict()
    assert any("memory_embeddings" in k for k in state) and any(k.endswith("_extra_state") for k in state)


def test_load_backbone_reports_what_kept_its_init():
    source = resnet18(200, stem="small", cubs="parallel", cubs_width=8)
    target = resnet18(98, stem="imagenet", cubs="parallel", cubs_width=8)
    report = load_backbone(target, source.state_dict())
    assert "conv1.weight" in report["kept_init"] and not any(k.startswith("fc.") for k in report["kept_init"])
    assert torch.equal(target.layer3[1].cubs2.q.weight, source.layer3[1].cubs2.q.weight)
    assert not torch.equal(target.conv1.weight[:, :, :3, :3], source.conv1.weight)


def imagenet_config(**kw):
    return RetrievalConfig.build("T4", "smoke", device="cpu", init="imagenet", cubs_width=8, resnet_width=64, **kw)


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """(home, seen): an empty TORCH_HOME (torch.hub reads it at each call) where any download fails
    at once, so a test never reaches the network while torch.hub's own download code runs; `seen`:
    the cache folder's files when the download started (torch.hub's .partial file)."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # in case something called torch.hub.set_dir
    seen = []

    def offline(*args, **kwargs):
        seen.extend(p.name for p in (home / "hub" / "checkpoints").iterdir())
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(torch.hub, "urlopen", offline)
    return home, seen


def test_init_options(tmp_path, torch_home):  # torch_home: a test that tried a download fails
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    cfg = imagenet_config(imagenet_weights=str(weights))
    model, report = build_backbone(cfg, "serial12", 98)
    assert report["pretrained"].startswith("ImageNet") and report["loaded"] == 120 and report["weights"] == str(weights)
    assert torch.equal(model.layer2[0].conv1.weight, torch.load(weights)["layer2.0.conv1.weight"])
    assert init_weights_key(cfg) == {"init_weights_sha1": hashlib.sha1(weights.read_bytes()).hexdigest()}
    missing = str(tmp_path / "none.pth")
    with pytest.raises(ValueError, match=r"imagenet_weights='.*none\.pth' does not exist"):
        build_backbone(imagenet_config(imagenet_weights=missing), "serial12", 98)
    with pytest.raises(ValueError, match="Run T3 first"):
        build_backbone(
            RetrievalConfig.build(
                "T4", "smoke", device="cpu", init="tinyimagenet", checkpoint=str(tmp_path / "none.pt")
            ),
            "serial12",
            98,
        )


def test_imagenet_weights_come_from_torchvisions_cache(torch_home):
    """init="imagenet" without a path: the file torchvision's weights API keeps under
    $TORCH_HOME/hub/checkpoints, loaded by name; the run key is that file's SHA-1."""
    home, _ = torch_home
    cached = home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert imagenet_cache_file() == cached
    torch.manual_seed(3)
    state = torchvision.models.resnet18().state_dict()
    state["bn1.running_mean"].normal_()  # not the init value our model would keep
    cached.parent.mkdir(parents=True)
    torch.save(state, cached)
    cfg = imagenet_config()
    model, report = build_backbone(cfg, "serial12", 98)
    assert (
        report["weights"] == str(cached)
        and report["pretrained"] == "ImageNet-1k (torchvision)"
        and report["loaded"] == 120
    )
    assert torch.equal(model.layer3[1].conv2.weight, state["layer3.1.conv2.weight"])
    assert torch.equal(model.bn1.running_mean, state["bn1.running_mean"])
    assert init_weights_key(cfg) == {"init_weights_sha1": hashlib.sha1(cached.read_bytes()).hexdigest()}


def test_imagenet_weights_offline_without_cache_say_where_to_put_the_file(torch_home):
    home, seen = torch_home
    cache_dir = home / "hub" / "checkpoints"
    expected = str(cache_dir / "resnet18-f37072fd.pth")
    for call in (lambda cfg: build_backbone(cfg, "serial12", 98), init_weights_key):
        with pytest.raises(ValueError) as caught:
            call(imagenet_config())
        message = str(caught.value)
        assert (
            "https://download.pytorch.org/models/resnet18-f37072fd.pth failed" in message
            and "no network in tests" in message
        )
        assert f"to {expected} " in message and "imagenet_weights=<path" in message
        assert caught.value.__cause__ is None and caught.value.__suppress_context__, "one message, no traceback chain"
        assert seen and seen[-1].startswith("resnet18-f37072fd.pth.") and seen[-1].endswith(".partial"), (
            "torch.hub's download ran"
        )
        assert list(cache_dir.iterdir()) == [], "no partial download left in the cache"


def test_t3_selection_feeds_t4(tmp_path):
    cfg = RetrievalConfig.build("T4", "smoke", device="cpu", out_dir=str(tmp_path))
    concrete, note = apply_t3_selection(cfg)
    assert (concrete.fashion, concrete.init) == ("serial12", "scratch") and "T3 has not run" in note
    ckpt = tmp_path / "checkpoints" / "T3_serial21" / "best.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"model": resnet18(20, stem="imagenet", cubs="serial21", width=cfg.resnet_width).state_dict()}, ckpt)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "T3_cubs_resnet18.json").write_text(
        json.dumps(
            {
                "selection": {
                    "criterion": "held-out top-1",
                    "best": "T3_serial21",
                    "fashion": "serial21",
                    "checkpoint": str(ckpt),
                    "stem": "imagenet",
                }
            }
        )
    )
    concrete, note = apply_t3_selection(cfg)
    assert (concrete.fashion, concrete.init, concrete.checkpoint) == (
        "serial21",
        "tinyimagenet",
        str(ckpt),
    ) and "held-out selection" in note
    model, report = build_backbone(concrete, concrete.fashion, 98)
    assert report["loaded"] > 100 and report["checkpoint"] == str(ckpt)
    given, _ = apply_t3_selection(
        RetrievalConfig.build("T4", "smoke", device="cpu", out_dir=str(tmp_path), fashion="parallel", init="scratch")
    )
    assert (given.fashion, given.init) == ("parallel", "scratch")


def test_grid_queries_pick_distinct_classes():
    labels = np.repeat(np.arange(10, 20), 3)
    queries = grid_queries(labels, 3)
    assert len(set(labels[queries])) == 3 and queries[0] == 0


def test_config_errors():
    with pytest.raises(ValueError, match="pk_images=1 is not valid; expected a whole number >= 2"):
        RetrievalConfig.build("T4", "smoke", pk_images=1)
    with pytest.raises(ValueError, match="none, ms, batch_hard, semi_hard, adaptive_ms, xbm"):
        RetrievalConfig.build("T4", "smoke", ablation=["ms", "hardest"])
    with pytest.raises(ValueError, match="must not exceed resize"):
        RetrievalConfig.build("T4", "smoke", image_size=64, resize=56)
