"""Report figures: titles that fit, file names that identify their context, ticks and markers."""
import pandas as pd

from bnexp import layout as L
from bnexp.report.figure_plan import fig_name
from bnexp.report.figures import _new, _titles, title_lines

LONG = ("Training loss, BN vs no BN: lenet5 / fashion_mnist, sgd, batch 512, epochs 3, "
        "model.dropout=0.5, optim.momentum=0.9, train_size=4096, test_size=1000")


def test_long_title_wraps_inside_the_figure_and_keeps_every_word():
    fig, axs = _new(3.0, 2.9, 1, 1)
    h0 = fig.get_figheight()
    _titles(fig, LONG, axs)
    fig.canvas.draw()
    box = fig._suptitle.get_window_extent()
    assert box.x1 <= fig.bbox.x1 and box.y1 <= fig.bbox.y1
    assert fig._suptitle.get_text().replace("\n", " ") == LONG
    assert fig.get_figheight() > h0                      # grew a line, the panel kept its height
    assert axs[0, 0].get_window_extent().y1 < box.y0     # the title does not overlap the panel


def test_title_lines_short_titles_stay_on_one_line():
    assert title_lines("Train vs test accuracy: lenet5", 6.5) == ["Train vs test accuracy: lenet5"]


def test_file_names_differ_for_contexts_differing_only_in_test_size():
    row = pd.Series({"model.name": "lenet5", "data.name": "fashion_mnist"})
    a = fig_name("fig1_loss_1", row, LONG)
    b = fig_name("fig1_loss_1", row, LONG.replace("test_size=1000", "test_size=10"))
    assert a != b and a.startswith("fig1_loss_1_lenet5-fashion_mnist_") and a.endswith(".png")
    assert a == fig_name("fig1_loss_1", row, LONG)       # stable between reports


# ---------------------------------------------------------------- drawn figures, kept as Figure objects

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from runfactory import fake_group  # noqa: E402

from bnexp.report import figures as F  # noqa: E402
from bnexp.report import write_report  # noqa: E402


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    """Every figure of a two-lr BN / no-BN report, as matplotlib Figures keyed by file-name prefix."""
    root = tmp_path_factory.mktemp("drawn")
    for lr in (0.1, 0.5):
        for bn in ("on", "off"):
            fake_group(root, [0.2, 0.22, 0.25], lr=lr, bn=bn, epochs=4, steps_per_epoch=6)
    figs = {}
    mp = pytest.MonkeyPatch()
    mp.setenv("BNEXP_REPORT_JOBS", "1")
    mp.setattr(F, "_save", lambda fig, path: (figs.setdefault(path.name.split("_")[0], fig), path)[1])
    try:
        write_report(root, fmt="md")
    finally:
        mp.undo()
    return figs


def test_generalization_epoch_axis_has_integer_ticks_only(drawn):
    for ax in drawn["fig5"].axes:
        loc = ax.xaxis.get_major_locator()
        assert isinstance(loc, MaxNLocator) and loc._integer
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_activation_figure_compares_initialisation_with_the_last_epoch(drawn):
    labels = [t.get_text() for leg in drawn["fig4"].legends for t in leg.get_texts()]
    assert "BN epoch 0 (init)" in labels and "BN epoch 4" in labels and not any("epoch 1" in x for x in labels)


def test_sweep_seed_dots_are_hollow_offset_and_in_the_legend(drawn):
    ax = drawn["fig2"].axes[0]
    seeds = [c for c in ax.collections if c.get_label().endswith("each seed")]
    assert seeds
    for c in seeds:
        assert np.all(c.get_facecolors()[:, 3] == 0)              # hollow
        assert np.all(c.get_offsets()[:, 0] > 0.1 * 1.001) and len(c.get_offsets()) == 6   # right of the lr
    labels = [t.get_text() for leg in drawn["fig2"].legends for t in leg.get_texts()]
    assert "BN mean ± std" in labels and "BN each seed" in labels


def test_clipped_values_get_a_marker_at_the_top_with_their_maximum():
    fig, axs = F._new(3.0, 2.9, 1, 1)
    ax = axs[0, 0]
    ax.plot([1, 2, 3, 4], [1.0, 37.5, 0.9, 0.8], color="#d9480f")
    ax.plot([1, 2, 3, 4], [1.0, 0.9, 0.8, 0.7], color="#1f5fbf")
    ax.set_ylim(0, 2.5)
    assert F.mark_clipped(ax, 2.5) == 1
    marks = [ln for ln in ax.get_lines() if ln.get_gid() == "clipped"]
    assert len(marks) == 1 and marks[0].get_xdata()[0] == 2 and marks[0].get_color() == "#d9480f"
    assert [t.get_text() for t in ax.texts] == ["max 37.5"]


def test_loss_figure_marks_a_spike_above_its_y_limit(tmp_path, monkeypatch):
    import pandas as pd
    for lr in (0.1, 0.5):
        for bn in ("on", "off"):
            fake_group(tmp_path, [0.2, 0.22], lr=lr, bn=bn, epochs=3, steps_per_epoch=40)
    run = next(d for d in (tmp_path / L.RUNS_DIR).iterdir() if "-none-" in d.name and "lr0.5" in d.name)
    st = pd.read_csv(run / L.STEPS)
    st.loc[st.index[50:53], "loss"] = 40.0
    st.to_csv(run / L.STEPS, index=False)
    figs = {}
    monkeypatch.setenv("BNEXP_REPORT_JOBS", "1")
    monkeypatch.setattr(F, "_save", lambda fig, path: (figs.setdefault(path.name.split("_")[0], fig), path)[1])
    write_report(tmp_path, fmt="md")
    ax = figs["fig1"].axes[1]                                      # lr 0.5
    assert [ln for ln in ax.get_lines() if ln.get_gid() == "clipped"]
    assert any(t.get_text().startswith("max ") for t in ax.texts)
    assert not [ln for ln in figs["fig1"].axes[0].get_lines() if ln.get_gid() == "clipped"]
