"""Commands that train nothing answer without importing torch, numpy or pandas (issue 13, section 3).

Not timed tests (the machine's load decides a wall time): each command runs in a fresh process
under `python -X importtime`, and the test reads from its import log that the heavy packages were
never imported. `bnexp bench cli` times the same five commands (bnexp/bench/cli.py).
"""
from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest
from omegaconf import OmegaConf

from bnexp import cli as bnexp_cli
from bnexp import config as C
from bnexp import sweep as S
from bnexp.bench import cli as B
from bnexp.errors import BnexpError
from conftest import REPO

CONSOLE_SCRIPT = "import sys; from bnexp.cli import main; sys.exit(main())"  # what the `bnexp` entry point runs


@pytest.fixture(scope="module")
def grid_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("instant")
    fresh, done = root / "fresh", root / "done"
    assert B.finish_grid(done) == 8
    return fresh, done


@pytest.mark.parametrize("name", [
    "typo (train lrr=1)", "sweep --list-presets", "sweep --dry-run (8 runs)", "train, skipped", "sweep, 8 runs skipped"])
@pytest.mark.parametrize("form", ["-m bnexp", "console script"])
def test_commands_that_train_nothing_import_no_torch(grid_dirs, name, form):
    args, expect = B.commands(*grid_dirs)[name]
    entry = ["-m", "bnexp"] if form == "-m bnexp" else ["-c", CONSOLE_SCRIPT]
    proc = subprocess.run([sys.executable, "-X", "importtime", *entry, *args], capture_output=True, text=True,
                          cwd=REPO, env=B._env())
    assert proc.returncode == expect, proc.stderr[-2000:]
    heavy = set(B.HEAVY) & B.imported(proc.stderr)
    assert not heavy, f"`bnexp {' '.join(args)}` imported {sorted(heavy)}"
    assert "bnexp.cli" in proc.stderr  # the import log is real: it lists bnexp itself
    out = proc.stdout
    if name == "train, skipped":
        assert out.startswith("skipped lenet5-fashion_mnist-bn-sgd-lr0.05-bs512-e3-s0-") and "already completed" in out
    elif name == "sweep, 8 runs skipped":
        assert re.search(r"^8 runs in [\d.]+s: 0 completed, 8 skipped", out.splitlines()[-1])
    elif name == "sweep --dry-run (8 runs)":
        assert "0 of 8 runs finished already" in out and out.count("lenet5-fashion_mnist-") == 8
    elif name == "typo (train lrr=1)":
        assert proc.stderr.splitlines()[-1].startswith("error: unknown config key 'lrr'")
        assert "hydra" not in B.imported(proc.stderr)  # refused before Hydra is even imported


def test_the_sweep_summary_counts_the_whole_command(capsys, grid_dirs, monkeypatch):
    """The summary's time is the command's wall time (it said 0.0s after 8 s of planning and checks)."""
    assert bnexp_cli.elapsed() >= time.perf_counter() - bnexp_cli.STARTED - 0.02  # the process began first
    monkeypatch.setattr(bnexp_cli, "elapsed", lambda: 42.0)
    _, done = grid_dirs
    assert bnexp_cli.main(["sweep", *B.GRID, f"results_dir={done}"]) == 0
    assert re.match(r"8 runs in 42.0s: 0 completed, 8 skipped", capsys.readouterr().out.splitlines()[-1])


@pytest.mark.parametrize("overrides", [
    ["lr=0.05", "seed=1"], ["bn=off", "lr=0.5"], ["bn=on", "norm=torch", "lr=0.1"],
    ["model=alexnet_cifar", "data=cifar100", "optimizer=adam", "lr=1e-3"], ["norm=bn", "norm.momentum=null"],
    ["results_dir=${oc.env:HOME}/r"], ["norm=gn", "norm.groups=3"], ["~progress", "+progress=false"],
    ["model.activation=sigmoid", "bn=off", "model.dropout=0.2"], ["lr=0.1", "lr=0.2"],
])
def test_the_grid_composer_gives_what_compose_gives(overrides):
    composer = C.Composer()
    composer(["lr=0.3"])  # a cached base from an earlier point must not leak into this one
    assert OmegaConf.to_container(composer(overrides)) == OmegaConf.to_container(C.compose(overrides))


@pytest.mark.parametrize("overrides", [["foo=1"], ["lr=abc"], ["bn=off", "norm=torch"], ["lr=${nosuch}"],
                                       ["model=resnet"], ["lr=0.1,0.2"], ["+foo=1"]])
def test_the_grid_composer_refuses_what_compose_refuses(overrides):
    with pytest.raises(BnexpError) as whole:
        C.compose(overrides)
    with pytest.raises(BnexpError) as grid:
        C.Composer()(overrides)
    assert str(grid.value) == str(whole.value)


def test_a_plan_composes_the_config_files_once_per_set_of_group_choices(monkeypatch):
    calls = []
    real = C._hydra_compose
    monkeypatch.setattr(C, "_hydra_compose", lambda overrides: calls.append(list(overrides)) or real(overrides))
    pl = S.plan(["lr=0.05,0.5", "seed=0,1"], preset="lr_sensitivity")
    assert len(pl.points) == 8
    assert sorted(map(tuple, calls)) == [("model=lenet5", "data=fashion_mnist", "optim=sgd")]
