"""The presets of the reference networks and mechanisms (d2l_bn, ioffe_fig1, saturation, norm_position,
noisy_bn, small_batch_norms),
including presets made of arms, and each run end to end with shrunk sizes."""

import pytest
from omegaconf import OmegaConf

from bnexp import layout as L
from bnexp import config as C
from bnexp import sweep as S
from bnexp.errors import BnexpError
from bnexp.nn import functional as bn_functional


def _flat(p):
    return C.flatten(OmegaConf.to_container(p.cfg))


def test_d2l_bn_is_the_three_arms_of_d2l_with_three_seeds():
    pl = S.plan([], preset="d2l_bn")
    arms = sorted({(f["norm.kind"], f["norm.biased_running_var"], f["lr"]) for f in map(_flat, pl.points)})
    assert arms == [("bn", True, 1.0), ("none", False, 0.9), ("torch", False, 1.0)]
    assert sorted(p.cfg.seed for p in pl.points) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for f in map(_flat, pl.points):
        assert (f["model.name"], f["batch_size"], f["epochs"], f["optim.name"], f["optim.momentum"]) == \
            ("lenet5_d2l", 256, 10, "sgd", 0.0)
    assert S.describe(pl).startswith("sweep: 9 runs (preset d2l_bn): seed=0,1,2 x (norm=bn ")
    # a user's key replaces it in every arm
    assert {p.cfg.lr for p in S.plan(["lr=0.5", "seed=0"], preset="d2l_bn").points} == {0.5}


def test_other_presets():
    ioffe = S.plan([], preset="ioffe_fig1")
    assert {(p.cfg.model.name, p.cfg.batch_size, p.cfg.epochs, p.cfg.eval_every, p.cfg.bn)
            for p in ioffe.points} == {("mlp_ioffe", 60, 50, 500, "on"), ("mlp_ioffe", 60, 50, 500, "off")}
    assert 60_000 // 60 * 50 == 50_000  # the paper's 50k steps
    small = S.plan([], preset="small_batch_norms")
    assert {p.cfg.norm.kind for p in small.points} == {"bn", "gn", "brn", "ln", "none"}
    assert sorted({p.cfg.batch_size for p in small.points}) == [2, 4, 8, 16, 32, 64, 128, 256]
    assert {p.cfg.lr_scale_batch for p in small.points} == {256} and len(small.points) == 40
    assert {p.cfg.norm.kind for p in S.plan([], preset="noisy_bn").points} == {"bn", "noisy", "none"}
    sat = S.plan([], preset="saturation")
    assert {p.cfg.model.activation for p in sat.points} == {"sigmoid"} and len(sat.points) == 2
    pos = S.plan([], preset="norm_position")
    assert sorted((p.cfg.bn, p.cfg.model.norm_position) for p in pos.points) == [
        ("off", "before"), ("on", "after"), ("on", "before")]


def test_arms_must_be_a_list_of_mappings(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "PRESET_DIR", tmp_path)
    (tmp_path / "bad.yaml").write_text("description: x\nparams: {lr: '0.1'}\narms: {bn: 'on'}\n")
    with pytest.raises(BnexpError, match="`arms:` must be a list of mappings"):
        S.load_preset("bad")
    (tmp_path / "two.yaml").write_text("description: x\nparams: {lr: '0.1'}\narms: [{bn: 'on', seed: '0,1'}, {bn: 'off'}]\n")
    pl = S.plan(["epochs=1"], preset="two")
    assert sorted((p.cfg.bn, p.cfg.seed) for p in pl.points) == [("off", 0), ("on", 0), ("on", 1)]
    with pytest.raises(BnexpError, match="3 points over the preset's 2 arms, more than the maximum of 2"):
        S.plan([], preset="two", max_runs=2)


SHRINK = {"d2l_bn": ["seed=0"], "ioffe_fig1": ["eval_every=2", "batch_size=60"], "saturation": [],
          "norm_position": [], "noisy_bn": [], "small_batch_norms": ["batch_size=4,60", "train_size=120"]}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SHRINK))
def test_preset_runs_end_to_end(synth_data_dir, tmp_path, name):
    shrink = [f"data_dir={synth_data_dir}", f"results_dir={tmp_path}", "device=cpu", "data.verify=false",
              "train_size=240", "test_size=64", "epochs=1", "progress=false", "norm.backend=eager", *SHRINK[name]]
    if name not in ("ioffe_fig1", "small_batch_norms"):
        shrink.append("batch_size=60")
    pl = S.plan(shrink, preset=name)
    with bn_functional.use_backend("eager"):
        res = S.run_sweep(pl)
    assert [r.status for r in res.results] == [L.COMPLETED] * len(pl.points), [r.message for r in res.results]
    if name == "ioffe_fig1":
        assert all((r.path / L.EVALS).is_file() for r in res.results)
    if name == "small_batch_norms":  # the batch-size figure holds every kind of the context
        from bnexp.report import write_report

        result = write_report(tmp_path, tmp_path / "report", [], "md")
        assert any(f.name.startswith("fig3_batch") for f in result.figures)
        assert "norm=" not in "".join(f.name for f in result.figures if f.name.startswith("fig3_batch"))
