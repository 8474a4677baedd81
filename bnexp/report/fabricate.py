"""Fabricated run directories, exactly per results/README.md, for tests and the report benchmark.

`fake_run(results_dir, lr=0.5, bn="off", seed=1, train_loss=2.3026)` writes config.yaml,
run.json, metrics.csv, steps.csv and activations.npz without training: the metric curves decay
smoothly from chance level to the requested final values, so every figure has something to draw.
With `measure=[...]` (instrument names) it writes measures.csv too, in bnexp.measures_format.
A run fabricated at chance level is a dead one unless `alive=True`: like the real dead runs, its
last probe has a layer (conv1) whose ReLU inputs are all <= 0 (bnexp.outcome's evidence).
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bnexp import measures_format as MF

# The resolved defaults of bnexp/conf/config.yaml (LeNet5 / FashionMNIST / in-repo BN / plain SGD).
BASE_CONFIG: dict[str, Any] = {
    "model": {"name": "lenet5", "dropout": None},
    "data": {"name": "fashion_mnist", "verify": True},
    "norm": {"kind": "bn", "eps": 1e-05, "momentum": 0.1, "biased_running_var": False},
    "optim": {"name": "sgd", "momentum": 0.0, "weight_decay": 0.0},
    "bn": "on", "lr": 0.1, "batch_size": 512, "epochs": 20, "seed": 0, "device": "cpu",
    "data_dir": None, "results_dir": "results", "train_size": None, "test_size": None,
    "drop_last": False, "probe_every": 5, "progress": False,
}
LAYERS = {"lenet5": ["conv1.norm", "conv2.norm", "fc1.norm", "fc2.norm"],
          "alexnet": [f"conv{i}.norm" for i in range(1, 6)] + ["fc1.norm", "fc2.norm"]}
LAYERS["alexnet_cifar"] = LAYERS["alexnet"]
# LeNet5's module names (bnexp.models): the layers measures.csv names per weight layer / nonlinearity
WEIGHT_LAYERS = ("conv1.conv", "conv2.conv", "fc1.linear", "fc2.linear", "fc3")
ACT_LAYERS = ("conv1.act", "conv2.act", "fc1.act", "fc2.act")
NUM_CLASSES = {"fashion_mnist": 10, "cifar100": 100}
WHERE_ONLY = ("seed", "device", "data_dir", "results_dir", "progress", "probe_every")


def make_config(config: dict[str, Any] | None = None, **keys: Any) -> dict[str, Any]:
    """BASE_CONFIG with dotted (`{"model.name": "alexnet"}`) and plain (`lr=0.5`) overrides,
    `bn` and `norm.kind` reconciled the way the real config does (bn on iff norm.kind != none)."""
    cfg = copy.deepcopy(BASE_CONFIG)
    over = {**(config or {}), **keys}
    for dotted, value in over.items():
        *path, last = dotted.split(".")
        node = cfg
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    if "bn" in over and "norm.kind" not in over:
        cfg["norm"]["kind"] = "bn" if cfg["bn"] == "on" else "none"
    cfg["bn"] = "off" if cfg["norm"]["kind"] == "none" else "on"
    return cfg


def run_id(cfg: dict[str, Any]) -> str:
    """Readable prefix + hash of every key except the where/how ones (results/README.md)."""
    ident = {k: v for k, v in cfg.items() if k not in WHERE_ONLY}
    ident["seed"] = cfg["seed"]
    digest = hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return (f"{cfg['model']['name']}-{cfg['data']['name']}-{cfg['norm']['kind']}-{cfg['optim']['name']}"
            f"-lr{cfg['lr']:g}-bs{cfg['batch_size']}-e{cfg['epochs']}-s{cfg['seed']}-{digest}")


def _curve(start: float, end: float, n: int, k: float = 3.0) -> np.ndarray:
    """n values decaying from near `start` (epoch 1) to exactly `end` (epoch n)."""
    t = np.arange(1, n + 1) / n
    return end + (start - end) * (np.exp(-k * t) - math.exp(-k)) / (1 - math.exp(-k))


def fake_run(root: Path, /, config: dict[str, Any] | None = None, *, status: str = "completed",
             train_loss: float = 0.3, train_acc: float | None = None, test_loss: float = 0.35, test_acc: float = 0.88,
             steps_per_epoch: int = 10, epochs_done: int | None = None, diverged_epoch: int | None = None,
             activations: bool = True, act_samples: int = 2000, alive: bool | None = None, **keys: Any) -> Path:
    """Write one run directory under root/runs/ and return it. Config keys come as `config`
    (dotted) or keywords (`lr=0.5`, even `results_dir=`). `epochs_done` < epochs for running/failed runs;
    `diverged_epoch` makes the loss non-finite from that epoch on (status diverged)."""
    cfg = make_config(config, **keys)
    E, C = int(cfg["epochs"]), NUM_CLASSES.get(cfg["data"]["name"], 10)
    at_chance = abs(train_loss - math.log(C)) < 0.1
    if train_acc is None:       # chance-level accuracy for a chance-level loss (a dead run), else 0.9
        train_acc = 1 / C if at_chance else 0.9
    rng = np.random.default_rng(int(run_id(cfg)[-8:], 16))
    path = Path(root) / "runs" / run_id(cfg)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))

    if diverged_epoch is not None:
        status = "diverged"
    done = diverged_epoch - 1 if diverged_epoch is not None else (E if epochs_done is None else epochs_done)
    epochs = np.arange(1, E + 1)
    m = {"epoch": epochs, "train_loss": _curve(math.log(C), train_loss, E),
         "train_acc": _curve(1 / C, train_acc, E), "test_loss": _curve(math.log(C), test_loss, E),
         "test_acc": _curve(1 / C, test_acc, E), "lr": np.full(E, float(cfg["lr"])),
         "seconds": np.full(E, 1.5)}
    rows = [",".join(f"{m[c][i]:.6g}" for c in m) for i in range(done)]
    (path / "metrics.csv").write_text(",".join(m) + "\n" + "".join(r + "\n" for r in rows))

    n_steps = (done + (diverged_epoch is not None)) * steps_per_epoch
    step = np.arange(1, n_steps + 1)
    ep = (step - 1) // steps_per_epoch + 1
    loss = np.interp(step / steps_per_epoch, epochs, m["train_loss"]) * (1 + 0.05 * rng.standard_normal(n_steps))
    if diverged_epoch is not None and n_steps:
        loss[-steps_per_epoch // 2:] = np.nan
    lines = "".join(f"{s},{e},{v:.5g}\n" for s, e, v in zip(step, ep, loss))
    (path / "steps.csv").write_text("step,epoch,loss\n" + lines)

    final = None
    if done and status in ("completed", "running", "failed"):
        final = {k: float(m[k][done - 1]) for k in ("train_loss", "train_acc", "test_loss", "test_acc")}
    info = {
        "run_id": path.name, "status": status, "final": final, "epochs_completed": done,
        "diverged_at": {"epoch": diverged_epoch, "step": int(n_steps)} if diverged_epoch else None,
        "error": "RuntimeError: fabricated failure" if status == "failed" else None,
        "seed": cfg["seed"], "device": cfg["device"],
        "versions": {"python": "3.12", "torch": "2.14.1", "torchvision": "0.29.1", "bnexp": "0.1.0"},
        "git_commit": "0" * 40, "started": "2025-01-01T00:00:00Z",
        "ended": None if status == "running" else "2025-01-01T00:10:00Z",
        "seconds": {"train": 1.5 * done, "total": 2.0 * done},
    }
    (path / "run.json").write_text(json.dumps(info, indent=2))
    if cfg.get("measure") and n_steps:
        write_measures(path, cfg, n_steps, rng)
    if activations and done:
        dead = (at_chance and train_acc <= 1 / C + 0.05) if alive is None else not alive  # a dead net predicts one class
        _write_activations(path, cfg, sorted({0, 1, done}), act_samples, rng, dead)   # 0: the probe at init
    return path


def _write_activations(path: Path, cfg: dict, epochs: list[int], n: int, rng, dead: bool = False) -> None:
    """BN on: input drifts, output ~ N(0,1); BN off: input == output, drifting with the epoch. `dead`:
    in the last epoch the first layer's output (the ReLU's input) is all <= 0, as in a dead real run."""
    arrays = {}
    for i, layer in enumerate(LAYERS.get(cfg["model"]["name"], LAYERS["lenet5"])):
        for e in epochs:
            drift = 1 + 0.3 * i + 0.1 * e
            x = (rng.standard_normal(n) * drift + 0.2 * e).astype(np.float32)
            arrays[f"e{e}/{layer}/input"] = x
            if cfg["bn"] == "on":
                arrays[f"e{e}/{layer}/output"] = rng.standard_normal(n).astype(np.float32)
            else:
                arrays[f"e{e}/{layer}/output"] = x
            if dead and i == 0 and e == epochs[-1]:
                arrays[f"e{e}/{layer}/output"] = -np.abs(arrays[f"e{e}/{layer}/output"]) - 0.01
                if cfg["bn"] != "on":
                    arrays[f"e{e}/{layer}/input"] = arrays[f"e{e}/{layer}/output"]
    np.savez(path / "activations.npz", **arrays)


def write_measures(path: Path, cfg: dict, n_steps: int, rng) -> None:
    """measures.csv for the instruments in cfg["measure"], at step 0 and every measure_every steps:
    plausible shapes (BN: a narrower landscape band, a smaller beta), not measured numbers."""
    every, bn = int(cfg.get("measure_every") or 10), cfg["bn"] == "on"
    act = cfg["model"].get("activation", "relu")
    sat = ("saturated", "mean_derivative") if act in ("sigmoid", "tanh") else ("dead", "active")
    rows = []
    for step in range(0, n_steps + 1, every):
        t = step / max(n_steps, 1)
        loss = 0.3 + 2.0 * math.exp(-4 * t)
        spread = (0.2 if bn else 1.5) * (1 + 0.1 * rng.standard_normal())
        values = {("landscape", "model", "min"): loss * (1 - 0.1 * spread),
                  ("landscape", "model", "max"): loss * (1 + spread),
                  ("landscape", "model", "loss"): loss,
                  ("predictiveness", "model", "min"): 0.1 * spread,
                  ("predictiveness", "model", "max"): 2.0 * spread,
                  ("beta_smoothness", "model", "max"): 5.0 * spread}
        for i, layer in enumerate(WEIGHT_LAYERS):
            values |= {("ics", layer, "l2"): 0.0 if i == 0 else 0.05 * i * spread,
                       ("ics", layer, "cos"): 1.0 if i == 0 else 1 - 0.05 * i * spread,
                       ("weights", layer, "weight_norm"): 3.0 + t / (1 + 100 * cfg["optim"]["weight_decay"]),
                       ("weights", layer, "grad_norm"): 0.5 * spread}
            if bn and layer != WEIGHT_LAYERS[-1]:        # the last layer has no norm after it
                values[("weights", layer, "effective_step")] = cfg["lr"] * 0.5 * spread / values[
                    ("weights", layer, "weight_norm")]
        for i, layer in enumerate(ACT_LAYERS):
            frac = (0.05 if bn else 0.2 + 0.05 * i) * t
            values |= {("saturation", layer, sat[0]): frac, ("saturation", layer, sat[1]): 0.25 - 0.1 * frac}
        rows += [(step, *key, v) for key, v in values.items() if key[0] in cfg["measure"]]
    (path / MF.FILE_NAME).write_text(",".join(MF.HEADER) + "\n" + "".join(
        f"{s},{i},{lay},{st},{v:.6g}\n" for s, i, lay, st, v in rows))
