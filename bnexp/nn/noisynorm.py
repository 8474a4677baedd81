"""NoisyBatchNorm1d / NoisyBatchNorm2d: "noisy" BatchNorm (Santurkar, Tsipras, Ilyas & Madry 2018,
"How Does Batch Normalization Help Optimization?", NeurIPS; arXiv:1805.11604, section 2.1).

The paper injects, after each BatchNorm layer, "time-varying, non-zero mean and non-unit variance"
noise: each activation of each sample is perturbed with i.i.d. noise whose distribution changes at
every step, to show that BN's benefit survives a large distributional shift of the layer inputs.
Here, in training mode, the layer's BN output y gets, per activation (every element of y) and per
step,
    y_noisy = y * s + m,   s ~ U(1, 1 + noise),   m ~ U(-noise, noise),
freshly drawn at every forward; s and m are constants in backward (the gradient is BN's, scaled
by s). Default noise = 0.5 (scales in [1, 1.5], shifts in [-0.5, 0.5]): the paper's main text
gives the form of the noise, not a number, and 0.5 is a clearly visible shift of unit-variance
activations that a network still trains through. noise = 0 is BN exactly (no noise is drawn).
Eval mode adds no noise. Running statistics are BN's (the noise is added after normalising, so
it does not enter them).

Reproducibility: s and m come from torch's default generator of the input's device (uniform_
with no generator), which bnexp seeds per run and saves in its checkpoints, so a run and its
resume draw the same noise; under torch.manual_seed(k) two runs are identical.

Speed: the cost is the two random numbers per activation. On CPU the default generator
(mt19937) draws them sequentially, ~3-4 ns each, so a training step costs ~3.5-4.5x BN's (measured
with `bnexp bench bn --kinds noisy`); the normalisation itself is BN's kernel. Eval costs BN's.
"""

import torch
from torch import Tensor

from .batchnorm import BatchNorm1d, BatchNorm2d, _BatchNorm
from .kinds import check_layer_kwargs


class _NoisyBatchNorm(_BatchNorm):
    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, biased_running_var: bool = False,
                 noise: float = 0.5):
        check_layer_kwargs("noisy", noise=noise)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         biased_running_var=biased_running_var)
        self.noise = float(noise)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", noise={self.noise}"

    def forward(self, input: Tensor) -> Tensor:
        y = super().forward(input)
        if not self.training or self.noise == 0.0 or y.numel() == 0:
            return y
        with torch.no_grad():
            scale = torch.empty_like(y).uniform_(1.0, 1.0 + self.noise)
            shift = torch.empty_like(y).uniform_(-self.noise, self.noise)
        return torch.addcmul(shift, y, scale)


class NoisyBatchNorm1d(_NoisyBatchNorm, BatchNorm1d):
    """Noisy BatchNorm over (N, C) or (N, C, L) inputs (see the module docstring)."""


class NoisyBatchNorm2d(_NoisyBatchNorm, BatchNorm2d):
    """Noisy BatchNorm over (N, C, H, W) inputs (see the module docstring)."""
