"""A run's numbers depend on its config and the machine, never on how it was launched (execution.py).

The same config is trained by `bnexp train`, `bnexp sweep --jobs 1` and `bnexp sweep --jobs 2`, and
killed under one and resumed under another: metrics.csv (bar its wall-clock `seconds` column) and
steps.csv must be byte-identical. `threads=2` is set explicitly: the old sweep gave each of its two
workers cores // 2 = 1 thread, which changed the numbers under the same run id.
"""

import hashlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from bnexp import layout as L
from bnexp import config as C
from bnexp import execution, train as T
from bnexp.nn import dispatch
from bnexp.nn import functional as bn_functional

REPO = Path(__file__).resolve().parents[1]

# Put on PYTHONPATH as sitecustomize.py: every bnexp process (spawned sweep workers too) dies as
# kill -9 would (no finally blocks, no buffered writes) right after the checkpoint of epoch
# $BNEXP_TEST_DIE_AFTER_EPOCH of the run with seed $BNEXP_TEST_DIE_SEED.
DIE_HOOK = """
import os
if os.environ.get("BNEXP_TEST_DIE_AFTER_EPOCH"):
    import bnexp.train as T
    _epoch, _seed = int(os.environ["BNEXP_TEST_DIE_AFTER_EPOCH"]), int(os.environ.get("BNEXP_TEST_DIE_SEED", "0"))
    _orig = T._checkpoint
    def _checkpoint(rd, s, cfg, state):
        _orig(rd, s, cfg, state)
        if state.epoch == _epoch and cfg.seed == _seed:
            os._exit(9)
    T._checkpoint = _checkpoint
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory, synth_data_dir):
    hook = tmp_path_factory.mktemp("hook")
    (hook / "sitecustomize.py").write_text(DIE_HOOK)
    args = [f"data_dir={synth_data_dir}", "device=cpu", "train_size=256", "test_size=128", "batch_size=32",
            "epochs=3", "data.verify=false", "progress=false", "threads=2", "lr=0.2", "bn=on"]
    env = {**os.environ, "BNEXP_BN_BACKEND": "eager", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(hook), str(REPO), os.environ.get("PYTHONPATH", "")])}
    return args, env


def bnexp(env, *args, die_after=None, check=True):
    env = {**env, **({"BNEXP_TEST_DIE_AFTER_EPOCH": str(die_after)} if die_after else {})}
    proc = subprocess.run([sys.executable, "-m", "bnexp", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == (9 if die_after else 0), proc.stdout + proc.stderr
    return proc


def seed0_run(results: Path) -> Path:
    [run] = [p for p in (results / L.RUNS_DIR).iterdir() if "-s0-" in p.name]
    return run


def record(run: Path) -> tuple[str, str]:
    """metrics.csv without its wall-clock column, and steps.csv: what must be byte-identical."""
    metrics = "".join(line.rsplit(",", 1)[0] + "\n" for line in (run / L.METRICS).read_text().splitlines())
    assert metrics.startswith("epoch,train_loss,train_acc,test_loss,test_acc,lr\n")
    return metrics, (run / L.STEPS).read_text()


@pytest.mark.slow
def test_train_sweep_jobs_1_and_2_and_resumes_across_them_give_identical_numbers(setup, tmp_path):
    args, env = setup
    bnexp(env, "train", *args, f"results_dir={tmp_path / 'train'}")
    reference = record(seed0_run(tmp_path / "train"))
    info = json.loads((seed0_run(tmp_path / "train") / L.INFO).read_text())
    assert info["execution"]["threads"] == 2 and info["execution"]["bn_backend"] == "eager"

    bnexp(env, "sweep", "--jobs", 1, *args, f"results_dir={tmp_path / 'jobs1'}")
    assert record(seed0_run(tmp_path / "jobs1")) == reference
    bnexp(env, "sweep", "--jobs", 2, *args, "seed=0,1", f"results_dir={tmp_path / 'jobs2'}")
    assert record(seed0_run(tmp_path / "jobs2")) == reference

    # killed under `bnexp train` after epoch 1, resumed by a two-worker sweep
    bnexp(env, "train", *args, f"results_dir={tmp_path / 'k1'}", die_after=1)
    out = bnexp(env, "sweep", "--jobs", 2, *args, "seed=0,1", f"results_dir={tmp_path / 'k1'}").stdout
    assert "resumed after epoch 1" in out
    assert record(seed0_run(tmp_path / "k1")) == reference

    # the seed-0 worker of a two-worker sweep killed after epoch 2, resumed by `bnexp train`
    bnexp(env, "sweep", "--jobs", 2, *args, "seed=0,1", f"results_dir={tmp_path / 'k2'}", die_after=2, check=False)
    run = seed0_run(tmp_path / "k2")
    assert json.loads((run / L.INFO).read_text())["status"] != L.COMPLETED
    out = bnexp(env, "train", *args, f"results_dir={tmp_path / 'k2'}").stdout
    assert "resumed after epoch 2" in out
    assert record(run) == reference


@pytest.mark.slow
def test_a_resume_under_other_execution_settings_is_refused_and_touches_nothing(setup, tmp_path):
    args, env = setup
    results = tmp_path / "r"
    bnexp(env, "train", *args, f"results_dir={results}", die_after=1)
    run = seed0_run(results)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != L.LOCK}
    refused = bnexp(env, "train", *[a for a in args if a != "threads=2"], "threads=1", f"results_dir={results}",
                    check=False)
    assert refused.returncode == 2
    [line] = refused.stderr.strip().splitlines()
    assert "threads 2 then, 1 now" in line and "rerun with threads=2 to resume it" in line and "--force" in line
    # (.lock names whoever held the run last: the refused attempt did, while it checked)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != L.LOCK} == before
    # the same through a sweep: that run fails with the reason, the others are trained, run.json is kept
    swept = bnexp(env, "sweep", *[a for a in args if a != "threads=2"], "threads=1", "seed=0,1",
                  f"results_dir={results}", check=False)
    assert swept.returncode == 1 and "execution settings" in swept.stdout
    assert (run / L.INFO).read_bytes() == before[L.INFO]
    resumed = bnexp(env, "train", *args, f"results_dir={results}")
    assert "resumed after epoch 1" in resumed.stdout


def test_mismatch_names_every_difference_and_how_to_resume():
    saved = {k: None for k in execution.COMPARED} | {"threads": 4, "bn_backend": "compiled", "torch": "2.14.1"}
    assert execution.mismatch("r", saved, dict(saved)) is None
    err = execution.mismatch("r", saved, saved | {"threads": 2, "bn_backend": "eager"})
    assert "threads 4 then, 2 now" in str(err) and "bn_backend 'compiled' then, 'eager' now" in str(err)
    assert "rerun with threads=4 norm.backend=compiled to resume it" in str(err)
    err = execution.mismatch("r", saved, saved | {"torch": "2.15.0"})  # no key brings an old torch back
    assert "torch '2.14.1' then, '2.15.0' now" in str(err) and "to resume it" not in str(err)
    assert "older bnexp" in str(execution.mismatch("r", None, saved))


def test_threads_auto_follows_omp_num_threads_else_the_cores(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert execution.resolve_threads("auto") == 3 and execution.resolve_threads(5) == 5
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert execution.resolve_threads("auto") == execution.cpu_cores()


def test_threads_and_backend_are_config_keys_outside_the_run_id():
    base = C.compose([])
    assert base.threads == "auto"
    for extra in (["threads=3"], ["norm.backend=eager"], ["threads=1", "norm.backend=compiled"]):
        cfg = C.compose(extra)
        assert C.run_id(cfg) == C.run_id(base)
    assert C.compose(["threads=3"]).threads == 3


@pytest.mark.parametrize("override, message", [("threads=0", "threads must be auto or a positive integer"),
                                               ("norm.backend=fast", "norm.backend must be auto or compiled")])
def test_bad_execution_keys(override, message):
    from bnexp.errors import BnexpError

    with pytest.raises(BnexpError, match=message):
        C.compose([override])


def _cfg(synth_data_dir, tmp_path, *extra):
    return C.compose([f"data_dir={synth_data_dir}", f"results_dir={tmp_path}", "device=cpu", "train_size=128",
                      "test_size=64", "batch_size=32", "epochs=2", "data.verify=false", "progress=false", *extra])


def test_auto_falls_back_before_the_first_step_and_is_then_pinned(synth_data_dir, tmp_path, monkeypatch):
    """A compilation failure under `auto` is found on a copy of the model in prepare(), so the whole run is
    eager and says so; the model, its running statistics and the random stream are untouched."""
    def broken(*a, **k):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(dispatch, "_compile", broken)
    monkeypatch.setattr(dispatch, "_compiled", {})  # kernels compiled by earlier tests would be reused
    monkeypatch.setattr(dispatch, "_compile_broken", {})
    cfg = _cfg(synth_data_dir, tmp_path, "norm.backend=auto", "model=alexnet_cifar", "data=cifar100", "model.dropout=0.5")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = T.prepare(cfg)
    rng = torch.get_rng_state()
    assert any("compilation failed" in str(w.message) for w in caught)
    assert s.bn_backend == "eager" and s.execution["bn_backend"] == "eager"
    plain = T.prepare(_cfg(synth_data_dir, tmp_path, "norm.backend=eager", "model=alexnet_cifar", "data=cifar100", "model.dropout=0.5"))  # no warm-up
    assert torch.equal(rng, torch.get_rng_state())  # the warm-up's dropout drew from a forked stream
    fresh = plain.model.state_dict()
    assert all(torch.equal(v, fresh[k]) for k, v in s.model.state_dict().items())  # running stats included
    result = T.run(cfg)
    info = json.loads((result.path / L.INFO).read_text())
    assert result.status == L.COMPLETED and info["execution"]["bn_backend"] == "eager"


def test_a_pinned_backend_never_falls_back_mid_run(synth_data_dir, tmp_path, monkeypatch):
    """Once pinned to `compiled`, a kernel that fails later fails the run (recorded) instead of silently
    switching to eager for the rest of it."""
    cfg = _cfg(synth_data_dir, tmp_path, "norm.backend=auto")
    monkeypatch.setattr(dispatch, "_compile_broken", {})
    monkeypatch.setattr(execution, "pin_bn_backend", lambda *a, **k: "compiled")

    def broken(*a, **k):
        raise RuntimeError("kernel failed at step 3")

    monkeypatch.setattr(dispatch, "_compiled_call", broken)
    with pytest.raises(RuntimeError, match="kernel failed"):
        T.run(cfg)
    info = json.loads(next((tmp_path / L.RUNS_DIR).glob("*/run.json")).read_text())
    assert info["status"] == L.FAILED and info["execution"]["bn_backend"] == "compiled"


def test_run_restores_the_callers_thread_count_and_backend(synth_data_dir, tmp_path):
    before = torch.get_num_threads(), bn_functional.get_backend()
    T.run(_cfg(synth_data_dir, tmp_path, "threads=2", "norm.backend=eager", "epochs=1"))
    assert (torch.get_num_threads(), bn_functional.get_backend()) == before


# The run id and first epoch of a small fixed config, as this version of bnexp computes them: a refactor
# of the config, the loop or the writers must leave both unchanged (a deliberate change updates them here).
PINNED_ARGS = ["device=cpu", "train_size=256", "test_size=128", "batch_size=32", "epochs=1", "data.verify=false",
               "progress=false", "threads=1", "lr=0.2", "bn=on", "norm.backend=eager"]
PINNED_RUN_ID = "lenet5-fashion_mnist-bn-sgd-lr0.2-bs32-e1-s0-f1e48a3317"
PINNED_EPOCH1 = "1,0.799982,0.871094,2.175472,0.367188,0.2"  # metrics.csv's row without its seconds
PINNED_STEPS_SHA256 = "ec4683b3d987b7037812398944c9a82ffa048a9663db0c725a23b93c6d744d2e"  # steps.csv, the epoch's 8 losses


def test_a_fixed_config_keeps_its_run_id_and_first_epoch(synth_data_dir, tmp_path):
    cfg = C.compose([f"data_dir={synth_data_dir}", f"results_dir={tmp_path}", *PINNED_ARGS])
    result = T.run(cfg)
    metrics, steps = record(result.path)
    assert result.run_id == PINNED_RUN_ID
    assert metrics.splitlines()[1] == PINNED_EPOCH1
    assert hashlib.sha256(steps.encode()).hexdigest() == PINNED_STEPS_SHA256
