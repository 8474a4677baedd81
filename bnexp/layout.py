"""The results layout: what a run directory holds and what its files say (results/README.md).

The one place that names the files of `<results_dir>/runs/<run_id>/`, their columns, the
statuses of run.json and the keys of activations.npz. tracking.py writes these files and
report/load.py reads them; both, and everything else that touches a run directory, import the
names from here. Torch-, numpy- and pandas-free on purpose: `bnexp report --help` and a skipped
`bnexp train` import it without the heavy libraries.
"""
from __future__ import annotations

import re
from pathlib import Path

from . import measures_format as MF

# ----------------------------------------------------------------------------- files

RUNS_DIR = "runs"                  # <results_dir>/runs/<run_id>/
CONFIG = "config.yaml"             # the resolved config (bnexp.config)
INFO = "run.json"                  # status, final metrics, timings, versions, execution
METRICS = "metrics.csv"            # one row per finished epoch: METRIC_COLUMNS
STEPS = "steps.csv"                # one row per training step: STEP_COLUMNS
EVALS = "evals.csv"                # the eval_every evaluations: EVAL_COLUMNS
PRECISE = "precise.csv"            # precise_bn evaluations (bnexp/precise.py): PRECISE_COLUMNS
MEASURES = MF.FILE_NAME            # the instruments (bnexp/measures_format.py): MEASURE_COLUMNS
ACTIVATIONS = "activations.npz"    # activation probes, keyed by activation_key()
CHECKPOINT = "checkpoint.pt"       # model, optimiser and RNG state after the last finished epoch
ERROR_LOG = "error.log"            # the traceback of a failed run (or why it was killed)
LOCK = ".lock"                     # flock held by the process training the run (bnexp/locks.py)


def run_path(results_dir: str | Path, run_id: str) -> Path:
    """The directory of run `run_id` under `results_dir`."""
    return Path(results_dir) / RUNS_DIR / run_id


# ----------------------------------------------------------------------------- columns

FINAL_METRICS = ("train_loss", "train_acc", "test_loss", "test_acc")   # run.json's `final`
METRIC_COLUMNS = ("epoch", *FINAL_METRICS, "lr", "seconds")
STEP_COLUMNS = ("step", "epoch", "loss")
EVAL_COLUMNS = ("step", "epoch", "test_loss", "test_acc")
PRECISE_COLUMNS = ("epoch", "test_loss", "test_acc", "batches")
MEASURE_COLUMNS = MF.HEADER

# ----------------------------------------------------------------------------- statuses

# run.json's `status`, as the training process writes it.
RUNNING, COMPLETED, DIVERGED, FAILED = "running", "completed", "diverged", "failed"
# Never written: a run.json that says running while no process holds the run's lock is read as
# interrupted (its process was killed or crashed before it could record that).
INTERRUPTED = "interrupted"
STATUSES = (RUNNING, INTERRUPTED, COMPLETED, DIVERGED, FAILED)
# Finished runs are never trained again (without --force); the report aggregates them and only
# lists the others.
FINISHED = (COMPLETED, DIVERGED)

# What one `bnexp train` / one sweep point did, as a sweep counts it: a run.json status, or
# skipped (it had already finished) or busy (another process is training it).
SKIPPED, BUSY = "skipped", "busy"
RESULT_STATUSES = (COMPLETED, SKIPPED, DIVERGED, FAILED, BUSY)

# ----------------------------------------------------------------------------- activations.npz

PROBE_POINTS = ("input", "output")  # of each norm position: what goes in, what comes out
_ACTIVATION_KEY = re.compile(r"e(\d+)/(.+)/(\w+)")


def activation_key(epoch: int, layer: str, where: str) -> str:
    """The activations.npz key of one probe: `e<epoch>/<layer>/<where>`, e.g. e0/conv1.norm/output
    (epoch 0 = at initialisation, before any training)."""
    return f"e{epoch}/{layer}/{where}"


def parse_activation_key(key: str) -> tuple[int, str, str] | None:
    """`e<epoch>/<layer>/<where>` -> (epoch, layer, where); None for any other key."""
    m = _ACTIVATION_KEY.fullmatch(key)
    return (int(m[1]), m[2], m[3]) if m else None
