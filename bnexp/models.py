"""The networks of the reference BN experiments, with a norm layer wherever the BN arm has one.

LeNet5 is the FashionMNIST network of moon-hotel/DeepLearningWithMe 07_BN (DESIGN.md section 2);
AlexNet is d2l.ai's 224x224 AlexNet as trained on CIFAR-100 in the same folder; AlexNetCifar is a
32x32 AlexNet-shaped network of our own, cheap enough for CPU runs. Every norm position is a
`make_norm(kind, ...)` layer, so one word switches the whole network between the in-repo BN ("bn"),
PyTorch's BN ("torch") and no normalisation ("none": an nn.Identity placeholder, kept so that hooks
on it still see the pre-activation).

Layers keep their bias even when a BN follows (the bias is then redundant) because the reference
code does, and the parameter counts in DESIGN.md's references are with bias.
"""

from collections import OrderedDict

import torch
import torch.nn as nn

from bnexp.errors import BnexpError
from bnexp.nn import make_norm


def conv_block(in_channels: int, out_channels: int, kernel_size: int, norm: str, norm_kwargs: dict,
               stride: int = 1, padding: int = 0) -> nn.Sequential:
    """Conv2d -> norm -> ReLU, with children named conv / norm / relu."""
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding),
        norm=make_norm(norm, out_channels, 2, **norm_kwargs),
        relu=nn.ReLU(),
    ))


def fc_block(in_features: int, out_features: int, norm: str, norm_kwargs: dict,
             dropout: float = 0.0) -> nn.Sequential:
    """Linear -> norm -> ReLU [-> Dropout], with children named linear / norm / relu / dropout."""
    layers = OrderedDict(
        linear=nn.Linear(in_features, out_features),
        norm=make_norm(norm, out_features, 1, **norm_kwargs),
        relu=nn.ReLU(),
    )
    if dropout > 0:
        layers["dropout"] = nn.Dropout(dropout)
    return nn.Sequential(layers)


def default_dropout(norm: str) -> float:
    """The reference rule: dropout 0.5 without normalisation, none with it (BN regularises)."""
    return 0.5 if norm == "none" else 0.0


class NormModel(nn.Module):
    """A network whose norm layers are the children named `norm` of its blocks."""

    input_size: int  # spatial size (H = W) the network expects; the data layer resizes to it

    def norm_layers(self) -> list[tuple[str, nn.Module]]:
        """(name, module) of every norm position in forward order, e.g. ("conv1.norm", BatchNorm2d)."""
        # named_modules follows registration order, and every model registers its blocks in forward order.
        return [(name, m) for name, m in self.named_modules() if name.rsplit(".", 1)[-1] == "norm"]


class LeNet5(NormModel):
    """LeNet5: conv 6@5x5 pad 2, pool, conv 16@5x5, pool, FC 400-120-84-10, norm after each hidden layer."""

    def __init__(self, norm: str, num_classes: int = 10, in_channels: int = 1, image_size: int = 28,
                 **norm_kwargs):
        super().__init__()
        side = (image_size // 2 - 4) // 2  # after conv1 (same size), pool, conv2 (-4), pool
        if side < 1:
            raise BnexpError(f"lenet5 needs images of at least 12x12, got {image_size}x{image_size}")
        self.input_size = image_size
        self.conv1 = conv_block(in_channels, 6, 5, norm, norm_kwargs, padding=2)
        self.conv2 = conv_block(6, 16, 5, norm, norm_kwargs)
        self.fc1 = fc_block(16 * side * side, 120, norm, norm_kwargs)  # 400 for 28x28 inputs
        self.fc2 = fc_block(120, 84, norm, norm_kwargs)
        self.fc3 = nn.Linear(84, num_classes)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.conv1(x))
        x = self.pool(self.conv2(x))
        x = torch.flatten(x, 1)
        return self.fc3(self.fc2(self.fc1(x)))


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
                 dropout: float | None = None, **norm_kwargs):
        super().__init__()
        p = default_dropout(norm) if dropout is None else dropout
        self.input_size = 224
        self.conv1 = conv_block(in_channels, 96, 11, norm, norm_kwargs, stride=4, padding=1)  # 54x54
        self.pool1 = nn.MaxPool2d(3, stride=2)                                               # 26x26
        self.conv2 = conv_block(96, 256, 5, norm, norm_kwargs, padding=2)
        self.pool2 = nn.MaxPool2d(3, stride=2)                                               # 12x12
        self.conv3 = conv_block(256, 384, 3, norm, norm_kwargs, padding=1)
        self.conv4 = conv_block(384, 384, 3, norm, norm_kwargs, padding=1)
        self.conv5 = conv_block(384, 256, 3, norm, norm_kwargs, padding=1)
        self.pool5 = nn.MaxPool2d(3, stride=2)                                               # 5x5
        self.fc1 = fc_block(256 * 5 * 5, 4096, norm, norm_kwargs, dropout=p)
        self.fc2 = fc_block(4096, 4096, norm, norm_kwargs, dropout=p)
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
                 dropout: float | None = None, **norm_kwargs):
        super().__init__()
        p = default_dropout(norm) if dropout is None else dropout
        self.input_size = 32
        self.conv1 = conv_block(in_channels, 32, 3, norm, norm_kwargs, padding=1)
        self.pool1 = nn.MaxPool2d(3, stride=2, padding=1)                                    # 16x16
        self.conv2 = conv_block(32, 96, 3, norm, norm_kwargs, padding=1)
        self.pool2 = nn.MaxPool2d(3, stride=2, padding=1)                                    # 8x8
        self.conv3 = conv_block(96, 192, 3, norm, norm_kwargs, padding=1)
        self.conv4 = conv_block(192, 128, 3, norm, norm_kwargs, padding=1)
        self.conv5 = conv_block(128, 128, 3, norm, norm_kwargs, padding=1)
        self.pool5 = nn.MaxPool2d(3, stride=2, padding=1)                                    # 4x4
        self.fc1 = fc_block(128 * 4 * 4, 512, norm, norm_kwargs, dropout=p)
        self.fc2 = fc_block(512, 512, norm, norm_kwargs, dropout=p)
        self.fc3 = nn.Linear(512, num_classes)


MODELS: dict[str, type[NormModel]] = {
    "lenet5": LeNet5,
    "alexnet": AlexNet,
    "alexnet_cifar": AlexNetCifar,
}


def build_model(name: str, norm: str, num_classes: int, in_channels: int, image_size: int,
                dropout: float | None = None, **norm_kwargs) -> NormModel:
    """The model `name` for data with `image_size`x`image_size` images; check `.input_size` for the
    size it wants (LeNet5 takes the data's native size, the AlexNets resize to a fixed one)."""
    if name not in MODELS:
        raise BnexpError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    if dropout is not None and not 0.0 <= dropout < 1.0:
        raise BnexpError(f"dropout must be in [0, 1), got {dropout}")
    try:
        if name == "lenet5":
            if dropout:
                raise BnexpError("lenet5 has no dropout layers; leave dropout unset")
            return LeNet5(norm, num_classes, in_channels, image_size=image_size, **norm_kwargs)
        return MODELS[name](norm, num_classes, in_channels, dropout=dropout, **norm_kwargs)
    except ValueError as e:  # make_norm's unknown kind / bad dims
        raise BnexpError(f"model {name}: {e}") from e
