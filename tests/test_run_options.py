"""Run options that add records or rescale a setting: eval_every (evals.csv) and lr_scale_batch."""

import csv
import json

from bnexp import layout as L
from bnexp import config as C
from bnexp import train as T
from bnexp.nn import functional as bn_functional


def _cfg(data, results, *extra):
    return C.compose([f"data_dir={data}", f"results_dir={results}", "device=cpu", "train_size=256", "test_size=64",
                      "batch_size=32", "epochs=2", "data.verify=false", "progress=false", "norm.backend=eager",
                      "model=mlp_ioffe", "lr=0.5", *extra])


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _numbers(run):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in _rows(run / L.METRICS)], \
        (run / L.STEPS).read_text()


def test_evals_every_n_steps_leave_the_training_numbers_alone(synth_data_dir, tmp_path):
    with bn_functional.use_backend("eager"):
        plain = T.run(_cfg(synth_data_dir, tmp_path / "a"))
        evals = T.run(_cfg(synth_data_dir, tmp_path / "b", "eval_every=3"))
    assert plain.run_id != evals.run_id  # the run holds other records: another run
    assert _numbers(plain.path) == _numbers(evals.path)
    rows = _rows(evals.path / L.EVALS)
    assert [int(r["step"]) for r in rows] == list(range(3, 16 + 1, 3))  # 8 steps per epoch, 2 epochs
    assert [int(r["epoch"]) for r in rows] == [1, 1, 2, 2, 2]
    assert not (plain.path / L.EVALS).exists()
    # at an epoch's last step the evaluation is the epoch's own test evaluation
    at_end = T.run(_cfg(synth_data_dir, tmp_path / "c", "eval_every=8"))
    ends = _rows(at_end.path / L.EVALS)
    assert [r["test_acc"] for r in ends] == [r["test_acc"] for r in _rows(at_end.path / L.METRICS)]
    info = json.loads((at_end.path / L.INFO).read_text())
    assert info["seconds"]["eval"] > 0


def test_eval_every_zero_keeps_the_run_id():
    assert C.run_id(C.compose(["eval_every=0"])) == C.run_id(C.compose([]))


def test_lr_scale_batch_applies_the_linear_scaling_rule(synth_data_dir, tmp_path):
    with bn_functional.use_backend("eager"):
        r = T.run(_cfg(synth_data_dir, tmp_path, "lr=0.4", "lr_scale_batch=128", "epochs=1"))
    assert [float(row["lr"]) for row in _rows(r.path / L.METRICS)] == [0.4 * 32 / 128]
    assert C.run_id(C.compose(["lr_scale_batch=null"])) == C.run_id(C.compose([]))
    assert C.run_id(C.compose(["lr_scale_batch=256"])) != C.run_id(C.compose([]))


def test_one_line_per_epoch_stays_unless_progress_is_off(synth_data_dir, tmp_path, capsys):
    with bn_functional.use_backend("eager"):
        T.run(_cfg(synth_data_dir, tmp_path / "a", "progress=true"))
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("epoch ")]
        T.run(_cfg(synth_data_dir, tmp_path / "b"))
        quiet = capsys.readouterr().err
    assert [line.split("  ")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]
    assert "train_loss" in lines[0] and "test_acc" in lines[0] and lines[0].endswith("s")
    assert "epoch 1/2" not in quiet
