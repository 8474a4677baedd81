"""bnexp.tracking: the files of a run directory."""

import csv

import pytest

from bnexp import layout as L
from bnexp.tracking import RunDir, RunState


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


def test_run_state_round_trips_through_the_checkpoint_and_refuses_inconsistent_ones():
    state = RunState(epoch=1, metrics=[{"epoch": 1}], losses=[2.3, 2.2], steps_per_epoch=[2], elapsed=1.5,
                     measures=[(0, "weights", "fc1", "norm", 1.0), (2, "weights", "fc1", "norm", 1.1)])
    assert RunState.from_checkpoint(state.to_checkpoint(), epochs=3) == state
    older = {k: v for k, v in state.to_checkpoint().items() if k not in ("measures", "measure_seconds")}
    assert RunState.from_checkpoint({**older, "from_a_newer_bnexp": 1}, epochs=3).measures == []
    with pytest.raises(ValueError, match="inconsistent"):
        RunState.from_checkpoint({**state.to_checkpoint(), "losses": [2.3]}, epochs=3)
    with pytest.raises(ValueError, match="inconsistent"):
        RunState.from_checkpoint(state.to_checkpoint(), epochs=0)
    cut = RunState(epoch=2, metrics=[{"epoch": 1}, {"epoch": 2}], losses=[3, 2, 1, 0], steps_per_epoch=[2, 2],
                   measures=state.measures + [(4, "weights", "fc1", "norm", 1.2)]).as_of(1)
    assert (cut.epoch, cut.losses, cut.steps_per_epoch, len(cut.measures)) == (1, [3, 2], [2], 2)
