"""`bnexp train` end to end on tiny synthetic data in the real on-disk formats."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import synth
from bnexp import layout as L
from bnexp import config
from bnexp.cli import main

QUICK = ["epochs=2", "batch_size=64", "progress=false", "lr=0.1"]


def bnexp(capsys, *args):
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def only_run(results: Path) -> Path:
    runs = list((results / L.RUNS_DIR).iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def numbers(rows: list[dict]) -> list[tuple]:
    """Everything in metrics.csv but the wall-clock column."""
    return [tuple(r[k] for k in ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr")) for r in rows]


@pytest.fixture
def fm_args(synth_data_dir, tmp_path):
    return [f"data_dir={synth_data_dir}", f"results_dir={tmp_path / 'results'}", *QUICK]


def test_train_writes_the_results_contract(capsys, fm_args, tmp_path):
    code, out, err = bnexp(capsys, "train", "--bn", "on", *fm_args, "probe_every=1")
    assert code == 0, err
    assert out.startswith("completed lenet5-fashion_mnist-bn-sgd-lr0.1-bs64-e2-s0-")
    run = only_run(tmp_path / "results")
    info = json.loads((run / L.INFO).read_text())
    assert info["status"] == L.COMPLETED and info["epochs_completed"] == 2
    assert info["device"] == "cpu" and info["seed"] == 0
    assert set(info["versions"]) == {"python", "torch", "torchvision", "bnexp"}
    assert info["git_commit"] is None or len(info["git_commit"]) >= 40
    assert info["started"] <= info["ended"]
    sec = info["seconds"]
    assert set(sec) == {"train", "eval", "probes", "total"} and min(sec.values()) > 0
    assert sec["train"] + sec["eval"] + sec["probes"] <= sec["total"]
    rows = read_csv(run / L.METRICS)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert float(rows[1]["train_loss"]) < float(rows[0]["train_loss"])  # the synthetic data is learnable
    assert info["final"]["test_acc"] == float(rows[1]["test_acc"])
    steps = read_csv(run / L.STEPS)
    assert len(steps) == 2 * 8 and steps[-1]["step"] == "16" and steps[-1]["epoch"] == "2"  # 512 / 64 = 8
    saved = config.from_yaml(run / L.CONFIG)
    assert config.run_id(saved) == run.name and saved.bn == "on" and saved.norm.kind == "bn"
    with np.load(run / L.ACTIVATIONS) as z:
        keys = set(z.files)
    assert {L.activation_key(e, "conv1.norm", w) for e in (0, 1, 2) for w in L.PROBE_POINTS} <= keys
    assert (run / L.CHECKPOINT).stat().st_size > 0


def test_tensorboard_has_scalars_histograms_and_hparams(capsys, fm_args, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert bnexp(capsys, "train", *fm_args)[0] == 0
    run = only_run(tmp_path / "results")
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "histograms": 0}).Reload()
    tags = acc.Tags()
    assert {"batch/loss", "batch/acc", "batch/lr", "epoch/train_loss", "epoch/test_acc",
            "epoch/lr"} <= set(tags["scalars"])
    assert len(acc.Scalars("batch/loss")) == len(acc.Scalars("batch/acc")) == 16
    assert all(e.value == pytest.approx(0.1) for e in acc.Scalars("batch/lr"))
    assert all(0 <= e.value <= 1 for e in acc.Scalars("batch/acc"))
    assert "probe/fc1.norm/output" in tags["histograms"]
    assert "_hparams_/session_start_info" in acc.summary_metadata  # in the run's own file
    assert not (run / "hparams").exists()


def test_same_seed_same_numbers_and_bn_off(capsys, synth_data_dir, tmp_path):
    for name in ("a", "b"):
        args = [f"data_dir={synth_data_dir}", f"results_dir={tmp_path / name}", *QUICK, "bn=off"]
        assert bnexp(capsys, "train", *args)[0] == 0
    a, b = only_run(tmp_path / "a"), only_run(tmp_path / "b")
    assert a.name == b.name and "-none-" in a.name
    assert numbers(read_csv(a / L.METRICS)) == numbers(read_csv(b / L.METRICS))
    assert (a / L.STEPS).read_text() == (b / L.STEPS).read_text()
    with np.load(a / L.ACTIVATIONS) as z:  # BN off: the norm position is an identity
        np.testing.assert_array_equal(z["e2/conv1.norm/input"], z["e2/conv1.norm/output"])


def test_rerun_skips_and_force_retrains(capsys, fm_args, tmp_path):
    assert bnexp(capsys, "train", *fm_args)[0] == 0
    run = only_run(tmp_path / "results")
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.iterdir() if p.is_file()}
    code, out, _ = bnexp(capsys, "train", *fm_args)
    assert code == 0 and out.startswith("skipped ") and "already completed" in out
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.iterdir() if p.is_file()} == before
    code, out, _ = bnexp(capsys, "train", "--force", *fm_args)
    assert code == 0 and out.startswith("completed ")
    assert (run / L.METRICS).stat().st_mtime_ns != before[L.METRICS][0]


def test_diverged_run_is_a_result(capsys, fm_args, tmp_path):
    code, out, _ = bnexp(capsys, "train", *fm_args, "bn=off", "lr=1e4")
    assert code == 0 and out.startswith("diverged ") and "non-finite loss at epoch 1" in out
    info = json.loads((only_run(tmp_path / "results") / L.INFO).read_text())
    assert info["status"] == L.DIVERGED and info["diverged_at"]["epoch"] == 1 and info["final"] is None


def test_crash_mid_training_is_recorded_as_failed(capsys, fm_args, tmp_path, monkeypatch):
    from bnexp import train as T

    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(T, "train_epoch", boom)
    code, out, err = bnexp(capsys, "train", *fm_args)
    run = only_run(tmp_path / "results")
    assert code == 1 and out == "" and err.count("\n") == 1
    assert err.startswith(f"failed {run.name}: RuntimeError: simulated crash; traceback in ")
    assert json.loads((run / L.INFO).read_text())["status"] == L.FAILED
    assert "simulated crash" in (run / L.ERROR_LOG).read_text()


@pytest.mark.slow
def test_resume_after_kill_gives_the_uninterrupted_numbers(tmp_path):
    data_dir = tmp_path / "data"
    synth.write_fashion_mnist(data_dir, n_train=1600, n_test=100)
    args = [f"data_dir={data_dir}", "epochs=3", "batch_size=8", "progress=false", "norm=torch"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "bnexp", "train", *args]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd + [f"results_dir={killed}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    metrics = None
    while time.time() < deadline and proc.poll() is None:
        found = list(killed.glob("runs/*/metrics.csv"))
        if found and len(read_csv(found[0])) >= 1:
            metrics = found[0]
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert metrics is not None, "the run never finished an epoch"
    run = metrics.parent
    assert json.loads((run / L.INFO).read_text())["status"] == L.RUNNING, "killed too late to test resume"
    resumed = subprocess.run(cmd + [f"results_dir={killed}"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed after epoch" in resumed.stdout
    clean = subprocess.run(cmd + [f"results_dir={tmp_path / 'clean'}"], env=env, capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr
    other = only_run(tmp_path / "clean")
    assert numbers(read_csv(run / L.METRICS)) == numbers(read_csv(other / L.METRICS))
    assert (run / L.STEPS).read_text() == (other / L.STEPS).read_text()
    assert json.loads((run / L.INFO).read_text())["status"] == L.COMPLETED
    # TensorBoard shows every step once, with the uninterrupted run's values (the killed attempt's
    # points after its checkpoint are purged)
    assert tb_points(run) == tb_points(other) and len(tb_points(run)) == 3 * 200


def tb_points(run: Path, tag: str = "batch/loss") -> list[tuple]:
    """The scalar points TensorBoard's own loader shows for `tag`, after its purge of orphaned steps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"scalars": 0}).Reload()
    return [(e.step, round(e.value, 5)) for e in acc.Scalars(tag)]


# Dies (as kill -9 would: no finally blocks, no buffered writes) just before or just after the
# checkpoint of the given epoch, then runs the CLI.
DIE_AT_CHECKPOINT = """
import os, sys
import bnexp.train as T
when, epoch = sys.argv.pop(1), int(sys.argv.pop(1))
orig = T._checkpoint
def checkpoint(rd, s, cfg, state):
    if state.epoch == epoch and when == "before":
        os._exit(9)
    orig(rd, s, cfg, state)
    if state.epoch == epoch and when == "after":
        os._exit(9)
T._checkpoint = checkpoint
from bnexp.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """CLI arguments of a 3-epoch, 50-step-per-epoch run, and that run done without interruption."""
    root = tmp_path_factory.mktemp("uninterrupted")
    synth.write_fashion_mnist(root / "data", n_train=400, n_test=50)
    args = ["train", f"data_dir={root / 'data'}", "epochs=3", "batch_size=8", "progress=false", "norm=torch"]
    clean = subprocess.run([sys.executable, "-m", "bnexp", *args, f"results_dir={root / 'clean'}"],
                           capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr
    return args, only_run(root / "clean")


@pytest.mark.parametrize("when, epoch, resumed_after", [("after", 1, 1), ("before", 2, 1)])
def test_kill_next_to_a_checkpoint_keeps_tensorboard_whole(tmp_path, uninterrupted, when, epoch, resumed_after):
    """A kill right after a checkpoint must find that epoch's events on disk; a kill right before
    one replays the epoch, and TensorBoard must show the replayed steps once."""
    args, other = uninterrupted
    results = tmp_path / "killed"
    died = subprocess.run([sys.executable, "-c", DIE_AT_CHECKPOINT, when, str(epoch), *args,
                           f"results_dir={results}"], capture_output=True, text=True)
    assert died.returncode == 9, died.stderr
    run = only_run(results)
    assert json.loads((run / L.INFO).read_text())["status"] == L.RUNNING
    resumed = subprocess.run([sys.executable, "-m", "bnexp", *args, f"results_dir={results}"],
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed after epoch {resumed_after}" in resumed.stdout
    assert numbers(read_csv(run / L.METRICS)) == numbers(read_csv(other / L.METRICS))
    assert len(list(run.glob("events.out.tfevents.*"))) == 2  # one file per attempt
    for tag in ("batch/loss", "epoch/test_acc"):
        assert tb_points(run, tag) == tb_points(other, tag)
    assert [s for s, _ in tb_points(run)] == list(range(1, 3 * 50 + 1))


def test_cifar100_models_train(capsys, synth_data_dir, tmp_path):
    base = [f"data_dir={synth_data_dir}", f"results_dir={tmp_path / 'r'}", "data=cifar100", "data.verify=false",
            "epochs=1", "progress=false", "optim=adam", "lr=1e-3"]
    code, out, err = bnexp(capsys, "train", *base, "model=alexnet_cifar", "batch_size=50", "train_size=200")
    assert code == 0 and out.startswith("completed alexnet_cifar-cifar100-bn-adam-lr0.001-bs50-e1"), err
    code, out, err = bnexp(capsys, "train", *base, "model=alexnet", "bn=off", "train_size=32", "test_size=16",
                           "batch_size=16")
    assert code == 0 and out.startswith("completed alexnet-cifar100-none-adam"), err


@pytest.fixture(scope="module")
def finished_run(synth_data_dir, tmp_path_factory):
    results = tmp_path_factory.mktemp("finished")
    args = [f"data_dir={synth_data_dir}", f"results_dir={results}", *QUICK]
    assert main(["train", *args]) == 0
    return only_run(results), args


@pytest.mark.parametrize("override, message", [
    ("lr=abc", "lr must be a positive number, got 'abc'"),
    ("lr=0", "lr must be a positive number"),
    ("lr=-0.1", "lr must be a positive number"),
    ("batch_size=0", "batch_size must be a positive integer"),
    ("batch_size=1.5", "batch_size must be a positive integer"),
    ("epochs=-1", "epochs must be a positive integer"),
    ("seed=x", "seed must be a non-negative integer"),
    ("batch_size=100000", "batch_size=100000 is larger than the training set (512 samples)"),
    ("train_size=100000", "train_size=100000 exceeds the 512 training samples"),
    ("nosuchkey=1", "unknown config key 'nosuchkey'"),
    ("+nosuchkey=1", "unknown config key 'nosuchkey'"),
    ("model=resnet", "unknown model 'resnet'; choose one of: alexnet, alexnet_cifar, lenet5"),
    ("norm=layernorm", "unknown norm 'layernorm'"),
    ("lr=0.1,0.2", "is a sweep"),
    ("lr=0.1,,0.2", "malformed override"),
    ("bn=maybe", "bn must be on or off"),
    ("device=tpu", "device must be auto, cpu, cuda"),
    # A finished run is skipped without reading data, so data errors need a config not yet run.
    ("seed=7 data_dir=/nonexistent/bnexp-data", "FashionMNIST"),
    ("seed=7 data=cifar100", "CIFAR"),  # the synthetic pickles fail the md5 check
])
def test_bad_input_is_one_line_and_exit_2(capsys, finished_run, override, message):
    run, args = finished_run  # a finished run that bad input must not touch
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    code, out, err = bnexp(capsys, "train", *args, *override.split())
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert message in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert len(list(run.parent.iterdir())) == 1


def test_device_cuda_without_cuda(capsys, fm_args):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    code, _, err = bnexp(capsys, "train", *fm_args, "device=cuda")
    assert code == 2 and err == "error: device=cuda but CUDA is not available here; use device=cpu or device=auto\n"


def test_unwritable_results_dir(capsys, synth_data_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, _, err = bnexp(capsys, "train", f"data_dir={synth_data_dir}", f"results_dir={blocker / 'sub'}", *QUICK)
    assert code == 2 and err.startswith("error: results_dir ") and "not writable" in err


def test_usage_errors_are_one_line(capsys):
    for args in (["train", "--bn", "maybe"], ["train", "--nope"], ["nosuchcommand"]):
        code, _, err = bnexp(capsys, *args)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (args, err)


def test_help_and_version(capsys):
    code, out, _ = bnexp(capsys, "train", "--help")
    assert code == 0 and "bnexp train --bn on lr=0.5" in out and "batch_size=512" in out
    code, out, _ = bnexp(capsys, "--version")
    assert code == 0 and out.startswith("bnexp ")


@pytest.mark.realdata
@pytest.mark.slow
def test_real_fashion_mnist_one_epoch(capsys, real_data_dir, tmp_path):
    code, out, err = bnexp(capsys, "train", "--bn", "on", f"data_dir={real_data_dir}",
                           f"results_dir={tmp_path}", "epochs=1", "batch_size=256", "lr=0.5", "progress=false")
    assert code == 0, err
    info = json.loads((only_run(tmp_path) / L.INFO).read_text())
    assert info["final"]["test_acc"] >= 0.80, info["final"]
