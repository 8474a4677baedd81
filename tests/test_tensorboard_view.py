"""What TensorBoard itself shows for a sweep over bn, lr and seed (read with its own loaders and
its hparams plugin's backend, not by parsing event files): one run per run, the swept keys marked
`differs` and listed first, only keys that define a run, per-step curves in the first scalar
group, and one pre-activation histogram per layer where BN is off."""

import pytest
from tensorboard import context
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.data.provider import RunTagFilter as provider_filter
from tensorboard.plugins import base_plugin
from tensorboard.plugins.hparams import backend_context, metadata

from bnexp import layout as L
from bnexp import config as C
from bnexp import sweep as S
from bnexp.nn import functional as bn_functional

SWEEP = ["bn=on,off", "lr=0.05,0.5", "seed=0,1"]


@pytest.fixture(scope="module")
def logdir(synth_data_dir, tmp_path_factory):
    results = tmp_path_factory.mktemp("tbview") / "results"
    base = [f"data_dir={synth_data_dir}", f"results_dir={results}", "device=cpu", "train_size=256", "test_size=128",
            "batch_size=64", "epochs=1", "data.verify=false", "progress=false", "threads=1"]
    with bn_functional.use_backend("eager"):
        out = S.run_sweep(S.plan(base + SWEEP))
    assert [r.status for r in out.results] == [L.COMPLETED] * 8
    return results


@pytest.fixture(scope="module")
def tb(logdir):
    """TensorBoard's multiplexer and hparams backend over the logdir, as `tensorboard --logdir` builds them."""
    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    provider = data_provider.MultiplexerDataProvider(mux, str(logdir))
    tb_context = base_plugin.TBContext(logdir=str(logdir), multiplexer=mux, data_provider=provider)
    return mux, provider, backend_context.Context(tb_context)


def experiment(tb):
    _, _, hp = tb
    ctx = context.RequestContext()
    contents = hp.hparams_metadata(ctx, "")
    return hp.experiment_from_metadata(ctx, "", True, contents, hp.hparams_from_data_provider(ctx, "", None)), contents


def test_one_tensorboard_run_per_bnexp_run(logdir, tb):
    mux, _, _ = tb
    runs = sorted(mux.Runs())
    assert runs == sorted(f"runs/{p.name}" for p in (logdir / L.RUNS_DIR).iterdir())
    assert len(runs) == 8


def test_hparams_mark_the_swept_keys_and_hold_only_defining_keys(tb):
    exp, contents = experiment(tb)
    infos = {h.name: h.differs for h in exp.hparam_infos}
    assert {k for k, d in infos.items() if d} == {"lr", "seed", "norm.kind"}
    # the plugin sorts differing keys first: those are the default columns
    assert {h.name for h in exp.hparam_infos[:3]} == {"lr", "seed", "norm.kind"}
    assert not set(infos) & (set(C.NON_IDENTITY_KEYS) | set(C.NON_HPARAM_KEYS))
    assert {"batch_size", "epochs", "model.name", "optim.name"} <= set(infos)
    assert not any(metadata.EXPERIMENT_TAG in tags for tags in contents.values())  # inferred, so always current
    # every session is its own run with a readable, unique Trial ID that starts with what differs
    names = {}
    for run, tags in contents.items():
        start = metadata.parse_session_start_info_plugin_data(tags[metadata.SESSION_START_INFO_TAG])
        names[run] = start.group_name
    assert len(set(names.values())) == 8
    for run, name in names.items():
        kind = "bn" if "-bn-" in run else "none"
        lr = "0.05" if "-lr0.05-" in run else "0.5"
        seed = run.split("-e1-")[1][:2]
        assert name.startswith(f"{kind} lr{lr} {seed} bs64 | lenet5 fashion_mnist sgd e1 | "), (run, name)
        assert name.endswith(run.rsplit("-", 1)[1])
    # the metrics are the runs' own scalar tags (their last values): no single-point hparam/* copies
    tags = {m.name.tag for m in exp.metric_infos}
    assert {"epoch/test_acc", "epoch/test_loss", "batch/loss"} <= tags
    assert not [t for t in tags if t.startswith("hparam/")]


def test_the_per_step_curves_are_the_first_scalar_group(tb):
    _, provider, _ = tb
    ctx = context.RequestContext()
    scalars = provider.list_scalars(ctx, experiment_id="", plugin_name="scalars")
    assert len(scalars) == 8
    for run, tags in scalars.items():
        groups = sorted({t.split("/")[0] for t in tags})  # TensorBoard orders tag groups by name
        assert groups[0] == "batch", (run, groups)
        assert "hparam" not in groups
    # TIME SERIES shows every kind of tag, grouped and ordered the same way: the curves still come first
    hists = provider.list_tensors(ctx, experiment_id="", plugin_name="histograms")
    for run in scalars:
        groups = sorted({t.split("/")[0] for t in [*scalars[run], *hists[run]]})
        assert groups[0] == "batch", (run, groups)
    loss = provider.read_scalars(ctx, experiment_id="", plugin_name="scalars", downsample=100,
                                 run_tag_filter=provider_filter(tags=["batch/loss"]))
    assert {len(by_tag["batch/loss"]) for by_tag in loss.values()} == {4}  # 256 / 64 steps, one epoch


def test_no_bn_runs_show_each_pre_activation_once(tb):
    _, provider, _ = tb
    hist = provider.list_tensors(context.RequestContext(), experiment_id="", plugin_name="histograms")
    assert len(hist) == 8
    for run, tags in hist.items():
        layers = {t.split("/")[1] for t in tags}
        assert layers and all(t.startswith("probe/") for t in tags)
        if "-none-" in run:
            assert set(tags) == {f"probe/{layer}/pre-activation" for layer in layers}, run
        else:
            assert set(tags) == {f"probe/{layer}/{w}" for layer in layers for w in ("input", "output")}, run
