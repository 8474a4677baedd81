"""Data-parallel runs: N processes train one run, each on its shard of every global batch.

A run on N processes is started by torch's elastic launcher (torch.distributed.run), either by
the user (`torchrun --nproc_per_node=N -m bnexp train ...`) or by bnexp itself (`bnexp train
nproc=N`, `launch` below). Each process reads its place from torchrun's environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and joins the process group: gloo on CPU,
NCCL on CUDA with one GPU per process (cuda:LOCAL_RANK).

    data        every process draws the same seeded per-epoch permutation and takes its
                contiguous shard of each global batch (`shard_bounds`; engine.StepProgram): the global batch of a step
                is the same set of images whatever N is. batch_size is the global batch and must
                divide by N; an epoch's partial last batch is split as evenly as it goes, and
                dropped when it cannot give every process 2 samples (per-process BN needs 2)
    loss        each process weights its mean loss by (its samples * N / the global batch), so that
                DDP's average of the gradients is the gradient of the global batch's mean loss
    timeout     every collective gives up after $BNEXP_DIST_TIMEOUT seconds (default 300): a
                peer that hangs fails the others with one line (`timeout_error`), never forever
    rank 0      writes the run directory, TensorBoard and checkpoints; the others only train

One process (no RANK in the environment) is exactly today's run: nothing here is called.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import socket
import sys
from dataclasses import dataclass

from .errors import BnexpError

TIMEOUT_ENV = "BNEXP_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0
_TIMEOUT_WORDS = ("timed out", "timeout", "connection closed by peer", "connection reset by peer")


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
    if not any(w in text for w in _TIMEOUT_WORDS):
        return None
    return BnexpError(f"rank {place.rank} of {place.world_size}: no answer from the other processes within "
                      f"{timeout_s():g} s (one of them hung or died); rerun the same command to resume from "
                      f"the last checkpoint (${TIMEOUT_ENV} sets the timeout)")


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


def global_batch_sizes(sizes: list[int], batch_size: int, world: int) -> list[int]:
    """An epoch's global batch sizes (data.batch_sizes) on `world` processes: a partial last batch that
    cannot give every process 2 samples is dropped (per-process batch statistics need 2)."""
    if world > 1 and sizes and sizes[-1] != batch_size and sizes[-1] < 2 * world:
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


def check_gpus(nproc: int, device: str) -> None:
    """Enough GPUs for one process each when the run is on CUDA (device=cuda, or auto on a CUDA machine)."""
    if nproc == 1 or not (device == "auto" or device.startswith("cuda")):
        return
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "auto" and gpus == 0:  # auto runs on the CPU here: processes, not GPUs
        return
    if gpus == 0:
        raise BnexpError(f"device={device} but CUDA is not available here; use device=cpu or device=auto")
    if ":" in device:
        raise BnexpError(f"device={device} with nproc={nproc}: each process takes its own GPU (cuda:LOCAL_RANK); "
                         f"use device=cuda")
    if nproc > gpus:
        raise BnexpError(f"nproc={nproc} processes need {nproc} GPUs on device={device}, but {gpus} "
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


def launch_args(nproc: int, argv: list[str], environ=os.environ) -> list[str]:
    """torch.distributed.run's arguments for `bnexp train` on nproc local processes (port checked)."""
    addr = environ.get("MASTER_ADDR", "127.0.0.1")
    if environ.get("MASTER_PORT", "").strip():
        raw = environ["MASTER_PORT"].strip()
        if not raw.isdigit() or not 0 < int(raw) < 65536:
            raise BnexpError(f"MASTER_PORT={raw!r} must be a port number (1-65535)")
        port = int(raw)
        check_port(addr, port)
    else:
        port = free_port(addr)
    return ["--nnodes", "1", "--nproc-per-node", str(nproc), "--rdzv-backend", "static",
            "--master-addr", addr, "--master-port", str(port), "--max-restarts", "0",
            "-m", "bnexp", "train", *argv]


def launch(nproc: int, argv: list[str]) -> int:
    """Run `bnexp train argv` on nproc processes through torch's elastic launcher; the exit code.

    The processes print their own lines (rank 0 the result or the error); a process that dies
    (kill -9, out of memory) stops the others, and this says which one, in one line.
    """
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(launch_args(nproc, argv))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as e:
        codes = {rank: failure.exitcode for rank, failure in e.failures.items()}
        if 2 in codes.values():  # bad input: rank 0 printed the one line
            return 2
        # the process that failed first; the others the launcher stopped (SIGTERM) are not the cause
        rank = min(codes, key=lambda r: (codes[r] == -signal.SIGTERM, e.failures[r].timestamp, r))
        code = codes[rank]
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        print(f"error: process of rank {rank} {how}, the others were stopped; rerun the same command to "
              f"resume from the last checkpoint", file=sys.stderr)
        return 1
    return 0


@contextlib.contextmanager
def quiet_unless_main(place: Place):
    """Silence stdout on ranks > 0: one line per run, printed by rank 0."""
    if place.main:
        yield
        return
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        yield
