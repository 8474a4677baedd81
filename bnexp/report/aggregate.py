"""Run outcomes (bnexp.outcome's labels), seed groups with mean +- std (n), BN vs no-BN pairs.

A group is every aggregated run (completed or diverged) that shares its config except the keys
in load.NOT_DEFINING (the seed above all). Means and stds are over the seeds that did not
diverge; std is the sample std (ddof=1), so it is empty for n=1.
"""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pandas as pd

from bnexp import layout as L
from bnexp import outcome as O
from bnexp.config import default_dropout
from bnexp.reference import RUN_METRICS
from bnexp.report.load import NOT_DEFINING, Runs, same_value

METRICS = RUN_METRICS
OUTCOMES = O.LABELS
# Columns that name a group in tables (config key, short header); the rest go to "other".
MAIN_KEYS = (("model.name", "model"), ("data.name", "data"), ("norm.kind", "norm"),
             ("optim.name", "optim"), ("lr", "lr"), ("batch_size", "batch"), ("epochs", "epochs"))
ARM_KEYS = ("bn", "norm.kind", "norm.eps", "norm.momentum", "norm.biased_running_var")
AUTO_DROPOUT = {"on": (None, default_dropout("bn")), "off": (None, default_dropout("none"))}   # model.dropout null


def classify(runs: Runs, num_classes: dict[str, int]) -> pd.DataFrame:
    """Per run: `outcome` (bnexp.outcome's label for completed and diverged runs, else the status:
    running / interrupted / failed) and `outcome_why` (its evidence in a few words)."""
    df = runs.runs
    by_run = {r: e.sort_values("epoch") for r, e in runs.epochs.groupby("run_id", observed=True)}
    labels, whys = [], []
    for _, r in df.iterrows():
        if r["status"] not in L.FINISHED:
            labels.append(r["status"])
            whys.append("")
            continue
        e = by_run.get(r["run_id"])
        losses = e["train_loss"].tolist() if e is not None and len(e) else [r["train_loss"]]
        accs = e["train_acc"].tolist() if e is not None and len(e) else [r["train_acc"]]
        losses[-1], accs[-1] = float(r["train_loss"]), float(r["train_acc"])  # run.json's final numbers
        activation, position = r.get("model.activation"), r.get("model.norm_position")
        probe = (lambda d=r["dir"], a=activation, p=position: O.relu_probe(d, _text(a), _text(p))) \
            if r.get("has_activations", False) else (lambda: None)
        o = O.classify(r["status"], num_classes.get(r["data.name"]), losses, accs, probe)
        labels.append(o.label)
        whys.append(o.why)
    return pd.DataFrame({"outcome": labels, "outcome_why": whys}, index=df.index)


def _text(v) -> str | None:
    """A config value that may be missing (NaN in the runs table: a run made before the key existed)."""
    return v if isinstance(v, str) else None


def outcome_summary(outcomes: list[str]) -> str:
    """['dead', 'trained', 'trained'] -> 'dead in 1 of 3 seeds'; uniform -> 'all trained'."""
    n, counts = len(outcomes), Counter(outcomes)
    if len(counts) == 1:
        return outcomes[0] if n == 1 else f"all {outcomes[0]}"
    return ", ".join(f"{o} in {counts[o]} of {n} seeds" for o in OUTCOMES if o in counts and o != "trained")


def defining_keys(config_keys: list[str]) -> list[str]:
    return [k for k in config_keys if k not in NOT_DEFINING]


def aggregate(runs: Runs, num_classes: dict[str, int], outcomes: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per group: config, group id (G1..), n_runs, seeds, outcomes, mean/std/n per metric.
    `outcomes` is classify's table when the caller already has it (it reads probes from disk)."""
    df = runs.runs.join(classify(runs, num_classes) if outcomes is None else outcomes)
    df = df[df["status"].isin(L.FINISHED)]
    # Runs of one group that share a seed differ only in how they ran or were observed (device, threads,
    # instruments): one experiment, counted once (the first by run id), so n and std count seeds.
    df = df.sort_values("run_id", kind="stable").drop_duplicates(["group_key", "seed"]) if "seed" in df else df
    keys = defining_keys(runs.config_keys)
    if df.empty:
        return pd.DataFrame(columns=["group", "group_key", *keys, "n_runs", "outcome"])
    masked = df[list(METRICS)].where(df["outcome"] != O.DIVERGED)
    g = masked.groupby(df["group_key"], sort=False)
    stats = pd.concat({"mean": g.mean(), "std": g.std(ddof=1), "n": g.count()}, axis=1)
    stats.columns = [f"{m}_{s}" for s, m in stats.columns]
    by = df.groupby("group_key", sort=False)
    # groupby.first() would skip NaN (a null key); take the first run's config verbatim
    first = df.drop_duplicates("group_key").set_index("group_key")[keys]
    out = first.join(stats)
    out["n_runs"] = by.size()
    out["seeds"] = by["seed"].agg(lambda s: " ".join(str(x) for x in sorted(s))) if "seed" in df else ""
    out["outcome"] = by["outcome"].agg(lambda s: outcome_summary(list(s)))
    for o in OUTCOMES:
        out[count_column(o)] = by["outcome"].agg(lambda s, o=o: int((s == o).sum()))
    out = out.reset_index()
    sort = [k for k, _ in MAIN_KEYS if k in out] + ["bn"] * ("bn" in out)
    out = out.sort_values(sort, kind="stable", na_position="first").reset_index(drop=True)
    out.insert(0, "group", [f"G{i + 1}" for i in range(len(out))])
    return out


def count_column(label: str) -> str:
    """The groups table's column counting a label's seeds: n_dead, n_at_chance_so_far, ..."""
    return "n_" + label.replace(" ", "_")


def with_outcomes(runs: Runs, groups: pd.DataFrame, outcomes: pd.DataFrame) -> pd.DataFrame:
    """The runs table with `outcome`, `outcome_why` (classify's) and `group` (G-id, empty for running/failed)."""
    ids = dict(zip(groups["group_key"], groups["group"]))
    df = runs.runs.join(outcomes)
    return df.assign(group=[ids.get(k, "") for k in df["group_key"]])


def varying_keys(groups: pd.DataFrame, keys: list[str]) -> list[str]:
    """Defining keys outside MAIN_KEYS whose value differs between groups (shown as 'other')."""
    main = {k for k, _ in MAIN_KEYS} | {"bn"}
    return [k for k in keys if k not in main and k in groups
            and groups[k].map(lambda v: str(v) if v is not None and v == v else "null").nunique() > 1]


def other_text(row: pd.Series, keys: list[str]) -> str:
    return ", ".join(f"{k}={fmt_value(row[k])}" for k in keys)


def fmt_value(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "null"
    return f"{v:g}" if isinstance(v, float) else str(v)


# ---------------------------------------------------------------- BN vs no-BN

def context_key(row: pd.Series, keys: list[str], drop: tuple[str, ...] = ()) -> str:
    """A group's config without its BN arm (bn, norm.*, model.dropout) and without `drop` keys."""
    skip = set(ARM_KEYS) | {"model.dropout"} | set(drop)
    return repr([(k, fmt_value(row[k])) for k in keys if k not in skip and not k.startswith("norm.")])


def dropout_compatible(on: pd.Series, off: pd.Series) -> bool:
    """Same dropout, or both follow the automatic rule (0.5 without BN, none with BN)."""
    d_on, d_off = on.get("model.dropout"), off.get("model.dropout")
    if same_value(d_on, d_off):
        return True
    return any(same_value(d_on, a) for a in AUTO_DROPOUT["on"]) and \
        any(same_value(d_off, a) for a in AUTO_DROPOUT["off"])


def bn_pairs(groups: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Pairs of groups that differ only in the BN arm: BN mean, no-BN mean and delta per metric."""
    if groups.empty or "bn" not in groups:
        return pd.DataFrame()
    ctx = groups.apply(lambda r: context_key(r, keys), axis=1)
    rows = []
    for _, idx in groups.groupby(ctx, sort=False).groups.items():
        bucket = groups.loc[idx]
        for _, on in bucket[bucket["bn"] == "on"].iterrows():
            for _, off in bucket[bucket["bn"] == "off"].iterrows():
                if dropout_compatible(on, off):
                    rows.append(_pair_row(on, off))
    return pd.DataFrame(rows)


def _pair_row(on: pd.Series, off: pd.Series) -> dict:
    row = {"group_bn": on["group"], "group_no_bn": off["group"],
           **{k: on.get(k) for k, _ in MAIN_KEYS if k != "norm.kind"}, "norm.kind": on.get("norm.kind"),
           "outcome_bn": on["outcome"], "outcome_no_bn": off["outcome"]}
    for m in L.FINAL_METRICS:
        a, b = on[f"{m}_mean"], off[f"{m}_mean"]
        row.update({f"{m}_bn": a, f"{m}_no_bn": b, f"{m}_delta": a - b})
    return row
