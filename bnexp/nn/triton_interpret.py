"""Running bnexp's Triton kernels through Triton's interpreter in this process (the CPU test path).

triton.jit builds compiled kernels (JITFunction) unless
TRITON_INTERPRET=1 was set when the kernel was decorated; its InterpretedFunction wraps the same
Python function (`.fn`), rewrites its AST and runs every program of the grid in numpy (on host
copies of the tensors). What the environment variable would otherwise take care of:
- helpers from triton.language that are themselves @triton.jit functions (tl.sum, ...) are
  JITFunctions here, which refuse to be called from Python: for the launch, JITFunction.__call__
  runs them interpreted too;
- the interpreter patches triton.language (builtins -> numpy) and restores only part of it
  (calls of nested helpers never; Triton <= 3.5 nothing): every patched object is put back as
  it was, so kernels compiled later in the process are unaffected;
- Triton <= 3.5 converts a loop bound to int with int(array of shape (1,)), an error in NumPy
  >= 2.4: during the launch its tensor.__index__ uses .item().
Not thread-safe (it patches modules): the CPU path exists to test the kernels.
"""

import contextlib

import triton
import triton.language as tl

_nested_interpreted: dict = {}  # Python function of a JITFunction (tl.sum, ...) -> its InterpretedFunction
# (keyed by the function: hashing a JITFunction computes its cache key, which fails while patched)


def _patched_objects() -> list:
    """What the interpreter patches: triton.language, its core and math modules, tensor and dtype."""
    objects = [tl, tl.core, tl.math, tl.core.tensor, tl.core.dtype, getattr(tl.core, "tensor_descriptor_base", None)]
    return [obj for obj in objects if obj is not None]


def _restore(obj, before: dict) -> None:
    now = vars(obj)
    for name in [name for name in now if name not in before]:
        delattr(obj, name)
    for name, value in before.items():
        if now.get(name, _restore) is not value:
            setattr(obj, name, value)


@contextlib.contextmanager
def _interpreter_scope(interpreted_function_cls):
    from triton.runtime import interpreter
    from triton.runtime.jit import JITFunction

    def call_interpreted(self, *args, **kwargs):
        nested = _nested_interpreted.get(self.fn)
        if nested is None:
            nested = _nested_interpreted[self.fn] = interpreted_function_cls(self.fn)
        return nested(*args, **kwargs)

    patch_lang_tensor = getattr(interpreter, "_patch_lang_tensor", None)

    def patch_lang_tensor_index_item(tensor, *args):
        patch_lang_tensor(tensor, *args)
        tensor.__index__ = lambda self: int(self.handle.data.item())

    saved = [(obj, dict(vars(obj))) for obj in _patched_objects() + [JITFunction]]
    JITFunction.__call__ = call_interpreted
    if patch_lang_tensor is not None:
        interpreter._patch_lang_tensor = patch_lang_tensor_index_item
    try:
        yield
    finally:
        if patch_lang_tensor is not None:
            interpreter._patch_lang_tensor = patch_lang_tensor
        for obj, before in saved:
            _restore(obj, before)


class _InterpretedKernel:
    """`kernel[grid](*args, **kwargs)` run by Triton's interpreter (see above)."""

    def __init__(self, kernel, interpreted_function_cls):
        self.cls = interpreted_function_cls
        interpreted = isinstance(kernel, interpreted_function_cls)  # TRITON_INTERPRET=1 at import
        self.interpreted = kernel if interpreted else interpreted_function_cls(kernel.fn)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            with _interpreter_scope(self.cls):
                return self.interpreted[grid](*args, **kwargs)
        return launch


def interpreted(kernels) -> tuple:
    """Each of `kernels` (triton.jit functions) as a launcher run by Triton's interpreter."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError as err:
        raise RuntimeError(f"bnexp's Triton batch norm runs on CPU only through Triton's interpreter, and "
                           f"triton {triton.__version__} has no triton.runtime.interpreter.InterpretedFunction "
                           f"({err}); use the 'compiled' or 'eager' backend on CPU") from err
    return tuple(_InterpretedKernel(k, InterpretedFunction) for k in kernels)
