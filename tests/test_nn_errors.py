"""Bad input to bnexp.nn gets the same clear errors as torch.nn (same messages where torch has one)."""

import pytest
import torch

import bnexp.nn
from bnexp.nn import dispatch
from bnexp.nn import functional as bnF


def _torch_message(layer, x):
    with pytest.raises(ValueError) as info:
        layer(x)
    return str(info.value)


@pytest.mark.parametrize("shape,message", [((2, 3, 4, 5), "expected 2D or 3D input (got 4D input)"),
                                           ((3,), "expected 2D or 3D input (got 1D input)")])
def test_batchnorm1d_wrong_rank(shape, message):
    x = torch.randn(shape)
    with pytest.raises(ValueError) as info:
        bnexp.nn.BatchNorm1d(3)(x)
    assert str(info.value) == message == _torch_message(torch.nn.BatchNorm1d(3), x)


@pytest.mark.parametrize("shape,message", [((2, 3, 4), "expected 4D input (got 3D input)"),
                                           ((2, 3, 4, 5, 6), "expected 4D input (got 5D input)")])
def test_batchnorm2d_wrong_rank(shape, message):
    x = torch.randn(shape)
    with pytest.raises(ValueError) as info:
        bnexp.nn.BatchNorm2d(3)(x)
    assert str(info.value) == message == _torch_message(torch.nn.BatchNorm2d(3), x)


@pytest.mark.parametrize("cls,torch_cls,shape", [(bnexp.nn.BatchNorm1d, torch.nn.BatchNorm1d, (1, 3)),
                                                 (bnexp.nn.BatchNorm1d, torch.nn.BatchNorm1d, (1, 3, 1)),
                                                 (bnexp.nn.BatchNorm2d, torch.nn.BatchNorm2d, (1, 3, 1, 1))])
def test_one_value_per_channel_when_training(cls, torch_cls, shape):
    x = torch.randn(shape)
    layer = cls(3)
    with pytest.raises(ValueError) as info:
        layer(x)
    assert str(info.value) == (f"Expected more than 1 value per channel when training, got input size "
                               f"torch.Size({list(shape)})") == _torch_message(torch_cls(3), x)
    assert layer.num_batches_tracked.item() == 0  # the refused batch is not counted
    layer.eval()
    assert layer(x).shape == x.shape  # eval uses the running statistics: one value is fine


def test_one_value_per_channel_without_tracking_in_eval():
    """Without running statistics, eval normalises with batch statistics, so it needs >1 value too."""
    x = torch.randn(1, 3)
    layer = bnexp.nn.BatchNorm1d(3, track_running_stats=False).eval()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        layer(x)


def test_functional_eval_needs_running_stats():
    with pytest.raises(ValueError, match="running_mean and running_var are required"):
        bnF.batch_norm(torch.randn(4, 3), None, None, training=False)


def test_make_norm_unknown_kind():
    with pytest.raises(ValueError) as info:
        bnexp.nn.make_norm("batchnorm", 8, 2)
    assert "'batchnorm'" in str(info.value)
    for kind in bnexp.nn.NORM_KINDS:
        assert kind in str(info.value)


def test_make_norm_bad_dims():
    with pytest.raises(ValueError, match="dims must be 1 or 2, got 3"):
        bnexp.nn.make_norm("bn", 8, 3)


def test_make_norm_torch_rejects_biased_running_var():
    with pytest.raises(ValueError, match="biased_running_var"):
        bnexp.nn.make_norm("torch", 8, 2, biased_running_var=True)


def test_unknown_layer_argument_is_a_type_error():
    with pytest.raises(TypeError):
        bnexp.nn.BatchNorm2d(8, biased=True)


def test_unknown_backend():
    with pytest.raises(ValueError) as info:
        bnF.set_backend("fast")
    assert all(name in str(info.value) for name in bnF.BACKENDS)


def test_unknown_backend_from_environment(monkeypatch):
    monkeypatch.setattr(dispatch, "_backend", None)  # re-read the environment
    monkeypatch.setenv(bnF.BACKEND_ENV, "gpu")
    with pytest.raises(ValueError, match="BNEXP_BN_BACKEND.*'gpu'.*auto, compiled, eager"):
        bnexp.nn.BatchNorm2d(3)(torch.randn(2, 3, 2, 2))
