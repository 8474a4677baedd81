"""Benchmark: what the instruments (bnexp/measure.py) cost, per measurement and per LeNet5 epoch.

  per instrument  one measurement of each instrument alone, and of all of them together (they share
                  the gradient at theta and the grid passes), on a training batch of the default
                  LeNet5-BN run (FashionMNIST, batch 512), in training steps of that run (the median
                  epoch without instruments over its number of steps)
  per epoch       one training epoch of that run with every instrument at the default measure_every,
                  against the same epoch without instruments: the first epoch, which measures at step 0
                  as well (ceil(steps / measure_every) measurements; later epochs average
                  steps / measure_every), so the ratio is the worst epoch's
Candidates are interleaved (bnexp.bench.time_samples); min, median and max are reported.
"""

from __future__ import annotations

import itertools
import statistics
import tempfile
from pathlib import Path

import torch

from . import time_samples
from .. import config, measure, train
from ..tblog import TensorBoardLog
from ..tracking import RunState

TARGET = 1.25  # issue 15: all instruments together add at most 25% to a LeNet5 epoch on CPU


def _stats(samples: list[float]) -> dict:
    return {"min": round(min(samples), 5), "median": round(statistics.median(samples), 5),
            "max": round(max(samples), 5)}


def run(device: str = "cpu", repeats: int = 3, instrument_repeats: int = 10, data_dir: str | None = None,
        batch_size: int | None = None, train_size: int | None = None) -> dict:
    base = [f"device={device}", "progress=false"] + ([f"data_dir={data_dir}"] if data_dir else []) + (
        [f"batch_size={batch_size}"] if batch_size else []) + ([f"train_size={train_size}"] if train_size else [])
    cfg_off = config.compose(base)
    cfg_on = config.compose(base + ["measure=all"])
    every = cfg_on.measure_every
    s_off, s_on = train.prepare(cfg_off), train.prepare(cfg_on)
    dev = s_on.device

    # one measurement per instrument, on the batch step 1 trains on
    order = train.epoch_order(cfg_on, len(s_on.train), 1)
    idx = order[:s_on.program.batch_sizes[0]].to(dev)
    x = train.engine.model_input(s_on.train.x[idx], s_on.model.input_size, s_on.opts.channels_last)
    y = s_on.train.y[idx]
    meters = {name: measure.Measurer(s_on.model, s_on.optimizer, (name,), tuple(cfg_on.measure_steps),
                                     train.effective_lr(cfg_on), s_on.opts, dev, s_on.meter.probe_x, cfg_on.norm.kind)
              for name in measure.INSTRUMENTS}
    meters["all"] = s_on.meter
    fns = {name: (lambda m=m: m.measure(0, x, y)) for name, m in meters.items()}
    per = {name: _stats(v) for name, v in time_samples(fns, repeats=instrument_repeats, warmup=1).items()}

    # an epoch with every instrument (step 0 too, as a run's first epoch) against one without
    with tempfile.TemporaryDirectory() as tmp:
        tb = TensorBoardLog(Path(tmp), purge_step=None)
        state = RunState()  # what measure_at records into

        on_epochs, off_epochs = itertools.count(1), itertools.count(1)

        def with_instruments():
            epoch = next(on_epochs)
            train.measure_at(s_on, state, 0, train.epoch_order(cfg_on, len(s_on.train), epoch), 0, tb)
            train.train_epoch(s_on, cfg_on, epoch, on_step=train.measure_hook(s_on, cfg_on, state, epoch, 0, tb))
            tb.flush()

        def without():
            train.train_epoch(s_off, cfg_off, next(off_epochs))

        epochs = time_samples({"without": without, "with instruments": with_instruments}, repeats=repeats, warmup=1)
    steps = s_on.program.steps
    measured = len(range(0, steps, every))  # step 0 and every multiple of measure_every before the last step
    med = {k: statistics.median(v) for k, v in epochs.items()}
    return {
        "benchmark": "measure", "device": str(dev), "device_name": s_on.execution["device_name"],
        "torch": torch.__version__, "threads": torch.get_num_threads(), "model": "lenet5-bn",
        "images": len(s_on.train), "batch_size": cfg_on.batch_size, "steps_per_epoch": steps,
        "measure_every": every, "measure_steps": list(cfg_on.measure_steps), "measurements_per_epoch": measured,
        "repeats": repeats, "instrument_repeats": instrument_repeats,
        "per_measurement_seconds": per,
        "epoch_seconds": {k: _stats(v) for k, v in epochs.items()},
        "epoch_ratio": round(med["with instruments"] / med["without"], 3),
        "step_seconds": round(med["without"] / steps, 5),
    }


def format_table(r: dict) -> str:
    step = r["step_seconds"]
    lines = [f"measure benchmark: LeNet5-BN, {r['images']} images, batch {r['batch_size']}, {r['device_name']} "
             f"({r['device']}), {r['threads']} threads, torch {r['torch']}; grid {r['measure_steps']} x lr",
             f"one measurement (min / median / max of {r['instrument_repeats']}, interleaved):",
             f"{'instrument':<18}{'min ms':>9}{'median ms':>11}{'max ms':>9}{'steps':>7}  "
             f"(median / one training step, {step * 1e3:.1f} ms)"]
    for name, st in r["per_measurement_seconds"].items():
        lines.append(f"{name:<18}{st['min'] * 1e3:>9.1f}{st['median'] * 1e3:>11.1f}{st['max'] * 1e3:>9.1f}"
                     f"{st['median'] / step:>7.1f}")
    lines.append(f"one epoch ({r['steps_per_epoch']} steps; measure_every={r['measure_every']}: "
                 f"{r['measurements_per_epoch']} measurements, step 0 included; min / median / max of {r['repeats']}):")
    for name, st in r["epoch_seconds"].items():
        lines.append(f"{name:<18}{st['min']:>9.2f}{st['median']:>11.2f}{st['max']:>9.2f}  s")
    lines.append(f"with / without = {r['epoch_ratio']:.3f} (CPU target <= {TARGET})")
    return "\n".join(lines)
