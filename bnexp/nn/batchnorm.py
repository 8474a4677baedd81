"""BatchNorm1d / BatchNorm2d: drop-in replacements for torch.nn.BatchNorm1d / BatchNorm2d.

Same constructor, parameter and buffer names (`weight`, `bias`, `running_mean`, `running_var`,
`num_batches_tracked`), so state dicts load both ways with strict=True, and the same outputs,
gradients and running statistics in every mode. The math lives in `bnexp.nn.functional`;
torch's `_NormBase` only does the parameter/buffer bookkeeping (it has no forward).

Momentum convention (PyTorch's): `momentum` is the weight of the new batch,
    running = (1 - momentum) * running + momentum * batch,
so PyTorch momentum=0.1 equals TF/Keras momentum=0.9 (running = 0.9 * running + 0.1 * batch).
momentum=None gives the cumulative moving average (factor 1 / num_batches_tracked).
"""

from torch import Tensor
from torch.nn.modules.batchnorm import _NormBase

from . import functional


class _BatchNorm(_NormBase):
    """Shared forward of BatchNorm1d/2d; subclasses only check the input rank."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, biased_running_var: bool = False):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        # PyTorch updates running_var with the unbiased batch variance (n / (n - 1)); the
        # from-scratch layers of d2l.ai and moon-hotel/DeepLearningWithMe use the biased one.
        # True reproduces them exactly (it matters for small batches: n=2 doubles the variance).
        self.biased_running_var = biased_running_var

    def extra_repr(self) -> str:
        return super().extra_repr() + (", biased_running_var=True" if self.biased_running_var else "")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        return self._normalize(input, self.weight, self.bias)

    def _count_batch(self) -> float:
        """Count a training batch; the weight of its statistics in the running ones (momentum=None: 1 / count)."""
        self.num_batches_tracked.add_(1)
        return 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum

    def _normalize(self, input: Tensor, weight: Tensor | None, bias: Tensor | None, return_stats: bool = False):
        """The batch norm of `input` with this affine (the BN variants pass a modified one); counts the batch.
        return_stats (training only): also the batch mean and running-variance estimate (functional.batch_norm)."""
        # Same mode logic as torch.nn.modules.batchnorm._BatchNorm.forward.
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            functional.verify_batch_size(input.shape)  # raise before counting the batch
            factor = self._count_batch()
        # Buffers are updated only when tracking in train mode; eval without tracking uses batch stats.
        update = not self.training or self.track_running_stats
        return functional.batch_norm(input, self.running_mean if update else None, self.running_var if update else None,
                            weight, bias, use_batch_stats, factor, self.eps,
                            biased_running_var=self.biased_running_var, return_stats=return_stats)


class BatchNorm1d(_BatchNorm):
    """Batch norm over (N, C) or (N, C, L) inputs; statistics per channel C (Ioffe & Szegedy 2015).

    Drop-in for torch.nn.BatchNorm1d. momentum (PyTorch convention) is the weight of the new batch,
    running = (1 - momentum) * running + momentum * batch: 0.1 here is momentum=0.9 in TF/Keras.
    biased_running_var=True updates running_var with the biased batch variance (d2l, moon-hotel).
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 2 and input.dim() != 3:
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


class BatchNorm2d(_BatchNorm):
    """Batch norm over (N, C, H, W) inputs; statistics per channel C over N, H and W.

    Drop-in for torch.nn.BatchNorm2d. momentum (PyTorch convention) is the weight of the new batch,
    running = (1 - momentum) * running + momentum * batch: 0.1 here is momentum=0.9 in TF/Keras.
    biased_running_var=True updates running_var with the biased batch variance (d2l, moon-hotel).
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")

