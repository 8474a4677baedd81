"""Backend selection (auto | compiled | eager), the eager fallback, and make_norm."""

import warnings

import pytest
import torch

import bnexp.nn
from bnexp.nn import dispatch
from bnexp.nn import functional as bnF


def test_backend_from_environment(monkeypatch):
    monkeypatch.setattr(dispatch, "_backend", None)
    monkeypatch.setenv(bnF.BACKEND_ENV, " Eager ")
    assert bnF.get_backend() == "eager"
    monkeypatch.setattr(dispatch, "_backend", None)
    monkeypatch.delenv(bnF.BACKEND_ENV)
    assert bnF.get_backend() == "auto"


def test_use_backend_restores_previous():
    before = bnF.get_backend()
    with bnF.use_backend("eager"):
        assert bnF.get_backend() == "eager"
        assert bnF.resolved_backend("cpu") == "eager"
    assert bnF.get_backend() == before


def _broken_compiled(*args):
    raise RuntimeError("simulated: no C++ compiler")


@pytest.fixture
def compilation_fails(monkeypatch):
    """Pretend compilation fails, as it does without a C++ compiler (CPU) or Triton (CUDA)."""
    monkeypatch.setattr(dispatch, "_compiled", {})
    monkeypatch.setattr(dispatch, "_compile", _broken_compiled)
    monkeypatch.setattr(dispatch, "_compile_broken", {})


def _train_step(seed=0):
    torch.manual_seed(seed)
    layer = bnexp.nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    y = layer(x)
    y.backward(torch.ones_like(y).cumsum(0))
    return y.detach(), x.grad, layer.running_var


def test_auto_falls_back_to_eager_and_warns_once(compilation_fails):
    with bnF.use_backend("eager"):
        expected = _train_step()
    with bnF.use_backend("auto"):
        with pytest.warns(RuntimeWarning, match="compilation failed on cpu.*simulated: no C\\+\\+ compiler"):
            got = _train_step()
        assert bnF.resolved_backend("cpu") == "eager"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a second step must not warn again
            _train_step()
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


def test_bad_input_is_not_mistaken_for_a_broken_compiler(compilation_fails):
    """When the eager path fails too, the input is at fault: its error propagates, nothing is disabled."""
    with bnF.use_backend("auto"), warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="size of tensor"):
            bnF.batch_norm(torch.randn(4, 3, 2, 2), None, None, torch.ones(5), None, training=True)
    assert dispatch._compile_broken == {}


def test_compiled_backend_raises_instead_of_falling_back(compilation_fails):
    with bnF.use_backend("compiled"), pytest.raises(RuntimeError, match="simulated"):
        _train_step()


def test_eager_backend_never_compiles(monkeypatch):
    monkeypatch.setattr(dispatch, "_compiled", {})
    monkeypatch.setattr(dispatch, "_compile", _broken_compiled)
    with bnF.use_backend("eager"):
        _train_step()
    assert dispatch._compiled == {}


# ----------------------------------------------------------------------------- make_norm

def test_make_norm_kinds():
    assert bnexp.nn.NORM_KINDS == ("bn", "torch", "none", "gn", "ln", "in", "brn", "ghost", "noisy")
    assert type(bnexp.nn.make_norm("bn", 6, 2)) is bnexp.nn.BatchNorm2d
    assert type(bnexp.nn.make_norm("bn", 6, 1)) is bnexp.nn.BatchNorm1d
    assert type(bnexp.nn.make_norm("torch", 6, 2)) is torch.nn.BatchNorm2d
    assert type(bnexp.nn.make_norm("torch", 6, 1)) is torch.nn.BatchNorm1d
    assert type(bnexp.nn.make_norm("none", 6, 2)) is torch.nn.Identity
    for kind, classes in {"gn": ("GroupNorm", "GroupNorm"), "ln": ("LayerNorm", "LayerNorm"),
                          "brn": ("BatchRenorm1d", "BatchRenorm2d"), "ghost": ("GhostBatchNorm1d", "GhostBatchNorm2d"),
                          "noisy": ("NoisyBatchNorm1d", "NoisyBatchNorm2d"), "in": (None, "InstanceNorm2d")}.items():
        for dims, name in ((1, classes[0]), (2, classes[1])):
            if name is not None:
                assert type(bnexp.nn.make_norm(kind, 6, dims)) is getattr(bnexp.nn, name), (kind, dims)


def test_make_norm_passes_kwargs():
    ours = bnexp.nn.make_norm("bn", 6, 2, eps=1e-3, momentum=None, biased_running_var=True, dtype=torch.float64)
    assert (ours.eps, ours.momentum, ours.biased_running_var, ours.weight.dtype) == (1e-3, None, True, torch.float64)
    ref = bnexp.nn.make_norm("torch", 6, 1, eps=1e-3, momentum=0.3, affine=False, biased_running_var=False)
    assert (ref.eps, ref.momentum, ref.affine) == (1e-3, 0.3, False)


@pytest.mark.parametrize("cls", [bnexp.nn.BatchNorm1d, bnexp.nn.BatchNorm2d])
def test_momentum_convention_is_documented(cls):
    assert "TF/Keras" in cls.__doc__ and "running = (1 - momentum) * running + momentum * batch" in cls.__doc__
