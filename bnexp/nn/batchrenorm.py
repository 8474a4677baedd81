"""BatchRenorm1d / BatchRenorm2d: Batch Renormalization (Ioffe 2017, "Batch Renormalization:
Towards Reducing Minibatch Dependence in Batch-Normalized Models", NIPS; arXiv:1702.03275).

Training (Algorithm 1 of the paper), per channel, with the batch mean mu_B and biased variance,
sigma_B = sqrt(var_B + eps) and the running sigma = sqrt(running_var + eps):
    r = clip(sigma_B / sigma, 1 / r_max, r_max),  d = clip((mu_B - running_mean) / sigma, -d_max, d_max)
    y = weight * ((x - mu_B) / sigma_B * r + d) + bias
r and d are constants in backward (stop_gradient in the paper); they are computed under no_grad
from the batch statistics of BN's kernel and the running statistics as they were before this
batch updated them. The layer runs BN's kernel with weight and no bias (y0 = weight * x_hat),
then one elementwise y0 * r + (bias + weight * d), so it costs BN plus one pass each way. While
r_max(t) = 1 and d_max(t) = 0 (warm-up, or r_max = 1 and d_max = 0) it is BN's forward itself,
bit for bit (outputs, gradients, running statistics); the r/d path with r = 1, d = 0 equals BN
to rounding. The running statistics
are updated as BN's (PyTorch momentum convention, unbiased running_var unless biased_running_var).
Eval mode normalises with the running statistics, as BN. Requires track_running_stats=True.

Warm-up schedule (the paper, section 4: BN for the first 5k steps, then r_max ramped 1 -> 3 over
40k steps and d_max 0 -> 5 over 25k steps). With t = num_batches_tracked before this step:
    r_max(t) = 1 + (r_max - 1) * clamp((t - warmup_steps) / r_max_steps, 0, 1)
    d_max(t) = d_max * clamp((t - warmup_steps) / d_max_steps, 0, 1)
(a ramp of 0 steps jumps to the final value after the warm-up). Defaults: r_max = 3, d_max = 5
(the paper's final values) and the paper's step counts divided by 10, warmup_steps = 500,
r_max_steps = 4000, d_max_steps = 2500, proportionate to the runs here (LeNet5/MNIST-sized runs
of a few thousand steps; the paper's Inception runs are ~10x longer). The step counter is
BN's num_batches_tracked buffer, so the schedule is in the state dict and resumes with it.

Known limitation: inside an outer torch.compile(model) (AOTAutograd, e.g. backend "aot_eager"),
the input and weight gradients are wrong once r/d are active and the running statistics update
(momentum > 0); eager training, and Dynamo alone (backend "eager"), are right
(tests/test_nn_norms.py::test_inside_torch_compile holds it as a strict xfail). bnexp does not
compile whole models; not resolved yet.
"""

import torch
from torch import Tensor

from .batchnorm import BatchNorm1d, BatchNorm2d, _BatchNorm
from .kinds import check_layer_kwargs


class _BatchRenorm(_BatchNorm):
    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, biased_running_var: bool = False,
                 r_max: float = 3.0, d_max: float = 5.0, warmup_steps: int = 500, r_max_steps: int = 4000,
                 d_max_steps: int = 2500):
        check_layer_kwargs("brn", r_max=r_max, d_max=d_max, warmup_steps=warmup_steps, r_max_steps=r_max_steps,
                           d_max_steps=d_max_steps)
        if not track_running_stats:
            raise ValueError("BatchRenorm needs running statistics (r and d compare the batch with them); "
                             "track_running_stats=False is not defined for it")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         biased_running_var=biased_running_var)
        self.r_max, self.d_max = float(r_max), float(d_max)
        self.warmup_steps, self.r_max_steps, self.d_max_steps = warmup_steps, r_max_steps, d_max_steps

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", r_max={self.r_max}, d_max={self.d_max}, warmup_steps={self.warmup_steps}"
                f", r_max_steps={self.r_max_steps}, d_max_steps={self.d_max_steps}")

    def limits(self, step: int) -> tuple[float, float]:
        """(r_max, d_max) in force at step `step` (the number of batches trained before)."""
        def ramp(steps):
            return 1.0 if steps == 0 else min(1.0, max(0.0, (step - self.warmup_steps) / steps))
        if step < self.warmup_steps:
            return 1.0, 0.0
        return 1.0 + (self.r_max - 1.0) * ramp(self.r_max_steps), self.d_max * ramp(self.d_max_steps)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if not self.training or input.numel() == 0:
            return self._normalize(input, self.weight, self.bias)
        r_max, d_max = self.limits(int(self.num_batches_tracked))
        if r_max == 1.0 and d_max == 0.0:  # r = 1, d = 0: plain BN (no statistics pass)
            return self._normalize(input, self.weight, self.bias)
        with torch.no_grad():  # the running statistics before this batch updates them
            running_mean, running_var = self.running_mean.clone(), self.running_var.clone()
        y, mean, var = self._normalize(input, self.weight, None, return_stats=True)
        mean, var = mean.detach(), var.detach()  # no gradient (also when an outer torch.compile traces this)
        with torch.no_grad():
            if not self.biased_running_var:  # back to the biased batch variance that normalised
                n = input.numel() // input.shape[1]
                var = var * ((n - 1) / n)
            sigma = torch.sqrt(running_var.to(var.dtype) + self.eps)
            r = (torch.sqrt(var + self.eps) / sigma).clamp_(1.0 / r_max, r_max)
            d = ((mean - running_mean.to(mean.dtype)) / sigma).clamp_(-d_max, d_max)
            view = (1, -1) + (1,) * (input.dim() - 2)
        # y = weight * x_hat (BN's kernel without the bias): weight * (x_hat * r + d) + bias = y * r + shift
        shift = d if self.weight is None else self.bias.to(d.dtype) + self.weight.to(d.dtype) * d
        return torch.addcmul(shift.view(view), y, r.view(view)).to(y.dtype)  # in the statistics dtype


class BatchRenorm1d(_BatchRenorm, BatchNorm1d):
    """Batch Renormalization over (N, C) or (N, C, L) inputs (see the module docstring)."""


class BatchRenorm2d(_BatchRenorm, BatchNorm2d):
    """Batch Renormalization over (N, C, H, W) inputs (see the module docstring)."""
