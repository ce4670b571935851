"""CUBS blocks against explicit float64 references that build the full similarity matrix."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from helpers.models import CUBSBlock1, CUBSBlock2, ScaledCUBSBlock1, ScaledCUBSBlock2


def column_softmax_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Naive f_j = sum_i v_i exp(S_ij) / sum_i' exp(S_i'j), S_ij = q_i k_j, with explicit loops over j."""
    batch, length = q.shape
    s = q[:, :, None] * k[:, None, :]  # (B, L, L), S[b, i, j]
    f = torch.empty(batch, length, dtype=q.dtype)
    for j in range(length):
        column = s[:, :, j]
        column = torch.exp(column - column.max(dim=1, keepdim=True).values)
        f[:, j] = (v * column).sum(dim=1) / column.sum(dim=1)
    return f


def block1_reference(block: CUBSBlock1, x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    lin = {name: (getattr(block, name).weight.double(), getattr(block, name).bias.double()) for name in "qkv"}
    w_out, b_out = block.out.weight.double(), block.out.bias.double()
    g = x.mean(dim=(2, 3))
    q, k, v = (g @ w.T + b for w, b in (lin["q"], lin["k"], lin["v"]))
    f = column_softmax_reference(q, k, v)
    w = torch.sigmoid(f @ w_out.T + b_out + g)
    return x * w[:, :, None, None]


def block2_reference(block: CUBSBlock2, x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    b, _, h, w = x.shape

    def conv1x1(conv: nn.Conv2d) -> torch.Tensor:
        return torch.einsum("bchw,c->bhw", x, conv.weight.double()[0, :, 0, 0]).reshape(b, h * w) + conv.bias.double()

    q, k, v = conv1x1(block.q), conv1x1(block.k), conv1x1(block.v)
    s = q[:, :, None] * k[:, None, :]  # the full (B, HW, HW) matrix, S[b, i, j] = q_i k_j
    a = torch.softmax(s, dim=1)  # column-wise: each column j sums to 1 over i
    assert torch.allclose(a.sum(dim=1), torch.ones(b, h * w, dtype=torch.float64))
    f = torch.einsum("bi,bij->bj", v, a)
    return x * torch.sigmoid(f).reshape(b, 1, h, w)


def _randomize(block: nn.Module, scale: float = 1.0) -> nn.Module:
    """Larger-than-default weights so the softmax is far from uniform (a weak test otherwise)."""
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, scale)
    return block


@pytest.mark.parametrize(
    "shape, width", [((2, 8, 5, 5), None), ((3, 16, 4, 7), 6), ((2, 12, 32, 32), 20), ((1, 5, 1, 1), 3)]
)
def test_block1_matches_reference(shape, width):
    torch.manual_seed(0)
    block = _randomize(CUBSBlock1(shape[1], width), 0.5)
    x = torch.randn(shape)
    assert torch.allclose(block(x).double(), block1_reference(block, x), atol=1e-5)
    assert torch.allclose(copy.deepcopy(block).double()(x.double()), block1_reference(block, x), atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 4, 5, 5), (3, 6, 4, 9), (2, 8, 32, 32), (2, 3, 16, 40), (2, 3, 1, 1)])
def test_block2_matches_reference(shape):
    torch.manual_seed(0)
    block = _randomize(CUBSBlock2(shape[1]), 1.0)
    x = torch.randn(shape)
    reference = block2_reference(block, x)
    gate = reference / x.double()
    assert shape[2] * shape[3] == 1 or gate.std() > 0.02  # the test is not trivially satisfied by a constant gate
    assert torch.allclose(block(x).double(), reference, atol=1e-5)
    assert torch.allclose(copy.deepcopy(block).double()(x.double()), reference, atol=1e-10)


def test_block1_layers():
    block = CUBSBlock1(32, width=16)
    linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 4
    shapes = [(m.in_features, m.out_features) for m in (block.q, block.k, block.v, block.out)]
    assert shapes == [(32, 16)] * 3 + [(16, 32)]
    assert {id(p) for p in block.parameters()} == {id(p) for m in linears for p in m.parameters()}
    assert all(len(list(m.children())) == 0 for m in block.children())
    assert CUBSBlock1(32).q.out_features == 32  # N defaults to C


def test_block2_layers():
    block = CUBSBlock2(32)
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3
    assert all((c.in_channels, c.out_channels, c.kernel_size) == (32, 1, (1, 1)) for c in convs)
    assert {id(p) for p in block.parameters()} == {id(p) for m in convs for p in m.parameters()}
    assert len(list(block.children())) == 3


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_block2_never_materialises_hw_by_hw(monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(kwargs["query"].shape)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting_sdpa)
    torch.manual_seed(0)
    block = CUBSBlock2(4)
    x = torch.randn(8, 4, 64, 64, requires_grad=True)
    with _LargestTensor() as forward:
        y = block(x)
    with _LargestTensor() as backward:
        y.square().sum().backward()
    assert calls == [torch.Size([8, 1, 64 * 64, 8])]  # head dim zero-padded to 8
    # One 4096 x 4096 similarity matrix is 16.8 M elements (64 MiB in fp32, per image); the largest
    # tensors allowed are the input (8 x 4 x 64 x 64) and the padded q, k, v (8 x 4096 x 8 = 262 k).
    assert max(forward.largest, backward.largest) <= max(x.numel(), 8 * 64 * 64 * 8)
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("block_type", [CUBSBlock1, CUBSBlock2])
def test_blocks_under_bf16_autocast(block_type):
    torch.manual_seed(0)
    block = block_type(8)
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(x)
    y.float().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.allclose(y.float(), block(x), atol=0.05)


@pytest.mark.parametrize(
    "scaled, plain, args", [(ScaledCUBSBlock1, CUBSBlock1, (8, 4)), (ScaledCUBSBlock2, CUBSBlock2, (8,))]
)
def test_scaled_blocks(scaled, plain, args):
    torch.manual_seed(0)
    block = _randomize(scaled(*args))
    x = torch.randn(2, 8, 6, 5)
    with torch.no_grad():
        block.gate_scale.zero_()
        assert torch.equal(block(x), x)  # identity at init
        block.gate_scale.fill_(1.0)
        reference = plain(*args)
        reference.load_state_dict({k: v for k, v in block.state_dict().items() if k != "gate_scale"})
        assert torch.allclose(block(x), 2 * reference(x), atol=1e-6)  # gate 1 + (2 sigmoid - 1)
    block.gate_scale.data.zero_()
    block(x).sum().backward()
    assert block.gate_scale.grad.abs() > 0  # the scale learns from the first step
    names = {n for n, _ in block.named_parameters()}
    assert names == {n for n, _ in plain(*args).named_parameters()} | {"gate_scale"}
