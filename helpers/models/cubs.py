"""CUBS blocks: a channel gate (Block 1) and a spatial gate (Block 2) built on column-softmax similarity.

Both blocks compute, from three vectors q, k, v of length L (L = N for Block 1, L = H*W for Block 2),

    S[i, j] = q_i * k_j,    A = softmax over i of S (each column sums to 1),    f_j = sum_i v_i A[i, j],

then squash f into a gate with a sigmoid and multiply the input by it.

`column_softmax_features` never builds the (B, L, L) matrix (B x 4096^2 on 64x64 maps), on any device.
It has two exact paths:

- "sdpa": `F.scaled_dot_product_attention` with the head dim zero-padded to 8, which lets the fused
  kernels run (CUDA flash / memory-efficient, PyTorch's blocked CPU flash kernel; none of them holds
  the L x L matrix). Used on CPU, and on CUDA when flash or memory-efficient attention accepts the
  padded inputs.
- "chunked": `chunked_column_softmax_features`, a custom autograd Function that walks over blocks
  of output positions j with a stabilised log-sum-exp, saves only O(B L) tensors and recomputes
  each block's softmax in backward; its temporaries hold about `_CHUNK_ELEMENTS` elements. Used
  wherever no fused kernel applies (a CUDA GPU without a usable flash / memory-efficient kernel,
  float64 on CUDA, Apple MPS, XPU and any other device).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

# Fused SDPA kernels (flash / memory-efficient) need a head dim that is a multiple of 8.
_PADDED_HEAD_DIM = 8

# Elements of each (B, chunk, L) temporary of the chunked path: 2^24, i.e. 64 MiB in float32.
_CHUNK_ELEMENTS = 1 << 24

COLUMN_SOFTMAX_METHODS = ("auto", "sdpa", "chunked")


def column_softmax_method(device_type: str, fused_available: bool) -> str:
    """The path "auto" takes: "sdpa" or "chunked".

    CPU: "sdpa" (PyTorch's CPU flash kernel is blocked and takes every dtype). CUDA: "sdpa" when a
    fused kernel (flash or memory-efficient) accepts the padded inputs (`fused_available`), else
    "chunked" (SDPA would fall back to its math kernel, which builds the L x L matrix). Any other
    device (mps, xpu, ...): "chunked", since whether SDPA fuses there is not checkable.
    """
    if device_type == "cpu":
        return "sdpa"
    if device_type == "cuda":
        return "sdpa" if fused_available else "chunked"
    return "chunked"


def _cuda_fused_sdpa_available(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether CUDA SDPA can run flash or memory-efficient attention on these (B, 1, L, 8) inputs.

    False when the check cannot be made (SDPAParams' constructor differs across torch versions).
    """
    backends = torch.backends.cuda
    try:
        try:  # torch >= 2.5: (query, key, value, attn_mask, dropout, is_causal, enable_gqa)
            params = backends.SDPAParams(query, key, value, None, 0.0, False, False)
        except TypeError:  # torch 2.1 - 2.4: no enable_gqa
            params = backends.SDPAParams(query, key, value, None, 0.0, False)
        flash = backends.flash_sdp_enabled() and backends.can_use_flash_attention(params, False)
        efficient = backends.mem_efficient_sdp_enabled() and backends.can_use_efficient_attention(params, False)
        return bool(flash or efficient)
    except Exception:  # noqa: BLE001 - any failure of the check means "not known to be fused"
        return False


def _pad_head_dim(t: torch.Tensor) -> torch.Tensor:
    """(B, L) -> (B, 1, L, 8): one head, the vector in column 0 and zeros after it."""
    return F.pad(t[:, None, :, None], (0, _PADDED_HEAD_DIM - 1))


def _chunk_rows(batch: int, length: int) -> int:
    """Rows j per chunk so that a (B, chunk, L) temporary holds about _CHUNK_ELEMENTS elements."""
    return max(1, min(length, _CHUNK_ELEMENTS // max(1, batch * length)))


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type without autocast support (e.g. meta)
        return False


def _autocast_off(device_type: str):
    return torch.autocast(device_type, enabled=False) if _autocast_enabled(device_type) else nullcontext()


class _ChunkedColumnSoftmax(torch.autograd.Function):
    """f_j = sum_i v_i softmax_i(q_i k_j) in blocks of c output positions j; inputs (B, L) of one dtype.

    Forward, per block: E = exp(S - m) with S[b, j, i] = k_j q_i (B, c, L) and m_j = max_i S (exact:
    max(k_j max q, k_j min q)), lse_j = m_j + log sum_i E, f_j = sum_i E v_i / sum_i E. Saves only
    q, k, v, f and lse (O(B L)). Backward recomputes each block's softmax a = exp(S - lse) and, with
    g = dL/df, dS_ij = g_j a_ij (v_i - f_j):
        dv_i += sum_j g_j a_ij,   dq_i += sum_j dS_ij k_j,   dk_j = sum_i dS_ij q_i,
    as two batched matmuls per block (v and f are shifted by mean(v) first, which leaves v_i - f_j
    unchanged and keeps the two halves of dS small). Not twice differentiable (once_differentiable).
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int) -> torch.Tensor:
        length = q.shape[1]
        with _autocast_off(q.device.type):
            q_max, q_min = q.amax(dim=1, keepdim=True), q.amin(dim=1, keepdim=True)
            neg_max = -torch.maximum(k * q_max, k * q_min)  # (B, L): -max_i q_i k_j, the stabiliser
            f, lse = torch.empty_like(q), torch.empty_like(q)
            for j0 in range(0, length, chunk):
                j1 = min(j0 + chunk, length)
                e = torch.addcmul(neg_max[:, j0:j1, None], k[:, j0:j1, None], q[:, None, :]).exp_()  # (B, c, L)
                total = e.sum(dim=2)
                f[:, j0:j1] = torch.bmm(e, v[:, :, None])[:, :, 0] / total
                lse[:, j0:j1] = torch.log(total) - neg_max[:, j0:j1]
                del e  # before the next block's exp: never two (B, c, L) blocks at once
        ctx.chunk = chunk
        ctx.save_for_backward(q, k, v, f, lse)
        return f

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_f: torch.Tensor):
        q, k, v, f, lse = ctx.saved_tensors
        chunk, length = ctx.chunk, q.shape[1]
        with _autocast_off(q.device.type):
            grad_f = grad_f.to(q.dtype)
            shift = v.mean(dim=1, keepdim=True)
            v_c, f_c = v - shift, f - shift  # v_i - f_j is unchanged
            # Per position j: the weights of sum_j a_ij (.) for dv, and for the two halves of dq.
            row_weights = torch.stack((grad_f, grad_f * k, grad_f * f_c * k), dim=1)  # (B, 3, L)
            col_values = torch.stack((v_c * q, q), dim=2)  # (B, L, 2): sum_i a_ij (.) for dk
            over_j = torch.zeros_like(row_weights)  # (B, 3, L): sums over j, indexed by i
            grad_k = torch.empty_like(k)
            for j0 in range(0, length, chunk):
                j1 = min(j0 + chunk, length)
                a = torch.addcmul(-lse[:, j0:j1, None], k[:, j0:j1, None], q[:, None, :]).exp_()  # (B, c, L)
                over_j.baddbmm_(row_weights[:, :, j0:j1], a)
                over_i = torch.bmm(a, col_values)  # (B, c, 2)
                grad_k[:, j0:j1] = grad_f[:, j0:j1] * (over_i[:, :, 0] - f_c[:, j0:j1] * over_i[:, :, 1])
                del a
            grad_v = over_j[:, 0]
            grad_q = v_c * over_j[:, 1] - over_j[:, 2]
        needs = ctx.needs_input_grad
        return (grad_q if needs[0] else None, grad_k if needs[1] else None, grad_v if needs[2] else None, None)


def chunked_column_softmax_features(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int | None = None
) -> torch.Tensor:
    """The "chunked" path of `column_softmax_features`: q, k, v (B, L) -> f (B, L), exact, bounded memory.

    Computes in float32 (float64 inputs in float64; float16 / bfloat16 are upcast) and returns q's
    dtype. Temporaries are (B, chunk_size, L); chunk_size defaults to about _CHUNK_ELEMENTS / (B L)
    rows (at least 1); any chunk_size >= 1 gives the same result up to rounding. Differentiable once
    (double backward raises).
    """
    if q.dim() != 2 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must all be (B, L); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    batch, length = q.shape
    chunk = _chunk_rows(batch, length) if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    compute = torch.promote_types(q.dtype, torch.float32)
    f = _ChunkedColumnSoftmax.apply(*(t.to(compute) for t in (q, k, v)), chunk)
    return f.to(q.dtype)


def column_softmax_features(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """f_j = sum_i v_i softmax_i(q_i k_j), without building the (B, L, L) matrix.

    q, k, v: (B, L) -> f: (B, L), in q's dtype, or in the autocast dtype when autocast is on for
    q's device (both paths then see q, k, v rounded to that dtype; the chunked path computes in
    float32 internally, float64 for float64). method: "auto" (the path `column_softmax_method`
    picks), "sdpa" (force SDPA: where no fused kernel applies it falls back to a kernel that builds
    the L x L matrix) or "chunked" (force `chunked_column_softmax_features`).
    """
    if method not in COLUMN_SOFTMAX_METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(map(repr, COLUMN_SOFTMAX_METHODS))}")
    device_type = q.device.type
    dtype = q.dtype
    if _autocast_enabled(device_type):
        # Under autocast the fused kernels want all three in the autocast dtype (bf16 / fp16).
        dtype = torch.get_autocast_dtype(device_type)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    if method == "auto":
        # Only CUDA needs the check (on CPU SDPA always fuses; elsewhere it cannot be checked).
        fused = device_type == "cuda" and _cuda_fused_sdpa_available(*(_pad_head_dim(t) for t in (k, q, v)))
        method = column_softmax_method(device_type, fused)
    if method == "chunked":
        return chunked_column_softmax_features(q, k, v)
    # This is attention with head dim 1 and scale 1: for output position j the query is k_j,
    # the keys are q_i and the values v_i, so softmax over the keys is the column softmax over i.
    # With head dim 1 no fused CUDA kernel applies and SDPA's math fallback would materialise
    # the L x L matrix (B x 4096^2 on 64x64 maps). Zero-padding the head dim to 8 changes nothing:
    # the zero columns of q and k add 0 to every dot product, and the zero columns of v give
    # zero output columns that we drop. With head dim 8 the flash / memory-efficient kernels
    # (and PyTorch's blocked CPU flash kernel) apply, which never hold the L x L matrix.
    q, k, v = (_pad_head_dim(t) for t in (q, k, v))
    f = F.scaled_dot_product_attention(query=k, key=q, value=v, scale=1.0)  # (B, 1, L, 8)
    return f[:, 0, :, 0]


class CUBSBlock1(nn.Module):
    """Channel gate (CUBS Block 1): (B, C, H, W) -> (B, C, H, W).

    g = GAP(x) (B, C); q, k, v = Linear(C, N)(g) (B, N); f = column_softmax_features(q, k, v) (B, N);
    w = sigmoid(Linear(N, C)(f) + g) (B, C); output x * w per channel. N = width (default C).
    `column_softmax_method` ("auto" | "sdpa" | "chunked", a plain attribute) picks the path of
    column_softmax_features (e.g. block.column_softmax_method = "chunked" in tests and benchmarks).
    """

    column_softmax_method: str = "auto"

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
        f = column_softmax_features(self.q(g), self.k(g), self.v(g), self.column_softmax_method)
        return self.out(f.to(g.dtype)) + g

    def gate(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.gate(self.gate_logits(x))
        return x * w.to(x.dtype)[:, :, None, None]


class CUBSBlock2(nn.Module):
    """Spatial gate (CUBS Block 2): (B, C, H, W) -> (B, C, H, W).

    q, k, v = Conv2d(C, 1, 1)(x) flattened to (B, HW); f = column_softmax_features(q, k, v) (B, HW);
    map = sigmoid(f) reshaped to (B, 1, H, W); output x * map per pixel. `column_softmax_method`
    picks the path of column_softmax_features, as in CUBSBlock1.
    """

    column_softmax_method: str = "auto"

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
        f = column_softmax_features(q, k, v, self.column_softmax_method)
        return f.reshape(x.shape[0], 1, *x.shape[2:])

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
