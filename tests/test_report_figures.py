"""Report figures: titles that fit, file names that identify their context, ticks and markers."""
import pandas as pd

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
