"""Benchmark: a training epoch of one run on 1 and 2 processes (`bnexp train nproc=N`, data parallel).

LeNet5-BN on FashionMNIST (the data bnexp finds: $BNEXP_DATA_DIR or the cache), global batch 256,
`train_size` images, `epochs` epochs; each configuration is one fresh `python -m bnexp train` (the
command a user types) into a temporary results directory. An epoch's time is metrics.csv's `seconds`
(the training steps alone: no start-up, evaluation or checkpoint); epoch 1 pays the first steps'
warm-up and is left out. Speed-up = t(1 process) / t(N processes) per epoch, as min / median / max
over the epochs; efficiency = speed-up / N.

The configurations: 1 process; 2 processes with per-process statistics (sync=false); 2 processes
with synchronised BN (sync=true: two more collectives per BN layer each step). Every process runs
one intra-op thread (threads=1), so N processes use N cores, as N GPUs on a GPU machine (--device
cuda, a GPU each): the ideal speed-up is N, and what is lost is the all-reduce of the gradients
(and of the BN statistics with sync) and the processes' contention for the machine.

    bnexp bench ddp [--device cuda]
"""

from __future__ import annotations

import csv
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from .cli import _env
from .stats import spread, verdict

CONFIGS = {"1 process": ["nproc=1"], "2 processes, sync=false": ["nproc=2"],
           "2 processes, sync=true": ["nproc=2", "norm.sync=true"]}
BASE = ["model=lenet5", "data=fashion_mnist", "norm=bn", "batch_size=256", "lr=0.1", "progress=false",
        "probe_every=0", "test_size=256", "threads=1"]


def _epoch_seconds(device: str, overrides: list[str], epochs: int, train_size: int, data_dir: str | None) -> list[float]:
    with tempfile.TemporaryDirectory(prefix="bnexp-bench-ddp-") as results:
        cmd = [sys.executable, "-m", "bnexp", "train", *BASE, *overrides, f"device={device}", f"epochs={epochs}",
               f"train_size={train_size}", f"results_dir={results}", *([f"data_dir={data_dir}"] if data_dir else [])]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_env())
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[3:])} failed: {(proc.stderr or proc.stdout).strip()[-500:]}")
        (metrics,) = Path(results).glob("runs/*/metrics.csv")
        with open(metrics) as f:
            return [float(row["seconds"]) for row in csv.DictReader(f)]


def run(device: str = "cpu", epochs: int = 4, train_size: int = 16384, data_dir: str | None = None) -> dict:
    import torch

    from ..execution import cpu_cores, device_name

    rows = []
    for label, overrides in CONFIGS.items():
        seconds = _epoch_seconds(device, overrides, epochs, train_size, data_dir)
        rows.append({"case": label, "epoch_s": seconds, "median_s": statistics.median(seconds[1:])})
    one = rows[0]["epoch_s"][1:]
    ratios = {}
    for row in rows[1:]:
        s = spread([a / b for a, b in zip(one, row["epoch_s"][1:])])
        row["speedup"] = s.to_json()
        row["efficiency"] = s.median / 2
        ratios[f"speed-up {row['case']}"] = s.to_json()
    return {"device": device, "device_name": device_name(torch.device(device)), "torch": torch.__version__,
            "cores": cpu_cores(), "epochs": epochs, "train_size": train_size, "batch_size": 256,
            "rows": rows, "ratios": ratios}


def format_table(r: dict) -> str:
    from .stats import Spread

    lines = [f"ddp benchmark: LeNet5-BN epoch of {r['train_size']} FashionMNIST images at global batch "
             f"{r['batch_size']} on 1 and 2 processes, {r['device_name']} ({r['device']}, {r['cores']} cores), "
             f"torch {r['torch']}; epochs 2-{r['epochs']} (median s), speed-up = t(1) / t(2) per epoch",
             f"{'case':<26}{'epoch s':>9}  speed-up (min, max, epochs)   efficiency"]
    for row in r["rows"]:
        speed = Spread.from_json(row["speedup"]).text() if "speedup" in row else "1 (the reference)"
        eff = f"{100 * row['efficiency']:.0f}%" if "efficiency" in row else ""
        lines.append(f"{row['case']:<26}{row['median_s']:>9.3f}  {speed:<30}{eff:>8}")
    lines.append(f"ideal speed-up: 2.0x (each process has {'a GPU' if r['device'].startswith('cuda') else 'a core'} "
                 f"of its own; on a loaded machine it cannot be reached)")
    lines.append(verdict({k: Spread.from_json(v) for k, v in r["ratios"].items()}))
    return "\n".join(lines)
