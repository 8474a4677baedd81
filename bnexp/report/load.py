"""Run directories (results/README.md) -> pandas: one row per run plus long epoch and step tables.

A run directory that cannot be read (no or malformed config.yaml / run.json, unknown status)
is skipped with one warning line that says what is wrong; a readable run whose metrics.csv or
steps.csv is missing or malformed, whose activations.npz is damaged, or whose measures.csv is
damaged (or missing although its config asked for instruments; report/measures.py), is kept (its
final numbers come from run.json) with a warning.

A run whose run.json says `running` but whose lock no process holds is read as `interrupted`:
its process was killed or crashed before it could record that (locks.py). Derived here, at read
time; nothing is written, so a report can read other users' runs and never races a training.
"""
from __future__ import annotations

import io
import json
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from bnexp import config as C
from bnexp import layout as L
from bnexp import measures_format as MF
from bnexp.errors import BnexpError
from bnexp.locks import RunLock
from bnexp.report import measures as M

# Config keys that say where or how a run ran, or how it was observed, not what was trained: ignored when
# grouping. The instruments' keys are among them: measuring does not change the trajectory (issue 15), so a
# BN run and a no-BN run with instruments on are compared with each other and with runs without them.
# Besides the keys outside the run id: the seed (the report aggregates over it), and the keys in the id that
# say how a run was observed (probes, instruments, precise BN, checking the data files).
NOT_DEFINING = (*C.NON_IDENTITY_KEYS, "seed", "probe_every", "data.verify", *MF.CONFIG_KEYS, "precise_bn")
CREATE_HINT = "create runs with `bnexp train` or `bnexp sweep` (e.g. `bnexp sweep --preset lr_sensitivity`)"
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass
class Runs:
    """Everything the report reads: `runs` one row per run, `epochs` and `steps` long tables."""

    runs: pd.DataFrame
    epochs: pd.DataFrame                 # run_id + metrics.csv columns
    steps: pd.DataFrame                  # run_id, step, epoch, loss
    config_keys: list[str]               # flattened (dotted) config columns of `runs`
    warnings: list[str] = field(default_factory=list)
    n_dirs: int = 0                      # run directories seen (readable or not)
    measures: pd.DataFrame = field(default_factory=M.empty)   # run_id + measures.csv columns

    def subset(self, mask: pd.Series) -> "Runs":
        runs = self.runs[mask.to_numpy()].reset_index(drop=True)
        ids = set(runs["run_id"])
        return Runs(runs, self.epochs[self.epochs["run_id"].isin(ids)],
                    self.steps[self.steps["run_id"].isin(ids)], self.config_keys, self.warnings, self.n_dirs,
                    self.measures[self.measures["run_id"].isin(ids)])


# ---------------------------------------------------------------- reading one run

def _flat_config(cfg: dict) -> dict[str, Any]:
    """config.yaml flattened to dotted keys, lists as tuples (hashable); `bn` always "on"/"off"
    (an unquoted YAML `on` reads as True; a hand-written config may lack it)."""
    flat = {k: tuple(v) if isinstance(v, list) else v for k, v in C.flatten(cfg).items()}
    flat["bn"] = C.bn_word(flat.get("bn")) or C.bn_of(flat.get("norm.kind"))
    return flat


def group_key(cfg: dict[str, Any]) -> str:
    """Canonical text of the config without the keys that do not define the experiment."""
    items = sorted((k, v) for k, v in cfg.items() if k not in NOT_DEFINING)
    return json.dumps(items, default=str)


def _num(x: Any) -> float:
    try:
        return float(x) if x is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def _dict(x: Any) -> dict:
    return x if isinstance(x, dict) else {}


def read_run(path: Path) -> tuple[dict | None, str | None]:
    """config.yaml + run.json of one run -> (row, None), or (None, why it must be skipped)."""
    try:
        cfg = yaml.load((path / L.CONFIG).read_text(), Loader=_Loader)
    except FileNotFoundError:
        return None, f"no {L.CONFIG}"
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        return None, f"{L.CONFIG} unreadable ({type(e).__name__})"
    if not isinstance(cfg, dict):
        return None, f"{L.CONFIG} is not a mapping"
    try:
        info = json.loads((path / L.INFO).read_text())
    except FileNotFoundError:
        return None, f"no {L.INFO} (run not started?)"
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return None, (f"{L.INFO} unreadable ({type(e).__name__}; rerunning the run's `bnexp train` command "
                      "resumes or retrains it)")
    if not isinstance(info, dict):
        return None, (f"{L.INFO} holds {json.dumps(info)[:40]}, not a JSON object "
                      "(rerunning the run's `bnexp train` command resumes or retrains it)")
    if info.get("status") not in L.STATUSES:
        return None, f"{L.INFO} status {info.get('status')!r} not in {'/'.join(L.STATUSES)}"

    status = info["status"]
    if status == L.RUNNING and RunLock(path / L.LOCK).is_free():
        status = L.INTERRUPTED  # nobody trains it any more
    cfg = _flat_config(cfg)
    final = _dict(info.get("final"))
    div, secs, vers = _dict(info.get("diverged_at")), _dict(info.get("seconds")), _dict(info.get("versions"))
    return {
        "run_id": path.name, "status": status,
        **{m: _num(final.get(m)) for m in L.FINAL_METRICS},
        "epochs_completed": _num(info.get("epochs_completed")),
        "diverged_epoch": _num(div.get("epoch")), "diverged_step": _num(div.get("step")),
        "error": str(info.get("error") or ""),
        "seconds_train": _num(secs.get("train")), "seconds_total": _num(secs.get("total")),
        "git_commit": info.get("git_commit") or "", "bnexp_version": vers.get("bnexp") or "",
        "started": info.get("started") or "", "ended": info.get("ended") or "",
        "has_activations": (path / L.ACTIVATIONS).is_file(),
        "dir": str(path), "group_key": group_key(cfg),
        **{f"cfg:{k}": v for k, v in cfg.items()},
    }, None


# ---------------------------------------------------------------- metrics.csv / steps.csv

def _read_one_csv(path: Path, columns: tuple[str, ...]) -> tuple[pd.DataFrame | None, str | None]:
    """The careful path for one CSV whose header is not exactly `columns`: name the problem."""
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError, ValueError) as e:
        return None, f"{path.name} unreadable ({type(e).__name__})"
    missing = [c for c in columns if c not in df.columns]
    if missing:
        return None, f"{path.name} lacks column(s) {', '.join(missing)}"
    df = df[list(columns)].apply(pd.to_numeric, errors="coerce")
    if df[columns[0]].isna().any():
        return None, f"{path.name} has non-numeric {columns[0]} values"
    return df, None


def npz_problem(path: Path) -> str | None:
    """Why an existing activations.npz cannot be read, from its zip directory only (a truncated
    file has none); None if it is absent or looks whole. Damage inside a member shows up later,
    when the figure reads it (figures.read_activations then skips it)."""
    if not path.is_file():
        return None
    try:
        with zipfile.ZipFile(path) as z:
            z.namelist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        return f"{path.name} unreadable ({type(e).__name__})"
    return None


def read_tables(dirs: list[Path], name: str, columns: tuple[str, ...]) -> tuple[pd.DataFrame, dict[str, str]]:
    """`name` (metrics.csv / steps.csv) of every run as one long table with a run_id column, and
    {run_id: problem} for the files missing or malformed. Files with exactly the expected header
    are concatenated and parsed by one read_csv call (per-file pandas overhead dominates with
    hundreds of runs); anything unusual falls back to a careful per-file read."""
    header = ",".join(columns).encode()
    bodies, ids, counts, careful, problems = [], [], [], [], {}
    for d in dirs:
        try:
            raw = (d / name).read_bytes()
        except FileNotFoundError:
            problems[d.name] = f"no {name}"
            continue
        except OSError as e:
            problems[d.name] = f"{name} unreadable ({type(e).__name__})"
            continue
        head, _, body = raw.partition(b"\n")
        if head.strip() != header or b"\r" in body or b"\n\n" in body or body.startswith(b"\n"):
            careful.append(d)
            continue
        if body and not body.endswith(b"\n"):
            body += b"\n"
        bodies.append(body)
        ids.append(d.name)
        counts.append(body.count(b"\n"))
    frames = []
    if bodies:
        try:
            df = pd.read_csv(io.BytesIO(b"".join(bodies)), names=list(columns), header=None, dtype=np.float64)
            if len(df) != sum(counts) or df[columns[0]].isna().any():
                raise ValueError("row count or key column mismatch")
            # categorical run_id: 480k repeated strings would cost more than the parsing itself
            df["run_id"] = pd.Categorical.from_codes(np.repeat(np.arange(len(ids)), counts), categories=ids)
            frames.append(df)
        except (ValueError, pd.errors.ParserError):
            batch = set(ids)
            careful += [d for d in dirs if d.name in batch]
    for d in careful:
        df, why = _read_one_csv(d / name, columns)
        if why:
            problems[d.name] = why
        else:
            frames.append(df.assign(run_id=d.name))
    frames = [f for f in frames if len(f)]
    if len(frames) == 1:
        out = frames[0]
    elif frames:
        out = pd.concat(frames, ignore_index=True)
        out["run_id"] = out["run_id"].astype(str).astype("category")
    else:
        out = pd.DataFrame({c: [] for c in columns}, dtype=float).assign(run_id=pd.Categorical([]))
    return out[["run_id", *columns]], problems


# ---------------------------------------------------------------- reading all runs

def load_runs(results_dir: Path) -> Runs:
    """Read every `results_dir/runs/<run_id>/`; raise BnexpError when there is nothing to read."""
    runs_root = Path(results_dir) / L.RUNS_DIR
    dirs = sorted(p for p in runs_root.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if runs_root.is_dir() else []
    if not dirs:
        raise BnexpError(f"no runs in {runs_root} (expected {runs_root}/<run_id>/{L.INFO}); {CREATE_HINT}")
    rows, skipped = [], []
    for d in dirs:
        row, why = read_run(d)
        if row is None:
            skipped.append(f"skipped {d}: {why}")
        else:
            rows.append(row)
    if not rows:
        raise BnexpError(f"none of the {len(dirs)} run directories in {runs_root} is readable "
                         f"(first: {skipped[0]}); {CREATE_HINT}")
    df = pd.DataFrame(rows)
    df.columns = [c[4:] if c.startswith("cfg:") else c for c in df.columns]
    config_keys = sorted({c[4:] for r in rows for c in r if c.startswith("cfg:")})
    ok = [Path(p) for p in df["dir"]]
    epochs, m_problems = read_tables(ok, L.METRICS, L.METRIC_COLUMNS)
    steps, s_problems = read_tables(ok, L.STEPS, L.STEP_COLUMNS)
    asked = dict(zip(df["run_id"], df["measure"].map(M.asks_for_measures))) if "measure" in df else {}
    measures, x_problems = M.read_measures(ok, asked)
    df = _complete_finals(df, epochs)
    df["has_metrics"] = ~df["run_id"].isin(m_problems)
    df["has_steps"] = ~df["run_id"].isin(s_problems)
    a_problems = {r: why for r, d in zip(df["run_id"], df["dir"]) if (why := npz_problem(Path(d) / L.ACTIVATIONS))}
    df["has_activations"] &= ~df["run_id"].isin(a_problems)

    # A completed run needs final numbers (run.json or metrics.csv); everything else is optional.
    bad = (df["status"] == L.COMPLETED) & ~np.isfinite(df[list(L.FINAL_METRICS)].astype(float)).any(axis=1)
    skipped += [f"skipped {d}: completed but run.json has no final metrics and metrics.csv has no rows"
                for d in df.loc[bad, "dir"]]
    df = df[~bad].reset_index(drop=True)
    partial = []
    for run_id, status, d in zip(df["run_id"], df["status"], df["dir"]):
        notes = [f"{m_problems[run_id]}; epoch curves omitted" if run_id in m_problems else "",
                 f"{s_problems[run_id]}; step curve omitted" if run_id in s_problems else "",
                 f"{x_problems[run_id]}; measure figures omitted" if run_id in x_problems else ""]
        # a missing file is expected while a run is running or after it failed
        notes = [n for n in notes if n and (status in L.FINISHED or not n.startswith("no "))]
        if run_id in a_problems:  # damaged, not just absent: worth a line whatever the status
            fix = "retrains the run" if status in L.FINISHED else "starts the run over"
            notes.append(f"{a_problems[run_id]}; activation figure omitted (`bnexp train ... --force` {fix} "
                         "to record it again)")
        if notes:
            partial.append(f"partial {d}: {'; '.join(notes)}")
    keep = set(df["run_id"])
    return Runs(df, epochs[epochs["run_id"].isin(keep)].reset_index(drop=True),
                steps[steps["run_id"].isin(keep)].reset_index(drop=True), config_keys,
                skipped + partial, len(dirs), measures[measures["run_id"].isin(keep)].reset_index(drop=True))


def _complete_finals(df: pd.DataFrame, epochs: pd.DataFrame) -> pd.DataFrame:
    """epoch1_train_loss from metrics.csv; finals from its last row where run.json has none."""
    first = epochs[epochs["epoch"] == 1].groupby("run_id")["train_loss"].first()
    df["epoch1_train_loss"] = df["run_id"].map(first).astype(float)
    finals = list(L.FINAL_METRICS)
    last = epochs.sort_values("epoch").groupby("run_id")[finals].last()
    none = ~np.isfinite(df[finals].astype(float)).any(axis=1) & df["run_id"].isin(last.index)
    if none.any():
        df.loc[none, finals] = last.loc[df.loc[none, "run_id"]].to_numpy()
    return df


# ---------------------------------------------------------------- --where filtering

def parse_scalar(text: str) -> Any:
    """YAML-ish scalar without YAML 1.1's on/off/yes/no booleans (bn=on stays the string "on")."""
    t = text.strip()
    low = t.lower()
    if low in ("null", "~", ""):           # not "none": norm.kind=none is a value
        return None
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "'\"":
        return t[1:-1]
    return t


def same_value(a: Any, b: Any) -> bool:
    """Config value equality: None == NaN == null, numbers numerically, bools only with bools."""
    a_none = a is None or (isinstance(a, float) and math.isnan(a))
    b_none = b is None or (isinstance(b, float) and math.isnan(b))
    if a_none or b_none:
        return a_none and b_none
    if isinstance(a, (bool, np.bool_)) or isinstance(b, (bool, np.bool_)):
        return isinstance(a, (bool, np.bool_)) and isinstance(b, (bool, np.bool_)) and bool(a) == bool(b)
    if isinstance(a, (int, float, np.number)) and isinstance(b, (int, float, np.number)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return str(a) == str(b)


def matches(values: pd.Series, wanted: Any) -> pd.Series:
    """Boolean mask: which entries of `values` equal `wanted` (a list/tuple = any of)."""
    options = wanted if isinstance(wanted, (list, tuple)) else [wanted]
    return values.map(lambda v: any(same_value(v, w) for w in options)).astype(bool)


def apply_where(runs: Runs, where: list[str] | tuple[str, ...]) -> Runs:
    """Keep runs whose config matches every `key=value` (value may be `a,b` = either)."""
    mask = pd.Series(True, index=runs.runs.index)
    for term in where:
        key, sep, value = term.partition("=")
        key = key.strip()
        if not sep or not key:
            raise BnexpError(f"malformed --where {term!r}: expected key=value, e.g. model.name=lenet5 or lr=0.5")
        if key not in runs.config_keys:
            near = [k for k in runs.config_keys if k.endswith("." + key) or key in k]
            hint = f"; did you mean {' or '.join(near[:3])}?" if near else ""
            raise BnexpError(f"--where key {key!r} is in no run's config.yaml{hint}")
        wanted = [parse_scalar(v) for v in value.split(",")] if "," in value else parse_scalar(value)
        mask &= matches(runs.runs[key], wanted)
    if not mask.any():
        raise BnexpError(f"no runs match --where {' '.join(where)} ({len(runs.runs)} runs read)")
    return runs.subset(mask)
