"""How a run computes: every execution setting that can change its numbers, fixed per run and recorded.

Two runs of one config give bit-identical numbers only if they also run the same kernels in the
same order of floating-point operations. On a CPU the intra-op thread count changes how a
convolution's reductions are split (FashionMNIST LeNet5, 2 epochs: test_acc 0.8145 with one
thread, 0.8223 with two, same seed); so does the batch-norm backend (compiled vs eager), and on a
GPU the TF32 and cuDNN flags and the GPU model. So these are chosen from the run's config and the
machine alone, never from how the run was launched (`bnexp train`, `bnexp sweep --jobs N`, a
launcher), and they are written to run.json and the checkpoint as `execution`. A resume whose
settings differ from the checkpoint's is refused (`mismatch`), never silently mixed.

    threads=auto   $OMP_NUM_THREADS if set, else the CPU cores this process may run on
    threads=N      exactly N intra-op threads
    norm.backend   the bnexp batch-norm backend asked for (default $BNEXP_BN_BACKEND, else auto);
                   `auto` is resolved before the first training step (its kernels are compiled on
                   a copy of the model), then pinned for the whole run, so a compilation failure
                   can no longer switch backends mid-run: it fails the run instead
"""

from __future__ import annotations

import contextlib
import copy
import os
import platform
from functools import lru_cache

from .errors import BnexpError

# torch is imported inside the functions that use it: the sweep's planning, its summary and a
# skipped run need only cpu_cores / resolve_threads / mismatch, and should not pay torch's import.

# The choices of the config keys precision and cuda_graphs (checked by config, applied by engine):
# precision -> the autocast dtype (a torch dtype's name; None: no autocast).
PRECISIONS = {"fp32": None, "bf16": "bfloat16"}
CUDA_GRAPHS = ("auto", "on", "off")  # auto: capture the training step on CUDA devices

# Settings compared on resume: everything in the record but the bookkeeping of when it was taken.
COMPARED = ("device_type", "device_name", "threads", "bn_backend", "precision", "channels_last", "cuda_graphs",
            "deterministic_algorithms", "cudnn_deterministic", "cudnn_benchmark", "cudnn_allow_tf32",
            "matmul_allow_tf32", "float32_matmul_precision", "torch")


def cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, e.g. a SLURM allocation)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def resolve_threads(spec) -> int:
    """`threads` config value -> the intra-op thread count of the run."""
    if spec != "auto":
        return int(spec)
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return cpu_cores()


@lru_cache(maxsize=None)
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()


def uses_bnexp_norms(model: torch.nn.Module) -> bool:
    """Whether the model has layers of bnexp.nn (BN and the family), whose kernels the backend chooses."""
    return any(type(m).__module__.startswith("bnexp.nn.") for m in model.modules())


def pin_bn_backend(model: torch.nn.Module, requested: str, example: torch.Tensor, precision_ctx) -> str | None:
    """Resolve `requested` ('auto' included) to the backend that runs this model's batch norms.

    A forward and backward pass of a throw-away copy of the model on `example` (a training batch)
    compiles every kernel the run's training steps need (their signature is dtype, rank and
    layout, not the batch size), so an `auto` fallback happens here, before the first step, and
    the answer is final. No state of `model`, no random stream and no optimiser is touched.
    Returns None for a model without bnexp.nn layers (norm=torch or none).
    """
    import torch
    import torch.nn.functional as F

    from .nn import dispatch

    if not uses_bnexp_norms(model):
        return None
    with dispatch.use_backend(requested):
        if requested in ("auto", "compiled", "triton"):
            twin = copy.deepcopy(model).train()
            devices = [example.device] if example.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices), precision_ctx():
                out = twin(example)
                F.cross_entropy(out.float(), torch.zeros(out.shape[0], dtype=torch.long, device=out.device)).backward()
            del twin
        return dispatch.resolved_backend(example.device)


def record(device: torch.device, threads: int, bn_backend: str | None, opts, use_graphs: bool) -> dict:
    """The execution settings of this process for a run, as written to run.json and the checkpoint."""
    import torch

    cudnn = torch.backends.cudnn
    return {
        "device_type": device.type, "device_name": device_name(device), "threads": threads,
        "bn_backend": bn_backend, "precision": opts.precision, "channels_last": opts.channels_last,
        "cuda_graphs": use_graphs,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": bool(cudnn.deterministic), "cudnn_benchmark": bool(cudnn.benchmark),
        "cudnn_allow_tf32": bool(cudnn.allow_tf32), "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "float32_matmul_precision": torch.get_float32_matmul_precision(), "torch": torch.__version__,
    }


# Config keys that choose a setting, for the message that says how to resume.
_HOW = {"threads": "threads={}", "bn_backend": "norm.backend={}", "precision": "precision={}",
        "channels_last": "channels_last={}"}


def mismatch(run_id: str, saved: dict | None, current: dict) -> BnexpError | None:
    """None if a checkpoint taken under `saved` may be resumed under `current`, else the error to raise."""
    if saved is None:
        return BnexpError(f"run {run_id} has a checkpoint from an older bnexp that did not record its execution "
                          "settings, so resuming could mix two; rerun with --force to retrain it")
    diffs = [k for k in COMPARED if saved.get(k) != current.get(k)]
    if not diffs:
        return None
    what = ", ".join(f"{k} {saved.get(k)!r} then, {current.get(k)!r} now" for k in diffs)
    fixes = [_HOW[k].format(str(saved[k]).lower() if isinstance(saved[k], bool) else saved[k])
             for k in diffs if k in _HOW and saved.get(k) is not None]
    how = f"rerun with {' '.join(fixes)} to resume it, or " if len(fixes) == len(diffs) else ""
    return BnexpError(f"run {run_id} was started under other execution settings ({what}); resuming would mix "
                      f"two computations: {how}rerun with --force to retrain it")


@contextlib.contextmanager
def applied(threads: int, bn_backend: str | None):
    """Run the block with `threads` intra-op threads and the pinned backend; restore both afterwards."""
    import torch

    from .nn import dispatch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with (dispatch.use_backend(bn_backend) if bn_backend else contextlib.nullcontext()):
            yield
    finally:
        torch.set_num_threads(previous)
