"""The claims ledger: verdicts computed from fabricated runs whose numbers make each verdict come out."""
from __future__ import annotations

import math

import pytest

from runfactory import CHANCE_10, fake_run
from bnexp import layout as L
from bnexp.errors import BnexpError
from bnexp.reference import load_reference
from bnexp.report.build import analyse
from bnexp.report.claims import VERDICTS, evaluate, load_claims, table

LENET_001 = {"lr": 0.01, "epochs": 20}


def _ledger_results(root):
    a = analyse(root, [])
    return {r.claim.id: r for r in evaluate(load_claims(), a.runs_tab, a.keys, a.runs.measures)}


def _arm(root, losses, **keys):
    for seed, loss in enumerate(losses):
        fake_run(root, seed=seed, train_loss=loss, **keys)


def test_the_shipped_ledger_loads_and_names_known_sources():
    ledger = load_claims(sources=load_reference().sources)
    assert len(ledger.claims) >= 11 and ledger.min_seeds >= 3
    assert {"faster_convergence", "larger_learning_rates", "reduces_ics", "smoother_landscape"} <= {c.id for c in ledger.claims}


def test_supported_when_every_seed_separates(tmp_path):
    _arm(tmp_path, [0.13, 0.135, 0.14], bn="on", **LENET_001)
    _arm(tmp_path, [0.30, 0.31, 0.32], bn="off", **LENET_001)
    r = _ledger_results(tmp_path)["faster_convergence"]
    assert r.settings[0].verdict == "supported"
    assert r.settings[1].verdict == "not run"            # no Ioffe MLP runs
    assert "bnexp sweep --preset ioffe_fig1 seed=0,1,2" in r.settings[1].evidence[-1]
    assert r.verdict == "supported"                        # the evaluated setting decides; the other is listed
    assert "bn 0.135 ± 0.005 (3) vs none 0.31 ± 0.01 (3)" in r.settings[0].evidence[0]


def test_not_supported_when_the_arms_overlap(tmp_path):
    _arm(tmp_path, [0.20, 0.30, 0.25], bn="on", **LENET_001)
    _arm(tmp_path, [0.26, 0.24, 0.31], bn="off", **LENET_001)
    assert _ledger_results(tmp_path)["faster_convergence"].verdict == "not supported"


def test_a_gap_smaller_than_twice_the_spread_is_not_enough(tmp_path):
    _arm(tmp_path, [0.10, 0.20, 0.15], bn="on", **LENET_001)     # std 0.05: needs a gap > 0.10
    _arm(tmp_path, [0.21, 0.22, 0.23], bn="off", **LENET_001)    # every seed below, gap of means 0.07
    assert _ledger_results(tmp_path)["faster_convergence"].verdict == "not supported"


def test_mixed_names_the_contexts(tmp_path):
    _arm(tmp_path, [0.13, 0.135, 0.14], bn="on", **LENET_001)
    _arm(tmp_path, [0.30, 0.31, 0.32], bn="off", **LENET_001)
    _arm(tmp_path, [0.50, 0.52, 0.51], bn="on", lr=0.01, epochs=2)
    _arm(tmp_path, [0.50, 0.49, 0.52], bn="off", lr=0.01, epochs=2)
    r = _ledger_results(tmp_path)["faster_convergence"]
    assert r.verdict == "mixed" and sorted(r.settings[0].held) == [False, True]
    assert any("epochs=2" in e for e in r.settings[0].evidence)


def test_not_run_below_the_minimum_of_seeds(tmp_path):
    _arm(tmp_path, [0.13, 0.14], bn="on", **LENET_001)
    _arm(tmp_path, [0.30, 0.31], bn="off", **LENET_001)
    r = _ledger_results(tmp_path)["faster_convergence"]
    assert r.verdict == "not run"
    assert "bnexp sweep --preset convergence seed=0,1,2" in r.settings[0].evidence[-1]
    assert all(c.verdict == "not run" for c in _ledger_results(tmp_path).values() if c.claim.id != "faster_convergence")


def test_a_diverged_seed_counts_as_the_worst_loss(tmp_path):
    _arm(tmp_path, [0.13, 0.135, 0.14], bn="on", **LENET_001)
    _arm(tmp_path, [0.30, 0.31], bn="off", **LENET_001)
    fake_run(tmp_path, seed=2, bn="off", diverged_epoch=3, **LENET_001)
    r = _ledger_results(tmp_path)["faster_convergence"]
    assert r.verdict == "supported" and "1 non-finite" in r.settings[0].evidence[0]


def test_larger_learning_rates_from_outcomes(tmp_path):
    for lr in (0.1, 0.5):
        _arm(tmp_path, [0.12, 0.13, 0.125], bn="on", lr=lr)
    _arm(tmp_path, [0.30, 0.31, 0.305], bn="off", lr=0.1)
    _arm(tmp_path, [CHANCE_10] * 3, bn="off", lr=0.5)      # dead
    r = _ledger_results(tmp_path)["larger_learning_rates"]
    assert [s.verdict for s in r.settings] == ["supported", "supported"]
    assert "bn trains up to lr 0.5" in r.settings[0].evidence[0] and "none trains up to lr 0.1" in r.settings[0].evidence[0]
    assert r.verdict == "supported"


def test_noisy_bn_close_and_better_than_none(tmp_path):
    for kind, acc in (("bn", 0.880), ("noisy", 0.872), ("none", 0.80)):
        for seed, d in enumerate((-0.002, 0.0, 0.002)):
            fake_run(tmp_path, seed=seed, **{"norm.kind": kind}, test_acc=acc + d, lr=0.1, epochs=10)
    assert _ledger_results(tmp_path)["noisy_bn"].verdict == "supported"


def test_noisy_bn_far_from_bn_is_mixed(tmp_path):
    for kind, acc in (("bn", 0.88), ("noisy", 0.84), ("none", 0.80)):
        for seed, d in enumerate((-0.002, 0.0, 0.002)):
            fake_run(tmp_path, seed=seed, **{"norm.kind": kind}, test_acc=acc + d)
    r = _ledger_results(tmp_path)["noisy_bn"]
    assert [s.verdict for s in r.settings] == ["not supported", "supported"] and r.verdict == "mixed"


def _measures(run_dir, rows):
    lines = "".join(f"{s},{i},{lay},{st},{v}\n" for s, i, lay, st, v in rows)
    (run_dir / L.MEASURES).write_text("step,instrument,layer,statistic,value\n" + lines)


def test_landscape_from_measures(tmp_path):
    for bn, width in (("on", 0.1), ("off", 1.0)):
        for seed in range(3):
            d = fake_run(tmp_path, seed=seed, bn=bn, **{"measure": ["landscape", "predictiveness", "beta_smoothness"]})
            rows = []
            for step in (0, 100, 200):
                rows += [(step, "landscape", "model", "min", 1.0), (step, "landscape", "model", "max", 1.0 + width + 0.01 * seed),
                         (step, "landscape", "model", "loss", 1.0),
                         (step, "predictiveness", "model", "min", 0.0), (step, "predictiveness", "model", "max", width),
                         (step, "beta_smoothness", "model", "max", 2 * width if bn == "off" else 5.0)]
            _measures(d, rows)
    r = _ledger_results(tmp_path)["smoother_landscape"]
    assert [s.verdict for s in r.settings] == ["supported", "supported", "not supported"]
    assert r.verdict == "mixed"


def test_missing_measures_are_not_run_not_a_guess(tmp_path):
    for bn in ("on", "off"):
        for seed in range(3):
            fake_run(tmp_path, seed=seed, bn=bn)
    r = _ledger_results(tmp_path)["smoother_landscape"]
    assert r.verdict == "not run" and "quantity not recorded" in r.settings[0].evidence[0]


def test_layer_input_drift_from_activations(tmp_path):
    for bn in ("on", "off"):   # the factory's BN outputs are N(0,1) at every epoch; without BN they drift
        for seed in range(3):
            fake_run(tmp_path, seed=seed, bn=bn, probe_every=1, act_samples=4000)
    assert _ledger_results(tmp_path)["stable_layer_inputs"].verdict == "supported"


def test_every_verdict_is_a_known_word_and_the_table_has_one_row_per_setting(tmp_path):
    _arm(tmp_path, [0.13, 0.135, 0.14], bn="on", **LENET_001)
    _arm(tmp_path, [0.30, 0.31, 0.32], bn="off", **LENET_001)
    results = list(_ledger_results(tmp_path).values())
    assert {r.verdict for r in results} <= set(VERDICTS)
    t = table(results, 3)
    assert len(t) == sum(len(r.claim.settings) for r in results)
    assert (t.loc[t["setting_verdict"] == "not run", "command"].str.startswith("bnexp sweep --preset")).all()


def test_a_malformed_ledger_is_one_line(tmp_path):
    bad = tmp_path / "claims.yaml"
    bad.write_text("min_seeds: 3\nseparation: 2\nclaims:\n  - {id: x, statement: s, sources: [], settings: "
                   "[{name: n, preset: p, arms: {a: {}, b: {}}, quantity: test_acc, test: sideways}]}\n")
    with pytest.raises(BnexpError, match="test 'sideways' not in"):
        load_claims(bad)


def _precise(run_dir, acc):
    (run_dir / L.PRECISE).write_text(f"epoch,test_loss,test_acc,batches\n1,0.5,{acc - 0.01},100\n20,0.4,{acc},100\n")


@pytest.mark.parametrize("gain_small, verdict", [(0.03, "supported"), (0.002, "not supported")])
def test_precise_bn_gain_at_small_batches(tmp_path, gain_small, verdict):
    for bs, gain in ((4, gain_small), (256, 0.001)):
        for seed in range(3):
            d = fake_run(tmp_path, seed=seed, batch_size=bs, test_acc=0.85, precise_bn=100)
            _precise(d, 0.85 + gain)
    r = _ledger_results(tmp_path)["train_vs_inference"]
    assert r.verdict == verdict and "at batch_size 4" in r.settings[0].evidence[0]


def test_bn_groups_that_differ_in_a_norm_key_are_not_pooled(tmp_path):
    _arm(tmp_path, [0.13, 0.135, 0.14], bn="on", **LENET_001)                            # momentum 0.1
    _arm(tmp_path, [0.50, 0.52, 0.51], bn="on", **{"norm.momentum": 0.5}, **LENET_001)  # another BN
    _arm(tmp_path, [0.30, 0.31, 0.32], bn="off", **LENET_001)
    r = _ledger_results(tmp_path)["faster_convergence"].settings[0]
    assert r.verdict == "mixed" and len(r.held) == 2
    assert any("norm.momentum=0.5" in e and "bn 0.51 ± 0.01 (3)" in e for e in r.evidence)
