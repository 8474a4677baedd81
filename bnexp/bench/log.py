"""Benchmark: TensorBoard logging of one training epoch, bnexp's writer vs torch's SummaryWriter.

What `bnexp train` logs per epoch, timed both ways in one process, interleaved, each case ending
with a flush (so SummaryWriter's writer thread has finished its work too):
  step scalars  a LeNet5 epoch at batch 256: 235 steps x (loss, accuracy, lr)
  histograms    one probe: the input and output of LeNet5's four norm layers at batch 256,
                resident on the device (torch's summary copies each to the host first)
On a GPU with CUDA graphs an epoch takes a fraction of a second, so this is what keeps
bookkeeping from becoming a large share of it (see bnexp/tblog.py).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from .stats import Spread, measure, verdict
from ..tblog import TensorBoardLog

STEPS = 235  # ceil(60000 / 256)
PROBE_SHAPES = [(256, 6, 28, 28), (256, 16, 10, 10), (256, 120), (256, 84)]  # LeNet5's norm layers


def _cases(ours: TensorBoardLog, theirs: SummaryWriter, device: torch.device) -> dict:
    """{case: (bnexp's function, torch's function)}; each logs the same values and flushes."""
    gen = torch.Generator().manual_seed(0)
    loss, acc = torch.rand(STEPS, generator=gen).tolist(), torch.rand(STEPS, generator=gen).tolist()
    acts = {f"layer{i}/{where}": torch.randn(shape, generator=gen).to(device)
            for i, shape in enumerate(PROBE_SHAPES) for where in ("input", "output")}
    step = [0]

    def our_scalars():
        ours.step_scalars(step[0], {"batch/loss": loss, "batch/acc": acc, "batch/lr": [0.1] * STEPS})
        ours.flush()
        step[0] += STEPS

    def torch_scalars():
        for i in range(STEPS):
            for tag, v in (("batch/loss", loss[i]), ("batch/acc", acc[i]), ("batch/lr", 0.1)):
                theirs.add_scalar(tag, v, step[0] + i)
        theirs.flush()
        step[0] += STEPS

    def our_histograms():
        for tag, t in acts.items():
            ours.histogram(tag, t, step[0])
        ours.flush()

    def torch_histograms():
        for tag, t in acts.items():
            theirs.add_histogram(tag, t, step[0])
        theirs.flush()

    return {"step scalars": (our_scalars, torch_scalars), "histograms": (our_histograms, torch_histograms)}


def run(device: str = "cpu", min_repeats: int = 20, max_repeats: int = 400, budget_s: float = 30.0) -> dict:
    """Time each case both ways, interleaved (see bnexp.bench.stats), until its speed-up is settled
    or `budget_s` seconds per case are spent."""
    dev = torch.device(device)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bnexp-bench-log-") as tmp:
        ours = TensorBoardLog(Path(tmp) / "bnexp", purge_step=None)
        theirs = SummaryWriter(log_dir=str(Path(tmp) / "torch"), flush_secs=30)  # as bnexp used it before tblog.py
        for name, (our_fn, torch_fn) in _cases(ours, theirs, dev).items():
            m = measure({"bnexp": our_fn, "torch": torch_fn}, {name: ("torch", "bnexp")}, min_repeats=min_repeats,
                        max_repeats=max_repeats, budget_s=budget_s, warmup=2)
            rows.append({"case": name, "bnexp_ms": round(m.median("bnexp") * 1e3, 3),
                         "torch_ms": round(m.median("torch") * 1e3, 3), "speedup": m.ratios[name].to_json()})
        ours.close()
        theirs.close()
    return {"benchmark": "log", "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "torch": torch.__version__, "steps": STEPS, "probe_shapes": PROBE_SHAPES, "budget_s": budget_s,
            "rows": rows, "ratios": {row["case"]: row["speedup"] for row in rows}}


def format_table(r: dict) -> str:
    lines = [f"log benchmark: TensorBoard logging of one LeNet5 epoch ({r['steps']} steps) and one probe, "
             f"{r['device_name']} ({r['device']}), torch {r['torch']}; medians, and the speed-up "
             f"SummaryWriter / bnexp of each interleaved pair",
             f"{'case':<14}{'bnexp ms':>10}{'SummaryWriter ms':>18}  speed-up (min, max, pairs)"]
    for row in r["rows"]:
        lines.append(f"{row['case']:<14}{row['bnexp_ms']:>10.2f}{row['torch_ms']:>18.2f}  "
                     f"{Spread.from_json(row['speedup']).text()}")
    lines.append(verdict({row["case"]: Spread.from_json(row["speedup"]) for row in r["rows"]}))
    return "\n".join(lines)
