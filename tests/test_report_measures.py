"""The report's side of issue 15: measures.csv read tolerantly, figures 7-10 planned and drawn from
hand-made files with known seed means, and the three presets (landscape, ics, weight_decay)."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from runfactory import fake_run

from bnexp import layout as L
from bnexp import config as C
from bnexp import measures_format as MF
from bnexp import sweep as S
from bnexp.report import figures as F
from bnexp.report import measures as M
from bnexp.report import write_report
from bnexp.report.load import load_runs

ALL = list(MF.INSTRUMENTS)


def write(run: Path, rows: list[tuple]) -> Path:
    """A hand-made measures.csv: rows of (step, instrument, layer, statistic, value)."""
    (run / MF.FILE_NAME).write_text(",".join(MF.HEADER) + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return run


def landscape_rows(lows: list[float], highs: list[float], beta: list[float]) -> list[tuple]:
    return [row for step, lo, hi, b in zip((0, 10), lows, highs, beta)
            for row in ((step, "landscape", "model", "min", lo), (step, "landscape", "model", "max", hi),
                        (step, "landscape", "model", "loss", (lo + hi) / 2),
                        (step, "predictiveness", "model", "min", lo / 10), (step, "predictiveness", "model", "max", hi / 10),
                        (step, "beta_smoothness", "model", "max", b))]


def report(root: Path, monkeypatch) -> tuple[dict, object]:
    """write_report with every drawn figure kept as a matplotlib Figure, keyed by 'fig7' ... ."""
    figs = {}
    monkeypatch.setenv("BNEXP_REPORT_JOBS", "1")
    monkeypatch.setattr(F, "_save", lambda fig, path: (figs.setdefault(path.name.split("_")[0], fig), path)[1])
    return figs, write_report(root, fmt="md")


def test_format_module_is_the_contract():
    assert MF.HEADER == ("step", "instrument", "layer", "statistic", "value") and MF.FILE_NAME == "measures.csv"
    assert MF.INSTRUMENTS == ("landscape", "predictiveness", "beta_smoothness", "ics", "saturation", "weights")
    assert MF.STATISTICS["landscape"] == ("min", "max", "loss") and MF.STATISTICS["ics"] == ("l2", "cos")
    assert MF.tensorboard_tag("ics", "fc3", "cos") == "measure/ics/fc3/cos"
    assert set(MF.CONFIG_KEYS) <= set(__import__("bnexp.report.load", fromlist=["x"]).NOT_DEFINING)


# ---------------------------------------------------------------- reading

@pytest.mark.parametrize("text, why", [
    ("step,instrument,layer,statistic,value\n0,ics,fc3,l2,0.5\n10,ics,fc3,l", "line 3 is incomplete"),
    ("step,what\n0,1\n", "has header step,what"),
    ("step,instrument,layer,statistic,value\nten,ics,fc3,l2,0.5\n", "line 2 is incomplete or not numeric"),
    ("step,instrument,layer,statistic,value\n0,ics,fc3,l2,big\n", "line 2"),
    ("", "unreadable (EmptyDataError)"),
])
def test_a_damaged_file_is_named_and_left_out_whole(tmp_path, text, why):
    (tmp_path / MF.FILE_NAME).write_text(text)
    df, problem = M.read_one(tmp_path / MF.FILE_NAME)
    assert df is None and why in problem


def test_nan_and_inf_values_are_whole_rows_and_stay_out_of_the_mean(tmp_path):
    rows = [(0, "landscape", "model", "max", v) for v in ("nan", "inf")]
    df, problem = M.read_one(write(tmp_path, rows) / MF.FILE_NAME)
    assert problem is None and np.isnan(df["value"][0]) and np.isinf(df["value"][1])
    means = M.seed_means(df.assign(run_id=["a", "b"]), pd.Series({"a": "G1", "b": "G1"}))
    assert means["n"].tolist() == [0] and np.isnan(means["value"][0])


def test_damaged_or_missing_measures_warn_and_leave_only_that_run_out(tmp_path, monkeypatch):
    good = fake_run(tmp_path, bn="on", seed=0, measure=ALL, epochs=2)
    cut = fake_run(tmp_path, bn="on", seed=1, measure=ALL, epochs=2)
    gone = fake_run(tmp_path, bn="off", seed=0, measure=ALL, epochs=2)
    plain = fake_run(tmp_path, bn="off", seed=1, epochs=2)            # no instruments asked: no warning
    text = (cut / MF.FILE_NAME).read_text()
    (cut / MF.FILE_NAME).write_text(text[: len(text) // 2].rsplit(",", 1)[0])   # a killed writer's last row
    (gone / MF.FILE_NAME).unlink()
    runs = load_runs(tmp_path)
    assert set(runs.measures["run_id"]) == {good.name}
    assert any(cut.name in w and "measures.csv line" in w and "measure figures omitted" in w for w in runs.warnings)
    assert any(gone.name in w and "no measures.csv; measure figures omitted" in w for w in runs.warnings)
    assert not any(plain.name in w for w in runs.warnings)
    figs, res = report(tmp_path, monkeypatch)                       # no crash; the good run is still drawn
    assert "fig7" in figs and any(f.name.startswith("fig7_") for f in res.figures)
    assert len(res.warnings) == 2


def test_instrument_keys_do_not_define_a_group(tmp_path):
    fake_run(tmp_path, bn="on", seed=0, measure=["ics"], measure_every=5)
    fake_run(tmp_path, bn="on", seed=1)                            # the same experiment, not measured
    runs = load_runs(tmp_path)
    assert runs.runs["group_key"].nunique() == 1 and runs.runs["run_id"].nunique() == 2


# ---------------------------------------------------------------- figures 7-10

@pytest.fixture
def two_arms(tmp_path):
    """BN and no BN at lr 0.1, two seeds each, with hand-made landscape values; lr 0.5 unmeasured."""
    values = {("on", 0): ([1.0, 0.5], [3.0, 2.0], [1.0, 2.0]), ("on", 1): ([2.0, 1.5], [5.0, 4.0], [3.0, 4.0]),
              ("off", 0): ([1.0, 1.0], [9.0, 7.0], [10.0, 20.0]), ("off", 1): ([3.0, 3.0], [11.0, 9.0], [30.0, 40.0])}
    for (bn, seed), v in values.items():
        write(fake_run(tmp_path, bn=bn, seed=seed, lr=0.1, measure=["landscape", "ics"]), landscape_rows(*v) + [
            (step, "ics", layer, stat, 0.1 * (k + 1) * (seed + 1))
            for step in (0, 10) for k, layer in enumerate(("z_first", "a_second", "m_third")) for stat in ("l2", "cos")])
        fake_run(tmp_path, bn=bn, seed=seed, lr=0.5)
    return tmp_path


def test_landscape_band_is_the_mean_of_the_seeds_min_to_the_mean_of_their_max(two_arms, monkeypatch):
    figs, res = report(two_arms, monkeypatch)
    names = [f.name for f in res.figures]
    assert sum(n.startswith("fig7_") for n in names) == 1          # lr 0.5 has no measures: no figure 7
    ax_a, ax_b, ax_c = figs["fig7"].axes
    assert [ax.get_title() for ax in (ax_a, ax_b, ax_c)] == ["(a) loss landscape", "(b) gradient predictiveness",
                                                            "(c) β-smoothness"]
    lines = {(ln.get_color(), ln.get_label()): ln.get_ydata().tolist() for ln in ax_a.get_lines()}
    bn, none = F.COLORS["bn"], F.COLORS["none"]
    assert lines[(bn, "BN")] == [4.0, 3.0] and lines[(none, "no BN")] == [10.0, 8.0]      # mean of the maxima
    lows = {c: y for (c, lab), y in lines.items() if lab.startswith("_")}
    assert lows == {bn: [1.5, 1.0], none: [2.0, 2.0]}                                       # mean of the minima
    band = next(c for c in ax_a.collections if c.get_label() == "BN (min..max)")
    ys = band.get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(1.0) and ys.max() == pytest.approx(4.0)
    beta = {ln.get_label(): ln.get_ydata().tolist() for ln in ax_c.get_lines()}
    assert beta == {"BN": [2.0, 3.0], "no BN": [20.0, 30.0]} and not ax_c.collections      # a curve, no band
    md = (two_arms / "report" / "report.md").read_text()
    assert "Figure 7.1: Santurkar et al. 2018, Figure 4" in md and "lr 0.1" in md


def test_ics_figure_has_one_column_per_layer_in_file_order_and_both_arms(two_arms, monkeypatch):
    figs, _ = report(two_arms, monkeypatch)
    axs = figs["fig8"].axes
    assert [ax.get_title() for ax in axs[:3]] == ["z_first", "a_second", "m_third"] and len(axs) == 6
    assert [ax.get_ylabel() for ax in (axs[0], axs[3])] == ["‖G − G′‖₂", "cos(G, G′)"]
    second = {ln.get_label(): ln.get_ydata().tolist() for ln in axs[1].get_lines()}
    assert second["BN"] == pytest.approx([0.3, 0.3]) and set(second) == {"BN", "no BN"}   # (0.2 + 0.4) / 2
    assert "fig9" not in figs and "fig10" not in figs                    # not measured: not drawn


def test_no_measures_no_measure_figures(tmp_path, monkeypatch):
    for bn in ("on", "off"):
        fake_run(tmp_path, bn=bn, seed=0)
    figs, res = report(tmp_path, monkeypatch)
    assert figs and not {"fig7", "fig8", "fig9", "fig10"} & set(figs)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "Figure 7." not in md and "`bnexp sweep --preset landscape`" in md


def test_saturation_and_effective_step_figures(tmp_path, monkeypatch):
    for wd in (0.0, 0.0005):
        fake_run(tmp_path, bn="on", seed=0, measure=["weights", "saturation"], measure_every=5,
                 **{"optim.weight_decay": wd})
    fake_run(tmp_path, bn="off", seed=0, measure=["weights", "saturation"], measure_every=5)
    figs, res = report(tmp_path, monkeypatch)
    eff = figs["fig10"]
    titles = [ax.get_title() for ax in eff.axes if ax.get_title()]
    assert titles == ["conv1.conv", "conv2.conv", "fc1.linear", "fc2.linear"]   # fc3: no norm after it
    styles = {ln.get_label(): ln.get_linestyle() for ln in eff.axes[0].get_lines()}
    assert styles == {"BN, weight decay 0": "-", "BN, weight decay 0.0005": "--"}  # no BN: nothing scale-invariant
    assert "optim.weight_decay" not in eff._suptitle.get_text()
    sat = figs["fig9"]
    assert [ax.get_ylabel() for ax in sat.axes if ax.get_ylabel()] == ["fraction dead", "mean fraction active"]
    assert {ln.get_label() for ln in sat.axes[0].get_lines()} == {"BN", "no BN"}
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| weight_decay |" in md and "[Figure 10.1](fig10_effective_step_1_" in md


# ---------------------------------------------------------------- presets

def test_presets_ask_for_the_instruments_in_their_arms():
    land, ics, wd = (S.load_preset(n) for n in ("landscape", "ics", "weight_decay"))
    assert land.params["measure"] == "[landscape,predictiveness,beta_smoothness]"
    assert land.params["lr"] == "0.1,0.5" and land.params["bn"] == "on,off" and land.params["model"] == "lenet5"
    assert ics.params["measure"] == "[ics]" and ics.params["norm"] == "bn,noisy,none"
    assert ics.params["lr"] == land.params["lr"]
    assert wd.params["measure"] == "[weights]" and wd.params["bn"] == "on"
    assert wd.params["optim.weight_decay"] == "0,5e-4"
    for p in (land, ics, wd):
        names = [n.strip() for n in p.params["measure"].strip("[]").split(",")]
        assert set(names) <= set(MF.INSTRUMENTS)
    listing = S.format_presets()
    for name, n in (("landscape", 4), ("ics", 6), ("weight_decay", 2)):
        line = next(ln for ln in listing.splitlines() if ln.split()[0] == name)
        assert f" {n} runs " in line


HAS_MEASURE = "measure" in OmegaConf.load(C.CONF_DIR / L.CONFIG)
after_merge = pytest.mark.skipif(not HAS_MEASURE, reason="needs the `measure` config keys of branch h15core")


@after_merge
def test_presets_plan_with_the_instrument_keys():
    for name, n, instruments in (("landscape", 4, ["landscape", "predictiveness", "beta_smoothness"]),
                                 ("ics", 6, ["ics"]), ("weight_decay", 2, ["weights"])):
        pl = S.plan([], preset=name)
        assert len(pl.points) == n and len({p.run_id for p in pl.points}) == n
        assert all(list(p.cfg.measure) == instruments for p in pl.points)
    assert {p.cfg.optim.weight_decay for p in S.plan([], preset="weight_decay").points} == {0.0, 0.0005}


@after_merge
@pytest.mark.slow
def test_measure_presets_run_and_report_end_to_end(synth_data_dir, tmp_path):
    from bnexp.nn import functional as bn_functional
    shrink = [f"data_dir={synth_data_dir}", f"results_dir={tmp_path}", "device=cpu", "data.verify=false",
              "train_size=240", "test_size=64", "epochs=1", "batch_size=60", "progress=false",
              "norm.backend=eager", "measure_every=2"]
    with bn_functional.use_backend("eager"):
        for name in ("landscape", "ics", "weight_decay"):
            res = S.run_sweep(S.plan(shrink + ["lr=0.1"], preset=name))
            assert [r.status for r in res.results] == [L.COMPLETED] * len(res.results)
            assert all((r.path / MF.FILE_NAME).is_file() for r in res.results)
    result = write_report(tmp_path, tmp_path / "report", [], "md")
    drawn = {f.name.split("_")[0] for f in result.figures}
    assert {"fig7", "fig8", "fig10"} <= drawn and not result.warnings


def test_arms_are_ordered_bn_kinds_first_then_by_weight_decay():
    from bnexp.report.fig_measures import arms
    ctx = pd.DataFrame({"group": ["G1", "G2", "G3", "G4"], "bn": ["off", "on", "on", "on"],
                        "norm.kind": ["none", "noisy", "bn", "bn"], "optim.weight_decay": [0.0, 0.0, 0.0005, 0.0]})
    assert [g["group"] for g in arms(ctx)] == ["G4", "G3", "G2", "G1"]
    assert [F.style(g)["label"] for g in arms(ctx)] == ["BN", "BN", "noisy BN", "no BN"]
