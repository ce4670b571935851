import numpy as np
import pytest
import torch

from helpers.config import LayerwiseConfig
from helpers.data import AugmentRNG, TensorBatches
from helpers.data.transforms import FlatGray
from helpers.layerwise import LayerReconstruction, build_mlp, build_stl10, greedy_pretrain
from helpers.models import MLP


def small_source(n=48, side=8, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    return TensorBatches(images, rng.integers(0, 3, n), batch_size=16, shuffle=True, drop_last=True)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_greedy_pretraining_trains_one_layer_at_a_time(tmp_path, monkeypatch):
    model = MLP(in_dim=64, hidden=(32, 24, 16, 12), num_classes=3)
    before = snapshot(model)
    cfg = LayerwiseConfig.build(
        "E2", "smoke", device="cpu", out_dir=str(tmp_path), hidden=(32, 24, 16, 12), pretrain_epochs=2, pretrain_lr=1e-2
    )
    states = []
    import helpers.layerwise as layerwise

    real_fit_stage = layerwise.fit_stage

    def recording_fit_stage(name, model, *args, **kwargs):  # the state after each greedy step
        result = real_fit_stage(name, model, *args, **kwargs)
        states.append(snapshot(model))
        return result

    monkeypatch.setattr(layerwise, "fit_stage", recording_fit_stage)
    results = greedy_pretrain(model, small_source(), FlatGray(flip=False), cfg, progress=False)
    assert len(results) == len(states) == 4
    for step, state in enumerate(states):
        previous = before if step == 0 else states[step - 1]
        for i in range(4):
            for name in ("weight", "bias"):
                key = f"layers.{i}.{name}"
                changed = not torch.equal(state[key], previous[key])
                assert changed == (i == step), f"step {step}: layer {i} {'changed' if changed else 'unchanged'}"
        assert torch.equal(state["fc.weight"], before["fc.weight"]), "the classifier is not pretrained"
    assert all(p.requires_grad for p in model.parameters()), "everything is trainable again afterwards"
    assert all(r.history[-1]["train_loss"] < r.history[0]["train_loss"] * 1.5 for r in results)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [f"E2_pretrain_layer{i}" for i in range(4)]


def test_reconstruction_objective_reads_frozen_codes():
    model = MLP(in_dim=16, hidden=(8, 6, 4, 4), num_classes=2)
    objective = LayerReconstruction(2, 4, 6)
    x = torch.rand(5, 16)
    loss, logits = objective(model, x, torch.zeros(5, dtype=torch.long))
    below = model.encode(x, 2)
    expected = torch.nn.functional.mse_loss(torch.relu(objective.decoder(torch.relu(model.layers[2](below)))), below)
    assert logits is None and torch.allclose(loss, expected)
    loss.backward()
    assert model.layers[0].weight.grad is None and model.layers[1].weight.grad is None
    assert model.layers[2].weight.grad is not None and objective.decoder.weight.grad is not None


def test_pretrained_and_baseline_share_one_architecture():
    cfg = LayerwiseConfig.build("E2", "smoke")
    a, b = build_mlp(cfg), build_mlp(cfg)
    assert [(k, v.shape) for k, v in a.state_dict().items()] == [(k, v.shape) for k, v in b.state_dict().items()]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values())), "same init"
    assert [l.out_features for l in a.layers] == list(cfg.hidden) and a.layers[0].in_features == 9216
    alternative = LayerwiseConfig.build("E2", "smoke", hidden=[1024, 1000, 500, 256, 128, 64])
    assert len(build_mlp(alternative).layers) == 6
    with pytest.raises(ValueError, match="at least 4"):
        LayerwiseConfig.build("E2", "smoke", hidden=[10, 10])


def test_flat_gray_uses_luma_and_flips(stl10_root):
    x = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    x[:, 0] = 255
    x[1, :, :, 0] = 0  # first column black in image 1
    out = FlatGray(flip=False).eval(x)
    assert out.shape == (2, 16) and torch.allclose(out[0], torch.full((16,), 0.299))
    flipped, _ = FlatGray(flip=True).train(x.repeat(16, 1, 1, 1), torch.zeros(32, dtype=torch.long), AugmentRNG(0))
    columns = flipped.view(32, 4, 4)[1::2]
    assert (columns[:, :, 0] == 0).any() and (columns[:, :, 3] == 0).any(), "some images are mirrored"


def test_build_stl10_splits(stl10_root, tmp_path):
    cfg = LayerwiseConfig.build("E2", "smoke", data_dir=str(stl10_root.parent), out_dir=str(tmp_path))
    data, pretrain = build_stl10(cfg)
    assert data.train.num_samples + data.heldout.num_samples == 30 and data.test.num_samples == 20
    x, y = next(data.test.epoch(0))
    assert data.augment.eval(x).shape == (len(y), 9216)
    with_unlabeled = LayerwiseConfig.build(
        "E2", "smoke", data_dir=str(stl10_root.parent), out_dir=str(tmp_path), use_unlabeled=True
    )
    _, pretrain = build_stl10(with_unlabeled)
    assert pretrain.num_samples == data.train.num_samples + 4


def test_each_pretraining_run_is_planned_with_its_own_layers_checkpoint_cost(monkeypatch):
    """The largest and the smallest layer's runs are timed (here: a cost per checkpointed parameter),
    the others interpolated by their size; each timed with only its own layer trainable."""
    from helpers import plan

    cfg = LayerwiseConfig.build("E2", "smoke", device="cpu", hidden=(64, 256, 32, 16))
    model = build_mlp(cfg)
    timed = []

    def measure_run_seconds(model, train, augment, fit_cfg, device, step, reconstruction):
        trainable = [p for p in model.parameters() if p.requires_grad]
        timed.append(reconstruction.layer)
        assert trainable == list(model.layers[reconstruction.layer].parameters())
        return 0.5 + 1e-4 * (trainable[0].numel() + reconstruction.decoder.weight.numel())

    monkeypatch.setattr(plan, "measure_run_seconds", measure_run_seconds)
    seconds = plan.pretrain_run_seconds(model, None, None, cfg, 0.01)
    sizes = [2 * layer.weight.numel() for layer in model.layers]
    assert sorted(timed) == sorted({sizes.index(max(sizes)), sizes.index(min(sizes))})
    assert seconds == pytest.approx([0.5 + 1e-4 * size for size in sizes])
    assert all(p.requires_grad for p in model.parameters()), "every layer trainable again"
