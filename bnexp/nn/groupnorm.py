"""GroupNorm and LayerNorm (Wu & He 2018, "Group Normalization", ECCV; arXiv:1803.08494).

GroupNorm(num_groups, num_channels): drop-in for torch.nn.GroupNorm (same constructor, parameters
`weight` and `bias` of shape (C,), so state dicts load both ways with strict=True). The channels
are split into G groups of C/G consecutive channels; each sample's group is normalised with its own
mean and biased variance over (C/G, *spatial), then y = x_hat * weight[c] + bias[c] per channel.
Statistics never mix samples, so there are no running statistics and train and eval are the same.

LayerNorm(num_features): Layer Normalization as Wu & He define it in their comparison (their
Figure 2): GroupNorm with one group, i.e. statistics per sample over (C, H, W) for 4-D inputs and
over the C features for (N, C) inputs, with a per-channel weight and bias (shape (C,), not torch's
per-element `nn.LayerNorm((C, H, W))` affine). Its state dict is that of torch.nn.GroupNorm(1, C).

Fully connected (N, C) inputs: both normalise over the features (GN over the C/G features of each
group, LN over all C). The number of groups of `make_norm("gn", ...)` follows
`bnexp.nn.kinds.resolve_groups`: groups=None (default) takes the largest divisor of C not above 32
(Wu & He's default G = 32; LeNet5's 6 channels -> 6 groups, i.e. instance-like, 16 -> 16), while an
explicit groups that does not divide C is a ValueError. GroupNorm(num_groups, C) itself, like torch's,
requires num_groups to divide C.

The math is ATen's fused `torch.nn.functional.group_norm` (one kernel each way, its closed-form
backward): parity with torch is exact and its speed is torch's. An in-repo compiled GN kernel would
need the compiled-kernel machinery of `functional` to trace at sizes where G divides C; not done.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from .kinds import resolve_groups


class GroupNorm(torch.nn.GroupNorm):
    """Group Normalization over (N, C, *) inputs; drop-in for torch.nn.GroupNorm (see the module docstring)."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 device=None, dtype=None):
        resolve_groups(num_channels, num_groups)  # our message for a non-divisor
        super().__init__(num_groups, num_channels, eps, affine, device, dtype)

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() < 2:
            raise ValueError(f"{type(self).__name__}: expected an (N, C, *) input, got {input.dim()}D input")
        if input.shape[1] != self.num_channels:
            raise ValueError(f"{type(self).__name__}: expected {self.num_channels} channels, got input of size "
                             f"{tuple(input.shape)}")
        return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)


class LayerNorm(GroupNorm):
    """Layer Normalization with per-channel weight and bias: GroupNorm(1, num_features) (Wu & He 2018)."""

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True, device=None, dtype=None):
        super().__init__(1, num_features, eps, affine, device, dtype)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}, affine={self.affine}"
