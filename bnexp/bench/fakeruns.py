"""Fake run directories without training, for `bnexp bench report` and the report's tests.

A fake run is a real run directory in everything but its numbers: its config is composed by
`config.compose` (through `config.Composer`), it lives under the real run id, and its files are
written by `tracking.RunDir`'s writers from a `tracking.RunState`, run.json by `tracking.run_info`. Only the values are invented: the metric curves decay
smoothly from chance level to the requested final values, so every figure has something to draw.
A run at chance level is a dead one unless `alive=True`: like a real dead run, its last probe has
a layer (conv1) whose ReLU inputs are all <= 0 (bnexp.outcome's evidence).

    fake_run(results_dir, lr=0.5, bn="off", seed=1, train_loss=2.3026)       # one dead run
    fake_run(results_dir, config={"model.name": "alexnet_cifar", "data.name": "cifar100"})
"""
from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .. import config as C
from .. import layout as L
from ..tracking import Attempt, RunDir, RunState, run_info

# Config keys a test names that are chosen by a config group: `model.name=alexnet` is `model=alexnet`.
GROUP_KEYS = {f"{g}.{k}": g for g, k in (("model", "name"), ("data", "name"), ("norm", "kind"), ("optim", "name"))}
# Defaults of a fake run where the config's own would not do: no device to pick, no progress bar.
FAKE_DEFAULTS = {"device": "cpu", "progress": False}
# The norm layers activations.npz names, per model (a fake model's: LeNet5's for the others).
LAYERS = {"lenet5": ("conv1.norm", "conv2.norm", "fc1.norm", "fc2.norm"),
          "alexnet": (*(f"conv{i}.norm" for i in range(1, 6)), "fc1.norm", "fc2.norm")}
LAYERS["alexnet_cifar"] = LAYERS["alexnet"]
# The code a fake run claims to come from (tracking.Attempt.begin would ask git and import torch).
FAKE_ATTEMPT = Attempt("2025-01-01T00:00:00+00:00", {"python": "3.12", "torch": "2.14.1", "torchvision": "0.29.1",
                                                      "bnexp": "0.1.0"}, "0" * 40)


@lru_cache(maxsize=1)
def _composer() -> C.Composer:
    return C.Composer()  # composes each set of config groups once: a fake run costs what its writes cost


@lru_cache(maxsize=1)
def _num_classes() -> dict[str, int]:
    from ..reference import load_reference

    return load_reference().num_classes


def overrides(config: dict[str, Any] | None = None, **keys: Any) -> list[str]:
    """Dotted (`{"model.name": "alexnet"}`) and plain (`lr=0.5`) keys as the overrides `bnexp train` takes."""
    over = {**FAKE_DEFAULTS, **(config or {}), **keys}
    return [f"{GROUP_KEYS.get(k, k)}={C.override_text(v)}" for k, v in over.items()]


def compose(config: dict[str, Any] | None = None, **keys: Any):
    """The config `bnexp train <overrides>` would run."""
    return _composer()(overrides(config, **keys))


def _curve(start: float, end: float, n: int, k: float = 3.0) -> np.ndarray:
    """n values decaying from near `start` (epoch 1) to exactly `end` (epoch n)."""
    t = np.arange(1, n + 1) / n
    return end + (start - end) * (np.exp(-k * t) - math.exp(-k)) / (1 - math.exp(-k))


def fake_run(root: Path, /, config: dict[str, Any] | None = None, *, status: str = L.COMPLETED,
             train_loss: float = 0.3, train_acc: float | None = None, test_loss: float = 0.35, test_acc: float = 0.88,
             steps_per_epoch: int = 10, epochs_done: int | None = None, diverged_epoch: int | None = None,
             activations: bool = True, act_samples: int = 2000, alive: bool | None = None, **keys: Any) -> Path:
    """Write one run directory under root/runs/ and return it. Config keys come as `config`
    (dotted) or keywords (`lr=0.5`, even `results_dir=`, which defaults to `root`). `epochs_done`
    < epochs for running/failed runs; `diverged_epoch` makes the loss non-finite from that epoch on
    (status diverged)."""
    cfg = compose(config, **{"results_dir": str(root), **keys})
    rd = RunDir(Path(root), C.run_id(cfg))
    rd.path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(int(rd.run_id[-8:], 16))
    E, n_classes = cfg.epochs, _num_classes().get(cfg.data.name, 10)
    at_chance = abs(train_loss - math.log(n_classes)) < 0.1
    if train_acc is None:       # chance-level accuracy for a chance-level loss (a dead run), else 0.9
        train_acc = 1 / n_classes if at_chance else 0.9
    if diverged_epoch is not None:
        status = L.DIVERGED
    done = diverged_epoch - 1 if diverged_epoch is not None else (E if epochs_done is None else epochs_done)

    chance = {"loss": math.log(n_classes), "acc": 1 / n_classes}
    curves = {"epoch": np.arange(1, E + 1), "lr": np.full(E, float(cfg.lr)), "seconds": np.full(E, 1.5)}
    for name, end in zip(L.FINAL_METRICS, (train_loss, train_acc, test_loss, test_acc)):
        curves[name] = _curve(chance[name.split("_")[1]], end, E)
    rows = [{c: curves[c][i].item() for c in L.METRIC_COLUMNS} for i in range(done)]

    n_epochs = done + (diverged_epoch is not None)
    step = np.arange(1, n_epochs * steps_per_epoch + 1)
    loss = np.interp(step / steps_per_epoch, curves["epoch"], curves["train_loss"]) * (
        1 + 0.05 * rng.standard_normal(len(step)))
    if diverged_epoch is not None and len(step):
        loss[-steps_per_epoch // 2:] = np.nan
    state = RunState(epoch=done, metrics=rows, losses=loss.tolist(), steps_per_epoch=[steps_per_epoch] * n_epochs,
                     elapsed=2.0 * done, diverged_at={"epoch": diverged_epoch, "step": len(step)} if diverged_epoch else None)
    rd.write_config(cfg)
    rd.write_records(cfg, state)  # metrics.csv, steps.csv (and empty evals/measures/precise files where asked for)
    rd.write_info(run_info(rd.run_id, cfg, status, state, FAKE_ATTEMPT, cfg.device, execution={},
                           error="RuntimeError: fabricated failure" if status == L.FAILED else None,
                           ended=None if status == L.RUNNING else "2025-01-01T00:10:00+00:00"))
    if activations and done:
        dead = (at_chance and train_acc <= 1 / n_classes + 0.05) if alive is None else not alive  # one class
        rd.write_activations(_activations(cfg, sorted({0, 1, done}), act_samples, rng, dead))  # 0: at init
    return rd.path


def _activations(cfg, epochs: list[int], n: int, rng, dead: bool = False) -> dict[str, np.ndarray]:
    """BN on: input drifts, output ~ N(0,1); BN off: input == output, drifting with the epoch. `dead`:
    in the last epoch the first layer's output (the ReLU's input) is all <= 0, as in a dead real run."""
    arrays = {}
    for i, layer in enumerate(LAYERS.get(cfg.model.name, LAYERS["lenet5"])):
        for e in epochs:
            x = (rng.standard_normal(n) * (1 + 0.3 * i + 0.1 * e) + 0.2 * e).astype(np.float32)
            out = rng.standard_normal(n).astype(np.float32) if cfg.bn == "on" else x
            if dead and i == 0 and e == epochs[-1]:
                out = -np.abs(out) - 0.01
                x = x if cfg.bn == "on" else out
            arrays[L.activation_key(e, layer, "input")] = x
            arrays[L.activation_key(e, layer, "output")] = out
    return arrays
