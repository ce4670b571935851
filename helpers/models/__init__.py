"""Models: the custom CNN, the project's ResNet-18, the CUBS blocks, heads and the layer-wise MLP."""

from .cubs import CUBSBlock1, CUBSBlock2, ScaledCUBSBlock1, ScaledCUBSBlock2
from .custom_cnn import CustomCNN
from .heads import EmbeddingHead, EmbeddingNet
from .mlp import MLP
from .resnet import ResNet, load_torchvision_resnet18, resnet18

__all__ = [
    "CUBSBlock1",
    "CUBSBlock2",
    "CustomCNN",
    "EmbeddingHead",
    "EmbeddingNet",
    "MLP",
    "ResNet",
    "ScaledCUBSBlock1",
    "ScaledCUBSBlock2",
    "load_torchvision_resnet18",
    "resnet18",
]
