"""The project's ResNet-18 (BasicBlock x [2, 2, 2, 2]) with optional CUBS blocks on every residual branch.

Module and parameter names mirror torchvision's resnet18, so its state_dict loads by name
(`load_torchvision_resnet18`); CUBS modules live under `cubs1` / `cubs2` inside each block.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torch.nn as nn

from .cubs import CUBS_VARIANTS, CUBSBlock1, CUBSBlock2, cubs_blocks
from .heads import linear_classifier

STEMS = ("imagenet", "small")
CUBS_FASHIONS = (None, "parallel", "serial12", "serial21")


def _check_choice(name: str, value: object, valid: tuple | dict) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(map(repr, valid))}")


class BasicBlock(nn.Module):
    """relu(shortcut(x) + G(F(x))) with F = conv3x3-BN-ReLU-conv3x3-BN: (B, C_in, H, W) -> (B, C, H/s, W/s).

    G depends on `cubs`: None: identity; "parallel": CUBS1(F) + CUBS2(F);
    "serial12": CUBS2(CUBS1(F)); "serial21": CUBS1(CUBS2(F)).
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        stride: int = 1,
        cubs: str | None = None,
        cubs_width: int | None = None,
        cubs_variant: str = "plain",
    ) -> None:
        super().__init__()
        _check_choice("cubs", cubs, CUBS_FASHIONS)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels)
            )
        self.cubs = cubs
        if cubs is not None:
            block1, block2 = cubs_blocks(cubs_variant)
            self.cubs1 = block1(channels, cubs_width)
            self.cubs2 = block2(channels)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """F(x): the residual branch before any CUBS block."""
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.residual(x)
        if self.cubs == "parallel":
            out = self.cubs1(out) + self.cubs2(out)
        elif self.cubs == "serial12":
            out = self.cubs2(self.cubs1(out))
        elif self.cubs == "serial21":
            out = self.cubs1(self.cubs2(out))
        return self.relu(out + shortcut)


class ResNet(nn.Module):
    """ResNet with BasicBlocks: (B, 3, H, W) -> (B, num_classes); forward_features gives (B, 8 * width).

    stem "imagenet": conv 7x7/2 + BN + ReLU + maxpool 3x3/2 (torchvision's); "small": conv 3x3/1 + BN + ReLU,
    no maxpool (for 64x64 inputs). `cubs`, `cubs_width`, `cubs_variant` configure every BasicBlock.
    `width`: the channels of the stem and first stage (64 as published, stages width x 1, 2, 4, 8);
    a narrower one (the smoke profile's 16) keeps the layout at 1/16 of the parameters.
    """

    def __init__(
        self,
        layers: tuple[int, ...] = (2, 2, 2, 2),
        num_classes: int = 1000,
        stem: str = "imagenet",
        cubs: str | None = None,
        cubs_width: int | None = None,
        cubs_variant: str = "plain",
        zero_init_residual: bool = False,
        width: int = 64,
    ) -> None:
        super().__init__()
        _check_choice("stem", stem, STEMS)
        if width < 1:
            raise ValueError(f"ResNet width {width} is not valid; give a positive channel count (64 as published)")
        _check_choice("cubs", cubs, CUBS_FASHIONS)
        _check_choice("cubs_variant", cubs_variant, CUBS_VARIANTS)
        self.stem, self.cubs, self.cubs_variant = stem, cubs, cubs_variant
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        block_kwargs = dict(cubs=cubs, cubs_width=cubs_width, cubs_variant=cubs_variant)
        in_channels = width
        for index, (channels, depth) in enumerate(zip((width, 2 * width, 4 * width, 8 * width), layers)):
            stride = 1 if index == 0 else 2
            blocks = []
            for b in range(depth):
                blocks.append(BasicBlock(in_channels, channels, stride if b == 0 else 1, **block_kwargs))
                in_channels = channels
            setattr(self, f"layer{index + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = in_channels
        self.num_classes = num_classes
        self.fc = linear_classifier(in_channels, num_classes)
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():  # as torchvision
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, BasicBlock):
                if zero_init_residual:
                    nn.init.zeros_(m.bn2.weight)
                if m.cubs is not None:
                    # Back to PyTorch's default init: kaiming fan_out on a C->1 conv has std sqrt(2),
                    # which would make q_i * k_j huge and saturate the softmax.
                    m.cubs1.reset_parameters()
                    m.cubs2.reset_parameters()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 8 * width) pooled features."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """(B, 8 * width) -> (B, num_classes) logits (or the features when num_classes is 0)."""
        return self.fc(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace fc by a fresh Linear(8 * width, num_classes); num_classes=0 gives nn.Identity."""
        self.num_classes = num_classes
        self.fc = linear_classifier(self.num_features, num_classes)


def resnet18(
    num_classes: int,
    stem: str = "imagenet",
    cubs: str | None = None,
    cubs_width: int | None = None,
    cubs_variant: str = "plain",
    zero_init_residual: bool = False,
    width: int = 64,
) -> ResNet:
    """ResNet-18, random init. See ResNet for the arguments."""
    return ResNet((2, 2, 2, 2), num_classes, stem, cubs, cubs_width, cubs_variant, zero_init_residual, width)


def load_torchvision_resnet18(
    model: ResNet, state_dict_or_path: Mapping[str, torch.Tensor] | str | os.PathLike
) -> dict[str, list[str]]:
    """Copy a torchvision ResNet-18 state_dict (or a .pth path) into `model` by name.

    fc.* is skipped when the model has no such key or a different shape; CUBS parameters keep
    their init. Returns {"loaded": keys copied, "skipped": source keys not copied,
    "missing": model keys left as they were}. Raises ValueError when a backbone key is missing,
    unexpected or has the wrong shape.
    """
    source = state_dict_or_path
    if isinstance(source, (str, os.PathLike)):
        source = torch.load(source, map_location="cpu", weights_only=True)
    target = model.state_dict()
    loaded, skipped = [], []
    for key, value in source.items():
        same_shape = key in target and target[key].shape == value.shape
        if key.startswith("fc.") and not same_shape:
            skipped.append(key)
        elif key not in target:
            raise ValueError(f"checkpoint key {key!r} is not in this model: not a ResNet-18 state_dict?")
        elif not same_shape:
            hint = " (torchvision weights need stem='imagenet' and width 64)" if key == "conv1.weight" else ""
            raise ValueError(
                f"shape mismatch for {key!r}: checkpoint {tuple(value.shape)} vs model {tuple(target[key].shape)}{hint}"
            )
        else:
            target[key] = value
            loaded.append(key)
    cubs_prefixes = tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, (CUBSBlock1, CUBSBlock2)))
    copied = set(loaded)
    missing = [key for key in target if key not in copied]
    # Old torchvision checkpoints predate BN's num_batches_tracked buffer: not worth failing for.
    absent = [
        key
        for key in missing
        if not key.startswith(("fc.", *cubs_prefixes)) and not key.endswith("num_batches_tracked")
    ]
    if absent:
        raise ValueError(f"checkpoint lacks backbone keys {absent[:5]}{' ...' if len(absent) > 5 else ''}")
    model.load_state_dict(target)
    return {"loaded": loaded, "skipped": skipped, "missing": missing}
