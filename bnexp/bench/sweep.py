"""Sweep throughput: runs per minute of the same grid with --jobs 1 and with --jobs N.

Each measurement is a whole `python -m bnexp sweep ... --jobs N` command into a fresh results
directory (nothing skipped), timed by the wall clock: it includes starting Python and the worker
processes, compiling, and loading the data in each, which is what a user waits for. The default
grid is 8 small LeNet5 runs (BN on/off x 4 learning rates, 8192 training samples, 2 epochs);
`preset=` measures a preset instead (e.g. lr_sensitivity on a GPU). One untimed run first fills
the on-disk compile cache, so that every command finds it warm. Repeats rotate the job counts
(bnexp.bench.stats); the speed-up of --jobs N over the first job count is the ratio of the two
sweeps of each repeat, as min / median / max, with at least `repeats` repeats and more (within
`budget_s`) until it is settled.

    bnexp bench sweep --device cpu
    python -c 'from bnexp.bench import sweep; print(sweep.format_table(sweep.run("cuda", jobs=(1, 2, 4), preset="lr_sensitivity")))'
"""

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .. import config as C
from .. import launch as L
from .. import layout
from .. import sweep as S
from ..errors import BnexpError
from ..nn import dispatch
from .stats import Spread, measure, verdict

GRID = ["bn=on,off", "lr=0.01,0.05,0.1,0.5"]  # 8 LeNet5 runs on FashionMNIST (plain SGD)
SMALL = [*GRID, "batch_size=64", "train_size=8192", "test_size=2048", "epochs=2"]  # 128 steps per epoch


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def _sweep(overrides: list[str], preset: str | None, jobs: int) -> tuple[float, int]:
    """One whole `bnexp sweep` command into a temporary results dir; (wall seconds, number of runs)."""
    tmp = tempfile.mkdtemp(prefix="bnexp-bench-sweep-")
    cmd = [sys.executable, "-m", "bnexp", "sweep", *overrides, f"results_dir={tmp}", "--jobs", str(jobs),
           *(["--preset", preset] if preset else [])]
    try:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        statuses = [json.loads(p.read_text())["status"] for p in Path(tmp).glob(f"{layout.RUNS_DIR}/*/{layout.INFO}")]
        if proc.returncode != 0 or not statuses or set(statuses) - set(layout.FINISHED):
            last = (proc.stderr.strip() or proc.stdout.strip() or "?").splitlines()[-1]
            raise BnexpError(f"sweep benchmark: `{' '.join(cmd)}` exited {proc.returncode}: {last}")
        return seconds, len(statuses)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _warm_up(overrides: list[str], preset: str | None) -> None:
    """Train the grid's first run for one epoch, untimed: fills compile and page caches."""
    tmp = tempfile.mkdtemp(prefix="bnexp-bench-sweep-")
    try:
        first = S.plan(overrides + [f"results_dir={tmp}"], preset=preset, quiet=True).points[0]
        r = L.run_point(C.compose(first.overrides + ["epochs=1", "progress=false"]))
        if r.status == layout.FAILED:
            raise BnexpError(f"sweep benchmark: {r.message}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(device: str = "cpu", jobs=(1, 2), preset: str | None = None, overrides=(), repeats: int = 3,
        max_repeats: int = 6, budget_s: float = 600.0) -> dict:
    """Time the grid (or the preset) at each job count; return a JSON-serialisable result dict."""
    # One thread per run: every job count then trains the same computation (a run's thread count can
    # change its numbers, so the sweep never lowers it itself) and --jobs N does not oversubscribe the cores.
    base = [f"device={device}", "threads=1", *(SMALL if preset is None else ()), *overrides]
    base = list({o.split("=", 1)[0]: o for o in base}.values())  # a later key=value replaces an earlier one
    _warm_up(base, preset)
    n_runs = [0]

    def sweep_with(j):
        def timed():
            n_runs[0] = _sweep(base, preset, j)[1]
        return timed

    first = str(jobs[0])
    m = measure({str(j): sweep_with(j) for j in jobs}, {f"jobs={j}": (first, str(j)) for j in jobs[1:]},
                min_repeats=repeats, max_repeats=max(repeats, max_repeats), budget_s=budget_s, warmup=0)
    rows = []
    for j in jobs:
        seconds = m.median(str(j))
        speedup = m.ratios.get(f"jobs={j}")
        rows.append({"jobs": j, "seconds": seconds, "runs_per_min": 60 * n_runs[0] / seconds,
                     "samples": m.samples[str(j)], "ratio": speedup.median if speedup else 1.0,
                     "speedup": speedup.to_json() if speedup else None})
    return {"benchmark": "sweep throughput (runs per minute)", "device": device, "device_name": _device_name(device),
            "torch_version": torch.__version__, "backend": dispatch.get_backend(), "cpu_cores": os.cpu_count(),
            "preset": preset, "overrides": base, "runs": n_runs[0], "repeats": len(m.samples[first]), "rows": rows,
            "ratios": {label: r.to_json() for label, r in m.ratios.items()}}


def format_table(result: dict) -> str:
    header = ["jobs", "seconds", "runs/min", f"speed-up over jobs={result['rows'][0]['jobs']} (min, max, pairs)"]
    lines = [[str(r["jobs"]), f"{r['seconds']:.1f}", f"{r['runs_per_min']:.2f}",
              Spread.from_json(r["speedup"]).text() if r["speedup"] else "1.00x"] for r in result["rows"]]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    fmt = lambda row: "  ".join(c.rjust(w) for c, w in zip(row, widths))
    what = f"preset {result['preset']} " if result["preset"] else ""
    title = (f"{result['benchmark']} on {result['device']} ({result['device_name']}), torch {result['torch_version']}, "
             f"BN backend {result['backend']}; {result['runs']} runs: {what}{' '.join(result['overrides'])}; "
             f"median of {result['repeats']} interleaved repeats")
    spreads = {label: Spread.from_json(d) for label, d in result["ratios"].items()}
    return "\n".join([title, fmt(header), "  ".join("-" * w for w in widths), *map(fmt, lines), verdict(spreads)])

