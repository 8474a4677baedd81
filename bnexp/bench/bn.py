"""BN layer benchmark: forward+backward of bnexp.nn.BatchNorm2d vs torch.nn.BatchNorm2d, train mode.

Both layers run interleaved in one process on the same input (see `bnexp.bench.time_samples`);
the first untimed rounds include the compilation of our kernels. We report the median time per
forward+backward in ms, the interquartile range, and the ratio ours / torch (below 1 = faster).
"""

import platform
import statistics

import torch

import bnexp.nn
from bnexp.nn import functional as bn_functional

from . import time_samples

SHAPES = ((256, 6, 28, 28), (256, 16, 10, 10), (64, 64, 32, 32))  # LeNet5's two BN2d inputs at batch 256, a wide one


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:  # Linux: the model name is more telling than "x86_64"
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def _step(layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor):
    def step():
        x.grad = None  # each call starts from a fresh gradient (no accumulation pass)
        layer(x).backward(grad)
    return step


def run(device: str = "cpu", shapes=SHAPES, repeats: int = 40, warmup: int = 3, seed: int = 0) -> dict:
    """Time both layers at each (N, C, H, W) shape; return a JSON-serialisable result dict."""
    dev = torch.device(device)
    torch.manual_seed(seed)
    rows = []
    for shape in shapes:
        shape = tuple(int(s) for s in shape)
        x = torch.randn(shape, device=dev, requires_grad=True)
        grad = torch.randn(shape, device=dev)
        layers = {"bnexp": bnexp.nn.BatchNorm2d(shape[1], device=dev),
                  "torch": torch.nn.BatchNorm2d(shape[1], device=dev)}
        steps = {name: _step(layer, x, grad) for name, layer in layers.items()}
        row = {"shape": list(shape)}
        for name, step in steps.items():  # the first call includes our compilation (or a cache load)
            row[f"{name}_first_call_ms"] = 1e3 * time_samples({name: step}, repeats=1, warmup=0)[name][0]
        samples = time_samples(steps, repeats, warmup)
        for name, s in samples.items():
            q1, _, q3 = statistics.quantiles(s, n=4) if len(s) > 1 else (s[0],) * 3
            row[f"{name}_ms"] = 1e3 * statistics.median(s)
            row[f"{name}_iqr_ms"] = 1e3 * (q3 - q1)
        row["ratio"] = row["bnexp_ms"] / row["torch_ms"]
        rows.append(row)
    return {
        "benchmark": "bn forward+backward, train mode",
        "device": str(dev),
        "device_name": _device_name(dev),
        "torch_version": torch.__version__,
        "backend": bn_functional.resolved_backend(dev),
        "repeats": repeats,
        "warmup": warmup,
        "rows": rows,
    }


def format_table(result: dict) -> str:
    """A plain aligned text table: shape, medians (IQR) in ms, ratio ours/torch."""
    header = ["shape (N,C,H,W)", "bnexp ms", "torch ms", "ratio"]
    lines = [[f"({', '.join(map(str, r['shape']))})",
              f"{r['bnexp_ms']:.3f} ±{r['bnexp_iqr_ms'] / 2:.3f}",
              f"{r['torch_ms']:.3f} ±{r['torch_iqr_ms'] / 2:.3f}",
              f"{r['ratio']:.2f}x"] for r in result["rows"]]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]

    def fmt(row):  # first column left-aligned, numbers right-aligned
        return "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))

    title = (f"{result['benchmark']} on {result['device']} ({result['device_name']}), torch {result['torch_version']}, "
             f"bnexp backend {result['backend']}, median of {result['repeats']} (± half IQR)")
    first = sum(r["bnexp_first_call_ms"] for r in result["rows"]) / 1e3
    footer = f"first calls of bnexp (compilation or cache load included): {first:.1f} s in total"
    return "\n".join([title, fmt(header), "  ".join("-" * w for w in widths), *map(fmt, lines), footer])
