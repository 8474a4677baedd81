"""bnexp.nn: the in-repo Batch Normalization layer family (depends on torch only)."""

from .batchnorm import BatchNorm1d, BatchNorm2d
from .norms import NORM_KINDS, make_norm

__all__ = ["BatchNorm1d", "BatchNorm2d", "NORM_KINDS", "make_norm"]
