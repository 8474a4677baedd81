"""The normalisation family from the config: norm=<kind> and its keys, validated before any work."""

import pytest

from bnexp import layout as L
from bnexp import config as C
from bnexp import train as T
from bnexp.cli import main
from bnexp.nn import functional as bn_functional
from bnexp.nn.kinds import NORM_KINDS


def test_every_kind_composes_and_old_run_ids_stay():
    for kind in NORM_KINDS:
        assert C.compose([f"norm={kind}", "batch_size=64"]).norm.kind == kind
    # the ids published before the family existed
    assert C.run_id(C.compose([])) == "lenet5-fashion_mnist-bn-sgd-lr0.1-bs512-e20-s0-16c7975ccf"
    assert C.run_id(C.compose(["bn=off"])) == "lenet5-fashion_mnist-none-sgd-lr0.1-bs512-e20-s0-5474a9fe90"
    assert C.run_id(C.compose(["norm=torch"])) == "lenet5-fashion_mnist-torch-sgd-lr0.1-bs512-e20-s0-991217aa8b"


def test_only_the_keys_a_kind_uses_define_its_run():
    assert C.run_id(C.compose(["norm=gn", "norm.momentum=0.5"])) == C.run_id(C.compose(["norm=gn"]))
    assert C.run_id(C.compose(["norm.groups=4"])) == C.run_id(C.compose([]))  # bn has no groups
    assert C.run_id(C.compose(["norm=gn", "norm.groups=3"])) != C.run_id(C.compose(["norm=gn"]))
    assert C.run_id(C.compose(["norm=brn", "norm.r_max=2"])) != C.run_id(C.compose(["norm=brn"]))


def test_norm_kwargs_are_the_kinds_keywords():
    assert T.norm_kwargs(C.compose(["norm=gn"])) == {"eps": 1e-5}  # groups null: the layer's rule
    assert T.norm_kwargs(C.compose(["norm=gn", "norm.groups=3"])) == {"eps": 1e-5, "groups": 3}
    assert T.norm_kwargs(C.compose(["norm.momentum=null"])) == {"eps": 1e-5, "momentum": None,
                                                                "biased_running_var": False}
    assert T.norm_kwargs(C.compose(["norm=brn"])) == {"eps": 1e-5, "momentum": 0.1, "biased_running_var": False,
                                                      "r_max": 3.0, "d_max": 5.0, "warmup_steps": 500,
                                                      "r_max_steps": 4000, "d_max_steps": 2500}
    assert T.norm_kwargs(C.compose(["norm=noisy", "norm.noise=0.2"]))["noise"] == 0.2
    assert T.norm_kwargs(C.compose(["norm=ghost", "norm.ghost_size=16"]))["ghost_size"] == 16
    assert T.norm_kwargs(C.compose(["bn=off"])) == {}


@pytest.mark.parametrize("args, message", [
    (["norm=gn", "norm.groups=5"], "GroupNorm: groups=5 does not divide the 6 channels"),
    (["norm=in"], "InstanceNorm2d (kind 'in') is undefined for fully connected (N, C) inputs"),
    (["norm=brn", "norm.r_max=0.5"], "norm.r_max must be null or a number >= 1, got 0.5"),
    (["norm=brn", "norm.d_max=-1"], "norm.d_max must be null or a number >= 0, got -1.0"),
    (["norm=ghost", "norm.ghost_size=1024"], "norm.ghost_size=1024 is larger than batch_size=512"),
    (["norm=ghost", "norm.ghost_size=0"], "norm.ghost_size must be null or a positive integer, got 0"),
    (["norm=noisy", "norm.noise=-0.1"], "norm.noise must be null or a number >= 0, got -0.1"),
    (["norm=layer"], "norm"),
])
@pytest.mark.parametrize("command", ["train", "sweep"])
def test_bad_norm_settings_stop_before_any_run(capsys, synth_data_dir, tmp_path, args, message, command):
    extra = ["--bn", "on", "batch_size=512"] if command == "sweep" else []
    code = main([command, *extra, *args, f"data_dir={synth_data_dir}", "data.verify=false",
                 f"results_dir={tmp_path}", "epochs=1", "device=cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / L.RUNS_DIR).exists() or not any((tmp_path / L.RUNS_DIR).iterdir())


@pytest.mark.parametrize("kind", [k for k in NORM_KINDS if k != "in"])
def test_every_kind_trains(synth_data_dir, tmp_path, kind):
    cfg = C.compose([f"norm={kind}", f"data_dir={synth_data_dir}", f"results_dir={tmp_path}", "data.verify=false",
                     "device=cpu", "train_size=128", "test_size=64", "batch_size=32", "epochs=1", "progress=false",
                     "norm.ghost_size=16" if kind == "ghost" else "norm.noise=0.5"])
    with bn_functional.use_backend("eager"):
        result = T.run(cfg)
    assert result.status == L.COMPLETED and result.run_id.split("-")[2] == kind
