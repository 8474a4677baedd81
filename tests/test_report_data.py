"""bnexp report, data side: reading runs, --where, outcomes, seed groups, BN pairs, reference verdicts.
No figures are drawn here (fast); tests/test_report_output.py covers the written report."""
import math

import pytest
from runfactory import CHANCE_10, damage, fake_group, fake_run

from bnexp import layout as L
from bnexp.errors import BnexpError
from bnexp.reference import load_reference
from bnexp.report import aggregate as agg
from bnexp.report.compare import compare
from bnexp.report.load import apply_where, load_runs, parse_scalar

REF = load_reference()


def groups_of(results_dir, where=()):
    runs = apply_where(load_runs(results_dir), list(where))
    return agg.aggregate(runs, REF.num_classes)


def one(groups, **keys):
    """The single group whose config has these values (dotted keys as model__name)."""
    mask = True
    for k, v in keys.items():
        mask = mask & (groups[k.replace("__", ".")] == v)
    rows = groups[mask]
    assert len(rows) == 1, rows
    return rows.iloc[0]


# ---------------------------------------------------------------- reading

def test_load_flattens_config_and_run_json(tmp_path):
    fake_run(tmp_path, lr=0.5, bn="off", seed=3, train_loss=0.25, test_acc=0.87, steps_per_epoch=7)
    runs = load_runs(tmp_path)
    row = runs.runs.iloc[0]
    assert row["model.name"] == "lenet5" and row["norm.kind"] == "none" and row["bn"] == "off"
    assert row["lr"] == 0.5 and row["seed"] == 3 and row["status"] == L.COMPLETED
    assert row["train_loss"] == pytest.approx(0.25) and row["test_acc"] == pytest.approx(0.87)
    assert len(runs.epochs) == 20 and len(runs.steps) == 20 * 7
    assert set(runs.steps["run_id"].astype(str)) == {row["run_id"]}
    assert "norm.eps" in runs.config_keys and "seed" in runs.config_keys


def test_unquoted_yaml_on_is_read_as_bn_on(tmp_path):
    d = fake_run(tmp_path, bn="on")
    text = (d / L.CONFIG).read_text()
    assert "bn: 'on'" in text
    (d / L.CONFIG).write_text(text.replace("bn: 'on'", "bn: on"))   # YAML 1.1 reads this as True
    assert load_runs(tmp_path).runs["bn"].tolist() == ["on"]


@pytest.mark.parametrize("what,kept", [
    ("no_run_json", False), ("bad_yaml", False), ("bad_json", False), ("bad_status", False),
    ("bad_metrics_header", True), ("garbage_steps", True), ("no_steps", True), ("bad_npz", True)])
def test_malformed_run_dirs_are_skipped_or_kept_with_a_warning(tmp_path, what, kept):
    fake_run(tmp_path, seed=0)
    bad = damage(fake_run(tmp_path, seed=1), what)
    runs = load_runs(tmp_path)
    assert (bad.name in set(runs.runs["run_id"])) == kept
    lines = [w for w in runs.warnings if bad.name in w]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert lines[0].startswith("partial" if kept else "skipped")


def test_running_and_failed_runs_may_lack_files_without_warnings(tmp_path):
    fake_run(tmp_path, seed=0)
    d = fake_run(tmp_path, seed=1, status=L.RUNNING, epochs_done=0)
    (d / L.STEPS).unlink()
    (d / L.METRICS).unlink()
    runs = load_runs(tmp_path)
    assert len(runs.runs) == 2 and runs.warnings == []


def test_completed_run_without_any_final_numbers_is_skipped(tmp_path):
    fake_run(tmp_path, seed=0)
    d = fake_run(tmp_path, seed=1)
    (d / L.INFO).write_text((d / L.INFO).read_text().replace('"final": {', '"old_final": {'))
    (d / L.METRICS).write_text("epoch,train_loss,train_acc,test_loss,test_acc,lr,seconds\n")
    runs = load_runs(tmp_path)
    assert d.name not in set(runs.runs["run_id"])
    assert any("no final metrics" in w for w in runs.warnings)


def test_final_falls_back_to_last_metrics_row(tmp_path):
    d = fake_run(tmp_path, train_loss=0.2)
    (d / L.INFO).write_text((d / L.INFO).read_text().replace('"final": {', '"old_final": {'))
    assert load_runs(tmp_path).runs["train_loss"].iloc[0] == pytest.approx(0.2)


@pytest.mark.parametrize("setup", ["missing", "empty", "only_files"])
def test_no_runs_is_one_line_error_naming_the_place_and_command(tmp_path, setup):
    if setup != "missing":
        (tmp_path / L.RUNS_DIR).mkdir()
    if setup == "only_files":
        (tmp_path / L.RUNS_DIR / "notes.txt").write_text("x")
    with pytest.raises(BnexpError) as e:
        load_runs(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / L.RUNS_DIR) in msg and "bnexp sweep" in msg


def test_all_run_dirs_unreadable_is_an_error(tmp_path):
    damage(fake_run(tmp_path), "bad_yaml")
    with pytest.raises(BnexpError, match="none of the 1 run directories"):
        load_runs(tmp_path)


# ---------------------------------------------------------------- --where

def test_parse_scalar_keeps_on_off_as_strings():
    assert parse_scalar("on") == "on" and parse_scalar("off") == "off"
    assert parse_scalar("0.5") == 0.5 and parse_scalar("512") == 512 and parse_scalar("1e-3") == 0.001
    assert parse_scalar("null") is None and parse_scalar("true") is True and parse_scalar("'x'") == "x"


@pytest.fixture()
def mixed(tmp_path):
    for lr in (0.1, 0.5):
        for bn in ("on", "off"):
            fake_run(tmp_path, lr=lr, bn=bn)
    fake_run(tmp_path, config={"model.name": "alexnet_cifar", "data.name": "cifar100"}, lr=0.001)
    return tmp_path


@pytest.mark.parametrize("where,n", [
    (["model.name=lenet5"], 4), (["lr=0.5"], 2), (["lr=.5"], 2), (["bn=on"], 3), (["bn=off", "lr=0.1"], 1),
    (["lr=0.1,0.5"], 4), (["norm.kind=none"], 2), (["data.name=cifar100"], 1), (["train_size=null"], 5)])
def test_where_filters_by_config_values(mixed, where, n):
    assert len(apply_where(load_runs(mixed), where).runs) == n


@pytest.mark.parametrize("where,message", [
    (["lr"], "malformed --where 'lr'"), (["=0.5"], "malformed"), (["kind=bn"], "did you mean norm.kind"),
    (["nonsense=1"], "in no run's config.yaml"), (["lr=0.7"], "no runs match")])
def test_bad_where_is_a_one_line_error(mixed, where, message):
    with pytest.raises(BnexpError) as e:
        apply_where(load_runs(mixed), where)
    assert message in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- outcomes and groups

def test_aggregate_mean_std_n_exact(tmp_path):
    fake_group(tmp_path, [0.10, 0.12, 0.14], lr=0.5, bn="on", test_acc=0.9)
    g = one(groups_of(tmp_path), lr=0.5)
    assert g["n_runs"] == 3 and g["train_loss_n"] == 3 and g["seeds"] == "0 1 2"
    assert g["train_loss_mean"] == pytest.approx(0.12, abs=1e-9)
    assert g["train_loss_std"] == pytest.approx(0.02, abs=1e-9)      # sample std (ddof=1)
    assert g["test_acc_mean"] == pytest.approx(0.9) and g["test_acc_std"] == pytest.approx(0.0, abs=1e-12)
    assert g["outcome"] == "all trained"


def test_single_seed_has_no_std(tmp_path):
    fake_run(tmp_path, train_loss=0.3)
    g = groups_of(tmp_path).iloc[0]
    assert g["train_loss_n"] == 1 and math.isnan(g["train_loss_std"]) and g["outcome"] == "trained"


def test_groups_ignore_seed_device_and_paths_but_not_lr(tmp_path):
    fake_run(tmp_path, seed=0, device="cpu", data_dir="/a", results_dir="x", probe_every=5)
    fake_run(tmp_path, seed=1, device="cuda", data_dir="/b", results_dir="y", probe_every=1)
    fake_run(tmp_path, seed=0, lr=0.3)
    groups = groups_of(tmp_path)
    assert sorted(groups["n_runs"]) == [1, 2]


def test_dead_and_diverged_classification(tmp_path):
    fake_run(tmp_path, seed=0, train_loss=CHANCE_10 + 0.019, train_acc=0.10)   # dead
    fake_run(tmp_path, seed=1, train_loss=CHANCE_10 - 0.03, train_acc=0.10)    # loss just outside: alive
    fake_run(tmp_path, seed=2, train_loss=CHANCE_10 - 0.01, train_acc=0.25)    # learning: accuracy above chance
    fake_run(tmp_path, seed=3, diverged_epoch=3)                               # diverged
    fake_run(tmp_path, seed=4, status=L.RUNNING, epochs_done=2)
    fake_run(tmp_path, seed=5, status=L.FAILED, epochs_done=1)
    fake_run(tmp_path, seed=0, config={"data.name": "cifar100"}, train_loss=math.log(100) - 0.01, train_acc=0.01)
    runs = load_runs(tmp_path)
    out = dict(zip(zip(runs.runs["data.name"], runs.runs["seed"]), agg.classify(runs, REF.num_classes)["outcome"]))
    assert out == {("fashion_mnist", 0): "dead", ("fashion_mnist", 1): "trained", ("fashion_mnist", 2): "trained",
                   ("fashion_mnist", 3): "diverged", ("fashion_mnist", 4): "interrupted",
                   ("fashion_mnist", 5): "failed", ("cifar100", 0): "dead"}


def test_completed_run_with_non_finite_loss_counts_as_diverged(tmp_path):
    d = fake_run(tmp_path)
    text = (d / L.INFO).read_text()
    (d / L.INFO).write_text(text.replace('"train_loss": 0.3', '"train_loss": NaN'))
    runs = load_runs(tmp_path)
    assert agg.classify(runs, REF.num_classes)["outcome"].tolist() == ["diverged"]


def test_split_outcomes_text_and_diverged_excluded_from_mean(tmp_path):
    fake_group(tmp_path, [CHANCE_10, 0.3, 0.5], lr=0.5, bn="off")
    fake_run(tmp_path, lr=0.5, bn="off", seed=7, diverged_epoch=2)
    fake_group(tmp_path, [0.1, 0.1], lr=0.5, bn="on")
    groups = groups_of(tmp_path)
    off, on = one(groups, bn="off"), one(groups, bn="on")
    assert off["outcome"] == "dead in 1 of 4 seeds, diverged in 1 of 4 seeds"
    assert off["n_runs"] == 4 and off["train_loss_n"] == 3
    assert off["train_loss_mean"] == pytest.approx((CHANCE_10 + 0.8) / 3)
    assert on["outcome"] == "all trained"
    assert agg.outcome_summary(["dead", "trained", "trained"]) == "dead in 1 of 3 seeds"
    assert agg.outcome_summary(["dead"] * 3) == "all dead"


def test_running_and_failed_runs_are_not_aggregated(tmp_path):
    fake_group(tmp_path, [0.2, 0.4])
    fake_run(tmp_path, seed=5, status=L.RUNNING, epochs_done=3, train_loss=9.0)
    fake_run(tmp_path, seed=6, status=L.FAILED, epochs_done=1, train_loss=9.0)
    g = groups_of(tmp_path).iloc[0]
    assert g["n_runs"] == 2 and g["train_loss_mean"] == pytest.approx(0.3)


def test_bn_pairs_and_deltas(tmp_path):
    for lr, on, off in ((0.1, 0.13, 0.31), (0.5, 0.10, CHANCE_10)):
        fake_group(tmp_path, [on, on], lr=lr, bn="on", test_acc=0.9)
        fake_group(tmp_path, [off, off], lr=lr, bn="off", test_acc=0.8)
    fake_run(tmp_path, lr=0.3, bn="on")                           # no partner
    groups = groups_of(tmp_path)
    pairs = agg.bn_pairs(groups, agg.defining_keys(load_runs(tmp_path).config_keys))
    assert sorted(pairs["lr"]) == [0.1, 0.5]
    p = pairs[pairs["lr"] == 0.5].iloc[0]
    assert p["train_loss_delta"] == pytest.approx(0.10 - CHANCE_10)
    assert p["test_acc_delta"] == pytest.approx(0.1)
    assert p["outcome_no_bn"] == "all dead"


@pytest.mark.parametrize("on_dropout,off_dropout,paired", [
    (None, None, True), (None, 0.5, True), (0.0, 0.5, True), (0.3, 0.3, True), (0.3, 0.5, False)])
def test_bn_pairs_follow_the_automatic_dropout_rule(tmp_path, on_dropout, off_dropout, paired):
    alex = {"model.name": "alexnet_cifar", "data.name": "cifar100", "optim.name": "adam"}
    fake_run(tmp_path, config={**alex, "model.dropout": on_dropout}, bn="on", lr=0.001)
    fake_run(tmp_path, config={**alex, "model.dropout": off_dropout}, bn="off", lr=0.001)
    groups = groups_of(tmp_path)
    pairs = agg.bn_pairs(groups, agg.defining_keys(load_runs(tmp_path).config_keys))
    assert len(pairs) == int(paired)


# ---------------------------------------------------------------- reference data and verdicts

def test_reference_yaml_holds_the_design_numbers_with_sources():
    lenet = {(r.match["lr"], r.match["bn"]): r.value for r in REF.references
             if r.metric == "train_loss" and r.source == "moon-hotel"}
    assert lenet == {(0.01, "on"): 0.27, (0.05, "on"): 0.17, (0.1, "on"): 0.134, (0.3, "on"): 0.107,
                     (0.5, "on"): 0.099, (0.01, "off"): 0.637, (0.05, "off"): 0.401, (0.1, "off"): 0.306,
                     (0.3, "off"): 0.268, (0.5, "off"): 2.30}
    alex = sorted(r.value for r in REF.references if r.match.get("model.name") == "alexnet")
    assert alex == [0.41, 0.584, 0.973, 0.9996]
    five = [r for r in REF.references if r.match.get("epochs") == 5]
    assert {r.quality for r in five} == {"approximate"} and sorted(len(r.values) for r in five) == [5, 5]
    d2l = [r for r in REF.references if r.source == "d2l"]
    assert len(d2l) == 9 and {r.quality for r in d2l} == {"exact"} and {r.preset for r in d2l} == {"d2l_bn"}
    assert sorted((r.label, r.metric, r.value) for r in d2l)[:3] == [
        ("nn.BatchNorm", "test_acc", 0.838), ("nn.BatchNorm", "train_acc", 0.897), ("nn.BatchNorm", "train_loss", 0.277)]
    assert all(r.source in REF.sources for r in REF.references)


def test_malformed_reference_yaml_is_a_bnexp_error(tmp_path):
    from bnexp.reference import default_path
    bad = tmp_path / "ref.yaml"
    bad.write_text(default_path().read_text().replace("    quality: exact\n", "    quality: exactish\n", 1))
    with pytest.raises(BnexpError, match="quality"):
        load_reference(bad)


def verdicts(results_dir):
    table = compare(groups_of(results_dir), REF)
    return table


def lenet_row(table, lr, bn, metric="train_loss"):
    rows = table[(table["label"] == f"lr={lr:g}, bn={bn}") & (table["metric"] == metric)]
    assert len(rows) == 1, rows
    return rows.iloc[0]


def test_reference_reproduced_not_reproduced_and_missing(tmp_path):
    fake_group(tmp_path, [0.098, 0.10, 0.102], lr=0.5, bn="on")     # ref 0.099 -> reproduced
    fake_group(tmp_path, [0.5, 0.5], lr=0.3, bn="on")                # ref 0.107 -> not reproduced
    table = verdicts(tmp_path)
    good, bad = lenet_row(table, 0.5, "on"), lenet_row(table, 0.3, "on")
    assert good["verdict"] == "reproduced" and good["n"] == 3
    assert good["mean"] == pytest.approx(0.10) and good["diff"] == pytest.approx(0.10 - 0.099)
    assert bad["verdict"] == "not reproduced" and bad["diff"] == pytest.approx(0.5 - 0.107)
    missing = lenet_row(table, 0.1, "off")
    assert missing["verdict"] == "no matching runs" and missing["command"] == "bnexp sweep --preset lr_sensitivity"


def test_reference_tolerance_loss_relative_and_two_std(tmp_path):
    fake_group(tmp_path, [0.72, 0.72], lr=0.01, bn="off")            # ref 0.637: 15% = 0.0956 -> 0.083 ok
    fake_group(tmp_path, [0.12, 0.20], lr=0.1, bn="on")              # ref 0.134: diff 0.026, within 0.03
    fake_group(tmp_path, [0.20, 0.30], lr=0.05, bn="on")             # ref 0.17: diff 0.08 > 0.03, 2 std 0.141
    fake_group(tmp_path, [0.40], lr=0.3, bn="off")                   # ref 0.268: diff 0.132 > 0.04
    table = verdicts(tmp_path)
    assert lenet_row(table, 0.01, "off")["verdict"] == "reproduced"
    assert lenet_row(table, 0.1, "on")["verdict"] == "reproduced"
    assert lenet_row(table, 0.05, "on")["verdict"] == "reproduced"
    assert lenet_row(table, 0.3, "off")["verdict"] == "not reproduced"


@pytest.mark.parametrize("losses,verdict", [
    ([CHANCE_10, CHANCE_10 - 0.01, CHANCE_10 + 0.015], "reproduced"),
    ([CHANCE_10, 0.3, 0.3], "partly reproduced: dead in 1 of 3 seeds"),
    ([0.26, 0.27], "not reproduced: all trained"),
    ([CHANCE_10, CHANCE_10], "not reproduced: all at chance so far")])
def test_dead_reference_compares_by_outcome(tmp_path, losses, verdict):
    alive = True if "at chance" in verdict else None   # at chance with active units: a slow start, not dead
    fake_group(tmp_path, losses, lr=0.5, bn="off", alive=alive)
    assert lenet_row(verdicts(tmp_path), 0.5, "off")["verdict"] == verdict


def test_reference_needs_full_data_and_the_exact_configuration(tmp_path):
    fake_group(tmp_path, [0.099], lr=0.5, bn="on", train_size=2000)      # subset: not the reference
    fake_group(tmp_path, [0.099], lr=0.5, bn="on", batch_size=256)       # other batch size
    fake_group(tmp_path, [0.099], lr=0.5, bn="on", config={"optim.momentum": 0.9})
    assert lenet_row(verdicts(tmp_path), 0.5, "on")["verdict"] == "no matching runs"


def test_torch_bn_groups_match_bn_on_references_too(tmp_path):
    fake_group(tmp_path, [0.1], lr=0.5, config={"norm.kind": "torch"})
    fake_group(tmp_path, [0.1], lr=0.5, config={"norm.kind": "bn"})
    rows = verdicts(tmp_path)
    rows = rows[(rows["label"] == "lr=0.5, bn=on") & (rows["metric"] == "train_loss")]
    assert len(rows) == 2 and set(rows["verdict"]) == {"reproduced"}


def test_epoch1_reference_reads_metrics_csv(tmp_path):
    fake_group(tmp_path, [0.64], lr=0.01, bn="off")       # fabricated epoch-1 loss ~2.06 (decay from ln 10)
    row = lenet_row(verdicts(tmp_path), 0.01, "off", metric="epoch1_train_loss")
    first = load_runs(tmp_path).epochs.query("epoch == 1")["train_loss"].iloc[0]
    assert row["mean"] == pytest.approx(first) and row["verdict"] == "reproduced"


def test_approximate_and_not_comparable_references(tmp_path):
    five = {"optim.name": "adam"}
    fake_group(tmp_path, [0.3, 0.3], config=five, lr=0.001, batch_size=64, epochs=5, bn="on", test_acc=0.895)
    fake_group(tmp_path, [0.4], config=five, lr=0.001, batch_size=64, epochs=5, bn="off", test_acc=0.80)
    table = verdicts(tmp_path)
    on = table[(table["set"].str.contains("5-epoch")) & (table["label"] == "bn=on")].iloc[0]
    off = table[(table["set"].str.contains("5-epoch")) & (table["label"] == "bn=off")].iloc[0]
    assert on["verdict"] == "reproduced (approximate match)" and on["diff"] == pytest.approx(0.0)
    assert off["verdict"] == "not reproduced (approximate match)"
    assert off["diff"] == pytest.approx(0.80 - 0.8592)                     # distance to the range
    d2l = table[table["source"] == "d2l"]  # comparable, but not run here
    assert len(d2l) == 9 and (d2l["verdict"] == "no matching runs").all()
    assert (d2l["command"] == "bnexp sweep --preset d2l_bn").all() and d2l["group"].isna().all()
    ioffe = table[table["source"] == "ioffe2015"]
    assert len(ioffe) and ioffe["verdict"].str.startswith("not comparable").all()


def test_d2l_reference_matches_its_three_arms(tmp_path):
    d2l = {"model.name": "lenet5_d2l", "model.activation": "sigmoid", "model.pool": "avg", "model.init": "xavier",
           "model.norm_position": "before"}
    common = dict(config=d2l, batch_size=256, epochs=10)
    fake_group(tmp_path, [0.27, 0.26, 0.268], **common, lr=1.0, bn="on",
               train_acc=0.90, test_acc=0.70, **{"norm.biased_running_var": True})
    fake_group(tmp_path, [0.28, 0.275, 0.277], **common, lr=1.0, bn="on", train_acc=0.897, test_acc=0.84,
               **{"norm.kind": "torch"})
    fake_group(tmp_path, [0.46, 0.45, 0.46], **common, lr=0.9, bn="off", train_acc=0.83, test_acc=0.81)
    fake_group(tmp_path, [0.3, 0.3], **common, lr=1.0, bn="off", train_acc=0.83, test_acc=0.81)  # no reference arm
    rows = verdicts(tmp_path)
    rows = rows[rows["source"] == "d2l"].set_index(["label", "metric"])
    assert rows["verdict"].to_dict() == {
        ("scratch BN", "train_loss"): "reproduced", ("scratch BN", "train_acc"): "reproduced",
        ("scratch BN", "test_acc"): "not reproduced",  # 0.70 vs 0.782
        ("nn.BatchNorm", "train_loss"): "reproduced", ("nn.BatchNorm", "train_acc"): "reproduced",
        ("nn.BatchNorm", "test_acc"): "reproduced",
        ("no BN (lr 0.9)", "train_loss"): "reproduced", ("no BN (lr 0.9)", "train_acc"): "reproduced",
        ("no BN (lr 0.9)", "test_acc"): "reproduced"}
    assert (rows["n"] == 3).all()


def test_alexnet_reference_matches_automatic_dropout(tmp_path):
    alex = {"model.name": "alexnet", "data.name": "cifar100", "optim.name": "adam"}
    fake_run(tmp_path, config=alex, bn="on", lr=0.001, batch_size=256, epochs=30, train_acc=0.9990, test_acc=0.59)
    fake_run(tmp_path, config={**alex, "model.dropout": 0.3}, bn="off", lr=0.001, batch_size=256, epochs=30)
    table = verdicts(tmp_path)
    alex_rows = table[table["set"].str.startswith("AlexNet")]
    assert alex_rows.set_index(["label", "metric"])["verdict"].to_dict() == {
        ("BN, no dropout", "train_acc"): "reproduced", ("BN, no dropout", "test_acc"): "reproduced",
        ("no BN, dropout 0.5", "train_acc"): "no matching runs", ("no BN, dropout 0.5", "test_acc"): "no matching runs"}
