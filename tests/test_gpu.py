"""CUDA checks: BN parity on the GPU and a training run on the device. Skipped without CUDA
(CI has none); the same logic runs on CPU in test_nn_parity.py and test_train.py."""

import copy
import json

import pytest
import torch

from bnexp import layout
import bnexp.nn as bnn
from bnexp.cli import main
from bnexp.nn import dispatch
from bnexp.nn import functional as bnF
from bnexp.nn.functional import use_backend

DEV = "cuda"
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("backend", ["eager", "compiled", "triton"])
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


# ----------------------------------------------------------------------------- the Triton kernels (bnexp.nn.triton_bn)

@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("shape, fmt", [
    ((64, 32, 28, 28), torch.contiguous_format),  # B = 784: several column blocks per row, several splits
    ((64, 32, 28, 28), torch.channels_last),  # B = 1: 32 channels per tile
    ((256, 6, 10, 10), torch.contiguous_format),  # few channels: many splits
    ((50, 3, 7, 9), torch.channels_last),  # 3 channels: a column block mostly masked, unaligned rows
    ((512, 200), torch.contiguous_format),  # BatchNorm1d (N, C)
    ((16, 24, 37), torch.contiguous_format),  # BatchNorm1d (N, C, L), L odd
])
def test_triton_kernels_match_torch_on_cuda(shape, fmt, dtype, tol):
    torch.manual_seed(0)
    ours_cls, ref_cls = ((bnn.BatchNorm2d, torch.nn.BatchNorm2d) if len(shape) == 4
                         else (bnn.BatchNorm1d, torch.nn.BatchNorm1d))
    ours, ref = ours_cls(shape[1], device=DEV, dtype=dtype), ref_cls(shape[1], device=DEV, dtype=dtype)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5), ours.bias.uniform_(-1, 1)
    ref.load_state_dict(ours.state_dict())
    per_channel = (1, -1) + (1,) * (len(shape) - 2)
    offsets = 5 * torch.randn(shape[1], device=DEV).view(per_channel)
    with use_backend("triton"):
        for _ in range(3):
            x = (torch.randn(shape, device=DEV) * 2 + offsets).to(dtype).contiguous(memory_format=fmt)
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            g = torch.randn_like(x)
            ya, yb = ours(xa), ref(xb)
            assert ya.stride() == yb.stride()
            ya.backward(g)
            yb.backward(g)
            scale = max(1.0, float(yb.detach().abs().max()))
            torch.testing.assert_close(ya, yb, atol=tol * scale, rtol=tol)
            torch.testing.assert_close(xa.grad, xb.grad, atol=tol * 10, rtol=tol)
            n = x.numel() // shape[1]  # parameter gradients are sums over n values
            for p_ours, p_ref in ((ours.weight, ref.weight), (ours.bias, ref.bias)):
                torch.testing.assert_close(p_ours.grad.float(), p_ref.grad.float(), atol=tol * n ** 0.5, rtol=tol)
            ours.zero_grad(), ref.zero_grad()
    torch.testing.assert_close(ours.running_mean, ref.running_mean, atol=tol, rtol=tol)
    torch.testing.assert_close(ours.running_var, ref.running_var, atol=tol, rtol=tol)


def test_auto_runs_the_triton_kernels_on_cuda(monkeypatch):
    from bnexp.nn import triton_bn

    calls = []
    for name in ("train_forward", "train_backward"):
        def spy(*args, _name=name, _fn=getattr(triton_bn, name), **kwargs):
            calls.append(_name)
            return _fn(*args, **kwargs)
        monkeypatch.setattr(triton_bn, name, spy)
    monkeypatch.setattr(dispatch, "_triton_broken", {})
    with use_backend("auto"):
        assert bnF.resolved_backend(DEV) == "triton"
        layer = bnn.BatchNorm2d(8, device=DEV)
        layer(torch.randn(4, 8, 5, 5, device=DEV, requires_grad=True)).sum().backward()
        assert dispatch._triton_broken == {}, dispatch._triton_broken
    assert calls == ["train_forward", "train_backward"]


def test_triton_kernels_under_cuda_graph_capture():
    """Forward + backward + running-statistics update captured in one CUDA graph and replayed:
    the host side allocates with torch.empty and never synchronises."""
    torch.manual_seed(0)
    shape = (32, 16, 12, 12)
    layer = bnn.BatchNorm2d(16, device=DEV)
    static_x = torch.randn(shape, device=DEV, requires_grad=True)
    static_g = torch.randn(shape, device=DEV)
    with use_backend("triton"):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up: compile the kernels, fill the launch-plan cache
            for _ in range(3):
                layer(static_x).backward(static_g)
        torch.cuda.current_stream().wait_stream(side)
        static_x.grad = layer.weight.grad = layer.bias.grad = None  # captured backward allocates them
        ref = copy.deepcopy(layer)  # same running statistics and counter as `layer` at capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer(static_x)
            static_y.backward(static_g)
    for _ in range(3):
        x, g = torch.randn(shape, device=DEV) * 3 + 1, torch.randn(shape, device=DEV)
        with torch.no_grad():
            static_x.copy_(x)
            static_g.copy_(g)
        graph.replay()
        x_ref = x.clone().requires_grad_()
        with use_backend("eager"):
            y_ref = ref(x_ref)
            y_ref.backward(g)
        torch.testing.assert_close(static_y, y_ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(static_x.grad, x_ref.grad, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(layer.weight.grad, ref.weight.grad, atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(layer.bias.grad, ref.bias.grad, atol=1e-3, rtol=1e-4)
        ref.zero_grad(set_to_none=True)
    torch.testing.assert_close(layer.running_mean, ref.running_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.running_var, ref.running_var, atol=1e-5, rtol=1e-5)
    assert int(layer.num_batches_tracked) == int(ref.num_batches_tracked)


def test_train_on_cuda_end_to_end(synth_data_dir, tmp_path, capsys):
    args = ["train", f"data_dir={synth_data_dir}", f"results_dir={tmp_path}", "epochs=2", "batch_size=64",
            "progress=false", f"device={DEV}"]
    assert main(args) == 0, capsys.readouterr().err
    run = next((tmp_path / layout.RUNS_DIR).iterdir())
    info = json.loads((run / layout.INFO).read_text())
    assert info["status"] == layout.COMPLETED and info["device"].startswith("cuda")
    assert info["final"]["train_loss"] < 2.0
