"""Outcome labels (bnexp/outcome.py) from run directories built with the numbers of real runs.

The per-epoch losses and accuracies below are metrics.csv rows of real FashionMNIST runs (LeNet5,
plain SGD, batch 512; commands in README, "Outcome labels"), and the probes have the shape of
theirs: the dead run's conv1 and conv2 ReLU inputs were all <= 0 at its last probe, the slow
starts' layers all had active units.
"""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from bnexp import layout as L
from bnexp import outcome as O

LN10 = math.log(10)
LAYERS = ("conv1.norm", "conv2.norm", "fc1.norm", "fc2.norm")

# (train_loss, train_acc) per epoch, from metrics.csv of real runs
NO_BN_LR05_3EP = [(2.300608, 0.133545), (2.225373, 0.246094), (2.452012, 0.106689)]      # 4096 images, seed 0
NO_BN_LR05_3EP_S1 = [(2.299241, 0.106445), (2.248584, 0.290527), (2.384477, 0.114258)]   # seed 1
NO_BN_LR005_3EP = [(2.304649, 0.098389), (2.30361, 0.098389), (2.302597, 0.098389)]      # 4096 images, seed 0
NO_BN_LR005_3EP_S1 = [(2.30389, 0.098389), (2.302402, 0.098389), (2.301051, 0.098389)]
DEAD_LR05_4EP = [(2.273733, 0.153733), (2.286397, 0.114), (2.303044, 0.099533), (2.303031, 0.09985)]  # full set
TRAINED_LR05_4EP = [(1.84536, 0.3366), (0.686333, 0.735667), (0.546882, 0.79025), (0.465401, 0.822383)]
BN_LR05_3EP = [(1.30197, 0.564697), (0.659993, 0.768311), (0.496315, 0.823242)]


def run_dir(tmp_path, epochs, status=L.COMPLETED, dead_layers=(), probe=True, name="run", position="before"):
    """A run directory with metrics.csv and, if `probe`, an activations.npz whose last epoch has the
    given layers' ReLU inputs all <= 0 (the others half positive, as a live layer's are)."""
    d = tmp_path / name
    d.mkdir()
    with open(d / L.METRICS, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(L.METRIC_COLUMNS)
        for i, (loss, acc) in enumerate(epochs, start=1):
            w.writerow([i, loss, acc, loss, acc, 0.5, 1.0])
    (d / L.INFO).write_text(json.dumps({"status": status}))
    if probe:
        rng = np.random.default_rng(0)
        arrays = {}
        for e in (0, 1, len(epochs)):
            for layer in LAYERS:
                relu_in = rng.standard_normal(2000).astype(np.float32)
                if e == len(epochs) and layer in dead_layers:
                    relu_in = -np.abs(relu_in) - 0.03
                relu_out = np.maximum(relu_in, 0)
                # norm before the ReLU: its output is the ReLU's input; after it: its input is the ReLU's output
                arrays[L.activation_key(e, layer, "output")] = relu_in if position == "before" else rng.standard_normal(2000)
                arrays[L.activation_key(e, layer, "input")] = relu_in if position == "before" else relu_out
        np.savez(d / L.ACTIVATIONS, **arrays)
    return d


def label(d, status=L.COMPLETED, activation="relu", position="before"):
    return O.classify_run(d, status, 10, activation, position)


@pytest.mark.parametrize("epochs", [NO_BN_LR05_3EP, NO_BN_LR05_3EP_S1])
def test_no_bn_lr05_after_3_short_epochs_is_unstable_not_trained(tmp_path, epochs):
    """Issue 13's first case: final loss 2.38-2.45 with accuracy 0.11, which the old rule called trained."""
    o = label(run_dir(tmp_path, epochs))
    assert o.label == O.UNSTABLE and "above chance" in o.why


@pytest.mark.parametrize("epochs", [NO_BN_LR005_3EP, NO_BN_LR005_3EP_S1])
def test_no_bn_lr005_slow_start_is_at_chance_so_far_not_dead(tmp_path, epochs):
    """Issue 13's second case: loss at ln 10 and one class predicted for 3 epochs, units alive: a slow
    start (at lr 0.05 on the full set it is at 1.46 after epoch 2), which the old rule called dead."""
    o = label(run_dir(tmp_path, epochs))
    assert o.label == O.AT_CHANCE and "units active in all 4 ReLU layers (epoch 3 probe)" in o.why


def test_a_layer_of_inactive_units_at_chance_is_dead(tmp_path):
    o = label(run_dir(tmp_path, DEAD_LR05_4EP, dead_layers=("conv1.norm", "conv2.norm")))
    assert o == O.Outcome(O.DEAD, "conv1, conv2 ReLU inputs all <= 0 (epoch 4 probe)")


def test_the_same_losses_with_live_units_are_not_dead(tmp_path):
    """The dead run's numbers with every layer alive: only the probe told it dead."""
    assert label(run_dir(tmp_path, DEAD_LR05_4EP)).label == O.AT_CHANCE


def test_norm_after_the_relu_reads_the_relu_output(tmp_path):
    d = run_dir(tmp_path, DEAD_LR05_4EP, dead_layers=("fc1.norm",), position="after")
    assert label(d, position="after").label == O.DEAD
    assert label(d, position="before").label == O.AT_CHANCE  # the norm's output there is unrelated noise


def test_trained_runs(tmp_path):
    assert label(run_dir(tmp_path, TRAINED_LR05_4EP, name="a")).label == O.TRAINED
    assert label(run_dir(tmp_path, BN_LR05_3EP, name="b")).label == O.TRAINED
    # a layer reported dead below chance cannot be (a network whose output ignores its input is at chance);
    # the probe is not even read there
    assert label(run_dir(tmp_path, BN_LR05_3EP, dead_layers=LAYERS, name="c")).label == O.TRAINED


def test_diverged(tmp_path):
    assert label(run_dir(tmp_path, BN_LR05_3EP), status=L.DIVERGED).label == O.DIVERGED
    assert O.classify(L.COMPLETED, 10, [0.5, math.nan], [0.8, 0.1]).label == O.DIVERGED


def test_a_loss_that_rose_well_above_its_best_epoch_is_unstable():
    o = O.classify(L.COMPLETED, 10, [1.2, 0.6, 0.75], [0.6, 0.8, 0.75])
    assert o.label == O.UNSTABLE and o.why == "loss rose from 0.6000 (epoch 2) to 0.7500"
    assert O.classify(L.COMPLETED, 10, [1.2, 0.6, 0.69], [0.6, 0.8, 0.75]).label == O.TRAINED  # +0.09: noise


def test_without_a_relu_probe_the_loss_trend_decides(tmp_path):
    """Sigmoid units (or no activations.npz): dead when the loss sits flat at chance, else at chance so far."""
    flat = run_dir(tmp_path, DEAD_LR05_4EP, dead_layers=LAYERS, name="flat")
    assert label(flat, activation="sigmoid").label == O.DEAD           # the probe is not read for sigmoid units
    assert label(run_dir(tmp_path, DEAD_LR05_4EP, probe=False, name="np")).label == O.DEAD
    assert label(run_dir(tmp_path, NO_BN_LR005_3EP, probe=False, name="fall")).label == O.AT_CHANCE
    assert label(run_dir(tmp_path, NO_BN_LR005_3EP[:2], probe=False, name="short")).label == O.AT_CHANCE


def test_chance_margins():
    at = O.classify(L.COMPLETED, 10, [LN10 + 0.019], [0.1])
    assert at.label == O.AT_CHANCE
    assert O.classify(L.COMPLETED, 10, [LN10 - 0.03], [0.1]).label == O.TRAINED       # below chance: learning
    assert O.classify(L.COMPLETED, 10, [LN10 - 0.01], [0.25]).label == O.TRAINED      # accuracy above chance
    assert O.classify(L.COMPLETED, 10, [LN10 + 0.049], [0.1]).label == O.AT_CHANCE     # not above chance yet
    assert O.classify(L.COMPLETED, 10, [LN10 + 0.051], [0.1]).label == O.UNSTABLE
    assert O.classify(L.COMPLETED, 100, [math.log(100) - 0.01], [0.01]).label == O.AT_CHANCE


def test_legend_states_every_threshold():
    text = " ".join(O.legend())
    for label_ in O.LABELS:
        assert f"**{label_}**" in text
    for value in (O.CHANCE_ABS, O.CHANCE_ACC_MARGIN, O.ABOVE_CHANCE, O.RISE, O.FLAT):
        assert f"{value:g}" in text


def test_the_rules_apply_in_the_legend_order():
    """Without a probe, a loss that came down to 2.2 and then sat flat at chance is dead (the dead
    rule comes before the rise rule), not unstable."""
    o = O.classify(L.COMPLETED, 10, [2.25, 2.20, 2.3026, 2.3026, 2.3026], [0.2, 0.25, 0.1, 0.1, 0.1])
    assert o.label == O.DEAD and "flat at chance" in o.why
    labels = [line.split("**")[1] for line in O.legend()]
    assert labels == [O.DIVERGED, O.DEAD, O.UNSTABLE, O.AT_CHANCE, O.TRAINED]
