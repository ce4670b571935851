"""Batch augmentation on uint8 image batches, on whatever device the batch lives (CPU or GPU).

Every random choice is drawn from an explicit `torch.Generator`, per image but in whole-batch
tensor ops (no per-image Python), so the per-item, cached and GPU-resident paths share one
augmentation and a run is reproducible and resumable.
"""

from __future__ import annotations

import copy

import math

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROPS = ("pad", "rrc", "none")


def _uniform(n: int, low: float, high: float, generator: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=device) * (high - low) + low


_STATS: dict = {}


def _channel_stats(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    # built once per device: creating a CUDA tensor from a Python list every batch would be a
    # host-to-device copy that waits for the GPU
    key = (tuple(values), str(device))
    if key not in _STATS:
        _STATS[key] = torch.tensor(values, device=device).view(1, -1, 1, 1) * 255
    return _STATS[key]


def normalize(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 or [0, 255] float (B, 3, H, W) -> float32 normalised."""
    return (x.float() - _channel_stats(mean, x.device)) / _channel_stats(std, x.device)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Float (B, C, H, W) -> (B, C, size, size), antialiased bilinear."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size, size) from the centre (H, W >= size)."""
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size]


def random_crop(x: torch.Tensor, size: int, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad by `padding` and cut a random size x size window per image. (B, C, H, W) -> (B, C, size, size)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    oy = torch.randint(0, h + 2 * padding - size + 1, (b,), generator=generator, device=x.device)
    ox = torch.randint(0, w + 2 * padding - size + 1, (b,), generator=generator, device=x.device)
    steps = torch.arange(size, device=x.device)
    rows, cols = (oy[:, None] + steps)[:, :, None], (ox[:, None] + steps)[:, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded[batch, :, rows, cols].permute(0, 3, 1, 2)  # advanced indexing puts C last


def random_flip(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Horizontally flip each image with probability p."""
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def random_resized_crop(
    x: torch.Tensor,
    size: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = False,
) -> torch.Tensor:
    """Random area fraction in `scale`, aspect ratio in `ratio` (log-uniform), resized to size x size.

    Float (B, C, H, W) -> (B, C, size, size). Boxes larger than the image are shrunk to fit (instead of
    torchvision's ten retries). With `flip`, half the crops are mirrored in the same resampling.
    """
    b, device = x.shape[0], x.device
    h, w = x.shape[-2:]
    area = _uniform(b, *scale, generator, device)
    log_r = _uniform(b, math.log(ratio[0]), math.log(ratio[1]), generator, device)
    aspect = torch.exp(log_r) * h / w  # width/height ratio in normalised units
    cw = torch.sqrt(area * aspect).clamp(max=1.0)  # crop width as a fraction of the image width
    ch = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (torch.rand(b, generator=generator, device=device) * 2 - 1) * (1 - cw)
    cy = (torch.rand(b, generator=generator, device=device) * 2 - 1) * (1 - ch)
    sign = torch.ones(b, device=device)
    if flip:
        sign = torch.where(torch.rand(b, generator=generator, device=device) < 0.5, -sign, sign)
    theta = torch.zeros(b, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 2] = cw * sign, cx
    theta[:, 1, 1], theta[:, 1, 2] = ch, cy
    grid = F.affine_grid(theta, (b, x.shape[1], size, size), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return F.one_hot(labels, num_classes).float()


class AugmentRNG:
    """The two random streams of the augmentation, both seeded from one integer.

    `device`: per-image draws (crop offsets, flips, box shapes) on the batch's device;
    `host`: per-batch scalars (mix or not, the mix weight) on the CPU, so that reading them never
    waits for the GPU. `state()` / `load_state()` make a resumed run draw the same numbers.
    """

    def __init__(self, seed: int, device: str | torch.device = "cpu"):
        self.device = torch.Generator(device=device)
        self.device.manual_seed(seed)
        self.host = torch.Generator()
        self.host.manual_seed(seed + 1)

    def state(self) -> dict:
        return {"device": self.device.get_state(), "host": self.host.get_state()}

    def load_state(self, state: dict) -> None:
        self.device.set_state(state["device"])
        self.host.set_state(state["host"])


def host_uniform(generator: torch.Generator) -> float:
    return float(torch.rand(1, generator=generator))


def sample_beta(alpha: float, generator: torch.Generator) -> float:
    """One Beta(alpha, alpha) draw from a CPU generator (ratio of two Gamma draws)."""
    g1, g2 = sample_gamma(alpha, generator), sample_gamma(alpha, generator)
    return g1 / (g1 + g2)


def sample_gamma(alpha: float, generator: torch.Generator) -> float:
    """One Gamma(alpha, 1) draw (Marsaglia-Tsang; for alpha < 1 boosted by U^(1/alpha))."""
    a = alpha + 1 if alpha < 1 else alpha
    d = a - 1 / 3
    c = 1 / math.sqrt(9 * d)
    while True:  # accepts with probability > 0.95
        z = float(torch.randn(1, generator=generator))
        v = (1 + c * z) ** 3
        if v > 0 and math.log(max(host_uniform(generator), 1e-300)) < 0.5 * z * z + d - d * v + d * math.log(v):
            break
    sample = d * v
    if alpha < 1:
        sample *= max(host_uniform(generator), 1e-300) ** (1 / alpha)
    return sample


def mixup(x: torch.Tensor, targets: torch.Tensor, lam: float, perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend the batch with its permutation `perm` with weight `lam`. x (B, C, H, W), soft targets (B, K)."""
    return lam * x + (1 - lam) * x[perm], lam * targets + (1 - lam) * targets[perm]


def cutmix(
    x: torch.Tensor, targets: torch.Tensor, lam: float, perm: torch.Tensor, centre: tuple[float, float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste a box of area about (1 - lam) centred at `centre` (fractions of H, W) from x[perm];
    targets weighted by the area actually pasted."""
    _, _, h, w = x.shape
    cut = math.sqrt(1 - lam)
    cy, cx = int(centre[0] * h), int(centre[1] * w)
    y0, y1 = max(cy - int(cut * h) // 2, 0), min(cy + int(cut * h) // 2, h)
    x0, x1 = max(cx - int(cut * w) // 2, 0), min(cx + int(cut * w) // 2, w)
    mixed = x.clone()
    mixed[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
    kept = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    return mixed, kept * targets + (1 - kept) * targets[perm]


class BatchAugment:
    """The train/eval image pipeline on uint8 batches (B, 3, H, W) -> normalised float (B, 3, S, S).

    crop: "pad" (zero-pad by `padding`, random S x S window: the Tiny ImageNet recipe), "rrc"
    (random-resized crop with `scale`/`ratio`: the Cars-196 recipe) or "none". `size` is the output
    side S (default: the input side); with `resize_to`, batches are first resized to that side
    (antialiased), e.g. 64 -> 32 for quick CPU runs. Eval: resize_to, then a centre crop to S.
    mixup/cutmix (alpha > 0) act on a fraction `mix_prob` of the training batches and return soft
    targets (B, num_classes); otherwise the integer labels come back unchanged.
    """

    def __init__(
        self,
        crop: str = "pad",
        size: int | None = None,
        resize_to: int | None = None,
        padding: int = 4,
        scale: tuple[float, float] = (0.25, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: bool = True,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mix_prob: float = 1.0,
        num_classes: int | None = None,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ):
        if crop not in CROPS:
            raise ValueError(f"crop={crop!r} is not valid; choose one of {', '.join(CROPS)}")
        if (mixup_alpha > 0 or cutmix_alpha > 0) and not num_classes:
            raise ValueError("mixup/cutmix need num_classes (for the soft targets)")
        self.crop, self.size, self.resize_to, self.padding = crop, size, resize_to, padding
        self.scale, self.ratio, self.flip = scale, ratio, flip
        self.mixup_alpha, self.cutmix_alpha, self.mix_prob = mixup_alpha, cutmix_alpha, mix_prob
        self.num_classes, self.mean, self.std = num_classes, mean, std

    @property
    def mixes(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    @property
    def translates(self) -> bool:
        """Whether training batches are randomly shifted (a pad crop with padding)."""
        return self.crop == "pad" and self.padding > 0

    def without_translation(self) -> "BatchAugment":
        """A copy that crops with padding 0 (flips, mixing and normalisation unchanged)."""
        other = copy.copy(self)
        other.padding = 0
        return other

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return resize(x, self.resize_to) if self.resize_to else x

    def train(self, x: torch.Tensor, labels: torch.Tensor, rng: AugmentRNG) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, 3, H, W), labels (B,) -> augmented normalised float (B, 3, S, S), targets."""
        generator = rng.device
        x = self._prepare(x)
        size = self.size or x.shape[-1]
        if self.crop == "rrc":
            x = random_resized_crop(x, size, generator, self.scale, self.ratio, flip=self.flip)
        else:
            if self.crop == "pad":
                x = random_crop(x, size, self.padding, generator)
            elif x.shape[-1] != size:
                x = center_crop(x, size)
            if self.flip:
                x = random_flip(x, generator)
        x = normalize(x, self.mean, self.std)
        targets = labels
        if self.mixes:
            targets = one_hot(labels, self.num_classes)
            if host_uniform(rng.host) < self.mix_prob:
                use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or host_uniform(rng.host) < 0.5)
                lam = sample_beta(self.cutmix_alpha if use_cutmix else self.mixup_alpha, rng.host)
                perm = torch.randperm(x.shape[0], generator=generator, device=x.device)
                if use_cutmix:
                    x, targets = cutmix(x, targets, lam, perm, (host_uniform(rng.host), host_uniform(rng.host)))
                else:
                    x, targets = mixup(x, targets, lam, perm)
        return x, targets

    def eval(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> normalised float (B, 3, S, S) without randomness."""
        x = self._prepare(x)
        size = self.size or x.shape[-1]
        if x.shape[-1] != size or x.shape[-2] != size:
            x = center_crop(x, size) if min(x.shape[-2:]) >= size else resize(x, size)
        return normalize(x, self.mean, self.std)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"BatchAugment({fields})"


class FlatGray:
    """uint8 RGB batches (B, 3, H, W) -> flattened grayscale in [0, 1], (B, H * W), for MLPs.

    Luma weights 0.299 / 0.587 / 0.114; with `flip`, training batches are mirrored at random per
    image. Same train/eval interface as BatchAugment; labels come back unchanged.
    """

    WEIGHTS = (0.299, 0.587, 0.114)

    def __init__(self, flip: bool = True):
        self.flip = flip

    def _gray(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.tensor(self.WEIGHTS, device=x.device).view(1, 3, 1, 1)
        return (x.float() * weights).sum(1, keepdim=True) / 255

    def train(self, x: torch.Tensor, labels: torch.Tensor, rng: AugmentRNG) -> tuple[torch.Tensor, torch.Tensor]:
        gray = self._gray(x)
        if self.flip:
            gray = random_flip(gray, rng.device)
        return gray.flatten(1), labels

    def eval(self, x: torch.Tensor) -> torch.Tensor:
        return self._gray(x).flatten(1)

    def __repr__(self) -> str:
        return f"FlatGray(flip={self.flip})"
