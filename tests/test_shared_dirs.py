"""A results_dir shared by several users and processes: file modes, who holds a run, dead runs."""

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from runfactory import fake_run
from test_sweep import HeldLock, base, cli, eager_bn  # noqa: F401 (fixtures)

from bnexp import layout as L
from bnexp import sweep as S
from bnexp.report import write_report
from bnexp.report.load import load_runs
from bnexp.tracking import RunDir, atomic_write_text

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def umask():
    """Set the process umask for one test (it is process-wide), restore it afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*")}


@pytest.mark.parametrize("mask", [0o002, 0o077])
def test_run_files_are_created_as_open_would_with_the_umask(base, umask, mask):
    umask(mask)
    r = S.run_sweep(S.plan(base + ["bn=on", "lr=0.1"])).results[0]
    assert r.status == L.COMPLETED
    got = modes(r.path)
    names = {Path(n).name.split(".")[0] or Path(n).name for n in got}
    assert {"run", "config", "metrics", "steps", "activations", "checkpoint", "events", ".lock"} <= \
        names | {Path(n).name for n in got}, got
    for name, mode in got.items():
        want = (0o777 if (r.path / name).is_dir() else 0o666) & ~mask
        assert mode == want, (name, oct(mode), oct(want))
    assert not [n for n in got if n.endswith(".tmp")]  # no temp file left behind
    # a rewrite keeps following the umask (the temp file is created afresh each time)
    umask(0o007)
    atomic_write_text(r.path / L.INFO, (r.path / L.INFO).read_text())
    assert stat.S_IMODE((r.path / L.INFO).stat().st_mode) == 0o660


def test_the_lock_file_names_its_holder_and_a_contender_does_not_erase_it(tmp_path):
    a, b = RunDir(tmp_path, "r"), RunDir(tmp_path, "r")
    assert a.acquire()
    text = (a.path / L.LOCK).read_text()
    assert text == f"{os.getpid()} {socket.gethostname()}\n"
    assert not b.acquire() and not b.lock_free()
    assert (a.path / L.LOCK).read_text() == text  # opened without truncating
    assert b.lock_holder() == f"pid {os.getpid()} on {socket.gethostname()}" and b.lock_holder_pid() == os.getpid()
    a.release()
    assert b.lock_free() and b.acquire()
    b.release()
    assert RunDir(tmp_path, "never-created").lock_free()
    assert not (tmp_path / L.RUNS_DIR / "never-created").exists()  # asking creates nothing


HOLD = """
import sys, time
from pathlib import Path
from bnexp.tracking import RunDir
rd = RunDir(Path(sys.argv[1]), sys.argv[2])
assert rd.acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_stopped_lock_holder_is_named_and_the_sweep_gives_up_after_wait(capsys, base):
    pl = S.plan(base + ["lr=0.1"])
    held = pl.points[0]
    holder = subprocess.Popen([sys.executable, "-c", HOLD, held.cfg.results_dir, held.run_id], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        os.kill(holder.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        code, out, err = cli(capsys, "sweep", *base, "lr=0.1", "--wait", "2")
        waited = time.monotonic() - t0
        assert code == 1, err
        host = socket.gethostname()
        who = f"pid {holder.pid} on {host} (stopped; `kill -CONT {holder.pid}` resumes it)"
        assert f"[wait] busy {held.run_id}" in out  # found busy at first, retried at the end
        assert f"[wait] waiting for {held.run_id}: held by {who}, for at most 2s more" in out
        assert re.search(rf"\[2/2\] busy {held.run_id}: .*\(gave up waiting: still held by pid {holder.pid}", out)
        assert "1 completed, 0 skipped, 0 diverged, 0 failed, 1 busy" in out
        assert out.count("gave up waiting") >= 2  # the progress line and the summary's note column
        assert waited < 60
        assert not (Path(held.cfg.results_dir) / L.RUNS_DIR / held.run_id / L.INFO).exists()  # not touched
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    # the holder is gone: the kernel released its lock, the next sweep trains the run
    code, out, _ = cli(capsys, "sweep", *base, "lr=0.1", "--wait", "2")
    assert code == 0 and "1 completed, 1 skipped, 0 diverged, 0 failed, 0 busy" in out


def test_a_busy_run_is_waited_for_with_its_holder_named_then_trained(base):
    pl = S.plan(base + ["lr=0.1", "bn=on"])
    lock = HeldLock(Path(pl.points[0].cfg.results_dir) / L.RUNS_DIR / pl.points[0].run_id)
    (Path(pl.points[0].cfg.results_dir) / L.RUNS_DIR / pl.points[0].run_id / L.LOCK).write_text("4242 elsewhere\n")
    lines = []

    def on_wait(line):
        lines.append(line)
        lock.release()  # the other process finishes and lets go

    res = S.run_sweep(pl, poll=0.05, wait=None, on_wait=on_wait)
    assert lines == [f"waiting for {pl.points[0].run_id}: held by pid 4242 on elsewhere"]
    assert [r.status for r in res.results] == [L.COMPLETED]


def test_a_dead_running_run_is_reported_interrupted(tmp_path):
    fake_run(tmp_path, seed=0)
    dead = fake_run(tmp_path, seed=1, status=L.RUNNING, epochs_done=2)
    alive = fake_run(tmp_path, seed=2, status=L.RUNNING, epochs_done=1)
    lock = HeldLock(alive)
    try:
        before = modes(tmp_path)
        runs = load_runs(tmp_path)
        status = dict(zip(runs.runs["run_id"], runs.runs["status"]))
        assert status[dead.name] == L.INTERRUPTED and status[alive.name] == L.RUNNING
        assert json.loads((dead / L.INFO).read_text())["status"] == L.RUNNING  # read-time only
        assert modes(tmp_path) == before  # reading created nothing (no .lock in the dead run)
        r = write_report(tmp_path)
        assert r.n_by_status == {L.COMPLETED: 1, L.INTERRUPTED: 1, L.RUNNING: 1}
        md = (tmp_path / "report" / "report.md").read_text()
        assert "1 running, 1 interrupted, 1 completed" in md
        assert "## Runs not aggregated (running / interrupted / failed)" in md
        assert "interrupted: run.json says running, but no process holds the run's lock" in md
        assert re.search(rf"\| \[{dead.name}\]\(\.\./runs/{dead.name}/run\.json\) \| interrupted \|", md)  # linked run id
    finally:
        lock.release()


def test_a_lock_file_this_user_may_not_write_still_locks(tmp_path, monkeypatch):
    """Another user's .lock (0644): opened read-only, the flock still excludes; only the name is missing."""
    import bnexp.locks as locks

    owner = RunDir(tmp_path, "r")
    assert owner.acquire()
    owner.release()
    real_open = os.open

    def open_as_other_user(path, flags, *mode):
        if flags & (os.O_RDWR | os.O_WRONLY):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *mode)

    monkeypatch.setattr(locks.os, "open", open_as_other_user)
    a, b = RunDir(tmp_path, "r"), RunDir(tmp_path, "r")
    assert a.acquire() and not b.acquire() and not b.lock_free()
    assert b.lock_holder() == "a process that did not record its pid"
    a.release()
    assert b.lock_free()
