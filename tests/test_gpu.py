"""CUDA checks: BN parity on the GPU and a training run on the device. Skipped without CUDA
(CI has none); the same logic runs on CPU in test_nn_parity.py and test_train.py."""

import json

import pytest
import torch

import bnexp.nn as bnn
from bnexp.cli import main
from bnexp.nn.functional import use_backend

DEV = "cuda"
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("backend", ["eager", "compiled"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 5e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_bn2d_parity_on_cuda(backend, dtype, tol, channels_last):
    torch.manual_seed(0)
    ours = bnn.BatchNorm2d(16, device=DEV, dtype=dtype)
    ref = torch.nn.BatchNorm2d(16, device=DEV, dtype=dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    # bf16 weights updated by SGD drift apart by an ulp per step (rounding, not semantics): no update then.
    lr = 0.1 if dtype == torch.float32 else 0.0
    with use_backend(backend):
        for step in range(20):
            x = (torch.randn(32, 16, 12, 12, device=DEV) * 3 + 1).to(dtype).to(memory_format=fmt)
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            g = torch.randn_like(x)
            ya, yb = ours(xa), ref(xb)
            ya.backward(g)
            yb.backward(g)
            torch.testing.assert_close(ya, yb, atol=tol, rtol=tol)
            torch.testing.assert_close(xa.grad, xb.grad, atol=tol * 10, rtol=tol)
            torch.testing.assert_close(ours.weight.grad, ref.weight.grad, atol=tol * 50, rtol=tol)
            for m in (ours, ref):
                with torch.no_grad():
                    m.weight -= lr * m.weight.grad
                    m.bias -= lr * m.bias.grad
                m.weight.grad = m.bias.grad = None
        torch.testing.assert_close(ours.running_mean, ref.running_mean, atol=tol, rtol=tol)
        torch.testing.assert_close(ours.running_var, ref.running_var, atol=tol, rtol=tol)
        assert int(ours.num_batches_tracked) == 20
        ours.eval(), ref.eval()
        x = torch.randn(8, 16, 12, 12, device=DEV).to(dtype)
        torch.testing.assert_close(ours(x), ref(x), atol=tol, rtol=tol)


def test_train_on_cuda_end_to_end(synth_data_dir, tmp_path, capsys):
    args = ["train", f"data_dir={synth_data_dir}", f"results_dir={tmp_path}", "epochs=2", "batch_size=64",
            "progress=false", f"device={DEV}"]
    assert main(args) == 0, capsys.readouterr().err
    run = next((tmp_path / "runs").iterdir())
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed" and info["device"].startswith("cuda")
    assert info["final"]["train_loss"] < 2.0
