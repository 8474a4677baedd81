"""bnexp report, output side: report.md / report.html, CSV tables and PNG figures on fabricated runs."""
import base64
import re

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
from runfactory import CHANCE_10, damage, fake_group, fake_run

from bnexp import layout as L
import bnexp
from bnexp.outcome import legend as outcome_legend
from bnexp.errors import BnexpError
from bnexp.report import write_report

FIGURE_KINDS = ("fig1_loss", "fig2_lr", "fig3_batch", "fig4_activations", "fig5_generalization")


@pytest.fixture(scope="module")
def rich(tmp_path_factory):
    """Runs for every figure kind, a split group, running/failed runs and one broken directory."""
    root = tmp_path_factory.mktemp("rich")
    for lr, on, off in ((0.1, 0.134, 0.306), (0.5, 0.099, None)):
        fake_group(root, [on - 0.001, on, on + 0.001], lr=lr, bn="on", test_acc=0.90, steps_per_epoch=6)
        offs = [off] * 3 if off else [CHANCE_10, 0.27, 0.27]
        fake_group(root, offs, lr=lr, bn="off", test_acc=0.86, steps_per_epoch=6)
    for bs in (64, 128):
        for bn in ("on", "off"):
            fake_run(root, lr=0.1, bn=bn, batch_size=bs, test_acc=0.9 if bn == "on" else 0.87, steps_per_epoch=6)
    alex = {"model.name": "alexnet_cifar", "data.name": "cifar100", "optim.name": "adam"}
    for bn in ("on", "off"):
        fake_run(root, config=alex, lr=0.001, batch_size=256, epochs=6, bn=bn, train_loss=0.5, train_acc=0.9,
                 test_acc=0.55 if bn == "on" else 0.4, steps_per_epoch=6)
    fake_run(root, lr=0.2, seed=0, status=L.RUNNING, epochs_done=3)
    fake_run(root, lr=0.2, seed=1, status=L.FAILED, epochs_done=1)
    broken = damage(fake_run(root, lr=0.7), "bad_yaml")
    result = write_report(root, fmt="both")
    return root, result, broken


def test_result_counts_paths_and_summary(rich):
    root, r, broken = rich
    assert r.out_dir == root / "report"
    assert [p.name for p in r.reports] == ["report.md", "report.html"]
    assert r.n_runs == 20 and r.n_by_status == {L.COMPLETED: 18, L.INTERRUPTED: 1, L.FAILED: 1}
    assert r.n_skipped == 1 and any(str(broken) in w and "config.yaml" in w for w in r.warnings)
    assert r.n_groups == 10
    assert "20 runs" in r.summary and "wrote" in r.summary and all(p.is_file() for p in r.files)


def test_every_figure_kind_is_a_readable_png(rich):
    _, r, _ = rich
    names = [p.name for p in r.figures]
    for kind in FIGURE_KINDS:
        assert any(n.startswith(kind) for n in names), (kind, names)
    for p in r.figures:
        img = mpimg.imread(p)
        h, w = img.shape[:2]
        assert 250 <= h <= 4000 and 500 <= w <= 6000, (p.name, img.shape)
        rgb = img[..., :3]
        ink = (rgb < 0.9).any(axis=-1).mean()          # share of non-white pixels
        assert 0.02 < ink < 0.6 and rgb.std() > 0.05, (p.name, ink)
        colored = (np.abs(rgb[..., 0] - rgb[..., 2]) > 0.3).mean()   # BN blue / no-BN orange present
        assert colored > 0.001, p.name


def test_markdown_report_content(rich):
    root, r, _ = rich
    md = (root / "report" / "report.md").read_text()
    assert md.startswith("# bnexp report")
    assert f"bnexp {bnexp.__version__}" in md and str(root) in md
    assert "18 completed" in md and "1 interrupted" in md and "1 failed" in md
    for section in ("## Summary", "## Experiments", "## Reference comparison", "## Final metrics per group",
                    "## BN vs no BN", "## Per-seed outcomes where seeds split", "## Figures",
                    "## Runs not aggregated (running / interrupted / failed)", "## Skipped or partial run directories"):
        assert section in md, section
    assert "dead in 1 of 3 seeds" in md
    assert "### Outcome labels" in md and all(line in md for line in outcome_legend())
    assert "max(0.03 absolute, 15% of the reference)" in md
    assert "0.02 absolute" in md
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (root / "report" / link).is_file(), link
    assert len(re.findall(r"!\[", md)) == len(r.figures)
    # experiments without runs say which command produces them
    assert "`bnexp sweep --preset article_5epoch`" in md


def test_html_is_self_contained(rich):
    root, r, _ = rich
    html = (root / "report" / "report.html").read_text()
    assert html.lstrip().startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    srcs = re.findall(r'src="([^"]*)"', html)
    assert len(srcs) == len(r.figures) > 0
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<link" not in html and "<script" not in html and "href=\"http" not in html
    assert "<table" in html and "dead in 1 of 3 seeds" in html


def test_csv_tables_hold_the_numbers(rich):
    root, _, _ = rich
    out = root / "report"
    groups = pd.read_csv(out / "groups.csv")
    g = groups[(groups["lr"] == 0.1) & (groups["bn"] == "on") & (groups["batch_size"] == 512)].iloc[0]
    assert g["train_loss_mean"] == pytest.approx(0.134) and g["train_loss_std"] == pytest.approx(0.001)
    assert g["train_loss_n"] == 3 and g["n_runs"] == 3
    dead = groups[(groups["lr"] == 0.5) & (groups["bn"] == "off")].iloc[0]
    assert dead["outcome"] == "dead in 1 of 3 seeds" and dead["n_dead"] == 1
    pairs = pd.read_csv(out / "bn_vs_no_bn.csv")
    p = pairs[(pairs["lr"] == 0.1) & (pairs["batch_size"] == 512)].iloc[0]
    assert p["train_loss_delta"] == pytest.approx(0.134 - 0.306) and p["test_acc_delta"] == pytest.approx(0.04)
    ref = pd.read_csv(out / "reference.csv")
    row = ref[(ref["label"] == "lr=0.5, bn=on") & (ref["metric"] == "train_loss")].iloc[0]
    assert row["verdict"] == "reproduced" and row["mean"] == pytest.approx(0.099)
    assert ref.loc[(ref["label"] == "lr=0.5, bn=off") & (ref["metric"] == "train_loss"), "verdict"].iloc[0] \
        == "partly reproduced: dead in 1 of 3 seeds"
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 20 and set(runs["status"]) == {L.COMPLETED, L.INTERRUPTED, L.FAILED}
    assert runs.loc[runs["status"] == L.INTERRUPTED, "group"].isna().all()


def test_formats_where_filter_and_stale_outputs(rich, tmp_path):
    root, _, _ = rich
    out = tmp_path / "out"
    out.mkdir()
    (out / "fig2_lr_9_old.png").write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    r = write_report(root, out_dir=out, where=["lr=0.1", "batch_size=512", "model.name=lenet5"], fmt="html")
    assert [p.name for p in r.reports] == ["report.html"] and not (out / "report.md").exists()
    assert not (out / "fig2_lr_9_old.png").exists() and (out / "notes.txt").read_text() == "mine"
    assert r.n_runs == 6 and r.n_groups == 2
    html = (out / "report.html").read_text()
    assert "--where lr=0.1 batch_size=512 model.name=lenet5" in html
    names = [p.name for p in r.figures]
    assert not any(n.startswith(("fig2_", "fig3_")) for n in names)      # one lr, one batch size
    assert "bnexp sweep --preset lr_sensitivity" in html and "bnexp sweep --preset batch_size" in html
    assert "bnexp sweep --preset generalization" in html       # LeNet figure 5 is not the CIFAR-100 claim


def test_bad_format_is_rejected_before_reading(tmp_path):
    with pytest.raises(BnexpError) as e:
        write_report(tmp_path / "nowhere", fmt="pdf")
    assert "unknown report format 'pdf'" in str(e.value) and "\n" not in str(e.value)


def test_empty_results_dir_is_an_error(tmp_path):
    with pytest.raises(BnexpError, match="no runs in") as e:
        write_report(tmp_path)
    assert "bnexp train" in str(e.value) and not (tmp_path / "report").exists()


def test_bad_where_is_an_error(rich):
    root, _, _ = rich
    with pytest.raises(BnexpError, match="malformed --where"):
        write_report(root, where=["lr"])


def test_malformed_runs_do_not_stop_the_report(tmp_path):
    fake_group(tmp_path, [0.1, 0.12], steps_per_epoch=3, epochs=4)
    damage(fake_run(tmp_path, seed=5, epochs=4), "garbage_steps")
    damage(fake_run(tmp_path, seed=6, epochs=4), "bad_npz")
    damage(fake_run(tmp_path, seed=7, epochs=4), "no_run_json")
    (tmp_path / L.RUNS_DIR / "stray-file.txt").write_text("ignored")
    r = write_report(tmp_path)
    md = (tmp_path / "report" / "report.md").read_text()
    assert r.n_runs == 4 and r.n_skipped == 1
    assert "no run.json" in md and "steps.csv has non-numeric step values" in md
    assert any(p.name.startswith("fig1_loss") for p in r.figures)


@pytest.mark.slow
def test_bench_runs_small_and_formats():
    from bnexp.bench import report as bench
    result = bench.run(n_runs=4, epochs=2, steps_per_epoch=3, act_samples=500)
    assert result["n_runs"] == 4 and result["report_s"] > 0 and result["n_figures"] >= 1
    table = bench.format_table(result)
    assert "write_report md (s)" in table and "runs" in table


def test_binned_steps_match_a_plain_groupby_and_skip_unaggregated_runs(tmp_path):
    from bnexp.report.figures import STEP_POINTS, binned_steps
    from bnexp.report.load import load_runs
    a = fake_run(tmp_path, seed=0, steps_per_epoch=40, epochs=20)               # 800 steps -> bins of 3
    b = fake_run(tmp_path, seed=1, steps_per_epoch=40, epochs=20, diverged_epoch=5)
    c = fake_run(tmp_path, seed=2, status=L.RUNNING, epochs_done=3, steps_per_epoch=40)
    steps = load_runs(tmp_path).steps
    out, spe = binned_steps(steps, pd.Series({a.name: "G1", b.name: "G1"}))
    assert set(out["run_id"]) == {a.name, b.name} and c.name not in set(out["run_id"])
    assert spe == {"G1": 40.0}
    for d in (a, b):
        s = steps[steps["run_id"] == d.name]
        width = 800 // STEP_POINTS + 1
        ref = s.assign(bin=(s["step"] - 1) // width).groupby("bin")[["step", "loss"]].mean()
        mine = out[out["run_id"] == d.name].set_index("bin")[["step", "loss"]]
        assert np.allclose(ref.to_numpy(), mine.to_numpy(), equal_nan=True)
    assert out.loc[out["run_id"] == b.name, "loss"].isna().any()     # the diverged tail stays NaN


def test_only_running_and_failed_runs_still_give_a_report(tmp_path):
    fake_run(tmp_path, seed=0, status=L.RUNNING, epochs_done=2, steps_per_epoch=3)
    fake_run(tmp_path, seed=1, status=L.FAILED, epochs_done=0)
    r = write_report(tmp_path, fmt="both")
    md = (tmp_path / "report" / "report.md").read_text()
    assert r.n_groups == 0 and r.figures == [] and "No figures: no aggregated runs." in md
    assert "## Runs not aggregated (running / interrupted / failed)" in md and "RuntimeError: fabricated failure" in md
    assert "no matching runs" in md


def _experiment_row(md: str, name: str) -> list[str]:
    line = next(l for l in md.splitlines() if l.startswith(f"| {name} |"))
    return [c.strip() for c in line.strip("|").split(" | ")]


def test_experiments_table_counts_a_figure_only_for_the_runs_it_draws(rich, tmp_path):
    root, r, _ = rich
    md = (root / "report" / "report.md").read_text()
    assert "A figure counts for an experiment only if" in md            # the rule is stated under the table
    # the AlexNet / CIFAR-100 runs are generalization's, and a figure 5 draws them
    gen = _experiment_row(md, "generalization")
    assert gen[2].startswith("2 runs; [Figure 5.") and gen[3] == ""
    assert _experiment_row(md, "convergence")[2].startswith("16 runs; [Figure 1.")
    # only LeNet runs: figure 5 is drawn from them, but it is not the generalization experiment's
    out = tmp_path / "lenet"
    r2 = write_report(root, out_dir=out, where=["model.name=lenet5", "batch_size=512"], fmt="md")
    assert any(p.name.startswith("fig5_") for p in r2.figures)
    md2 = (out / "report.md").read_text()
    gen = _experiment_row(md2, "generalization")
    assert gen[2] == "no runs yet" and "bnexp sweep --preset generalization" in gen[3]
    # runs but no figure of the kind: says why and which sweep completes it
    bs = _experiment_row(md2, "batch_size")
    assert bs[2].startswith("12 runs; no figure: needs 2 or more batch sizes") and "--preset batch_size" in bs[3]
    assert _experiment_row(md2, "ioffe_fig1")[2] == "no runs yet"
    # BN / no-BN runs match noisy_bn's bn and none arms, but without its noisy arm nothing counts
    noisy = _experiment_row(md2, "noisy_bn")
    assert "incomplete" in noisy[2] and "norm.kind noisy" in noisy[2] and "Figure" not in noisy[2]
    assert "--preset noisy_bn" in noisy[3]


def test_html_renders_code_and_links_figures_and_runs(rich):
    root, r, _ = rich
    html = (root / "report" / "report.html").read_text()
    cells = re.findall(r"<t[dh]>(.*?)</t[dh]>", html, flags=re.S)
    assert cells and not [c for c in cells if "`" in c]                     # no raw backticks in cells
    assert "<td><code>bnexp sweep --preset article_5epoch</code></td>" in html
    ids = re.findall(r'<figure id="(fig-\d+-\d+)">', html)                # each figure has an anchor
    assert len(ids) == len(set(ids)) == len(r.figures)
    linked = set(re.findall(r'<a href="#(fig-\d+-\d+)">Figure \d+\.\d+</a>', html))   # ... the table links to
    assert linked and linked <= set(ids) and ({"fig-5-1", "fig-5-2"} & linked)
    assert all(f'href="{f.name}">PNG</a>' in html for f in r.figures)
    # every aggregated run and every pending run links to its run.json, relative to the report
    hrefs = re.findall(r'<a href="([^"#]+/run\.json)">', html)
    assert hrefs and not any(h.startswith(("/", "http")) for h in hrefs)
    out = root / "report"
    assert all((out / h).is_file() for h in hrefs)
    runs = pd.read_csv(out / "runs.csv")
    want = set(runs.loc[runs["status"].isin((L.COMPLETED, L.DIVERGED, L.INTERRUPTED, L.FAILED)), "run_id"])
    assert want <= {(out / h).resolve().parent.name for h in hrefs}
    md = (out / "report.md").read_text()
    assert re.search(r"\[s0\]\(\.\./runs/[^)]+/run\.json\)", md)           # Markdown has the same links


def test_sync_bn_experiment_and_runs_from_before_nproc_group_with_new_ones(tmp_path):
    """sync_bn's arms (nproc 1 at batch 32 and 8, nproc 4 without sync) make it complete; a run whose
    config.yaml predates nproc/norm.sync groups with the same config written now."""
    import yaml

    from bnexp.report.build import write_report

    base = dict(model="lenet5", norm="bn", lr=0.1, lr_scale_batch=256, epochs=5)
    for seed in (0, 1):
        fake_run(tmp_path, batch_size=32, seed=seed, test_acc=0.88, **base)
        fake_run(tmp_path, batch_size=8, seed=seed, test_acc=0.80, **base)
        fake_run(tmp_path, batch_size=32, nproc=4, seed=seed, test_acc=0.81, **base)
    old = fake_run(tmp_path, batch_size=32, seed=2, test_acc=0.87, **base)
    cfg = yaml.safe_load((old / L.CONFIG).read_text())
    del cfg["nproc"], cfg["norm"]["sync"]
    (old / L.CONFIG).write_text(yaml.safe_dump(cfg))
    r = write_report(tmp_path, out_dir=tmp_path / "report", fmt="md")
    row = _experiment_row((tmp_path / "report" / "report.md").read_text(), "sync_bn")
    assert row[2].startswith("7 runs;") and "incomplete" not in row[2], row
    assert r.n_groups == 3  # the old run is in the batch-32, one-process group


def test_sync_bn_table_puts_per_process_bn_beside_the_one_process_batches(tmp_path):
    from bnexp.report.build import write_report

    base = dict(model="lenet5", norm="bn", lr=0.1, lr_scale_batch=256, epochs=5)
    out = tmp_path / "report"
    fake_run(tmp_path, batch_size=32, seed=0, train_loss=0.74, **base)
    fake_run(tmp_path, batch_size=8, seed=0, train_loss=0.92, **base)
    write_report(tmp_path, out_dir=out, fmt="md")
    assert "Data-parallel BN" not in (out / "report.md").read_text()  # no run on several processes yet
    fake_run(tmp_path, batch_size=32, nproc=4, seed=0, train_loss=0.921, **base)
    write_report(tmp_path, out_dir=out, fmt="md")
    md = (out / "report.md").read_text()
    table = md[md.index("## Data-parallel BN (sync_bn)"):].split("\n\n")[2].splitlines()[2:]
    cells = [[c.strip() for c in row.strip("|").split("|")][1:6] for row in table]
    assert cells == [["1", "32", "the 32 images of the batch", "1", "0.7400 (n=1)"],
                     ["4", "32", "8 images on each process", "1", "0.9210 (n=1)"],
                     ["1", "8", "the 8 images of the batch", "1", "0.9200 (n=1)"]], cells
