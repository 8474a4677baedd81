"""measures.csv (issue 15's instruments, format in bnexp.measures_format) -> one long table, and
the seed means that figures 7-10 draw.

The file is optional: a run without instruments has none. A run whose config asks for instruments
but has no measures.csv, or whose file is damaged (a killed writer's cut last row, a hand edit,
another format), keeps its place in every other table and figure; only its measure figures leave
it out, with one warning line, as the report does for a damaged steps.csv (load.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from bnexp import measures_format as MF

TEXT_COLUMNS = ("instrument", "layer", "statistic")
COLUMNS = ("run_id", *MF.HEADER)
MEAN_COLUMNS = ("group", "instrument", "layer", "statistic", "step", "value", "n")


def empty() -> pd.DataFrame:
    """The table of no measurements (the columns read_measures returns)."""
    return pd.DataFrame({c: pd.Series(dtype=object if c in ("run_id", *TEXT_COLUMNS) else float) for c in COLUMNS})


def asks_for_measures(measure) -> bool:
    """Whether a run's `measure` config value (a tuple of names once flattened; absent = NaN in old
    runs) switched instruments on."""
    if isinstance(measure, str):
        return measure.strip() not in ("", "[]")
    return isinstance(measure, (tuple, list)) and len(measure) > 0


def read_one(path: Path) -> tuple[pd.DataFrame | None, str | None]:
    """One measures.csv -> (rows in file order, None) or (None, what is wrong with it). Every row
    must be whole: a measurement with a missing field would draw a wrong mean, so a damaged file is
    left out as a whole rather than in part. A value `nan` / `inf` is whole (a diverging run)."""
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError, ValueError) as e:
        return None, f"{path.name} unreadable ({type(e).__name__})"
    if tuple(df.columns) != MF.HEADER:
        return None, f"{path.name} has header {','.join(map(str, df.columns))[:60]}, not {','.join(MF.HEADER)}"
    step = pd.to_numeric(df["step"], errors="coerce")
    value = pd.to_numeric(df["value"], errors="coerce")
    cut = (df[list(TEXT_COLUMNS)] == "").any(axis=1) | (df["value"].str.strip() == "")
    bad_step = step.isna() | (step < 0) | (step != step.round())
    bad_value = value.isna() & (df["value"].str.strip().str.lower() != "nan")
    bad = cut | bad_step | bad_value
    if bad.any():
        line = int(np.flatnonzero(bad.to_numpy())[0]) + 2        # 1-based, after the header
        return None, f"{path.name} line {line} is incomplete or not numeric ({int(bad.sum())} such rows)"
    return df.assign(step=step.astype(float), value=value.astype(float)), None


def read_measures(dirs: list[Path], asked: dict[str, bool]) -> tuple[pd.DataFrame, dict[str, str]]:
    """measures.csv of every run directory as one long table (run_id + the file's columns, each
    file's rows in its order, runs in `dirs` order) and {run_id: problem}. A missing file is a
    problem only for a run whose config asked for instruments (`asked`)."""
    frames, problems = [], {}
    for d in dirs:
        path = d / MF.FILE_NAME
        if not path.is_file():
            if asked.get(d.name):
                problems[d.name] = f"no {MF.FILE_NAME}"
            continue
        df, why = read_one(path)
        if why:
            problems[d.name] = why
        elif len(df):
            frames.append(df.assign(run_id=d.name))
    if not frames:
        return empty(), problems
    return pd.concat(frames, ignore_index=True)[list(COLUMNS)], problems


def seed_means(measures: pd.DataFrame, run_group: pd.Series) -> pd.DataFrame:
    """Per group, instrument, layer, statistic and step: the mean over the group's seeds (`n` of
    them) of the finite values. Non-finite values (a diverging run) are left out of the mean rather
    than turning it into inf. Groups, layers and statistics keep their order of first appearance
    (layer names are opaque: the file's order is the model's)."""
    m = measures[measures["run_id"].isin(run_group.index)]
    if m.empty:
        return pd.DataFrame({c: [] for c in MEAN_COLUMNS})
    m = m.assign(group=m["run_id"].map(run_group).to_numpy(),
                 value=m["value"].where(np.isfinite(m["value"].to_numpy(float))))
    g = m.groupby(["group", "instrument", "layer", "statistic", "step"], sort=False)["value"]
    out = pd.concat({"value": g.mean(), "n": g.count()}, axis=1).reset_index()
    return out[list(MEAN_COLUMNS)]


def layers(means: pd.DataFrame, instrument: str, statistic: str | None = None) -> list[str]:
    """The layers an instrument measured (optionally: that have `statistic`), in first-appearance order."""
    sel = means[means["instrument"] == instrument]
    if statistic is not None:
        sel = sel[sel["statistic"] == statistic]
    return list(dict.fromkeys(sel["layer"]))


def statistics(means: pd.DataFrame, instrument: str) -> list[str]:
    """The statistics of `instrument` present, in measures_format's order (unknown ones are not drawn)."""
    have = set(means.loc[means["instrument"] == instrument, "statistic"])
    return [s for s in MF.STATISTICS[instrument] if s in have]


def curve(means: pd.DataFrame, group: str, instrument: str, layer: str, statistic: str) -> pd.DataFrame:
    """step, value (seed mean) and n of one group's statistic, by step."""
    sel = means[(means["group"] == group) & (means["instrument"] == instrument) & (means["layer"] == layer)
                & (means["statistic"] == statistic)]
    return sel[["step", "value", "n"]].sort_values("step")
