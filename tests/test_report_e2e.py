"""The whole pipeline on a tiny real sweep: `bnexp sweep` trains, `bnexp report` reads what it wrote."""

import json

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from bnexp import layout as L
from bnexp.cli import main


@pytest.mark.slow
def test_sweep_then_report(synth_data_dir, tmp_path, capsys):
    results = tmp_path / "results"
    code = main(["sweep", "bn=on,off", "lr=0.1,0.5", "seed=0,1", "epochs=2", "batch_size=64", "train_size=256",
                 "test_size=128", "progress=false", f"data_dir={synth_data_dir}", f"results_dir={results}"])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()

    code = main(["report", "--results-dir", str(results), "--format", "both"])
    out, err = capsys.readouterr()
    assert code == 0, err
    report = results / "report"
    assert "8 runs" in out and (report / "report.md").exists() and (report / "report.html").exists()

    # The group table holds exactly the seed means of the runs' own run.json numbers.
    finals = {}
    for run_json in (results / L.RUNS_DIR).glob("*/run.json"):
        info = json.loads(run_json.read_text())
        cfg = (run_json.parent / L.CONFIG).read_text()
        key = ("bn: 'on'" in cfg or "bn: on" in cfg, "lr: 0.5" in cfg)
        finals.setdefault(key, []).append(info["final"]["train_loss"])
    groups = pd.read_csv(report / "groups.csv")
    assert len(groups) == 4 and set(groups["n_runs"]) == {2}
    for _, g in groups.iterrows():
        ours = finals[(g["bn"] == "on", g["lr"] == 0.5)]
        assert g["train_loss_mean"] == pytest.approx(np.mean(ours), abs=1e-6)

    # Figures the data supports are drawn and are real images; the lr figure needs >= 2 lrs (here 2).
    pngs = sorted(p.name for p in report.glob("*.png"))
    for prefix in ("fig1_loss", "fig2_lr", "fig4_activations", "fig5_generalization"):
        assert any(n.startswith(prefix) for n in pngs), (prefix, pngs)
    for name in pngs:
        img = mpimg.imread(report / name)
        assert img.shape[0] > 200 and img.shape[1] > 200 and img[..., :3].std() > 0.01, name
    md = (report / "report.md").read_text()
    assert "batch_size" in md and "bnexp sweep --preset batch_size" in md  # says what has no runs yet
    assert "data:image/png;base64," in (report / "report.html").read_text()

    code = main(["report", "--results-dir", str(tmp_path / "empty")])
    assert code == 2 and capsys.readouterr().err.startswith("error: ")
