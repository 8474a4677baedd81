"""GhostBatchNorm1d / GhostBatchNorm2d: Ghost Batch Normalization (Hoffer, Hubara & Soudry 2017,
"Train longer, generalize better: closing the generalization gap in large batch training of neural
networks", NIPS; arXiv:1705.08741, Algorithm 1).

Training: the batch is split along N, in order, into virtual ("ghost") batches of `ghost_size`
samples; each is batch-normalised with its own statistics (BN's kernel, so ghost_size = batch is
BN exactly) and the outputs are concatenated. Odd cases:
  - N not divisible by ghost_size: the last virtual batch is smaller (N mod ghost_size samples);
    if it would hold a single sample it is merged into the previous one (ghost_size + 1 samples),
    so no virtual batch normalises one sample by its own statistics. E.g. N = 10, ghost_size = 4
    -> 4, 4, 2; N = 9 -> 4, 5.
  - ghost_size > N at forward time: ValueError (the batch cannot hold one virtual batch).
Running statistics: updated once per virtual batch, in order, as Hoffer et al.'s Algorithm 1
does, each with BN's rule running = (1 - momentum) * running + momentum * ghost-batch statistic;
num_batches_tracked counts virtual batches (so momentum=None averages over virtual batches).
Eval mode normalises with the running statistics, as BN. The gradient of each virtual batch is
BN's closed form over that virtual batch.

Default ghost_size = 32: Hoffer et al. use 128 with large batches (4096); bnexp's runs train with
batches of 32-256, so 32 keeps several virtual batches per batch.
"""

import torch
from torch import Tensor

from .batchnorm import BatchNorm1d, BatchNorm2d, _BatchNorm
from .kinds import check_layer_kwargs


def ghost_sizes(batch: int, ghost_size: int) -> list[int]:
    """The sizes of the virtual batches of a batch of `batch` samples (see the module docstring)."""
    if ghost_size > batch:
        raise ValueError(f"GhostBatchNorm: ghost_size={ghost_size} is larger than the batch of {batch} samples; "
                         f"use a ghost_size of at most the smallest batch (or kind 'bn')")
    sizes = [ghost_size] * (batch // ghost_size) + ([batch % ghost_size] if batch % ghost_size else [])
    if len(sizes) > 1 and batch % ghost_size == 1:
        last = sizes.pop()
        sizes[-1] += last
    return sizes


class _GhostBatchNorm(_BatchNorm):
    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, biased_running_var: bool = False,
                 ghost_size: int = 32):
        check_layer_kwargs("ghost", ghost_size=ghost_size)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         biased_running_var=biased_running_var)
        self.ghost_size = ghost_size

    def extra_repr(self) -> str:
        return super().extra_repr() + f", ghost_size={self.ghost_size}"

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        use_batch_stats = self.training or not self.track_running_stats
        if not use_batch_stats or input.numel() == 0:
            return self._normalize(input, self.weight, self.bias)
        sizes = ghost_sizes(input.shape[0], self.ghost_size)
        if len(sizes) == 1:
            return self._normalize(input, self.weight, self.bias)
        return torch.cat([self._normalize(chunk, self.weight, self.bias) for chunk in input.split(sizes)])


class GhostBatchNorm1d(_GhostBatchNorm, BatchNorm1d):
    """Ghost Batch Normalization over (N, C) or (N, C, L) inputs (see the module docstring)."""


class GhostBatchNorm2d(_GhostBatchNorm, BatchNorm2d):
    """Ghost Batch Normalization over (N, C, H, W) inputs (see the module docstring)."""
