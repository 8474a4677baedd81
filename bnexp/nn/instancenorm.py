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

The math is ATen's fused `torch.nn.functional.instance_norm` (its closed-form backward): parity
with torch is exact and the speed is torch's.
"""

import torch


class InstanceNorm2d(torch.nn.InstanceNorm2d):
    """Instance Normalization over (N, C, H, W); torch.nn.InstanceNorm2d with affine=True by default."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = False, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
