"""Datasets read from their official on-disk layouts, generated stand-ins, downloads and samplers."""

from helpers.data.cache import CachedTinyImageNet
from helpers.data.cars196 import Cars196
from helpers.data.errors import DatasetError
from helpers.data.images import ToUint8Tensor, load_rgb
from helpers.data.loaders import LoaderBatches, TensorBatches, epoch_plan
from helpers.data.samplers import PKBatchSampler
from helpers.data.splits import stratified_split, subset_indices
from helpers.data.stl10 import STL10
from helpers.data.tinyimagenet import TinyImageNet
from helpers.data.transforms import AugmentRNG, BatchAugment

__all__ = [
    "AugmentRNG",
    "BatchAugment",
    "CachedTinyImageNet",
    "Cars196",
    "DatasetError",
    "LoaderBatches",
    "PKBatchSampler",
    "STL10",
    "TensorBatches",
    "TinyImageNet",
    "ToUint8Tensor",
    "epoch_plan",
    "load_rgb",
    "stratified_split",
    "subset_indices",
]
