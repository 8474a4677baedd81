"""precise_bn (Wu & Johnson 2021): population statistics recomputed on a copy of the model, with no
effect on training; precise.csv beside metrics.csv; bad input refused; the ledger's claim on it."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from bnexp import layout as L
from bnexp import config as C
from bnexp import data, engine, precise, train as T
from bnexp.cli import main
from bnexp.errors import BnexpError
from bnexp.models import build_model


def _split(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return data.Split(torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8),
                      torch.randint(0, 10, (n,), generator=g), 10)


def test_recompute_is_the_equal_weight_average_of_the_batch_statistics_and_touches_nothing():
    torch.manual_seed(0)
    model = build_model("lenet5", "bn", 10, 1, 28)
    train = _split()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    twin = precise.recompute(model, train, precise.precise_batches(len(train), 16, 4, seed=3))
    # the first norm layer sees conv1's output: its recomputed mean / var are the mean over the 4 batches
    means, variances = [], []
    with torch.no_grad():
        for idx in precise.precise_batches(len(train), 16, 4, 3):
            z = model.conv1.conv(engine.model_input(train.x[idx], 28, False))
            means.append(z.mean((0, 2, 3)))
            n = z.numel() / z.shape[1]
            variances.append(z.var((0, 2, 3), unbiased=False) * n / (n - 1))   # BN keeps the unbiased variance
    assert len(means) == 4
    torch.testing.assert_close(twin.conv1.norm.running_mean, torch.stack(means).mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(twin.conv1.norm.running_var, torch.stack(variances).mean(0), rtol=1e-5, atol=1e-6)
    assert int(twin.conv1.norm.num_batches_tracked) == 4 and not twin.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(torch.get_rng_state(), rng) and model.conv1.norm.momentum == 0.1


def test_batches_depend_on_the_seed_only_and_skip_a_last_single_sample():
    a, b = precise.precise_batches(33, 16, 10, 1), precise.precise_batches(33, 16, 10, 1)
    assert [len(x) for x in a] == [16, 16] and all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(precise.precise_batches(33, 16, 10, 2)[0], a[0])


def test_brn_recomputes_with_bn_forward():
    torch.manual_seed(0)
    model = build_model("lenet5", "brn", 10, 1, 28)
    train = _split()
    twin = precise.recompute(model, train, precise.precise_batches(len(train), 16, 2, seed=0))
    assert all(m.r_max == 1.0 and m.d_max == 0.0 for m in precise.statistic_layers(twin))
    assert all(m.r_max == 3.0 for m in precise.statistic_layers(model))


def _cfg(tmp_path, data_dir, *extra):
    return C.compose([f"data_dir={data_dir}", "device=cpu", "train_size=128", "test_size=64", "batch_size=32",
                      "epochs=2", "data.verify=false", "progress=false", "threads=1", "norm.backend=eager",
                      f"results_dir={tmp_path}", *extra])


def _rows(path):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(open(path))]


def test_a_run_with_precise_bn_trains_exactly_like_one_without(tmp_path, synth_data_dir):
    off = T.run(_cfg(tmp_path, synth_data_dir))
    on = T.run(_cfg(tmp_path, synth_data_dir, "precise_bn=3"))
    assert off.run_id != on.run_id and on.status == L.COMPLETED
    assert _rows(off.path / L.METRICS) == _rows(on.path / L.METRICS)
    assert (off.path / L.STEPS).read_bytes() == (on.path / L.STEPS).read_bytes()
    rows = list(csv.DictReader(open(on.path / L.PRECISE)))
    assert [r["epoch"] for r in rows] == ["1", "2"] and all(r["batches"] == "3" for r in rows)
    assert all(0 <= float(r["test_acc"]) <= 1 for r in rows)
    assert not (off.path / L.PRECISE).exists()
    assert "precise" in json.loads((on.path / L.INFO).read_text())["seconds"]


def test_precise_bn_off_keeps_run_ids(tmp_path, synth_data_dir):
    assert C.run_id(_cfg(tmp_path, synth_data_dir)) == C.run_id(_cfg(tmp_path, synth_data_dir, "precise_bn=0"))


@pytest.mark.parametrize("extra, words", [
    (["precise_bn=5", "norm=gn"], "precise_bn=5 needs a norm with running statistics"),
    (["precise_bn=5", "bn=off"], "norm=none has none to recompute"),
    (["precise_bn=-1"], "precise_bn must be a non-negative integer"),
])
def test_bad_precise_bn_is_one_line(tmp_path, synth_data_dir, extra, words, capsys):
    with pytest.raises(BnexpError, match=words):
        _cfg(tmp_path, synth_data_dir, *extra)
    assert main(["train", f"results_dir={tmp_path}", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and not (tmp_path / L.RUNS_DIR).exists()
