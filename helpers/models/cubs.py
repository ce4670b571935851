"""CUBS blocks: a channel gate (Block 1) and a spatial gate (Block 2) built on column-softmax similarity.

Both blocks compute, from three vectors q, k, v of length L (L = N for Block 1, L = H*W for Block 2),

    S[i, j] = q_i * k_j,    A = softmax over i of S (each column sums to 1),    f_j = sum_i v_i A[i, j],

then squash f into a gate with a sigmoid and multiply the input by it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# Fused SDPA kernels (flash / memory-efficient) need a head dim that is a multiple of 8.
_PADDED_HEAD_DIM = 8


def column_softmax_features(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """f_j = sum_i v_i softmax_i(q_i k_j), without building the (B, L, L) matrix.

    q, k, v: (B, L) -> f: (B, L).
    """
    # This is attention with head dim 1 and scale 1: for output position j the query is k_j,
    # the keys are q_i and the values v_i, so softmax over the keys is the column softmax over i.
    # With head dim 1 no fused CUDA kernel applies and SDPA's math fallback would materialise
    # the L x L matrix (B x 4096^2 on 64x64 maps). Zero-padding the head dim to 8 changes nothing:
    # the zero columns of q and k add 0 to every dot product, and the zero columns of v give
    # zero output columns that we drop. With head dim 8 the flash / memory-efficient kernels
    # (and PyTorch's blocked CPU flash kernel) apply, which never hold the L x L matrix.
    device_type = q.device.type
    dtype = q.dtype
    if torch.is_autocast_enabled(device_type):
        # Under autocast the fused kernels want all three in the autocast dtype (bf16 / fp16).
        dtype = torch.get_autocast_dtype(device_type)
    q, k, v = (F.pad(t.to(dtype)[:, None, :, None], (0, _PADDED_HEAD_DIM - 1)) for t in (q, k, v))
    f = F.scaled_dot_product_attention(query=k, key=q, value=v, scale=1.0)  # (B, 1, L, 8)
    return f[:, 0, :, 0]


class CUBSBlock1(nn.Module):
    """Channel gate (CUBS Block 1): (B, C, H, W) -> (B, C, H, W).

    g = GAP(x) (B, C); q, k, v = Linear(C, N)(g) (B, N); f = column_softmax_features(q, k, v) (B, N);
    w = sigmoid(Linear(N, C)(f) + g) (B, C); output x * w per channel. N = width (default C).
    """

    def __init__(self, channels: int, width: int | None = None) -> None:
        super().__init__()
        width = width or channels
        self.q = nn.Linear(channels, width)
        self.k = nn.Linear(channels, width)
        self.v = nn.Linear(channels, width)
        self.out = nn.Linear(width, channels)

    def reset_parameters(self) -> None:
        for layer in (self.q, self.k, self.v, self.out):
            layer.reset_parameters()

    def gate_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C): the pre-sigmoid channel gate."""
        g = x.mean(dim=(2, 3))
        f = column_softmax_features(self.q(g), self.k(g), self.v(g))
        return self.out(f.to(g.dtype)) + g

    def gate(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.gate(self.gate_logits(x))
        return x * w.to(x.dtype)[:, :, None, None]


class CUBSBlock2(nn.Module):
    """Spatial gate (CUBS Block 2): (B, C, H, W) -> (B, C, H, W).

    q, k, v = Conv2d(C, 1, 1)(x) flattened to (B, HW); f = column_softmax_features(q, k, v) (B, HW);
    map = sigmoid(f) reshaped to (B, 1, H, W); output x * map per pixel.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.q = nn.Conv2d(channels, 1, kernel_size=1)
        self.k = nn.Conv2d(channels, 1, kernel_size=1)
        self.v = nn.Conv2d(channels, 1, kernel_size=1)

    def reset_parameters(self) -> None:
        for layer in (self.q, self.k, self.v):
            layer.reset_parameters()

    def gate_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1, H, W): the pre-sigmoid spatial map."""
        q, k, v = (conv(x).flatten(1) for conv in (self.q, self.k, self.v))
        return column_softmax_features(q, k, v).reshape(x.shape[0], 1, *x.shape[2:])

    def gate(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.gate_logits(x)).to(x.dtype)


class _IdentityInitGate:
    """Gate 1 + s * (2 * sigmoid(z) - 1) with a learnable scalar s (`gate_scale`, 0 at init):
    shared by the two scaled blocks, which create `gate_scale` in their __init__."""

    gate_scale: nn.Parameter

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.zeros_(self.gate_scale)

    def gate(self, logits: torch.Tensor) -> torch.Tensor:
        # 2 * sigmoid - 1 lies in (-1, 1), so the gate lies in (1 - |s|, 1 + |s|) and is 1 at s = 0.
        return 1 + self.gate_scale * (2 * torch.sigmoid(logits) - 1)


class ScaledCUBSBlock1(_IdentityInitGate, CUBSBlock1):
    """CUBS Block 1 with an identity-at-init gate: x * (1 + s * (2 * sigmoid(z) - 1)), learnable scalar s = 0 at init.

    Why: the plain sigmoid gate is about 0.5 at init, so every residual branch it sits on is halved
    (quartered in the serial fashions: 16 gates over the 8 blocks of ResNet-18), and the gradient that
    reaches each branch's convolutions is scaled down by the same factor. The gate can also only
    attenuate. With s = 0 a serial-fashion CUBS network starts as exactly the plain ResNet-18 function
    (same signal and gradient scale), so it starts no worse than the baseline; s is learned (like
    LayerScale / ReZero), and once |s| grows the gate can both attenuate and amplify channels.
    In the parallel fashion the two identity gates give 2 F(x) at init (as if bn2's weight were 2).
    Costs one scalar per block and no FLOPs worth mentioning.
    """

    def __init__(self, channels: int, width: int | None = None) -> None:
        super().__init__(channels, width)
        self.gate_scale = nn.Parameter(torch.zeros(()))


class ScaledCUBSBlock2(_IdentityInitGate, CUBSBlock2):
    """CUBS Block 2 with the identity-at-init gate of ScaledCUBSBlock1 (see its docstring for why)."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.gate_scale = nn.Parameter(torch.zeros(()))


CUBS_VARIANTS: dict[str, tuple[type[CUBSBlock1], type[CUBSBlock2]]] = {
    "plain": (CUBSBlock1, CUBSBlock2),
    "scaled": (ScaledCUBSBlock1, ScaledCUBSBlock2),
}


def cubs_blocks(variant: str) -> tuple[type[CUBSBlock1], type[CUBSBlock2]]:
    """The (Block 1, Block 2) classes of a variant name; ValueError listing the valid names."""
    if variant not in CUBS_VARIANTS:
        raise ValueError(f"unknown cubs_variant {variant!r}; valid: {', '.join(map(repr, CUBS_VARIANTS))}")
    return CUBS_VARIANTS[variant]
