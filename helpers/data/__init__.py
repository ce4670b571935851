"""Datasets read from their official on-disk layouts, generated stand-ins, downloads and samplers."""

from helpers.data.errors import DatasetError

__all__ = ["DatasetError"]
