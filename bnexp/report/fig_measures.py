"""Figures 7-10: the instruments of issue 15 (measures.csv) against the training step.

7 Santurkar et al. 2018, Figure 4: (a) the loss landscape band, min..max of L(theta - eta g) over the
  step-size grid, (b) the gradient-predictiveness band, (c) beta-smoothness; 8 ICS per layer (l2 and
  cosine, Santurkar section 2.2); 9 saturation / dead-unit fractions per nonlinearity; 10 the
  effective step lr ||grad W|| / ||W|| of scale-invariant weights and ||W||, per weight decay.
Every line is the mean over a group's seeds (measures.seed_means); a band is the mean of the
seeds' minima to the mean of their maxima, as Santurkar et al. draw it. One line per run group,
coloured by norm kind as in figures 1-6; figure 10 tells weight decays apart by line style.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from bnexp.report import figures as F
from bnexp.report import measures as M
from bnexp.report.aggregate import fmt_value

PANEL_W, PANEL_H = 3.0, 2.6
LOG_RATIO = 50.0          # a panel whose positive values span more than this factor gets a log y axis
LANDSCAPE_PANELS = (      # (instrument, low statistic, high statistic, panel title, y label)
    ("landscape", "min", "max", "(a) loss landscape", "loss L(θ − ηg), min..max over η"),
    ("predictiveness", "min", "max", "(b) gradient predictiveness", "‖∇L(θ) − ∇L(θ − ηg)‖₂"),
    ("beta_smoothness", "max", "max", "(c) β-smoothness", "max ‖Δ∇L‖₂ / ‖ηg‖₂"),
)
YLABELS = {"l2": "‖G − G′‖₂", "cos": "cos(G, G′)", "saturated": "fraction saturated",
           "mean_derivative": "mean derivative", "dead": "fraction dead", "active": "mean fraction active",
           "effective_step": "lr·‖∇W‖ / ‖W‖", "weight_norm": "‖W‖₂", "grad_norm": "‖∇W‖₂"}
LINE_STYLES = ("-", "--", ":", "-.")


def arms(ctx: pd.DataFrame) -> list[pd.Series]:
    """The context's groups, BN kinds first (as figures 1-6 order them), then by weight decay."""
    sort = [c for c in ("bn", "norm.kind", "optim.weight_decay") if c in ctx]   # bn: "on" before "off"
    return [g for _, g in ctx.sort_values(sort, ascending=[c != "bn" for c in sort], kind="stable").iterrows()]


def _scale(ax, values: list[np.ndarray]) -> None:
    """Log y where every value is positive and they span more than LOG_RATIO (a no-BN landscape at a
    large lr reaches thousands where the BN one stays near 1: linear would flatten the BN band)."""
    v = np.concatenate(values) if values else np.array([])
    v = v[np.isfinite(v)]
    if len(v) and v.min() > 0 and v.max() / v.min() > LOG_RATIO:
        ax.set_yscale("log")
    else:
        F._few_ticks(ax, x=False)
    ax.xaxis.set_major_locator(F.MaxNLocator(5))
    ax.grid(alpha=0.3)


def fig_landscape(ctx: pd.DataFrame, means: pd.DataFrame, title: str, path: Path) -> Path:
    """One panel per whole-model instrument measured: (a) and (b) as bands, (c) as a line."""
    means = own(ctx, means)
    panels = [p for p in LANDSCAPE_PANELS if M.statistics(means, p[0])]
    fig, axs = F._new(PANEL_W, PANEL_H, 1, len(panels), wspace=0.35)
    for ax, (inst, lo_stat, hi_stat, name, ylabel) in zip(axs[0], panels):
        seen = []
        for g in arms(ctx):
            st = F.style(g)
            lo = M.curve(means, g["group"], inst, "model", lo_stat)
            hi = M.curve(means, g["group"], inst, "model", hi_stat)
            both = lo.merge(hi, on="step", suffixes=("_lo", "_hi"))
            if both.empty:
                continue
            if lo_stat != hi_stat:
                ax.fill_between(both["step"], both["value_lo"], both["value_hi"], color=st["color"], alpha=0.3,
                                lw=0, label=f"{st['label']} (min..max)")
                ax.plot(both["step"], both["value_lo"], color=st["color"], lw=0.8)
            ax.plot(both["step"], both["value_hi"], color=st["color"], lw=1.2 if lo_stat != hi_stat else 1.6,
                    label=st["label"])
            seen += [both["value_lo"].to_numpy(), both["value_hi"].to_numpy()]
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel, fontsize=9)
        _scale(ax, seen)
    F._titles(fig, title, axs)
    return F._save(fig, path)


def fig_per_layer(ctx: pd.DataFrame, means: pd.DataFrame, instrument: str, stats: list[str], layers: list[str],
                  title: str, path: Path, by_weight_decay: bool = False) -> Path:
    """Rows = statistics of `instrument`, columns = layers (first-appearance order), one line per
    group; with `by_weight_decay`, line style and label say the group's optim.weight_decay."""
    fig, axs = F._new(2.6, 2.2, len(stats), len(layers), wspace=0.35)
    decays = sorted({float(g.get("optim.weight_decay", 0.0) or 0.0) for g in arms(ctx)})
    for r, stat in enumerate(stats):
        for c, layer in enumerate(layers):
            ax, seen = axs[r, c], []
            for g in arms(ctx):
                st = F.style(g)
                label, ls = st["label"], "-"
                if by_weight_decay:
                    wd = float(g.get("optim.weight_decay", 0.0) or 0.0)
                    label, ls = f"{label}, weight decay {fmt_value(wd)}", LINE_STYLES[decays.index(wd) % 4]
                cv = M.curve(means, g["group"], instrument, layer, stat)
                if len(cv):
                    ax.plot(cv["step"], cv["value"], color=st["color"], ls=ls, lw=1.4, label=label)
                    seen.append(cv["value"].to_numpy())
            if r == 0:
                ax.set_title(layer, fontsize=9)
            if c == 0:
                ax.set_ylabel(YLABELS.get(stat, stat), fontsize=9)
            if r == len(stats) - 1:
                ax.set_xlabel("training step")
            ax.tick_params(labelsize=7)
            _scale(ax, seen)
    F._titles(fig, title, axs)
    return F._save(fig, path)


def own(ctx: pd.DataFrame, means: pd.DataFrame) -> pd.DataFrame:
    """The seed means of the context's groups only (its layers and statistics are drawn, not others')."""
    return means[means["group"].isin(ctx["group"])]


def fig_ics(ctx: pd.DataFrame, means: pd.DataFrame, title: str, path: Path) -> Path:
    means = own(ctx, means)
    return fig_per_layer(ctx, means, "ics", M.statistics(means, "ics"), M.layers(means, "ics"), title, path)


def fig_saturation(ctx: pd.DataFrame, means: pd.DataFrame, title: str, path: Path) -> Path:
    means = own(ctx, means)
    return fig_per_layer(ctx, means, "saturation", M.statistics(means, "saturation"),
                         M.layers(means, "saturation"), title, path)


def fig_effective_step(ctx: pd.DataFrame, means: pd.DataFrame, title: str, path: Path) -> Path:
    """Only the scale-invariant layers (those with an effective step); ||W|| below shows why it moves."""
    means = own(ctx, means)
    stats = [s for s in ("effective_step", "weight_norm") if s in M.statistics(means, "weights")]
    return fig_per_layer(ctx, means, "weights", stats, M.layers(means, "weights", "effective_step"), title, path,
                         by_weight_decay=True)
