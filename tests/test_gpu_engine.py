"""CUDA-graph training on a real GPU: the captured step follows the eager trajectory, in fp32 and
bf16, contiguous and channels_last, SGD and Adam. Skipped without CUDA (CI has none); the same
capture/restore logic runs on CPU with a stand-in graph in test_engine.py."""

import pytest
import torch

from bnexp import layout as L
from bnexp import config, engine, train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def setup(data_dir, *overrides):
    cfg = config.compose([f"data_dir={data_dir}", "device=cuda", "progress=false", "train_size=2000",
                          "test_size=500", "batch_size=128", "lr=0.02", *overrides])
    return cfg, train.prepare(cfg)


@pytest.mark.parametrize("overrides", [[], ["optim.momentum=0.9"], ["optimizer=adam", "lr=0.001"],
                                       ["precision=bf16"], ["channels_last=true"], ["bn=off"], ["norm=torch"]])
def test_cuda_graph_epochs_match_eager(synth_data_dir, overrides):
    cfg_g, g = setup(synth_data_dir, *overrides)
    cfg_e, e = setup(synth_data_dir, "cuda_graphs=off", *overrides)
    assert g.program.use_graphs and not e.program.use_graphs
    for epoch in (1, 2):
        torch.manual_seed(epoch)
        a = train.train_epoch(g, cfg_g, epoch)
        torch.manual_seed(epoch)
        b = train.train_epoch(e, cfg_e, epoch)
        tol = 2e-2 if "precision=bf16" in overrides else 1e-4
        torch.testing.assert_close(a["losses"], b["losses"], rtol=tol, atol=tol)
    assert g.program.graph is not None
    ta, tb = train.evaluate(g.model, g.test, 128, g.opts), train.evaluate(e.model, e.test, 128, e.opts)
    assert ta[1] == pytest.approx(tb[1], abs=0.02)


def test_cuda_graph_run_end_to_end(synth_data_dir, tmp_path):
    from bnexp.cli import main
    args = ["train", f"data_dir={synth_data_dir}", f"results_dir={tmp_path}", "device=cuda", "epochs=2",
            "batch_size=64", "progress=false", "cuda_graphs=on"]
    assert main(args) == 0
    import json
    info = json.loads(next((tmp_path / L.RUNS_DIR).iterdir()).joinpath(L.INFO).read_text())
    assert info["status"] == L.COMPLETED and info["execution"]["cuda_graphs"] is True


def test_diverging_run_is_detected_under_graphs(synth_data_dir):
    cfg, s = setup(synth_data_dir, "bn=off", "lr=1e6")
    ep = train.train_epoch(s, cfg, 1)
    assert not torch.isfinite(ep["losses"][-1]) and bool(torch.isfinite(ep["losses"][:-1]).all())
