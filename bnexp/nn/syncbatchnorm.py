"""SyncBatchNorm1d / SyncBatchNorm2d: bnexp's BatchNorm with statistics over every process's batch.

In data-parallel training each process holds a shard of the global batch. Plain BN normalises each
shard with its own statistics (per-process, like ghost batches of the shard size); synchronised BN
normalises with the statistics of the whole global batch, so N processes compute what one process
computes on the concatenated batch (Ioffe & Szegedy's BN at the global batch size; PyTorch's
`torch.nn.SyncBatchNorm` does the same, on CUDA only, so this one runs the same math everywhere).

Forward (training): each process computes per-channel Welford partials of its shard with bnexp's
shifted two-pass recipe (count n_j, shift s_j = its first sample, mean delta_j of x - s_j and the sum
of squared deviations M2_j), one all-gather exchanges the (4, C) partials, and every process combines
them in rank order (Chan, Golub & LeVeque 1983), so all hold bit-identical statistics:
    m_j = (s_j - r) + delta_j,   mbar = sum n_j m_j / n,   M2 = sum M2_j + sum n_j (m_j - mbar)^2,
with r the shift of the first non-empty shard; mean = r + mbar, var = M2 / n (biased; it normalises).
No E[x^2] - E[x]^2: it cancels catastrophically for inputs such as 1e4 + 1e-2 * noise. The running
statistics get the global mean and the unbiased global variance var * n / (n - 1), as BN on the
global batch (or the biased one with biased_running_var).

Backward: the two per-channel sums of BN's closed-form gradient, sum dy and sum dy * x_hat, are
all-reduced, so each process's input gradient is the global batch's. weight and bias keep their
local sums: DDP averages parameter gradients over the processes, as it does for every other layer.
With each process's loss weighted so that the losses add up to the global one (bnexp's trainer does
that), DDP's average of the local gradients is the gradient of the global loss.

A process group of one process, no initialised process group, or eval mode: the forward is plain
BN's (`_BatchNorm._normalize`), bit for bit. The sync path runs eager torch ops (bnexp's compiled and
Triton kernels compute a local batch). The state dict is BN's, in PyTorch's names.

`convert_sync_batchnorm(module)` turns the bnexp BN layers of a model (bn, and noisy, which normalises
through BN's `_normalize`) into synchronised ones that keep their parameters, buffers and settings (in
place, as torch's converter: the model's children are replaced, the tensors are shared). It refuses
layers without batch statistics (GroupNorm, LayerNorm, InstanceNorm), ghost batches (per-process
virtual batches by definition), Batch Renormalization (its r/d unbiasing uses the local batch size:
not synchronised yet) and torch.nn.BatchNorm.
"""

import torch
import torch.distributed as dist
from torch import Tensor

from . import functional
from .batchnorm import BatchNorm1d, BatchNorm2d, _BatchNorm
from .batchrenorm import _BatchRenorm
from .ghostnorm import _GhostBatchNorm
from .kinds import SYNC_REFUSED
from .noisynorm import NoisyBatchNorm1d, NoisyBatchNorm2d


def world_size(group=None) -> int:
    """The processes `group` spans (None: the default group); 1 without an initialised process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _partials(xs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(count, shift, delta, M2) per channel of a shard (N, C, *spatial) in the statistics dtype, and d = xs - shift."""
    dims, nd, c = functional._reduced_dims(xs), xs.dim(), xs.shape[1]
    n = functional._values_per_channel(xs)
    if n == 0:  # an empty shard takes part in the collectives with zero weight
        zero = xs.new_zeros(c)
        return zero, zero, zero, zero, xs
    shift = xs[(0, slice(None)) + (0,) * (nd - 2)].clone()
    d = xs - functional._per_channel(shift, nd)
    delta = d.mean(dim=dims)
    centred = d - functional._per_channel(delta, nd)
    return torch.full((c,), float(n), dtype=xs.dtype, device=xs.device), shift, delta, (centred * centred).sum(dim=dims), d


def combine(parts: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Chan et al.'s combination of the (world, 4, C) partials (count, shift, delta, M2), in rank order:
    (n, reference shift r, mean - r, biased variance), each per channel."""
    counts, shifts, deltas, m2 = parts.unbind(1)
    first = int((counts[:, 0] > 0).nonzero()[0]) if bool((counts[:, 0] > 0).any()) else 0
    r = shifts[first]
    n = counts.sum(0)
    m = (shifts - r) + deltas
    mbar = (counts * m).sum(0) / n
    var = (m2.sum(0) + (counts * (m - mbar) ** 2).sum(0)) / n
    return n, r, mbar, var


class _SyncTrainBatchNorm(torch.autograd.Function):
    """Training-mode BN with global statistics (see the module docstring); also returns the global
    batch mean and the running-variance estimate (no gradient)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, biased_running_var, group):
        nd = x.dim()
        xs = x.to(functional._stats_dtype(x))
        count, shift, delta, m2, d = _partials(xs)
        gathered = [torch.empty((4, x.shape[1]), dtype=xs.dtype, device=xs.device) for _ in range(world_size(group))]
        dist.all_gather(gathered, torch.stack([count, shift, delta, m2]), group=group)
        n, r, mbar, var = combine(torch.stack(gathered))
        n = float(n[0]) if n.numel() else 0.0
        if n < 2:  # the same n on every process: all raise together
            raise ValueError(f"Expected more than 1 value per channel when training, got {n:g} over all processes")
        offset = (r - shift) + mbar  # global mean - this shard's shift
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
        y = (d - functional._per_channel(offset, nd)) * functional._per_channel(scale, nd)
        if bias is not None:
            y = y + functional._per_channel(bias.to(y.dtype), nd)
        running_estimate = var if biased_running_var else var * (n / (n - 1))
        ctx.save_for_backward(x, weight, shift, offset, invstd)
        ctx.n, ctx.group = n, group
        ctx.bias_dtype = None if bias is None else bias.dtype
        mean = r + mbar
        ctx.mark_non_differentiable(mean, running_estimate)
        ctx.set_materialize_grads(False)
        return y.to(x.dtype), mean, running_estimate

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        x, weight, shift, offset, invstd = ctx.saved_tensors
        nd, dims = x.dim(), functional._reduced_dims(x)
        g = (torch.zeros_like(x) if grad_y is None else grad_y).to(invstd.dtype)
        # (x - shift) - offset, as the forward: x - mean in one step would round the mean (ulp(1e4) ~ 1e-3)
        x_hat = (x.to(invstd.dtype) - functional._per_channel(shift, nd) - functional._per_channel(offset, nd)) \
            * functional._per_channel(invstd, nd)
        local = torch.stack([g.sum(dim=dims), (g * x_hat).sum(dim=dims)])  # grad_bias, grad_weight of this shard
        sums = local.clone()
        dist.all_reduce(sums, group=ctx.group)  # every process calls it, whatever it needs: collectives pair up
        scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
        grad_x = functional._per_channel(scale, nd) * (
            g - functional._per_channel(sums[0] / ctx.n, nd) - x_hat * functional._per_channel(sums[1] / ctx.n, nd))
        grad_x = grad_x.to(x.dtype) if ctx.needs_input_grad[0] else None
        return (grad_x, *functional._param_grads(ctx, weight, local[1], local[0]), None, None, None)


class _SyncBatchNorm(_BatchNorm):
    """The synchronised training forward, for every layer that normalises through `_normalize`."""

    process_group = None  # None: the default (world) group

    def extra_repr(self) -> str:
        return super().extra_repr() + ", sync=True"

    def _normalize(self, input: Tensor, weight: Tensor | None, bias: Tensor | None, return_stats: bool = False):
        if not self.training or world_size(self.process_group) == 1:
            return super()._normalize(input, weight, bias, return_stats)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            factor = self._count_batch()
        y, mean, var = _SyncTrainBatchNorm.apply(input, weight, bias, self.eps, self.biased_running_var,
                                                 self.process_group)
        if self.track_running_stats:
            with torch.no_grad():
                for running, batch in ((self.running_mean, mean), (self.running_var, var)):
                    if running is not None:
                        functional._update_running(running, batch, factor)
        return (y, mean, var) if return_stats else y


class SyncBatchNorm1d(_SyncBatchNorm, BatchNorm1d):
    """BatchNorm1d with statistics over all processes (see the module docstring)."""


class SyncBatchNorm2d(_SyncBatchNorm, BatchNorm2d):
    """BatchNorm2d with statistics over all processes (see the module docstring)."""


class SyncNoisyBatchNorm1d(_SyncBatchNorm, NoisyBatchNorm1d):
    """NoisyBatchNorm1d whose batch statistics span all processes (the noise stays per process)."""


class SyncNoisyBatchNorm2d(_SyncBatchNorm, NoisyBatchNorm2d):
    """NoisyBatchNorm2d whose batch statistics span all processes (the noise stays per process)."""


SYNC_CLASSES = {BatchNorm1d: SyncBatchNorm1d, BatchNorm2d: SyncBatchNorm2d,
                NoisyBatchNorm1d: SyncNoisyBatchNorm1d, NoisyBatchNorm2d: SyncNoisyBatchNorm2d}
_REFUSED = ((torch.nn.GroupNorm, "gn"), (torch.nn.LayerNorm, "ln"), (torch.nn.modules.instancenorm._InstanceNorm, "in"),
            (_GhostBatchNorm, "ghost"), (_BatchRenorm, "brn"), (torch.nn.modules.batchnorm._BatchNorm, "torch"))


def _synced(layer: _BatchNorm, process_group) -> _SyncBatchNorm:
    """A synchronised twin of `layer`: the same parameters, buffers, settings and hooks (shared tensors)."""
    twin = SYNC_CLASSES[type(layer)].__new__(SYNC_CLASSES[type(layer)])
    twin.__dict__ = dict(layer.__dict__)
    for attr in ("_parameters", "_buffers", "_modules"):
        twin.__dict__[attr] = dict(layer.__dict__[attr])
    twin.process_group = process_group
    return twin


def convert_sync_batchnorm(module: torch.nn.Module, process_group=None) -> torch.nn.Module:
    """`module` with every bnexp BN layer (bn, noisy) replaced by its synchronised twin (see the
    module docstring); other modules are kept. A norm layer without batch statistics, a ghost batch norm
    or torch's BatchNorm is a ValueError naming it."""
    if type(module) in SYNC_CLASSES:
        return _synced(module, process_group)
    if isinstance(module, _SyncBatchNorm):
        return module
    for cls, kind in _REFUSED:
        if isinstance(module, cls):
            raise ValueError(f"convert_sync_batchnorm: cannot synchronise {type(module).__name__}: {SYNC_REFUSED[kind]}")
    for name, child in module.named_children():
        converted = convert_sync_batchnorm(child, process_group)
        if converted is not child:
            module._modules[name] = converted
    return module
