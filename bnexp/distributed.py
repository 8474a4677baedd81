"""Data-parallel runs: N processes train one run, each on its shard of every global batch.

A run on N processes is started by torch's elastic launcher (torch.distributed.run), either by
the user (`torchrun --nproc_per_node=N -m bnexp train ...`) or by bnexp itself (`bnexp train
nproc=N`, `run_on_processes` below). Each process reads its place from torchrun's environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and joins the process group: gloo on CPU,
NCCL on CUDA with one GPU per process (cuda:LOCAL_RANK).

    data        every process draws the same seeded per-epoch permutation and takes its contiguous
                shard of each global batch (`shard_bounds`, engine.StepProgram): the global batch of a
                step is the same set of images whatever N is. batch_size is the global batch and must
                divide by N; an epoch's partial last batch is split as evenly as it goes, and dropped
                when a process would get no sample (with per-process batch statistics: fewer than 2)
    loss        each process weights its mean loss by (its samples * N / the global batch), so that
                DDP's average of the gradients is the gradient of the global batch's mean loss
    timeout     every collective gives up after $BNEXP_DIST_TIMEOUT seconds (default 300): a
                peer that hangs fails the others with one line (`timeout_error`), never forever
    rank 0      writes the run directory, TensorBoard and checkpoints; the others only train (ddp.py)
    launcher    `run_on_processes(cfg)` starts cfg.nproc processes with torch's elastic launcher
                (`bnexp train nproc=N`, a sweep's point), each running `train.run`; $MASTER_PORT, if
                set, must be free (else a free port is taken)

One process (no RANK in the environment) is exactly today's run: nothing here is called.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import sys
from dataclasses import dataclass

from .errors import BnexpError

TIMEOUT_ENV = "BNEXP_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0
_TIMEOUT_WORDS = ("timed out", "timeout")
_PEER_LOST_WORDS = ("connection closed by peer", "connection reset by peer", "broken pipe")
PEER_LOST = "lost the other processes"  # the start of the line a process that lost its peers leaves


# ----------------------------------------------------------------------------- this process's place

@dataclass(frozen=True)
class Place:
    """Where this process stands in a data-parallel run (rank 0 of 1 outside one)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes."""
        return self.rank == 0


def from_env(environ=os.environ) -> Place:
    """The place torchrun gives this process (RANK, WORLD_SIZE, LOCAL_RANK), or a single process."""
    if "RANK" not in environ or "WORLD_SIZE" not in environ:
        return Place()
    try:
        return Place(int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise BnexpError(f"RANK={environ['RANK']!r} WORLD_SIZE={environ['WORLD_SIZE']!r}: torchrun's variables "
                         "must be integers") from None


def torchrun_overrides(overrides: list[str], place: Place) -> list[str]:
    """Under torchrun, nproc is the number of processes it started (WORLD_SIZE): added to the overrides
    when they do not give it, refused when they give another number."""
    if place.world_size == 1:
        return overrides
    given = [o.split("=", 1)[1].strip() for o in overrides if o.split("=", 1)[0].lstrip("+~") == "nproc" and "=" in o]
    if not given:
        return [*overrides, f"nproc={place.world_size}"]
    if given[-1] != str(place.world_size):
        raise BnexpError(f"nproc={given[-1]} but torchrun started {place.world_size} processes; leave nproc out "
                         f"under torchrun (it is WORLD_SIZE), or give nproc={place.world_size}")
    return overrides


def timeout_s(environ=os.environ) -> float:
    raw = environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise BnexpError(f"${TIMEOUT_ENV}={raw!r} must be a positive number of seconds")
    return value


def init(place: Place, device_type: str) -> None:
    """Join the process group of torchrun's environment (gloo on CPU, NCCL on CUDA), with the timeout."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(place.local_rank)
    dist.init_process_group(backend, rank=place.rank, world_size=place.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s()))


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def timeout_error(e: BaseException, place: Place) -> BnexpError | None:
    """A collective that timed out or lost its peer -> one line saying so; None for other errors."""
    text = " ".join(str(e).split()).lower()
    if any(w in text for w in _PEER_LOST_WORDS):
        why = "one of them died"
    elif any(w in text for w in _TIMEOUT_WORDS):
        why = f"no answer within {timeout_s():g} s: one of them hung or died (${TIMEOUT_ENV} sets the timeout)"
    else:
        return None
    return BnexpError(f"rank {place.rank} of {place.world_size} {PEER_LOST} ({why}); rerun the same command to "
                      f"resume from the last checkpoint")


# ----------------------------------------------------------------------------- rank-0 helpers

def broadcast(obj, place: Place):
    """Rank 0's `obj` on every process (pickled; for small things: decisions, checkpoints of small models)."""
    if place.world_size == 1:
        return obj
    import torch.distributed as dist

    box = [obj if place.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj, place: Place) -> list:
    """Every process's `obj`, in rank order, on every process."""
    if place.world_size == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * place.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(place: Place) -> None:
    if place.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


# ----------------------------------------------------------------------------- data shards

def shard_bounds(size: int, rank: int, world: int) -> tuple[int, int]:
    """[lo, hi) of rank's contiguous shard of a batch of `size`: equal parts, the first size % world one larger."""
    base, extra = divmod(size, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def global_batch_sizes(sizes: list[int], batch_size: int, world: int, min_shard: int = 1) -> list[int]:
    """An epoch's global batch sizes (data.batch_sizes) on `world` processes: a partial last batch that
    cannot give every process `min_shard` samples is dropped (1; 2 for per-process batch statistics)."""
    if world > 1 and sizes and sizes[-1] != batch_size and sizes[-1] < min_shard * world:
        return sizes[:-1]
    return sizes


def loss_weight(size: int, rank: int, world: int) -> float:
    """The factor on this rank's mean loss over its shard of a global batch of `size` that makes DDP's
    average of the gradients the gradient of the global batch's mean loss: shard * world / size."""
    lo, hi = shard_bounds(size, rank, world)
    return (hi - lo) * world / size


def all_reduce_sum(t):
    """`t` summed over the processes (in place), for the step's records."""
    import torch.distributed as dist

    dist.all_reduce(t)
    return t


# ----------------------------------------------------------------------------- checks and the launcher

def check_split(nproc: int, batch_size: int) -> None:
    """A global batch that divides by the processes (config.validate; nproc >= 1 is checked there)."""
    if batch_size % nproc:
        raise BnexpError(f"batch_size={batch_size} does not divide by nproc={nproc}: batch_size is the global "
                         f"batch, split equally over the processes; use a multiple of {nproc}")


def check_gpus(nproc: int, spec: str, device) -> None:
    """Enough GPUs for one process each when the run is on CUDA. `device` is `spec` resolved by
    train.resolve_device, which owns the checks that the device exists (auto on a CPU machine: CPU processes)."""
    if nproc == 1 or device.type != "cuda":
        return
    import torch

    if ":" in spec:
        raise BnexpError(f"device={spec} with nproc={nproc}: each process takes its own GPU (cuda:LOCAL_RANK); "
                         f"use device=cuda")
    gpus = torch.cuda.device_count()
    if nproc > gpus:
        raise BnexpError(f"nproc={nproc} processes need {nproc} GPUs on device={spec}, but {gpus} "
                         f"{'is' if gpus == 1 else 'are'} visible; use nproc<={gpus}, or device=cpu")


def free_port(addr: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def check_port(addr: str, port: int) -> None:
    """Refuse a rendezvous port that another program holds (the launcher would fail after a wait)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((addr, port))
        except OSError as e:
            raise BnexpError(f"MASTER_PORT={port} on {addr} is in use ({e.strerror}); another run or program "
                             f"holds it: unset MASTER_PORT (bnexp picks a free port) or choose another") from None


def rendezvous(environ=os.environ) -> tuple[str, int]:
    """(address, port) for a run's processes to meet: $MASTER_ADDR (default 127.0.0.1) and $MASTER_PORT,
    which must be free, or a free port when it is unset."""
    addr = environ.get("MASTER_ADDR", "").strip() or "127.0.0.1"
    raw = environ.get("MASTER_PORT", "").strip()
    if not raw:
        return addr, free_port(addr)
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise BnexpError(f"MASTER_PORT={raw!r} must be a port number (1-65535)")
    check_port(addr, int(raw))
    return addr, int(raw)


def _rank_main(container: dict, force: bool, messages: str):
    """One process of a run started by `run_on_processes`: train.run under torchrun's environment.
    Bad input and crashes leave their line in `messages`/<rank> and exit non-zero, so that the
    launcher stops the other processes at once (instead of leaving them to the timeout)."""
    from omegaconf import OmegaConf

    from . import train
    from .launch import quiet_torch_warnings

    quiet_torch_warnings()
    cfg = OmegaConf.create(container)
    OmegaConf.set_readonly(cfg, True)
    place = from_env()
    try:
        return train.run(cfg, force=force)
    except BnexpError as e:
        _leave(messages, place, f"error {e}")
        sys.exit(2)
    except Exception as e:
        line = timeout_error(e, place) or f"{type(e).__name__}: {' '.join(str(e).split())}"
        _leave(messages, place, f"crash {line}")
        raise


def _leave(folder: str, place: Place, line: str) -> None:
    with open(os.path.join(folder, str(place.rank)), "w") as f:
        f.write(line)


def _cpu_threads(nproc: int) -> str:
    """OMP_NUM_THREADS for each of nproc processes: the cores shared out (threads=auto follows it)."""
    from .execution import cpu_cores

    return os.environ.get("OMP_NUM_THREADS") or str(max(1, cpu_cores() // nproc))


def run_on_processes(cfg, force: bool = False):
    """Train `cfg` on cfg.nproc processes started by torch's elastic launcher; rank 0's RunResult.

    Bad input in the processes is raised here as the BnexpError it was. A process that crashes or
    dies (kill -9, the out-of-memory killer) stops the others; the result is then 'failed' with a
    line saying which process and how (the run resumes from its last checkpoint when rerun).
    """
    import logging
    import tempfile

    from omegaconf import OmegaConf
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from . import config as C, preflight
    from .launch import _failed

    preflight.check(cfg)  # bad input is answered before any process starts (GPUs included)
    addr, port = rendezvous()
    launch = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=cfg.nproc, rdzv_backend="static",
                          rdzv_endpoint=f"{addr}:{port}", rdzv_configs={"rank": 0}, max_restarts=0,
                          run_id=C.run_id(cfg), monitor_interval=0.1)
    for name in ("torch.distributed.elastic", "torch.multiprocessing.spawn"):  # this reports the failure itself
        logging.getLogger(name).setLevel(logging.CRITICAL)
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = _cpu_threads(cfg.nproc)
    with tempfile.TemporaryDirectory(prefix="bnexp-ranks-") as messages:
        try:
            results = elastic_launch(launch, _rank_main)(OmegaConf.to_container(cfg), force, messages)
            return results[0]
        except ChildFailedError as e:
            lines = {int(name): open(os.path.join(messages, name)).read() for name in os.listdir(messages)}
            errors = [line for _, line in sorted(lines.items()) if line.startswith("error ")]
            if errors:  # bad input (every process meets it; rank 0's line first)
                raise BnexpError(errors[0][len("error "):]) from None
            rank, how = _first_failure(e, lines)
            why = f"crashed ({lines[rank][len('crash '):]})" if rank in lines else how
            return _failed(cfg, f"process of rank {rank} {why}; the others were stopped, rerun to resume from the "
                                f"last checkpoint")
        finally:
            if saved is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = saved


def _first_failure(e, lines: dict[int, str]) -> tuple[int, str]:
    """(rank, how it ended) of the process that caused the failure: not one the launcher stopped
    (SIGTERM), nor one that only lost its peers (`timeout_error`), unless no other is left."""
    from .launch import exit_reason

    codes = {rank: failure.exitcode for rank, failure in e.failures.items()}

    def blame(r):
        return (codes[r] == -signal.SIGTERM, PEER_LOST in lines.get(r, ""), e.failures[r].timestamp, r)

    rank = min(codes, key=blame)
    return rank, exit_reason(codes[rank])
