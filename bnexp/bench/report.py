"""Benchmark of `bnexp report`: fabricate many runs, time write_report (Markdown).

Default: 200 runs = BN on/off x 5 learning rates x 4 batch sizes x 5 seeds, LeNet5 / FashionMNIST,
20 epochs of ~120 steps, activations (4 norm layers, 20,000 samples) at epochs 1 and 20.
Target: under 10 s on a 2-core CPU (the report is read-bound and figure-bound: the figures are
capped per kind, so its cost grows with the runs read, not with the figures). The report has no
PyTorch side to compare with: its ratio is time / target, as min / median / max over repeated
reports of the same runs (bnexp.bench.stats), repeated until the median is settled or the budget is spent.
"""
from __future__ import annotations

import itertools
import os
import resource
import tempfile
import time
from pathlib import Path

from .stats import Spread, verdict

LRS = (0.01, 0.05, 0.1, 0.3, 0.5)
BATCH_SIZES = (64, 128, 256, 512)


def fabricate(results_dir: Path, n_runs: int = 200, epochs: int = 20, steps_per_epoch: int = 120,
              act_samples: int = 20_000) -> int:
    """Write n_runs fake run directories (the grid above, cycling seeds); return the count."""
    from .fakeruns import fake_run

    grid = itertools.product(range(10_000), LRS, BATCH_SIZES, ("on", "off"))
    for seed, lr, bs, bn in itertools.islice(((s, lr, bs, bn) for s, lr, bs, bn in grid), n_runs):
        dead = bn == "off" and lr == 0.5 and seed % 3 == 0
        fake_run(results_dir, lr=lr, batch_size=bs, bn=bn, seed=seed, epochs=epochs,
                 steps_per_epoch=steps_per_epoch, act_samples=act_samples,
                 train_loss=2.3026 if dead else (0.1 if bn == "on" else 0.3) + 0.01 * seed,
                 test_acc=0.1 if dead else (0.89 if bn == "on" else 0.86))
    return n_runs


TARGET_S = 10.0


def run(n_runs: int = 200, epochs: int = 20, steps_per_epoch: int = 120, act_samples: int = 20_000,
        repeats: int = 3, max_repeats: int = 10, budget_s: float = 90.0) -> dict:
    """Fabricate runs in a temporary directory and time write_report(fmt="md") on them (CPU only), at
    least `repeats` times."""
    from bnexp.report import write_report

    from .stats import measure, spread

    with tempfile.TemporaryDirectory(prefix="bnexp-bench-report-") as tmp:
        t0 = time.perf_counter()
        fabricate(Path(tmp), n_runs, epochs, steps_per_epoch, act_samples)
        fabricate_s = time.perf_counter() - t0
        cpu, results = [], []

        def report():
            c = _cpu()
            results.append(write_report(Path(tmp), fmt="md"))
            cpu.append(_cpu() - c)

        m = measure({"report": report}, {}, min_repeats=repeats, max_repeats=max(repeats, max_repeats),
                    budget_s=budget_s, warmup=0, settle=["report"])
    result, seconds = results[-1], spread(m.samples["report"])
    return {"name": "report", "n_runs": result.n_runs, "n_groups": result.n_groups,
            "n_figures": len(result.figures), "n_tables": len(result.tables), "epochs": epochs,
            "steps_per_epoch": steps_per_epoch, "fabricate_s": round(fabricate_s, 3),
            "report_s": round(seconds.median, 3), "report_samples_s": [round(v, 3) for v in m.samples["report"]],
            "report_cpu_s": round(spread(cpu).median, 3), "cpu_count": os.cpu_count(),
            "load_avg_1min": round(os.getloadavg()[0], 2), "target_s": TARGET_S, "ok": seconds.median < TARGET_S,
            "ratios": {"report/target": seconds.scaled(1 / TARGET_S).to_json()}}


def _cpu() -> float:
    """User + system CPU seconds of this process and its finished children (the figure workers):
    unlike wall time, this does not grow when other processes compete for the cores."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def format_table(result: dict) -> str:
    rows = [("runs", result["n_runs"]), ("groups", result["n_groups"]), ("figures", result["n_figures"]),
            ("steps per run", result["epochs"] * result["steps_per_epoch"]),
            ("fabricate (s)", f"{result['fabricate_s']:.2f}"),
            ("write_report md (s)", Spread.from_json(result["ratios"]["report/target"]).scaled(result["target_s"])
             .text(unit=" s")),
            ("  CPU time (s)", f"{result['report_cpu_s']:.2f} (load average {result['load_avg_1min']:g} "
                               f"on {result['cpu_count']} cores)"),
            ("target (s)", f"< {result['target_s']:g}  {'ok' if result['ok'] else 'SLOWER'}"),
            ("time / target", Spread.from_json(result["ratios"]["report/target"]).text())]
    width = max(len(k) for k, _ in rows)
    spreads = {label: Spread.from_json(d) for label, d in result["ratios"].items()}
    return "\n".join([*(f"{k:<{width}}  {v}" for k, v in rows), verdict(spreads)])


if __name__ == "__main__":
    print(format_table(run()))
