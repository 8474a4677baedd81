"""BN layer benchmark: forward+backward of bnexp.nn.BatchNorm2d vs torch.nn.BatchNorm2d, train mode.

Both layers run interleaved in one process on the same input (see `bnexp.bench.stats`); the first
untimed rounds include the compilation of our kernels. We report the median time per forward+backward
in ms, the interquartile range, and the ratio ours / torch of each interleaved pair (below 1 = faster)
as min / median / max, repeated until the median is settled (stats.TOLERANCE) or the budget is spent.

`kinds` (CLI: --kinds gn,ln,in,brn,ghost,noisy) times other members of the normalisation family,
each built by `make_norm(kind, C, 2)`, against its PyTorch counterpart where torch has the layer
(gn: nn.GroupNorm with the same groups, ln: nn.GroupNorm(1, C), in: nn.InstanceNorm2d(affine=True))
and against nn.BatchNorm2d, the reference cost, for brn, ghost and noisy. brn is timed past its
warm-up (r and d active: warmup_steps = r_max_steps = d_max_steps = 0), ghost with its default
ghost_size 32 (N // 2 for batches under 64), noisy with its default noise.
"""

import math
import statistics

import torch

import bnexp.nn
from bnexp.nn import dispatch
from bnexp.nn.kinds import check_norm, resolve_groups

from ..execution import device_name
from .stats import Spread, measure, time_samples, verdict

SHAPES = ((256, 6, 28, 28), (256, 16, 10, 10), (64, 64, 32, 32))  # LeNet5's two BN2d inputs at batch 256, a wide one
LARGE = (64, 256, 56, 56)  # a ResNet-sized activation (205 MB in fp32): bandwidth-bound, on GPUs by default


def default_shapes(device: torch.device) -> tuple:
    return SHAPES + ((LARGE,) if device.type == "cuda" else ())


def _device_name(device: torch.device) -> str:
    name = device_name(device)  # the GPU, or the CPU's model name (what run.json records)
    return name if device.type == "cuda" else f"{name}, {torch.get_num_threads()} threads"


def _step(layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, backend: str | None = None):
    def step():
        x.grad = None  # each call starts from a fresh gradient (no accumulation pass)
        if backend is None:
            layer(x).backward(grad)
        else:
            with dispatch.use_backend(backend):
                layer(x).backward(grad)
    return step


def min_traffic_bytes(shape, itemsize: int = 4) -> int:
    """Bytes a forward+backward must move at least: read x, write y; read x and dy, write dx."""
    return 5 * itemsize * math.prod(shape)


KIND_KWARGS = {"brn": dict(warmup_steps=0, r_max_steps=0, d_max_steps=0)}  # past the warm-up: r, d active


def _layers(kind: str, shape: tuple, dev: torch.device):
    """(ours, torch's counterpart or nn.BatchNorm2d as the reference cost) for `kind` at `channels`;
    for kind "bn", a factory of ours (one layer per backend column)."""
    channels, kwargs = shape[1], dict(KIND_KWARGS.get(kind, {}))
    if kind == "ghost":
        kwargs["ghost_size"] = min(32, max(1, shape[0] // 2))
    ours = bnexp.nn.make_norm(kind, channels, 2, device=dev, **kwargs)
    if kind == "gn":
        ref = torch.nn.GroupNorm(resolve_groups(channels, None), channels, device=dev)
    elif kind == "ln":
        ref = torch.nn.GroupNorm(1, channels, device=dev)
    elif kind == "in":
        ref = torch.nn.InstanceNorm2d(channels, affine=True, device=dev)
    else:
        ref = torch.nn.BatchNorm2d(channels, device=dev)
    return (lambda: ours) if kind != "bn" else (lambda: bnexp.nn.make_norm("bn", channels, 2, device=dev)), ref


def run(device: str = "cpu", shapes=None, repeats: int = 40, warmup: int = 3, seed: int = 0,
        backends: list[str] | None = None, channels_last: bool = False, kinds: list[str] | None = None,
        max_repeats: int = 2000, budget_s: float = 10.0) -> dict:
    """Time torch's layer and ours (one column per backend) at each (N, C, H, W) shape: at least
    `repeats` interleaved repeats, more (up to `max_repeats`, `budget_s` seconds a row) until every
    ratio of the row is settled.

    backends: bnexp batch-norm backends to time side by side (default: what `auto` picks here);
    the first is the `bnexp` column the ratio refers to. kinds: norm kinds to time (default:
    ["bn"]), each against its counterpart (see the module docstring); one row per kind and shape.
    Returns a JSON-serialisable dict.
    """
    dev = torch.device(device)
    shapes = default_shapes(dev) if shapes is None else shapes
    names = list(backends or [dispatch.resolved_backend(dev)])
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(seed)
    kinds = list(kinds or ["bn"])
    for kind in kinds:
        check_norm(kind, 8, 2)
    rows = []
    for kind, shape in ((kind, shape) for kind in kinds for shape in shapes):
        shape = tuple(int(s) for s in shape)
        x = torch.randn(shape, device=dev).contiguous(memory_format=fmt).requires_grad_()
        grad = torch.randn(shape, device=dev).contiguous(memory_format=fmt)
        ours, ref = _layers(kind, shape, dev)
        steps = {"torch": _step(ref, x, grad)}
        for b in names:
            steps[_column(b, names)] = _step(ours(), x, grad, b)
        row = {"kind": kind, "reference": type(ref).__name__, "shape": list(shape)}
        for name, step in steps.items():  # the first call includes our compilation (or a cache load)
            row[f"{name}_first_call_ms"] = 1e3 * time_samples({name: step}, repeats=1, warmup=0)[name][0]
        m = measure(steps, {_column(b, names): (_column(b, names), "torch") for b in names}, min_repeats=repeats,
                    max_repeats=max(repeats, max_repeats), budget_s=budget_s, warmup=warmup)
        samples = m.samples
        for name, s in samples.items():
            q1, _, q3 = statistics.quantiles(s, n=4) if len(s) > 1 else (s[0],) * 3
            row[f"{name}_ms"] = 1e3 * statistics.median(s)
            row[f"{name}_iqr_ms"] = 1e3 * (q3 - q1)
            row[f"{name}_GBps"] = min_traffic_bytes(shape) / (row[f"{name}_ms"] / 1e3) / 1e9
        for b in names:
            row[f"{_column(b, names)}_ratio"] = m.ratios[_column(b, names)].median
            row[f"{_column(b, names)}_spread"] = m.ratios[_column(b, names)].to_json()
        row["ratio"] = row[f"{_column(names[0], names)}_ratio"]
        row["repeats"] = len(samples["torch"])
        rows.append(row)
    return {
        "benchmark": "bn forward+backward, train mode" if kinds == ["bn"] else
                     f"norm forward+backward ({', '.join(kinds)}), train mode",
        "kinds": kinds,
        "device": str(dev),
        "device_name": _device_name(dev),
        "torch_version": torch.__version__,
        "backend": names[0] if backends else dispatch.resolved_backend(dev),
        "backends": names,
        "layout": "channels_last" if channels_last else "contiguous",
        "repeats": repeats,
        "budget_s": budget_s,
        "warmup": warmup,
        "rows": rows,
        "ratios": {_ratio_label(r, c): r[f"{c}_spread"] for r in rows for c in (_column(b, names) for b in names)},
    }


def _ratio_label(row: dict, column: str) -> str:
    """`bn (256, 6, 28, 28) bnexp`: which ratio of which row (the key of the result's `ratios`)."""
    return f"{row['kind']} ({', '.join(map(str, row['shape']))}) {column}"


def _column(backend: str, names: list[str]) -> str:
    """Column name of a backend: `bnexp` for the first, `bnexp[name]` for the others."""
    return "bnexp" if backend == names[0] else f"bnexp[{backend}]"


def format_table(result: dict) -> str:
    """A plain aligned text table: shape, medians (IQR) in ms, ratio ours/torch, min-traffic bandwidth."""
    names = result.get("backends", [result["backend"]])
    cols = [_column(b, names) for b in names]
    by_kind = result.get("kinds", ["bn"]) != ["bn"]
    header = ["shape (N,C,H,W)", "torch ms"] + [f"{c if c != 'bnexp' else 'bnexp[' + names[0] + ']'} ms"
                                                for c in cols] + ["ratio", "GB/s torch/bnexp"]
    lines = []
    for r in result["rows"]:
        line = [f"({', '.join(map(str, r['shape']))})", f"{r['torch_ms']:.3f} ±{r['torch_iqr_ms'] / 2:.3f}"]
        line += [f"{r[c + '_ms']:.3f} ±{r[c + '_iqr_ms'] / 2:.3f}" for c in cols]
        line += ["/".join(Spread.from_json(r[c + "_spread"]).text() for c in cols),
                 f"{r['torch_GBps']:.0f}/{r['bnexp_GBps']:.0f}"]
        lines.append([f"{r['kind']} vs {r['reference']}"] + line if by_kind else line)
    if by_kind:
        header = ["kind vs reference"] + header[:1] + ["reference ms"] + header[2:]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]

    def fmt(row):  # label columns left-aligned, numbers right-aligned
        return "  ".join(cell.ljust(w) if i <= by_kind else cell.rjust(w)
                         for i, (cell, w) in enumerate(zip(row, widths)))

    title = (f"{result['benchmark']} on {result['device']} ({result['device_name']}), torch {result['torch_version']}, "
             f"{result.get('layout', 'contiguous')}, medians (± half IQR) of at least {result['repeats']} interleaved "
             "repeats; ratio = bnexp / torch of each pair, median (min, max, pairs), below 1 = faster")
    first = sum(r["bnexp_first_call_ms"] for r in result["rows"]) / 1e3
    footer = (f"first calls of bnexp (compilation or cache load included): {first:.1f} s in total; "
              "GB/s = minimum traffic (5 x tensor bytes) / median time")
    spreads = {label: Spread.from_json(d) for label, d in result["ratios"].items()}
    return "\n".join([title, fmt(header), "  ".join("-" * w for w in widths), *map(fmt, lines), footer,
                      verdict(spreads)])
