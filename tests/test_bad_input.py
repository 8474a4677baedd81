"""Bad input stops before any work with one line and exit 2: limits, BN batch sizes, interpolations,
characters Hydra's lexer rejects, data_dir, huge grids, presets and `bnexp report --out`."""

import errno
import os
from pathlib import Path

import pytest

from bnexp import layout as L
from bnexp import config as C
from bnexp import sweep as S
from bnexp.cli import main
from bnexp.report import build

QUICK = ["epochs=1", "batch_size=64", "progress=false", "device=cpu"]


def cli(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line(code, out, err, message):
    assert code == 2 and out == "", (code, out, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err


def tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()} if root.exists() else {}


@pytest.mark.parametrize("override, message", [
    ("epochs=100000000000000000000", "epochs=100000000000000000000 is above the limit of 100000"),
    ("seed=20000000000000", "seed=20000000000000 is above the limit of 4294967295"),
    ("lr=1e39", "lr=1e+39 is above the limit of 1e+06"),
    ("optim.weight_decay=1e39", "optim.weight_decay=1e+39 is above the limit of 1e+06"),
    ("batch_size=1", "batch_size=1 with batch normalisation (norm=bn)"),
    ("train_size=1", "train_size=1 with batch normalisation"),
    ("test_size=1", "test_size=1 with batch normalisation"),
    ("norm=torch test_size=1", "test_size=1 with batch normalisation (norm=torch)"),
    ("lr=${nosuch}", "lr: interpolation '${nosuch}' cannot be resolved (Interpolation key 'nosuch' not found)"),
    ("results_dir=${oc.env:BNEXP_TEST_UNSET}", "results_dir: interpolation '${oc.env:BNEXP_TEST_UNSET}' cannot be resolved"),
    ("lr=${lr}", "lr: interpolation '${lr}' cannot be resolved (Recursive interpolation detected)"),
    ("results_dir=results-ü", "malformed override 'results_dir=results-ü': character 'ü' is not allowed unquoted; "
                              "quote the value inside the shell's quotes: \"results_dir='results-ü'\""),
    ("data_dir=/nonexistent/bnexp-data", "FashionMNIST not found: data_dir=/nonexistent/bnexp-data does not exist"),
])
def test_train_refuses_before_any_work(capsys, synth_data_dir, tmp_path, monkeypatch, override, message):
    monkeypatch.delenv("BNEXP_TEST_UNSET", raising=False)
    monkeypatch.chdir(tmp_path)  # a relative results_dir would land here
    results = tmp_path / "results"
    code, out, err = cli(capsys, "train", f"data_dir={synth_data_dir}", f"results_dir={results}", *QUICK,
                         *override.split())
    one_line(code, out, err, message)
    # no run directory (an empty results/runs is the writability check of a data error: existing behaviour)
    assert [p for p in tmp_path.rglob("*") if p not in (results, results / L.RUNS_DIR)] == []


def test_limits_are_inclusive_and_bn_off_allows_batches_of_one(capsys, synth_data_dir, tmp_path):
    cfg = C.compose([f"epochs={C.MAX_EPOCHS}", f"seed={C.MAX_SEED}", "lr=1e6", "optim.weight_decay=1e6"])
    assert (cfg.epochs, cfg.seed, cfg.lr) == (100_000, 2**32 - 1, 1e6)
    code, out, err = cli(capsys, "train", "bn=off", f"data_dir={synth_data_dir}", f"results_dir={tmp_path}",
                         "epochs=1", "batch_size=1", "train_size=4", "test_size=1", "progress=false", "device=cpu")
    assert code == 0 and out.startswith("completed lenet5-fashion_mnist-none-"), err
    # a quoted non-ASCII value is accepted, as the error message says
    assert C.compose(["results_dir='results-ü'"]).results_dir == "results-ü"


def test_a_bn_model_on_a_one_sample_test_set(synth_data_dir):
    from bnexp import preflight

    with pytest.raises(Exception, match="the test set has 1 sample"):
        preflight.check_sizes(C.compose(["batch_size=64"]), 512, 1)
    preflight.check_sizes(C.compose(["batch_size=64", "bn=off"]), 512, 1)


@pytest.mark.parametrize("args, message", [
    (["lr=${nosuch}"], "lr: interpolation '${nosuch}' cannot be resolved"),
    (["lr=0.1,${lr}", "batch_size=64"], "lr: interpolation '${lr}' cannot be resolved (Recursive interpolation "
                                        "detected); give lr a plain value"),
    (["results_dir=results-ü,b"], "malformed override 'results_dir=results-ü,b': character 'ü'"),
    (["seed=range(0,100000000)"], "the grid has 1,200,000,000 points"),
    (["seed=range(0,10001)", "bn=on", "lr=0.1", "batch_size=64"], "more than the maximum of 10,000 runs"),
    (["seed=range(0,3)", "--max-runs", "5"], "pass --max-runs 36 to run it anyway"),
    (["lr=range(0,1,0)"], "'lr=range(0,1,0)': the step of a range must not be 0"),
    (["--preset", ""], "--preset needs a name; choose one of: activation_stability"),
    (["--preset", "", "--dry-run"], "--preset needs a name"),
    (["data_dir=/nonexistent/bnexp-data"], "FashionMNIST not found: data_dir=/nonexistent/bnexp-data does not exist"),
])
def test_sweep_refuses_before_any_work(capsys, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, "sweep", f"results_dir={tmp_path / 'results'}", "device=cpu", *args)
    one_line(code, out, err, message)
    assert list(tmp_path.iterdir()) == []


def test_dry_run_of_a_huge_grid_counts_without_expanding(capsys, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the grid was expanded")

    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    monkeypatch.setattr(BasicSweeper, "split_arguments", boom)
    monkeypatch.setattr(C, "compose", boom)
    code, out, err = cli(capsys, "sweep", "seed=range(0,100000000000000000000)", "lr=range(0.1,0.2,0.05)",
                         "--dry-run")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == ("sweep: 800,000,000,000,000,000,000 grid points (preset default): bn=on,off x "
                        "lr=range(0.1,0.2,0.05) x batch_size=64,512 x "
                        "seed=range(0,100000000000000000000) (100,000,000,000,000,000,000 values)")
    assert "more than the maximum of 10,000 runs" in lines[1]
    assert lines[3:5] == ["  bn=on lr=0.1 batch_size=64 seed=0", "  bn=on lr=0.1 batch_size=64 seed=1"]
    assert len(lines) == 3 + S.PREVIEW


def test_grid_counts_and_preview_match_basic_sweeper():
    for overrides in (["lr=range(0,1,0.1)"], ["lr=range(0.1,0.2,0.03)", "seed=range(5,0,-2)"],
                      ["seed=range(0,7,3)", "bn=on,off", "model=choice(lenet5,alexnet)"], ["seed=range(3,0)"],
                      ["model=glob(*)", "lr=range(0.5,-0.5,-0.25)"], ["lr=0.1,0.2", "seed=1", "lr=3"]):
        grid = S.parse_grid(overrides)
        _, points = S.expand(overrides)
        assert grid.size == len(points) and grid.preview(1000) == points, overrides
    # a key set again is never enumerated: its earlier huge sweep costs nothing
    _, points = S.expand(["seed=range(0,100000000000)", "seed=1"])
    assert points == [["seed=1"]]


def test_a_larger_grid_runs_with_max_runs():
    with pytest.raises(Exception, match="the grid has 4 points .* more than the maximum of 3 runs"):
        S.plan(["seed=0,1"], preset="convergence", max_runs=3)
    assert len(S.plan(["seed=0,1"], preset="convergence", max_runs=4).points) == 4


@pytest.mark.parametrize("content, message", [
    (b"description: x\nparams: {lr: [0.1\n", "YAML syntax error at line"),
    (b"description: caf\xe9\nparams:\n  lr: 0.1\n", "not UTF-8 text (byte 0xe9 at offset 16); save the preset as UTF-8"),
])
def test_broken_preset_file_is_one_line(capsys, tmp_path, monkeypatch, content, message):
    presets = tmp_path / "experiment"
    presets.mkdir()
    (presets / "broken.yaml").write_bytes(content)
    monkeypatch.setattr(S, "PRESET_DIR", presets)
    code, out, err = cli(capsys, "sweep", "--preset", "broken", "--dry-run")
    one_line(code, out, err, message)
    assert str(presets / "broken.yaml") in err


# ----------------------------------------------------------------------------- bnexp report --out

@pytest.fixture
def runs(tmp_path):
    from runfactory import fake_group

    root = tmp_path / "results"
    fake_group(root, [0.13, 0.14], lr=0.1, bn="on", test_acc=0.9, steps_per_epoch=4)
    fake_group(root, [0.30, 0.31], lr=0.1, bn="off", test_acc=0.86, steps_per_epoch=4)
    return root


def test_report_out_is_a_file(capsys, runs, tmp_path):
    blocker = tmp_path / "report.txt"
    blocker.write_text("mine")
    for out in (blocker, blocker / "sub"):
        code, o, err = cli(capsys, "report", "--results-dir", runs, "--out", out)
        one_line(code, o, err, "is a file, not a folder; choose another --out")
    assert blocker.read_text() == "mine"


@pytest.mark.parametrize("error, message", [
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "No space left on device; free some space or choose another --out"),
    (PermissionError(errno.EACCES, os.strerror(errno.EACCES)), "Permission denied; check the permissions or choose"),
])
def test_a_failed_report_leaves_the_previous_one(capsys, runs, monkeypatch, error, message):
    out = runs / "report"
    assert cli(capsys, "report", "--results-dir", runs, "--format", "both")[0] == 0
    before = tree(out)
    assert "report.md" in before and "report.html" in before
    real = build.R.to_html

    def to_html(*a, **k):  # everything else is written by then: the failure comes last
        raise error

    monkeypatch.setattr(build.R, "to_html", to_html)
    code, o, err = cli(capsys, "report", "--results-dir", runs, "--format", "both")
    one_line(code, o, err, f"cannot write the report to {out}: {message}")
    assert tree(out) == before and sorted(p.name for p in runs.iterdir()) == ["report", "runs"]  # no staging left
    monkeypatch.setattr(build.R, "to_html", real)
    code, o, err = cli(capsys, "report", "--results-dir", runs, "--format", "md")
    assert code == 0 and not (out / "report.html").exists() and (out / "report.md").is_file()
    assert sorted(p.name for p in runs.iterdir()) == ["report", "runs"]
