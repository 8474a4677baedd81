"""Batch-norm math: batch statistics, normalisation, closed-form backward, running-stat update.

References: Ioffe & Szegedy 2015, "Batch Normalization" (Algorithm 1 and the gradient in
section 3); Welford 1962 and Chan, Golub & LeVeque 1983 (stable variance). The semantics follow
PyTorch's `torch.nn.functional.batch_norm`, which is our parity target.

Inputs are (N, C, *spatial); statistics are per channel C over N and the spatial dims, computed
in float32 (float64 for float64 inputs), and the output has the input's dtype.

The training forward and backward are pure functions run by `bnexp.nn.dispatch` (Triton,
Inductor-compiled or eager, per the selected backend; its selection API is re-exported here).
Eval mode is two elementwise ops and always runs eagerly.
"""

import math

import torch
from torch import Tensor

from . import dispatch
from .dispatch import BACKEND_ENV, BACKENDS, get_backend, resolved_backend, set_backend, use_backend  # noqa: F401

# ----------------------------------------------------------------------------- pure math on (N, C, *spatial)

def _stats_dtype(x: Tensor) -> torch.dtype:
    # bf16/fp16 statistics in float32, as torch does; float64 stays float64.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_channel(t: Tensor, ndim: int) -> Tensor:
    """A per-channel vector (C,) shaped to broadcast against (N, C, *spatial) with `ndim` dims."""
    return t.view((1, -1) + (1,) * (ndim - 2))


def _reduced_dims(x: Tensor) -> tuple[int, ...]:
    """Every dim but the channel dim 1: N and the spatial dims."""
    return (0, *range(2, x.dim()))


def _values_per_channel(x: Tensor) -> int:
    return x.shape[0] * math.prod(x.shape[2:])


def train_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, biased_running_var: bool):
    """Normalise `x` (N, C, *spatial) with its batch statistics.

    Returns (y, shift, delta, invstd, batch mean, batch variance for the running estimate): the
    batch mean is shift + delta, kept apart for precision. The biased variance normalises; the
    running estimate gets the unbiased one (var * n / (n - 1)) as in PyTorch, unless
    `biased_running_var`.

    Numerics: the variance never comes from E[x^2] - E[x]^2, which cancels catastrophically for
    inputs such as 1e4 + 1e-2 * noise. The data are first shifted by one sample per channel
    (d = x - x[0, c, 0], exact when the two are close); x - mean is formed as d - mean(d), so the
    rounding of a large mean (ulp(1e4) ~ 1e-3 in float32) never reaches the output, which
    ATen's x * scale + offset cannot avoid. Compiled, mean and variance come from Inductor's
    single-pass Welford reduction (`torch.var_mean`); eagerly, from two passes, because ATen's
    CPU var_mean over dims (0, 2, ...) is not vectorised (~10x slower than two passes).
    """
    n, dims, nd = _values_per_channel(x), _reduced_dims(x), x.dim()
    xs = x.to(_stats_dtype(x))
    # clone: a compiled kernel whose output aliases its input would have to rebuild the view per call
    shift = xs[(0, slice(None)) + (0,) * (nd - 2)].clone()
    d = xs - _per_channel(shift, nd)
    if dispatch.is_tracing() or torch.compiler.is_compiling():
        var, delta = torch.var_mean(d, dim=dims, correction=0)
        centred = d - _per_channel(delta, nd)
    else:
        delta = d.mean(dim=dims)
        centred = d - _per_channel(delta, nd)
        var = (centred * centred).mean(dim=dims)
    invstd = torch.rsqrt(var + eps)
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    y = centred * _per_channel(scale, nd)
    if bias is not None:
        y = y + _per_channel(bias.to(y.dtype), nd)
    running_estimate = var if biased_running_var else var * (n / (n - 1))  # n > 1: verify_batch_size
    return y.to(x.dtype), shift, delta, invstd, shift + delta, running_estimate


def train_backward(grad_y: Tensor, x: Tensor, weight: Tensor | None, shift: Tensor, delta: Tensor, invstd: Tensor):
    """Closed-form gradient of training-mode batch norm (Ioffe & Szegedy 2015, section 3).

    With x_hat = (x - mean) * invstd and g = dL/dy:
      dL/dbias = sum g,  dL/dweight = sum g * x_hat,
      dL/dx = weight * invstd * (g - mean(g) - x_hat * mean(g * x_hat)).
    Returns (grad_x in x's dtype, grad_weight, grad_bias in the statistics dtype).
    """
    n, dims, nd = _values_per_channel(x), _reduced_dims(x), x.dim()
    g = grad_y.to(invstd.dtype)
    x_hat = (x.to(invstd.dtype) - _per_channel(shift, nd) - _per_channel(delta, nd)) * _per_channel(invstd, nd)
    grad_bias = g.sum(dim=dims)
    grad_weight = (g * x_hat).sum(dim=dims)
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    grad_x = _per_channel(scale, nd) * (g - _per_channel(grad_bias / n, nd) - x_hat * _per_channel(grad_weight / n, nd))
    return grad_x.to(x.dtype), grad_weight, grad_bias


def eval_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, invstd: Tensor) -> Tensor:
    """Normalise `x` (N, C, *spatial) with fixed statistics: (x - mean) * weight * invstd + bias.

    Two passes instead of ATen's one x * scale + offset, which loses the low digits of x when
    |mean| >> std (the two large terms cancel).
    """
    nd = x.dim()
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    centred = x.to(invstd.dtype) - _per_channel(mean, nd)
    if bias is None:
        return (centred * _per_channel(scale, nd)).to(x.dtype)
    return torch.addcmul(_per_channel(bias.to(scale.dtype), nd), centred, _per_channel(scale, nd)).to(x.dtype)


def eval_backward(grad_y: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor):
    """Gradient of eval-mode batch norm: the statistics are constants, so dL/dx = g * weight * invstd."""
    dims, nd = _reduced_dims(x), x.dim()
    g = grad_y.to(invstd.dtype)
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    grad_x = (g * _per_channel(scale, nd)).to(x.dtype)
    x_hat = (x.to(invstd.dtype) - _per_channel(mean, nd)) * _per_channel(invstd, nd)
    return grad_x, (g * x_hat).sum(dim=dims), g.sum(dim=dims)


# ----------------------------------------------------------------------------- autograd Functions

def _param_grads(ctx, weight, grad_weight, grad_bias):
    """Cast parameter gradients to the parameters' dtype; None where no gradient is wanted."""
    grad_weight = grad_weight.to(weight.dtype) if ctx.needs_input_grad[1] else None
    grad_bias = grad_bias.to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
    return grad_weight, grad_bias


class _TrainBatchNorm(torch.autograd.Function):
    """Training mode: normalise with batch statistics; closed-form backward (one kernel each way).

    Also returns the batch mean and the variance for the running estimate (no gradient); the
    caller updates the buffers, so this Function mutates nothing.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, biased_running_var):
        y, shift, delta, invstd, mean, var = dispatch.run(
            "train_forward", train_forward, (x, weight, bias), dict(eps=eps, biased_running_var=biased_running_var))
        ctx.save_for_backward(x, weight, shift, delta, invstd)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(mean, var)
        ctx.set_materialize_grads(False)  # no zero gradients for the statistics
        return y, mean, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        if grad_y is None:
            return (None,) * 5
        x, weight, shift, delta, invstd = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = dispatch.run("train_backward", train_backward,
                                              (grad_y, x, weight, shift, delta, invstd), {})
        grad_x = grad_x if ctx.needs_input_grad[0] else None
        return (grad_x, *_param_grads(ctx, weight, grad_weight, grad_bias), None, None)


class _EvalBatchNorm(torch.autograd.Function):
    """Eval mode: normalise with the given (running) statistics, which get no gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd):
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return eval_forward(x, weight, bias, mean, invstd)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x, weight, mean, invstd = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = eval_backward(grad_y, x, weight, mean, invstd)
        grad_x = grad_x if ctx.needs_input_grad[0] else None
        return (grad_x, *_param_grads(ctx, weight, grad_weight, grad_bias), None, None)


# ----------------------------------------------------------------------------- public functional API

def verify_batch_size(size: torch.Size) -> None:
    """Training needs more than one value per channel (the variance of one value is undefined)."""
    if size[0] * torch.Size(size[2:]).numel() == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


def _update_running(running: Tensor, batch: Tensor, momentum: float) -> None:
    """running = (1 - momentum) * running + momentum * batch, in place (lerp: one kernel)."""
    if running.dtype == batch.dtype:
        running.lerp_(batch, momentum)
    else:  # e.g. bf16 buffers: update in the statistics dtype, round once
        running.copy_(running.to(batch.dtype).lerp_(batch, momentum))


def batch_norm(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
               weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5, biased_running_var: bool = False,
               return_stats: bool = False) -> Tensor:
    """Drop-in for `torch.nn.functional.batch_norm` (same arguments, plus `biased_running_var`).

    training=True: normalise with the biased batch variance and update the running buffers that
    are given: running = (1 - momentum) * running + momentum * batch, outside autograd (PyTorch's
    momentum is the weight of the new batch: 0.1 here equals 0.9 in TF/Keras). running_var takes
    the unbiased batch variance, or the biased one with `biased_running_var` (the convention of
    the from-scratch layers of d2l.ai and moon-hotel/DeepLearningWithMe).
    training=False: normalise with the running buffers.
    return_stats=True (training with a non-empty input only): (y, batch mean, batch variance for the
    running estimate), the statistics without gradient (for Batch Renormalization).
    """
    if training and x.numel() == 0:  # as torch: an empty output, running statistics untouched
        per_channel = (1, -1) + (1,) * (x.dim() - 2)
        y = x.clone() if weight is None else x * weight.view(per_channel)
        return y if bias is None else y + bias.view(per_channel)
    if training:
        verify_batch_size(x.shape)
        y, mean, var = _TrainBatchNorm.apply(x, weight, bias, eps, biased_running_var)
        with torch.no_grad():  # buffers never hold a graph
            for running, batch in ((running_mean, mean), (running_var, var)):
                if running is not None:
                    _update_running(running, batch, momentum)
        return (y, mean, var) if return_stats else y
    if running_mean is None or running_var is None:
        raise ValueError("batch_norm: running_mean and running_var are required when training=False")
    with torch.no_grad():
        stats_dtype = _stats_dtype(x)
        mean = running_mean.to(stats_dtype)
        invstd = torch.rsqrt(running_var.to(stats_dtype) + eps)
    return _EvalBatchNorm.apply(x, weight, bias, mean, invstd)
