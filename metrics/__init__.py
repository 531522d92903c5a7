"""CMMD and the CLIP image features it is computed on. Imports nothing else of this project."""

from metrics.clip import ClipEmbedder, ClipWeightsMissing
from metrics.cmmd import cmmd

__all__ = ["ClipEmbedder", "ClipWeightsMissing", "cmmd"]
