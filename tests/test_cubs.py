"""CUBS blocks against explicit float64 references that build the full similarity matrix."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from helpers.models import CUBSBlock1, CUBSBlock2, ScaledCUBSBlock1, ScaledCUBSBlock2, cubs
from helpers.models.cubs import chunked_column_softmax_features, column_softmax_features, column_softmax_method


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


@pytest.mark.parametrize("method", ["auto", "chunked"])
@pytest.mark.parametrize("block_type", [CUBSBlock1, CUBSBlock2])
def test_blocks_under_bf16_autocast(block_type, method):
    torch.manual_seed(0)
    block = block_type(8)
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    block.column_softmax_method = method
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(x)
        f = column_softmax_features(*torch.randn(3, 2, 64).unbind(), method=method)
    assert f.dtype == torch.bfloat16  # both paths return the autocast dtype
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


# The chunked path (`chunked_column_softmax_features`, taken where no fused SDPA kernel applies) and
# the dispatch between the two paths.


def column_softmax_full_matrix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The explicit reference: the full (B, L, L) matrix S[b, i, j] = q_i k_j, softmax over i, sum."""
    a = torch.softmax(q[:, :, None] * k[:, None, :], dim=1)
    return torch.einsum("bi,bij->bj", v, a)


def _value_and_grads(fn, inputs, grad_output, **kwargs):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    f = fn(*inputs, **kwargs)
    return [f.detach(), *torch.autograd.grad(f, inputs, grad_output)]


@pytest.mark.parametrize("scale", [2.0, 30.0])
@pytest.mark.parametrize("side, batch", [(8, 3), (16, 3), (32, 2), (64, 2)])
def test_chunked_matches_float64_reference(side, batch, scale):
    length = side * side
    torch.manual_seed(side)
    q, k = (scale * torch.randn(batch, length, dtype=torch.float64) for _ in range(2))
    v = torch.randn(batch, length, dtype=torch.float64)
    grad_output = torch.randn(batch, length, dtype=torch.float64)
    if scale > 10:  # |S| far above 709: exp(S) without the log-sum-exp shift would overflow even in float64
        assert (q.abs().amax(dim=1) * k.abs().amax(dim=1)).min() > 2000
    expected = _value_and_grads(column_softmax_full_matrix, (q, k, v), grad_output)
    assert expected[0].std() > 0.2 and all(g.abs().max() > 0.01 for g in expected[1:])  # not a trivial case
    chunks = [1, 7, 64, length - 1, length, length + 5, None]  # None: the default, from the memory budget
    if length == 4096:  # the large map is about scale (|S| far above 709); the smaller ones cover every edge
        chunks = [64, length - 1, None]
    for chunk in chunks:
        actual = _value_and_grads(chunked_column_softmax_features, (q, k, v), grad_output, chunk_size=chunk)
        for name, a, e in zip(("f", "dq", "dk", "dv"), actual, expected):
            message = lambda m, n=name, c=chunk: f"{n}, chunk {c}: {m}"
            torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9, msg=message)


def test_chunked_gradcheck_and_once_differentiable():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 5, dtype=torch.float64, requires_grad=True) for _ in range(3))
    for chunk in (1, 2, 5):
        function = lambda *t, c=chunk: chunked_column_softmax_features(*t, chunk_size=c)
        assert torch.autograd.gradcheck(function, (q, k, v))
    (grad_q,) = torch.autograd.grad(chunked_column_softmax_features(q, k, v).square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad_q.sum().backward()  # double backward is not supported, and says so


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_chunked_low_precision_inputs_are_upcast(dtype):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 300).to(dtype) for _ in range(3))
    f = chunked_column_softmax_features(q, k, v, chunk_size=7)
    assert f.dtype == dtype
    expected = column_softmax_full_matrix(q.double(), k.double(), v.double())
    torch.testing.assert_close(f.double(), expected, rtol=0, atol=1e-2)  # one rounding to 8 / 11 bits


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float64, 1e-12)])
def test_sdpa_path_equals_chunked_path_on_cpu(dtype, tol):
    # Gradients reach about 25 here; in float32 each path is within 4e-5 of the float64 reference.
    torch.manual_seed(0)
    q, k = (3 * torch.randn(4, 1000, dtype=dtype) for _ in range(2))
    v = torch.randn(4, 1000, dtype=dtype)
    grad_output = torch.randn(4, 1000, dtype=dtype)
    sdpa = _value_and_grads(column_softmax_features, (q, k, v), grad_output, method="sdpa")
    chunked = _value_and_grads(column_softmax_features, (q, k, v), grad_output, method="chunked")
    auto = _value_and_grads(column_softmax_features, (q, k, v), grad_output)
    for name, s, c, a in zip(("f", "dq", "dk", "dv"), sdpa, chunked, auto):
        assert torch.equal(a, s), name  # "auto" is SDPA on CPU
        assert s.dtype == c.dtype == dtype
        torch.testing.assert_close(c, s, rtol=tol, atol=tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize(
    "block_type, args, shape",
    [
        (CUBSBlock1, (8, 6), (3, 8, 5, 7)),
        (CUBSBlock2, (4,), (3, 4, 9, 11)),
        (CUBSBlock2, (4,), (2, 4, 32, 32)),
        (ScaledCUBSBlock2, (4,), (2, 4, 8, 8)),
    ],
)
def test_blocks_chunked_equal_default_path(block_type, args, shape):
    torch.manual_seed(0)
    default = _randomize(block_type(*args), 0.5)
    if hasattr(default, "gate_scale"):
        default.gate_scale.data.fill_(0.7)
    chunked = copy.deepcopy(default)
    chunked.column_softmax_method = "chunked"
    assert default.column_softmax_method == "auto"
    x = torch.randn(shape)
    grad_output = torch.randn(shape)
    results = []
    for block in (default, chunked):
        x_in = x.clone().requires_grad_()
        y = block(x_in)
        y.backward(grad_output)
        results.append((y.detach(), x_in.grad, dict(block.named_parameters())))
    (y0, gx0, params0), (y1, gx1, params1) = results
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-5)
    for name, p in params1.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name == "q.bias" and isinstance(default, CUBSBlock2):
            # Block 2's q bias adds one constant to every q_i, which shifts column j of S by a constant
            # times k_j: the softmax over i ignores it, so its gradient is 0 up to rounding on both paths.
            assert max(p.grad.abs().max(), params0[name].grad.abs().max()) < 1e-3 * params0["q.weight"].grad.abs().max()
            continue
        assert p.grad.abs().max() > 1e-3, name  # every other parameter learns
        torch.testing.assert_close(p.grad, params0[name].grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_chunked_block2_never_materialises_hw_by_hw(monkeypatch):
    budget = 1 << 20  # a smaller budget than the default, so the chunking is visible at this size
    monkeypatch.setattr(cubs, "_CHUNK_ELEMENTS", budget)
    monkeypatch.setattr(F, "scaled_dot_product_attention", None)  # the chunked path must not use SDPA
    torch.manual_seed(0)
    block = CUBSBlock2(4)
    block.column_softmax_method = "chunked"
    x = torch.randn(8, 4, 64, 64, requires_grad=True)
    with _LargestTensor() as forward:
        y = block(x)
    with _LargestTensor() as backward:
        y.square().sum().backward()
    # Blocks of 32 rows: (8, 32, 4096) = 2^20 elements, a sixteenth of one image's 4096 x 4096 matrix.
    assert max(forward.largest, backward.largest) <= max(x.numel(), budget)
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize(
    "device_type, fused, expected",
    [
        ("cpu", False, "sdpa"),
        ("cpu", True, "sdpa"),
        ("cuda", True, "sdpa"),
        ("cuda", False, "chunked"),
        ("mps", False, "chunked"),
        ("mps", True, "chunked"),
        ("xpu", False, "chunked"),
    ],
)
def test_column_softmax_method(device_type, fused, expected):
    assert column_softmax_method(device_type, fused) == expected


def test_auto_takes_the_chunked_path_off_cpu_and_cuda(monkeypatch):
    calls = []
    chunked = cubs.chunked_column_softmax_features
    monkeypatch.setattr(cubs, "chunked_column_softmax_features", lambda *t: calls.append(t) or chunked(*t))
    monkeypatch.setattr(F, "scaled_dot_product_attention", None)
    q = torch.randn(2, 10, device="meta", requires_grad=True)  # a device without a checkable fused SDPA
    f = column_softmax_features(q, q, q)
    f.sum().backward()
    assert len(calls) == 1 and f.shape == (2, 10) and q.grad.shape == (2, 10)


def test_cuda_fused_check_fails_closed(monkeypatch):
    x = torch.zeros(2, 1, 16, 8)
    assert cubs._cuda_fused_sdpa_available(x, x, x) is False  # CPU tensors: no CUDA kernel

    def broken(*args):
        raise TypeError("SDPAParams() takes a different signature here")

    monkeypatch.setattr(torch.backends.cuda, "SDPAParams", broken)
    assert cubs._cuda_fused_sdpa_available(x, x, x) is False


def test_unknown_method_and_chunk_size():
    q = torch.randn(2, 6)
    with pytest.raises(ValueError, match="'auto', 'sdpa', 'chunked'"):
        column_softmax_features(q, q, q, method="flash")
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_column_softmax_features(q, q, q, chunk_size=0)
