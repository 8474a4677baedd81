"""Data-parallel training end to end: 2 CPU processes (gloo) on tiny synthetic data, against one process.

Tolerance: metrics.csv and steps.csv hold 6 decimals; the 2-process numbers differ from the one-process
ones by the order of floating-point sums only, so losses agree to 1e-4 and accuracies to one sample
(measured: identical to the 6 decimals written, steps.csv within 1e-6).
"""

import csv
import glob
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bnexp import config
from bnexp.cli import main

TINY = ["epochs=2", "batch_size=64", "train_size=256", "test_size=128", "progress=false", "lr=0.1",
        "norm.backend=eager", "device=cpu", "probe_every=0"]
LOSS_TOL = 1e-4


def _args(data_dir, results):
    return [f"data_dir={data_dir}", f"results_dir={results}", *TINY]


def _one_process(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


def _bnexp(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "bnexp", *args], capture_output=True, text=True, timeout=timeout)


def _rows(results: Path, name: str) -> list[dict]:
    (path,) = glob.glob(str(results / "runs" / "*" / name))
    with open(path) as f:
        return list(csv.DictReader(f))


def _close(a: list[dict], b: list[dict], columns, loss_tol: float = LOSS_TOL) -> bool:
    return len(a) == len(b) and all(abs(float(x[c]) - float(y[c])) <= (loss_tol if "loss" in c else 1 / 128 + 1e-9)
                                    for x, y in zip(a, b) for c in columns)


METRICS = ("train_loss", "train_acc", "test_loss", "test_acc")
TRAIN = ("train_loss", "train_acc")


@pytest.mark.slow
def test_synchronised_bn_on_two_processes_is_the_one_process_run(capsys, synth_data_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _one_process(capsys, "train", *_args(synth_data_dir, one))
    r = _bnexp("train", *_args(synth_data_dir, two), "nproc=2", "norm.sync=true")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("completed ") and r.stdout.count("\n") == 1  # one line, from rank 0
    assert _close(_rows(one, "metrics.csv"), _rows(two, "metrics.csv"), METRICS)
    assert _close(_rows(one, "steps.csv"), _rows(two, "steps.csv"), ("loss",))
    # the same run (same id): N processes with synchronised statistics compute the one-process run
    assert os.listdir(one / "runs") == os.listdir(two / "runs")
    (run,) = (two / "runs").iterdir()
    assert '"processes": 2' in (run / "run.json").read_text()
    assert len(list(run.glob("events.out.tfevents.*"))) == 1  # rank 0's TensorBoard file only


@pytest.mark.slow
def test_per_process_bn_under_torchrun_is_ghost_bn_of_the_shard(capsys, synth_data_dir, tmp_path):
    """norm.sync=false: each process normalises its 32 samples, which is ghost BN with virtual batches of
    32 on one process (the training numbers; the running statistics differ: ghost BN updates them once
    per virtual batch, DDP keeps rank 0's), and not BN of the 64.

    Tolerance 2e-3 on the losses (measured: at most 8e-4 over the 8 steps, 0 at steps 1-2): ghost BN
    computes the same sums in another order (its virtual batches regrouped as channels), and BN over
    32 samples amplifies rounding where a feature is nearly constant in a shard (invstd up to
    1/sqrt(eps)); BN of the 64 is 3e-2 to 6e-2 away from 2 steps on."""
    ghost, bn, two = tmp_path / "ghost", tmp_path / "bn", tmp_path / "two"
    _one_process(capsys, "train", *_args(synth_data_dir, ghost), "norm=ghost", "norm.ghost_size=32")
    _one_process(capsys, "train", *_args(synth_data_dir, bn))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                        str(_free_port()), "-m", "bnexp", "train", *_args(synth_data_dir, two)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "-np2-" in r.stdout  # nproc=WORLD_SIZE, part of the id: per-process statistics change the numbers
    assert _close(_rows(ghost, "metrics.csv"), _rows(two, "metrics.csv"), TRAIN, loss_tol=2e-3)
    assert _close(_rows(ghost, "steps.csv"), _rows(two, "steps.csv"), ("loss",), loss_tol=2e-3)
    assert not _close(_rows(bn, "steps.csv"), _rows(two, "steps.csv"), ("loss",), loss_tol=1e-2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _workers(pid: int) -> list[int]:
    """The training processes the launcher `pid` started (multiprocessing spawn children)."""
    kids = [int(c) for t in glob.glob(f"/proc/{pid}/task/*/children") for c in open(t).read().split()]
    return [k for k in kids if b"spawn_main" in open(f"/proc/{k}/cmdline", "rb").read()]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_one_process_then_rerun_resumes_with_the_same_numbers(synth_data_dir, tmp_path):
    args = [*_args(synth_data_dir, tmp_path / "killed"), "epochs=8", "nproc=2", "norm.sync=true"]
    p = subprocess.Popen([sys.executable, "-m", "bnexp", "train", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "killed" / "runs"
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:  # kill after the second epoch's checkpoint
        rows = glob.glob(str(metrics / "*" / "metrics.csv"))
        if rows and len(Path(rows[0]).read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    workers = _workers(p.pid)
    assert len(workers) == 2, "the run ended before it could be killed"
    os.kill(max(workers), signal.SIGKILL)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 1 and "killed by SIGKILL; the others were stopped, rerun to resume" in out, (out, err)
    assert "Traceback" not in err
    resumed = _bnexp("train", *args)
    assert resumed.returncode == 0 and "(resumed after epoch" in resumed.stdout, resumed.stderr
    whole = _bnexp("train", *[a.replace("killed", "whole") for a in args])
    assert whole.returncode == 0, whole.stderr
    for name, columns in (("metrics.csv", METRICS + ("epoch", "lr")), ("steps.csv", ("step", "epoch", "loss"))):
        assert [[r[c] for c in columns] for r in _rows(tmp_path / "killed", name)] == \
               [[r[c] for c in columns] for r in _rows(tmp_path / "whole", name)]


@pytest.mark.parametrize("overrides, message", [
    (["nproc=0"], "nproc must be a positive integer"),
    (["nproc=3"], "batch_size=64 does not divide by nproc=3"),
    (["nproc=2", "norm=gn", "norm.sync=true"], "norm.sync=true with norm=gn: it has no batch statistics"),
    (["nproc=2", "device=cuda"], "CUDA is not available"),
])
def test_bad_input_is_one_line_before_any_process_starts(capsys, synth_data_dir, tmp_path, overrides, message):
    code = main(["train", *_args(synth_data_dir, tmp_path / "r"), *overrides])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "r" / "runs").exists() or not any((tmp_path / "r" / "runs").iterdir())


def test_port_in_use_is_one_line(capsys, synth_data_dir, tmp_path, monkeypatch):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        monkeypatch.setenv("MASTER_PORT", str(held.getsockname()[1]))
        code = main(["train", *_args(synth_data_dir, tmp_path / "r"), "nproc=2"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "is in use" in err, err


@pytest.mark.slow
def test_sweep_runs_a_data_parallel_point(synth_data_dir, tmp_path):
    preset = tmp_path / "ddp.yaml"
    preset.write_text('description: "2 processes, sync and not"\nparams:\n  nproc: "2"\n  norm.sync: "true,false"\n')
    r = _bnexp("sweep", "--preset", str(preset), *_args(synth_data_dir, tmp_path / "r"), timeout=600)
    assert r.returncode == 0, r.stderr
    runs = sorted(os.listdir(tmp_path / "r" / "runs"))
    assert len(runs) == 2 and sum("-np2-" in run for run in runs) == 1  # sync=false: per-process statistics
    for run in runs:
        assert '"status": "completed"' in (tmp_path / "r" / "runs" / run / "run.json").read_text()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_hung_process_fails_the_run_after_the_timeout(synth_data_dir, tmp_path):
    """SIGSTOP one process mid-run: the other gives up after $BNEXP_DIST_TIMEOUT and the run fails with
    one line naming the timeout, instead of waiting forever."""
    args = [*_args(synth_data_dir, tmp_path / "r"), "epochs=50", "nproc=2", "norm.sync=true"]
    p = subprocess.Popen([sys.executable, "-m", "bnexp", "train", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "BNEXP_DIST_TIMEOUT": "5"})
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None and not glob.glob(str(tmp_path / "r" / "runs" / "*" / "metrics.csv")):
        time.sleep(0.05)
    workers = _workers(p.pid)
    assert len(workers) == 2, "the run ended before a process could be stopped"
    os.kill(max(workers), signal.SIGSTOP)
    t = time.time()
    try:
        out, err = p.communicate(timeout=120)
    finally:
        for w in workers:
            try:
                os.kill(w, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert p.returncode == 1 and time.time() - t < 90, (out, err)
    assert "lost the other processes (no answer within 5 s: one of them hung or died" in out, (out, err)
