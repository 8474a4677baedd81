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
  - ghost_size >= N at forward time (an epoch's partial last batch, the probe batch): the batch is
    one virtual batch, i.e. BN on it. bnexp's config refuses a ghost_size above batch_size.
Running statistics: updated once per virtual batch, in order, as Hoffer et al.'s Algorithm 1
does, each with BN's rule running = (1 - momentum) * running + momentum * ghost-batch statistic;
num_batches_tracked counts virtual batches (so momentum=None averages over virtual batches).
Eval mode normalises with the running statistics, as BN. The gradient of each virtual batch is
BN's closed form over that virtual batch. Speed: the equal virtual batches run in one call of
BN's kernel, the batch regrouped so that each (virtual batch, channel) pair is one channel (a
copy each way), plus one call for an unequal last virtual batch.

Default ghost_size = 32: Hoffer et al. use 128 with large batches (4096); bnexp's runs train with
batches of 32-256, so 32 keeps several virtual batches per batch.
"""

import torch
from torch import Tensor

from . import functional
from .batchnorm import BatchNorm1d, BatchNorm2d, _BatchNorm
from .kinds import check_layer_kwargs


def ghost_sizes(batch: int, ghost_size: int) -> list[int]:
    """The sizes of the virtual batches of a batch of `batch` samples (see the module docstring)."""
    if ghost_size >= batch:  # a batch no larger than one virtual batch (an epoch's last, partial one) is one
        return [batch]
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
        equal = len(sizes) - (sizes[-1] != self.ghost_size)  # the leading virtual batches of ghost_size
        if equal < 2:
            outputs = [self._normalize(chunk, self.weight, self.bias) for chunk in input.split(sizes)]
        else:
            outputs = [self._equal_virtual_batches(input[:equal * self.ghost_size], equal)]
            if equal < len(sizes):
                outputs.append(self._normalize(input[equal * self.ghost_size:], self.weight, self.bias))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def _equal_virtual_batches(self, x: Tensor, k: int) -> Tensor:
        """BN of k equal virtual batches in one kernel call: (k * g, C, *s) is regrouped as (g, k * C, S),
        so that each (virtual batch, channel) is a channel of BN's kernel, and back (two copies each way)."""
        c, g = x.shape[1], x.shape[0] // k
        functional.verify_batch_size(torch.Size((g, *x.shape[1:])))
        xt = x.reshape(k, g, c, -1).transpose(0, 1).reshape(g, k * c, -1)
        weight, bias = (None if p is None else p.repeat(k) for p in (self.weight, self.bias))
        y, mean, var = functional.batch_norm(xt, None, None, weight, bias, True, 0.0, self.eps,
                                             biased_running_var=self.biased_running_var, return_stats=True)
        if self.track_running_stats:
            with torch.no_grad():  # once per virtual batch, in order
                if self.momentum is None:  # cumulative average: a factor 1 / count per virtual batch
                    for j in range(k):
                        factor = self._count_batch()
                        for running, batch in ((self.running_mean, mean), (self.running_var, var)):
                            functional._update_running(running, batch[j * c:(j + 1) * c], factor)
                else:  # the k updates in closed form: (1 - m)^k running + sum_j m (1 - m)^(k - 1 - j) batch_j
                    m = self.momentum
                    weights = m * (1 - m) ** torch.arange(k - 1, -1, -1, dtype=mean.dtype, device=mean.device)
                    self.num_batches_tracked.add_(k)
                    for running, batch in ((self.running_mean, mean), (self.running_var, var)):
                        update = (1 - m) ** k * running.to(batch.dtype) + weights @ batch.view(k, c)
                        running.copy_(update)
        y = y.reshape(g, k, c, -1).transpose(0, 1).reshape(x.shape)
        channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        return y.contiguous(memory_format=torch.channels_last) if channels_last else y


class GhostBatchNorm1d(_GhostBatchNorm, BatchNorm1d):
    """Ghost Batch Normalization over (N, C) or (N, C, L) inputs (see the module docstring)."""


class GhostBatchNorm2d(_GhostBatchNorm, BatchNorm2d):
    """Ghost Batch Normalization over (N, C, H, W) inputs (see the module docstring)."""
