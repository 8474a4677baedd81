"""The Triton batch-norm kernels (bnexp.nn.triton_bn) on CPU, through Triton's interpreter.

The same kernels run compiled on CUDA (tests/test_gpu.py). Shapes stay small: the interpreter runs
each program of the grid in numpy, ~10 ms per tile.
"""

import collections
import types
import warnings

import pytest
import torch

import bnexp.nn
from bnexp.nn import dispatch
from bnexp.nn import functional as bnF

pytest.importorskip("triton")
from bnexp.nn import triton_bn  # noqa: E402

from test_nn_parity import MODES, check_biased_running_var, check_parity  # noqa: E402


@pytest.fixture
def triton_calls(monkeypatch):
    """The triton backend, with a count of the calls that reached the kernels (no silent fallback)."""
    try:
        triton_bn._interpreted_kernels()
    except RuntimeError as err:
        pytest.skip(str(err))
    monkeypatch.setattr(dispatch, "_interpreter_warned", True)  # the interpreter is the point here: no warning
    calls = collections.Counter()
    for name in ("train_forward", "train_backward"):
        def spy(*args, _name=name, _fn=getattr(triton_bn, name), **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)
        monkeypatch.setattr(triton_bn, name, spy)
    with bnF.use_backend("triton"):
        yield calls


# ----------------------------------------------------------------------------- parity with torch.nn through the layers

STEPS = 3  # training steps (batch sizes n, n + 1, n // 2), then two eval steps
CASES = {
    "nchw": dict(shape=(6, 3, 5, 7), dims=2),  # B = 35: partial tiles along b and along the rows
    "channels_last": dict(shape=(6, 3, 5, 7), dims=2, layout="channels_last"),  # B = 1, 3 of 4 columns used
    "2d": dict(shape=(16, 5), dims=1),
    "3d": dict(shape=(6, 4, 7), dims=1),
    "affine_false": dict(shape=(6, 3, 5, 7), dims=2, affine=False),
    "several_splits": dict(shape=(5, 3, 9, 11), dims=2),  # 3 row blocks of 2 rows split 3 ways, 99 of 128 columns
    "channel_blocks": dict(shape=(40, 70), dims=1),  # B = 1: 3 blocks of 32 channels, 5 row blocks
    "bfloat16": dict(shape=(6, 3, 5, 7), dims=2, dtype=torch.bfloat16),
    "noncontiguous": dict(shape=(6, 3, 5, 7), dims=2, layout="noncontiguous"),  # runs on a contiguous copy
    "no_tracking": MODES["no_tracking"],  # batch statistics in eval too
}


@pytest.mark.parametrize("case", CASES)
def test_parity_with_torch(case, triton_calls):
    """Outputs, input/weight/bias gradients and running statistics equal torch.nn.BatchNorm1d/2d."""
    check_parity(**CASES[case], steps=STEPS)
    assert triton_calls["train_forward"] >= STEPS and triton_calls["train_backward"] >= STEPS
    assert bnF.resolved_backend("cpu") == "triton"


def test_tilings_of_the_parity_cases():
    """The cases above reach what they are named for (the interpreter's small tiles)."""
    def tiling(shape, layout="contiguous"):
        x = torch.empty(shape)
        x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
        return triton_bn._plan(x).tiling

    assert tiling((5, 3, 9, 11)).splits == 3 and not tiling((5, 3, 9, 11)).channel_cols
    assert tiling((6, 3, 5, 7), "channels_last").channel_cols
    assert tiling((40, 70)).channel_blocks == 3 and tiling((40, 70)).splits > 1


def _layer_outputs(layer, x, g):
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(g)
    grads = [x.grad] + ([layer.weight.grad, layer.bias.grad] if layer.affine else [])
    return [y.detach(), *grads, layer.running_mean.clone(), layer.running_var.clone()]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("affine", [True, False])
def test_matches_eager_backend(layout, affine, triton_calls):
    """Same results as our eager backend (the reference implementation of the same math)."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(7, 4, 3, 5, generator=gen) * 2 + 3
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    g = torch.randn(x.shape, generator=gen)
    torch.manual_seed(0)
    layers = [bnexp.nn.BatchNorm2d(4, affine=affine) for _ in range(2)]
    got = _layer_outputs(layers[0], x, g)
    with bnF.use_backend("eager"):
        expected = _layer_outputs(layers[1], x, g)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert triton_calls["train_forward"] == 1 and triton_calls["train_backward"] == 1


def test_biased_running_var(triton_calls):
    check_biased_running_var()
    assert triton_calls["train_forward"] == 4  # three biased steps, one unbiased


def test_large_offset_no_cancellation(triton_calls):
    """x = 1e4 + 1e-2 * noise in float32: the shifted data and Chan's merge keep the variance's digits."""
    gen = torch.Generator().manual_seed(4)
    x = (1e4 + 1e-2 * torch.randn(32, 3, 6, 6, generator=gen)).float()
    layer = bnexp.nn.BatchNorm2d(3, momentum=1.0)  # momentum 1: running stats = this batch's
    y = layer(x)
    x64 = x.double()
    mean = x64.mean(dim=(0, 2, 3), keepdim=True)
    var = x64.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    torch.testing.assert_close(y.double(), (x64 - mean) / torch.sqrt(var + 1e-5), rtol=0, atol=2e-3)
    torch.testing.assert_close(layer.running_var.double(), x64.var(dim=(0, 2, 3)), rtol=1e-3, atol=0)
    assert triton_bn._plan(x).tiling.splits > 1  # the merge across splits was exercised
    assert triton_calls["train_forward"] == 1


def test_float64_takes_the_compiled_path(triton_calls, monkeypatch):
    """The kernels compute in float32: float64 goes to the compiled path (here a spy that runs eagerly)."""
    compiled = []

    def compiled_call(name, fn, tensors, consts):
        compiled.append(name)
        return fn(*tensors, **consts)

    monkeypatch.setattr(dispatch, "_compiled_call", compiled_call)
    monkeypatch.setattr(dispatch, "_compile_broken", {})
    check_parity(**MODES["float64"], steps=2)
    assert compiled == ["train_forward", "train_backward"] * 2
    assert triton_calls["train_forward"] == 0 and triton_calls["train_backward"] == 0


def test_bad_weight_is_refused(triton_calls):
    with pytest.raises(ValueError, match=r"weight has shape \(5,\), expected \(3,\)"):
        bnF.batch_norm(torch.randn(4, 3, 2, 2), None, None, torch.ones(5), None, training=True)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        triton_bn.train_forward(torch.randn(4, 3, dtype=torch.float64), None, None, 1e-5, False)


def test_interpreter_leaves_triton_language_as_it_was(triton_calls):
    """The in-process interpreter patches triton.language during a launch only: kernels compiled
    later for a GPU see the real builtins."""
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    from bnexp.nn import triton_interpret

    objects = triton_interpret._patched_objects() + [JITFunction]
    before = [dict(vars(obj)) for obj in objects]
    bnexp.nn.BatchNorm2d(3)(torch.randn(4, 3, 2, 2, requires_grad=True)).sum().backward()
    assert triton_calls["train_backward"] == 1
    for obj, saved in zip(objects, before):
        now = vars(obj)
        changed = [name for name in set(now) | set(saved) if now.get(name) is not saved.get(name)]
        changed = [name for name in changed if not (obj is tl and name == "semantic")]  # a lazy submodule import
        assert not changed, f"{obj}: {changed}"


# ----------------------------------------------------------------------------- launch geometry (pure Python)

H100_PROGRAMS = triton_bn.PROGRAMS_PER_SM * 132


@pytest.mark.parametrize("A,C,B", [
    (64, 256, 56 * 56), (256, 6, 28 * 28), (256, 16, 10 * 10), (64 * 56 * 56, 256, 1), (256, 2048, 1),
    (1, 1, 2), (2, 1, 1), (3, 1000, 7), (100_000, 3, 1), (2, 64, 1_000_003), (7, 5, 11), (1, 4096, 1),
])
@pytest.mark.parametrize("programs,tile",
                         [(H100_PROGRAMS, triton_bn.TILE), (1, triton_bn.TILE), (8, 256), (10_000, 64)])
def test_choose_tiling_invariants(A, C, B, programs, tile):
    t = triton_bn.choose_tiling(A, C, B, programs, tile)
    pow2 = lambda v: v >= 1 and v & (v - 1) == 0  # noqa: E731
    assert pow2(t.rows) and pow2(t.cols) and pow2(t.split_block)
    assert t.rows * t.cols <= max(tile, t.cols) and t.cols <= 1024
    assert t.channel_cols == (B == 1)
    assert t.channel_blocks * (t.cols if t.channel_cols else 1) >= C
    assert t.items == -(-A // t.rows) * t.b_blocks and t.b_blocks * t.cols >= B
    # no split is empty and every tile belongs to one
    assert 1 <= t.splits <= triton_bn.MAX_SPLITS and t.splits <= t.items
    assert (t.splits - 1) * t.items_per_split < t.items <= t.splits * t.items_per_split
    assert t.split_block >= t.splits and (not t.channel_cols or t.split_block * t.cols <= triton_bn.MAX_PARTIAL_TILE)
    # the grid aims at `programs` and overshoots by less than one split (splits are added only to reach it)
    assert t.channel_blocks * t.splits < programs + t.channel_blocks


def test_choose_tiling_at_the_benchmark_shapes():
    """Enough programs to fill an H100 (132 SMs), and little masked work."""
    for (A, C, B) in [(64, 256, 56 * 56), (256, 6, 28 * 28), (256, 16, 10 * 10)]:
        t = triton_bn.choose_tiling(A, C, B, H100_PROGRAMS)
        assert t.channel_blocks * t.splits >= 132, t
        assert t.b_blocks * t.cols <= 1.3 * B, t
    with pytest.raises(ValueError, match="must be >= 1"):
        triton_bn.choose_tiling(0, 3, 4, 8)


@pytest.mark.parametrize("shape,fmt,expected", [
    ((4, 3, 5, 6), torch.contiguous_format, (4, 3, 30)),
    ((4, 3, 5, 6), torch.channels_last, (120, 3, 1)),
    ((4, 3), torch.contiguous_format, (4, 3, 1)),
    ((4, 3, 7), torch.contiguous_format, (4, 3, 7)),
])
def test_view_as_acb(shape, fmt, expected):
    x = torch.empty(shape).contiguous(memory_format=fmt)
    assert triton_bn.view_as_acb(tuple(x.shape), x.stride()) == expected
    channels_last_1d = torch.empty(4, 7, 3).transpose(1, 2)  # (N, C, L) with C innermost
    assert triton_bn.view_as_acb(tuple(channels_last_1d.shape), channels_last_1d.stride()) == (28, 3, 1)
    sliced = torch.empty(4, 3, 5, 12)[..., ::2]
    assert triton_bn.view_as_acb(tuple(sliced.shape), sliced.stride()) is None


def test_resolved_backend_reports_triton_on_cuda(monkeypatch):
    monkeypatch.setattr(dispatch, "_triton_broken", {})
    with bnF.use_backend("auto"):
        assert bnF.resolved_backend("cuda") == "triton"
        assert bnF.resolved_backend("cpu") in ("compiled", "eager")
        monkeypatch.setitem(dispatch._triton_broken, "cuda", "RuntimeError: simulated")
        assert bnF.resolved_backend("cuda") == "compiled"
    with bnF.use_backend("triton"):
        assert bnF.resolved_backend("cpu") == "triton"


# ----------------------------------------------------------------------------- auto on CUDA: fallback logic

@pytest.fixture
def fake_cuda_input(monkeypatch):
    """Stand-ins for a CUDA input and the compiled path: the control flow of `_run` under auto on CUDA."""
    monkeypatch.setattr(dispatch, "_triton_broken", {})
    monkeypatch.setattr(dispatch, "_compiled_or_eager", lambda name, fn, tensors, consts: "compiled")
    return types.SimpleNamespace(dtype=torch.float32, device=torch.device("cuda"))


def test_auto_falls_back_from_triton_once_and_warns(fake_cuda_input, monkeypatch):
    attempts = []

    def broken_triton(name, tensors, consts):
        attempts.append(name)
        raise RuntimeError("simulated: Triton compile error")

    monkeypatch.setattr(dispatch, "_triton_call", broken_triton)
    with bnF.use_backend("auto"):
        with pytest.warns(RuntimeWarning, match="Triton kernels failed on cuda.*simulated: Triton compile error"):
            assert dispatch.run("train_forward", None, (fake_cuda_input,), {}) == "compiled"
        assert bnF.resolved_backend("cuda") == "compiled"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second warning, no second attempt
            assert dispatch.run("train_backward", None, (fake_cuda_input,), {}) == "compiled"
    assert attempts == ["train_forward"]
    with bnF.use_backend("triton"), pytest.raises(RuntimeError, match="simulated"):  # triton: errors propagate
        dispatch.run("train_forward", None, (fake_cuda_input,), {})


def test_auto_blames_the_input_when_the_fallback_fails_too(fake_cuda_input, monkeypatch):
    def failing(*args):
        raise ValueError("simulated: bad weight")

    monkeypatch.setattr(dispatch, "_triton_call", failing)
    monkeypatch.setattr(dispatch, "_compiled_or_eager", failing)
    with bnF.use_backend("auto"), warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="bad weight"):
            dispatch.run("train_forward", None, (fake_cuda_input,), {})
    assert dispatch._triton_broken == {}


def test_auto_routes_float64_on_cuda_to_the_compiled_path(fake_cuda_input, monkeypatch):
    monkeypatch.setattr(dispatch, "_triton_call", lambda *args: pytest.fail("float64 reached the Triton kernels"))
    fake_cuda_input.dtype = torch.float64
    with bnF.use_backend("auto"):
        assert dispatch.run("train_forward", None, (fake_cuda_input,), {}) == "compiled"


def test_triton_on_cpu_warns_once_that_it_is_the_interpreter(monkeypatch):
    monkeypatch.setattr(dispatch, "_interpreter_warned", False)
    layer = bnexp.nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 2, 2)
    with bnF.use_backend("triton"):
        with pytest.warns(RuntimeWarning, match="Triton's interpreter, which is for testing"):
            layer(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            layer(x)
