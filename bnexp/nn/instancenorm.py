"""InstanceNorm2d (Ulyanov, Vedaldi & Lempitsky 2016, "Instance Normalization", arXiv:1607.08022).

Each sample's channel is normalised over its own H x W values (mean and biased variance), then
y = x_hat * weight[c] + bias[c]. Drop-in for torch.nn.InstanceNorm2d with one difference: affine
defaults to True (the normalisation family compares layers with a learned per-channel affine, as
`torch.nn.InstanceNorm2d(C, affine=True)`); parameters `weight`, `bias`, and the buffers
`running_mean`, `running_var`, `num_batches_tracked` only with track_running_stats=True (default
False, as torch: eval then normalises with the instance statistics too). State dicts are torch's.

Undefined for fully connected (N, C) inputs: there each sample has one value per channel, so
the instance variance is 0 and the output is the bias. make_norm("in", C, dims=1) is rejected
with a message naming the layer (use "ln" or "gn" there); the layer itself, as torch's, accepts
only 3-D (unbatched C, H, W) and 4-D inputs. Training needs more than one spatial value per
channel (torch's "Expected more than 1 spatial element when training").

The math is in-repo: instance normalisation is group normalisation with one channel per group,
so it runs `groupnorm.group_norm(x, C, ...)` (the closed-form, compiled kernels of GroupNorm).
With track_running_stats=True, training updates the running statistics as torch does (the mean
over the batch of the instance means, and of the unbiased instance variances,
running = (1 - momentum) * running + momentum * that; momentum=None counts as 0, as torch's), under
no_grad; eval then normalises with them (BN's eval kernel). Empty inputs go to torch's function.
Unlike torch's (which returns NCHW), the output keeps a channels_last input's layout.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from . import functional
from .groupnorm import group_norm


class InstanceNorm2d(torch.nn.InstanceNorm2d):
    """Instance Normalization over (N, C, H, W); torch.nn.InstanceNorm2d with affine=True by default."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = False, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)

    def _apply_instance_norm(self, input: Tensor) -> Tensor:  # torch's forward calls this after its checks
        if input.numel() == 0:
            return super()._apply_instance_norm(input)
        if not self.training and self.track_running_stats:
            return functional.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                                         False, 0.0, self.eps)
        F._verify_spatial_size(input.size())  # torch's "Expected more than 1 spatial element when training"
        y, mean, var = group_norm(input, input.shape[1], self.weight, self.bias, self.eps, return_stats=True)
        if self.track_running_stats:
            with torch.no_grad():
                values = input[0, 0].numel()
                momentum = 0.0 if self.momentum is None else self.momentum
                functional._update_running(self.running_mean, mean.mean(dim=0), momentum)
                functional._update_running(self.running_var, (var * (values / (values - 1))).mean(dim=0), momentum)
        return y
