"""make_norm: the single switch from a config word to a normalisation layer (timm's create_norm idea)."""

import torch.nn as nn

from .batchnorm import BatchNorm1d, BatchNorm2d

NORM_KINDS = ("bn", "torch", "none")  # ours, torch.nn's reference, no normalisation


def make_norm(kind: str, num_features: int, dims: int, **kwargs) -> nn.Module:
    """Return the norm layer `kind` for `num_features` channels; dims=1 for (N,C[,L]), 2 for (N,C,H,W).

    kwargs go to the layer (eps, momentum, affine, track_running_stats, device, dtype; for "bn"
    also biased_running_var; "torch" rejects biased_running_var=True). "none" ignores them.
    """
    if dims not in (1, 2):
        raise ValueError(f"make_norm: dims must be 1 or 2, got {dims}")
    if kind == "none":
        return nn.Identity()
    if kind == "bn":
        return (BatchNorm1d if dims == 1 else BatchNorm2d)(num_features, **kwargs)
    if kind == "torch":
        if kwargs.pop("biased_running_var", False):  # False is torch's behaviour: accept it
            raise ValueError("make_norm: kind 'torch' (torch.nn.BatchNorm) has no biased_running_var option; "
                             "use kind 'bn' for it")
        return (nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(num_features, **kwargs)
    raise ValueError(f"unknown norm kind {kind!r}; choose one of {', '.join(NORM_KINDS)}")
