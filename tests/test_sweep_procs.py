"""`bnexp sweep` across processes: kill -9 and resume, two sweeps at once, --jobs 2, joblib, submitit."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bnexp import layout as L
from bnexp import config as C
from bnexp import sweep as S
from bnexp import train as T
from bnexp.nn import functional as bn_functional

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def eager_bn(monkeypatch):
    monkeypatch.setenv("BNEXP_BN_BACKEND", "eager")  # inherited by subprocesses and workers
    with bn_functional.use_backend("eager"):
        yield


def tiny(data: Path, results: Path, *extra) -> list[str]:
    return [f"data_dir={data}", f"results_dir={results}", "device=cpu", "train_size=256", "test_size=128",
            "batch_size=64", "data.verify=false", *extra]


def start_sweep(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bnexp", "sweep", *map(str, args)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def numbers(path: Path) -> list[tuple]:
    return [tuple(v for k, v in r.items() if k != "seconds") for r in rows(path)]


def check_trained_once(run: Path, epochs: int) -> None:
    """A complete run whose metrics and step losses were written by exactly one training."""
    assert json.loads((run / L.INFO).read_text())["status"] == L.COMPLETED
    assert [r["epoch"] for r in rows(run / L.METRICS)] == [str(e) for e in range(1, epochs + 1)]
    steps = rows(run / L.STEPS)
    assert [int(r["step"]) for r in steps] == list(range(1, len(steps) + 1)) and steps[-1]["epoch"] == str(epochs)


def test_kill_9_then_rerun_resumes_and_matches_a_clean_run(synth_data_dir, tmp_path):
    results = tmp_path / "results"
    args = tiny(synth_data_dir, results, "epochs=4", "batch_size=16", "bn=on,off", "lr=0.1")
    proc = start_sweep(*args)
    first = None
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        done = [m for m in results.glob("runs/*/metrics.csv") if len(rows(m)) >= 1]
        if done:
            first = done[0].parent
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert first is not None, "the first epoch never reached the disk"
    assert json.loads((first / L.INFO).read_text())["status"] == L.RUNNING
    on_disk = len(rows(first / L.METRICS))  # the checkpoint is written just before metrics.csv
    assert 1 <= on_disk < 4
    assert len(list(results.glob("runs/*"))) == 1  # the second run had not started

    res = S.run_sweep(S.plan(args))
    assert [r.status for r in res.results] == [L.COMPLETED, L.COMPLETED]
    resumed = next(r for r in res.results if r.path == first)
    assert on_disk <= resumed.extra["resumed_from"] < 4  # the epoch in progress was lost, no more
    clean = T.run(C.compose([a.replace(str(results), str(tmp_path / "clean")) for a in args if "," not in a]
                            + [f"bn={'on' if '-bn-' in first.name else 'off'}", "progress=false"]))
    assert clean.run_id == first.name
    assert numbers(first / L.METRICS) == numbers(clean.path / L.METRICS)
    assert (first / L.STEPS).read_text() == (clean.path / L.STEPS).read_text()


def test_two_sweeps_over_overlapping_grids_train_each_run_once(synth_data_dir, tmp_path):
    results = tmp_path / "results"
    common = tiny(synth_data_dir, results, "epochs=2", "batch_size=32")
    a = start_sweep(*common, "bn=on,off", "lr=0.2,0.1")  # both start with bn=on lr=0.2
    b = start_sweep(*common, "bn=on,off", "lr=0.2,0.3", "--jobs", "2")  # --jobs 2: a process pool
    out_a, err_a = a.communicate(timeout=300)
    out_b, err_b = b.communicate(timeout=300)
    assert a.returncode == 0 and b.returncode == 0, err_a + err_b
    runs = sorted(results.glob("runs/*"))
    assert len(runs) == 6  # 4 + 4 runs, 2 shared
    completed = re.findall(r"\] completed (\S+):", out_a + out_b)
    assert sorted(completed) == sorted(r.name for r in runs)  # each run trained by exactly one sweep
    for out in (out_a, out_b):
        assert out.count("] skipped ") + out.count("] completed ") == 4
        assert re.search(r"4 runs in [\d.]+s: \d completed, \d skipped, 0 diverged, 0 failed, 0 busy", out)
    for run in runs:
        check_trained_once(run, 2)


@pytest.mark.parametrize("launcher, options", [("joblib", {}), ("submitit", {"cluster": "local"})])
def test_cluster_launchers_dispatch_the_same_runs(synth_data_dir, tmp_path, launcher, options):
    pytest.importorskip(launcher)
    args = tiny(synth_data_dir, tmp_path / launcher, "epochs=1", "bn=on,off", "lr=0.1")
    res = S.run_sweep(S.plan(args, quiet=True), jobs=2, launcher=launcher, options=options)
    assert [r.status for r in res.results] == [L.COMPLETED, L.COMPLETED]
    serial = S.run_sweep(S.plan([a.replace(str(tmp_path / launcher), str(tmp_path / "serial")) for a in args]))
    for r, s in zip(res.results, serial.results):
        assert r.run_id == s.run_id and r.path.parent.parent == tmp_path / launcher
        assert numbers(r.path / L.METRICS) == numbers(s.path / L.METRICS)
    if launcher == "submitit":
        assert list((tmp_path / launcher / "submitit").glob("*_log.out"))
    again = S.run_sweep(S.plan(args, quiet=True), jobs=2, launcher=launcher, options=options)
    assert [r.status for r in again.results] == [L.SKIPPED, L.SKIPPED]  # not even dispatched
