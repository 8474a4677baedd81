"""Where a run executes: this process, a pool of spawned processes, joblib (loky), or submitit.

Each launcher trains `train.run(cfg)` for every task and yields (index, RunResult) as runs
finish; a run that raises becomes a 'failed' result, so one crash never stops the others.
Workers start in the submitting process's directory with its BNEXP_* environment (a cluster
node may start elsewhere), and with several GPUs each worker process gets its own
(CUDA_VISIBLE_DEVICES, round-robin), set before CUDA starts there. The CPU thread count is not
the launcher's business: each run sets its own from its config (execution.py), so a run's numbers
do not depend on --jobs or on the launcher.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

from . import config as C
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
    from .train import RunResult

    rid = C.run_id(cfg)
    return RunResult(rid, Path(cfg.results_dir) / "runs" / rid, "failed", message=message)


def run_point(cfg):
    """train.run, with any exception turned into a 'failed' result so the sweep goes on."""
    from . import train

    try:
        return train.run(cfg)
    except Exception as e:  # the run recorded the traceback in its error.log (if it got that far)
        return _failed(cfg, str(e) if isinstance(e, BnexpError) else f"{type(e).__name__}: {e}")


def execute(task: Task):
    """Worker entry point (pool, joblib, submitit): the submitting environment, then the run."""
    if os.getcwd() != task.cwd:
        os.chdir(task.cwd)  # relative results_dir/data_dir mean the same as where the sweep started
    os.environ.update(task.env)
    _setup_worker(task.gpus, task.index)
    return run_point(task.cfg)


def _init_pool_worker(gpus: list[str], counter) -> None:
    """Pool initializer: die with the parent (Linux), take the next GPU slot."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    with counter.get_lock():
        slot = counter.value
        counter.value += 1
    _setup_worker(gpus, slot)


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
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    ctx = mp.get_context("spawn")  # fork after torch threads / CUDA is unsafe
    ex = ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=ctx, initializer=_init_pool_worker,
                             initargs=(tasks[0].gpus, ctx.Value("i", 0)))
    try:
        futures = {ex.submit(run_point, t.cfg): t for t in tasks}
        for f in as_completed(futures):
            t = futures[f]
            try:
                yield t.index, f.result()
            except Exception as e:  # the worker process died (OOM killer, segfault): BrokenProcessPool
                yield t.index, _failed(t.cfg, f"worker process died ({type(e).__name__}: {e})")
    except BaseException:  # Ctrl-C, or the consumer stopped: stop now, like a serial sweep would
        # Workers would otherwise go on with the runs already queued to them (and the interpreter
        # waits for them at exit); a killed run loses at most its epoch in progress.
        procs = list((getattr(ex, "_processes", None) or {}).values())  # no public API before 3.14
        for proc in procs:
            proc.terminate()
        ex.shutdown(wait=False, cancel_futures=True)
        raise
    ex.shutdown(wait=True)


def _launch_joblib(tasks: list[Task], jobs: int, opts: dict) -> Iterator:
    from joblib import Parallel, delayed

    par = Parallel(n_jobs=jobs, return_as="generator_unordered", **{"backend": "loky", **opts})
    done = set()
    try:
        for i, r in par(delayed(_indexed)(t) for t in tasks):
            done.add(i)
            yield i, r
    except Exception as e:  # a worker died: joblib abandons the batch
        for t in tasks:
            if t.index not in done:
                yield t.index, _failed(t.cfg, f"joblib worker failed ({type(e).__name__}: {e})")


def _indexed(task: Task):
    return task.index, execute(task)


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
                yield t.index, _failed(t.cfg, f"submitit job {j.job_id} failed: {str(e).strip().splitlines()[-1]}")
        if not finished:
            time.sleep(0.5)


_LAUNCH = {"serial": _launch_serial, "local": _launch_pool, "joblib": _launch_joblib, "submitit": _launch_submitit}


def launch(name: str, tasks: list[Task], jobs: int, options: dict | None = None) -> Iterator:
    """Run `tasks` through launcher `name` ('serial' = this process), at most `jobs` at once."""
    return _LAUNCH[name](tasks, jobs, dict(options or {}))
