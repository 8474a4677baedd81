"""bnexp.tracking: the files of a run directory."""

import csv

from bnexp import layout as L
from bnexp.tracking import RunDir


def read_steps(rd):
    with open(rd.path / L.STEPS) as f:
        return [(int(r["step"]), int(r["epoch"]), float(r["loss"])) for r in csv.DictReader(f)]


def expected(losses, steps_per_epoch):
    epochs = [e for e, n in enumerate(steps_per_epoch, start=1) for _ in range(n)]
    return [(i + 1, epochs[i], float(f"{v:.6g}")) for i, v in enumerate(losses)]


def test_steps_csv_grows_epoch_by_epoch_and_restarts_cleanly(tmp_path):
    rd = RunDir(tmp_path, "r")
    rd.path.mkdir(parents=True)
    losses, per_epoch = [], []
    for epoch, n in enumerate((5, 5, 3), start=1):  # the last epoch diverged after 3 steps
        losses += [epoch + i / 7 for i in range(n)]
        per_epoch.append(n)
        rd.write_steps(losses, per_epoch)
        assert read_steps(rd) == expected(losses, per_epoch)
    resumed = RunDir(tmp_path, "r")  # a resumed attempt: the checkpoint held 2 epochs
    resumed.write_steps(losses[:10] + [9.5], [5, 5, 1])
    assert read_steps(resumed) == expected(losses[:10] + [9.5], [5, 5, 1])
    shorter = [1.0, 2.0]
    rd.write_steps(shorter, [2])  # fewer losses than written: everything is formatted again
    assert read_steps(rd) == expected(shorter, [2])
