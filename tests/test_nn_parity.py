"""bnexp.nn.BatchNorm1d/2d against torch.nn.BatchNorm1d/2d: outputs, gradients, running statistics.

Each parity case trains both layers side by side for STEPS steps (batch sizes vary, the last one
partial; an SGD step on weight/bias between steps, copied to torch's layer so both stay equal),
then compares them in eval mode, forward and backward.
"""

import zlib

import pytest
import torch

import bnexp.nn
from bnexp.nn import dispatch
from bnexp.nn import functional as bnF

STEPS = 20
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10),
       torch.float32: dict(rtol=1e-4, atol=1e-5),
       # bf16 has 8 significant bits; torch rounds its saved statistics to bf16, we keep float32, so
       # the two differ by a few ulp of the largest intermediate (see test_bfloat16_more_accurate_than_torch).
       torch.bfloat16: dict(rtol=5e-2, atol=2e-2)}  # atol relative to max |value| for bf16


@pytest.fixture(params=["eager"])
def backend(request):
    with bnF.use_backend(request.param):
        yield request.param


def _layers(dims, num_features, dtype, **kwargs):
    ours = (bnexp.nn.BatchNorm1d if dims == 1 else bnexp.nn.BatchNorm2d)(num_features, **kwargs).to(dtype)
    ref = (torch.nn.BatchNorm1d if dims == 1 else torch.nn.BatchNorm2d)(num_features, **kwargs).to(dtype)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, ref


def _input(shape, dtype, layout, gen):
    """Per-channel offsets and scales so the statistics differ between channels."""
    c = shape[1]
    view = (1, c) + (1,) * (len(shape) - 2)
    offset = 3 * torch.randn(view, generator=gen, dtype=torch.float64)
    scale = 0.5 + 2 * torch.rand(view, generator=gen, dtype=torch.float64)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + offset).to(dtype)


def _leaf(x, layout):
    """A leaf copy of `x` in the memory layout under test."""
    if layout == "noncontiguous":  # every other element of a buffer twice as long in the last dim
        buffer = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
        buffer[..., ::2] = x
        x = buffer[..., ::2]
        assert not x.is_contiguous()
    elif layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.detach().clone() if layout != "noncontiguous" else x.detach()


def _close(a, b, dtype, what):
    tol = dict(TOL[dtype])
    if dtype == torch.bfloat16:
        tol["atol"] *= max(1.0, b.double().abs().max().item())
    torch.testing.assert_close(a.double(), b.double(), **tol, msg=lambda m: f"{what}: {m}")


def _compare_step(ours, ref, x, dtype, gen, layout, grad_mode=True):
    x1, x2 = _leaf(x, layout).requires_grad_(grad_mode), _leaf(x, layout).requires_grad_(grad_mode)
    with torch.set_grad_enabled(grad_mode):
        y1, y2 = ours(x1), ref(x2)
    assert y1.dtype == y2.dtype == x.dtype and y1.shape == y2.shape
    if layout == "channels_last":
        assert y1.is_contiguous(memory_format=torch.channels_last)
    _close(y1, y2, dtype, "output")
    if grad_mode:
        g = torch.randn(y1.shape, generator=gen, dtype=torch.float64).to(dtype)
        y1.backward(g)
        y2.backward(g)
        _close(x1.grad, x2.grad, dtype, "input grad")
        if ours.affine:
            _close(ours.weight.grad, ref.weight.grad, dtype, "weight grad")
            _close(ours.bias.grad, ref.bias.grad, dtype, "bias grad")


def _sgd_step(ours, ref, lr=0.2):
    with torch.no_grad():
        for p_ours, p_ref in zip(ours.parameters(), ref.parameters()):
            if p_ours.grad is not None:
                p_ours -= lr * p_ours.grad
                p_ours.grad = None
                p_ref.grad = None
            p_ref.copy_(p_ours)


def _compare_buffers(ours, ref, dtype):
    for name in ("running_mean", "running_var"):
        a, b = getattr(ours, name), getattr(ref, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert not a.requires_grad and a.grad_fn is None, f"{name} holds a graph"
            _close(a, b, dtype, name)
    assert (ours.num_batches_tracked is None) == (ref.num_batches_tracked is None)
    if ours.num_batches_tracked is not None:
        assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item()


def check_parity(shape, dims, dtype=torch.float32, layout="contiguous", grad_mode=True, steps=STEPS, **kwargs):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, dims, dtype, layout, grad_mode, kwargs)).encode()))
    ours, ref = _layers(dims, shape[1], dtype, **kwargs)
    # Batch sizes vary (the dynamic batch dimension of the compiled kernels); the last is partial.
    batch_sizes = [shape[0] + (i % 3) for i in range(steps - 1)] + [max(2, shape[0] // 2)]
    for step, n in enumerate(batch_sizes):
        x = _input((n, *shape[1:]), dtype, layout, gen)
        _compare_step(ours, ref, x, dtype, gen, layout, grad_mode)
        _compare_buffers(ours, ref, dtype)
        _sgd_step(ours, ref)
    if ours.track_running_stats:
        assert ours.num_batches_tracked.item() == steps
        assert not torch.equal(ours.running_mean, torch.zeros_like(ours.running_mean))
    if ours.affine and grad_mode:
        assert not torch.equal(ours.weight, torch.ones_like(ours.weight)), "SGD never moved the weights"
    ours.eval()
    ref.eval()
    for _ in range(2):
        _compare_step(ours, ref, _input(shape, dtype, layout, gen), dtype, gen, layout, grad_mode=True)
    _compare_buffers(ours, ref, dtype)


# ----------------------------------------------------------------------------- every mode, eager backend

MODES = {
    "2d": dict(shape=(8, 3, 5, 4), dims=2),
    "1d_NC": dict(shape=(16, 5), dims=1),
    "1d_NCL": dict(shape=(6, 4, 7), dims=1),
    "momentum_none": dict(shape=(8, 3, 5, 4), dims=2, momentum=None),
    "momentum_0.3": dict(shape=(16, 5), dims=1, momentum=0.3),
    "affine_false": dict(shape=(8, 3, 5, 4), dims=2, affine=False),
    "no_tracking": dict(shape=(8, 3, 5, 4), dims=2, track_running_stats=False),
    "no_tracking_1d": dict(shape=(16, 5), dims=1, track_running_stats=False),
    "no_grad_training": dict(shape=(8, 3, 5, 4), dims=2, grad_mode=False),
    "float64": dict(shape=(8, 3, 5, 4), dims=2, dtype=torch.float64),
    "bfloat16": dict(shape=(8, 3, 5, 4), dims=2, dtype=torch.bfloat16),
    "bfloat16_1d": dict(shape=(32, 5), dims=1, dtype=torch.bfloat16),
    "noncontiguous_2d": dict(shape=(8, 3, 5, 4), dims=2, layout="noncontiguous"),
    "noncontiguous_1d": dict(shape=(6, 4, 7), dims=1, layout="noncontiguous"),
    "channels_last": dict(shape=(8, 3, 5, 4), dims=2, layout="channels_last"),
    "eps_1e-3": dict(shape=(8, 3, 5, 4), dims=2, eps=1e-3),
}


@pytest.mark.parametrize("mode", MODES)
def test_parity_eager(mode, backend):
    check_parity(**MODES[mode])


def test_float32_module_bfloat16_input(backend):
    """Mixed precision as under autocast: float32 parameters, bf16 activations -> bf16 output."""
    gen = torch.Generator().manual_seed(0)
    ours, ref = _layers(2, 3, torch.float32)
    for _ in range(3):
        x = _input((8, 3, 4, 4), torch.bfloat16, "contiguous", gen)
        _compare_step(ours, ref, x, torch.bfloat16, gen, "contiguous")
        _compare_buffers(ours, ref, torch.float32)
        assert ours.weight.grad.dtype == torch.float32
        _sgd_step(ours, ref)


def test_bfloat16_more_accurate_than_torch(backend):
    """In bf16, ours is at least as close to the float64 result as torch's (statistics in float32)."""
    gen = torch.Generator().manual_seed(7)
    errors = {"bnexp": [], "torch": []}
    for _ in range(3):
        x = _input((8, 3, 5, 4), torch.bfloat16, "contiguous", gen)
        g = torch.randn(x.shape, generator=gen).bfloat16()
        results = {}
        for name, cls, dtype in [("bnexp", bnexp.nn.BatchNorm2d, torch.bfloat16),
                                 ("torch", torch.nn.BatchNorm2d, torch.bfloat16),
                                 ("float64", torch.nn.BatchNorm2d, torch.float64)]:
            layer, xi = cls(3).to(dtype), x.to(dtype).clone().requires_grad_()
            layer(xi).backward(g.to(dtype))
            results[name] = torch.cat([t.double().flatten() for t in (layer(xi.detach()), xi.grad, layer.weight.grad)])
        for name in errors:
            errors[name].append((results[name] - results["float64"]).abs().max().item())
    assert max(errors["bnexp"]) <= max(errors["torch"]) * 1.1, errors


# ------------------------------------------------------------- compiled backend (few: compiling takes seconds)

COMPILED_MODES = ["2d", "1d_NC", "channels_last"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", COMPILED_MODES)
def test_parity_compiled(mode):
    with bnF.use_backend("compiled"):  # "compiled" raises instead of silently falling back to eager
        check_parity(**MODES[mode])
    assert {"train_forward", "train_backward"} <= {key[0] for key in dispatch._compiled}, "nothing was compiled"


# ----------------------------------------------------------------------------- gradients

def _gradcheck(dims, shape, training):
    gen = torch.Generator().manual_seed(1)
    layer = (bnexp.nn.BatchNorm1d if dims == 1 else bnexp.nn.BatchNorm2d)(shape[1], dtype=torch.float64)
    with torch.no_grad():
        layer.running_mean.normal_(generator=gen)
        layer.running_var.uniform_(0.5, 2.0, generator=gen)
    layer.train(training)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1).requires_grad_()
    w = torch.randn(shape[1], generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(shape[1], generator=gen, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):  # running stats do not enter the training-mode output; momentum=0 keeps eval fixed
        return bnF.batch_norm(x, None if training else layer.running_mean, None if training else layer.running_var,
                              w, b, training, 0.0, 1e-5)

    assert torch.autograd.gradcheck(f, (x, w, b))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dims,shape", [(2, (4, 3, 3, 2)), (1, (5, 3)), (1, (3, 2, 4))])
def test_gradcheck(dims, shape, training, backend):
    """float64 gradcheck of the eager path; the compiled path runs the same function (checked by parity)."""
    _gradcheck(dims, shape, training)


def test_double_backward_is_refused(backend):
    layer = bnexp.nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="twice|double|once"):
        gx.sum().backward()


# ----------------------------------------------------------------------------- state dicts

@pytest.mark.parametrize("dims,shape", [(1, (8, 4)), (2, (8, 4, 3, 3))])
def test_state_dict_both_ways(dims, shape, backend):
    gen = torch.Generator().manual_seed(2)
    ours, ref = _layers(dims, shape[1], torch.float32, momentum=0.5)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert [n for n, _ in ours.named_parameters()] == ["weight", "bias"]
    for _ in range(3):  # move torch's layer away from the init
        ref(torch.randn(shape, generator=gen) * 2 + 1).sum().backward()
        with torch.no_grad():
            for p in ref.parameters():
                p -= 0.3 * p.grad
    fresh = (bnexp.nn.BatchNorm1d if dims == 1 else bnexp.nn.BatchNorm2d)(shape[1])
    fresh.load_state_dict(ref.state_dict(), strict=True)  # torch -> ours
    back = (torch.nn.BatchNorm1d if dims == 1 else torch.nn.BatchNorm2d)(shape[1])
    back.load_state_dict(fresh.state_dict(), strict=True)  # ours -> torch
    x = torch.randn(shape, generator=gen)
    for module in (fresh, back, ref):
        module.eval()
    torch.testing.assert_close(fresh(x), ref(x))
    torch.testing.assert_close(back(x), ref(x))
    assert fresh.num_batches_tracked.item() == 3


# ----------------------------------------------------------------------------- semantics beyond torch parity

def test_biased_running_var(backend):
    check_biased_running_var()


def check_biased_running_var():
    """running_var follows the biased batch variance with biased_running_var=True (any backend)."""
    gen = torch.Generator().manual_seed(3)
    layer = bnexp.nn.BatchNorm2d(3, momentum=0.25, biased_running_var=True)
    expected = torch.ones(3, dtype=torch.float64)
    for n in (2, 4, 3):
        x = torch.randn(n, 3, 2, 2, generator=gen) * 3
        layer(x)
        batch_var = x.double().var(dim=(0, 2, 3), unbiased=False)  # the d2l / moon-hotel formula
        expected = 0.75 * expected + 0.25 * batch_var
    torch.testing.assert_close(layer.running_var.double(), expected, rtol=1e-6, atol=1e-7)
    assert "biased_running_var=True" in repr(layer)
    unbiased = bnexp.nn.BatchNorm2d(3, momentum=1.0)
    unbiased(x)
    torch.testing.assert_close(unbiased.running_var.double(), x.double().var(dim=(0, 2, 3)), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend_name", ["eager", pytest.param("compiled", marks=pytest.mark.slow)])
def test_large_offset_no_cancellation(backend_name):
    """x = 1e4 + 1e-2 * noise in float32: E[x^2] - E[x]^2 would lose every digit of the variance."""
    gen = torch.Generator().manual_seed(4)
    x = (1e4 + 1e-2 * torch.randn(32, 3, 6, 6, generator=gen)).float()
    layer = bnexp.nn.BatchNorm2d(3, momentum=1.0)  # momentum 1: running stats = this batch's
    with bnF.use_backend(backend_name):
        y = layer(x)
    x64 = x.double()  # the exact float32 values, reduced in float64
    mean = x64.mean(dim=(0, 2, 3), keepdim=True)
    var = x64.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    expected = (x64 - mean) / torch.sqrt(var + 1e-5)
    torch.testing.assert_close(y.double(), expected, rtol=0, atol=2e-3)
    torch.testing.assert_close(layer.running_var.double(), x64.var(dim=(0, 2, 3)), rtol=1e-3, atol=0)
    naive_var = (x * x).mean(dim=(0, 2, 3)) - x.mean(dim=(0, 2, 3)) ** 2  # the formula we avoid
    assert not torch.allclose(naive_var.double(), var.flatten(), rtol=0.5)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_batch(training, backend):
    ours, ref = _layers(2, 3, torch.float32)
    ours.train(training)
    ref.train(training)
    x1, x2 = torch.randn(0, 3, 4, 4, requires_grad=True), torch.randn(0, 3, 4, 4, requires_grad=True)
    y1, y2 = ours(x1), ref(x2)
    assert y1.shape == y2.shape == (0, 3, 4, 4)
    y1.sum().backward()
    y2.sum().backward()
    assert x1.grad.shape == x1.shape
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
    _compare_buffers(ours, ref, torch.float32)


def test_momentum_none_is_cumulative_average(backend):
    gen = torch.Generator().manual_seed(5)
    layer = bnexp.nn.BatchNorm1d(4, momentum=None)
    batches = [torch.randn(6, 4, generator=gen) + i for i in range(5)]
    for x in batches:
        layer(x)
    torch.testing.assert_close(layer.running_mean, torch.stack([x.mean(0) for x in batches]).mean(0))
    assert layer.num_batches_tracked.item() == 5


def test_no_tracking_has_no_buffers_and_uses_batch_stats_in_eval(backend):
    layer = bnexp.nn.BatchNorm2d(3, track_running_stats=False).eval()
    assert layer.running_mean is None and layer.running_var is None and layer.num_batches_tracked is None
    x = torch.randn(8, 3, 4, 4) * 5 + 2
    y = layer(x)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)


def check_inside_torch_compile(ours, ref):
    """ours (Conv2d, norm, ...) under torch.compile and ref eagerly: same output and conv weight gradient."""
    ref.load_state_dict(ours.state_dict())
    compiled = torch.compile(ours, backend="aot_eager")  # tracing is what we test; Inductor adds only time
    x = torch.randn(4, 2, 5, 5)
    y, y_ref = compiled(x), ref(x)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(ours[0].weight.grad, ref[0].weight.grad)


@pytest.mark.slow
def test_inside_torch_compile():
    """A model wrapped in torch.compile traces our eager math (no nested compilation)."""
    torch.manual_seed(6)
    ours = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), bnexp.nn.BatchNorm2d(3), torch.nn.ReLU())
    ref = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.ReLU())
    check_inside_torch_compile(ours, ref)
    torch.testing.assert_close(ours[1].running_var, ref[1].running_var)
    assert ours[1].num_batches_tracked.item() == 1


@pytest.mark.slow
@pytest.mark.parametrize("shape,dims,layout", [((1, 3, 4, 4), 2, "contiguous"),  # one sample, N = 1
                                                ((5, 3, 1, 1), 2, "contiguous"),  # 1x1 maps
                                                ((4, 1, 3, 3), 2, "channels_last"),  # one channel
                                                ((6, 3, 1), 1, "contiguous"),  # L = 1
                                                ((2, 1), 1, "contiguous"),
                                                ((6, 3, 4, 5), 2, "noncontiguous")])
def test_compiled_equals_eager_at_edge_shapes(shape, dims, layout):
    """The compiled kernels are traced at generic sizes (> 1); sizes of 1 and odd strides must still work."""
    gen = torch.Generator().manual_seed(8)
    x = _input(shape, torch.float32, layout, gen)
    g = torch.randn(shape, generator=gen).contiguous(memory_format=torch.channels_last) if len(shape) == 4 \
        else torch.randn(shape, generator=gen)  # the gradient in the other layout than x, where there is one
    results = []
    for backend_name in ("eager", "compiled"):
        layer = (bnexp.nn.BatchNorm1d if dims == 1 else bnexp.nn.BatchNorm2d)(shape[1])
        with bnF.use_backend(backend_name):
            xi = _leaf(x, layout).requires_grad_()
            y = layer(xi)
            y.backward(g, retain_graph=True)
            y.sum().backward()  # an expanded (stride-0) incoming gradient
        results.append((y, xi.grad, layer.weight.grad, layer.bias.grad, layer.running_var))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
