"""Fake run directories for the report's tests (no training): bnexp.bench.fakeruns, plus measures.csv,
seed groups and damaged run directories.

The runs are composed by the real config.compose, live under the real run id and are written by the
real tracking.RunDir writers (bnexp.bench.fakeruns, which `bnexp bench report` uses too); with
`measure=[...]` (instrument names) measures.csv is written as well, plausible shapes in
bnexp.measures_format's layout.

    from runfactory import fake_run, fake_group
    fake_run(tmp_path, lr=0.5, bn="off", seed=1, train_loss=2.3026)      # one dead run
    fake_group(tmp_path, [0.10, 0.12, 0.14], lr=0.5, bn="on")             # seeds 0, 1, 2
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from bnexp import config as C
from bnexp import layout as L
from bnexp.bench import fakeruns
from bnexp.tracking import RunDir

__all__ = ["CHANCE_10", "fake_group", "fake_run", "damage"]

CHANCE_10 = math.log(10)     # FashionMNIST chance-level loss, 2.3026
MEASURE_EVERY = 10           # steps between fake measurements unless measure_every is given (fake epochs are short)
# LeNet5's module names (bnexp.models): the layers measures.csv names per weight layer / nonlinearity
WEIGHT_LAYERS = ("conv1.conv", "conv2.conv", "fc1.linear", "fc2.linear", "fc3")
ACT_LAYERS = ("conv1.act", "conv2.act", "fc1.act", "fc2.act")


def fake_run(root: Path, /, config: dict | None = None, **kw) -> Path:
    """bnexp.bench.fakeruns.fake_run, and measures.csv for the instruments in `measure`."""
    measured = kw.get("measure") or (config or {}).get("measure")
    if measured and "measure_every" not in kw and "measure_every" not in (config or {}):
        kw["measure_every"] = MEASURE_EVERY
    path = fakeruns.fake_run(root, config, **kw)
    if measured:
        rd = RunDir(Path(root), path.name)
        cfg = C.from_yaml(path / L.CONFIG)
        n_steps = sum(1 for _ in open(path / L.STEPS)) - 1
        if n_steps:
            rd.write_measures(measure_rows(cfg, n_steps, np.random.default_rng(int(path.name[-8:], 16) + 1)))
    return path


def measure_rows(cfg, n_steps: int, rng) -> list[tuple]:
    """measures.csv rows for the instruments in cfg.measure, at step 0 and every measure_every steps:
    plausible shapes (BN: a narrower landscape band, a smaller beta), not measured numbers."""
    every, bn = cfg.measure_every, cfg.bn == "on"
    sat = ("saturated", "mean_derivative") if cfg.model.activation in ("sigmoid", "tanh") else ("dead", "active")
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
                       ("weights", layer, "weight_norm"): 3.0 + t / (1 + 100 * cfg.optim.weight_decay),
                       ("weights", layer, "grad_norm"): 0.5 * spread}
            if bn and layer != WEIGHT_LAYERS[-1]:        # the last layer has no norm after it
                values[("weights", layer, "effective_step")] = cfg.lr * 0.5 * spread / values[
                    ("weights", layer, "weight_norm")]
        for i, layer in enumerate(ACT_LAYERS):
            frac = (0.05 if bn else 0.2 + 0.05 * i) * t
            values |= {("saturation", layer, sat[0]): frac, ("saturation", layer, sat[1]): 0.25 - 0.1 * frac}
        rows += [(step, *key, float(v)) for key, v in values.items() if key[0] in cfg.measure]
    return rows


def fake_group(root: Path, train_losses: list[float], /, *, first_seed: int = 0, **kw) -> list[Path]:
    """One run per final training loss, seeds first_seed, first_seed + 1, ...; other metrics from kw."""
    return [fake_run(root, seed=first_seed + i, train_loss=loss, **kw) for i, loss in enumerate(train_losses)]


def damage(run_dir: Path, what: str) -> Path:
    """Break one run directory the ways real ones break (killed writer, hand edits, old versions)."""
    if what == "no_run_json":
        (run_dir / L.INFO).unlink()
    elif what == "bad_yaml":
        (run_dir / L.CONFIG).write_text("model: [unclosed\n")
    elif what == "bad_json":
        (run_dir / L.INFO).write_text(f'{{"status": "{L.COMPLETED}", ')
    elif what == "bad_status":
        text = (run_dir / L.INFO).read_text()
        (run_dir / L.INFO).write_text(text.replace(f'"{L.COMPLETED}"', '"exploded"'))
    elif what == "bad_metrics_header":
        (run_dir / L.METRICS).write_text("when,what\n1,2\n")
    elif what == "garbage_steps":
        (run_dir / L.STEPS).write_text("step,epoch,loss\n1,1,0.5\nnot,a,number\n")
    elif what == "no_steps":
        (run_dir / L.STEPS).unlink()
    elif what == "bad_npz":
        (run_dir / L.ACTIVATIONS).write_bytes(b"not a zip file")
    else:
        raise ValueError(what)
    return run_dir
