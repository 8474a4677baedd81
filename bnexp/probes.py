"""Activation probes: what each norm layer sees and emits, on one fixed batch (BN claim 2).

The probe shows the distributions as they are *during training*: BN normalises the probe batch
with its own batch statistics (train mode), which is what the next layer sees at a training
step. It still has no side effects, so a probed run trains exactly like an unprobed one:
running statistics and num_batches_tracked are restored afterwards, dropout is held in eval
mode (it would otherwise draw random numbers) and no gradient is taken.
With BN off the norm position is an nn.Identity, whose input is the pre-activation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn

from .layout import PROBE_POINTS, activation_key

MAX_SAMPLES = 20_000  # values kept per (epoch, layer, where) in activations.npz


@dataclass(frozen=True)
class ProbeEpochs:
    """The probe schedule as a predicate (`epoch in schedule`) and a lazy ascending iterator.

    Constant memory whatever `epochs` is (a set of every probe epoch of epochs=10**20 took 23 GB).
    """
    epochs: int
    every: int

    def __contains__(self, epoch) -> bool:
        if not isinstance(epoch, int) or not 0 <= epoch <= self.epochs:
            return False
        return epoch in (0, 1, self.epochs) or (self.every > 0 and epoch % self.every == 0)

    def __iter__(self) -> Iterator[int]:
        epoch = 0
        while epoch <= self.epochs:
            yield epoch
            # the next candidate: 1, the next multiple of `every`, or the last epoch, whichever comes first
            nxt = [self.epochs]
            if epoch < 1:
                nxt.append(1)
            if self.every > 0:
                nxt.append((epoch // self.every + 1) * self.every)
            epoch = max(min(nxt), epoch + 1)


def probe_epochs(epochs: int, every: int) -> ProbeEpochs:
    """Epoch 0 (initialisation), 1, every `every`-th, and the last: `epoch in probe_epochs(...)`."""
    return ProbeEpochs(epochs, every)


def _sample(t: torch.Tensor) -> np.ndarray:
    """A deterministic, evenly strided subsample of a flattened tensor."""
    flat = t.detach().reshape(-1).float()
    if flat.numel() > MAX_SAMPLES:
        idx = torch.linspace(0, flat.numel() - 1, MAX_SAMPLES, device=flat.device).long()
        flat = flat[idx]
    return flat.cpu().numpy()


@torch.no_grad()
def capture(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Run `x` through `model` with batch statistics; return {layer: (input, output)} of every norm layer."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    layers = model.norm_layers()
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for _, m in layers]
    hooks = []
    for name, module in layers:
        def hook(_m, inputs, output, name=name):
            seen[name] = (inputs[0].detach(), output.detach())
        hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    try:
        model(x)
    finally:
        for (_, module), state in zip(layers, saved):
            module.load_state_dict(state)
        model.train(was_training)
        for h in hooks:
            h.remove()
    return seen


def record(model: nn.Module, x: torch.Tensor, epoch: int, step: int, samples: dict, tb=None) -> None:
    """Add epoch `epoch`'s activations to `samples` (npz keys) and to TensorBoard histograms.

    activations.npz keeps `input` and `output` for every layer (the report reads both). TensorBoard
    gets `probe/<layer>/input` and `/output`, except where the norm position is an
    nn.Identity (no BN): there both are the same tensor, shown once as `/pre-activation`.
    (`probe/` sorts after `batch/` and `epoch/`, so TensorBoard's TIME SERIES opens on the curves.)
    """
    identity = {name for name, m in model.norm_layers() if isinstance(m, nn.Identity)}
    for layer, (inp, out) in capture(model, x).items():
        for where, t in zip(PROBE_POINTS, (inp, out)):
            samples[activation_key(epoch, layer, where)] = _sample(t)
        if tb is not None:
            shown = (("pre-activation", inp),) if layer in identity else (("input", inp), ("output", out))
            for where, t in shown:
                tb.histogram(f"probe/{layer}/{where}", t, step)
