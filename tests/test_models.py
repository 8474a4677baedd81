"""Models: shapes, parameter counts, norm placement and names, dropout rule, factory errors."""

import contextlib

import pytest
import torch
import torch.nn as nn

from bnexp.errors import BnexpError
from bnexp.models import MODELS, AlexNet, AlexNetCifar, LeNet5, build_model
from bnexp.nn import make_norm


def _bn_available() -> bool:
    try:
        make_norm("bn", 4, 2)
        return True
    except Exception:
        return False


def _eager_bn():
    """The in-repo BN eagerly: these tests are about the models, not about BN's compiled path
    (compiling it for each new shape costs ~20 s on the CPU)."""
    try:
        from bnexp.nn.functional import use_backend
    except ImportError:
        return contextlib.nullcontext()
    return use_backend("eager")


NORMS = ["torch", "none", pytest.param("bn", marks=pytest.mark.skipif(not _bn_available(),
                                                                      reason="bnexp.nn BatchNorm not there yet"))]
# (name, num_classes, in_channels, data image size, input size the model wants, number of norm layers)
CASES = [("lenet5", 10, 1, 28, 28, 4), ("alexnet", 100, 3, 32, 224, 7), ("alexnet_cifar", 100, 3, 32, 32, 7)]


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, norm, expected", [
    ("lenet5", "none", 61_706),        # 156 + 2,416 + 48,120 + 10,164 + 850
    ("lenet5", "torch", 61_706 + 2 * (6 + 16 + 120 + 84)),
    ("alexnet", "none", 47_156_708),   # d2l's AlexNet with 100 classes
    ("alexnet", "torch", 47_156_708 + 2 * (96 + 256 + 384 + 384 + 256 + 4096 + 4096)),
    ("alexnet_cifar", "none", 1_926_660),
])
def test_parameter_counts(name, norm, expected):
    nc, cin = (10, 1) if name == "lenet5" else (100, 3)
    with torch.device("meta"):  # no memory, no init cost for AlexNet's 47M parameters
        model = build_model(name, norm, nc, cin, 28 if name == "lenet5" else 32)
    assert _count(model) == expected


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name, nc, cin, size, input_size, n_norms", CASES)
def test_forward_shape_and_norm_layers(name, nc, cin, size, input_size, n_norms, norm):
    model = build_model(name, norm, nc, cin, size)
    assert model.input_size == input_size
    layers = model.norm_layers()
    assert len(layers) == n_norms
    n_conv = n_norms - 2
    assert [n for n, _ in layers] == [f"conv{i}.norm" for i in range(1, n_conv + 1)] + ["fc1.norm", "fc2.norm"]
    if norm == "none":
        assert all(isinstance(m, nn.Identity) for _, m in layers)
    else:
        assert all(m.weight.shape[0] == m.num_features for _, m in layers)
        assert [m.num_features for _, m in layers][-2:] == [model.fc1.linear.out_features, model.fc2.linear.out_features]
    if norm == "torch":
        assert [type(m) for _, m in layers] == [nn.BatchNorm2d] * n_conv + [nn.BatchNorm1d] * 2

    # norm_layers() is in forward order: record the order the layers are actually called in
    called = []
    for n, m in layers:
        m.register_forward_hook(lambda mod, inp, out, n=n: called.append(n))
    with _eager_bn():
        out = model(torch.rand(2, cin, input_size, input_size))
    assert out.shape == (2, nc)
    assert called == [n for n, _ in layers]


def test_lenet5_on_cifar_sized_input_computes_flatten_size():
    model = build_model("lenet5", "torch", 100, 3, 32)
    assert model.fc1.linear.in_features == 16 * 6 * 6
    assert model(torch.rand(3, 3, 32, 32)).shape == (3, 100)
    assert build_model("lenet5", "none", 10, 1, 28).fc1.linear.in_features == 400


def test_lenet5_layer_shapes_match_reference():
    m = LeNet5("none")
    assert (m.conv1.conv.out_channels, m.conv1.conv.kernel_size, m.conv1.conv.padding) == (6, (5, 5), (2, 2))
    assert (m.conv2.conv.out_channels, m.conv2.conv.padding) == (16, (0, 0))
    assert [(l.in_features, l.out_features) for l in (m.fc1.linear, m.fc2.linear, m.fc3)] == [(400, 120), (120, 84), (84, 10)]
    assert not any(isinstance(x, nn.Dropout) for x in m.modules())


def test_identity_norm_sees_the_pre_activation():
    """With norm "none" the hooked Identity's input is the conv output before ReLU (negatives included)."""
    model = build_model("lenet5", "none", 10, 1, 28)
    seen = {}
    model.conv1.norm.register_forward_hook(lambda m, inp, out: seen.update(inp=inp[0], out=out))
    x = torch.rand(4, 1, 28, 28)
    model(x)
    torch.testing.assert_close(seen["inp"], model.conv1.conv(x))
    assert (seen["inp"] < 0).any()


def _dropouts(model):
    return [m.p for m in model.modules() if isinstance(m, nn.Dropout)]


@pytest.mark.parametrize("cls", [AlexNet, AlexNetCifar])
def test_dropout_rule(cls):
    with torch.device("meta"):
        assert _dropouts(cls("none")) == [0.5, 0.5]      # plain arm: dropout as in the reference
        assert _dropouts(cls("torch")) == []             # BN arm: dropout removed
        assert _dropouts(cls("torch", dropout=0.3)) == [0.3, 0.3]
        assert _dropouts(cls("none", dropout=0.0)) == []
        model = cls("none")
    assert [n for n, m in model.named_modules() if isinstance(m, nn.Dropout)] == ["fc1.dropout", "fc2.dropout"]


def test_norm_kwargs_reach_every_norm_layer():
    model = build_model("alexnet_cifar", "torch", 100, 3, 32, momentum=0.3, eps=1e-3)
    assert {(m.momentum, m.eps) for _, m in model.norm_layers()} == {(0.3, 1e-3)}


@pytest.mark.skipif(not _bn_available(), reason="bnexp.nn BatchNorm not there yet")
def test_bn_and_torch_models_share_state_dict_keys():
    a, b = build_model("lenet5", "bn", 10, 1, 28), build_model("lenet5", "torch", 10, 1, 28)
    assert a.state_dict().keys() == b.state_dict().keys()
    b.load_state_dict(a.state_dict())


def test_registry_and_factory_errors():
    assert set(MODELS) == {"lenet5", "lenet5_d2l", "mlp_ioffe", "alexnet", "alexnet_cifar"}
    with pytest.raises(BnexpError, match="unknown model 'resnet'.*lenet5, lenet5_d2l, mlp_ioffe, alexnet"):
        build_model("resnet", "torch", 10, 1, 28)
    with pytest.raises(BnexpError, match="unknown norm kind"):
        build_model("lenet5", "layernorm", 10, 1, 28)
    with pytest.raises(BnexpError, match="no dropout"):
        build_model("lenet5", "none", 10, 1, 28, dropout=0.5)
    with pytest.raises(BnexpError, match="dropout must be in"):
        build_model("alexnet_cifar", "none", 100, 3, 32, dropout=1.0)
    with pytest.raises(BnexpError, match="at least 12x12"):
        build_model("lenet5", "none", 10, 1, 8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name, nc, cin, size, input_size, n_norms", CASES)
def test_forward_backward_on_the_gpu(name, nc, cin, size, input_size, n_norms, norm):
    model = build_model(name, norm, nc, cin, size).cuda()
    x = torch.rand(8, cin, input_size, input_size, device="cuda")
    with _eager_bn():
        loss = model(x).logsumexp(1).mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
