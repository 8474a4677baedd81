"""Drawing the report's figures (PNG, matplotlib's Agg canvas, no pyplot state).

1 loss vs iteration, one panel per lr; 2 final loss / test accuracy vs lr; 3 the same vs batch
size; 4 activation distributions against N(0,1); 5 train vs test accuracy per epoch; 6 Ioffe &
Szegedy's Figure 1 (test accuracy vs step, percentiles of a last-hidden-layer sigmoid input);
7-10, the instruments' measures.csv, are drawn by fig_measures with the helpers here.
Each function draws one *context* (run groups equal but for the BN arm and the swept key; see
figure_plan). Colours are fixed per norm kind in every figure: BN blue, torch.nn BN light blue,
no BN orange. Layout uses fixed margins: tight_layout would cost a second full draw.
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from bnexp import layout as L
from bnexp import outcome as O
from bnexp.report.aggregate import fmt_value


COLORS = {"bn": "#1f5fbf", "torch": "#5fa8e8", "none": "#d9480f", "gn": "#2a9d8f", "ln": "#8e44ad",
          "in": "#b8860b", "brn": "#c2185b", "ghost": "#546e7a", "noisy": "#6d4c41"}
OTHER_BN_COLOR = "#2a9d8f"                 # a norm kind without a colour of its own
LABELS = {"bn": "BN", "torch": "BN (torch.nn)", "none": "no BN", "gn": "GN", "ln": "LN", "in": "IN",
          "brn": "BRN", "ghost": "ghost BN", "noisy": "noisy BN"}
MAX_PANELS = 6                             # learning rates per figure (evenly thinned beyond)
STEP_POINTS = 300                          # step curves are binned to at most this many points
DPI = 100
SEED_OFFSET, SEED_SPREAD = 0.035, 0.012   # figures 2, 3: seed dots at x * 10**(decades * (offset + spread * k))


def style(group: pd.Series) -> dict:
    kind = str(group.get("norm.kind"))
    color = COLORS.get(kind, OTHER_BN_COLOR if group.get("bn") == "on" else COLORS["none"])
    return {"color": color, "label": LABELS.get(kind, kind)}


def _new(panel_w: float, panel_h: float, nrows: int, ncols: int, wspace: float = 0.3, **kw):
    """A figure of nrows x ncols panels of the given size (inches) with fixed margins: no
    tight_layout, which costs a second full draw per figure (the report's main expense)."""
    left, right, bottom, top, hgap = 0.95, 0.2, 0.6, 0.95, 0.65
    w = max(6.5, left + right + ncols * panel_w + (ncols - 1) * wspace * panel_w)   # room for title + legend
    h = bottom + top + nrows * panel_h + (nrows - 1) * hgap
    fig = Figure(figsize=(w, h), dpi=DPI)
    FigureCanvasAgg(fig)
    axs = fig.subplots(nrows, ncols, squeeze=False, **kw)
    fig.subplots_adjust(left=left / w, right=1 - right / w, bottom=bottom / h, top=1 - top / h,
                        wspace=wspace, hspace=hgap / panel_h)
    return fig, axs


TITLE_LINE = 0.2                           # inches per title line (11 pt)
# a seed's marker in figures 2 and 3 by its outcome (diverged seeds: a cross at the top edge)
SEED_MARKERS = {O.TRAINED: "o", O.AT_CHANCE: "s", O.UNSTABLE: "^", O.DEAD: "v"}
SEED_SHAPES = f"circle {O.TRAINED}, square {O.AT_CHANCE}, triangle up {O.UNSTABLE}, triangle down {O.DEAD}"  # captions
LEGEND_ROW = 0.2                           # inches per legend row (8 pt)


def title_lines(title: str, width_in: float) -> list[str]:
    """The title wrapped at commas/spaces to the figure's width (about 11 characters per inch at
    11 pt, with a margin): never cut, the figure grows a line instead."""
    return textwrap.wrap(title, max(30, int(width_in * 11.5))) or [""]


def _titles(fig: Figure, title: str, axes) -> None:
    """Title on the first line(s), wrapped to the figure's width; one legend for all panels below
    it, in as many rows as its entries need. The figure grows taller by one line per extra title
    line or legend row (the panels keep their size): nothing is cut at the right edge."""
    seen: dict[str, object] = {}
    for ax in np.ravel(axes):
        for handle, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, handle)
    lines = title_lines(title, fig.get_figwidth())
    # an entry is about 0.45 in of handle and padding plus 0.07 in per character at 8 pt
    entry = 0.45 + 0.07 * max((len(k) for k in seen), default=0)
    ncol = max(1, min(8, len(seen), int((fig.get_figwidth() - 0.1) / entry)))
    rows = math.ceil(len(seen) / ncol) if seen else 1
    extra = (len(lines) - 1) * TITLE_LINE + (rows - 1) * LEGEND_ROW
    if extra:
        h0, sp = fig.get_figheight(), fig.subplotpars
        top_in, bottom_in = (1 - sp.top) * h0, sp.bottom * h0
        h = h0 + extra
        fig.set_figheight(h)
        fig.subplots_adjust(top=1 - (top_in + extra) / h, bottom=bottom_in / h)
    h = fig.get_figheight()
    shift = (len(lines) - 1) * TITLE_LINE
    fig.suptitle("\n".join(lines), fontsize=11, x=0.01, y=1 - 0.08 / h, ha="left", va="top", linespacing=1.1)
    if seen:
        fig.legend(list(seen.values()), list(seen.keys()), loc="upper left",
                   bbox_to_anchor=(0.005, 1 - (0.3 + shift) / h),
                   fontsize=8, frameon=False, ncol=ncol, handlelength=2.2)


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    return path


def _chance(ctx: pd.DataFrame, num_classes: dict[str, int]) -> int | None:
    return num_classes.get(str(ctx["data.name"].iloc[0])) if "data.name" in ctx else None


def _thin(values: list, n: int) -> list:
    if len(values) <= n:
        return values
    return [values[i] for i in np.linspace(0, len(values) - 1, n).round().astype(int)]


def _chance_line(ax, y: float | None, text: str) -> None:
    if y is not None:
        ax.axhline(y, color="0.45", lw=0.9, ls=":")
        ax.annotate(text, (0.01, y), xycoords=("axes fraction", "data"), fontsize=7, color="0.35",
                    va="bottom")


# ---------------------------------------------------------------- data prepared once

def binned_steps(steps: pd.DataFrame, run_group: pd.Series) -> tuple[pd.DataFrame, dict[str, float]]:
    """Per run: step losses averaged over bins of steps (<= STEP_POINTS per curve, same bins for
    every run of a group), and the steps per epoch of each group (to place epoch means on the
    iteration axis). np.bincount instead of a groupby: hundreds of thousands of steps."""
    empty = pd.DataFrame(columns=["group", "run_id", "bin", "step", "loss"])
    if steps.empty:
        return empty, {}
    run = steps["run_id"].astype("category")
    names = np.asarray(run.cat.categories, dtype=object)
    group_of = pd.Series(names).map(run_group).to_numpy()           # per category; NaN = not aggregated
    codes = run.cat.codes.to_numpy().astype(np.int64)   # int8/int16 codes would overflow in `key`
    step, epoch = steps["step"].to_numpy(float), steps["epoch"].to_numpy(float)
    loss = steps["loss"].to_numpy(float)
    n = len(names)
    max_step = np.zeros(n)
    np.maximum.at(max_step, codes, step)
    max_epoch = np.zeros(n)
    np.maximum.at(max_epoch, codes, epoch)
    per_run = pd.DataFrame({"group": group_of, "max_step": max_step, "spe": max_step / np.maximum(max_epoch, 1)})
    per_run = per_run[per_run["group"].notna()]
    if per_run.empty:
        return empty, {}
    spe = per_run.groupby("group")["spe"].median().to_dict()
    width = (per_run["group"].map(per_run.groupby("group")["max_step"].max()) // STEP_POINTS + 1).reindex(range(n))
    width = width.fillna(1).to_numpy()
    nb = STEP_POINTS + 1
    keep = pd.notna(group_of[codes])                       # steps of aggregated runs only
    codes, step, loss = codes[keep], step[keep], loss[keep]
    key = codes * nb + ((step - 1) // width[codes]).astype(np.int64)
    ok = np.isfinite(loss)
    total = np.bincount(key, minlength=n * nb)
    finite = np.bincount(key, weights=ok, minlength=n * nb)
    loss_sum = np.bincount(key, weights=np.where(ok, loss, 0.0), minlength=n * nb)
    step_sum = np.bincount(key, weights=step, minlength=n * nb)
    idx = np.flatnonzero(total)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = pd.DataFrame({"group": group_of[idx // nb], "run_id": names[idx // nb], "bin": idx % nb,
                            "step": step_sum[idx] / total[idx], "loss": loss_sum[idx] / finite[idx]})
    return out, spe


def epoch_stats(epochs: pd.DataFrame, run_group: pd.Series, cols: tuple[str, ...]) -> pd.DataFrame:
    """Per group and epoch: mean, min and max over seeds of each column in `cols`."""
    e = epochs[epochs["run_id"].isin(run_group.index)]
    e = e.assign(group=e["run_id"].map(run_group).to_numpy())
    e = e.replace([np.inf, -np.inf], np.nan)
    out = e.groupby(["group", "epoch"])[list(cols)].agg(["mean", "min", "max"])
    out.columns = [f"{c}_{s}" for c, s in out.columns]
    return out.reset_index()


def _few_ticks(ax, x: bool = True) -> None:
    """At most 5 ticks per axis: ticks are most of matplotlib's drawing time."""
    if x:
        ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.yaxis.set_major_locator(MaxNLocator(5))
    ax.grid(alpha=0.3)


# ---------------------------------------------------------------- figure 1: loss curves per lr

def mark_clipped(ax, top: float) -> int:
    """For each line of `ax` with values above the y limit `top`: a triangle at the top edge where
    its maximum is, annotated with that value (a spike must not vanish silently). Returns how many."""
    n = 0
    for line in list(ax.get_lines()):
        x, y = np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)
        ok = np.isfinite(y)
        if not ok.any() or np.nanmax(y) <= top:
            continue
        i = int(np.nanargmax(np.where(ok, y, -np.inf)))
        ax.plot([x[i]], [0.985], transform=ax.get_xaxis_transform(), marker="^", ms=6, color=line.get_color(),
                clip_on=False, lw=0, gid="clipped")
        ax.annotate(f"max {y[i]:.3g}", (x[i], 0.985), xycoords=("data", "axes fraction"), xytext=(4, -3),
                    textcoords="offset points", fontsize=7, color=line.get_color(), va="top")
        n += 1
    return n


def fig_loss(ctx: pd.DataFrame, steps_b: pd.DataFrame, spe: dict[str, float], ep: pd.DataFrame,
             num_classes: dict, title: str, path: Path) -> Path:
    """One panel per lr: binned step losses (line) and per-epoch means (dots at mid-epoch on the
    iteration axis, bars = seed range). Without steps.csv: epoch means vs epoch."""
    lrs = _thin(sorted(ctx["lr"].unique()), MAX_PANELS)
    fig, axs = _new(3.0, 2.9, 1, len(lrs), wspace=0.08, sharey="row")
    C = _chance(ctx, num_classes)
    tops = []
    for ax, lr in zip(axs[0], lrs):
        per = 1.0
        for _, g in ctx[ctx["lr"] == lr].iterrows():
            st, e = style(g), ep[ep["group"] == g["group"]]
            sb = steps_b[steps_b["group"] == g["group"]]
            per = spe.get(g["group"], per)
            x = (e["epoch"] - 0.5) * per if len(sb) else e["epoch"]
            if " of " in str(g["outcome"]):      # seeds split (e.g. dead in 1 of 3): a mean would mislead
                for k, (_, r) in enumerate(sb.groupby("run_id", observed=True)):
                    ax.plot(r["step"], r["loss"], lw=0.9, alpha=0.7, color=st["color"],
                            label=f"{st['label']} (each seed)" if k == 0 else None)
                tops.append(sb["loss"].to_numpy())
                continue
            mean = sb.groupby("bin")[["step", "loss"]].mean()
            if len(mean):
                ax.plot(mean["step"], mean["loss"], lw=1.0, alpha=0.85, **st)
                st = {**st, "label": st["label"] + " (epoch mean)"}
            ax.plot(x, e["train_loss_mean"], marker="o", ms=3, lw=0 if len(mean) else 1.4, **st)
            ax.vlines(x, e["train_loss_min"], e["train_loss_max"], color=st["color"], lw=1, alpha=0.6)
            tops += [mean["loss"].to_numpy(), e["train_loss_max"].to_numpy()]
        ax.set_title(f"lr = {lr:g}", fontsize=10)
        has_steps = bool(len(steps_b[steps_b["group"].isin(ctx["group"])]))
        ax.set_xlabel(f"iteration ({per:.0f} per epoch)" if has_steps else "epoch")
        _few_ticks(ax)
        if not has_steps:
            ax.xaxis.set_major_locator(MaxNLocator(5, integer=True))
    vals = np.concatenate(tops) if tops else np.array([np.nan])
    top = np.nanpercentile(vals, 98) * 1.1 if np.isfinite(vals).any() else 1.0
    top = max(top, math.log(C) * 1.12 if C else 0.0)
    axs[0, 0].set_ylim(0, top)
    for ax in axs[0]:
        mark_clipped(ax, top)
    for ax in axs[0]:
        _chance_line(ax, math.log(C) if C else None, f"chance ln {C}")
    axs[0, 0].set_ylabel("training loss")
    _titles(fig, title, axs)
    return _save(fig, path)


# ---------------------------------------------------------------- figure 5: train vs test accuracy

def fig_generalization(ctx: pd.DataFrame, ep: pd.DataFrame, num_classes: dict, title: str, path: Path) -> Path:
    lrs = _thin(sorted(ctx["lr"].unique()), MAX_PANELS)
    fig, axs = _new(3.0, 2.9, 1, len(lrs), wspace=0.08, sharey="row")
    C = _chance(ctx, num_classes)
    for ax, lr in zip(axs[0], lrs):
        for _, g in ctx[ctx["lr"] == lr].iterrows():
            st, e = style(g), ep[ep["group"] == g["group"]]
            ax.plot(e["epoch"], e["train_acc_mean"], color=st["color"], lw=1.6, label=st["label"] + " train")
            ax.plot(e["epoch"], e["test_acc_mean"], color=st["color"], lw=1.6, ls="--", label=st["label"] + " test")
        ax.set_title(f"lr = {lr:g}", fontsize=10)
        ax.set_xlabel("epoch")
        _chance_line(ax, 1 / C if C else None, "chance")
        _few_ticks(ax)
        ax.xaxis.set_major_locator(MaxNLocator(5, integer=True))     # epochs are whole numbers
    axs[0, 0].set_ylabel("accuracy (mean over seeds)")
    _titles(fig, title, axs)
    return _save(fig, path)


# ---------------------------------------------------------------- figures 2 and 3: sweeps

def fig_sweep(ctx: pd.DataFrame, runs: pd.DataFrame, x_key: str, xlabel: str, log_base: int,
              num_classes: dict, title: str, path: Path) -> Path:
    """Final training loss and test accuracy vs `x_key`: mean +- std per BN arm, hollow markers per
    seed (shaped by its outcome label), crosses at the top for diverged seeds."""
    fig, axs = _new(4.6, 3.2, 1, 2, wspace=0.3)
    C = _chance(ctx, num_classes)
    panels = (("train_loss", "final training loss"), ("test_acc", "final test accuracy"))
    series = ctx.groupby(["bn", "norm.kind"], sort=False, dropna=False)
    xs = sorted(ctx[x_key].unique())
    span = max(math.log10(xs[-1] / xs[0]), 0.3) if xs[0] > 0 else 1.0   # decades shown: offsets scale with it
    for ax, (metric, ylabel) in zip(axs[0], panels):
        for _, s in series:
            s = s.sort_values(x_key)
            st = style(s.iloc[0])
            ax.errorbar(s[x_key], s[f"{metric}_mean"], yerr=s[f"{metric}_std"].fillna(0), marker="o", ms=6,
                        capsize=3, lw=1.5, zorder=3, color=st["color"], label=f"{st['label']} mean ± std")
            r = runs[runs["group"].isin(s["group"])]
            ok, div = r[r["outcome"] != O.DIVERGED], r[r["outcome"] == O.DIVERGED]
            # seeds: small hollow markers just right of the mean, spread apart (a factor on the log axis);
            # the marker says the seed's outcome (bnexp.outcome) where it is not "trained"
            k = ok.groupby(x_key).cumcount() - 0.5 * (ok.groupby(x_key)[x_key].transform("size") - 1)
            jitter = 10 ** (span * (SEED_OFFSET + SEED_SPREAD * k))
            for label, mark in SEED_MARKERS.items():
                sel = (ok["outcome"] == label).to_numpy()
                if sel.any():
                    name = f"{st['label']} each seed" if label == O.TRAINED else f"{label} seed"
                    ax.scatter(ok[x_key][sel] * jitter[sel], ok[metric][sel], s=14 if label == O.TRAINED else 26,
                               marker=mark, facecolors="none", edgecolors=st["color"], lw=0.9, zorder=4, label=name)
            if len(div):
                ax.scatter(div[x_key], np.full(len(div), 0.96), transform=ax.get_xaxis_transform(),
                           marker="x", s=30, color=st["color"], label=f"{O.DIVERGED} seed")
        ax.set_xscale("log", base=log_base)
        ax.set_xticks(xs, [fmt_value(x) for x in xs])
        ax.minorticks_off()
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        _few_ticks(ax, x=False)
        if C:
            _chance_line(ax, math.log(C) if metric == "train_loss" else 1 / C, "chance")
    _titles(fig, title + "  (filled: mean ± std; hollow, offset right: each seed)", axs)
    return _save(fig, path)


# ---------------------------------------------------------------- figure 4: activations

def read_activations(run_dir: Path) -> dict[tuple[int, str, str], np.ndarray]:
    """A run's activations.npz -> {(epoch, layer, where): values}; unreadable or odd keys are ignored."""
    out = {}
    try:
        with np.load(Path(run_dir) / L.ACTIVATIONS) as z:
            for key in z.files:
                parsed = L.parse_activation_key(key)
                if parsed and parsed[2] in L.PROBE_POINTS:
                    out[parsed] = np.asarray(z[key], dtype=np.float32).ravel()
    except Exception:  # noqa: BLE001  BadZipFile (truncated), bad CRC-32, EOFError, zlib.error, not an npz...
        return {}
    return out


def fig_activations(arms: list[tuple[pd.Series, dict]], title: str, path: Path) -> Path:
    """Rows = BN arms, columns = norm positions; the earliest probe (epoch 0 = initialisation, when
    activations.npz has it) filled, the last probed epoch as a line."""
    layers = list(dict.fromkeys(layer for _, acts in arms for (_, layer, _) in acts))
    fig, axs = _new(2.6, 2.0, len(arms), len(layers), wspace=0.25)
    for row, (run, acts) in enumerate(arms):
        st = style(run)
        epochs = sorted({e for e, _, _ in acts})
        # epoch 0 is the probe at initialisation (before any training): the natural "before" panel
        first, last = epochs[0], epochs[-1]
        what = "norm-layer output" if run["bn"] == "on" else "pre-activation"
        axs[row, 0].set_ylabel(f"{st['label']}\n{what}\n(seed {run.get('seed')})", fontsize=9)
        for col, layer in enumerate(layers):
            ax, text = axs[row, col], []
            data = {e: acts.get((e, layer, "output")) for e in (first, last)}
            data = {e: a[np.isfinite(a)] for e, a in data.items() if a is not None and np.isfinite(a).any()}
            both = np.concatenate(list(data.values())) if data else np.zeros(1)
            lo, hi = min(np.percentile(both, 0.5), -4.0), max(np.percentile(both, 99.5), 4.0)  # shared bins
            for epoch, alpha, fill in ((first, 0.35, True), (last, 1.0, False)):
                if epoch not in data:
                    continue
                a = data[epoch]
                dens, edges = np.histogram(a, bins=60, range=(lo, hi), density=True)
                ax.stairs(dens, edges, fill=fill, alpha=alpha, color=st["color"], lw=1.3,
                          label=f"{st['label']} " + ("epoch 0 (init)" if epoch == 0 else f"epoch {epoch}"))
                text.append(f"e{epoch}: {a.mean():.2f} ± {a.std():.2f}")
            x = np.linspace(*ax.get_xlim(), 200)
            ax.plot(x, np.exp(-x * x / 2) / math.sqrt(2 * math.pi), "k--", lw=1, label="N(0,1)")
            ax.text(0.98, 0.96, "\n".join(text), transform=ax.transAxes, ha="right", va="top", fontsize=7)
            ax.tick_params(labelsize=7)
            ax.xaxis.set_major_locator(MaxNLocator(5))
            ax.yaxis.set_major_locator(MaxNLocator(4))
            if row == 0:
                ax.set_title(layer, fontsize=9)
    _titles(fig, title, axs)
    return _save(fig, path)


# ---------------------------------------------------------------- figure 6: Ioffe & Szegedy 2015, Figure 1

PERCENTILES = (15, 50, 85)  # the paper's Figure 1(b, c)


def read_evals(run_dir: Path) -> pd.DataFrame:
    """evals.csv (step, epoch, test_loss, test_acc) of a run with eval_every > 0; empty if absent or unreadable."""
    try:
        e = pd.read_csv(run_dir / L.EVALS)
        return e if {"step", "test_acc"} <= set(e.columns) else pd.DataFrame()
    except (OSError, ValueError):
        return pd.DataFrame()


def fig_ioffe(arms: list[tuple[pd.Series, list[pd.DataFrame], dict, float]], title: str, path: Path) -> Path:
    """(a) test accuracy vs training step, mean over seeds per arm; then per arm, the 15th/50th/85th
    percentiles over training of the last hidden layer's sigmoid input (its norm output, or the
    pre-activation without a norm), over all of that layer's units on the probe batch.
    `arms`: (group row, each seed's evals, one seed's activations, steps per epoch)."""
    fig, axs = _new(3.2, 2.9, 1, 1 + len(arms), wspace=0.3)
    ax = axs[0, 0]
    for group, evals, _, _ in arms:
        st = style(group)
        both = pd.concat(evals).groupby("step")["test_acc"].mean()
        ax.plot(both.index, both.to_numpy(), lw=1.5, **st)
    ax.set_xlabel("training step")
    ax.set_ylabel("test accuracy (mean over seeds)")
    ax.set_title("(a) test accuracy", fontsize=10)
    _few_ticks(ax)
    for k, (group, _, acts, per_epoch) in enumerate(arms, start=1):
        ax, st = axs[0, k], style(group)
        layers = list(dict.fromkeys(lay for (_, lay, _) in acts))  # activations.npz keeps forward order
        layer = layers[-1] if layers else None
        points = sorted((e, v) for (e, lay, where), v in acts.items() if lay == layer and where == "output")
        if points:
            steps = [e * per_epoch for e, _ in points]
            qs = np.array([np.percentile(v[np.isfinite(v)], PERCENTILES) for _, v in points])
            for j, q in enumerate(PERCENTILES):
                ax.plot(steps, qs[:, j], color=st["color"], lw=1.8 if q == 50 else 1.0,
                        ls="-" if q == 50 else "--")
        where = layer.rsplit(".", 1)[0] if layer else "?"
        ax.set_title(f"({'bc'[k - 1] if k <= 2 else k}) {st['label']}: {where} sigmoid input", fontsize=9)
        ax.set_xlabel("training step")
        ax.set_ylabel("15th / 50th / 85th percentile")
        _few_ticks(ax)
    _titles(fig, title, axs)
    return _save(fig, path)
