"""A pure tensor function compiled by Inductor and called without AOTAutograd's runtime wrapper.

`dispatch._compile` hands a traced graph to `torch._inductor.standalone_compile`, whose callable
wraps Inductor's generated `call` in AOTAutograd's runtime wrapper (argument flattening, aliasing and
mutation epilogues, grad-mode handling): ~4 us per call on CPU, i.e. half the cost of a small
kernel call. Here the graph is decomposed with Inductor's own decomposition table at trace time
(what AOTAutograd would have done), compiled by `compile_to_python`, Inductor's entry point for an
already lowered inference graph, and its generated module is loaded: what comes back is the bare
`call(args: list) -> tuple` of Inductor's output code. That code allocates its outputs, asserts
the sizes and strides of its inputs and launches the kernel, nothing else. Hence its contract:

- call it under `torch.no_grad()` (inside an autograd Function's forward and backward grad mode
  is off already) with a fresh list of dense contiguous tensors (it clears the list);
- an argument traced as None is left out of the list (`compile_inner` traces the others only).

Compilation goes through Inductor's on-disk FX graph cache, like standalone_compile: a second
process loads the kernels instead of compiling them.
"""

import torch


def compile_inner(fn, examples: list, consts: dict):
    """Trace fn(*examples, **consts) with symbolic sizes and compile it: the bare Inductor `call`.

    None entries of `examples` stay None in fn's arguments and are not arguments of `call`.
    """
    import torch._inductor  # imported on first use: seconds
    from torch._inductor.decomposition import select_decomp_table
    from torch._inductor.standalone_compile import compile_to_python, load_from_python
    from torch.fx.experimental.proxy_tensor import make_fx

    present = tuple(e is not None for e in examples)

    def traced(*tensors):
        given = iter(tensors)
        return fn(*(next(given) if p else None for p in present), **consts)

    tensors = [e for e in examples if e is not None]
    with torch.no_grad():
        graph = make_fx(traced, tracing_mode="symbolic", decomposition_table=select_decomp_table())(*tensors)
        return load_from_python(*compile_to_python(graph, tensors))
