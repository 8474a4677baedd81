"""`bnexp sweep` in this process: grid expansion, presets, bad input, skip/retry, failures, busy runs."""

import fcntl
import importlib.util
import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from bnexp import layout
from bnexp import config as C
from bnexp import sweep as S
from bnexp import train as T
from bnexp.cli import main
from bnexp.errors import BnexpError
from bnexp.nn import functional as bn_functional


@pytest.fixture(autouse=True)
def eager_bn(monkeypatch):
    """The eager BN path: no compilation time in tests (the sweep does not care which path runs)."""
    monkeypatch.setenv("BNEXP_BN_BACKEND", "eager")
    with bn_functional.use_backend("eager"):
        yield


@pytest.fixture
def base(synth_data_dir, tmp_path):
    """Overrides for tiny runs: 256 samples, batch 64, one epoch, CPU."""
    return [f"data_dir={synth_data_dir}", f"results_dir={tmp_path / 'results'}", "device=cpu", "train_size=256",
            "test_size=128", "batch_size=64", "epochs=1", "data.verify=false"]


def results_dir(base: list[str]) -> Path:
    return Path(next(a for a in base if a.startswith("results_dir=")).split("=", 1)[1])


def cli(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def files(run: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(run)): (p.stat().st_mtime_ns, p.read_bytes()) for p in run.rglob("*") if p.is_file()}


# ----------------------------------------------------------------------------- grid expansion

def test_expand_follows_hydra_basic_sweeper():
    axes, points = S.expand(["bn=on,off", "lr=range(1,3)", "seed=choice(0,5)", "epochs=2"])
    assert axes == {"bn": ["on", "off"], "lr": ["1", "2"], "seed": ["0", "5"]}
    assert len(points) == 8
    assert points[0] == ["bn=on", "lr=1", "seed=0", "epochs=2"]
    assert points[1] == ["bn=on", "lr=1", "seed=5", "epochs=2"]  # the last key varies fastest
    assert points[-1] == ["bn=off", "lr=2", "seed=5", "epochs=2"]
    # a later override of a key replaces the earlier one, in its place; optimizer= is optim=
    axes, points = S.expand(["lr=0.1,0.2", "optimizer=sgd", "lr=0.3", "optim=adam,sgd"])
    assert axes == {"optim": ["adam", "sgd"]} and points == [["lr=0.3", "optim=adam"], ["lr=0.3", "optim=sgd"]]


def test_plan_composes_every_point_like_bnexp_train(base):
    pl = S.plan(base + ["lr=0.01,0.5", "seed=range(0,2)"], quiet=True)
    assert pl.preset == "default" and list(pl.axes) == ["bn", "lr", "seed"]
    assert len(pl.points) == 2 * 2 * 2  # bn (from the default preset) x lr x seed
    for p in pl.points:
        assert p.cfg.progress is False  # parallel runs have no bars; the run id does not include it
        assert p.cfg.batch_size == 64 and p.cfg.epochs == 1
        assert p.run_id == C.run_id(C.compose(p.overrides))  # what `bnexp train <same overrides>` makes
    assert {(p.cfg.bn, p.cfg.lr, p.cfg.seed) for p in pl.points} == \
        {(b, lr, s) for b in ("on", "off") for lr in (0.01, 0.5) for s in (0, 1)}


def test_default_grid_without_arguments():
    pl = S.plan([])
    assert pl.axes == {"bn": ["on", "off"], "lr": ["0.01", "0.1", "0.5"], "batch_size": ["64", "512"]}
    assert len(pl.points) == 12
    assert S.describe(pl).startswith("sweep: 12 runs (preset default): bn=on,off x lr=0.01,0.1,0.5 x batch_size=64,512")


@pytest.mark.parametrize("name, runs, expect", [
    ("convergence", 2, {"model.name": "lenet5", "data.name": "fashion_mnist", "optim.name": "sgd", "lr": 0.01,
                        "batch_size": 512, "epochs": 20}),
    ("lr_sensitivity", 10, {"optim.name": "sgd", "batch_size": 512, "epochs": 20}),
    ("batch_size", 16, {"optim.name": "sgd", "lr": 0.05}),
    ("generalization", 2, {"model.name": "alexnet", "data.name": "cifar100", "optim.name": "adam", "lr": 1e-3,
                           "batch_size": 256, "epochs": 30, "model.dropout": None}),
    ("generalization_alexnet_cifar", 2, {"model.name": "alexnet_cifar", "data.name": "cifar100", "lr": 1e-3}),
    ("activation_stability", 2, {"probe_every": 1}),
    ("article_5epoch", 2, {"optim.name": "adam", "lr": 1e-3, "batch_size": 64, "epochs": 5}),
])
def test_presets(name, runs, expect):
    pl = S.plan([], preset=name)
    assert len(pl.points) == runs
    assert {p.cfg.bn for p in pl.points} == {"on", "off"}
    for p in pl.points:
        flat = C.flatten(OmegaConf.to_container(p.cfg))
        assert {k: flat[k] for k in expect} == expect
    if name == "lr_sensitivity":
        assert sorted({p.cfg.lr for p in pl.points}) == [0.01, 0.05, 0.1, 0.3, 0.5]
    if name == "batch_size":
        assert sorted({p.cfg.batch_size for p in pl.points}) == [8, 16, 32, 64, 128, 256, 512, 1024]


def test_user_overrides_replace_preset_entries():
    pl = S.plan(["lr=0.2", "seed=0,1,2", "optimizer=adam", "epochs=3"], preset="lr_sensitivity")
    assert list(pl.axes) == ["bn", "seed"] and len(pl.points) == 6
    assert {(p.cfg.lr, p.cfg.optim.name, p.cfg.epochs) for p in pl.points} == {(0.2, "adam", 3)}


def test_points_that_are_the_same_run_are_merged():
    pl = S.plan(["bn=off", "norm.momentum=0.1,0.2"])  # no norm layers: momentum cannot matter
    assert len(pl.points) == 3 * 2 and pl.merged == 3 * 2  # lr x batch_size, each twice
    assert "merged" in S.describe(pl)


def test_list_presets_and_dry_run(capsys, base):
    code, out, _ = cli(capsys, "sweep", "--list-presets")
    assert code == 0 and all(name in out for name in S.preset_names())
    code, out, _ = cli(capsys, "sweep", "--preset", "convergence", *base, "seed=0,1", "--dry-run")
    assert code == 0 and out.startswith("sweep: 4 runs (preset convergence): bn=on,off x seed=0,1")
    assert out.count("lenet5-fashion_mnist-") == 4
    assert not list(results_dir(base).glob("runs/*"))


@pytest.mark.parametrize("args, message", [
    (["lr=0.1,,0.2"], "malformed override 'lr=0.1,,0.2'"),
    (["lr=0.1,0.2", "foo=1,2"], "unknown config key 'foo'"),
    (["lr=0.1,abc"], "lr must be a positive number, got 'abc' (grid point 2 of"),
    (["bn=on,maybe"], "bn must be on or off, got 'maybe'"),
    (["lr=interval(0,1)"], "'lr=interval(0,1)' is a continuous range, not a grid"),
    (["model=lenet5,resnet"], "unknown model 'resnet'"),
    (["--preset", "nope"], "unknown preset 'nope'; choose one of: activation_stability, article_5epoch"),
])
def test_bad_input_is_one_line_before_anything_runs(capsys, base, args, message):
    code, out, err = cli(capsys, "sweep", *base, *args)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not list(results_dir(base).glob("runs/*"))


# ----------------------------------------------------------------------------- running

def test_rerun_skips_completed_runs_without_rewriting_a_file(base):
    pl = S.plan(base + ["lr=0.1"])
    first = S.run_sweep(pl)
    assert [r.status for r in first.results] == [layout.COMPLETED, layout.COMPLETED]
    for p, r in zip(pl.points, first.results):  # the directory `bnexp train` would use
        assert r.path == Path(p.cfg.results_dir) / layout.RUNS_DIR / C.run_id(C.compose(p.overrides))
    before = {r.run_id: files(r.path) for r in first.results}
    seen = []
    second = S.run_sweep(S.plan(base + ["lr=0.1"]), on_result=lambda r, done, total: seen.append((r.status, done)))
    assert [r.status for r in second.results] == [layout.SKIPPED, layout.SKIPPED] and seen == [(layout.SKIPPED, 1), (layout.SKIPPED, 2)]
    assert {r.run_id: files(r.path) for r in second.results} == before
    assert second.counts == {layout.COMPLETED: 0, layout.SKIPPED: 2, layout.DIVERGED: 0, layout.FAILED: 0, layout.BUSY: 0}


def test_a_failed_run_does_not_stop_the_others(capsys, base, monkeypatch):
    real = T.train_epoch

    def train_epoch(s, cfg, epoch, *args, **kwargs):
        if cfg.bn == "off" and cfg.lr == 0.5:
            raise RuntimeError("simulated crash")
        return real(s, cfg, epoch, *args, **kwargs)

    monkeypatch.setattr(T, "train_epoch", train_epoch)
    code, out, err = cli(capsys, "sweep", *base, "lr=0.1,0.5")
    assert code == 1, err
    assert out.count("completed lenet5") == 3 and out.count("failed lenet5") == 1
    assert "RuntimeError: simulated crash" in out  # summary_line of the failed run, and the table
    assert "3 completed, 0 skipped, 0 diverged, 1 failed, 0 busy" in out
    failed = next(p for p in results_dir(base).glob("runs/*") if "none-sgd-lr0.5" in p.name)
    assert '"status": "failed"' in (failed / layout.INFO).read_text() and (failed / layout.ERROR_LOG).exists()
    # rerun: the failed run is retried (now without the crash), the others are skipped
    monkeypatch.setattr(T, "train_epoch", real)
    code, out, _ = cli(capsys, "sweep", *base, "lr=0.1,0.5")
    assert code == 0 and "1 completed, 3 skipped, 0 diverged, 0 failed" in out


def test_a_failing_setup_is_a_failed_run(base):
    res = S.run_sweep(S.plan(base + ["bn=on", "lr=0.1", "batch_size=64,4096"]))
    assert [r.status for r in res.results] == [layout.COMPLETED, layout.FAILED]
    assert "batch_size=4096 is larger than the training set" in res.results[1].message
    assert layout.FAILED in S.format_summary(res).splitlines()[-1] and res.counts[layout.FAILED] == 1


class HeldLock:
    """Hold a run's .lock the way another process's train.run would (flock on its own descriptor)."""

    def __init__(self, run_dir: Path):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(run_dir / layout.LOCK, os.O_RDWR | os.O_CREAT)
        fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def release(self):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def test_busy_run_is_waited_for_and_not_trained_twice(base):
    pl = S.plan(base + ["lr=0.1"])
    held = pl.points[0]
    lock = HeldLock(Path(held.cfg.results_dir) / layout.RUNS_DIR / held.run_id)
    events = []

    def on_result(r, done, total):
        events.append((r.run_id == held.run_id, r.status))
        if r.status == layout.BUSY:  # the "other process" finishes the run, then lets go
            lock.release()
            assert T.run(held.cfg).status == layout.COMPLETED

    res = S.run_sweep(pl, on_result=on_result, poll=0.05)
    # the held run is retried after the rest of the queue and then found finished: trained once
    assert events == [(True, layout.BUSY), (False, layout.COMPLETED), (True, layout.SKIPPED)]
    assert res.counts[layout.BUSY] == 0 and [r.status for r in res.results] == [layout.SKIPPED, layout.COMPLETED]


def test_busy_run_abandoned_by_its_holder_is_trained_by_the_sweep(base):
    pl = S.plan(base + ["lr=0.1", "bn=on"])
    lock = HeldLock(Path(pl.points[0].cfg.results_dir) / layout.RUNS_DIR / pl.points[0].run_id)
    statuses = []

    def on_result(r, done, total):
        statuses.append(r.status)
        if r.status == layout.BUSY:
            lock.release()  # the holder died before finishing

    res = S.run_sweep(pl, on_result=on_result, poll=0.05)
    assert statuses == [layout.BUSY, layout.COMPLETED] and res.results[0].epochs_completed == 1


def test_launcher_options(base):
    from bnexp import launch as L

    assert L.parse_options(["timeout_min=60", "slurm_partition=gpu", "cluster=local"]) == \
        {"timeout_min": 60, "slurm_partition": "gpu", "cluster": "local"}
    with pytest.raises(BnexpError, match="--launcher-opt expects KEY=VALUE, got 'oops'"):
        L.parse_options(["oops"])
    pl = S.plan(base + ["lr=0.1"], quiet=True)
    with pytest.raises(BnexpError, match="unknown launcher 'ray'"):
        S.run_sweep(pl, launcher="ray")
    if importlib.util.find_spec("submitit"):
        with pytest.raises(BnexpError, match="submitit rejected the launcher options"):
            S.run_sweep(pl, launcher="submitit", options={"cluster": "local", "bogus": 1})
    assert not list(results_dir(base).glob("runs/*"))


def test_run_finished_by_another_process_while_preparing_is_not_retrained(base, monkeypatch):
    """train.run checks run.json again once it holds the lock (the race two sweeps can hit)."""
    cfg = S.plan(base + ["bn=on", "lr=0.1"]).points[0].cfg
    real = T.prepare

    def prepare(c):
        s = real(c)
        monkeypatch.setattr(T, "prepare", real)
        assert T.run(c).status == layout.COMPLETED  # the "other process" finishes it meanwhile
        return s

    monkeypatch.setattr(T, "prepare", prepare)
    r = T.run(cfg)
    assert r.status == layout.SKIPPED and r.message == "already completed"


@pytest.mark.parametrize("override, message", [
    ("data_dir=/nonexistent/bnexp-data", "FashionMNIST not found"),
    ("batch_size=64,100000", "batch_size=100000 is larger than the training set (512 samples)"),
    ("train_size=100000", "train_size=100000 exceeds the 512 training samples"),
])
def test_data_problems_stop_the_sweep_before_any_run(synth_data_dir, tmp_path, capsys, override, message):
    from bnexp.cli import main

    args = ["sweep", "lr=0.1,0.5", "epochs=1", f"data_dir={synth_data_dir}", f"results_dir={tmp_path}", override]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert "(grid point " in err
    assert not (tmp_path / layout.RUNS_DIR).exists() or not any((tmp_path / layout.RUNS_DIR).iterdir())


def test_summary_notes_are_the_outcome_labels_of_real_runs(capsys, base):
    """A real tiny sweep: each finished run's note is bnexp.outcome's label of its directory, and a
    run whose loss blew up says diverged; a rerun (all skipped) says the same."""
    from bnexp.outcome import LABELS, classify_run

    pl = S.plan(base + ["bn=on,off", "lr=0.1,1000000"])
    res = S.run_sweep(pl)
    rows = S.summary_rows(res)
    assert {r.status for r in res.results} == {layout.COMPLETED, layout.DIVERGED}
    for p, r, row in zip(pl.points, res.results, rows):
        if r.status == layout.DIVERGED:
            assert row["note"].startswith("diverged: non-finite loss at epoch 1")
        else:
            assert row["note"] == classify_run(Path(r.path), "completed", 10).text()[:S.NOTE_WIDTH]
        assert row["note"].split(":")[0] in LABELS
    again = S.summary_rows(S.run_sweep(pl))
    assert [r["note"].split(":")[0] for r in again] == [r["note"].split(":")[0] for r in rows]
