"""Precise BN (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm", section 3): test accuracy with
population statistics recomputed at evaluation time, beside the usual running (EMA) statistics.

A BN layer in eval mode normalises with its running statistics, an exponential moving average of
the batch statistics of past training steps, taken while the weights were still moving. Wu & Johnson
show that this estimate of the population statistics can be poor (small batches, large momentum,
the last steps' weights differing from earlier ones) and propose to recompute them for the final
weights: K forward passes over training batches in train mode, without gradients, averaging the
batch statistics with equal weights (the cumulative average, momentum=None), before evaluating.

`precise_evaluate` does that on a copy of the model, so the run's own layers, running statistics,
RNG streams and training are untouched: a run with `precise_bn=K` trains exactly like one without.
The K batches are the first K * batch_size images of a permutation of the training set seeded by
the run's seed alone (the same images at every epoch, independent of the training order), so the
numbers depend on the weights only. Batch renormalization recomputes with r = 1 and d = 0 (its own
warm-up: BN's forward on the batch statistics), which its running statistics do not enter. Dropout is held in eval mode during the passes (as the activation
probes do); the noise of noisy BN is added after normalising and does not enter the statistics.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from . import data, engine

SEED_OFFSET = 7_919  # the permutation's seed is seed * 1_000_003 + SEED_OFFSET, apart from every epoch's order


def statistic_layers(model: nn.Module) -> list[nn.Module]:
    """The layers whose eval-mode output depends on running statistics (norm kinds with batch statistics)."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]


def precise_batches(n_train: int, batch_size: int, k: int, seed: int) -> list[torch.Tensor]:
    """The index batches of the recomputation: K batches (fewer if the training set is smaller)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + SEED_OFFSET)
    order = torch.randperm(n_train, generator=gen)
    return [order[i:i + batch_size] for i in range(0, min(k * batch_size, n_train), batch_size)
            if len(order[i:i + batch_size]) > 1]  # one sample has no batch statistics


@torch.no_grad()
def recompute(model: nn.Module, train: data.Split, batches: list[torch.Tensor],
              opts: engine.ExecOptions = engine.ExecOptions()) -> nn.Module:
    """A copy of `model` whose running statistics are the equal-weight average over the training
    batches `batches` (index tensors, precise_batches')."""
    twin = copy.deepcopy(model)
    layers = statistic_layers(twin)
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: every batch counts 1 / K
        if hasattr(m, "r_max"):  # batch renorm: r = 1, d = 0 (its warm-up), i.e. BN's forward on batch statistics
            m.r_max, m.d_max = 1.0, 0.0
    twin.train()
    for m in twin.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    device = train.x.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for idx in batches:
            idx = idx.to(device)
            xb = engine.model_input(train.x[idx], twin.input_size, opts.channels_last)
            with engine.autocast(device, opts.precision):
                twin(xb)
    twin.eval()
    return twin
