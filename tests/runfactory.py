"""Fabricate run directories exactly per results/README.md, for report tests (no training).

The writer lives in the package (bnexp.report.fabricate) because `bnexp bench report` uses it
too; this module re-exports it and adds helpers for seed groups and damaged run directories.

    from runfactory import fake_run, fake_group
    fake_run(tmp_path, lr=0.5, bn="off", seed=1, train_loss=2.3026)      # one dead run
    fake_group(tmp_path, [0.10, 0.12, 0.14], lr=0.5, bn="on")             # seeds 0, 1, 2
"""
from __future__ import annotations

import math
from pathlib import Path

from bnexp.report.fabricate import BASE_CONFIG, fake_run, make_config, run_id

__all__ = ["BASE_CONFIG", "CHANCE_10", "fake_group", "fake_run", "make_config", "run_id", "damage"]

CHANCE_10 = math.log(10)     # FashionMNIST chance-level loss, 2.3026


def fake_group(root: Path, train_losses: list[float], /, *, first_seed: int = 0, **kw) -> list[Path]:
    """One run per final training loss, seeds first_seed, first_seed + 1, ...; other metrics from kw."""
    return [fake_run(root, seed=first_seed + i, train_loss=loss, **kw) for i, loss in enumerate(train_losses)]


def damage(run_dir: Path, what: str) -> Path:
    """Break one run directory the ways real ones break (killed writer, hand edits, old versions)."""
    if what == "no_run_json":
        (run_dir / "run.json").unlink()
    elif what == "bad_yaml":
        (run_dir / "config.yaml").write_text("model: [unclosed\n")
    elif what == "bad_json":
        (run_dir / "run.json").write_text('{"status": "completed", ')
    elif what == "bad_status":
        text = (run_dir / "run.json").read_text()
        (run_dir / "run.json").write_text(text.replace('"completed"', '"exploded"'))
    elif what == "bad_metrics_header":
        (run_dir / "metrics.csv").write_text("when,what\n1,2\n")
    elif what == "garbage_steps":
        (run_dir / "steps.csv").write_text("step,epoch,loss\n1,1,0.5\nnot,a,number\n")
    elif what == "no_steps":
        (run_dir / "steps.csv").unlink()
    elif what == "bad_npz":
        (run_dir / "activations.npz").write_bytes(b"not a zip file")
    else:
        raise ValueError(what)
    return run_dir
