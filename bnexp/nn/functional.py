"""Batch-norm math: batch statistics, normalisation, closed-form backward, running-stat update.

References: Ioffe & Szegedy 2015, "Batch Normalization" (Algorithm 1 and the gradient in
section 3); Welford 1962 and Chan, Golub & LeVeque 1983 (stable variance). The semantics follow
PyTorch's `torch.nn.functional.batch_norm`, which is our parity target.

Inputs are (N, C, *spatial); statistics are per channel C over N and the spatial dims, computed
in float32 (float64 for float64 inputs), and the output has the input's dtype.

Speed: the same math in plain eager ops launches ~10 kernels each way and is 2-4x slower than
ATen's fused kernels on CPU; compiled by Inductor it is faster than ATen (one kernel each way).
On CUDA, hand-written Triton kernels (`triton_bn`: two kernels each way, tiled for bandwidth,
little Python per call) replace the Inductor-compiled ones. So the training forward and backward
are pure functions, run by one of these backends:

    BNEXP_BN_BACKEND=auto      CUDA: the Triton kernels, falling back to compiled (one warning) if
                               they fail; other devices: compiled, falling back to eager (one warning)
    BNEXP_BN_BACKEND=compiled  compiled by Inductor, errors propagate (to be sure you measure compiled code)
    BNEXP_BN_BACKEND=triton    the Triton kernels, errors propagate; on CPU they run in Triton's
                               interpreter (slow: for testing the kernels without a GPU)
    BNEXP_BN_BACKEND=eager     plain torch ops

float64 inputs never take the Triton kernels (they compute in float32): under triton and auto they
run compiled, falling back to eager. `set_backend()` / `use_backend()` select the backend from code
(tests); `resolved_backend()` says what runs. Eval mode is two elementwise ops and always runs
eagerly. Inside an outer `torch.compile(model)` the eager functions are traced by the outer
compiler, so nothing is compiled twice.
"""

import contextlib
import functools
import importlib.util
import math
import os
import warnings

import torch
from torch import Tensor

BACKENDS = ("auto", "compiled", "eager", "triton")
BACKEND_ENV = "BNEXP_BN_BACKEND"

_backend: str | None = None  # None: read BACKEND_ENV on first use
_compile_broken: dict[str, str] = {}  # device type -> why compilation failed (auto mode)
_triton_broken: dict[str, str] = {}  # device type -> why the Triton kernels failed (auto mode)
_compiled: dict[tuple, object] = {}  # input signature -> compiled kernel, built on first use
_triton_bn = None  # the module bnexp.nn.triton_bn, imported on first use (it imports triton)
_interpreter_warned = False  # the triton backend on CPU tensors warns once per process
TRITON_KERNELS = ("train_forward", "train_backward")  # the functions `triton_bn` has; others run compiled


# ----------------------------------------------------------------------------- backend selection

def _check_backend(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown batch-norm backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def get_backend() -> str:
    """The selected backend: 'auto', 'compiled', 'eager' or 'triton' (default from $BNEXP_BN_BACKEND, else 'auto')."""
    global _backend
    if _backend is None:
        _backend = _check_backend(os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto", f"${BACKEND_ENV}")
    return _backend


def set_backend(name: str) -> None:
    """Select the backend for all bnexp batch-norm layers in this process."""
    global _backend
    _backend = _check_backend(name, "set_backend")


@contextlib.contextmanager
def use_backend(name: str):
    """Temporarily select a backend: `with use_backend("eager"): ...`."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def resolved_backend(device: str | torch.device = "cpu") -> str:
    """What runs on `device` (for float16/32 inputs): 'triton', 'compiled' or 'eager' (auto mode
    after a failure of the Triton kernels or of compilation)."""
    backend, device = get_backend(), torch.device(device).type
    if backend != "auto":
        return backend
    if device == "cuda" and device not in _triton_broken and importlib.util.find_spec("triton") is not None:
        return "triton"
    return "eager" if device in _compile_broken else "compiled"


def _run(name: str, fn, tensors: tuple, consts: dict):
    """fn(*tensors, **consts), or the same function of `triton_bn`, compiled or eager according to
    the backend (see the module docstring)."""
    backend = get_backend()
    if backend == "eager" or torch.compiler.is_compiling():
        return fn(*tensors, **consts)
    x = tensors[0]
    if backend == "compiled":
        return _compiled_call(name, fn, tensors, consts)
    if x.dtype != torch.float64 and name in TRITON_KERNELS:  # the Triton kernels compute in float32
        if backend == "triton":
            return _triton_call(name, tensors, consts)
        if x.device.type == "cuda" and "cuda" not in _triton_broken:
            try:
                return _triton_call(name, tensors, consts)
            except Exception as err:  # no Triton, a compiler error, ...
                result = _compiled_or_eager(name, fn, tensors, consts)  # if this fails too, the input is at fault
                _triton_broken["cuda"] = _reason(err)
                warnings.warn(f"bnexp batch norm: the Triton kernels failed on cuda ({_triton_broken['cuda']}); "
                              f"using the Inductor-compiled ones. Set {BACKEND_ENV}=compiled to silence this.",
                              RuntimeWarning, stacklevel=2)
                return result
    return _compiled_or_eager(name, fn, tensors, consts)


def _reason(err: Exception) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"


def _triton_call(name: str, tensors: tuple, consts: dict):
    global _triton_bn, _interpreter_warned
    if _triton_bn is None:
        from . import triton_bn as _triton_bn  # imports triton: on first use only
    if tensors[0].device.type == "cpu" and not _interpreter_warned:
        _interpreter_warned = True
        warnings.warn(f"bnexp batch norm: {BACKEND_ENV}=triton on CPU runs the kernels in Triton's interpreter, "
                      "which is for testing and thousands of times slower; use auto, compiled or eager on CPU",
                      RuntimeWarning, stacklevel=3)
    return getattr(_triton_bn, name)(*tensors, **consts)  # writes fresh tensors: nothing for autograd to record


def _compiled_or_eager(name: str, fn, tensors: tuple, consts: dict):
    """Compiled, or eager (one warning) on a device where compilation failed."""
    device = tensors[0].device.type
    if device in _compile_broken:
        return fn(*tensors, **consts)
    try:
        return _compiled_call(name, fn, tensors, consts)
    except Exception as err:  # no C++ compiler, no Triton, unsupported device, ...
        result = fn(*tensors, **consts)  # if eager fails too, the input is at fault: its error propagates
        _compile_broken[device] = _reason(err)
        warnings.warn(f"bnexp batch norm: compilation failed on {device} ({_compile_broken[device]}); "
                      f"using the slower eager implementation. Set {BACKEND_ENV}=eager to silence this.",
                      RuntimeWarning, stacklevel=3)
        return result


# ----------------------------------------------------------------------------- compiled kernels
# Why not torch.compile(fn)? It works, but each call pays ~100 us for Dynamo's guards and
# dynamic-shape wrappers, a third of ATen's whole forward+backward at LeNet sizes. Instead each
# pure function is traced once per input signature (dtypes, ranks, memory layouts, constants)
# with symbolic sizes (make_fx) and compiled by Inductor (standalone_compile, cached on disk):
# one kernel serves every batch size and layer width and costs ~15 us to call. The signature
# is our guard: a tensor whose strides are neither contiguous nor channels_last is made
# contiguous first, and Inductor itself asserts sizes and strides on every call.

_EXAMPLE_SIZES = (7, 5, 11, 13)  # for tracing: distinct and > 1, so no size is specialised or merged
_tracing = False  # True while tracing: train_forward then takes the single-pass (Welford) route


def _dense_strides(shape, order) -> tuple[int, ...]:
    strides, step = [0] * len(shape), 1
    for dim in order:  # innermost first
        strides[dim], step = step, step * shape[dim]
    return tuple(strides)


def _dense_layout(t: Tensor) -> str | None:
    """'contiguous' or 'channels_last' when t is dense in that order, else None.

    As torch's is_contiguous (and Inductor's size and stride asserts), the strides of size-1
    dims do not count: such a dim is only ever indexed at 0.
    """
    if t.is_contiguous():
        return "contiguous"
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return None


def _example(t: Tensor, layout: str, shape: tuple | None = None) -> Tensor:
    """A zero tensor like `t` with the generic tracing sizes (rank >= 2) or (C,) (rank 1), or `shape`."""
    if shape is None:
        shape = _EXAMPLE_SIZES[:t.dim()] if t.dim() > 1 else _EXAMPLE_SIZES[1:2]
    example = torch.zeros(shape, dtype=t.dtype, device=t.device)
    return example.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else example


def _compile(fn, tensors: tuple, layouts: tuple, consts: dict):
    """Trace `fn` at generic sizes with symbolic shapes and compile it with Inductor.

    A function whose arguments are not (N, C, *spatial) tensors and (C,) vectors names the
    generic example shape of each argument in its attribute `example_shapes` (None: the default).
    """
    global _tracing
    import torch._inductor  # imported on first use: seconds
    from torch.fx.experimental.proxy_tensor import make_fx

    shapes = getattr(fn, "example_shapes", (None,) * len(tensors))
    examples = [None if t is None else _example(t, layout, shape) for t, layout, shape in zip(tensors, layouts, shapes)]
    _tracing = True
    try:
        with torch.no_grad():
            graph = make_fx(functools.partial(fn, **consts), tracing_mode="symbolic")(*examples)
    finally:
        _tracing = False
    return torch._inductor.standalone_compile(graph, examples, dynamic_shapes="from_graph")


def _compiled_call(name: str, fn, tensors: tuple, consts: dict):
    # Called twice per layer and step, so one cheap pass over the tensors builds the signature.
    # Other layouts (slices, expanded gradients) get a dense copy.
    dense, key = [], [name, tuple(consts.items())]
    for t in tensors:
        if t is not None:
            layout = _dense_layout(t)
            if layout is None:
                t, layout = t.clone(memory_format=torch.contiguous_format), "contiguous"
            key.append((t.dtype, t.device, t.dim(), layout))
        else:
            key.append(None)
        dense.append(t)
    key = tuple(key)
    kernel = _compiled.get(key)
    if kernel is None:
        kernel = _compiled[key] = _compile(fn, dense, tuple(k and k[3] for k in key[2:]), consts)
    if torch.is_grad_enabled():  # the autograd Functions run it with grad mode off already
        with torch.no_grad():
            return kernel(*(None if t is None else t.detach() for t in dense))
    return kernel(*dense)


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
    if _tracing or torch.compiler.is_compiling():
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
        y, shift, delta, invstd, mean, var = _run(
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
        grad_x, grad_weight, grad_bias = _run("train_backward", train_backward,
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
