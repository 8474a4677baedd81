"""The architecture knobs every network takes (config keys model.activation, model.pool,
model.norm_position, model.init) and their choices, torch-free: config checks a run's values
against them without importing torch, and `bnexp.models` builds the layers they name."""

ACTIVATIONS = {"relu": "ReLU", "sigmoid": "Sigmoid", "tanh": "Tanh"}  # choice -> its torch.nn module
POOLS = {"max": "MaxPool2d", "avg": "AvgPool2d"}  # choice -> its torch.nn module; null: a network without pooling
NORM_POSITIONS = ("before", "after")  # the norm before the nonlinearity (the BN paper) or after it
INITS = ("default", "xavier", "gaussian")  # PyTorch's, xavier-uniform (d2l), N(0, 0.01^2) (Ioffe & Szegedy)
