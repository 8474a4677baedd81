"""The BN benchmark runs, returns JSON-serialisable results and prints a table (tiny shapes, eager)."""

import json

import torch

from bnexp.bench import bn, time_interleaved, time_samples
from bnexp.nn import functional as bnF


def test_time_interleaved_runs_every_function_in_rotating_order():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    medians = time_interleaved(fns, repeats=3, warmup=1)
    assert set(medians) == {"a", "b", "c"} and all(m >= 0 for m in medians.values())
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert [len(s) for s in time_samples(fns, repeats=4, warmup=0).values()] == [4, 4, 4]


def test_bn_benchmark_result_and_table():
    with bnF.use_backend("eager"):  # compiling is not what this test is about
        result = bn.run(shapes=((4, 3, 5, 5), (6, 2, 3, 3)), repeats=3, warmup=1, budget_s=0.5)
    json.dumps(result)
    assert result["backend"] == "eager" and result["torch_version"] == torch.__version__
    assert [row["shape"] for row in result["rows"]] == [[4, 3, 5, 5], [6, 2, 3, 3]]
    for row in result["rows"]:
        assert row["bnexp_ms"] > 0 and row["torch_ms"] > 0 and row["bnexp_first_call_ms"] > 0
        spread = row["bnexp_spread"]  # pair by pair, so not the ratio of the two medians
        assert row["ratio"] == spread["median"] and spread["min"] <= spread["median"] <= spread["max"]
        assert spread["n"] == row["repeats"] >= 3
    assert set(result["ratios"]) == {"bn (4, 3, 5, 5) bnexp", "bn (6, 2, 3, 3) bnexp"}
    table = bn.format_table(result)
    assert "(4, 3, 5, 5)" in table and "ratio" in table and f"{result['rows'][0]['ratio']:.2f}x" in table


def test_bn_benchmark_kinds_against_their_counterparts():
    with bnF.use_backend("eager"):
        result = bn.run(shapes=((4, 6, 3, 3),), repeats=2, warmup=0, kinds=["gn", "ln", "in", "brn", "ghost", "noisy"],
                        max_repeats=2)
    json.dumps(result)
    assert [(r["kind"], r["reference"]) for r in result["rows"]] == [
        ("gn", "GroupNorm"), ("ln", "GroupNorm"), ("in", "InstanceNorm2d"), ("brn", "BatchNorm2d"),
        ("ghost", "BatchNorm2d"), ("noisy", "BatchNorm2d")]
    assert all(r["bnexp_ms"] > 0 and r["torch_ms"] > 0 for r in result["rows"])
    table = bn.format_table(result)
    assert "ghost vs BatchNorm2d" in table and "gn vs GroupNorm" in table
    assert "kind" not in bn.format_table(bn.run(shapes=((4, 3, 2, 2),), repeats=1, warmup=0, backends=["eager"],
                                                max_repeats=1))


def test_bn_benchmark_layers():
    ours, ref = bn._layers("gn", (64, 6, 2, 2), torch.device("cpu"))
    assert ours().num_groups == ref.num_groups == 6
    ours, ref = bn._layers("ln", (64, 6, 2, 2), torch.device("cpu"))
    assert ours().num_groups == ref.num_groups == 1
    ours, _ = bn._layers("brn", (64, 6, 2, 2), torch.device("cpu"))
    assert ours().limits(0) == (3.0, 5.0)  # timed with r and d active
    ours, _ = bn._layers("ghost", (64, 6, 2, 2), torch.device("cpu"))
    assert ours().ghost_size == 32
