"""The instruments (bnexp/measure.py) on toy problems with known answers, their config, and the
no-side-effect contract: a run with every instrument trains exactly like the same run without."""

import copy
import csv
import math
import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from bnexp import layout
from bnexp import config as C
from bnexp import engine, measure as M, measures_format as MF, train as T
from bnexp.cli import main
from bnexp.errors import BnexpError
from test_reproducible import DIE_HOOK

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
FP32 = engine.ExecOptions("fp32", False, "off")


def meter(model, optimizer, names, multiples=(0.5, 1.0, 2.0), lr=0.1, probe_x=None, kind="none", loss_fn=None):
    kw = {} if loss_fn is None else {"loss_fn": loss_fn}
    return M.Measurer(model, optimizer, tuple(names), tuple(multiples), lr, FP32, CPU, probe_x, kind, **kw)


def values(rows) -> dict:
    return {(inst, layer, stat): v for _, inst, layer, stat, v in rows}


def half_squares(out, y):
    return 0.5 * ((out - y) ** 2).sum()


# ----------------------------------------------------------------------------- known answers

def _quadratic(x):
    """L(W) = 0.5 sum_i ||W x_i - y_i||^2: exactly quadratic, Hessian H D = D X^T X (rows of x: samples)."""
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(fc=nn.Linear(x.shape[1], 3, bias=False)))
    y = torch.randn(x.shape[0], 3)
    g = (model(x) - y).T @ x  # dL/dW
    return model, y, g.detach()


def test_beta_smoothness_on_a_quadratic_is_the_curvature_along_g():
    torch.manual_seed(1)
    x = torch.randn(16, 5)
    model, y, g = _quadratic(x)
    lr, grid = 0.01, (0.5, 1.0, 2.0)
    m = meter(model, torch.optim.SGD(model.parameters(), lr=lr), M.GRID_INSTRUMENTS, grid, lr, loss_fn=half_squares)
    v = values(m.measure(0, x, y))
    hg = g @ (x.T @ x)  # H g: the gradient changes by -eta H g along the step
    curvature = float(hg.norm() / g.norm())
    assert v[("beta_smoothness", "model", "max")] == pytest.approx(curvature, rel=1e-4)
    assert v[("predictiveness", "model", "min")] == pytest.approx(0.5 * lr * float(hg.norm()), rel=1e-4)
    assert v[("predictiveness", "model", "max")] == pytest.approx(2.0 * lr * float(hg.norm()), rel=1e-4)
    loss = float(half_squares(model(x), y).detach())
    ghg, gg = float((g * hg).sum()), float((g * g).sum())
    along = [loss - m_ * lr * gg + 0.5 * (m_ * lr) ** 2 * ghg for m_ in grid]  # exact for a quadratic
    assert v[("landscape", "model", "min")] == pytest.approx(min(along), rel=1e-4)
    assert v[("landscape", "model", "max")] == pytest.approx(max(along), rel=1e-4)
    # ||Hg|| / ||g|| >= g^T H g / g^T g, with equality where g is an eigenvector of H
    assert curvature >= ghg / gg


def test_beta_smoothness_is_g_h_g_over_g_g_when_the_curvature_is_isotropic():
    x = 3.0 * torch.eye(5)  # X^T X = 9 I: every direction has curvature 9
    model, y, g = _quadratic(x)
    m = meter(model, torch.optim.SGD(model.parameters(), lr=0.01), ["beta_smoothness"], lr=0.01, loss_fn=half_squares)
    hg = g @ (x.T @ x)
    assert values(m.measure(0, x, y))[("beta_smoothness", "model", "max")] == pytest.approx(
        float((g * hg).sum() / (g * g).sum()), rel=1e-5)
    assert float((g * hg).sum() / (g * g).sum()) == pytest.approx(9.0, rel=1e-5)


def _mlp(norm=True, dropout=0.0):
    torch.manual_seed(0)
    blocks = []
    for i, (a, b) in enumerate(((8, 6), (6, 5)), start=1):
        parts = [("linear", nn.Linear(a, b))] + ([("norm", nn.BatchNorm1d(b))] if norm else []) + [("act", nn.ReLU())]
        parts += [("dropout", nn.Dropout(dropout))] if dropout else []
        blocks.append((f"fc{i}", nn.Sequential(OrderedDict(parts))))
    return nn.Sequential(OrderedDict(blocks + [("fc3", nn.Linear(5, 3))]))


def test_landscape_at_step_zero_is_the_batch_loss():
    model = _mlp(dropout=0.5)
    torch.manual_seed(3)
    x, y = torch.randn(10, 8), torch.randint(0, 3, (10,))
    m = meter(model, torch.optim.SGD(model.parameters(), lr=0.1), ["landscape"], multiples=(0.0,))
    state = torch.get_rng_state()
    v = values(m.measure(0, x, y))
    assert torch.equal(torch.get_rng_state(), state)  # the random stream is where it was
    expected = float(nn.functional.cross_entropy(model(x), y).detach())  # the same dropout draw: the same RNG state
    assert v[("landscape", "model", "min")] == v[("landscape", "model", "max")] == v[("landscape", "model", "loss")]
    assert v[("landscape", "model", "loss")] == pytest.approx(expected, abs=0, rel=0)


@pytest.mark.parametrize("opt", ["sgd", "momentum", "adam"])
def test_ics_is_zero_for_the_first_layer_and_after_frozen_earlier_layers(opt):
    model = _mlp()
    torch.manual_seed(4)
    x, y = torch.randn(12, 8), torch.randint(0, 3, (12,))
    last = list(model.fc3.parameters())
    earlier = [p for n, p in model.named_parameters() if not n.startswith("fc3.")]

    def make(lr_earlier):
        groups = [{"params": earlier, "lr": lr_earlier}, {"params": last, "lr": 0.1}]
        if opt == "adam":
            return torch.optim.Adam(groups, lr=0.1, weight_decay=1e-3)
        return torch.optim.SGD(groups, lr=0.1, momentum=0.9 if opt == "momentum" else 0.0, weight_decay=1e-3)

    v = values(meter(model, make(0.1), ["ics"]).measure(0, x, y))
    assert v[("ics", "fc1.linear", "l2")] == 0.0 and v[("ics", "fc1.linear", "cos")] == pytest.approx(1.0, abs=1e-12)
    assert v[("ics", "fc2.linear", "l2")] > 0 and v[("ics", "fc3", "l2")] > 0  # the earlier layers moved
    assert v[("ics", "fc3", "cos")] < 1
    frozen = values(meter(model, make(0.0), ["ics"]).measure(0, x, y))
    assert all(frozen[("ics", layer, "l2")] == 0.0 for layer in ("fc1.linear", "fc2.linear", "fc3"))


@pytest.mark.parametrize("opt", ["momentum", "adam"])
def test_ics_uses_the_optimisers_real_next_update(opt):
    """Measurer.updated (on copies) is the update the live optimiser then makes, state and all."""
    model = _mlp()
    make = {"momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4),
            "adam": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=5e-4)}[opt]
    optimizer = make(model.parameters())
    torch.manual_seed(5)
    x, y = torch.randn(12, 8), torch.randint(0, 3, (12,))
    for _ in range(3):  # build momentum / moment estimates
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    m = meter(model, optimizer, ["ics"])
    theta = {n: p.detach() for n, p in model.named_parameters()}
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    g = {n: p.grad.clone() for n, p in model.named_parameters()}
    before = copy.deepcopy(optimizer.state_dict())
    predicted = {n: t.clone() for n, t in m.updated(theta, g).items()}
    after = optimizer.state_dict()
    for key, st in before["state"].items():  # the live optimiser's state is untouched
        for name, t in st.items():
            assert torch.equal(t, after["state"][key][name]), name
    optimizer.step()
    for n, p in model.named_parameters():
        assert torch.equal(predicted[n], p.detach()), n


def test_saturation_fractions_on_a_constructed_input():
    z = torch.tensor([[-5.0, -4.0, -3.0, 0.0, 3.0, 4.5]])
    sig = nn.Sequential(OrderedDict(act=nn.Sigmoid()))
    v = values(meter(sig, None, ["saturation"], probe_x=z).measure(0, z, None))
    assert v[("saturation", "act", "saturated")] == pytest.approx(2 / 6)  # |z| > 4: -5 and 4.5
    by_hand = sum(math.exp(-t) / (1 + math.exp(-t)) ** 2 for t in z[0].tolist()) / 6
    assert v[("saturation", "act", "mean_derivative")] == pytest.approx(by_hand, rel=1e-6)
    tanh = nn.Sequential(OrderedDict(act=nn.Tanh()))
    v = values(meter(tanh, None, ["saturation"], probe_x=z / 2).measure(0, z, None))
    assert v[("saturation", "act", "saturated")] == pytest.approx(2 / 6)  # |z| > 2: the same points, halved
    assert v[("saturation", "act", "mean_derivative")] == pytest.approx(
        sum(1 - math.tanh(t / 2) ** 2 for t in z[0].tolist()) / 6, rel=1e-6)
    # sigmoid'(4) and tanh'(2): the same 7.1% of the maximum
    assert 0.0177 / 0.25 == pytest.approx(0.0707, rel=0.01)
    relu = nn.Sequential(OrderedDict(act=nn.ReLU()))
    probe = torch.tensor([[-1.0, 2.0, 0.0, 1.0], [-2.0, -1.0, 0.0, 3.0], [0.0, 1.0, 0.0, -1.0]])
    v = values(meter(relu, None, ["saturation"], probe_x=probe).measure(0, probe, None))
    assert v[("saturation", "act", "dead")] == pytest.approx(2 / 4)  # columns 0 and 2 never fire
    assert v[("saturation", "act", "active")] == pytest.approx(4 / 12)  # 2 + 1 + 1 positive entries


def test_weights_and_the_effective_step_by_hand():
    model = _mlp()
    torch.manual_seed(6)
    x, y = torch.randn(12, 8), torch.randint(0, 3, (12,))
    lr = 0.2
    v = values(meter(model, torch.optim.SGD(model.parameters(), lr=lr), ["weights"], lr=lr, kind="bn").measure(0, x, y))
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    for layer, module in (("fc1.linear", model.fc1.linear), ("fc2.linear", model.fc2.linear), ("fc3", model.fc3)):
        w, gw = float(module.weight.detach().norm()), float(module.weight.grad.norm())
        assert v[("weights", layer, "weight_norm")] == pytest.approx(w, rel=1e-6)
        assert v[("weights", layer, "grad_norm")] == pytest.approx(gw, rel=1e-5)
        if layer != "fc3":
            assert v[("weights", layer, "effective_step")] == pytest.approx(lr * gw / w, rel=1e-5)
    assert ("weights", "fc3", "effective_step") not in v  # no norm after the output layer
    # why fc1.linear counts as scale-invariant: BN(c W x + b) = BN(W x), so the loss ignores ||W||
    before = float(nn.functional.cross_entropy(model(x), y).detach())
    with torch.no_grad():
        model.fc1.linear.weight.mul_(3.0)
    assert float(nn.functional.cross_entropy(model(x), y).detach()) == pytest.approx(before, rel=1e-4)


def test_which_weights_are_scale_invariant():
    from bnexp import models

    lenet = models.build_model("lenet5", "bn", 10, 1, 28)
    assert M.scale_invariant(lenet, "bn") == {"conv1.conv", "conv2.conv", "fc1.linear", "fc2.linear"}
    assert M.scale_invariant(lenet, "gn") == set() and M.scale_invariant(lenet, "brn") == set()
    after = models.build_model("lenet5", "bn", 10, 1, 28, arch=models.Arch(norm_position="after"))
    assert M.scale_invariant(after, "bn") == set()  # the nonlinearity sits between weight and norm


def test_an_instrument_that_does_not_apply_is_refused():
    gelu = nn.Sequential(OrderedDict(fc=nn.Linear(4, 3), act=nn.GELU()))
    with pytest.raises(BnexpError, match="measure: saturation is defined for sigmoid, tanh and relu, not for GELU"):
        M.check(gelu, ["saturation"])
    with pytest.raises(BnexpError, match="measure: ics and weights need conv or linear layers"):
        M.check(nn.Sequential(nn.ReLU()), ["ics"])
    with pytest.raises(BnexpError, match="saturation needs a nonlinearity"):
        M.check(nn.Sequential(nn.Linear(2, 2)), ["saturation"])
    M.check(gelu, ["landscape", "weights"])  # these apply to it


# ----------------------------------------------------------------------------- config

def test_instrument_names_match_and_keys_validate():
    assert C.INSTRUMENTS == M.INSTRUMENTS == MF.INSTRUMENTS
    cfg = C.compose(["measure=all"])
    assert list(cfg.measure) == list(M.INSTRUMENTS) and list(cfg.measure_steps) == [0.5, 1.0, 2.0, 4.0]
    assert list(C.compose(["measure=ics"]).measure) == ["ics"]
    assert list(C.compose(["measure_steps=[1,3]", "measure=all"]).measure_steps) == [1.0, 3.0]
    # off: no identity change whatever the other two say; on: a different run
    base = C.run_id(C.compose([]))
    assert C.run_id(C.compose(["measure=[]", "measure_every=7", "measure_steps=[2]"])) == base
    on = C.run_id(C.compose(["measure=all"]))
    assert on != base
    assert C.run_id(C.compose([f"measure=[{','.join(reversed(M.INSTRUMENTS))}]"])) != base
    assert C.run_id(C.compose(["measure=all", "measure_every=7"])) != on
    assert C.hparams(C.compose(["measure=[ics,weights]"]))["measure"] == "[ics,weights]"


@pytest.mark.parametrize("override,msg", [
    ("measure=[landscape,hessian]", "measure: unknown instrument 'hessian'"),
    ("measure=[ics,ics]", "measure: 'ics' is listed twice"),
    ("measure_every=0", "measure_every must be a positive integer"),
    ("measure_every=-5", "measure_every must be a positive integer"),
    ("measure_steps=[]", "measure_steps must be a non-empty list of positive numbers"),
    ("measure_steps=[0.5,0]", "measure_steps must be a non-empty list of positive numbers"),
    ("measure_steps=[-1]", "measure_steps must be a non-empty list of positive numbers"),
    ("measure_steps=[a]", "measure_steps must be a non-empty list of positive numbers"),
])
def test_bad_measure_input_is_one_line_exit_2_before_any_run(capsys, tmp_path, override, msg):
    assert main(["train", override, "measure=all" if not override.startswith("measure=") else "epochs=1",
                 f"results_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1
    assert not (tmp_path / layout.RUNS_DIR).exists()


# ----------------------------------------------------------------------------- no side effects

def _args(synth_data_dir, results, *extra):
    return C.compose([f"data_dir={synth_data_dir}", f"results_dir={results}", "device=cpu", "progress=false",
                      "data.verify=false", "norm.backend=eager", "epochs=2", "batch_size=32", "train_size=128",
                      "test_size=64", "probe_every=1", *extra])


def _record(run: Path) -> tuple[str, str]:
    metrics = "".join(line.rsplit(",", 1)[0] + "\n" for line in (run / layout.METRICS).read_text().splitlines())
    return metrics, (run / layout.STEPS).read_text()


def _same_state(a: Path, b: Path) -> None:
    """The checkpoints hold the same model (running statistics, num_batches_tracked), optimiser and RNG."""
    ca, cb = (torch.load(p / layout.CHECKPOINT, weights_only=False) for p in (a, b))
    for k, v in ca["model"].items():
        assert torch.equal(v, cb["model"][k]), k
    for key, st in ca["optimizer"]["state"].items():
        for name, t in st.items():
            assert torch.equal(torch.as_tensor(t), torch.as_tensor(cb["optimizer"]["state"][key][name])), name
    assert torch.equal(ca["rng"]["cpu"], cb["rng"]["cpu"])


MATRIX = [
    ("lenet5 bn sgd-momentum wd", ["norm=bn", "optim.momentum=0.9", "optim.weight_decay=5e-4"]),
    ("lenet5 noisy adam", ["norm=noisy", "optim=adam", "lr=0.01"]),
    ("alexnet_cifar none dropout", ["model=alexnet_cifar", "data=cifar100", "bn=off", "train_size=100",
                                    "batch_size=25", "test_size=32"]),
    ("mlp_ioffe ghost sigmoid bf16", ["model=mlp_ioffe", "norm=ghost", "norm.ghost_size=8", "precision=bf16"]),
    ("lenet5_d2l gn tanh channels_last", ["model=lenet5_d2l", "norm=gn", "model.activation=tanh",
                                          "channels_last=true"]),
    ("lenet5 brn", ["norm=brn", "norm.warmup_steps=2", "norm.r_max_steps=4", "norm.d_max_steps=4"]),
    ("lenet5 torch momentum-null", ["norm=torch", "norm.momentum=null"]),
    ("lenet5 ln", ["norm=ln"]),
    ("lenet5 bn sigmoid after", ["model.activation=sigmoid", "model.norm_position=after"]),
]


@pytest.mark.parametrize("name,extra", MATRIX, ids=[m[0] for m in MATRIX])
def test_a_run_with_every_instrument_trains_exactly_like_one_without(synth_data_dir, tmp_path, name, extra):
    off = T.run(_args(synth_data_dir, tmp_path / "off", *extra))
    on = T.run(_args(synth_data_dir, tmp_path / "on", *extra, "measure=all", "measure_every=3"))
    assert off.status == on.status == layout.COMPLETED and off.run_id != on.run_id
    assert _record(off.path) == _record(on.path)
    _same_state(off.path, on.path)
    rows = list(csv.DictReader(open(on.path / layout.MEASURES)))
    steps_per_epoch = len((on.path / layout.STEPS).read_text().splitlines()) // 2  # header + 2 epochs
    total = 2 * steps_per_epoch
    measured = sorted({int(r["step"]) for r in rows})
    assert measured == [s for s in range(0, total, 3)]  # step 0, every 3rd, none after the last step
    assert {r["instrument"] for r in rows} == set(M.INSTRUMENTS)
    assert all(math.isfinite(float(r["value"])) for r in rows if r["statistic"] != "cos")


def test_the_step_zero_loss_is_the_first_training_steps_loss(synth_data_dir, tmp_path):
    r = T.run(_args(synth_data_dir, tmp_path, "measure=[landscape]", "norm=noisy"))
    rows = list(csv.DictReader(open(r.path / layout.MEASURES)))
    loss0 = next(float(x["value"]) for x in rows if x["step"] == "0" and x["statistic"] == "loss")
    step1 = next(csv.DictReader(open(r.path / layout.STEPS)))
    assert f"{loss0:.6g}" == step1["loss"]  # same batch, same noise draws, same parameters
    assert {x["statistic"] for x in rows} == {"min", "max", "loss"}


def test_measurements_reach_run_json_and_tensorboard(synth_data_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    r = T.run(_args(synth_data_dir, tmp_path, "measure=[weights,ics]", "measure_every=2"))
    import json

    sec = json.loads((r.path / layout.INFO).read_text())["seconds"]
    assert sec["measures"] > 0 and sec["train"] + sec["eval"] + sec["probes"] + sec["measures"] <= sec["total"]
    acc = EventAccumulator(str(r.path), size_guidance={"scalars": 0}).Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"measure/ics/conv2.conv/cos", "measure/weights/fc1.linear/effective_step"} <= tags
    assert [e.step for e in acc.Scalars("measure/weights/fc3/grad_norm")] == [0, 2, 4, 6]
    off = T.run(_args(synth_data_dir, tmp_path / "off"))
    assert "measures" not in json.loads((off.path / layout.INFO).read_text())["seconds"]
    assert not (off.path / layout.MEASURES).exists()


def test_a_crash_leaves_the_measurements_of_the_checkpointed_epochs(synth_data_dir, tmp_path, monkeypatch):
    real = T._epoch_evaluation

    def crash_in_epoch_2(s, cfg, state, step):
        if state.epoch == 1:  # epoch 2 trained (and measured), not yet checkpointed
            raise RuntimeError("simulated crash")
        return real(s, cfg, state, step)

    monkeypatch.setattr(T, "_epoch_evaluation", crash_in_epoch_2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        T.run(_args(synth_data_dir, tmp_path, "measure=[weights]", "measure_every=3"))
    [run] = (tmp_path / layout.RUNS_DIR).iterdir()
    steps = {int(r["step"]) for r in csv.DictReader(open(run / layout.MEASURES))}
    assert steps == {0, 3}  # epoch 1 is steps 1-4: its measurements are at 0 and 3, epoch 2's (6) are gone


def test_a_diverging_run_records_its_measurements_up_to_the_divergence(synth_data_dir, tmp_path):
    r = T.run(_args(synth_data_dir, tmp_path, "bn=off", "lr=1e4", "measure=all", "measure_every=1"))
    assert r.status == layout.DIVERGED
    last = r.extra["diverged_at"]["step"]
    steps = sorted({int(x["step"]) for x in csv.DictReader(open(r.path / layout.MEASURES))})
    assert steps == list(range(0, last + 1))  # the step with the first non-finite loss is measured too, none after


def test_kill_9_and_rerun_resumes_to_identical_files(synth_data_dir, tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(DIE_HOOK)
    env = {**os.environ, "BNEXP_BN_BACKEND": "eager", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(hook), str(REPO), os.environ.get("PYTHONPATH", "")])}
    args = [f"data_dir={synth_data_dir}", "device=cpu", "progress=false", "data.verify=false", "epochs=2",
            "batch_size=32", "train_size=128", "test_size=64", "norm=noisy", "optim.momentum=0.9", "threads=1",
            "measure=all", "measure_every=3"]

    def bnexp(results, die=None):
        e = {**env, **({"BNEXP_TEST_DIE_AFTER_EPOCH": str(die)} if die else {})}
        p = subprocess.run([sys.executable, "-m", "bnexp", "train", *args, f"results_dir={results}"], cwd=REPO,
                           env=e, capture_output=True, text=True, timeout=600)
        assert p.returncode == (9 if die else 0), p.stderr
        [run] = (results / layout.RUNS_DIR).iterdir()
        return run

    whole = bnexp(tmp_path / "whole")
    killed = bnexp(tmp_path / "killed", die=1)
    # killed right after epoch 1's checkpoint, before its files: epoch 1's rows live in the checkpoint only
    assert not (killed / layout.MEASURES).exists()
    resumed = bnexp(tmp_path / "killed")
    assert _record(resumed) == _record(whole)
    assert (resumed / layout.MEASURES).read_text() == (whole / layout.MEASURES).read_text()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("extra", [["norm=noisy", "optim=adam", "lr=0.01"], ["norm=bn", "precision=bf16"]])
def test_on_cuda_with_graphs_the_instruments_change_nothing(synth_data_dir, tmp_path, extra):
    """The measurements run between graph replays: the captured step's static tensors are never touched."""
    def go(name, *more):
        return T.run(_args(synth_data_dir, tmp_path / name, *extra, "device=cuda", "cuda_graphs=on", *more))

    off, again = go("off"), go("again")
    if _record(off.path) != _record(again.path):
        pytest.skip("this GPU's kernels are not run-to-run deterministic: nothing to compare against")
    on = go("on", "measure=all", "measure_every=3")
    assert _record(off.path) == _record(on.path)
    rows = list(csv.DictReader(open(on.path / layout.MEASURES)))
    assert {r["instrument"] for r in rows} == set(M.INSTRUMENTS)
