"""The report's tables as display DataFrames (formatted strings); the CSVs keep the raw numbers.

Also the reference-comparison section, which is one table per reference set.
"""
from __future__ import annotations

import math

import pandas as pd

from bnexp import layout as L
from bnexp.reference import ReferenceData
from bnexp.report import aggregate as agg
from bnexp.report import render as R
from bnexp.report.compare import tolerance_text


def fmt_stat(mean: float, std: float, n: int, digits: int = 4) -> str:
    """'0.1000 ± 0.0020 (n=3)'; n=1 has no std; n=0 (all seeds diverged) is a dash."""
    if not n or not math.isfinite(mean):
        return "—"
    if n == 1 or not math.isfinite(std):
        return f"{mean:.{digits}f} (n={n})"
    return f"{mean:.{digits}f} ± {std:.{digits}f} (n={n})"


def fmt_cell(x, spec: str = ".4f") -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def groups_display(groups: pd.DataFrame, other: list[str]) -> pd.DataFrame:
    d = pd.DataFrame({"group": groups["group"]})
    for key, short in agg.MAIN_KEYS:
        d[short] = groups[key].map(agg.fmt_value) if key in groups else ""
    if other:
        d["other"] = groups.apply(lambda r: agg.other_text(r, other), axis=1)
    d["seeds"] = groups["n_runs"].astype(int).astype(str)
    d["outcome"] = groups["outcome"]
    for m in L.FINAL_METRICS:
        d[m.replace("_", " ")] = [fmt_stat(a, s, n) for a, s, n in
                                  zip(groups[f"{m}_mean"], groups[f"{m}_std"], groups[f"{m}_n"])]
    return d


def data_parallel_display(groups: pd.DataFrame) -> pd.DataFrame:
    """The groups of a data-parallel comparison: processes, global batch, what BN's statistics span
    (each process's shard with per-process statistics, the whole batch on one process, which is
    also what norm.sync=true computes on several), and the final numbers."""
    d = pd.DataFrame({"group": groups["group"], "processes": groups["nproc"].astype(int).astype(str),
                      "global batch": groups["batch_size"].astype(int).astype(str)})
    d["BN statistics over"] = [f"{b // n} images on each process" if n > 1 else f"the {b} images of the batch"
                               for b, n in zip(groups["batch_size"].astype(int), groups["nproc"].astype(int))]
    d["seeds"] = groups["n_runs"].astype(int).astype(str)
    for m in ("train_loss", "test_acc"):
        d[m.replace("_", " ")] = [fmt_stat(a, s, n) for a, s, n in
                                  zip(groups[f"{m}_mean"], groups[f"{m}_std"], groups[f"{m}_n"])]
    return d


def pairs_display(pairs: pd.DataFrame) -> pd.DataFrame:
    d = pd.DataFrame({"BN group": pairs["group_bn"], "no-BN group": pairs["group_no_bn"]})
    for key, short in agg.MAIN_KEYS:
        d[short] = pairs[key].map(agg.fmt_value)
    for m in ("train_loss", "test_acc"):
        name = m.replace("_", " ")
        d[f"{name} BN"] = pairs[f"{m}_bn"].map(fmt_cell)
        d[f"{name} no BN"] = pairs[f"{m}_no_bn"].map(fmt_cell)
        d[f"Δ {name}"] = pairs[f"{m}_delta"].map(lambda x: fmt_cell(x, "+.4f"))
    d["outcome BN / no BN"] = pairs["outcome_bn"] + " / " + pairs["outcome_no_bn"]
    return d


def _ref_value(r: pd.Series) -> str:
    if pd.notna(r["ref_value"]):
        return f"{r['ref_value']:g}"
    return f"{r['ref_low']:g} – {r['ref_high']:g}" if pd.notna(r["ref_low"]) else "—"


def reference_display(table: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "reference": table["label"], "metric": table["metric"],
        "reference value": table.apply(_ref_value, axis=1),
        "ours (mean ± std, n)": [fmt_stat(m, s, int(n) if pd.notna(n) else 0) for m, s, n in
                                 zip(table["mean"], table["std"], table["n"])],
        "difference": table["diff"].map(lambda x: fmt_cell(x, "+.4f")),
        "tolerance": table["tolerance"].map(lambda x: fmt_cell(x, ".3f")),
        "group": table["group"].map(lambda g: g if isinstance(g, str) else ""), "verdict": table["verdict"],
        "to produce": table["command"].map(lambda c: f"`{c}`" if c else ""),
    })


def reference_blocks(table: pd.DataFrame, refdata: ReferenceData) -> list[R.Block]:
    """One table per reference set (comparable ones), then one line per not-comparable set."""
    b: list[R.Block] = [
        R.Text("Each reference number next to the run groups with the same model, data, optimiser, lr, "
               "batch size, epochs and BN arm, on the full data sets (all numbers: reference.csv). Tolerances:"),
        R.Bullets(tolerance_text(refdata))]
    off = table["quality"] == "not_comparable"
    for name, t in table[~off].groupby("set", sort=False):
        r = t.iloc[0]
        src = refdata.sources[r["source"]]["title"]
        extra = f" **Approximate:** {r['reason']}." if r["quality"] == "approximate" else ""
        notes = "; ".join(f"{lab}: {n}" for lab, n in zip(t["label"], t["note"]) if n)
        b += [R.Heading(name, 3), R.Text(f"Source: {src}. Metric: {r['metric_text']}.{extra}"
                                          + (f" Notes: {notes}." if notes else "")),
              R.Table(reference_display(t))]
    lines = []
    for name, t in table[off].groupby("set", sort=False):
        vals = ", ".join(f"{r['label']} {r['metric']} {_ref_value(r)}" for _, r in t.iterrows())
        lines.append(f"**{name}** ({t['source'].iloc[0]}): {t['reason'].iloc[0]}. Values: {vals}")
    if lines:
        b += [R.Heading("Not comparable", 3), R.Bullets(lines)]
    b += [R.Text("Sources:"), R.Bullets([f"**{k}**: {s['title']}" + (f" ({s['url']})" if s.get("url") else "")
                                         for k, s in refdata.sources.items()])]
    return b


def split_display(runs_tab: pd.DataFrame, groups: pd.DataFrame) -> pd.DataFrame:
    """Per-seed rows of the groups whose seeds ended differently (e.g. dead in 1 of 3)."""
    split = groups[groups["outcome"].str.contains(" of ", regex=False)]
    r = runs_tab[runs_tab["group"].isin(split["group"])].sort_values(["group", "seed"])
    return pd.DataFrame({"group": r["group"], "group outcome": r["group"].map(dict(zip(split["group"],
                         split["outcome"]))), "seed": r["seed"].map(agg.fmt_value), "outcome": r["outcome"],
                         "evidence": r["outcome_why"],
                         "train loss": r["train_loss"].map(fmt_cell), "test acc": r["test_acc"].map(fmt_cell),
                         "run": r["run_id"]})
