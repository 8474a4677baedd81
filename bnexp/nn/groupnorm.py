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
explicit groups that does not divide C is a ValueError; on (N, C) inputs a group needs two
features at least (default: the largest divisor not above min(32, C // 2), e.g. 120 -> 30).
GroupNorm(num_groups, C) itself, like torch's, requires num_groups to divide C.

The math is in-repo, as BN's: `group_forward` / `group_backward` below are pure functions of the
input viewed as (N, G, C/G, S) (S = the spatial size, 1 for (N, C) inputs), with BN's numerics
(the data shifted by one sample per group before the statistics, x - mean formed as d - mean(d);
the variance in two passes, mean((d - mean(d))^2), also when compiled: a group's values are
contiguous, and Inductor's single-pass var_mean measured ~4x slower than two passes on CPU)
and the closed-form backward of Wu & He's normalisation
    dL/dx = invstd * (h - mean(h) - x_hat * mean(h * x_hat)),  h = dL/dy * weight[c],
the means over each sample's group. Under the auto, compiled and triton backends they run
compiled by Inductor (one kernel each way, traced once per dtype, device, eps and affine at
generic sizes with symbolic shapes; there are no Triton kernels for them), called bare
(`bnexp.nn.inductor_call`: Inductor's generated `call`, without AOTAutograd's runtime wrapper).
They go through `dispatch.run` instead (the same functions, with its backend rules) under
eager, inside an outer torch.compile, on a device where compilation failed, for parameters on
another device than the input, and where the bare kernels cannot be built (one warning). A
channels_last input is copied to NCHW for the kernels and the output copied back to
channels_last (torch's GroupNorm keeps the layout too); empty inputs go to
`torch.nn.functional.group_norm`.

Speed (CPU): at LeNet5's shapes the compiled kernels alone are as fast as ATen's group norm or
faster (0.7-0.9x of ATen's forward+backward, one thread), so what decides the ratio is the fixed
cost per call around them, which torch's C++ path does not pay: the autograd Function and its
Python backward, the signature lookup, the kernels' own Python `call` (allocation, size asserts).
Each forward+backward is kept to a few cache lookups and views: the kernels take weight and bias
as (C,) and return (C,) gradients and the group mean themselves, the statistics leave the
Function only when asked for (return_stats), views take int sizes (a torch.Size argument costs
~2 us more), and the backward skips once_differentiable's no_grad block when grad mode is off
already (~3 us). What is left is ~14 us more than torch per forward+backward at (2, 4, 2, 2)
(one thread, best of many steps; it was ~45 us through `dispatch.run`). Measured ratios:
README, "Performance (measured)".
"""

import functools
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch, functional, inductor_call
from .kinds import resolve_groups

_GENERIC = (7, 5, 11, 13)  # generic tracing sizes of x (N, G, C/G, S); weight and bias are (G * C/G,)


def _per_group(t: Tensor) -> Tensor:
    """An (N, G) statistic shaped to broadcast against (N, G, C/G, S)."""
    return t[:, :, None, None]


def _per_channel(t: Tensor, x: Tensor) -> Tensor:
    """A (C,) parameter shaped to broadcast against x (N, G, C/G, S)."""
    return t.view(1, x.shape[1], x.shape[2], 1)


def group_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
    """Normalise x (N, G, C/G, S) per sample and group; weight and bias are (C,).

    Returns (y, shift, delta, invstd, mean, var), the statistics (N, G): the group mean is shift + delta (kept apart
    for the backward's precision; `mean` is their sum), var the biased variance (the numerics of
    `functional.train_forward`'s eager path).
    """
    xs = x.to(functional._stats_dtype(x))
    shift = xs[:, :, 0, 0].clone()  # clone: no output aliasing an input in a compiled kernel
    d = xs - _per_group(shift)
    delta = d.mean(dim=(2, 3))
    centred = d - _per_group(delta)
    var = (centred * centred).mean(dim=(2, 3))
    invstd = torch.rsqrt(var + eps)
    y = centred * _per_group(invstd)
    if weight is not None:
        y = y * _per_channel(weight.to(y.dtype), x)
    if bias is not None:
        y = y + _per_channel(bias.to(y.dtype), x)
    return y.to(x.dtype), shift, delta, invstd, shift + delta, var


def group_backward(grad_y: Tensor, x: Tensor, weight: Tensor | None, shift: Tensor, delta: Tensor, invstd: Tensor):
    """Closed-form gradient of `group_forward`: (grad_x in x's dtype, grad_weight, grad_bias (C,)).

    One reduction pass over g and x gives the per-(sample, channel) sums of g and g * (x - mean);
    everything else is on (N, G, C/G) statistics, then one elementwise pass writes grad_x (as ATen).
    """
    g = grad_y.to(invstd.dtype)
    centred = x.to(invstd.dtype) - _per_group(shift) - _per_group(delta)
    sum_g = g.sum(dim=3)  # (N, G, C/G)
    sum_g_centred = (g * centred).sum(dim=3)
    invstd3 = invstd[:, :, None]
    grad_weight = (sum_g_centred * invstd3).sum(dim=0).reshape(-1)
    grad_bias = sum_g.sum(dim=0).reshape(-1)
    values = x.shape[2] * x.shape[3]  # per sample and group
    w = None if weight is None else weight.to(g.dtype).view(1, x.shape[1], x.shape[2])
    mean_h = (sum_g if w is None else sum_g * w).sum(dim=2) / values  # mean of h = g * weight over the group
    mean_h_xhat = (sum_g_centred if w is None else sum_g_centred * w).sum(dim=2) * invstd / values
    h = g if weight is None else g * _per_channel(weight.to(g.dtype), x)
    grad_x = _per_group(invstd) * (h - _per_group(mean_h) - centred * _per_group(invstd * mean_h_xhat))
    return grad_x.to(x.dtype), grad_weight, grad_bias


_CHANNELS = (_GENERIC[1] * _GENERIC[2],)
group_forward.example_shapes = (_GENERIC, _CHANNELS, _CHANNELS)
group_backward.example_shapes = (_GENERIC, _GENERIC, _CHANNELS, _GENERIC[:2], _GENERIC[:2], _GENERIC[:2])


def _dense(t: Tensor | None) -> Tensor | None:
    return t if t is None or t.is_contiguous() else t.contiguous()


def _examples(fn, tensors: tuple) -> list:
    """Zero tensors like `tensors` at fn's generic tracing sizes (None stays None)."""
    return [None if t is None else torch.zeros(shape, dtype=t.dtype, device=t.device)
            for t, shape in zip(tensors, fn.example_shapes)]


class _Kernels:
    """The bare Inductor calls (`inductor_call`) of group_forward and group_backward for one signature;
    the backward is compiled on its first use. Arguments: dense tensors, None left out."""

    def __init__(self, tensors: tuple, eps: float):
        self.affine = tuple(t is not None for t in tensors[1:])
        self.forward = inductor_call.compile_inner(group_forward, _examples(group_forward, tensors), {"eps": eps})
        self._backward = None

    def backward(self, grad_y, x4, weight, shift, delta, invstd):
        if self._backward is None:
            tensors = (grad_y, x4, weight, shift, delta, invstd)
            self._backward = inductor_call.compile_inner(group_backward, _examples(group_backward, tensors), {})
        if weight is None:
            return self._backward([grad_y, x4, shift, delta, invstd])
        return self._backward([grad_y, x4, weight, shift, delta, invstd])


_kernels: dict[tuple, _Kernels | None] = {}  # signature -> kernels; None: this signature runs through dispatch.run
_MISSING = object()


def _fast_kernels(x4: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> _Kernels | None:
    """The bare compiled kernels for these arguments, or None where `dispatch.run` decides (the eager
    backend, an outer torch.compile tracing us, a device where compilation failed, mixed devices).

    Why not `dispatch.run` always: at LeNet5's sizes its per-call costs (signature building, AOTAutograd's
    runtime wrapper) were ~20 us per forward+backward, a tenth of ATen's whole group norm.
    """
    if dispatch.get_backend() == "eager" or torch.compiler.is_compiling():
        return None
    key = (x4.dtype, x4.device, eps, None if weight is None else (weight.dtype, weight.device),
           None if bias is None else (bias.dtype, bias.device))
    kernels = _kernels.get(key, _MISSING)
    if kernels is _MISSING:
        kernels = _kernels[key] = _build_kernels((x4, weight, bias), eps)
    return kernels


def _build_kernels(tensors: tuple, eps: float) -> _Kernels | None:
    device = tensors[0].device
    if device.type in dispatch._compile_broken or any(t is not None and t.device != device for t in tensors):
        return None
    try:
        return _Kernels(tensors, eps)
    except Exception as err:  # no C++ compiler, a torch without compile_to_python, ...
        warnings.warn(f"bnexp group norm: the bare Inductor kernels failed ({type(err).__name__}: "
                      f"{(str(err).strip().splitlines() or [''])[0]}); using bnexp.nn.dispatch's backends",
                      RuntimeWarning, stacklevel=4)
        return None


def _once_differentiable(backward):
    """torch's once_differentiable (double backward raises), minus its no_grad block where grad mode is off
    already, as in every backward without create_graph: that block costs ~3 us a call."""
    refusing = torch.autograd.function.once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        return refusing(ctx, *grads) if torch.is_grad_enabled() else backward(ctx, *grads)
    return wrapper


class _GroupNormFunction(torch.autograd.Function):
    """Returns y and, with return_stats, without gradient the group means and biased variances (N, G)."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps, return_stats):
        shape = x.shape
        x4 = x.reshape(shape[0], groups, shape[1] // groups, -1)  # a view where the layout allows
        channels_last = not x4.is_contiguous() and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        kernels = _fast_kernels(x4, weight, bias, eps)
        if kernels is None:
            y, shift, delta, invstd, mean, var = dispatch.run("group_forward", group_forward, (x4, weight, bias),
                                                                 {"eps": eps})
            # the input, not its view: a view saved here breaks an outer torch.compile (an alias in the graph)
            ctx.save_for_backward(x, weight, shift, delta, invstd)
        else:
            x4, weight, bias = _dense(x4), _dense(weight), _dense(bias)
            args = [x4, weight, bias] if kernels.affine == (True, True) else [t for t in (x4, weight, bias)
                                                                               if t is not None]
            y, shift, delta, invstd, mean, var = kernels.forward(args)
            ctx.save_for_backward(x4, weight, shift, delta, invstd)
        ctx.kernels, ctx.shape, ctx.grouped = kernels, shape, y.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        y = y.view_as(x)  # (a torch.Size argument to view or reshape costs ~2 us more than ints)
        if channels_last:
            y = y.contiguous(memory_format=torch.channels_last)
        if not return_stats:
            return y
        ctx.mark_non_differentiable(mean, var)
        ctx.set_materialize_grads(False)
        return y, mean, var

    @staticmethod
    @_once_differentiable
    def backward(ctx, grad_y, *_grad_stats):
        if grad_y is None:
            return (None,) * 6
        x4, weight, shift, delta, invstd = ctx.saved_tensors
        grad_y = grad_y.reshape(*ctx.grouped)
        if ctx.kernels is None:
            grad_x, grad_w, grad_b = dispatch.run("group_backward", group_backward,
                                                     (grad_y, x4.reshape(*ctx.grouped), weight, shift, delta, invstd), {})
        else:
            grad_x, grad_w, grad_b = ctx.kernels.backward(_dense(grad_y), x4, weight, shift, delta, invstd)
        needs = ctx.needs_input_grad
        grad_x = grad_x.view(*ctx.shape) if needs[0] else None
        grad_w = (grad_w if grad_w.dtype == weight.dtype else grad_w.to(weight.dtype)) if needs[1] else None
        grad_b = (grad_b if grad_b.dtype == ctx.bias_dtype else grad_b.to(ctx.bias_dtype)) if needs[2] else None
        return grad_x, grad_w, grad_b, None, None, None


def group_norm(x: Tensor, groups: int, weight: Tensor | None = None, bias: Tensor | None = None,
               eps: float = 1e-5, return_stats: bool = False):
    """Drop-in for `torch.nn.functional.group_norm` (in-repo math; see the module docstring).

    return_stats=True (non-empty x): (y, mean, biased variance), the statistics (N, groups) without gradient.
    """
    if x.numel() == 0:
        return F.group_norm(x, groups, weight, bias, eps)
    return _GroupNormFunction.apply(x, weight, bias, groups, eps, return_stats)


class GroupNorm(torch.nn.GroupNorm):
    """Group Normalization over (N, C, *) inputs; drop-in for torch.nn.GroupNorm (see the module docstring)."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 device=None, dtype=None):
        resolve_groups(num_channels, num_groups)  # our message for a non-divisor
        super().__init__(num_groups, num_channels, eps, affine, device, dtype)

    def forward(self, input: Tensor) -> Tensor:
        shape = input.shape
        if len(shape) < 2:
            raise ValueError(f"{type(self).__name__}: expected an (N, C, *) input, got {input.dim()}D input")
        if shape[1] != self.num_channels:
            raise ValueError(f"{type(self).__name__}: expected {self.num_channels} channels, got input of size "
                             f"{tuple(shape)}")
        if 0 in shape:
            return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)
        return _GroupNormFunction.apply(input, self.weight, self.bias, self.num_groups, self.eps, False)


class LayerNorm(GroupNorm):
    """Layer Normalization with per-channel weight and bias: GroupNorm(1, num_features) (Wu & He 2018)."""

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True, device=None, dtype=None):
        super().__init__(1, num_features, eps, affine, device, dtype)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}, affine={self.affine}"
