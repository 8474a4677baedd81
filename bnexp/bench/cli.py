"""Answer time of the commands that train nothing: each one a fresh `python -m bnexp ...` process.

What a user waits for when bnexp only has to say something: a typo, the preset list, a dry run,
a run that is already finished, a sweep whose runs all are. They are answered before torch is
imported (config validation, run id and the run directory's run.json need none of it), so each
should take well under a second; torch alone costs seconds to import on a small CPU.

The five commands, on the issue's grid (`--preset lr_sensitivity lr=0.05,0.5 seed=0,1 epochs=3
train_size=4096 test_size=1000`, 8 runs). The finished runs are constructed: a run.json that says
completed in each run's directory, which is all that `bnexp train` and `bnexp sweep` read of a
finished run, so no data set and no training is needed. Repeats rotate the commands (interleaved, as
the other benchmarks do); min / median / max of the wall times are reported, and whether each
command imported torch (from one extra `-X importtime` run, untimed).

    bnexp bench cli
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GRID = ["--preset", "lr_sensitivity", "lr=0.05,0.5", "seed=0,1", "epochs=3", "train_size=4096", "test_size=1000"]
HEAVY = ("torch", "numpy", "pandas")  # modules whose import alone takes a second or more on a busy 2-core CPU


def commands(fresh: Path, done: Path) -> dict[str, tuple[list[str], int]]:
    """name -> (bnexp arguments, expected exit code); `fresh` is an empty results dir, `done` one
    where every run of the grid is finished (make it with `finish_grid`)."""
    first = _first_point(done)
    return {
        "typo (train lrr=1)": (["train", "lrr=1"], 2),
        "sweep --list-presets": (["sweep", "--list-presets"], 0),
        "sweep --dry-run (8 runs)": (["sweep", *GRID, f"results_dir={fresh}", "--dry-run"], 0),
        "train, skipped": (["train", *first], 0),
        "sweep, 8 runs skipped": (["sweep", *GRID, f"results_dir={done}"], 0),
    }


def _first_point(results_dir: Path) -> list[str]:
    from .. import sweep as S

    return S.plan(GRID[2:] + [f"results_dir={results_dir}"], preset=GRID[1]).points[0].overrides


def finish_grid(results_dir: Path) -> int:
    """A run.json that says completed for every run of the grid under results_dir; the number of runs."""
    from .. import layout
    from .. import sweep as S
    from ..tracking import RunDir

    points = S.plan(GRID[2:] + [f"results_dir={results_dir}"], preset=GRID[1]).points
    for p in points:
        rd = RunDir(results_dir, p.run_id)
        rd.path.mkdir(parents=True, exist_ok=True)
        rd.write_info({"run_id": p.run_id, "status": layout.COMPLETED, "epochs_completed": p.cfg.epochs,
                       "epochs": p.cfg.epochs, "final": dict(zip(layout.FINAL_METRICS, (0.5, 0.8, 0.6, 0.75))),
                       "seconds": {"train": 1.0, "eval": 0.1, "probes": 0.1, "total": 1.5}})
    return len(points)


def _env() -> dict[str, str]:
    """This process's environment, with the bnexp being measured first on the path."""
    root = str(Path(__file__).resolve().parents[2])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}


def run_command(args: list[str], expect: int, python_flags: tuple[str, ...] = ()) -> tuple[float, str]:
    """One fresh `python [flags] -m bnexp args` process: (wall seconds, stderr); raises if it exits otherwise."""
    cmd = [sys.executable, *python_flags, "-m", "bnexp", *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    seconds = time.perf_counter() - t0
    if proc.returncode != expect:
        from ..errors import BnexpError

        last = (proc.stderr.strip() or proc.stdout.strip() or "?").splitlines()[-1]
        raise BnexpError(f"cli benchmark: `bnexp {' '.join(args)}` exited {proc.returncode}, not {expect}: {last}")
    return seconds, proc.stderr


def imported(importtime_stderr: str) -> set[str]:
    """The top-level packages a `python -X importtime` run imported, from its stderr."""
    names = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


def run(repeats: int = 5) -> dict:
    """Time each command `repeats` times in fresh processes (rotating order); a JSON-serialisable dict."""
    tmp = Path(tempfile.mkdtemp(prefix="bnexp-bench-cli-"))
    try:
        fresh, done = tmp / "fresh", tmp / "done"
        n_runs = finish_grid(done)
        cmds = commands(fresh, done)
        heavy = {}
        for name, (args, expect) in cmds.items():
            _, err = run_command(args, expect, ("-X", "importtime"))
            heavy[name] = sorted(set(HEAVY) & imported(err))
        samples: dict[str, list[float]] = {name: [] for name in cmds}
        names = list(cmds)
        for r in range(repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                samples[name].append(run_command(*cmds[name])[0])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = [{"command": name, "args": ["bnexp", *cmds[name][0]], "min": min(s), "median": statistics.median(s),
             "max": max(s), "samples": s, "imports": heavy[name]} for name, s in samples.items()]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"benchmark": "answer time of commands that train nothing (fresh processes)", "device": "cpu",
            "cpu_cores": os.cpu_count(), "load_average_1min": load, "python": sys.version.split()[0],
            "grid": GRID, "runs": n_runs, "repeats": repeats, "rows": rows}


def format_table(result: dict) -> str:
    header = ["command", "min s", "median s", "max s", "imports torch/numpy/pandas"]
    lines = [[r["command"], f"{r['min']:.2f}", f"{r['median']:.2f}", f"{r['max']:.2f}", ", ".join(r["imports"]) or "none"]
             for r in result["rows"]]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    fmt = lambda row: "  ".join(c.ljust(w) if i in (0, 4) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    load = f", 1-min load average {result['load_average_1min']:.1f}" if result["load_average_1min"] is not None else ""
    title = (f"{result['benchmark']}: {result['cpu_cores']} cores{load}; {result['repeats']} repeats each; "
             f"grid: {' '.join(result['grid'])} ({result['runs']} runs)")
    return "\n".join(line.rstrip() for line in [title, fmt(header), "  ".join("-" * w for w in widths), *map(fmt, lines)])

