"""make_norm: the single switch from a config word to a normalisation layer (timm's create_norm idea).

The kinds, the keywords each accepts and the rules for odd cases are in `bnexp.nn.kinds` (importable
without torch); `check_norm` there raises the same ValueError as make_norm, before any model is built.
"""

import torch.nn as nn

from .batchnorm import BatchNorm1d, BatchNorm2d
from .batchrenorm import BatchRenorm1d, BatchRenorm2d
from .ghostnorm import GhostBatchNorm1d, GhostBatchNorm2d
from .groupnorm import GroupNorm, LayerNorm
from .instancenorm import InstanceNorm2d
from .kinds import NORM_KINDS, check_norm, resolve_groups
from .noisynorm import NoisyBatchNorm1d, NoisyBatchNorm2d

__all__ = ["NORM_KINDS", "check_norm", "make_norm"]

_BY_DIMS = {"bn": (BatchNorm1d, BatchNorm2d), "torch": (nn.BatchNorm1d, nn.BatchNorm2d),
            "brn": (BatchRenorm1d, BatchRenorm2d), "ghost": (GhostBatchNorm1d, GhostBatchNorm2d),
            "noisy": (NoisyBatchNorm1d, NoisyBatchNorm2d)}


def make_norm(kind: str, num_features: int, dims: int, **kwargs) -> nn.Module:
    """Return the norm layer `kind` for `num_features` channels; dims=1 for (N,C[,L]), 2 for (N,C,H,W).

    kwargs go to the layer: eps, affine, device, dtype for every kind; momentum, track_running_stats,
    biased_running_var for the batch-statistics kinds (bn, brn, ghost, noisy; "torch" rejects
    biased_running_var=True); groups for gn (None: the largest divisor of C not above 32, C // 2 for dims=1);
    r_max, d_max, warmup_steps, r_max_steps, d_max_steps for brn; ghost_size for ghost; noise for
    noisy; momentum, track_running_stats for in. "none" ignores them. A keyword the kind does not
    take is a TypeError; an undefined combination (e.g. "in" with dims=1) a ValueError naming the layer.
    """
    check_norm(kind, num_features, dims, **kwargs)
    if kind == "none":
        return nn.Identity()
    if kind == "torch":
        kwargs.pop("biased_running_var", None)  # False is torch's behaviour (True is refused by check_norm)
    if kind in _BY_DIMS:
        return _BY_DIMS[kind][dims - 1](num_features, **kwargs)
    if kind == "gn":
        return GroupNorm(resolve_groups(num_features, kwargs.pop("groups", None), dims), num_features, **kwargs)
    if kind == "ln":
        return LayerNorm(num_features, **kwargs)
    return InstanceNorm2d(num_features, **kwargs)  # "in" (dims=2: check_norm refused dims=1)
