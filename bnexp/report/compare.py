"""Reference comparison: each reference number of reference.yaml next to the run groups it matches.

Verdicts: "reproduced" (within tolerance), "not reproduced", "partly reproduced" (a dead/alive
reference where only some seeds agree), "no matching runs", "not comparable: <reason>".
Approximate matches (the reference configuration is unknown) say so in the verdict.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from bnexp import outcome as O
from bnexp.reference import Reference, ReferenceData
from bnexp.report.aggregate import count_column
from bnexp.report.load import matches

COLUMNS = ["set", "label", "source", "metric", "metric_text", "quality", "ref_value", "ref_low", "ref_high",
           "group", "mean", "std", "n", "n_runs", "outcome", "diff", "tolerance", "verdict", "command", "note",
           "reason"]


def tolerance_text(refdata: ReferenceData) -> list[str]:
    """The tolerances as sentences, printed in the report above the comparison table."""
    t = refdata.tolerances
    lo, acc = t["loss"], t["accuracy"]
    return [
        f"loss: |ours - reference| <= max({lo['abs']:g} absolute, {lo['rel']:.0%} of the reference), "
        f"or <= {lo['std_factor']:g} std of our seeds (n >= 2)",
        f"accuracy: |ours - reference| <= {acc['abs']:g} absolute, or <= {acc['std_factor']:g} std (n >= 2)",
        f"a reference marked dead compares by outcome: reproduced when every seed of the group is {O.DEAD} "
        "(see Outcome labels above), partly when some are",
        "a reference given as several printed values is matched against their [min, max] range",
    ]


def _tolerance(ref: Reference, refdata: ReferenceData) -> float:
    if ref.is_loss:
        t = refdata.tolerances["loss"]
        return max(t["abs"], t["rel"] * max(abs(ref.target[0]), abs(ref.target[1])))
    return refdata.tolerances["accuracy"]["abs"]


def _std_factor(ref: Reference, refdata: ReferenceData) -> float:
    return refdata.tolerances["loss" if ref.is_loss else "accuracy"]["std_factor"]


def _matching_groups(ref: Reference, groups: pd.DataFrame) -> pd.DataFrame:
    mask = pd.Series(True, index=groups.index)
    for key, wanted in ref.match.items():
        if key in groups:
            mask &= matches(groups[key], wanted)
        elif wanted is not None:      # a key no run has can only match "null"
            return groups.iloc[0:0]
    return groups[mask]


def _value_verdict(ref: Reference, mean: float, std: float, n: int, tol: float, k: float):
    lo, hi = ref.target
    if n == 0 or not math.isfinite(mean):
        return math.nan, "not reproduced: no seed finished without diverging"
    diff = mean - min(max(mean, lo), hi)          # 0 inside a [min, max] range
    ok = abs(diff) <= tol + 1e-12 or (n >= 2 and math.isfinite(std) and abs(diff) <= k * std)
    return diff, "reproduced" if ok else "not reproduced"


def _dead_verdict(group: pd.Series) -> str:
    """A dead reference: how many of the group's seeds are dead (bnexp.outcome), and what the others are."""
    n_dead, n = int(group[count_column(O.DEAD)]), int(group["n_runs"])
    if n_dead == n:
        return "reproduced"
    if n_dead == 0:
        return f"not reproduced: {group['outcome']}"
    return f"partly reproduced: {group['outcome']}"


def compare(groups: pd.DataFrame, refdata: ReferenceData) -> pd.DataFrame:
    """One row per (reference, matching group); one row per reference without matching groups."""
    rows = []
    for ref in refdata.references:
        lo, hi = ref.target
        base = {"set": ref.set_name, "label": ref.label, "source": ref.source, "metric": ref.metric,
                "metric_text": ref.metric_text, "quality": ref.quality, "ref_value": ref.value,
                "ref_low": lo, "ref_high": hi, "note": ref.note, "command": "", "reason": ref.reason}
        if ref.quality == "not_comparable":
            rows.append({**base, "verdict": f"not comparable: {ref.reason}"})
            continue
        found = _matching_groups(ref, groups) if not groups.empty else groups
        if found.empty:
            cmd = f"bnexp sweep --preset {ref.preset}" if ref.preset else ""
            rows.append({**base, "verdict": "no matching runs", "command": cmd})
            continue
        tol, k = _tolerance(ref, refdata), _std_factor(ref, refdata)
        for _, g in found.iterrows():
            mean, std, n = g[f"{ref.metric}_mean"], g[f"{ref.metric}_std"], int(g[f"{ref.metric}_n"])
            if ref.outcome == O.DEAD:
                diff, verdict = (mean - lo if n else math.nan), _dead_verdict(g)
            else:
                diff, verdict = _value_verdict(ref, mean, std, n, tol, k)
            if ref.quality == "approximate":
                verdict += " (approximate match)"
            rows.append({**base, "group": g["group"], "mean": mean, "std": std, "n": n,
                         "n_runs": int(g["n_runs"]), "outcome": g["outcome"], "diff": diff,
                         "tolerance": np.nan if ref.outcome == O.DEAD else tol, "verdict": verdict})
    return pd.DataFrame(rows, columns=COLUMNS)


VERDICTS = ("reproduced", "partly reproduced", "not reproduced", "no matching runs", "not comparable")


def verdict_counts(table: pd.DataFrame) -> dict[str, int]:
    """{'reproduced': 3, 'no matching runs': 2, ...} in VERDICTS order (qualifiers after ':' / '(' dropped)."""
    counts = table["verdict"].str.split(r"[:(]", regex=True).str[0].str.strip().value_counts()
    return {v: int(counts[v]) for v in VERDICTS if v in counts}
