"""The claims ledger: each claim of bnexp/reference/claims.yaml with a verdict computed from the runs.

`load_claims()` reads and checks the ledger; `evaluate(runs_tab, keys, run_dirs)` returns one
`ClaimResult` per claim. Nothing here decides a verdict by hand: a setting's test is applied to
every context that has enough seeds in each arm (claims.yaml explains the vocabulary), and a claim
that lacks runs is `not run`, with the command that would produce them.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from bnexp import layout as L
from bnexp.errors import BnexpError
from bnexp.report.figure_plan import MEASURE_FIGURES
from bnexp.nn.kinds import KIND_KWARGS
from bnexp.report.aggregate import fmt_value
from bnexp.reference import RUN_METRICS
from bnexp.report.load import matches

MEASURE_FIGURE_KINDS = tuple(MEASURE_FIGURES)

VERDICTS = ("supported", "not supported", "mixed", "not run")
TESTS = ("lower", "higher", "close", "at_least", "not_trained", "trains_higher_lr", "smaller_drop", "larger_at_small")
ONE_ARM = ("not_trained", "larger_at_small")
OVER = {"trains_higher_lr": "lr", "smaller_drop": "batch_size", "larger_at_small": "batch_size"}  # across a key
NEEDS_TOLERANCE = ("close", "at_least", "smaller_drop", "larger_at_small")
RUN_QUANTITIES = (*RUN_METRICS, "gap", "outcome", "drift", "precise_gain")
# The report's figure kinds (figure_plan.FigureInfo.kind) a setting may link to.
FIGURE_KINDS = ("loss", "lr", "batch", "activations", "generalization", "ioffe", *MEASURE_FIGURE_KINDS)


@dataclass(frozen=True)
class Setting:
    """One experiment that tests a claim: which runs, which arms, what is compared, how."""
    name: str
    preset: str
    select: dict[str, Any]
    arms: dict[str, dict[str, Any]]
    quantity: str
    test: str
    over: str | None = None
    tolerance: float | None = None
    figures: tuple[str, ...] = ()   # figure kinds of the report that show it

    @property
    def arm_keys(self) -> set[str]:
        return {k for arm in self.arms.values() for k in arm}

    def command(self, min_seeds: int) -> str:
        return f"bnexp sweep --preset {self.preset} seed=" + ",".join(str(s) for s in range(min_seeds))


@dataclass(frozen=True)
class Claim:
    id: str
    statement: str
    sources: tuple[str, ...]
    settings: tuple[Setting, ...]


@dataclass(frozen=True)
class Ledger:
    min_seeds: int
    separation: float
    papers: dict[str, dict[str, Any]]
    claims: tuple[Claim, ...]


@dataclass
class SettingResult:
    setting: Setting
    verdict: str
    evidence: list[str] = field(default_factory=list)   # one line per context
    held: list[bool] = field(default_factory=list)
    groups: set[str] = field(default_factory=set)        # the run groups of the evaluated contexts (figure links)


@dataclass
class ClaimResult:
    claim: Claim
    verdict: str
    settings: list[SettingResult]


# ---------------------------------------------------------------- reading the ledger

def default_path() -> Path:
    return Path(str(resources.files("bnexp.reference").joinpath("claims.yaml")))


def load_claims(path: Path | None = None, sources: dict | None = None) -> Ledger:
    """claims.yaml, checked: every test, quantity, arm and source is one the evaluation knows."""
    path = Path(path) if path else default_path()
    try:
        raw = yaml.safe_load(path.read_text())
        papers = dict(raw.get("papers") or {})
        known = set(papers) | set(sources or {})
        claims = tuple(_claim(c, known if sources is not None else None) for c in raw["claims"])
        ids = [c.id for c in claims]
        if len(set(ids)) != len(ids):
            raise ValueError("claim ids are not unique")
        return Ledger(int(raw["min_seeds"]), float(raw["separation"]), papers, claims)
    except (OSError, yaml.YAMLError) as e:
        raise BnexpError(f"cannot read the claims ledger {path}: {e}") from e
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise BnexpError(f"malformed claims ledger {path}: {e}") from e


def _claim(c: dict, known_sources: set[str] | None) -> Claim:
    sources = tuple(c["sources"])
    if known_sources is not None and (bad := [s for s in sources if s not in known_sources]):
        raise ValueError(f"claim {c['id']}: unknown source {bad[0]!r}")
    return Claim(c["id"], c["statement"], sources, tuple(_setting(c["id"], s) for s in c["settings"]))


def _setting(claim_id: str, s: dict) -> Setting:
    st = Setting(s["name"], s["preset"], dict(s.get("select") or {}), {k: dict(v) for k, v in s["arms"].items()},
                 s["quantity"], s["test"], s.get("over"), None if s.get("tolerance") is None else float(s["tolerance"]),
                 tuple(s.get("figures") or ()))
    where = f"claim {claim_id}, setting {st.name!r}"
    if st.test not in TESTS:
        raise ValueError(f"{where}: test {st.test!r} not in {TESTS}")
    if len(st.arms) != (1 if st.test in ONE_ARM else 2):
        raise ValueError(f"{where}: test {st.test} takes {1 if st.test in ONE_ARM else 2} arm(s)")
    if OVER.get(st.test) != st.over:
        raise ValueError(f"{where}: test {st.test} needs over: {OVER.get(st.test)}")
    if st.test in NEEDS_TOLERANCE and st.tolerance is None:
        raise ValueError(f"{where}: test {st.test} needs a tolerance")
    if st.quantity not in RUN_QUANTITIES and "." not in st.quantity:
        raise ValueError(f"{where}: quantity {st.quantity!r} is neither a run quantity {RUN_QUANTITIES} "
                         "nor <instrument>.<statistic>")
    if bad := [k for k in st.figures if k not in FIGURE_KINDS]:
        raise ValueError(f"{where}: figure kind {bad[0]!r} not in {FIGURE_KINDS}")
    if (st.quantity == "outcome") != (st.test in ("not_trained", "trains_higher_lr")):
        raise ValueError(f"{where}: outcome is the quantity of not_trained / trains_higher_lr, and only of them")
    return st


# ---------------------------------------------------------------- quantities of one run

def _drift(run_dir: Path) -> float:
    """Layer-input drift from activations.npz: for each norm position, the input the next layer sees
    (the norm layer's output; with no BN the pre-activation), its mean m_e and std s_e at every probed
    epoch e >= 1; drift = max over e of (|m_e - m_1| + |s_e - s_1|) / s_1 (shifts in units of the
    epoch-1 spread, so layers of any scale compare), averaged over the layers. Epoch 1, not the
    initialisation, is the reference: the first epoch's large move is training, not shift."""
    from bnexp.report.figures import read_activations

    acts = read_activations(run_dir)
    by_layer: dict[str, dict[int, np.ndarray]] = {}
    for (epoch, layer, where), v in acts.items():
        if where == "output" and epoch >= 1:
            by_layer.setdefault(layer, {})[epoch] = v
    drifts = []
    for per_epoch in by_layer.values():
        if 1 not in per_epoch or len(per_epoch) < 2:
            continue
        m1, s1 = float(per_epoch[1].mean()), float(per_epoch[1].std())
        if not s1 > 0:
            continue
        drifts.append(max((abs(float(v.mean()) - m1) + abs(float(v.std()) - s1)) / s1 for v in per_epoch.values()))
    return float(np.mean(drifts)) if drifts else math.nan


def _precise_acc(run_dir: Path) -> float:
    """The last epoch's test accuracy with precise BN statistics (precise.csv), NaN without the file."""
    try:
        df = pd.read_csv(run_dir / L.PRECISE)
        return float(df.sort_values("epoch")["test_acc"].iloc[-1]) if len(df) else math.nan
    except (OSError, ValueError, KeyError, IndexError, pd.errors.ParserError):
        return math.nan


def _measure(rows: pd.DataFrame, quantity: str) -> float:
    """<instrument>.<statistic>: the mean over measured steps (and layers) of one run's measures.csv
    rows (`rows`, as bnexp.report.measures reads them); landscape.range: the mean over steps of
    max - min (the band's width in Santurkar's Fig. 4a). NaN when the run has no such rows."""
    instrument, statistic = quantity.split(".", 1)
    df = rows[rows["instrument"] == instrument]
    if statistic == "range":
        wide = df.pivot_table(index="step", columns="statistic", values="value", aggfunc="mean")
        if not {"min", "max"} <= set(wide.columns):
            return math.nan
        return float((wide["max"] - wide["min"]).mean())
    values = df.loc[df["statistic"] == statistic, "value"].astype(float)
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else math.nan


def quantity_values(runs: pd.DataFrame, quantity: str, measures: pd.DataFrame | None = None) -> pd.Series:
    """The quantity for every run of `runs` (a runs table with status, outcome and dir columns).
    A diverged run has no final value of anything: NaN, which the tests count as its arm's worst."""
    if quantity == "outcome":
        return runs["outcome"]
    return _values(runs, quantity, measures).where(runs["status"] != L.DIVERGED)


def _values(runs: pd.DataFrame, quantity: str, measures: pd.DataFrame | None) -> pd.Series:
    if quantity == "gap":
        return runs["train_acc"].astype(float) - runs["test_acc"].astype(float)
    if quantity == "drift":
        return pd.Series([_drift(Path(d)) for d in runs["dir"]], index=runs.index, dtype=float)
    if quantity in runs.columns:
        return runs[quantity].astype(float)
    if quantity == "precise_gain":
        final = pd.Series([_precise_acc(Path(d)) for d in runs["dir"]], index=runs.index, dtype=float)
        return final - runs["test_acc"].astype(float)
    by_run = {} if measures is None or measures.empty else dict(tuple(measures.groupby("run_id", observed=True)))
    empty = pd.DataFrame(columns=["instrument", "statistic", "step", "value"])
    return pd.Series([_measure(by_run.get(r, empty), quantity) for r in runs["run_id"]], index=runs.index, dtype=float)


# ---------------------------------------------------------------- the tests

LOWER_IS_BETTER = {"lower": True, "higher": False}


def _stats(v: np.ndarray) -> tuple[float, float, int]:
    """mean, sample std (0 for one value) and n of the finite values."""
    f = v[np.isfinite(v)]
    if not len(f):
        return math.nan, math.nan, 0
    return float(f.mean()), float(f.std(ddof=1)) if len(f) > 1 else 0.0, len(f)


def fmt(v: np.ndarray) -> str:
    mean, std, n = _stats(v)
    bad = int((~np.isfinite(v)).sum())
    text = f"{mean:.4g} ± {std:.2g} ({n})" if n else "-"
    return text + (f", {bad} non-finite" if bad else "")


def _separated(a: np.ndarray, b: np.ndarray, lower: bool, separation: float) -> bool:
    """Every value of a beats every value of b, and the means by more than `separation` larger stds.
    A non-finite value (a diverged run's loss) is the worst value its side can have."""
    worst = math.inf if lower else -math.inf
    a, b = np.where(np.isfinite(a), a, worst), np.where(np.isfinite(b), b, worst)
    if not lower:
        a, b = -a, -b
    if not a.max() < b.min():
        return False
    fa, fb = a[np.isfinite(a)], b[np.isfinite(b)]
    spread = max(fa.std(ddof=1) if len(fa) > 1 else 0.0, fb.std(ddof=1) if len(fb) > 1 else 0.0)
    return bool(b.mean() - a.mean() > separation * spread)


def _pairwise(st: Setting, vals: list[np.ndarray], separation: float) -> bool:
    a, b = vals
    if st.test in LOWER_IS_BETTER:
        return _separated(a, b, LOWER_IS_BETTER[st.test], separation)
    ma, mb = _stats(a)[0], _stats(b)[0]
    if st.test == "close":
        return bool(abs(ma - mb) <= st.tolerance)
    return bool(ma >= mb - st.tolerance)   # at_least


def _largest_trained(outcomes: dict[float, list[str]], min_seeds: int) -> float:
    ok = [lr for lr, o in outcomes.items() if len(o) >= min_seeds and all(x == "trained" for x in o)]
    return max(ok) if ok else -math.inf


# ---------------------------------------------------------------- evaluation

def _context(row: pd.Series, keys: list[str], skip: set[str]) -> str:
    return repr([(k, fmt_value(row[k])) for k in keys if k not in skip])


USUAL = ("lr", "batch_size", "epochs", "train_size")   # shown for every context (train_size when set)


def _label(ctx: pd.DataFrame, shown: list[str]) -> str:
    """What distinguishes a context to a reader: the usual keys and those that vary between the contexts."""
    row = ctx.iloc[0]
    return ", ".join(f"{k}={fmt_value(row[k])}" for k in shown if not (k == "train_size" and fmt_value(row[k]) == "null"))


def evaluate_setting(st: Setting, runs: pd.DataFrame, keys: list[str], min_seeds: int,
                     separation: float, measures: pd.DataFrame | None = None) -> SettingResult:
    """`runs`: the report's runs table (outcome, dir and config columns); `measures`: Runs.measures."""
    sel = runs[runs["status"].isin(L.FINISHED)]
    for k, wanted in st.select.items():
        sel = sel[matches(sel[k], wanted)] if k in sel else sel.iloc[0:0]
    arm_of = pd.Series("", index=sel.index)
    for label, filt in st.arms.items():
        mask = pd.Series(True, index=sel.index)
        for k, wanted in filt.items():
            mask &= matches(sel[k], wanted) if k in sel else False
        arm_of[(arm_of == "") & mask] = label
    sel = sel[arm_of != ""].assign(_arm=arm_of[arm_of != ""])
    if sel.empty:
        return SettingResult(st, "not run", [f"no runs; run `{st.command(min_seeds)}`"])
    sel = sel.assign(_q=quantity_values(sel, st.quantity, measures))
    # one run per (context, arm, swept value, seed): a seed run twice (another device, instruments on or
    # off) is one seed, the run that recorded the quantity first
    sel = sel.assign(_missing=sel["_q"].isna()) if st.quantity != "outcome" else sel.assign(_missing=False)
    skip = st.arm_keys | {"seed"} | ({st.over} if st.over else set())
    skip |= {k for k in keys if k.startswith("norm.")} if "norm.kind" in st.arm_keys else set()
    if "norm.kind" in st.arm_keys:
        skip |= {"bn", "model.dropout"}   # the BN arm brings its own dropout rule and bn shortcut
    ctx_key = sel.apply(lambda r: _context(r, keys, skip), axis=1)
    sel = sel.assign(_ctx=ctx_key, _nv=sel.apply(_norm_key_text, axis=1)).sort_values(["_missing", "run_id"], kind="stable")
    sel = sel.drop_duplicates(["_ctx", "_arm", "_nv", "seed", *([st.over] if st.over else []),
                               *sorted(st.arm_keys & set(sel))])
    ctx_key = sel["_ctx"]
    complete = sel.groupby("_ctx")["_arm"].transform("nunique") == len(st.arms)   # contexts with every arm
    varying = [k for k in keys if k not in skip and k not in USUAL and sel.loc[complete, k].map(fmt_value).nunique() > 1]
    shown = [k for k in (*USUAL, *varying) if k in keys and k not in skip]
    result = SettingResult(st, "not run")
    short = []
    for _, whole in sel.groupby(ctx_key, sort=False):
        for ctx, variant in _norm_variants(whole, st):
            label = ", ".join(x for x in (_label(ctx, shown), variant) if x)
            line, held = _evaluate_context(st, ctx, label, min_seeds, separation)
            if held is None:
                short.append(line)
                continue
            result.evidence.append(line)
            result.held.append(held)
            if "group" in ctx:
                result.groups |= set(ctx["group"]) - {""}
    if result.held:
        result.verdict = "supported" if all(result.held) else "not supported" if not any(result.held) else "mixed"
    else:
        result.evidence = short + [f"fewer than {min_seeds} seeds per arm; run `{st.command(min_seeds)}`"]
    return result


def _norm_key_text(row: pd.Series) -> str:
    """The norm keys a run's kind uses besides the kind (bnexp.nn.kinds.KIND_KWARGS; what its run id
    hashes), e.g. 'norm.momentum=0.1, norm.eps=1e-05'; '' for no normalisation."""
    kind = row.get("norm.kind")
    used = ("eps", *KIND_KWARGS[kind]) if KIND_KWARGS.get(kind) is not None else ()   # none: no layer, no keys
    return ", ".join(f"norm.{k}={fmt_value(row.get(f'norm.{k}'))}" for k in used if f"norm.{k}" in row.index)


def _norm_variants(ctx: pd.DataFrame, st: Setting) -> list[tuple[pd.DataFrame, str]]:
    """A context split by the norm settings of each arm when the arms are norm kinds: the context key
    leaves norm.* out (none has no such keys to match), so two BN groups that differ in, say,
    norm.momentum would otherwise be pooled as one arm. One (sub-context, label) per combination of
    the arms' variants; the label is empty when every arm has one variant (the usual case)."""
    if "norm.kind" not in st.arm_keys:
        return [(ctx, "")]
    variant = ctx["_nv"]
    per_arm = [sorted(set(variant[ctx["_arm"] == a])) for a in st.arms]
    if all(len(v) <= 1 for v in per_arm):
        return [(ctx, "")]
    out = []
    for combo in itertools.product(*per_arm):
        mask = pd.Series(False, index=ctx.index)
        for arm, v in zip(st.arms, combo):
            mask |= (ctx["_arm"] == arm) & (variant == v)
        out.append((ctx[mask], "; ".join(f"{a}: {v}" for a, v in zip(st.arms, combo) if v)))
    return out


def _extremes(g: pd.DataFrame, over: str, min_seeds: int) -> tuple | None:
    """((smallest `over` value, its quantities), (largest, its quantities)) among the values of `over`
    with at least min_seeds recorded quantities in `g`; None when fewer than two such values exist."""
    values = sorted(v for v, gg in g.groupby(over) if gg["_q"].notna().sum() >= min_seeds)
    if len(values) < 2:
        return None
    return tuple((v, g.loc[g[over] == v, "_q"].to_numpy(float)) for v in (values[0], values[-1]))


def _evaluate_context(st: Setting, ctx: pd.DataFrame, label: str, min_seeds: int, separation: float
                      ) -> tuple[str, bool | None]:
    """(evidence line, whether the test holds, or None when an arm has fewer than min_seeds seeds)."""
    where = f"{label}: " if label else ""
    arms = list(st.arms)
    if st.test in ("trains_higher_lr",):
        per = {a: {} for a in arms}
        for (arm, lr), g in ctx.groupby(["_arm", st.over]):
            per[arm][float(lr)] = list(g["_q"])
        if any(sum(len(o) >= min_seeds for o in per[a].values()) < 2 for a in arms):
            return where + f"fewer than 2 learning rates with {min_seeds} seeds in an arm", None
        top = {a: _largest_trained(per[a], min_seeds) for a in arms}
        text = "; ".join(f"{a} trains up to lr {fmt_value(top[a]) if top[a] > -math.inf else 'none'} "
                         f"(of {', '.join(fmt_value(x) for x in sorted(per[a]))})" for a in arms)
        return where + text, bool(top[arms[0]] > top[arms[1]])
    if st.test == "larger_at_small":
        ends = _extremes(ctx[ctx["_arm"] == arms[0]], st.over, min_seeds)
        if ends is None:
            return where + f"fewer than 2 {st.over} values with {min_seeds} seeds", None
        (small, lo), (large, hi) = ends
        text = (f"{arms[0]} {st.quantity} {fmt(lo)} at {st.over} {fmt_value(small)} vs {fmt(hi)} at "
                f"{fmt_value(large)}")
        return where + text, bool(_stats(lo)[0] > _stats(hi)[0] + st.tolerance)
    if st.test == "smaller_drop":
        drops, parts = {}, []
        for a in arms:
            ends = _extremes(ctx[ctx["_arm"] == a], st.over, min_seeds)
            if ends is None:
                return where + f"{a}: fewer than 2 {st.over} values with {min_seeds} seeds", None
            (small, lo), (large, hi) = ends
            drops[a] = _stats(hi)[0] - _stats(lo)[0]
            parts.append(f"{a} {st.quantity} {fmt(hi)} at {st.over} {fmt_value(large)} -> {fmt(lo)} at "
                         f"{fmt_value(small)} (drop {drops[a]:.3f})")
        return where + "; ".join(parts), bool(drops[arms[0]] + st.tolerance < drops[arms[1]])
    vals = []
    for a in arms:
        g = ctx[ctx["_arm"] == a]
        if len(g) < min_seeds:
            return where + f"{a}: {len(g)} seed(s)", None
        vals.append(g["_q"].to_numpy(object if st.quantity == "outcome" else float))
    if st.test == "not_trained":
        o = list(vals[0])
        return where + f"{arms[0]}: " + ", ".join(f"{x} {o.count(x)}" for x in dict.fromkeys(o)), \
            not any(x == "trained" for x in o)
    if any(not np.isfinite(v).any() for v in vals):
        return where + "quantity not recorded (" + ", ".join(f"{a} {fmt(v)}" for a, v in zip(arms, vals)) + ")", None
    text = " vs ".join(f"{a} {fmt(v)}" for a, v in zip(arms, vals))
    return where + text, _pairwise(st, vals, separation)


def evaluate(ledger: Ledger, runs: pd.DataFrame, keys: list[str], measures: pd.DataFrame | None = None
             ) -> list[ClaimResult]:
    out = []
    for claim in ledger.claims:
        results = [evaluate_setting(s, runs, keys, ledger.min_seeds, ledger.separation, measures)
                   for s in claim.settings]
        done = {r.verdict for r in results if r.verdict != "not run"}
        verdict = "not run" if not done else done.pop() if len(done) == 1 else "mixed"
        out.append(ClaimResult(claim, verdict, results))
    return out


def rule_text(ledger: Ledger) -> list[str]:
    """The verdict rules as sentences for the report's legend."""
    return [
        f"Each arm needs at least {ledger.min_seeds} seeds in a context (runs that share every defining key but "
        "the arm, the seed and the swept key); evidence is mean ± std (n) per arm.",
        f"lower / higher: every seed of the first arm beats every seed of the second, and the means differ by more "
        f"than {ledger.separation:g} times the larger std. close: the means differ by at most the tolerance; "
        "at_least: the first arm's mean is at least the second's minus the tolerance.",
        "supported: the test holds in every evaluated context of every setting; not supported: in none; mixed: "
        "in some (the evidence says which); not run: no context has enough seeds (the command is given).",
    ]


def table(results: list[ClaimResult], min_seeds: int) -> pd.DataFrame:
    """One row per setting: claim, statement, sources, setting, evidence, verdicts, command."""
    rows = []
    for r in results:
        for s in r.settings:
            rows.append({"claim": r.claim.id, "statement": r.claim.statement, "sources": ", ".join(r.claim.sources),
                         "setting": s.setting.name, "preset": s.setting.preset, "quantity": s.setting.quantity,
                         "test": s.setting.test, "evidence": " | ".join(s.evidence), "setting_verdict": s.verdict,
                         "verdict": r.verdict,
                         "command": s.setting.command(min_seeds) if s.verdict == "not run" else ""})
    return pd.DataFrame(rows)
