"""The networks of the reference BN experiments, with a norm layer wherever the BN arm has one.

LeNet5 is the FashionMNIST network of moon-hotel/DeepLearningWithMe 07_BN; LeNet5D2l the sigmoid /
average-pooling LeNet of d2l.ai's BN chapter; MLPIoffe the MNIST network of Ioffe & Szegedy 2015;
AlexNet is d2l.ai's 224x224 AlexNet as trained on CIFAR-100 in moon-hotel's folder; AlexNetCifar is
a 32x32 AlexNet-shaped network of our own, cheap enough for CPU runs. The architecture knobs
(`Arch`: nonlinearity, pooling, norm before/after the nonlinearity, init) apply to every network. Every norm position is a
`make_norm(kind, ...)` layer, so one word switches the whole network between the in-repo BN ("bn"),
PyTorch's BN ("torch") and no normalisation ("none": an nn.Identity placeholder, kept so that hooks
on it still see the pre-activation).

Layers keep their bias even when a BN follows (the bias is then redundant) because the reference
code does, and the parameter counts in docs/references.md are with bias.
"""

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn

from bnexp import model_knobs
from bnexp.config import default_dropout  # torch-free: the report applies the rule too
from bnexp.errors import BnexpError
from bnexp.nn import make_norm

ACTIVATIONS = {name: getattr(nn, module) for name, module in model_knobs.ACTIVATIONS.items()}
POOLS = {name: getattr(nn, module) for name, module in model_knobs.POOLS.items()}
NORM_POSITIONS, INITS = model_knobs.NORM_POSITIONS, model_knobs.INITS
GAUSSIAN_STD = 0.01  # init=gaussian: "small random Gaussian values" (Ioffe & Szegedy 2015, section 4.1)


@dataclass(frozen=True)
class Arch:
    """The architecture knobs every network takes: nonlinearity, pooling, where the norm sits, init.

    The defaults are LeNet5's and the AlexNets' (ReLU, max pooling, norm before the nonlinearity,
    PyTorch's default init); `pool=None` is for networks without pooling (mlp_ioffe).
    """
    activation: str = "relu"        # relu | sigmoid | tanh
    pool: str | None = "max"        # max | avg (kernel and stride as the network defines them)
    norm_position: str = "before"   # before | after the nonlinearity
    init: str = "default"           # default (PyTorch's) | xavier (uniform, d2l) | gaussian (N(0, 0.01^2), Ioffe)

    def act(self) -> nn.Module:
        return ACTIVATIONS[self.activation]()

    def pooling(self, kernel_size: int, stride: int | None = None, padding: int = 0) -> nn.Module:
        return POOLS[self.pool](kernel_size, stride=stride, padding=padding)


def _block(layer_name: str, layer: nn.Module, norm: nn.Module, arch: Arch, dropout: float = 0.0) -> nn.Sequential:
    """layer -> norm -> nonlinearity (or layer -> nonlinearity -> norm) [-> Dropout]; children named
    <layer_name> / norm / act / dropout whatever the order, so state dicts do not depend on it."""
    parts = [(layer_name, layer)]
    parts += [("norm", norm), ("act", arch.act())] if arch.norm_position == "before" else \
             [("act", arch.act()), ("norm", norm)]
    if dropout > 0:
        parts.append(("dropout", nn.Dropout(dropout)))
    return nn.Sequential(OrderedDict(parts))


def conv_block(in_channels: int, out_channels: int, kernel_size: int, norm: str, norm_kwargs: dict,
               stride: int = 1, padding: int = 0, arch: Arch = Arch()) -> nn.Sequential:
    """Conv2d -> norm -> nonlinearity (order per `arch.norm_position`), children conv / norm / act."""
    return _block("conv", nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding),
                  make_norm(norm, out_channels, 2, **norm_kwargs), arch)


def fc_block(in_features: int, out_features: int, norm: str, norm_kwargs: dict,
             dropout: float = 0.0, arch: Arch = Arch()) -> nn.Sequential:
    """Linear -> norm -> nonlinearity [-> Dropout], children linear / norm / act / dropout."""
    return _block("linear", nn.Linear(in_features, out_features), make_norm(norm, out_features, 1, **norm_kwargs),
                  arch, dropout)


def init_weights(model: nn.Module, init: str) -> None:
    """Re-initialise conv and linear weights: xavier-uniform as d2l.ai does (biases keep PyTorch's
    init), or N(0, 0.01^2) weights with zero biases for `gaussian`; `default` leaves PyTorch's."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if init == "xavier":
                nn.init.xavier_uniform_(m.weight)
            elif init == "gaussian":
                nn.init.normal_(m.weight, 0.0, GAUSSIAN_STD)
                nn.init.zeros_(m.bias)


class NormModel(nn.Module):
    """A network whose norm layers are the children named `norm` of its blocks."""

    input_size: int  # spatial size (H = W) the network expects; the data layer resizes to it

    def norm_layers(self) -> list[tuple[str, nn.Module]]:
        """(name, module) of every norm position in forward order, e.g. ("conv1.norm", BatchNorm2d)."""
        # named_modules follows registration order, and every model registers its blocks in forward order.
        return [(name, m) for name, m in self.named_modules() if name.rsplit(".", 1)[-1] == "norm"]


class LeNet5(NormModel):
    """LeNet5: conv 6@5x5 pad 2, pool, conv 16@5x5, pool, FC 400-120-84-10, norm at each hidden layer."""

    def __init__(self, norm: str, num_classes: int = 10, in_channels: int = 1, image_size: int = 28,
                 arch: Arch = Arch(), first_padding: int = 2, **norm_kwargs):
        super().__init__()
        side = ((image_size + 2 * first_padding - 4) // 2 - 4) // 2  # conv1, pool, conv2 (-4), pool
        if side < 1:
            least = 16 - 2 * first_padding
            raise BnexpError(f"this LeNet needs images of at least {least}x{least}, got {image_size}x{image_size}")
        self.input_size = image_size
        self.conv1 = conv_block(in_channels, 6, 5, norm, norm_kwargs, padding=first_padding, arch=arch)
        self.conv2 = conv_block(6, 16, 5, norm, norm_kwargs, arch=arch)
        self.fc1 = fc_block(16 * side * side, 120, norm, norm_kwargs, arch=arch)  # 400 for 28x28 inputs
        self.fc2 = fc_block(120, 84, norm, norm_kwargs, arch=arch)
        self.fc3 = nn.Linear(84, num_classes)
        self.pool = arch.pooling(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.conv1(x))
        x = self.pool(self.conv2(x))
        x = torch.flatten(x, 1)
        return self.fc3(self.fc2(self.fc1(x)))


class LeNet5D2l(LeNet5):
    """d2l.ai's (classic edition) LeNet of its BN chapter: sigmoid, 2x2 average pooling, xavier-uniform
    init (the model's default Arch), and a first conv *without* padding (FC 256-120-84-10), norm
    after every conv and hidden FC. With norm "none" it is d2l's LeNet chapter network instead,
    whose first conv has padding 2 (FC 400-120-84-10): the network d2l's no-BN baseline trains.
    """

    DEFAULT_ARCH = Arch(activation="sigmoid", pool="avg", init="xavier")

    def __init__(self, norm: str, num_classes: int = 10, in_channels: int = 1, image_size: int = 28,
                 arch: Arch = DEFAULT_ARCH, **norm_kwargs):
        super().__init__(norm, num_classes, in_channels, image_size, arch, first_padding=2 if norm == "none" else 0,
                         **norm_kwargs)


class MLPIoffe(NormModel):
    """Ioffe & Szegedy 2015's MNIST network (section 4.1): 3 fully connected hidden layers of 100
    sigmoid units, norm before each nonlinearity, a 10-way output; small Gaussian init (init=gaussian,
    std 0.01, the model's default Arch). Images are flattened (28x28 -> 784)."""

    DEFAULT_ARCH = Arch(activation="sigmoid", pool=None, init="gaussian")
    HIDDEN = 100

    def __init__(self, norm: str, num_classes: int = 10, in_channels: int = 1, image_size: int = 28,
                 arch: Arch = DEFAULT_ARCH, **norm_kwargs):
        super().__init__()
        self.input_size = image_size
        width = in_channels * image_size * image_size
        self.fc1 = fc_block(width, self.HIDDEN, norm, norm_kwargs, arch=arch)
        self.fc2 = fc_block(self.HIDDEN, self.HIDDEN, norm, norm_kwargs, arch=arch)
        self.fc3 = fc_block(self.HIDDEN, self.HIDDEN, norm, norm_kwargs, arch=arch)
        self.fc4 = nn.Linear(self.HIDDEN, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc4(self.fc3(self.fc2(self.fc1(torch.flatten(x, 1)))))


class _AlexNetLayout(NormModel):
    """The forward shared by both AlexNets: conv1-pool, conv2-pool, conv3-5-pool, fc1-fc3."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.conv1(x))
        x = self.pool2(self.conv2(x))
        x = self.pool5(self.conv5(self.conv4(self.conv3(x))))
        x = torch.flatten(x, 1)
        return self.fc3(self.fc2(self.fc1(x)))


class AlexNet(_AlexNetLayout):
    """d2l's AlexNet for 224x224 inputs: convs 96@11 s4, 256@5, 384@3, 384@3, 256@3 with three
    3x3/2 max-pools, then FC 6400-4096-4096-num_classes; norm after all 5 convs and both hidden FCs.

    dropout=None applies the reference rule (0.5 after each hidden FC without norm, none with it).
    """

    def __init__(self, norm: str, num_classes: int = 100, in_channels: int = 3,
                 dropout: float | None = None, arch: Arch = Arch(), **norm_kwargs):
        super().__init__()
        p = default_dropout(norm) if dropout is None else dropout
        a, kw = arch, norm_kwargs
        self.input_size = 224
        self.conv1 = conv_block(in_channels, 96, 11, norm, kw, stride=4, padding=1, arch=a)  # 54x54
        self.pool1 = a.pooling(3, stride=2)                                                   # 26x26
        self.conv2 = conv_block(96, 256, 5, norm, kw, padding=2, arch=a)
        self.pool2 = a.pooling(3, stride=2)                                                   # 12x12
        self.conv3 = conv_block(256, 384, 3, norm, kw, padding=1, arch=a)
        self.conv4 = conv_block(384, 384, 3, norm, kw, padding=1, arch=a)
        self.conv5 = conv_block(384, 256, 3, norm, kw, padding=1, arch=a)
        self.pool5 = a.pooling(3, stride=2)                                                   # 5x5
        self.fc1 = fc_block(256 * 5 * 5, 4096, norm, kw, dropout=p, arch=a)
        self.fc2 = fc_block(4096, 4096, norm, kw, dropout=p, arch=a)
        self.fc3 = nn.Linear(4096, num_classes)


class AlexNetCifar(_AlexNetLayout):
    """AlexNet's shape scaled to 32x32 inputs: 3x3 convs 32, 96, 192, 128, 128 (padding 1) with
    overlapping 3x3/2 max-pools after conv1, conv2 and conv5 (32 -> 16 -> 8 -> 4), then
    FC 2048-512-512-num_classes; norm placement and dropout rule as in AlexNet.

    1.93M parameters and 0.044 GMAC per image (AlexNet at 224x224: 47.2M and 1.0 GMAC). Width is
    half of the obvious 64-192-384-256-256/1024 variant, which was 3.3x slower per step on the
    2-core CPU (2.7 s vs 0.8 s per batch of 256, i.e. ~9 vs ~2.6 min per CIFAR-100 epoch).
    """

    def __init__(self, norm: str, num_classes: int = 100, in_channels: int = 3,
                 dropout: float | None = None, arch: Arch = Arch(), **norm_kwargs):
        super().__init__()
        p = default_dropout(norm) if dropout is None else dropout
        a, kw = arch, norm_kwargs
        self.input_size = 32
        self.conv1 = conv_block(in_channels, 32, 3, norm, kw, padding=1, arch=a)
        self.pool1 = a.pooling(3, stride=2, padding=1)                                    # 16x16
        self.conv2 = conv_block(32, 96, 3, norm, kw, padding=1, arch=a)
        self.pool2 = a.pooling(3, stride=2, padding=1)                                    # 8x8
        self.conv3 = conv_block(96, 192, 3, norm, kw, padding=1, arch=a)
        self.conv4 = conv_block(192, 128, 3, norm, kw, padding=1, arch=a)
        self.conv5 = conv_block(128, 128, 3, norm, kw, padding=1, arch=a)
        self.pool5 = a.pooling(3, stride=2, padding=1)                                    # 4x4
        self.fc1 = fc_block(128 * 4 * 4, 512, norm, kw, dropout=p, arch=a)
        self.fc2 = fc_block(512, 512, norm, kw, dropout=p, arch=a)
        self.fc3 = nn.Linear(512, num_classes)


MODELS: dict[str, type[NormModel]] = {
    "lenet5": LeNet5,
    "lenet5_d2l": LeNet5D2l,
    "mlp_ioffe": MLPIoffe,
    "alexnet": AlexNet,
    "alexnet_cifar": AlexNetCifar,
}
WITH_DROPOUT = ("alexnet", "alexnet_cifar")  # the networks with dropout layers (model.dropout)


def default_arch(name: str) -> Arch:
    """The architecture a network has when no knob is given (conf/model/<name>.yaml states the same)."""
    return getattr(MODELS[name], "DEFAULT_ARCH", Arch())


def check_arch(name: str, arch: Arch) -> None:
    """Reject knob values a network cannot take, with one line naming the key."""
    if arch.activation not in ACTIVATIONS:
        raise BnexpError(f"model.activation must be one of {', '.join(ACTIVATIONS)}, got {arch.activation!r}")
    if arch.norm_position not in NORM_POSITIONS:
        raise BnexpError(f"model.norm_position must be one of {', '.join(NORM_POSITIONS)}, got {arch.norm_position!r}")
    if arch.init not in INITS:
        raise BnexpError(f"model.init must be one of {', '.join(INITS)}, got {arch.init!r}")
    pooled = default_arch(name).pool is not None
    if pooled and arch.pool not in POOLS:
        raise BnexpError(f"model.pool must be one of {', '.join(POOLS)} for {name}, got {arch.pool!r}")
    if not pooled and arch.pool is not None:
        raise BnexpError(f"{name} has no pooling layers; set model.pool=null (got {arch.pool!r})")


def build_model(name: str, norm: str, num_classes: int, in_channels: int, image_size: int,
                dropout: float | None = None, arch: Arch | None = None, **norm_kwargs) -> NormModel:
    """The model `name` for data with `image_size`x`image_size` images; check `.input_size` for the
    size it wants (the LeNets and the MLP take the data's native size, the AlexNets resize to a fixed
    one). `arch` None = the network's default architecture; the init is applied here."""
    if name not in MODELS:
        raise BnexpError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    if dropout is not None and not 0.0 <= dropout < 1.0:
        raise BnexpError(f"dropout must be in [0, 1), got {dropout}")
    arch = default_arch(name) if arch is None else arch
    check_arch(name, arch)
    try:
        if name not in WITH_DROPOUT:
            if dropout:
                raise BnexpError(f"{name} has no dropout layers; leave dropout unset")
            model = MODELS[name](norm, num_classes, in_channels, image_size=image_size, arch=arch, **norm_kwargs)
        else:
            model = MODELS[name](norm, num_classes, in_channels, dropout=dropout, arch=arch, **norm_kwargs)
    except ValueError as e:  # make_norm's unknown kind / bad dims
        raise BnexpError(f"model {name}: {e}") from e
    init_weights(model, arch.init)
    return model
