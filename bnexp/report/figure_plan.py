"""Which figures the report draws: contexts, per-kind limits, and drawing them in parallel.

A *context* is a set of run groups that share every defining config key except the BN arm
(bn, norm.*, model.dropout) and the swept key (lr for figures 1, 2, 5; batch size for 3;
optim.weight_decay for 10). Figures 7-10 (measures.csv) are drawn only for contexts whose runs
measured what they show, with the groups that did.
Contexts holding a group that matches an exact reference come first; each kind is capped
(MAX_FIGURES) so the report's cost does not grow with the number of runs.
"""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import pandas as pd

from bnexp import outcome as O
from bnexp.report import fig_measures as FM
from bnexp.report import measures as M
from bnexp.report.aggregate import context_key, fmt_value
from bnexp.report.figures import (SEED_SHAPES, binned_steps, epoch_stats, fig_activations, fig_generalization, fig_ioffe,
                                  fig_loss, fig_sweep, read_activations, read_evals)

MAX_FIGURES = {"loss": 2, "lr": 2, "batch": 2, "activations": 1, "generalization": 2, "ioffe": 1,  # ~0.1 s CPU
               "landscape": 2, "ics": 2, "saturation": 2, "effective_step": 2}                   # per panel
TITLES = {"landscape": "Loss landscape, BN vs no BN", "ics": "Internal covariate shift per layer",
          "saturation": "Saturation per nonlinearity", "effective_step": "Effective step, with vs without weight decay"}
# The measure figures (issue 15): kind -> (figure number, file name, the keys a context spans besides the
# BN arm, the instruments it draws from measures.csv, the drawing function, caption text). Each is drawn per
# context (effective_step spans optim.weight_decay, the weight_decay preset's arms) with the groups that have
# the data.
MEASURE_FIGURES = {
    "landscape": (7, "landscape", (), ("landscape", "predictiveness", "beta_smoothness"), FM.fig_landscape,
                  "Santurkar et al. 2018, Figure 4 — at every measured step, along the step's gradient g on its "
                  "batch: (a) the loss landscape, band from the mean over seeds of the smallest to the mean of the "
                  "largest L(θ − ηg) over the measure_steps grid of η; (b) gradient predictiveness, the same band "
                  "of ‖∇L(θ) − ∇L(θ − ηg)‖₂; (c) β-smoothness, the mean over seeds of the largest "
                  "‖∇L(θ) − ∇L(θ − ηg)‖₂ / ‖ηg‖₂"),
    "ics": (8, "ics", (), ("ics",), FM.fig_ics,
            "internal covariate shift per weight layer (Santurkar et al. 2018, section 2.2): ℓ2 distance and cosine "
            "between a layer's gradient G and G′, the same gradient after the layers before it took their step "
            "(mean over seeds)"),
    "saturation": (9, "saturation", (), ("saturation",), FM.fig_saturation,
                   "saturation per nonlinearity over training (mean over seeds): sigmoid / tanh the fraction of inputs "
                   "in the saturated region and the mean derivative, ReLU the fraction of units dead on the whole "
                   "probe batch and the mean fraction active"),
    "effective_step": (10, "effective_step", ("optim.weight_decay",), ("weights",), FM.fig_effective_step,
                       "effective step lr·‖∇W‖/‖W‖ of each scale-invariant weight (a weight followed by a norm "
                       "layer) and its norm ‖W‖₂, per weight decay (line style), mean over seeds"),
}


@dataclass
class FigureInfo:
    kind: str          # loss | lr | batch | activations | generalization | ioffe | MEASURE_FIGURES
    path: Path
    caption: str
    data: str = ""     # the context's data set
    groups: tuple[str, ...] = ()   # the run groups it draws (the Experiments table counts a figure by them)

    @property
    def number(self) -> str:
        """'1.2' from the caption 'Figure 1.2: ...'."""
        m = re.match(r"Figure (\d+\.\d+)", self.caption)
        return m[1] if m else ""


def slug(text: str) -> str:
    """A file-name-safe version of a context label."""
    return re.sub(r"[^A-Za-z0-9_.=-]+", "-", text).strip("-")[:80]


def fig_name(prefix: str, row: pd.Series, label: str) -> str:
    """`{prefix}_{model}-{data}_{hash}.png`: a short readable stem (never cut mid-value) and 8 hex
    digits of the full context label, so contexts differing in any key (e.g. test_size) get
    different names and the same context keeps its name between reports."""
    stem = slug(f"{row.get('model.name')}-{row.get('data.name')}")[:40]
    return f"{prefix}_{stem}_{hashlib.sha1(label.encode()).hexdigest()[:8]}.png"


def context_label(row: pd.Series, drop: tuple[str, ...], other: list[str]) -> str:
    parts = [f"{row.get('model.name')} / {row.get('data.name')}", str(row.get("optim.name"))]
    for key, short in (("lr", "lr"), ("batch_size", "batch"), ("epochs", "epochs")):
        if key not in drop and key in row:
            parts.append(f"{short} {fmt_value(row[key])}")
    parts += [f"{k}={fmt_value(row[k])}" for k in other if not k.startswith("norm.") and k != "model.dropout"]
    # a subset run must never look like a full-data one
    parts += [f"{k}={fmt_value(row[k])}" for k in ("train_size", "test_size")
              if k not in other and k in row and fmt_value(row[k]) != "null"]
    return ", ".join(parts)


def contexts(groups: pd.DataFrame, keys: list[str], drop: tuple[str, ...], prefer: set[str]) -> list[pd.DataFrame]:
    """Groups split by context (all defining keys but the BN arm and `drop`), best first:
    contexts holding a reference-matched group, then the ones with more groups."""
    if groups.empty:
        return []
    ctx = groups.apply(lambda r: context_key(r, keys, drop), axis=1)
    parts = [groups.loc[idx] for _, idx in groups.groupby(ctx, sort=False).groups.items()]
    return sorted(parts, key=lambda p: (not set(p["group"]) & prefer, -len(p), p.index.min()))


def pick_activation_runs(ctx: pd.DataFrame, runs: pd.DataFrame) -> list[pd.Series]:
    """One run per BN arm of the context (lowest seed with activations.npz): BN first."""
    r = runs[runs["group"].isin(ctx["group"]) & runs["has_activations"] & (runs["outcome"] != O.DIVERGED)]
    picked = []
    for bn in ("on", "off"):
        arm = r[r["bn"] == bn].sort_values(["norm.kind", "seed"])
        if len(arm):
            picked.append(arm.iloc[0])
    return picked


def activation_figure(picked: list[pd.Series], title: str, path: Path) -> Path | None:
    arms = [(run, read_activations(Path(run["dir"]))) for run in picked]
    arms = [(r, a) for r, a in arms if a]
    return fig_activations(arms, title, path) if arms else None


def ioffe_arms(ctx: pd.DataFrame, runs: pd.DataFrame, steps_per_epoch: dict) -> list[tuple]:
    """fig_ioffe's arms for a context: each group with mid-epoch evaluations (eval_every) in every
    seed, with its seeds' evals.csv and the lowest seed's activations; BN arms first."""
    arms = []
    for _, g in ctx.sort_values(["bn", "norm.kind"], ascending=[False, True]).iterrows():
        r = runs[(runs["group"] == g["group"]) & (runs["outcome"] != O.DIVERGED)].sort_values("seed")
        evals = [read_evals(Path(d)) for d in r["dir"]]
        if not len(r) or any(e.empty for e in evals):
            continue
        acts = read_activations(Path(r.iloc[0]["dir"])) if r.iloc[0]["has_activations"] else {}
        arms.append((g, evals, acts, steps_per_epoch.get(g["group"], 1.0)))
    return arms if len(arms) >= 2 else []


def measured(ctxs: list[pd.DataFrame], means: pd.DataFrame, kind: str) -> list[tuple[pd.DataFrame, list]]:
    """(context, its groups with data for `kind`) for each context where a group has some; the
    effective-step figure needs the statistic itself (a no-BN run has no scale-invariant weight)."""
    _, _, _, instruments, _, _ = MEASURE_FIGURES[kind]
    sel = means[means["instrument"].isin(instruments)]
    if kind == "effective_step":
        sel = sel[sel["statistic"] == "effective_step"]
    have = set(sel["group"])
    out = []
    for ctx in ctxs:
        shown = [g for _, g in ctx.iterrows() if g["group"] in have]
        if shown:
            out.append((ctx, shown))
    return out


def _workers(n_jobs: int) -> int:
    """Processes for drawing: BNEXP_REPORT_JOBS, else up to 2 (figures are independent and
    matplotlib is single-threaded); 1 where fork is unavailable (the workers inherit the data)."""
    env = os.environ.get("BNEXP_REPORT_JOBS", "")
    want = int(env) if env.isdigit() and int(env) > 0 else min(2, os.cpu_count() or 1)
    if "fork" not in mp.get_all_start_methods() or sys.platform == "darwin":
        return 1
    return max(1, min(want, n_jobs)) if n_jobs >= 4 else 1      # a pool costs more than 1-3 figures


def run_jobs(jobs: list[tuple[Callable, tuple]]) -> list:
    """Call fn(*args) for every job, in worker processes when that helps; results in order."""
    n = _workers(len(jobs))
    if n > 1:
        try:
            with ProcessPoolExecutor(n, mp_context=mp.get_context("fork")) as ex:
                return [f.result() for f in [ex.submit(fn, *args) for fn, args in jobs]]
        except (BrokenProcessPool, OSError):
            pass                                  # e.g. no /dev/shm or fork refused: draw here
    return [fn(*args) for fn, args in jobs]


@dataclass
class Tables:
    """What the figures are drawn from: the report's tables, each reduced once for all figures."""
    groups: pd.DataFrame        # one row per run group
    keys: list[str]             # the defining config keys
    other: list[str]            # the keys that vary between contexts besides lr, batch size, epochs
    prefer: set[str]            # groups that match an exact reference: their contexts come first
    num_classes: dict
    out_dir: Path
    agg: pd.DataFrame           # the runs that belong to a group
    steps: pd.DataFrame         # binned step losses per group (binned_steps)
    steps_per_epoch: dict
    epochs: pd.DataFrame        # per-epoch seed statistics per group (epoch_stats)
    means: pd.DataFrame         # measures.csv seed means per group (measures.seed_means)

    def only(self, df: pd.DataFrame, ctx: pd.DataFrame) -> pd.DataFrame:
        """The rows of `df` that belong to the context's groups."""
        return df[df["group"].isin(ctx["group"])]

    def contexts(self, drop: tuple[str, ...]) -> list[pd.DataFrame]:
        return contexts(self.groups, self.keys, drop, self.prefer)


@dataclass
class Job:
    """One figure to draw: `draw(*args)` writes it and returns its path (None: nothing to draw)."""
    kind: str
    caption: str
    draw: Callable
    args: tuple
    data: str                   # the context's data set
    groups: tuple[str, ...]     # the run groups it draws


def draw_all(groups: pd.DataFrame, runs_tab: pd.DataFrame, epochs: pd.DataFrame, steps: pd.DataFrame,
             keys: list[str], other: list[str], num_classes: dict, out_dir: Path,
             prefer: set[str], measures: pd.DataFrame | None = None) -> tuple[list[FigureInfo], dict[str, int]]:
    """Every figure the runs allow (capped per kind, best contexts first) and the count left out."""
    t = tables(groups, runs_tab, epochs, steps, keys, other, num_classes, out_dir, prefer, measures)
    jobs: list[Job] = []
    skipped: dict[str, int] = {}
    for kind, found, make in figure_kinds(t):
        skipped[kind] = max(0, len(found) - MAX_FIGURES[kind])
        jobs += [job(kind, item, make(t, i, item)) for i, item in enumerate(found[:MAX_FIGURES[kind]], 1)]
    paths = run_jobs([(j.draw, j.args) for j in jobs])
    return [FigureInfo(j.kind, p, j.caption, j.data, j.groups) for j, p in zip(jobs, paths) if p], skipped


def tables(groups, runs_tab, epochs, steps, keys, other, num_classes, out_dir, prefer, measures) -> Tables:
    agg = runs_tab[runs_tab["group"] != ""]
    run_group = agg.set_index("run_id")["group"]
    steps_b, spe = binned_steps(steps, run_group)
    return Tables(groups, keys, other, prefer, num_classes, out_dir, agg, steps_b, spe,
                  epoch_stats(epochs, run_group, ("train_loss", "train_acc", "test_acc")),
                  M.seed_means(M.empty() if measures is None else measures, run_group))


def figure_kinds(t: Tables) -> list[tuple[str, list, Callable]]:
    """(kind, the contexts (or (context, what it shows)) it can be drawn for, best first, the function
    that makes figure i of one), in the report's order."""
    by_lr, by_bs, every = t.contexts(("lr",)), t.contexts(("batch_size",)), t.contexts(())
    with_acts = [(c, pick_activation_runs(c, t.agg)) for c in every]
    with_evals = [(c, ioffe_arms(c, t.agg, t.steps_per_epoch)) for c in every]
    kinds = [
        ("loss", by_lr, loss_figure),
        ("lr", [c for c in by_lr if c["lr"].nunique() >= 2],
         partial(sweep_figure, kind="lr", x_key="lr", xlabel="learning rate", base=10, number=2)),
        ("batch", [c for c in by_bs if c["batch_size"].nunique() >= 2],
         partial(sweep_figure, kind="batch", x_key="batch_size", xlabel="batch size", base=2, number=3)),
        ("activations", sorted([(c, p) for c, p in with_acts if p], key=lambda cp: -len(cp[1])), activations_figure),
        # the generalisation claim is about AlexNet / CIFAR-100: those contexts first
        ("generalization", sorted(by_lr, key=lambda c: not c["model.name"].astype(str).str.startswith("alexnet").any()),
         generalization_figure),
        ("ioffe", [(c, a) for c, a in with_evals if a], ioffe_figure),
    ]
    if len(t.means):
        kinds += [(kind, measured(t.contexts(spec[2]), t.means, kind), partial(measure_figure, kind=kind))
                  for kind, spec in MEASURE_FIGURES.items()]
    return kinds


def job(kind: str, item, made: tuple[str, Callable, tuple]) -> Job:
    """The Job of figure `made` = (caption, draw, args) for `item`: a context, or (context, what it shows)."""
    ctx, shown = item if isinstance(item, tuple) else (item, [])  # activation runs, ioffe arms, measured groups
    drawn = [a[0]["group"] if isinstance(a, tuple) else a["group"] for a in shown] or list(ctx["group"])
    return Job(kind, *made, str(ctx["data.name"].iloc[0]), tuple(dict.fromkeys(drawn)))


def titled(t: Tables, ctx: pd.DataFrame, drop: tuple[str, ...], prefix: str,
           other: list[str] | None = None) -> tuple[str, Path]:
    """A figure's context label (without the keys it spans) and the file it is drawn into."""
    title = context_label(ctx.iloc[0], drop, t.other if other is None else other)
    return title, t.out_dir / fig_name(prefix, ctx.iloc[0], title)


def loss_figure(t: Tables, i: int, ctx: pd.DataFrame) -> tuple[str, Callable, tuple]:
    title, path = titled(t, ctx, ("lr",), f"fig1_loss_{i}")
    return (f"Figure 1.{i}: training loss vs iteration (line: seed mean of binned step losses, or each seed "
            f"where seeds ended differently; dots: epoch means, bars: range over seeds), one panel per learning "
            f"rate; {title}.", fig_loss,
            (ctx, t.only(t.steps, ctx), t.steps_per_epoch, t.only(t.epochs, ctx), t.num_classes,
             f"Training loss, BN vs no BN: {title}", path))


def sweep_figure(t: Tables, i: int, ctx: pd.DataFrame, kind: str, x_key: str, xlabel: str, base: int,
                 number: int) -> tuple[str, Callable, tuple]:
    title, path = titled(t, ctx, (x_key,), f"fig{number}_{kind}_{i}")
    return (f"Figure {number}.{i}: final training loss and test accuracy vs {xlabel} (log scale), "
            f"filled markers with bars: mean ± std over seeds; small hollow markers just right of them: "
            f"each seed, shaped by its outcome label ({SEED_SHAPES}); "
            f"crosses at the top: diverged seeds; {title}.", fig_sweep,
            (ctx, t.only(t.agg, ctx), x_key, xlabel, base, t.num_classes, f"{xlabel.capitalize()} sweep: {title}", path))


def activations_figure(t: Tables, i: int, pair: tuple) -> tuple[str, Callable, tuple]:
    ctx, picked = pair
    title, path = titled(t, ctx, (), f"fig4_activations_{i}")
    return (f"Figure 4.{i}: distribution of each norm position's output (BN) or pre-activation (no BN), "
            f"epoch 0 = the probe at initialisation, before training (filled; the earliest probed epoch where a "
            f"run has no epoch-0 probe, as the legend says) vs the last probed epoch (line), dashed N(0,1) "
            f"density; {title}.", activation_figure,
            (picked, f"Activation distributions vs N(0,1): {title}", path))


def generalization_figure(t: Tables, i: int, ctx: pd.DataFrame) -> tuple[str, Callable, tuple]:
    title, path = titled(t, ctx, ("lr",), f"fig5_generalization_{i}")
    return (f"Figure 5.{i}: train (solid) vs test (dashed) accuracy per epoch, mean over seeds, one panel "
            f"per learning rate; {title}.", fig_generalization,
            (ctx, t.only(t.epochs, ctx), t.num_classes, f"Train vs test accuracy: {title}", path))


def ioffe_figure(t: Tables, i: int, pair: tuple) -> tuple[str, Callable, tuple]:
    ctx, arms = pair
    title, path = titled(t, ctx, (), f"fig6_ioffe_{i}")
    return (f"Figure 6.{i}: Ioffe & Szegedy 2015, Figure 1 — (a) test accuracy against training steps (every "
            f"eval_every steps, mean over seeds), then for each arm the 15th, 50th (thick) and 85th percentiles of "
            f"the last hidden layer's sigmoid input over training (all its units on the probe batch; the paper "
            f"follows one unit); {title}.", fig_ioffe,
            (arms, f"Ioffe & Szegedy Figure 1: {title}", path))


def measure_figure(t: Tables, i: int, pair: tuple, kind: str) -> tuple[str, Callable, tuple]:
    number, name, drop, _, draw, text = MEASURE_FIGURES[kind]
    ctx, shown = pair
    title, path = titled(t, ctx, drop, f"fig{number}_{name}_{i}", [k for k in t.other if k not in drop])
    return (f"Figure {number}.{i}: {text}; against the training step (measure_every); {title}.", draw,
            (pd.DataFrame(shown), t.means, f"{TITLES[kind]}: {title}", path))
