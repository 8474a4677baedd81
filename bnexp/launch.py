"""Where a run executes: this process, a pool of spawned processes, joblib (loky), or submitit.

Each launcher trains `train.run(cfg)` for every task and yields (index, RunResult) as runs
finish; a run that raises becomes a 'failed' result, so one crash never stops the others.
A process that dies while it trains a run (kill -9, the out-of-memory killer, a segfault) fails
that run alone: its run.json says `failed` with the reason ("worker process 123 died: killed by
SIGKILL"), unless another process has taken the run over meanwhile, and the other runs go on.
The local pool is our own (`_Worker`: one spawned process and a pipe each), not
concurrent.futures': there a dead worker breaks the whole pool and takes the healthy runs with
it. A dead worker is replaced by a fresh process before the next task is handed out. With
joblib, each loky worker trains in such a child process of its own, so a crash there does not
break loky's pool either; should a loky worker itself die, loky abandons every unfinished task:
those are handed to a fresh pool (at most twice), where interrupted runs resume from their checkpoint.
Workers start in the submitting process's directory with its BNEXP_* environment (a cluster
node may start elsewhere), and with several GPUs each worker process gets its own
(CUDA_VISIBLE_DEVICES, round-robin), set before CUDA starts there. The CPU thread count is not
the launcher's business: each run sets its own from its config (execution.py), so a run's numbers
do not depend on --jobs or on the launcher.

A run's outcome is told in one line (`summary_line`; a crash's cause by `crash_line`), by
`bnexp train` (`train_one`) and for each run of a sweep alike.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

from . import config as C
from . import layout
from .errors import BnexpError

LAUNCHERS = ("local", "joblib", "submitit")


def default_jobs(launcher: str, n_runs: int) -> int:
    """--jobs when not given: 1 locally, one per core with joblib, all at once on a cluster."""
    if launcher == "joblib":
        from .execution import cpu_cores

        return cpu_cores()
    if launcher == "submitit":
        return max(1, n_runs)  # the cluster's scheduler decides what runs when
    return 1


def visible_gpus(devices: list[str]) -> list[str]:
    """GPUs to hand out round-robin: only if several exist and every run lets us choose (auto|cuda)."""
    if not all(d in ("auto", "cuda") for d in devices):
        return []
    import torch

    if not torch.cuda.is_available():
        return []
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = [g.strip() for g in env.split(",") if g.strip()] if env else [str(i) for i in range(torch.cuda.device_count())]
    return gpus if len(gpus) > 1 else []


def parse_options(items: list[str] | None) -> dict:
    """`--launcher-opt KEY=VALUE` pairs -> dict, values read as YAML scalars (60 -> int, gpu -> str)."""
    import yaml

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BnexpError(f"--launcher-opt expects KEY=VALUE, got '{item}'")
        out[key] = yaml.safe_load(value) if value else None
    return out


# ----------------------------------------------------------------------------- one run, anywhere

@dataclass
class Task:
    """What a worker needs to train one grid point, wherever it runs (pickled to it)."""
    index: int
    cfg: object
    cwd: str
    env: dict
    gpus: list[str] = field(default_factory=list)  # pin this process to gpus[slot % len] if non-empty


_pinned = False  # whether this worker process already chose its GPU


def _setup_worker(gpus: list[str], slot: int) -> None:
    """Once per process, before CUDA starts: its own GPU (round-robin)."""
    global _pinned
    if _pinned:
        return
    _pinned = True
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]


def _failed(cfg, message: str):
    from .tracking import RunResult

    rid = C.run_id(cfg)
    return RunResult(rid, layout.run_path(cfg.results_dir, rid), layout.FAILED, message=message)


def run_point(cfg):
    """train.run, with any exception turned into a 'failed' result so the sweep goes on; a run that
    already finished is answered from its run.json, without importing torch (a sweep's finished points)."""
    from .tracking import finished_run

    try:
        if (done := finished_run(Path(cfg.results_dir), C.run_id(cfg))) is not None:
            return done
        from . import train

        return train.run(cfg)
    except Exception as e:  # the run recorded the traceback in its error.log (if it got that far)
        return _failed(cfg, str(e) if isinstance(e, BnexpError) else crash_line(e))


def train_one(cfg, force: bool = False, echo: Callable[..., object] = print) -> int:
    """`bnexp train`: a finished run is answered from its run.json (without importing torch), else it
    is trained here. One line either way (`echo(line)`, `echo(line, err=True)` for a crash); returns
    the exit code: 1 if the run failed, crashed or is held by another process, else 0."""
    from .tracking import finished_run

    if not force and (done := finished_run(Path(cfg.results_dir), C.run_id(cfg))) is not None:
        echo(summary_line(done))
        return 0
    from . import train

    try:
        result = train.run(cfg, force=force)
    except BnexpError:
        raise
    except Exception as e:  # a crash, not bad input: run.json says failed, error.log holds the traceback
        echo(f"failed {C.run_id(cfg)}: {crash_line(e)}", err=True)
        return 1
    echo(summary_line(result))
    return 1 if result.status in (layout.FAILED, layout.BUSY) else 0


def summary_line(r) -> str:
    """One line per run (a RunResult): status, final metrics, time, where it lives."""
    from .outcome import diverged_where

    f = r.final or {}
    metrics = " ".join(f"{k} {f[k]:.4f}" for k in ("train_loss", "train_acc", "test_acc") if f.get(k) is not None)
    extra = ""
    if r.status == layout.DIVERGED and r.extra.get("diverged_at"):
        extra = f" ({diverged_where(r.extra['diverged_at'])})"
    elif r.status == layout.SKIPPED:
        extra = f" ({r.message}; --force retrains)"
    elif r.status in (layout.BUSY, layout.FAILED) and r.message:
        extra = f" ({r.message})"
    elif r.extra.get("resumed_from"):
        extra = f" (resumed after epoch {r.extra['resumed_from']})"
    time = f" {r.seconds:.1f}s" if r.seconds else ""
    return f"{r.status} {r.run_id}: {metrics}{time}{extra} -> {r.path}".replace(":  ", ": ")


def crash_line(e: Exception) -> str:
    """What a crashed run's one line says after `failed <run_id>: `; names a full disk as such, and
    error.log only when this attempt wrote it."""
    from .tracking import disk_full

    log = getattr(e, "error_log", None)
    where = f"; traceback in {log}" if log else ""
    if disk_full(e):
        what = "disk full (ENOSPC)" if e.errno == errno.ENOSPC else "disk quota exceeded (EDQUOT)"
        return (f"{what} writing {e.filename or 'the run directory'}: {e.strerror}; free space there and rerun "
                f"the same command to resume from the last finished epoch{where}")
    return f"{type(e).__name__}: {e}{where}"


def execute(task: Task):
    """Worker entry point (pool, joblib, submitit): the submitting environment, then the run."""
    if os.getcwd() != task.cwd:
        os.chdir(task.cwd)  # relative results_dir/data_dir mean the same as where the sweep started
    os.environ.update(task.env)
    _setup_worker(task.gpus, task.index)
    quiet_torch_warnings()
    return run_point(task.cfg)


def quiet_torch_warnings() -> None:
    """Inductor imports torch.utils.cpp_extension, which warns on every CPU-only machine that has a
    CUDA toolkit ("No CUDA runtime is found"): noise for a bnexp user, in the CLI and in its workers."""
    import logging

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def _die_with_parent() -> None:
    """Linux: the kernel kills this process when the process that started it dies."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def exit_reason(code: int | None) -> str:
    """A process's exit code in words: 'killed by SIGKILL', 'exited with code 3'."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def record_death(cfg, reason: str, details: str = ""):
    """The result of a run whose process died mid-run: run.json says failed with `reason`.

    Only a run whose lock is free is touched (never one another process trains now), and only if
    run.json still says running (the dead process could not write its end); a run that finished
    just before its process died is reported as finished."""
    from .tracking import RunDir, atomic_write_text, now_iso

    rd = RunDir(Path(cfg.results_dir), C.run_id(cfg))
    last = rd.lock_holder_pid()  # a killed holder's name stays in the lock file
    if last and not re.search(rf"\b{last}\b", reason):
        reason += f" (training process pid {last})"
    result = _failed(cfg, reason)
    if rd.path.is_dir() and rd.acquire():
        try:
            info = rd.read_info()
            if info and info.get("status") in layout.FINISHED:
                return run_point(cfg)  # 'skipped: already completed'
            if info and info.get("status") == layout.RUNNING:
                rd.write_info({**info, "status": layout.FAILED, "error": reason, "ended": now_iso()})
                atomic_write_text(rd.path / layout.ERROR_LOG, f"{reason}\n(no traceback: the process was killed; "
                                                           f"SIGKILL is also what the out-of-memory killer sends)\n"
                                  + (f"\n{details.strip()}\n" if details else ""))
                # the summary shows how far it got
                result = replace(result, final=info.get("final"), epochs_completed=info.get("epochs_completed", 0))
        finally:
            rd.release()
    return result


def _worker_main(conn) -> None:
    """A worker process: train each task it is sent, send back (index, result); stop at None or EOF.
    The process's own settings (its GPU) come from its first task, in `execute`."""
    _die_with_parent()
    try:
        while (task := conn.recv()) is not None:
            conn.send((task.index, execute(task)))
    except (EOFError, OSError):  # the sweep is gone
        pass
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: the sweep says what happened
        pass


class _Worker:
    """One spawned worker process and the pipe to it; `task` is what it trains now (None: idle)."""

    def __init__(self, slot: int):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")  # fork after torch threads / CUDA is unsafe
        self.conn, child = ctx.Pipe()
        self.slot, self.task = slot, None
        self.proc = ctx.Process(target=_worker_main, args=(child,), name=f"bnexp-worker-{slot}")
        self.proc.start()
        child.close()

    def give(self, task: Task) -> bool:
        """Hand `task` over; False if the worker is gone (the task was not started)."""
        try:
            self.conn.send(task)
        except OSError:  # BrokenPipeError: it died while idle
            return False
        self.task = task
        return True

    def outcome(self):
        """(index, RunResult) once the current task ended (sent, or its process died); else None."""
        try:
            if self.conn.poll():
                msg = self.conn.recv()
                self.task = None
                return msg
        except (EOFError, OSError):
            pass
        if self.proc.is_alive():
            return None
        self.proc.join()
        task, self.task = self.task, None
        return task.index, record_death(task.cfg, f"worker process {self.proc.pid} died: "
                                                  f"{exit_reason(self.proc.exitcode)}")

    def run(self, task: Task):
        """Train `task` and wait for it (the joblib worker's way)."""
        from multiprocessing.connection import wait

        if not self.give(task):
            return None
        while (out := self.outcome()) is None:
            wait([self.conn, self.proc.sentinel])
        return out

    def stop(self, wait_s: float = 10.0) -> None:
        """Ask it to exit; kill it if it has not after `wait_s` (0: terminate now)."""
        if wait_s and self.task is None:
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.proc.join(wait_s)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        self.conn.close()


class SubmititCall:
    """The function submitit pickles: checkpointable, so a preempted or timed-out SLURM job is
    requeued and `train.run` resumes it from the run's last checkpoint."""

    def __call__(self, task: Task):
        return execute(task)

    def checkpoint(self, task: Task):
        import submitit

        return submitit.helpers.DelayedSubmission(self, task)


# ----------------------------------------------------------------------------- launchers
# Each takes the tasks to run and yields (index, RunResult) as runs finish.

def _launch_serial(tasks: list[Task], jobs: int, opts: dict) -> Iterator:
    for t in tasks:
        yield t.index, run_point(t.cfg)


def _launch_pool(tasks: list[Task], jobs: int, opts: dict) -> Iterator:
    from multiprocessing.connection import wait

    queue = list(tasks)
    workers = [_Worker(slot) for slot in range(min(jobs, len(tasks)))]
    try:
        while True:
            for slot, w in enumerate(workers):
                while w.task is None and queue:
                    if not w.proc.is_alive():  # it died while idle: a fresh one takes its slot
                        w.stop(0)
                        workers[slot] = w = _Worker(slot)
                    if w.give(queue[0]):
                        queue.pop(0)
            busy = [w for w in workers if w.task is not None]
            if not busy:
                break
            wait([w.conn for w in busy] + [w.proc.sentinel for w in busy])
            for w in busy:
                out = w.outcome()
                if out is not None:
                    yield out
    except BaseException:  # Ctrl-C, or the consumer stopped: stop now, like a serial sweep would
        for w in workers:  # a killed run loses at most its epoch in progress
            w.stop(0)
        raise
    for w in workers:
        w.stop()


POOL_RESTARTS = 2  # joblib: fresh loky pools after a loky worker died, before the unfinished runs fail


def _launch_joblib(tasks: list[Task], jobs: int, opts: dict) -> Iterator:
    from joblib import Parallel, delayed

    todo = list(tasks)
    for _ in range(POOL_RESTARTS + 1):
        par = Parallel(n_jobs=jobs, return_as="generator_unordered", **{"backend": "loky", **opts})
        done = set()
        try:
            for i, r in par(delayed(_indexed)(t) for t in todo):
                done.add(i)
                yield i, r
            return
        except Exception as e:  # a loky worker died (TerminatedWorkerError): loky abandons the batch
            todo = [t for t in todo if t.index not in done]
            why = f"joblib worker failed ({type(e).__name__}: {str(e).splitlines()[0]})"
    for t in todo:
        yield t.index, record_death(t.cfg, why)


_trainer: _Worker | None = None  # in a loky worker: the process that trains its tasks


def _stop_trainer() -> None:
    if _trainer is not None:
        _trainer.stop()


def _indexed(task: Task):
    """A loky worker's task: trained in a child process, so that a crash there fails this run only."""
    global _trainer
    if os.getcwd() != task.cwd:
        os.chdir(task.cwd)  # inherited by the child, as are the BNEXP_* variables
    os.environ.update(task.env)
    import multiprocessing as mp

    if mp.get_start_method(allow_none=True) not in (None, "spawn"):
        # loky's own ("loky") is the default here, and a spawned child is told to use the default
        mp.set_start_method("spawn", force=True)
    for _ in range(2):
        if _trainer is None or not _trainer.proc.is_alive():
            if _trainer is None:  # when loky stops this worker: stop the child before waiting for it
                mp.util.Finalize(None, _stop_trainer, exitpriority=10)
            _trainer = _Worker(task.index)
        out = _trainer.run(task)
        if out is not None:
            return out
        _trainer.stop(0)  # it died while idle: start another for this task
        _trainer = None
    return task.index, _failed(task.cfg, "could not start a training process")


def _launch_submitit(tasks: list[Task], jobs: int, opts: dict) -> Iterator:
    try:
        import submitit
    except ImportError:
        raise BnexpError("--launcher submitit needs the submitit package: pip install 'submitit>=1.5'") from None
    opts = dict(opts)
    folder = Path(tasks[0].cfg.results_dir) / "submitit"  # job logs and pickles, beside runs/
    try:
        ex = submitit.AutoExecutor(folder=folder, cluster=opts.pop("cluster", None))
        ex.update_parameters(**{"name": "bnexp-sweep", "timeout_min": 24 * 60, **opts})
    except (NameError, ValueError, AssertionError, TypeError) as e:
        raise BnexpError(f"submitit rejected the launcher options: {str(e).splitlines()[0]}") from None
    call = SubmititCall()
    if ex.cluster == "slurm":  # one job array; SLURM runs at most `jobs` of it at once
        ex.update_parameters(slurm_array_parallelism=jobs)
        tasks = [replace(t, gpus=[]) for t in tasks]  # SLURM assigns the GPUs (gpus_per_node=...)
        running = dict(zip(ex.map_array(call, tasks), tasks))
        queue: list[Task] = []
    else:  # local processes: keep `jobs` of them running
        running, queue = {}, list(tasks)
    while running or queue:
        while queue and len(running) < jobs:
            t = queue.pop(0)
            running[ex.submit(call, t)] = t
        finished = [j for j in running if j.done()]
        for j in finished:
            t = running.pop(j)
            try:
                yield t.index, j.result()
            except Exception as e:  # the job died (killed, timed out without requeue, ...)
                yield t.index, record_death(t.cfg, _job_death(j), details=str(e))
        if not finished:
            time.sleep(0.5)


def _job_death(job) -> str:
    """Why a submitit job ended without a result: the exit signal (local jobs) or the job state (SLURM)."""
    code = getattr(getattr(job, "_process", None), "returncode", None)  # a local job's process
    try:
        how = exit_reason(code) if code else f"no result (job state {job.state})"
    except Exception:  # sacct unreachable
        how = "no result"
    return f"submitit job {job.job_id} died: {how}"


_LAUNCH = {"serial": _launch_serial, "local": _launch_pool, "joblib": _launch_joblib, "submitit": _launch_submitit}


def launch(name: str, tasks: list[Task], jobs: int, options: dict | None = None) -> Iterator:
    """Run `tasks` through launcher `name` ('serial' = this process), at most `jobs` at once."""
    return _LAUNCH[name](tasks, jobs, dict(options or {}))
