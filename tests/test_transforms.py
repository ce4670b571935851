import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers.data import AugmentRNG, BatchAugment
from helpers.data import transforms as T


def batch(b=6, h=12, w=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, h, w), generator=g, dtype=torch.uint8)


def test_random_crop_is_a_window_of_the_padded_image():
    x = batch().float()
    out = T.random_crop(x, 10, 3, torch.Generator().manual_seed(1))
    assert out.shape == (6, 3, 10, 10)
    padded = F.pad(x, (3, 3, 3, 3))
    offsets = set()
    for b in range(6):
        matches = [
            (oy, ox)
            for oy in range(9)
            for ox in range(9)
            if torch.equal(padded[b, :, oy : oy + 10, ox : ox + 10], out[b])
        ]
        assert matches, f"image {b} is not a window of its padded input"
        offsets.add(matches[0])
    assert len(offsets) > 1, "offsets differ between images"


def test_random_flip_flips_some_images_only():
    x = batch(b=32).float()
    out = T.random_flip(x, torch.Generator().manual_seed(0))
    flipped = [torch.equal(out[b], x[b].flip(-1)) for b in range(32)]
    kept = [torch.equal(out[b], x[b]) for b in range(32)]
    assert all(f or k for f, k in zip(flipped, kept)) and 4 < sum(flipped) < 28


def test_random_resized_crop_full_box_is_identity_or_mirror():
    x = batch(b=8, h=16, w=16).float()
    out = T.random_resized_crop(x, 16, torch.Generator().manual_seed(0), scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=True)
    for b in range(8):
        assert torch.allclose(out[b], x[b], atol=1e-3) or torch.allclose(out[b], x[b].flip(-1), atol=1e-3)


def test_random_resized_crop_samples_the_right_area():
    # an image whose pixel value is its column index: a crop's value range gives its width
    h = w = 64
    x = torch.arange(w, dtype=torch.float32).expand(200, 3, h, w).contiguous()
    out = T.random_resized_crop(x, 32, torch.Generator().manual_seed(0), scale=(0.25, 0.25), ratio=(1.0, 1.0))
    widths = out[:, 0, 16, -1] - out[:, 0, 16, 0]
    assert torch.allclose(widths, torch.full_like(widths, 32 * 31 / 32), atol=1.0)


def test_mixup_and_cutmix_targets():
    x = torch.rand(4, 3, 8, 8)
    soft = F.one_hot(torch.tensor([0, 1, 2, 3]), 4).float()
    perm = torch.tensor([1, 2, 3, 0])
    mixed, targets = T.mixup(x, soft, 0.3, perm)
    assert torch.allclose(mixed, 0.3 * x + 0.7 * x[perm]) and torch.allclose(targets.sum(1), torch.ones(4))
    assert torch.allclose(targets[0], torch.tensor([0.3, 0.7, 0, 0]))
    cut, targets = T.cutmix(x, soft, 0.75, perm, (0.5, 0.5))
    pasted = (cut != x).any(1).float().mean().item()  # fraction of pixels that came from x[perm]
    assert math.isclose(targets[0, 1].item(), pasted, abs_tol=1e-6) and 0 < pasted < 0.5
    assert torch.allclose(targets.sum(1), torch.ones(4))


def test_beta_sampler_matches_moments():
    g = torch.Generator().manual_seed(0)
    for alpha in (0.2, 1.0, 2.0):
        draws = np.array([T.sample_beta(alpha, g) for _ in range(3000)])
        assert abs(draws.mean() - 0.5) < 0.03
        assert abs(draws.var() - 1 / (4 * (2 * alpha + 1))) < 0.02


def test_batch_augment_is_reproducible_and_resumable():
    aug = BatchAugment(crop="pad", padding=2, num_classes=5, mixup_alpha=0.4, cutmix_alpha=1.0, mix_prob=0.7)
    x, y = batch(b=5), torch.arange(5)
    rng = AugmentRNG(7)
    first = [aug.train(x, y, rng) for _ in range(3)]
    rng = AugmentRNG(7)
    aug.train(x, y, rng)
    state = rng.state()
    second = aug.train(x, y, rng)
    rng2 = AugmentRNG(123)
    rng2.load_state(state)
    resumed = aug.train(x, y, rng2)
    for (a, ta), (b, tb) in ((first[1], second), (second, resumed)):
        assert torch.equal(a, b) and torch.equal(ta, tb)
    assert first[0][1].shape == (5, 5) and torch.allclose(first[0][1].sum(1), torch.ones(5))


def test_eval_is_normalised_centre_crop_and_resize():
    x = batch(b=2, h=20, w=20)
    aug = BatchAugment(crop="rrc", size=16)
    out = aug.eval(x)
    mean = torch.tensor(T.IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(T.IMAGENET_STD).view(1, 3, 1, 1) * 255
    assert torch.allclose(out, (x[..., 2:18, 2:18].float() - mean) / std)
    small = BatchAugment(crop="pad", resize_to=10).eval(x)
    assert small.shape == (2, 3, 10, 10)
    assert BatchAugment(crop="pad", resize_to=10).train(x, torch.zeros(2, dtype=torch.long), AugmentRNG(0))[
        0
    ].shape == (2, 3, 10, 10)


def test_bad_options():
    with pytest.raises(ValueError, match="pad, rrc, none"):
        BatchAugment(crop="random")
    with pytest.raises(ValueError, match="num_classes"):
        BatchAugment(mixup_alpha=0.2)


def test_an_augmentation_without_translation_only_flips_and_leaves_the_original_alone():
    augment = BatchAugment(crop="pad", padding=4, flip=False)
    plain = augment.without_translation()
    assert augment.translates and not plain.translates and augment.padding == 4
    assert not BatchAugment(crop="rrc").translates and not BatchAugment(crop="pad", padding=0).translates
    x = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    shifted, _ = augment.train(x, torch.zeros(3).long(), AugmentRNG(0))
    unshifted, _ = plain.train(x, torch.zeros(3).long(), AugmentRNG(0))
    assert torch.equal(unshifted, plain.eval(x)) and not torch.equal(shifted, plain.eval(x))
