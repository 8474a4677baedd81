"""A run's directory on disk: config, run.json, metrics, step losses, activations, checkpoint, lock.

Every file is written atomically (temp file + rename), so a crash or `kill -9` leaves either
the old or the new version, never half a file. Files are created as a plain `open` would create
them (mode 0666 less the umask, default ACLs applied), so a results_dir shared by a group stays
usable by the group. Layout: results/README.md; the file names and columns: layout.py. TensorBoard: tblog.py.

The `.lock` of a run is an flock held by the process training it: locks.py.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import platform
import secrets
import subprocess
import tempfile
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path

from omegaconf import OmegaConf

from . import __version__
from . import layout as L
from .config import config_hash
from .errors import BnexpError
from .locks import RunLock, describe_process

# numpy and torch are imported where a run's arrays and checkpoint are read or written: whether a run
# is finished (a skipped `bnexp train`, a sweep's finished points) is answered without them.


@dataclass
class RunResult:
    """What happened to one run; `status` is one of layout.RESULT_STATUSES."""
    run_id: str
    path: Path
    status: str
    final: dict | None = None
    seconds: float = 0.0
    message: str = ""
    epochs_completed: int = 0
    extra: dict = field(default_factory=dict)


@dataclass
class RunState:
    """What a run has recorded so far: saved in its checkpoint after every epoch (`to_checkpoint`), so
    an interrupted run resumes exactly where the last finished epoch left it (`from_checkpoint`)."""
    epoch: int = 0  # epochs finished
    metrics: list[dict] = field(default_factory=list)  # one metrics.csv row per finished epoch
    losses: list[float] = field(default_factory=list)  # every step's training loss (steps.csv)
    steps_per_epoch: list[int] = field(default_factory=list)
    elapsed: float = 0.0  # seconds of the run over all its attempts
    diverged_at: dict | None = None  # {"epoch", "step"} of the first non-finite loss
    eval_seconds: float = 0.0
    probe_seconds: float = 0.0
    evals: list[dict] = field(default_factory=list)  # evals.csv rows (eval_every)
    measure_seconds: float = 0.0
    measures: list[tuple] = field(default_factory=list)  # measures.csv rows (measure)
    precise_seconds: float = 0.0
    precise: list[dict] = field(default_factory=list)  # precise.csv rows (precise_bn)

    @property
    def step(self) -> int:
        """Training steps taken so far."""
        return sum(self.steps_per_epoch)

    def to_checkpoint(self) -> dict:
        """The checkpoint's "state" entry: a plain dict of the fields (what every bnexp has written)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_checkpoint(cls, saved: dict, epochs: int) -> "RunState":
        """The state of a checkpoint's "state" entry (an older bnexp's may lack newer fields), if its
        parts agree with each other and with a run of `epochs` epochs; else ValueError."""
        names = {f.name for f in fields(cls)}
        state = cls(**{k: v for k, v in saved.items() if k in names})
        n = state.epoch
        if not (isinstance(n, int) and 0 <= n <= epochs and len(state.metrics) == n
                and len(state.steps_per_epoch) == n and state.step == len(state.losses)):
            raise ValueError(f"its state (epoch {n!r}, {len(state.metrics)} metrics rows) is inconsistent")
        return state

    def as_of(self, epochs: int) -> "RunState":
        """This state cut back to its first `epochs` epochs: what the checkpoint on disk holds."""
        steps = self.steps_per_epoch[:epochs]
        return replace(self, epoch=epochs, metrics=self.metrics[:epochs], steps_per_epoch=steps,
                       losses=self.losses[:sum(steps)], measures=[r for r in self.measures if r[0] <= sum(steps)],
                       precise=self.precise[:epochs])


@dataclass
class Attempt:
    """What run.json says about this attempt's code: asked once per attempt (git runs a subprocess)."""
    started: str
    versions: dict
    git_commit: str | None

    @classmethod
    def begin(cls, started: str) -> "Attempt":
        return cls(started, versions(), git_commit())


def run_info(run_id: str, cfg, status: str, state: RunState, attempt: Attempt, device: str, execution: dict,
             error: str | None = None, ended: str | None = None) -> dict:
    """run.json of a run in `state`: its status, final metrics, progress, code, execution and times."""
    rows = state.metrics
    last = rows[-1] if rows else None
    return {
        "run_id": run_id, "status": status,
        "final": None if last is None else {k: last[k] for k in L.FINAL_METRICS},
        "epochs_completed": len(rows), "epochs": cfg.epochs, "diverged_at": state.diverged_at,
        "error": error, "seed": cfg.seed, "device": device,
        "config_hash": config_hash(cfg), "versions": attempt.versions, "git_commit": attempt.git_commit,
        "execution": execution,
        "started": attempt.started, "ended": ended,
        "seconds": {"train": round(sum(r["seconds"] for r in rows), 3),
                    "eval": round(state.eval_seconds, 3),
                    "probes": round(state.probe_seconds, 3),
                    **({"measures": round(state.measure_seconds, 3)} if cfg.measure else {}),
                    **({"precise": round(state.precise_seconds, 3)} if cfg.precise_bn else {}),
                    "total": round(state.elapsed, 3)},
    }


def reason(e: BaseException) -> str:
    """An exception as a short one-line reason: `BadZipFile: File is not a zip file`."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:120]}" if text else type(e).__name__


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _create_temp(path: Path) -> tuple[int, Path]:
    """A new, empty temp file beside `path`, opened for writing. Unlike mkstemp (always 0600) it is
    created with mode 0666 and the umask, as `open(path, "w")` would create `path` itself."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), tmp
        except FileExistsError:
            continue


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temp file in the same directory and an atomic rename.

    On failure `path` keeps its old contents (or stays absent) and the temp file is removed; an
    OSError without a file name (a full disk fails the write, not the open) gets `path` as one.
    """
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def disk_full(e: BaseException) -> bool:
    """Whether `e` says the disk (or the user's quota) is full."""
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def csv_text(columns, rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    w.writerows(rows)
    return buf.getvalue()


def git_commit() -> str | None:
    """The commit of the bnexp source tree, with '-dirty' when it has uncommitted changes."""
    src = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True, timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=src,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
    import torch
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "bnexp": __version__}


def check_writable(results_dir: Path) -> None:
    """Fail early, with one line, if runs cannot be written under `results_dir`."""
    try:
        (results_dir / L.RUNS_DIR).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=results_dir / L.RUNS_DIR, prefix=".write-test-"):
            pass
    except OSError as e:
        raise BnexpError(f"results_dir '{results_dir}' is not writable ({e.strerror}); "
                         f"pass results_dir=<a writable directory>") from None


def skipped_result(rd: "RunDir", info: dict | None = None) -> RunResult:
    """The 'skipped' result of a finished run, from its run.json alone."""
    info = rd.read_info() if info is None else info
    final = info.get("final") if isinstance(info.get("final"), dict) else None  # a hand-edited run.json
    return RunResult(rd.run_id, rd.path, L.SKIPPED, final, message=f"already {info['status']}",
                     epochs_completed=info.get("epochs_completed", 0), extra={"was": info["status"]})


def finished_run(results_dir: Path, run_id: str) -> RunResult | None:
    """The 'skipped' result of this run if it already finished (run.json says completed or diverged),
    else None. Needs no torch: `bnexp train` and a sweep answer a finished run without importing it."""
    rd = RunDir(Path(results_dir), run_id)
    info = rd.read_info()
    return skipped_result(rd, info) if info and info.get("status") in L.FINISHED else None


class RunDir:
    """One run's directory: `results_dir/runs/<run_id>/`."""

    def __init__(self, results_dir: Path, run_id: str):
        self.run_id = run_id
        self.path = L.run_path(results_dir, run_id)
        self._lock = RunLock(self.path / L.LOCK)
        self._step_lines: list[str] = []  # steps.csv lines written so far by this attempt
        # file name -> what is wrong with it, noted by the readers below (which then act as if the
        # file were absent); the caller decides what to do and says so
        self.damaged: dict[str, str] = {}

    # -- locking: one process trains a run at a time (two sweeps over one grid never collide)
    def acquire(self) -> bool:
        self.path.mkdir(parents=True, exist_ok=True)
        return self._lock.acquire()

    def release(self) -> None:
        self._lock.release()

    def lock_free(self) -> bool:
        """Whether no process holds this run's lock now (without creating anything)."""
        return self._lock.is_free()

    def lock_holder_pid(self) -> int | None:
        """The pid of the process that holds the lock now, or held it last if it died holding it."""
        h = self._lock.holder()
        return h[0] if h else None

    def lock_holder(self) -> str:
        """Who holds the lock, as far as the lock file says: "pid 123 on host h (stopped; ...)"."""
        h = self._lock.holder()
        return describe_process(*h) if h else "a process that did not record its pid"

    # -- run.json
    def read_info(self) -> dict | None:
        """run.json as a dict; None if it is missing or damaged (not JSON, not a JSON object)."""
        try:
            info = json.loads((self.path / L.INFO).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
            self.damaged[L.INFO] = f"is unreadable ({reason(e)})"
            return None
        if not isinstance(info, dict):
            self.damaged[L.INFO] = f"holds {json.dumps(info)[:40]}, not a JSON object"
            return None
        return info

    def write_info(self, info: dict) -> None:
        atomic_write_text(self.path / L.INFO, json.dumps(info, indent=2, sort_keys=False) + "\n")

    def status(self) -> str | None:
        info = self.read_info()
        return info.get("status") if info else None

    # -- config, metrics, steps, activations
    def write_config(self, cfg) -> None:
        atomic_write_text(self.path / L.CONFIG, OmegaConf.to_yaml(cfg))

    def _write_table(self, name: str, columns: tuple[str, ...], rows: list[dict]) -> None:
        atomic_write_text(self.path / name, csv_text(columns, ([r[c] for c in columns] for r in rows)))

    def write_metrics(self, rows: list[dict]) -> None:
        self._write_table(L.METRICS, L.METRIC_COLUMNS, rows)

    def write_evals(self, rows: list[dict]) -> None:
        """evals.csv: one row per mid-epoch evaluation (eval_every), rewritten whole after every epoch."""
        self._write_table(L.EVALS, L.EVAL_COLUMNS, rows)

    def write_precise(self, rows: list[dict]) -> None:
        """precise.csv: one row per finished epoch, the test set with precise BN statistics (precise_bn)."""
        self._write_table(L.PRECISE, L.PRECISE_COLUMNS, rows)

    def write_measures(self, rows: list[tuple]) -> None:
        """measures.csv: one row per (step, instrument, layer, statistic), in step order, rewritten whole
        after every epoch; values as Python writes floats (repr: round-trips exactly, nan for undefined)."""
        atomic_write_text(self.path / L.MEASURES, csv_text(L.MEASURE_COLUMNS, rows))

    def record_writes(self, cfg, state: RunState) -> list:
        """The writes of a run's records as of `state`, each on its own (after a crash each is tried even
        if another fails): metrics.csv, evals.csv (eval_every), measures.csv (measure), precise.csv
        (precise_bn) and steps.csv."""
        optional = ((cfg.eval_every, lambda: self.write_evals(state.evals)),
                    (cfg.measure, lambda: self.write_measures(state.measures)),
                    (cfg.precise_bn, lambda: self.write_precise(state.precise)))
        return [lambda: self.write_metrics(state.metrics), *(write for on, write in optional if on),
                lambda: self.write_steps(state.losses, state.steps_per_epoch)]

    def write_records(self, cfg, state: RunState) -> None:
        for write in self.record_writes(cfg, state):
            write()

    def write_steps(self, losses: list[float], steps_per_epoch: list[int]) -> None:
        """steps.csv (step, epoch, loss), rewritten whole after every epoch. The lines of earlier
        epochs are formatted once and kept, so a long run's epochs do not slow down as it grows."""
        lines = self._step_lines
        if len(lines) > len(losses):  # the losses are append-only within an attempt; start over if not
            lines.clear()
        step = 0
        for epoch, n in enumerate(steps_per_epoch, start=1):
            lines += (f"{i + 1},{epoch},{losses[i]:.6g}\n" for i in range(max(step, len(lines)), step + n))
            step += n
        atomic_write_text(self.path / L.STEPS, ",".join(L.STEP_COLUMNS) + "\n" + "".join(lines))

    def write_activations(self, samples: dict[str, np.ndarray]) -> None:
        import numpy as np

        buf = io.BytesIO()
        np.savez(buf, **samples)  # not compressed: float samples shrink ~10% and cost 10x the time
        atomic_write_bytes(self.path / L.ACTIVATIONS, buf.getvalue())

    def read_activations(self) -> dict[str, np.ndarray]:
        """{"e<epoch>/<layer>/<where>": samples}; {} if the file is missing or damaged."""
        import numpy as np

        path = self.path / L.ACTIVATIONS
        if not path.exists():
            return {}
        try:
            with np.load(path) as z:  # a truncated file: BadZipFile; a flipped byte: bad CRC-32
                samples = {k: z[k] for k in z.files}
        except Exception as e:  # noqa: BLE001  BadZipFile, EOFError, ValueError (not an npz), zlib.error...
            self.damaged[L.ACTIVATIONS] = f"is unreadable ({reason(e)})"
            return {}
        if not all(L.parse_activation_key(k) for k in samples):
            self.damaged[L.ACTIVATIONS] = "holds keys other than e<epoch>/<layer>/<where>"
            return {}
        return samples

    # -- checkpoint
    @property
    def checkpoint_path(self) -> Path:
        return self.path / L.CHECKPOINT

    def save_checkpoint(self, state: dict) -> None:
        import torch

        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(self.checkpoint_path, buf.getvalue())

    def load_checkpoint(self) -> dict | None:
        """The checkpoint's dict; None if there is none or it is damaged (it only caches progress)."""
        import torch

        if not self.checkpoint_path.exists():
            return None
        try:
            ckpt = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001  truncated zip, bad pickle, EOFError...
            self.damaged[L.CHECKPOINT] = f"is unreadable ({reason(e)})"
            return None
        if not isinstance(ckpt, dict):
            self.damaged[L.CHECKPOINT] = f"holds a {type(ckpt).__name__}, not a checkpoint"
            return None
        return ckpt

    def clear(self) -> None:
        """Remove the outputs of a previous attempt (for --force), keeping the lock file."""
        for p in self.path.iterdir():
            if p.name != L.LOCK and p.is_file():
                p.unlink()
            elif p.is_dir():
                for q in sorted(p.rglob("*"), reverse=True):
                    q.unlink() if q.is_file() else q.rmdir()
                p.rmdir()
