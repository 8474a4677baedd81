"""How a finished run ended: trained, at chance so far, dead, unstable or diverged; the one definition.

Every label a user sees comes from `classify`: the sweep summary's note column, the report's
group table and per-seed table, the reference verdicts of chance-level references, the figures'
seed markers, and the report's legend (`legend()`). It reads only what a run directory records
(run.json's status, metrics.csv's per-epoch training loss and accuracy, activations.npz's probe
of the last epoch) and imports neither torch nor pandas; numpy only for a run whose loss is at or
above chance, where the probe is read.

The rules, in the order they are tried (C classes, chance = ln C, L and A the last epoch's mean
training loss and accuracy):
  diverged          run.json says diverged, or L is not finite.
  dead              L >= ln C - CHANCE_ABS and, on the last probe batch, every ReLU input of some
                    layer is <= 0: that layer passes on nothing and no gradient reaches the layers
                    below it, so the network's output no longer depends on its input. (A network
                    whose output depends on its input can be below chance; a dead one cannot.)
                    Without that evidence (no probe, or sigmoid/tanh units): at chance and a loss
                    that fell by less than FLAT over the last two epochs.
  unstable          L > ln C + ABOVE_CHANCE (worse than predicting the class prior, which the output
                    bias alone reaches within an epoch), or L more than RISE above the lowest earlier
                    epoch (training undid itself).
  at chance so far  ln C - CHANCE_ABS <= L <= ln C + ABOVE_CHANCE and A <= 1/C + CHANCE_ACC_MARGIN, units active
                    on the last probe (or, without a probe, a loss still falling): the slow start of a
                    network without BN, which predicts one class for a while and then trains.
  trained           everything else.

The thresholds, from real runs (FashionMNIST, LeNet5 without BN, plain SGD, batch 512; the commands
are in README, "Outcome labels"):
- CHANCE_ABS 0.02, CHANCE_ACC_MARGIN 0.05: a network that predicts the class prior has loss
  H(prior) = ln 10 = 2.3026 on the balanced training set. A dead run at lr 0.5 (4 epochs, seed 2)
  ended at 2.3030 with accuracy 0.0999; 3-epoch slow starts at lr 0.05 on 4096 images at 2.3026 and
  2.3011 (accuracy 0.0984: one class predicted throughout); at lr 0.05 on the full set epoch 1 ends
  at 2.2885, accuracy 0.1445, still inside both margins, and epoch 2 at 1.4606.
- ABOVE_CHANCE 0.05: the dead run's final loss is 0.0005 above ln 10; the unstable lr 0.5 runs of 3
  short epochs (4096 images) end at 2.3845 and 2.4520 (+0.08, +0.15), their last epoch holding a step
  at 3.11 / 3.48 after the loss had come down to 2.14 / 2.09, and steps at 2.30 after it.
- RISE 0.1: those two runs' epoch losses rose by 0.136 and 0.227 above their best epoch; the dead
  run's by 0.029 (2.2737 in epoch 1, 2.3030 at the end; the dead rule labels it first anyway); the
  seeds that trained at lr 0.5 lowered their epoch loss in every epoch (1.845, 0.686, 0.547, 0.465).
- FLAT 0.001 (only without a probe): the slow starts fell by 0.0020 and 0.0028 over epochs 1-3;
  the dead run's last two epochs changed by 0.00001.
Step losses are not compared one by one: with small batches (the batch-size presets go down to 2)
single steps swing by several nats in runs that train well; the epoch mean is their average.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import layout

TRAINED, AT_CHANCE, DEAD, UNSTABLE = "trained", "at chance so far", "dead", "unstable"
DIVERGED = layout.DIVERGED  # the label of a diverged run is its run.json status
LABELS = (DEAD, UNSTABLE, AT_CHANCE, DIVERGED, TRAINED)  # the order of a group's "dead in 1 of 3 seeds, ..."

CHANCE_ABS = 0.02          # |final loss - ln C| at most this: the loss is at chance
CHANCE_ACC_MARGIN = 0.05   # ... and the accuracy at most 1/C + this
ABOVE_CHANCE = 0.05        # final loss above ln C + this: unstable
RISE = 0.1                 # final loss above the best earlier epoch's by more than this: unstable
FLAT = 0.001               # without a probe: at chance and falling less than this over 2 epochs: dead


def diverged_where(diverged_at: dict) -> str:
    """Where a diverged run's loss turned non-finite (its run.json's `diverged_at`), in the words the
    run's summary line and the sweep's table both use."""
    return f"non-finite loss at epoch {diverged_at['epoch']}, step {diverged_at['step']}"


@dataclass(frozen=True)
class Outcome:
    """A run's label and the evidence for it in a few words (the sweep's note, the report's per-seed table)."""
    label: str
    why: str

    def text(self) -> str:
        return f"{self.label}: {self.why}" if self.why else self.label


@dataclass(frozen=True)
class Probe:
    """What the last activation probe says about the ReLU layers: at `epoch`, the layers whose inputs
    were all <= 0 on the probe batch (dead), out of `layers` checked."""
    epoch: int
    dead: tuple[str, ...]
    layers: int


def legend() -> list[str]:
    """The labels and their rules in words, for the report's legend and the README."""
    return [
        f"**{DIVERGED}**: a non-finite loss (run.json status diverged)",
        f"**{DEAD}**: final training loss at chance or above (≥ ln C − {CHANCE_ABS:g}) and, on the last activation "
        "probe, a layer whose ReLU inputs are all ≤ 0 (it passes nothing on, so the output no longer depends on the "
        f"input); without such a probe (none recorded, or sigmoid/tanh units): at chance with a loss that fell by "
        f"less than {FLAT:g} over the last two epochs",
        f"**{UNSTABLE}**: final training loss above chance (> ln C + {ABOVE_CHANCE:g}), or more than {RISE:g} above "
        "its best earlier epoch",
        f"**{AT_CHANCE}**: final training loss from ln C − {CHANCE_ABS:g} to ln C + {ABOVE_CHANCE:g} (ln 10 = 2.303) "
        f"and accuracy at most "
        f"1/C + {CHANCE_ACC_MARGIN:g}, with units still active on the last probe (or, without one, a loss still "
        "falling): a slow start, not a dead network",
        f"**{TRAINED}**: everything else",
    ]


def classify(status: str, num_classes: int | None, losses: list[float], accs: list[float],
             probe: Callable[[], Probe | None] = lambda: None) -> Outcome:
    """The outcome of a finished run from its per-epoch training losses and accuracies (metrics.csv;
    the last entry is the final one) and, only when needed, its last probe (`probe()`, read lazily)."""
    L = losses[-1] if losses else math.nan
    if status == layout.DIVERGED or not math.isfinite(L):
        return Outcome(DIVERGED, "non-finite loss")
    if not num_classes:
        return Outcome(TRAINED, "")
    chance = math.log(num_classes)
    A = accs[-1] if accs else math.nan
    # at chance: from CHANCE_ABS below ln C to ABOVE_CHANCE above it (beyond that: unstable), at chance accuracy
    at_chance = chance - CHANCE_ABS <= L <= chance + ABOVE_CHANCE and not A > 1 / num_classes + CHANCE_ACC_MARGIN
    fell = losses[-3] - L if len(losses) >= 3 else math.nan  # over the last two epochs
    p = probe() if L >= chance - CHANCE_ABS else None  # a network below chance depends on its input
    if p is not None and p.dead:
        layers = ", ".join(name.removesuffix(".norm") for name in p.dead)
        return Outcome(DEAD, f"{layers} ReLU inputs all <= 0 (epoch {p.epoch} probe)")
    if p is None and at_chance and fell < FLAT:
        return Outcome(DEAD, f"loss flat at chance ({fell:+.4f} over 2 epochs, no ReLU probe)")
    if L > chance + ABOVE_CHANCE:
        return Outcome(UNSTABLE, f"loss {L:.4f} above chance (ln {num_classes} = {chance:.4f})")
    best = min(losses[:-1], default=math.inf)
    if L - best > RISE:
        return Outcome(UNSTABLE, f"loss rose from {best:.4f} (epoch {losses.index(best) + 1}) to {L:.4f}")
    if not at_chance:
        return Outcome(TRAINED, "")
    if p is not None:
        return Outcome(AT_CHANCE, f"units active in all {p.layers} ReLU layers (epoch {p.epoch} probe)")
    if math.isnan(fell):
        return Outcome(AT_CHANCE, f"{len(losses)} epoch(s), no ReLU probe to tell more")
    return Outcome(AT_CHANCE, f"loss still falling ({fell:.4f} over 2 epochs, no ReLU probe)")


def relu_probe(run_dir: Path, activation: str | None, norm_position: str | None) -> Probe | None:
    """The last probe of activations.npz, read for its ReLU inputs; None for non-ReLU units or without
    a readable probe. With the norm before the ReLU (the default) its output is the ReLU's input; after
    it, its input is the ReLU's output, which is 0 exactly where the ReLU's input is <= 0."""
    if (activation or "relu") != "relu":
        return None
    import numpy as np

    where = "input" if norm_position == "after" else "output"
    try:
        with np.load(Path(run_dir) / layout.ACTIVATIONS) as z:
            keys = [k for k in map(layout.parse_activation_key, z.files) if k]
            if not keys:
                return None
            last = max(e for e, _, _ in keys)
            layers = [layer for e, layer, w in keys if e == last and w == where]
            dead = tuple(name for name in layers
                         if (v := z[layout.activation_key(last, name, where)]).size and not (v > 0).any())
    except Exception:  # noqa: BLE001  absent or damaged (the report warns about a damaged one elsewhere)
        return None
    return Probe(last, dead, len(layers)) if layers else None


def _number(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def read_epochs(run_dir: Path) -> tuple[list[float], list[float]]:
    """metrics.csv's train_loss and train_acc columns ([] if missing or unreadable)."""
    try:
        with open(Path(run_dir) / layout.METRICS, newline="") as f:
            rows = list(csv.DictReader(f))
        return [float(r["train_loss"]) for r in rows], [float(r["train_acc"]) for r in rows]
    except (OSError, KeyError, TypeError, ValueError, csv.Error):
        return [], []


def classify_run(run_dir: Path, status: str, num_classes: int | None, activation: str | None = "relu",
                 norm_position: str | None = "before", final: dict | None = None) -> Outcome:
    """`classify` for a run directory on disk (the sweep summary); `final` (run.json's) stands in for a
    missing metrics.csv."""
    losses, accs = read_epochs(run_dir)
    if not losses and isinstance(final, dict):
        losses, accs = [_number(final.get("train_loss"))], [_number(final.get("train_acc"))]
    return classify(status, num_classes, losses, accs, lambda: relu_probe(run_dir, activation, norm_position))
