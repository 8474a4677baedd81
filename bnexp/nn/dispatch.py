"""Which kernels run bnexp's normalisation math: backend selection and the compiled-kernel cache.

`bnexp.nn.functional` (and `groupnorm`) write the training forward and backward as pure
functions and call them through `run(name, fn, tensors, consts)`, which runs them by one of
these backends:

    BNEXP_BN_BACKEND=auto      CUDA: the Triton kernels, falling back to compiled (one warning) if
                               they fail; other devices: compiled, falling back to eager (one warning)
    BNEXP_BN_BACKEND=compiled  compiled by Inductor, errors propagate (to be sure you measure compiled code)
    BNEXP_BN_BACKEND=triton    the Triton kernels, errors propagate; on CPU they run in Triton's
                               interpreter (slow: for testing the kernels without a GPU)
    BNEXP_BN_BACKEND=eager     plain torch ops

Why: the same math in plain eager ops launches ~10 kernels each way and is 2-4x slower than
ATen's fused kernels on CPU; compiled by Inductor it is faster than ATen (one kernel each way).
On CUDA, hand-written Triton kernels (`triton_bn`: two kernels each way, tiled for bandwidth,
little Python per call) replace the Inductor-compiled ones.

float64 inputs never take the Triton kernels (they compute in float32): under triton and auto they
run compiled, falling back to eager. `set_backend()` / `use_backend()` select the backend from code
(a run's config key `norm.backend` does it through bnexp.execution); `resolved_backend()` says
what runs. Inside an outer `torch.compile(model)` the functions run eagerly and are traced by the
outer compiler, so nothing is compiled twice. The backend names live in `bnexp.nn.kinds`
(torch-free: a config is checked against them without importing torch).
"""

import contextlib
import functools
import importlib.util
import os
import warnings

import torch
from torch import Tensor

from .kinds import BACKEND_ENV, BACKENDS

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


def run(name: str, fn, tensors: tuple, consts: dict):
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


def is_tracing() -> bool:
    """Whether a function is being traced for compilation (functional.train_forward picks its route by it)."""
    return _tracing


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


