"""A user's own config folder (--config-dir DIR / $BNEXP_CONFIG_DIR) and --preset PATH.yaml: options
and presets outside the package, checked as the shipped ones, and unable to change run identity."""

import pytest

from bnexp import layout as L
from bnexp import config as C
from bnexp import sweep as S
from bnexp.cli import main
from bnexp.errors import BnexpError

MOMENTUM = "# SGD with heavy-ball momentum\nname: sgd\nmomentum: 0.9\nweight_decay: 0.0\n"
PRESET = 'description: "momentum and BN"\nparams:\n  optim: sgd_momentum\n  lr: "0.01"\n  bn: "on,off"\n'


@pytest.fixture(autouse=True)
def no_user_dir(monkeypatch):
    monkeypatch.setenv(C.CONFIG_DIR_ENV, "")  # restored after the test, also when --config-dir set it


@pytest.fixture
def mine(tmp_path):
    """A user config folder with one optim option and one preset that uses it."""
    folder = tmp_path / "mine"
    (folder / "optim").mkdir(parents=True)
    (folder / "experiment").mkdir()
    (folder / "optim" / "sgd_momentum.yaml").write_text(MOMENTUM)
    (folder / "experiment" / "momentum_bn.yaml").write_text(PRESET)
    (folder / "README.md").write_text("notes, not config\n")  # ignored
    return folder


def test_the_groups_are_those_of_the_primary_config():
    assert C.GROUPS == tuple(C.key_docs()[1])


def test_a_user_option_composes_and_has_the_run_id_of_the_same_resolved_config(mine, monkeypatch):
    monkeypatch.setenv(C.CONFIG_DIR_ENV, str(mine))
    ours = C.compose(["optim=sgd_momentum"])
    same = C.compose(["optim.momentum=0.9"])  # the shipped sgd with the same value: the same run
    assert ours.optim.momentum == 0.9 and C.run_id(ours) == C.run_id(same)
    assert C.run_id(ours) != C.run_id(C.compose([]))
    assert "sgd_momentum" in C.group_options("optim", user=True) and "sgd_momentum" not in C.group_options("optim")
    monkeypatch.setenv(C.CONFIG_DIR_ENV, "")
    with pytest.raises(BnexpError, match=r"unknown optim 'sgd_momentum'; choose one of: adam, sgd \(your own go in "
                                         r"DIR/optim/NAME.yaml with --config-dir DIR\)"):
        C.compose(["optim=sgd_momentum"])


def test_user_option_values_are_validated_like_shipped_ones(mine, monkeypatch):
    (mine / "optim" / "sgd_bad.yaml").write_text("name: sgd\nmomentum: 1.5\nweight_decay: 0.0\n")
    monkeypatch.setenv(C.CONFIG_DIR_ENV, str(mine))
    with pytest.raises(BnexpError, match=r"optim.momentum must be a number in \[0, 1\), got 1.5"):
        C.compose(["optim=sgd_bad"])


@pytest.mark.parametrize("where,text,msg", [
    ("optim/typo.yaml", "name: sgd\nmomentm: 0.9\n", "unknown optim key 'momentm'; a optim option sets only "
                                                    "momentum, name, weight_decay"),
    ("norm/global.yaml", "# @package _global_\nlr: 5.0\n", "unknown norm key 'lr'"),
    ("optim/list.yaml", "- 1\n- 2\n", "must be a YAML mapping of keys to values, got list"),
    ("optim/empty.yaml", "", "must be a YAML mapping of keys to values, got an empty file"),
    ("optim/broken.yaml", "name: [sgd\n", "YAML syntax error at line 2"),
    ("optim/sgd.yaml", MOMENTUM, "shadows bnexp's own optim option 'sgd' (the shipped one would be used)"),
    ("experiment/default.yaml", PRESET, "shadows bnexp's own preset 'default'"),
    ("config.yaml", "lr: 1.0\n", "not top-level YAML files (the primary config is bnexp's own)"),
    ("optimizer/adamw.yaml", "name: adam\n", "not a config group; the folders of a config folder are model, data, "
                                             "norm, optim (options) and experiment (presets)"),
    ("optim/fast.yml", "name: sgd\n", "Hydra reads only .yaml files; rename it to fast.yaml"),
])
def test_a_bad_user_folder_is_one_line_naming_the_file(mine, capsys, where, text, msg):
    path = mine / where
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    assert main(["train", "--config-dir", str(mine), "epochs=1"]) == 2
    err = capsys.readouterr().err
    assert msg in err and str(mine / where.split("/")[0]) in err and err.count("\n") == 1


def test_a_missing_config_folder_stops_train_and_sweep(tmp_path, capsys, monkeypatch):
    for argv in (["train", "--config-dir", str(tmp_path / "nope")], ["sweep", "--config-dir", str(tmp_path / "nope")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"config folder {tmp_path / 'nope'} does not exist" in err and err.count("\n") == 1
    monkeypatch.setenv(C.CONFIG_DIR_ENV, str(tmp_path / "nope"))  # the variable is checked the same way
    assert main(["sweep", "--list-presets"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_user_presets_are_listed_as_yours_and_run_as_shipped_ones(mine, capsys, monkeypatch, tmp_path):
    assert main(["sweep", "--config-dir", str(mine), "--list-presets"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "momentum_bn" in x)
    assert "2 runs  momentum and BN" in line and f"(yours: {mine / 'experiment' / 'momentum_bn.yaml'})" in line
    assert "lr_sensitivity" in out and "(yours" not in next(x for x in out.splitlines() if "lr_sensitivity" in x)
    # the environment variable --config-dir set is what a sweep's worker processes inherit (BNEXP_*)
    import os
    assert os.environ[C.CONFIG_DIR_ENV] == str(mine)
    pl = S.plan(["epochs=1", f"results_dir={tmp_path / 'r'}"], preset="momentum_bn")
    assert [p.cfg.optim.momentum for p in pl.points] == [0.9, 0.9] and pl.preset == "momentum_bn"
    assert [p.run_id for p in pl.points] == [C.run_id(C.compose(["optim.momentum=0.9", "lr=0.01", f"bn={bn}",
                                                                  "epochs=1", f"results_dir={tmp_path / 'r'}"]))
                                             for bn in ("on", "off")]


def test_preset_path_takes_a_file(mine, tmp_path, capsys, synth_data_dir):
    (tmp_path / "solo.yaml").write_text('description: "lr pair"\nparams:\n  lr: "0.01,0.1"\n')
    p = S.load_preset(str(tmp_path / "solo.yaml"))
    assert (p.name, p.user, p.params) == ("solo", True, {"lr": "0.01,0.1"})
    assert S.load_preset("lr_sensitivity").user is False
    assert main(["sweep", "--preset", str(tmp_path / "solo.yaml"), "--dry-run", f"results_dir={tmp_path / 'r'}",
                 f"data_dir={synth_data_dir}", "data.verify=false"]) == 0
    assert "sweep: 2 runs (preset solo): lr=0.01,0.1" in capsys.readouterr().out
    (tmp_path / "bad.yaml").write_text("params: {lr: 0.1}\n")
    for preset, msg in ((str(tmp_path / "none.yaml"), "does not exist; --preset takes a name"),
                        (str(tmp_path / "bad.yaml"), "a preset needs `description: <one line>`"),
                        ("mine_unknown", "unknown preset 'mine_unknown'; choose one of: activation_stability")):
        assert main(["sweep", "--preset", preset, "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1
    # a user preset naming a user option needs the folder too, and says where options go
    assert main(["sweep", "--preset", str(mine / "experiment" / "momentum_bn.yaml"), "--dry-run"]) == 2
    assert "unknown optim 'sgd_momentum'" in capsys.readouterr().err


def test_glob_lists_user_options_and_hydra_settings_are_refused(mine, monkeypatch):
    monkeypatch.setenv(C.CONFIG_DIR_ENV, str(mine))
    axes, points = S.expand(["optim=glob(*)"])
    assert axes == {"optim": ["adam", "sgd", "sgd_momentum"]}
    with pytest.raises(BnexpError, match=r"hydra\.\* settings are not config keys; add your own options"):
        C.compose([f"hydra.searchpath=[file://{mine}]"])


def test_a_folder_with_spaces_and_quotes_in_its_name(tmp_path, monkeypatch):
    folder = tmp_path / "my 'configs', v2"
    (folder / "optim").mkdir(parents=True)
    (folder / "optim" / "sgd_momentum.yaml").write_text(MOMENTUM)
    monkeypatch.setenv(C.CONFIG_DIR_ENV, str(folder))
    assert C.compose(["optim=sgd_momentum"]).optim.momentum == 0.9


@pytest.mark.slow
def test_a_parallel_sweep_trains_the_user_option_in_its_workers(mine, tmp_path, synth_data_dir):
    """--jobs 2: spawned workers train what the sweep composed with the user's folder."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    results = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "bnexp", "sweep", "--config-dir", str(mine), "--preset", "momentum_bn",
                           "--jobs", "2", f"data_dir={synth_data_dir}", "data.verify=false", f"results_dir={results}",
                           "device=cpu", "train_size=128", "test_size=64", "batch_size=64", "epochs=1", "threads=1"],
                          cwd=repo, capture_output=True, text=True,
                          env={**os.environ, "BNEXP_BN_BACKEND": "eager", C.CONFIG_DIR_ENV: ""})
    assert proc.returncode == 0, proc.stderr
    runs = sorted(results.glob("runs/*/run.json"))
    assert len(runs) == 2
    for run in runs:
        assert json.loads(run.read_text())["status"] == L.COMPLETED
        assert "momentum: 0.9" in (run.parent / L.CONFIG).read_text()
