"""A worker process killed mid-run (kill -9, the OOM killer) fails its own run only, under every launcher."""

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
from test_sweep_procs import check_trained_once, eager_bn, rows, start_sweep, tiny  # noqa: F401 (fixture)

from bnexp import layout as L
from bnexp import sweep as S

pytestmark = pytest.mark.slow


def holder_pid(run: Path) -> int | None:
    """The pid the training process wrote into the run's .lock (None while nobody holds it)."""
    try:
        return int((run / L.LOCK).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def kill_one_mid_run(results: Path, done, timeout: float = 240, parent: bool = False) -> tuple[Path, int]:
    """Wait until some run has finished an epoch (and not its last), kill -9 its training process
    (or that process's parent); returns the run and the training process's pid."""
    deadline = time.time() + timeout
    while time.time() < deadline and not done():
        for m in results.glob("runs/*/metrics.csv"):
            run = m.parent  # metrics.csv comes after run.json's first write
            pid = holder_pid(run)
            info = json.loads((run / L.INFO).read_text())
            if pid and pid != os.getpid() and info["status"] == L.RUNNING and info["epochs_completed"] >= 1:
                os.kill(parent_of(pid) if parent else pid, signal.SIGKILL)
                return run, pid
        time.sleep(0.01)
    pytest.fail("no run was caught mid-training")


def check_failed_by(run: Path, reason: str) -> None:
    """run.json says failed with `reason` (and when); error.log says it too; nothing else changed."""
    info = json.loads((run / L.INFO).read_text())
    assert info["status"] == L.FAILED and reason in info["error"] and info["ended"]
    assert info["epochs_completed"] < 6 and len(rows(run / L.METRICS)) >= 1
    assert reason in (run / L.ERROR_LOG).read_text()


REASONS = {"joblib": "worker process {pid} died: killed by SIGKILL",
           "submitit": "died: no result (job state FINISHED) (training process pid {pid})"}  # local jobs
ARGS = ("epochs=6", "batch_size=16", "train_size=512", "bn=on,off", "lr=0.1,0.2")


def test_a_killed_pool_worker_fails_only_its_own_run(synth_data_dir, tmp_path):
    results = tmp_path / "results"
    proc = start_sweep(*tiny(synth_data_dir, results, *ARGS), "--jobs", "2")
    run, pid = kill_one_mid_run(results, lambda: proc.poll() is not None)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, err  # a run failed
    check_failed_by(run, f"worker process {pid} died: killed by SIGKILL")
    assert json.loads((run / L.INFO).read_text())["error"] == f"worker process {pid} died: killed by SIGKILL"
    others = [r for r in results.glob("runs/*") if r != run]
    assert len(others) == 3
    for r in others:  # the run trained beside the killed one went on in its own process: trained once
        check_trained_once(r, 6)
    assert sorted(re.findall(r"\] completed (\S+):", out)) == sorted(r.name for r in others)
    assert re.search(rf"\] failed {run.name}: .*\(worker process {pid} died: killed by SIGKILL\)", out)
    table = out[out.rindex(" note\n"):]
    row = next(line for line in table.splitlines() if f"worker process {pid} died: killed by SIGKILL" in line)
    assert re.search(r" failed +[1-5]/6 ", row)  # the note column says why; the epochs, how far it got
    assert re.search(r"4 runs in [\d.]+s: 3 completed, 0 skipped, 0 diverged, 1 failed, 0 busy", out)
    assert "BrokenProcessPool" not in out + err

    # rerun: only the failed run is trained again, resuming from its last checkpoint
    res = S.run_sweep(S.plan(tiny(synth_data_dir, results, *ARGS)))
    assert sorted(r.status for r in res.results) == [L.COMPLETED, L.SKIPPED, L.SKIPPED, L.SKIPPED]
    again = next(r for r in res.results if r.status == L.COMPLETED)
    assert again.path == run and again.extra["resumed_from"] >= 1


@pytest.mark.parametrize("launcher, options", [("joblib", []), ("submitit", ["--launcher-opt", "cluster=local"])])
def test_a_killed_worker_fails_only_its_own_run_under_cluster_launchers(synth_data_dir, tmp_path, launcher, options):
    pytest.importorskip(launcher)
    results = tmp_path / launcher
    proc = start_sweep(*tiny(synth_data_dir, results, *ARGS), "--jobs", "2", "--launcher", launcher, *options)
    run, pid = kill_one_mid_run(results, lambda: proc.poll() is not None)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, err
    check_failed_by(run, REASONS[launcher].format(pid=pid))
    others = [r for r in results.glob("runs/*") if r != run]
    assert len(others) == 3
    for r in others:
        check_trained_once(r, 6)
    assert re.search(r"4 runs in [\d.]+s: 3 completed, 0 skipped, 0 diverged, 1 failed, 0 busy", out)
    assert re.search(rf"\] failed {run.name}: .*\(.*\)", out)


def test_a_killed_loky_worker_gets_the_unfinished_runs_resubmitted(synth_data_dir, tmp_path):
    """The loky worker itself (the trainer's parent) dies: loky abandons the batch and kills the other
    workers; the unfinished runs go to a fresh pool and resume from their checkpoints, none fails."""
    pytest.importorskip("joblib")
    results = tmp_path / "joblib"
    proc = start_sweep(*tiny(synth_data_dir, results, *ARGS), "--jobs", "2", "--launcher", "joblib")
    run, trainer = kill_one_mid_run(results, lambda: proc.poll() is not None, parent=True)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out + err
    for r in results.glob("runs/*"):
        check_trained_once(r, 6)
    assert re.search(rf"\] completed {run.name}: .*\(resumed after epoch [1-5]\)", out)
    assert "4 completed, 0 skipped, 0 diverged, 0 failed, 0 busy" in out
