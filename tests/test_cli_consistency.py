"""The shortcuts are the same on both commands, and contradictory settings are one line, exit 2."""

import pytest

from bnexp import config as C
from bnexp.cli import main
from bnexp.errors import BnexpError


@pytest.mark.parametrize("args, message", [
    (["train", "--bn", "off", "bn=on"], "--bn off conflicts with bn=on; give one of them"),
    (["train", "bn=off", "norm=torch"], "bn=off conflicts with norm=torch: bn=off means norm=none"),
    (["train", "bn=on", "norm=none"], "bn=on conflicts with norm=none"),
    (["train", "bn=off", "norm.kind=bn"], "bn=off conflicts with norm=bn"),
    (["sweep", "--bn", "on", "bn=off", "--dry-run"], "--bn on conflicts with bn=off"),
    (["sweep", "--bn", "maybe", "--dry-run"], "--bn must be on, off or on,off, got 'maybe'"),
    (["sweep", "bn=off,on", "norm=torch", "--dry-run"], "bn=off conflicts with norm=torch"),
])
def test_contradictions_are_one_line(capsys, args, message):
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_sweep_takes_the_bn_shortcut(capsys, monkeypatch, synth_data_dir):
    monkeypatch.setenv("BNEXP_DATA_DIR", str(synth_data_dir))
    assert main(["sweep", "--bn", "off", "data.verify=false", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "sweep: 6 runs (preset default): lr=0.01,0.1,0.5 x batch_size=64,512" in out
    assert "-bn-" not in out and out.count("-none-") == 6


def test_consistent_settings_still_compose():
    assert C.compose(["bn=on", "norm=torch"]).norm.kind == "torch"
    assert C.compose(["bn=off", "norm=none"]).norm.kind == "none"
    assert C.compose(["bn=off"]).norm.kind == "none"  # the default norm file says bn: the shortcut wins
    with pytest.raises(BnexpError):
        C.check_bn_shortcut(["bn=false", "norm=bn"])
