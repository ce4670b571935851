"""ResNet-18 (stems, CUBS fashions, torchvision compatibility), the custom CNN and the embedding heads."""

import pytest
import torch
import torch.nn as nn
import torchvision

from helpers.models import (
    CUBSBlock1,
    CUBSBlock2,
    CustomCNN,
    EmbeddingHead,
    EmbeddingNet,
    ResNet,
    ScaledCUBSBlock1,
    ScaledCUBSBlock2,
    load_torchvision_resnet18,
    resnet18,
)
from helpers.models.resnet import BasicBlock

FASHIONS = ["parallel", "serial12", "serial21"]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def blocks(model: ResNet) -> list[BasicBlock]:
    return [m for m in model.modules() if isinstance(m, BasicBlock)]


def randomized_torchvision() -> nn.Module:
    """torchvision ResNet-18 with random BN statistics and affine parameters (defaults would hide bugs)."""
    torch.manual_seed(1)
    tv = torchvision.models.resnet18()
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return tv.eval()


@pytest.mark.parametrize("stem", ["imagenet", "small"])
@pytest.mark.parametrize("cubs", [None, *FASHIONS])
def test_resnet_shapes(stem, cubs):
    model = resnet18(7, stem=stem, cubs=cubs, cubs_width=32)
    x = torch.randn(2, 3, 16, 16)
    features = model.forward_features(x)
    assert features.shape == (2, 512) == (2, model.num_features)
    assert model.forward_head(features).shape == (2, 7)
    assert model(x).shape == (2, 7) and model.num_classes == 7


@pytest.mark.parametrize("num_classes", [200, 1000])
def test_param_count_and_names_match_torchvision(num_classes):
    ours, tv = resnet18(num_classes), torchvision.models.resnet18(num_classes=num_classes)
    assert n_params(ours) == n_params(tv)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in tv.state_dict().items()}


def test_init_like_torchvision():
    model = resnet18(10, cubs="parallel")
    conv = model.layer2[0].conv2  # kaiming normal, fan_out = 128 * 3 * 3
    assert abs(conv.weight.std().item() - (2 / (128 * 9)) ** 0.5) < 0.003
    assert torch.equal(model.layer2[0].bn2.weight, torch.ones(128))
    # CUBS keep PyTorch's default init (kaiming fan_out on a C->1 conv would have std sqrt(2)).
    assert model.layer1[0].cubs2.q.weight.abs().max() <= 1 / 64**0.5
    assert not resnet18(10, zero_init_residual=True).layer1[0].bn2.weight.any()


def test_blocks_and_stems():
    model = resnet18(10, stem="small", cubs="serial21")
    assert len(blocks(model)) == 8
    for block in blocks(model):
        assert type(block.cubs1) is CUBSBlock1 and type(block.cubs2) is CUBSBlock2
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    scaled = resnet18(10, cubs="parallel", cubs_variant="scaled", cubs_width=16)
    assert all(type(b.cubs1) is ScaledCUBSBlock1 and type(b.cubs2) is ScaledCUBSBlock2 for b in blocks(scaled))
    assert all(b.cubs1.q.out_features == 16 for b in blocks(scaled))
    plain = resnet18(10)
    assert not any(isinstance(m, (CUBSBlock1, CUBSBlock2)) for m in plain.modules())
    x = torch.randn(2, 3, 64, 64)
    # small stem keeps 64x64 in layer1, the imagenet stem reduces it to 16x16
    assert model.layer1(model.relu(model.bn1(model.conv1(x)))).shape[-1] == 64
    assert plain.layer1(plain.maxpool(plain.relu(plain.bn1(plain.conv1(x))))).shape[-1] == 16


def cubs_branch(block: BasicBlock, f: torch.Tensor, fashion: str) -> torch.Tensor:
    """The fashions of the spec, composed by hand from the block's CUBS submodules."""
    if fashion == "parallel":
        return block.cubs1(f) + block.cubs2(f)
    if fashion == "serial12":
        return block.cubs2(block.cubs1(f))
    return block.cubs1(block.cubs2(f))


@pytest.mark.parametrize("fashion", FASHIONS)
@pytest.mark.parametrize("variant", ["plain", "scaled"])
def test_fashion_formulas(fashion, variant):
    torch.manual_seed(0)
    model = resnet18(10, stem="small", cubs=fashion, cubs_variant=variant).eval()
    if variant == "scaled":
        for name, p in model.named_parameters():
            if name.endswith("gate_scale"):
                p.data.fill_(0.7)  # the identity init would hide the fashion
    with torch.no_grad():
        block, x = model.layer2[0], torch.randn(2, 64, 16, 16)  # projection shortcut
        f = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x)))))
        expected = torch.relu(block.downsample(x) + cubs_branch(block, f, fashion))
        assert torch.allclose(block(x), expected, atol=1e-6)
        block, x = model.layer1[1], torch.randn(2, 64, 8, 8)  # identity shortcut
        expected = torch.relu(x + cubs_branch(block, block.residual(x), fashion))
        assert torch.allclose(block(x), expected, atol=1e-6)


@pytest.mark.parametrize("fashion", ["serial12", "serial21"])
def test_scaled_variant_starts_as_plain_resnet(fashion):
    torch.manual_seed(0)
    plain = resnet18(10, stem="small").eval()
    scaled = resnet18(10, stem="small", cubs=fashion, cubs_variant="scaled").eval()
    load_torchvision_resnet18(scaled, plain.state_dict())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(scaled(x), plain(x), atol=1e-6)


def test_fashions_differ():
    torch.manual_seed(0)
    reference = resnet18(10, stem="small", cubs="parallel").eval()
    x = torch.randn(2, 3, 16, 16)
    outputs = []
    for fashion in FASHIONS:
        model = resnet18(10, stem="small", cubs=fashion).eval()
        model.load_state_dict(reference.state_dict())
        outputs.append(model(x))
    assert not torch.allclose(outputs[0], outputs[1]) and not torch.allclose(outputs[1], outputs[2])


@pytest.mark.parametrize(
    "model_fn",
    [
        lambda: resnet18(5, stem="small", cubs="serial12"),
        lambda: resnet18(5, cubs="parallel", cubs_variant="scaled"),
        lambda: CustomCNN(5, width=16),
    ],
)
def test_every_parameter_gets_a_finite_gradient(model_fn):
    torch.manual_seed(0)
    model = model_fn()
    model(torch.randn(2, 3, 16, 16)).logsumexp(dim=1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(stem="tiny"), "'imagenet', 'small'"),
        (dict(cubs="both"), "None, 'parallel', 'serial12', 'serial21'"),
        (dict(cubs="parallel", cubs_variant="fancy"), "'plain', 'scaled'"),
    ],
)
def test_unknown_options_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        resnet18(10, **kwargs)


def test_load_torchvision_weights_reproduces_torchvision(tmp_path):
    tv = randomized_torchvision()
    ours = resnet18(1000).eval()
    report = load_torchvision_resnet18(ours, tv.state_dict())
    assert report["skipped"] == [] and report["missing"] == []
    assert len(report["loaded"]) == len(tv.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ours(x), tv(x), atol=1e-5)
    path = tmp_path / "resnet18.pth"
    torch.save(tv.state_dict(), path)
    from_path = resnet18(1000).eval()
    load_torchvision_resnet18(from_path, path)
    with torch.no_grad():
        assert torch.allclose(from_path(x), tv(x), atol=1e-5)


def test_load_torchvision_weights_into_cubs_model():
    tv = randomized_torchvision()
    model = resnet18(98, cubs="serial21")
    cubs_before = {k: v.clone() for k, v in model.state_dict().items() if ".cubs" in k}
    fc_before = model.fc.weight.clone()
    report = load_torchvision_resnet18(model, tv.state_dict())
    assert report["skipped"] == ["fc.weight", "fc.bias"]
    assert set(report["missing"]) == set(cubs_before) | {"fc.weight", "fc.bias"}
    state = model.state_dict()
    for key, value in tv.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(state[key], value), key
    for key, value in cubs_before.items():
        assert torch.equal(state[key], value), key
    assert torch.equal(model.fc.weight, fc_before)


def test_load_torchvision_weights_errors():
    tv_state = torchvision.models.resnet18().state_dict()
    with pytest.raises(ValueError, match="conv1.weight.*stem="):
        load_torchvision_resnet18(resnet18(10, stem="small"), tv_state)
    incomplete = {k: v for k, v in tv_state.items() if not k.startswith("layer3.1.conv2")}
    with pytest.raises(ValueError, match="layer3.1.conv2.weight"):
        load_torchvision_resnet18(resnet18(10), incomplete)
    with pytest.raises(ValueError, match="layer1.2.conv1.weight"):
        load_torchvision_resnet18(resnet18(10), torchvision.models.resnet34().state_dict())
    # old checkpoints without num_batches_tracked load fine
    old = {k: v for k, v in tv_state.items() if not k.endswith("num_batches_tracked")}
    assert load_torchvision_resnet18(resnet18(10), old)["loaded"]


@pytest.mark.parametrize("model_fn", [lambda: resnet18(10, stem="small"), lambda: CustomCNN(10, width=16)])
def test_reset_classifier(model_fn):
    model = model_fn()
    x = torch.randn(2, 3, 16, 16)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.num_classes == 3
    model.reset_classifier(0)
    assert isinstance(model.fc, nn.Identity) and model.num_classes == 0
    assert model(x).shape == (2, model.num_features)


@pytest.mark.parametrize("size", [64, 32, 48])
def test_custom_cnn_shapes(size):
    model = CustomCNN(200, width=16)
    x = torch.randn(2, 3, size, size)
    assert model.forward_features(x).shape == (2, model.num_features) == (2, 128)
    assert model(x).shape == (2, 200)


def test_custom_cnn_budget():
    model = CustomCNN()
    assert model.num_features == 512
    assert 5e6 < n_params(model) < n_params(resnet18(200, stem="small"))
    assert not any(isinstance(m, BasicBlock) for m in model.modules())


def test_custom_cnn_overfits_a_tiny_batch():
    torch.manual_seed(0)
    x, y = torch.randn(32, 3, 32, 32), torch.arange(32) % 4
    model = CustomCNN(4, width=8, dropout=0.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x).argmax(dim=1) == y).float().mean()
    assert accuracy > 0.9


def test_embedding_head_and_net():
    torch.manual_seed(0)
    head = EmbeddingHead(16, dim=8)
    x = torch.randn(4, 16, dtype=torch.float64)
    z = head(x.float())
    assert z.shape == (4, 8)
    linear = x @ head.fc.weight.double().T + head.fc.bias.double()
    assert torch.allclose(z.double(), linear / linear.norm(dim=1, keepdim=True), atol=1e-6)
    net = EmbeddingNet(resnet18(98, stem="small"), dim=64)
    out = net(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 64) and torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-6)
    assert isinstance(net.backbone.fc, nn.Identity) and isinstance(net.head, EmbeddingHead)
