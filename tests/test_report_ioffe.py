"""The report's reproduction of Ioffe & Szegedy's Figure 1, from real tiny mlp_ioffe runs with eval_every."""

from bnexp import layout as L
from bnexp import config as C
from bnexp import train as T
from bnexp.nn import functional as bn_functional
from bnexp.report import write_report


def test_ioffe_figure_from_runs_with_mid_epoch_evaluations(synth_data_dir, tmp_path):
    results = tmp_path / "results"
    base = [f"data_dir={synth_data_dir}", f"results_dir={results}", "device=cpu", "train_size=256", "test_size=64",
            "batch_size=32", "epochs=3", "data.verify=false", "progress=false", "model=mlp_ioffe", "lr=0.5",
            "eval_every=4", "probe_every=1"]
    with bn_functional.use_backend("eager"):
        for bn in ("on", "off"):
            for seed in (0, 1):
                assert T.run(C.compose(base + [f"bn={bn}", f"seed={seed}"])).status == L.COMPLETED
        # the same runs without evaluations make no Figure 6
        T.run(C.compose(base[:-2] + ["bn=on"]))
    result = write_report(results, tmp_path / "report", [], "md")
    figs = [f for f in result.figures if f.name.startswith("fig6_ioffe")]
    assert len(figs) == 1 and figs[0].stat().st_size > 10_000
    text = (tmp_path / "report" / "report.md").read_text()
    assert "Figure 6.1: Ioffe & Szegedy 2015, Figure 1" in text
    assert "| ioffe_fig1 |" in text and "Figure 6.1" in text.split("| ioffe_fig1 |")[1].split("\n")[0]
