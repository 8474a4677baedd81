"""`bnexp report`: runs on disk -> tables (Markdown + CSV), figures (PNG), report.md / report.html.

write_report() is the whole pipeline; the CLI only parses its options and prints `summary`.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

import pandas as pd

import bnexp
from bnexp import layout as L
from bnexp.errors import BnexpError
from bnexp.reference import ReferenceData, load_reference
from bnexp.report import aggregate as agg
from bnexp.report import claims as CL
from bnexp.report import render as R
from bnexp.outcome import legend as outcome_legend
from bnexp.report.compare import compare, verdict_counts
from bnexp.report.figure_plan import FigureInfo, draw_all
from bnexp.report.load import Runs, apply_where, load_runs, parse_scalar
from bnexp.report.tables import (data_parallel_display, fmt_cell, groups_display, pairs_display, reference_blocks,
                                 split_display)

FORMATS = ("md", "html", "both")
CSV_NAMES = ("runs.csv", "groups.csv", "bn_vs_no_bn.csv", "reference.csv", "claims.csv")
# (sweep preset, the claim it tests, figure kinds that show it); the 5-epoch one is a reference table only
EXPERIMENTS = (
    ("convergence", "BN converges faster (loss vs iteration)", ("loss",)),
    ("lr_sensitivity", "BN tolerates larger learning rates", ("lr",)),
    ("batch_size", "BN is sensitive to small batches", ("batch",)),
    ("activation_stability", "BN keeps layer inputs close to N(0,1)", ("activations",)),
    ("generalization", "BN regularises (CIFAR-100 train vs test accuracy)", ("generalization",)),
    ("article_5epoch", "5-epoch test accuracies of the article (approximate configuration)", ()),
    ("d2l_bn", "d2l.ai's BN chapter: from-scratch BN, nn.BatchNorm and no BN (sigmoid LeNet)", ()),
    ("ioffe_fig1", "BN converges faster and stabilises sigmoid inputs (Ioffe & Szegedy's MNIST Figure 1)", ("ioffe",)),
    ("small_batch_norms", "BN degrades at small batches, GN and BRN do not (one line per norm kind)", ("batch",)),
    ("noisy_bn", "Noisy BN (unstable layer inputs) trains about as well as BN", ("loss",)),
    ("saturation", "BN pulls sigmoid inputs out of saturation", ("activations", "saturation")),
    ("norm_position", "BN before vs after the nonlinearity", ("loss",)),
    ("landscape", "BN smooths the loss landscape (Santurkar et al. 2018, Figure 4)", ("landscape",)),
    ("ics", "BN's benefit does not come from less internal covariate shift (Santurkar et al. 2018)", ("ics",)),
    ("weight_decay", "with BN, weight decay raises the effective step of scale-invariant weights", ("effective_step",)),
    ("sync_bn", "synchronised BN over 4 processes of 8 is the batch-32 run; per-process BN is small-batch BN",
     ("batch",)),
)
# experiments shown by a reference table rather than a figure: preset -> text in the reference set's name
REFERENCE_ONLY = {"article_5epoch": "5-epoch", "d2l_bn": "d2l"}


@dataclass
class ReportResult:
    """What write_report wrote, counts, and the text the CLI prints."""

    out_dir: Path
    reports: list[Path]
    tables: list[Path]
    figures: list[Path]
    n_runs: int
    n_by_status: dict[str, int]
    n_groups: int
    n_skipped: int
    warnings: list[str] = field(default_factory=list)
    summary: str = ""

    @property
    def files(self) -> list[Path]:
        return [*self.reports, *self.tables, *self.figures]


@dataclass
class Analysis:
    """Everything the report shows, computed once from the runs (before any file is written)."""

    runs: Runs
    refdata: ReferenceData
    keys: list[str]              # defining config keys (the group identity)
    groups: pd.DataFrame         # one row per group (aggregate.aggregate)
    runs_tab: pd.DataFrame       # runs + outcome + group id
    other: list[str]             # defining keys beyond the main ones that vary between groups
    pairs: pd.DataFrame          # BN vs no-BN pairs
    ref_table: pd.DataFrame      # reference comparison
    by_status: dict[str, int]
    ledger: CL.Ledger
    claims: list[CL.ClaimResult]  # the claims ledger's verdicts


def analyse(results_dir: Path, where: list[str]) -> Analysis:
    """Read, filter, group and compare; raises BnexpError when there is nothing to report."""
    refdata = load_reference()
    runs = apply_where(load_runs(results_dir), where)
    keys = agg.defining_keys(runs.config_keys)
    outcomes = agg.classify(runs, refdata.num_classes)
    groups = agg.aggregate(runs, refdata.num_classes, outcomes)
    runs_tab = agg.with_outcomes(runs, groups, outcomes)
    ledger = CL.load_claims(sources=refdata.sources)
    return Analysis(runs, refdata, keys, groups, runs_tab, agg.varying_keys(groups, keys), agg.bn_pairs(groups, keys),
                    compare(groups, refdata), runs.runs["status"].value_counts().to_dict(), ledger,
                    CL.evaluate(ledger, runs_tab, keys, runs.measures))


# ---------------------------------------------------------------- the report

def _header(results_dir: Path, runs, by_status: dict, n_groups: int, where) -> list[R.Block]:
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    status = ", ".join(f"{by_status[s]} {s}" for s in L.STATUSES if by_status.get(s))
    lines = [f"Generated {now} by bnexp {bnexp.__version__} from `{results_dir}`.",
             f"Runs: {len(runs.runs)} ({status}) in {n_groups} groups (runs sharing a config except the seed)."]
    if where:
        lines.append(f"Filter: `--where {' '.join(where)}`.")
    if runs.warnings:
        lines.append(f"{len(runs.warnings)} run directories skipped or partial: see the last section.")
    return [R.Heading("bnexp report", 1), R.Text("\n\n".join(lines))]


# preset keys that say which runs an experiment's are (the others, lr, batch size, epochs, sizes, may be
# overridden on the command line): preset key -> config column
IDENTIFYING = {"model": "model.name", "data": "data.name", "optim": "optim.name", "norm": "norm.kind", "bn": "bn",
               "model.activation": "model.activation", "model.norm_position": "model.norm_position",
               "optim.weight_decay": "optim.weight_decay", "nproc": "nproc"}
# experiments with a second preset for the same claim
ALSO = {"generalization": ("generalization_alexnet_cifar", "generalization_fashion")}
WHY_NO_FIGURE = {
    "loss": "not drawn (limit per kind: choose with `--where`)",
    "lr": "needs 2 or more learning rates in one context",
    "batch": "needs 2 or more batch sizes in one context",
    "activations": "needs activations.npz (probe_every)",
    "generalization": "not drawn (limit per kind: choose with `--where`)",
    "ioffe": "needs evals.csv (eval_every) in every seed of 2 or more arms",
    "landscape": "needs measures.csv with landscape, predictiveness or beta_smoothness (`measure=`)",
    "ics": "needs measures.csv with ics (`measure=[ics]`)",
    "saturation": "needs measures.csv with saturation (`measure=[saturation]`)",
    "effective_step": "needs measures.csv with weights of a BN run (`measure=[weights]`)",
}
COVERAGE_RULE = (
    "status: an experiment's runs are the completed or diverged runs whose model, data set, optimiser and norm "
    "arm (plus activation and norm position where the preset sets them) are its preset's; lr, batch size, "
    "epochs and data sizes may differ (they are often overridden). It is incomplete (and nothing counts for it) "
    "until every arm of its preset has runs, e.g. noisy BN for noisy_bn. A figure counts for an experiment only if "
    "it is of the experiment's kind and draws at least one of its runs; an experiment with runs but no such "
    "figure says why (and, like one without runs, which sweep completes it). Figures of runs that belong to no "
    "experiment are still drawn below.")


def _preset_arms(name: str) -> list[dict[str, set[str]]]:
    """Each arm of a preset as {config column: allowed values} over the identifying keys."""
    from bnexp.sweep import load_preset
    try:
        p = load_preset(name)
    except BnexpError:
        return []
    # each value as the report prints a config value (5e-4 -> 0.0005), so that it compares with the runs'
    return [{IDENTIFYING[k]: {agg.fmt_value(parse_scalar(v)) for v in str(val).split(",")}
             for k, val in {**p.params, **arm}.items() if k in IDENTIFYING} for arm in p.arms]


def experiment_groups(name: str, groups: pd.DataFrame) -> list[str]:
    """The groups whose runs belong to experiment `name` (see COVERAGE_RULE)."""
    arms = [a for n in (name, *ALSO.get(name, ())) for a in _preset_arms(n)]

    def fits(g: pd.Series) -> bool:
        return any(all(col in g and agg.fmt_value(g[col]) in vals for col, vals in arm.items()) for arm in arms)
    return [g["group"] for _, g in groups.iterrows() if fits(g)] if len(groups) else []


def missing_arms(name: str, groups: pd.DataFrame, mine: set[str]) -> list[str]:
    """'norm.kind noisy' for each value of the preset's arms (norm kinds, bn, norm position...)
    that none of the experiment's groups has: the comparison is incomplete without it. With a
    second preset for the claim (ALSO), the one closer to complete."""
    have = groups[groups["group"].isin(mine)]

    def missing(preset: str) -> list[str]:
        arms = _preset_arms(preset)
        cols = {c for a in arms for c, v in a.items()
                if len(v) > 1 or len({frozenset(b.get(c, ())) for b in arms}) > 1}
        out = []
        for c in sorted(cols):
            want = set().union(*(a.get(c, set()) for a in arms))
            got = {agg.fmt_value(v) for v in have[c]} if c in have else set()
            out += [f"{c} {v}" for v in sorted(want - got)]
        return out
    return min((missing(p) for p in (name, *ALSO.get(name, ()))), key=len)


def _coverage(figs: list[FigureInfo], ref_table: pd.DataFrame, groups: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for name, claim, kinds in EXPERIMENTS:
        mine = set(experiment_groups(name, groups))
        covered = False
        n_runs = int(groups.loc[groups["group"].isin(mine), "n_runs"].sum()) if mine else 0
        runs = f"{n_runs} run{'s' * (n_runs != 1)}"
        if not mine:
            status = "no runs yet"
        elif missing := missing_arms(name, groups, mine):
            status = f"{runs}; incomplete, no figure counted: no runs with " + ", ".join(missing)
        elif name in REFERENCE_ONLY:
            hit = ref_table[ref_table["group"].isin(mine) & ref_table["set"].str.contains(REFERENCE_ONLY[name])]
            covered = bool(len(hit))
            status = f"{runs}; {len(hit)} reference row{'s' * (len(hit) != 1)}" if len(hit) else \
                f"{runs}; no reference row matches them"
        else:
            shown = [f for f in figs if f.kind in kinds and mine & set(f.groups)]
            covered = bool(shown)
            status = f"{runs}; " + (", ".join(f"[Figure {f.number}]({f.path.name})" for f in shown) if shown else
                                    "no figure: " + "; ".join(WHY_NO_FIGURE[k] for k in kinds))
        rows.append({"experiment": name, "shows": claim, "status": status,
                     "command": "" if covered else f"`bnexp sweep --preset {name}`" + (
                         " (or `generalization_alexnet_cifar`: 32 px, minutes)" if name == "generalization" else "")})
    return pd.DataFrame(rows)


def run_link(run_id: str, run_dir, out_dir: Path | None) -> str:
    """`[run id](../runs/<id>/run.json)`: a link relative to the report's folder (plain id without one)."""
    if out_dir is None or not isinstance(run_dir, str | Path) or not str(run_dir):
        return str(run_id)
    rel = os.path.relpath(Path(run_dir) / L.INFO, Path(out_dir).absolute()).replace(os.sep, "/")
    return f"[{run_id}]({quote(rel)})"


def _seed_links(runs_tab: pd.DataFrame, groups: pd.DataFrame, out_dir: Path | None) -> list[str]:
    """Per group: its runs as links named by seed ('s0 s1 s2')."""
    by = {g: r.sort_values("seed") for g, r in runs_tab[runs_tab["group"] != ""].groupby("group")}
    return [" ".join(run_link(f"s{agg.fmt_value(r['seed'])}", r["dir"], out_dir)
                     for _, r in by.get(g, pd.DataFrame(columns=["seed", "dir"])).iterrows())
            for g in groups["group"]]


def build_blocks(a: Analysis, results_dir: Path, where: list[str], figs: list[FigureInfo],
                 skipped: dict[str, int], out_dir: Path | None = None) -> list[R.Block]:
    """The whole report, top to bottom, as blocks for render.to_markdown / to_html; with out_dir
    (where the report will be), run ids link to their run.json relative to it."""
    runs, groups, runs_tab, pairs, ref_table, refdata = a.runs, a.groups, a.runs_tab, a.pairs, a.ref_table, a.refdata
    links = {r: run_link(r, d, out_dir) for r, d in zip(runs_tab["run_id"], runs_tab["dir"])}
    keys, other = a.keys, a.other
    b: list[R.Block] = _header(results_dir, runs, a.by_status, len(groups), where)
    b += _ledger_blocks(a, figs)
    main = {k for k, _ in agg.MAIN_KEYS} | {"bn"}
    counts = verdict_counts(ref_table)
    b += [R.Heading("Summary"), R.Bullets([
        "reference numbers: " + ", ".join(f"{v} {k}" for k, v in counts.items()),
        f"{len(pairs)} BN vs no-BN pairs; BN has the lower final training loss in "
        f"{int((pairs['train_loss_delta'] < 0).sum()) if len(pairs) else 0} of them",
        f"{len(figs)} figures"]),
          R.Heading("Outcome labels", 3),
          R.Text("Each completed or diverged run gets one label (bnexp/outcome.py; C = number of classes, losses "
                 "and accuracies are the last epoch's training ones), tried in this order:"),
          R.Bullets(outcome_legend())]
    b += [R.Heading("Experiments"), R.Table(_coverage(figs, ref_table, groups)), R.Text(COVERAGE_RULE)]
    b += [R.Heading("Reference comparison"), *reference_blocks(ref_table, refdata)]
    shared = agg.other_text(groups.iloc[0], [k for k in keys if k not in other and k not in main]) \
        if len(groups) else ""
    b += [R.Heading("Final metrics per group"),
          R.Text("Mean ± sample std over the seeds of a group that did not diverge (n = those seeds); "
                 f"final = last epoch's values from run.json. Shared by all groups: {shared or '—'}."),
          R.Table(groups_display(groups, other).assign(runs=_seed_links(runs_tab, groups, out_dir)), "groups.csv")
          if len(groups) else
          R.Text("No completed or diverged runs yet.")]
    b += [R.Heading("BN vs no BN"),
          R.Text("Groups that differ only in the BN arm (bn / norm.*; dropout too where it follows the "
                 "automatic rule: 0.5 without BN, none with BN). Δ = BN − no BN.")]
    b += [R.Table(pairs_display(pairs), "bn_vs_no_bn.csv")] if len(pairs) else [R.Text("No pairs yet.")]
    b += _data_parallel_blocks(groups)
    split = split_display(runs_tab, groups)
    if len(split):
        b += [R.Heading("Per-seed outcomes where seeds split"), R.Table(split.assign(run=split["run"].map(links)))]
    b += [R.Heading("Figures")]
    for f in figs:
        b.append(R.Figure(f.path, f.caption))
    left = {k: v for k, v in skipped.items() if v}
    if left:
        b.append(R.Text("Not drawn (limit per kind, best contexts first; use `--where` to choose): "
                        + ", ".join(f"{v} {k}" for k, v in left.items()) + "."))
    if not figs:
        b.append(R.Text("No figures: no aggregated runs."))
    pending = runs_tab[~runs_tab["status"].isin(L.FINISHED)]
    if len(pending):
        b += [R.Heading("Runs not aggregated (running / interrupted / failed)")]
        if (pending["status"] == L.INTERRUPTED).any():
            b += [R.Text("interrupted: run.json says running, but no process holds the run's lock (it was killed "
                         "or crashed); the same `bnexp train` or `bnexp sweep` resumes it from its last checkpoint.")]
        b += [R.Table(pd.DataFrame({"run": pending["run_id"].map(links), "status": pending["status"],
                                    "epochs completed": pending["epochs_completed"].map(lambda x: fmt_cell(x, ".0f")),
                                    "error": pending["error"].str.slice(0, 120)}))]
    if runs.warnings:
        b += [R.Heading("Skipped or partial run directories"), R.Bullets(runs.warnings)]
    return b


def _data_parallel_blocks(groups: pd.DataFrame) -> list[R.Block]:
    """The sync_bn comparison side by side, when its runs are there with more than one process."""
    mine = groups[groups["group"].isin(experiment_groups("sync_bn", groups))] if len(groups) else groups
    if not len(mine) or not (mine["nproc"].astype(int) > 1).any():
        return []
    mine = mine.sort_values(["batch_size", "nproc"], ascending=[False, True])
    return [R.Heading("Data-parallel BN (sync_bn)"),
            R.Text("BN on several processes normalises each process's shard of the global batch (norm.sync=false); "
                   "with norm.sync=true its statistics span the whole batch, which is the one-process run at "
                   "that batch (the same numbers, so the same run id: that row stands for both). Mean ± sample "
                   "std over seeds."),
            R.Table(data_parallel_display(mine))]


def _ledger_blocks(a: Analysis, figs: list[FigureInfo]) -> list[R.Block]:
    """The claims ledger: one row per setting of each claim, the claim's verdict on its first row."""
    rows = []
    for r in a.claims:
        for i, s in enumerate(r.settings):
            shown = [f for f in figs if f.kind in s.setting.figures and s.groups & set(f.groups)]
            rows.append({
                "claim": f"**{r.claim.statement}** ({r.verdict})" if i == 0 else "",
                "sources": ", ".join(r.claim.sources) if i == 0 else "",
                "setting": f"{s.setting.name} (`{s.setting.quantity}`, {s.setting.test})",
                "evidence": "; ".join(s.evidence) if s.verdict != "not run" else
                            f"not run: `{s.setting.command(a.ledger.min_seeds)}`",
                "verdict": s.verdict,
                "figure": ", ".join(f"[Figure {f.number}]({f.path.name})" for f in shown)})
    counts = {v: sum(r.verdict == v for r in a.claims) for v in CL.VERDICTS}
    quick = a.runs_tab["train_size"].notna().any() if "train_size" in a.runs_tab else False
    text = [f"{len(a.claims)} claims: " + ", ".join(f"{n} {v}" for v, n in counts.items() if n) + "."]
    if quick:
        text.append("Some runs use train_size (reduced, e.g. `--preset claims_quick`): their contexts are quick "
                    "evidence, shown with their train_size, and never compared with published values.")
    return [R.Heading("Claims ledger"), R.Text(" ".join(text)), R.Table(pd.DataFrame(rows), "claims.csv"),
            R.Bullets(CL.rule_text(a.ledger))]


def write_tables(a: Analysis, out_dir: Path) -> list[Path]:
    """runs.csv, groups.csv, bn_vs_no_bn.csv, reference.csv: the raw numbers behind the tables."""
    paths = [out_dir / n for n in CSV_NAMES]
    first = ["run_id", "group", "status", "outcome", *L.FINAL_METRICS]
    rest = [c for c in a.runs_tab.columns if c not in first and c != "group_key"]
    a.runs_tab[first + rest].to_csv(paths[0], index=False)
    a.groups.drop(columns="group_key").to_csv(paths[1], index=False)
    a.pairs.to_csv(paths[2], index=False)
    a.ref_table.to_csv(paths[3], index=False)
    CL.table(a.claims, a.ledger.min_seeds).to_csv(paths[4], index=False)
    return paths


def _ours(out_dir: Path) -> list[Path]:
    """What a report writes into its folder (only our own file names: other files are left alone)."""
    figs = [*out_dir.glob("fig[1-9]_*.png"), *out_dir.glob("fig1[0-9]_*.png")]
    return [p for p in [*figs, *(out_dir / n for n in (*CSV_NAMES, "report.md", "report.html"))]
            if p.is_file()]


def _write_error(out_dir: Path, e: OSError) -> BnexpError:
    hint = "free some space or" if e.errno == errno.ENOSPC else "check the permissions or"
    return BnexpError(f"cannot write the report to {out_dir}: {e.strerror or e}; {hint} choose another --out "
                      f"(the previous report there is unchanged)")


def _check_out(out_dir: Path) -> None:
    """out_dir, or the first of its parents that exists, must be a folder."""
    existing = next((p for p in (out_dir, *out_dir.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        which = "" if existing == out_dir else f": {existing} "
        raise BnexpError(f"--out {out_dir}{which or ' '}is a file, not a folder; choose another --out (bnexp "
                         f"writes a folder of report files there)")


def _stage(out_dir: Path) -> Path:
    """A fresh folder beside out_dir that the new report is written into before it replaces the old one."""
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    except OSError as e:
        raise _write_error(out_dir, e) from None


def _swap(stage: Path, out_dir: Path) -> None:
    """Move the staged files into out_dir (each rename atomic), then remove our files the new report lacks."""
    out_dir.mkdir(exist_ok=True)
    new = {p.name for p in stage.iterdir()}
    for name in sorted(new):
        os.replace(stage / name, out_dir / name)
    for p in _ours(out_dir):
        if p.name not in new:
            p.unlink()
    stage.rmdir()


def write_report(results_dir: Path, out_dir: Path | None = None, where: list[str] | tuple[str, ...] = (),
                 fmt: str = "md") -> ReportResult:
    """Read every run under results_dir/runs, write tables, figures and report.md/.html to out_dir.

    The files are written into a folder beside out_dir and moved into it at the end: an error (an
    unwritable path, a full disk) leaves the previous report as it was.
    """
    if fmt not in FORMATS:
        raise BnexpError(f"unknown report format {fmt!r}: use md, html or both")
    results_dir = Path(results_dir)
    out_dir = Path(out_dir) if out_dir else results_dir / "report"
    _check_out(out_dir)
    where = list(where)
    a = analyse(results_dir, where)

    stage = _stage(out_dir)
    try:
        tables = write_tables(a, stage)
        prefer = set(a.ref_table.loc[a.ref_table["quality"] == "exact", "group"].dropna())
        figs, skipped = draw_all(a.groups, a.runs_tab, a.runs.epochs, a.runs.steps, a.keys, a.other,
                                 a.refdata.num_classes, stage, prefer, a.runs.measures)
        blocks = build_blocks(a, results_dir, where, figs, skipped, out_dir)
        reports = []
        if fmt in ("md", "both"):
            reports.append(stage / "report.md")
            reports[-1].write_text(R.to_markdown(blocks), encoding="utf-8")
        if fmt in ("html", "both"):
            reports.append(stage / "report.html")
            reports[-1].write_text(R.to_html(blocks, f"bnexp report: {results_dir}"), encoding="utf-8")
        _swap(stage, out_dir)
    except OSError as e:
        raise _write_error(out_dir, e) from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    tables, reports = [out_dir / p.name for p in tables], [out_dir / p.name for p in reports]
    for f in figs:
        f.path = out_dir / f.path.name

    runs, counts = a.runs, verdict_counts(a.ref_table)
    summary = "\n".join([
        f"{len(runs.runs)} runs ({', '.join(f'{v} {k}' for k, v in a.by_status.items())}), {len(a.groups)} groups, "
        f"{len(figs)} figures, {len(runs.warnings)} directories skipped or partial",
        "claims: " + ", ".join(f"{n} {v}" for v in CL.VERDICTS if (n := sum(r.verdict == v for r in a.claims))),
        "reference: " + ", ".join(f"{v} {k}" for k, v in counts.items()),
        *(f"wrote {p}" for p in reports)])
    return ReportResult(out_dir, reports, tables, [f.path for f in figs], len(runs.runs), a.by_status,
                        len(a.groups), sum(w.startswith("skipped") for w in runs.warnings), runs.warnings, summary)
