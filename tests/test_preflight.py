"""The start-up checks (bnexp/preflight.py): one function for `bnexp train` and `bnexp sweep`, cheap
enough for a sweep of many runs (the data files' headers are read once per data source, no split is
loaded)."""

from dataclasses import replace

import pytest

from bnexp import data, preflight
from bnexp import sweep as S
from bnexp.cli import main
from bnexp.errors import BnexpError

QUICK = ["epochs=1", "batch_size=64", "progress=false", "device=cpu", "data.verify=false"]


@pytest.fixture
def no_loading(monkeypatch):
    """Loading a split fails; counting one is counted: how many data-file reads a check costs."""
    counts = []

    def load(*a, **k):
        raise AssertionError("the start-up checks loaded a data split")

    for name, spec in data.DATASETS.items():
        def count(root, train, verify, download, _count=spec.count, _name=name):
            counts.append((_name, train))
            return _count(root, train, verify, download)
        monkeypatch.setitem(data.DATASETS, name, replace(spec, load=load, count=count))
    return counts


def test_a_sweep_of_many_runs_is_checked_without_loading_the_data(synth_data_dir, tmp_path, no_loading):
    plan = S.plan([f"data_dir={synth_data_dir}", f"results_dir={tmp_path}", *QUICK, "bn=on", "lr=0.1", "seed=range(0,50)",
                   "bn=on,off"])
    assert len(plan.points) == 100
    S.check_inputs(plan)
    assert no_loading == [("fashion_mnist", True), ("fashion_mnist", False)]  # once for the whole grid
    bad = S.plan([f"data_dir={synth_data_dir}", f"results_dir={tmp_path}", *QUICK, "bn=on", "lr=0.1", "seed=range(0,50)",
                  "train_size=256,100000"])
    with pytest.raises(BnexpError, match=r"train_size=100000 exceeds the 512 training samples .*\(grid point 2 of 100: seed=0 train_size=100000\)"):
        S.check_inputs(bad)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_cifar100_counts_are_remembered_once_loaded(synth_data_dir):
    counts = [data.split_size("cifar100", synth_data_dir, train, verify=False) for train in (True, False)]
    assert counts == [len(data.load_split("cifar100", synth_data_dir, train, None, verify=False))
                      for train in (True, False)]
    spec = data.DATASETS["cifar100"]

    def load(*a, **k):
        raise AssertionError("counted by loading although the count is known")

    data.DATASETS["cifar100"] = replace(spec, load=load)
    try:
        assert data.split_size("cifar100", synth_data_dir, True, verify=False) == counts[0]
    finally:
        data.DATASETS["cifar100"] = spec


def test_train_and_sweep_run_the_same_checks(synth_data_dir, tmp_path, capsys, monkeypatch):
    calls = []

    def check(cfg, seen=None):
        calls.append(cfg.lr)
        raise BnexpError("refused by preflight.check")

    monkeypatch.setattr(preflight, "check", check)
    base = [f"data_dir={synth_data_dir}", f"results_dir={tmp_path}", *QUICK]
    assert main(["train", *base, "lr=0.3"]) == 2
    assert main(["sweep", *base, "bn=on", "lr=0.1,0.2"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: refused by preflight.check",
                   "error: refused by preflight.check (grid point 1 of 2: lr=0.1)"]
    assert calls == [0.3, 0.1]
    assert not any((tmp_path / "runs").iterdir())
