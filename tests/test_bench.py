"""bnexp bench on CPU with tiny inputs: the epoch and bn benchmarks run, write JSON and print ratios."""

import functools
import json

import pytest

from bnexp.bench import bn, epoch
from bnexp.cli import main
from bnexp.nn import functional as bnF


def test_epoch_benchmark_compares_the_pipelines(synth_data_dir):
    result = epoch.run(device="cpu", batch_size=64, repeats=1, max_repeats=1, data_dir=str(synth_data_dir))
    json.dumps(result)
    assert set(result["seconds"]) == {"bnexp", "hand", "dataloader"}  # no bnexp-eager: no CUDA graphs on CPU
    assert result["images"] == 512 and result["cuda_graphs"] is False and result["precision"] == "fp32"
    ratio = result["ratios"]["bnexp/hand"]  # the median of the per-repeat ratios, not the ratio of the medians
    assert ratio["n"] == 1 and ratio["min"] == ratio["median"] == ratio["max"] and not ratio["settled"]
    assert result["ratio_bnexp_vs_hand"] == pytest.approx(result["all_seconds"]["bnexp"][0]
                                                          / result["all_seconds"]["hand"][0], rel=0.01)
    table = epoch.format_table(result)
    assert "dataloader" in table and "CUDA graphs off" in table and "faster than the DataLoader script" in table
    assert "UNSETTLED" in table  # one repeat is not enough to know


def test_bn_benchmark_layouts_and_traffic():
    with bnF.use_backend("eager"):
        result = bn.run(shapes=((4, 3, 5, 5),), repeats=2, warmup=1, channels_last=True, backends=["eager"])
    row = result["rows"][0]
    assert result["layout"] == "channels_last" and result["backends"] == ["eager"]
    assert row["bnexp_GBps"] == pytest.approx(bn.min_traffic_bytes((4, 3, 5, 5)) / row["bnexp_ms"] * 1e-6)
    assert bn.min_traffic_bytes((64, 256, 56, 56)) == 5 * 4 * 64 * 256 * 56 * 56
    assert bn.LARGE in bn.default_shapes(bn.torch.device("cuda")) and bn.LARGE not in bn.default_shapes(bn.torch.device("cpu"))


@pytest.mark.parametrize("args,msg", [(["--backends", "cudnn"], "unknown batch-norm backend 'cudnn'"),
                                      (["--backends", "compiled,triton"], "--backends triton needs --device cuda"),
                                      (["--precision", "fp16"], "--precision must be fp32 or bf16"),
                                      (["--device", "gpu0"], "--device must be auto, cpu, cuda, cuda:N or mps, got 'gpu0'"),
                                      (["--kinds", "gn,groupnorm"], "--kinds: unknown norm kind in 'gn,groupnorm'")])
def test_bench_rejects_bad_options(capsys, tmp_path, args, msg):
    assert main(["bench", "bn", "--device", "cpu", "--out", str(tmp_path), *args]) == 2  # a later --device wins
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1


def test_log_benchmark_times_both_writers_through_the_cli(capsys, tmp_path, monkeypatch):
    from bnexp.bench import log

    monkeypatch.setattr(log, "run", functools.partial(log.run, min_repeats=3, max_repeats=4, budget_s=1.0))
    assert main(["bench", "log", "--device", "cpu", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "log-cpu.json").read_text())
    assert [r["case"] for r in result["rows"]] == ["step scalars", "histograms"]
    for r in result["rows"]:
        assert r["bnexp_ms"] > 0 and r["torch_ms"] > 0
        s = r["speedup"]
        assert s["min"] <= s["median"] <= s["max"] and s["n"] in (3, 4) and result["ratios"][r["case"]] == s
    assert "SummaryWriter ms" in out and "step scalars" in out and "previous invocation" not in out
    assert main(["bench", "log", "--device", "cpu", "--out", str(tmp_path)]) == 0  # compared with the first
    assert "previous invocation" in capsys.readouterr().out


def test_measure_benchmark_times_each_instrument_and_an_epoch_with_them(synth_data_dir):
    from bnexp.bench import measure as bench_measure
    from bnexp.measure import INSTRUMENTS

    with bnF.use_backend("eager"):
        result = bench_measure.run(device="cpu", repeats=1, instrument_repeats=1, data_dir=str(synth_data_dir),
                                   batch_size=64)
    json.dumps(result)
    per = result["per_measurement_seconds"]
    assert set(per) == {*INSTRUMENTS, "all"}
    assert all(0 < s["min"] <= s["median"] <= s["max"] for s in per.values())
    assert result["steps_per_epoch"] == 8 and result["measurements_per_epoch"] == 1  # step 0 only: 8 < 100
    seconds = result["epoch_seconds"]
    assert result["epoch_ratio"] == pytest.approx(seconds["with instruments"]["median"] / seconds["without"]["median"],
                                                  rel=0.01)
    assert result["step_seconds"] == pytest.approx(seconds["without"]["median"] / 8, rel=0.01)
    table = bench_measure.format_table(result)
    assert "beta_smoothness" in table and "with / without" in table and "CPU target <= 1.25" in table



def test_sweep_benchmark_pairs_the_job_counts(monkeypatch):
    """Without training: each `bnexp sweep` command is stubbed by its job count's duration."""
    from bnexp.bench import stats, sweep

    clock = {"now": 0.0}
    monkeypatch.setattr(sweep, "_warm_up", lambda overrides, preset: None)

    def fake_sweep(overrides, preset, jobs):
        clock["now"] += {1: 60.0, 2: 40.0}[jobs]
        return 0.0, 8
    monkeypatch.setattr(sweep, "_sweep", fake_sweep)
    monkeypatch.setattr(sweep, "measure", functools.partial(stats.measure, timer=lambda: clock["now"]))
    result = sweep.run("cpu", jobs=(1, 2), repeats=3)
    json.dumps(result)
    one, two = result["rows"]
    assert (one["seconds"], two["seconds"], result["runs"], result["repeats"]) == (60.0, 40.0, 8, 3)
    assert two["ratio"] == pytest.approx(1.5) and result["ratios"]["jobs=2"]["settled"]
    assert one["speedup"] is None and two["runs_per_min"] == pytest.approx(12.0)
    table = sweep.format_table(result)
    assert "1.50x (min 1.50, max 1.50, n 3)" in table and "every ratio is settled" in table


def test_bench_gives_a_device_only_to_the_benchmarks_that_take_one(capsys, tmp_path, monkeypatch):
    import importlib
    import inspect

    from bnexp.bench import report, suite

    for name in suite.BENCHMARKS:
        takes = "device" in inspect.signature(importlib.import_module(f"bnexp.bench.{name}").run).parameters
        assert takes == (name not in suite.CPU_ONLY), name
    monkeypatch.setattr(report, "run", lambda: {"n_runs": 0})  # a device argument would be a TypeError
    monkeypatch.setattr(report, "format_table", lambda result: "the table")
    assert main(["bench", "report", "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "report-cpu.json").read_text()) == {"n_runs": 0}
    assert capsys.readouterr().out.splitlines()[0] == "the table"
