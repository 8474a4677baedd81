"""Start-up checks: what `bnexp train` and `bnexp sweep` refuse before any run directory is touched.

`config.compose` has checked each config on its own (keys, types, limits, the BN batch rules);
`check` checks it against this machine and the data: the device exists (a GPU for each of nproc
processes on CUDA), CUDA graphs are possible,
the data set is there and holds enough samples for train_size, test_size and batch_size, and the
model's norm layers accept their inputs. `train.run` calls it before it prepares a run, and a sweep
calls it for every point that will train before the first one starts (sweep.check_inputs).

It is cheap enough for a sweep of many runs: the samples are counted from the data files' headers
(data.split_size), once per data source for the whole sweep, and each distinct model is built
once, on the meta device (no memory, no initialisation).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import data, distributed, train as T
from .errors import BnexpError


@dataclass
class Seen:
    """What earlier checks established (a sweep passes one for all of its points): the samples of each
    data source, and the model configurations that were built."""
    sizes: dict[tuple, tuple[int, int]] = field(default_factory=dict)  # (data set, data_dir, verify) -> (train, test)
    models: set[tuple] = field(default_factory=set)


def check(cfg, seen: Seen | None = None) -> None:
    """Raise BnexpError (one line) if the run `cfg` describes cannot start here."""
    seen = Seen() if seen is None else seen
    device = T.resolve_device(cfg.device)
    T.use_graphs(cfg, device)
    distributed.check_gpus(cfg.nproc, cfg.device, device)
    check_sizes(cfg, *split_sizes(cfg, seen))
    model = (cfg.data.name, cfg.norm.kind, str(cfg.model), str(T.norm_kwargs(cfg)))  # what T.build reads
    if model not in seen.models:
        spec = data.DATASETS[cfg.data.name]
        with torch.device("meta"):  # the model's norm layers accept their inputs (e.g. norm=in on an FC layer)
            T.build(cfg, spec.num_classes, spec.in_channels, spec.image_size)
        seen.models.add(model)


def split_sizes(cfg, seen: Seen) -> tuple[int, int]:
    """The training and test samples of the run's data set, counted once per data source."""
    key = (cfg.data.name, cfg.data_dir, cfg.data.verify)
    if key not in seen.sizes:
        root = data.data_root(cfg.data_dir, cfg.data.name)
        seen.sizes[key] = tuple(data.split_size(cfg.data.name, root, is_train, verify=cfg.data.verify)
                                for is_train in (True, False))
    return seen.sizes[key]


def check_sizes(cfg, n_train: int, n_test: int) -> None:
    """train_size / test_size within the data, and a batch that fits the training set."""
    for key, size, n, what in (("train_size", cfg.train_size, n_train, "training"),
                               ("test_size", cfg.test_size, n_test, "test")):
        if size is not None and size > n:
            raise BnexpError(f"{key}={size} exceeds the {n} {what} samples of this data set; "
                             f"lower {key} or leave it unset")
    n = cfg.train_size or n_train
    if cfg.batch_size > n:
        raise BnexpError(f"batch_size={cfg.batch_size} is larger than the training set ({n} samples); "
                         f"lower batch_size or raise train_size")
    if cfg.norm.kind != "none" and min(cfg.test_size or n_test, n_test) < 2:  # test_size=1 fails in config
        raise BnexpError(f"the test set has {n_test} sample: the activation probe of a BN model needs at least 2 "
                         f"(batch statistics); use other data or bn=off")
