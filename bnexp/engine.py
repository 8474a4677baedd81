"""The training step: one static program per run, run eagerly or replayed as a CUDA graph.

Small-image training on a GPU is bound by kernel launches, not FLOPs: a LeNet5 step is ~100
tiny kernels, each costing more to launch from Python than to run. So the whole step, from
gathering the batch out of the device-resident data set to the optimiser update and the
bookkeeping of loss and accuracy, is written as one function of *static* buffers only:

    order    (n,)      this epoch's permutation of the training set (copied in once per epoch)
    counter  (1,)      which batch comes next; the step reads its indices from order[counter]
    losses   (steps,)  per-step loss and number of correct predictions, written at [counter]
    correct  (steps,)

It takes no arguments and calls nothing that waits for the device, so on CUDA it is captured
once into a CUDA graph (`torch.cuda.graph`) and every full batch of an epoch is one
`graph.replay()`: one launch instead of ~100. The last, partial batch (a different shape) runs
the same function eagerly. Elsewhere, and with `cuda_graphs=off`, every step runs eagerly; the
numbers are the same either way up to floating-point reassociation.

Capturing needs warm-up steps first (lazy optimiser state, kernel compilation); they change
the model. Everything they change is restored afterwards (parameters, buffers, optimiser
state, random generators), so a captured run follows the same trajectory as an eager one.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import data
from .execution import PRECISIONS
from .errors import BnexpError

WARMUP_STEPS = 3  # eager steps before capture: optimiser state, compiled kernels, cuBLAS workspaces


@dataclass(frozen=True)
class ExecOptions:
    """How the step executes (not what it computes, apart from precision)."""
    precision: str = "fp32"        # fp32 | bf16 (autocast)
    channels_last: bool = False    # NHWC activations and conv weights
    cuda_graphs: str = "auto"      # auto | on | off

    @classmethod
    def from_cfg(cls, cfg) -> ExecOptions:
        return cls(cfg.precision, cfg.channels_last, cfg.cuda_graphs)


def graphs_wanted(opts: ExecOptions, device: torch.device, norm_momentum) -> bool:
    """Whether to capture the step: `auto` on CUDA, unless the model needs a host value per step.

    BN with momentum=null (cumulative average) reads num_batches_tracked on the host every step
    (1 / count, in torch's layers and ours), which a CUDA graph cannot do.
    """
    if opts.cuda_graphs == "off" or device.type != "cuda":
        if opts.cuda_graphs == "on" and device.type != "cuda":
            raise BnexpError(f"cuda_graphs=on needs a CUDA device, but the run is on {device.type}; "
                             "use cuda_graphs=auto or device=cuda")
        return False
    if norm_momentum is None:
        if opts.cuda_graphs == "on":
            raise BnexpError("cuda_graphs=on cannot capture BN with norm.momentum=null (it reads the batch count "
                             "on the host every step); use cuda_graphs=auto/off or a numeric norm.momentum")
        return False
    return True


def autocast(device: torch.device, precision: str):
    """The autocast context for `precision` (a no-op for fp32).

    cache_enabled=False: autocast's weight-cast cache would otherwise keep casts made during
    CUDA-graph capture alive and reuse them after the weights changed.
    """
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype), cache_enabled=False)


def model_input(xb: torch.Tensor, size: int, channels_last: bool) -> torch.Tensor:
    """uint8 batch -> the float input the model takes, in its memory format."""
    x = data.to_input(xb, size)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class _Snapshot:
    """Model parameters and buffers, optimiser state and RNG states, restorable in place.

    In place matters: a captured graph holds the addresses of these tensors. Optimiser state
    created after the snapshot (SGD's momentum buffer, Adam's moments and step) is zeroed on
    restore, which is exactly what a fresh optimiser's first step computes with (buf = 0*m + g).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device):
        self.model, self.optimizer, self.device = model, optimizer, device
        self.tensors = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
        self.state = {(id(p), key): t.detach().clone() for p, st in optimizer.state.items()
                      for key, t in st.items() if isinstance(t, torch.Tensor)}
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @torch.no_grad()
    def restore(self) -> None:
        for k, v in self.model.state_dict(keep_vars=True).items():
            v.copy_(self.tensors[k])
        for p, st in self.optimizer.state.items():
            for key, t in st.items():
                if isinstance(t, torch.Tensor):
                    saved = self.state.get((id(p), key))
                    if saved is None:  # created by the warm-up
                        t.zero_()
                    else:
                        t.copy_(saved)
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng, self.device)


class CudaGraph:
    """`torch.cuda.graph` capture behind the interface `StepProgram` uses (tests substitute a fake)."""

    def __init__(self):
        self.graph = torch.cuda.CUDAGraph()

    @staticmethod
    def warm_up(fn, steps: int) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(steps):
                fn()
        torch.cuda.current_stream().wait_stream(side)

    def capture(self, fn) -> None:
        with torch.cuda.graph(self.graph):
            fn()

    def replay(self) -> None:
        self.graph.replay()


class StepProgram:
    """The training step of one run over its resident training split (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, train: data.Split,
                 batch_size: int, drop_last: bool, device: torch.device, opts: ExecOptions,
                 use_graphs: bool = False, graph_factory=CudaGraph):
        self.model, self.optimizer, self.train, self.device, self.opts = model, optimizer, train, device, opts
        n = len(train)
        self.batch_size = batch_size
        self.batch_sizes = data.batch_sizes(n, batch_size, shuffled=True, drop_last=drop_last)
        self.full = n // batch_size  # full batches: the captured step; then the partial one, if kept
        self.steps = len(self.batch_sizes)
        self.order = torch.arange(n, device=device)
        self.counter = torch.zeros(1, dtype=torch.long, device=device)
        self.losses = torch.zeros(self.steps, device=device)
        self.correct = torch.zeros(self.steps, dtype=torch.long, device=device)
        self.use_graphs = use_graphs and self.full > 0
        self.graph_factory = graph_factory
        self.graph = None

    def _step(self, idx: torch.Tensor) -> None:
        """One optimisation step on the samples `idx`; results land at [counter]. Static: capturable."""
        xb = model_input(self.train.x[idx], self.model.input_size, self.opts.channels_last)
        yb = self.train.y[idx]
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.opts.precision):
            out = self.model(xb)
            loss = F.cross_entropy(out, yb)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            self.losses.index_copy_(0, self.counter, loss.detach().float().view(1))
            self.correct.index_copy_(0, self.counter, (out.argmax(1) == yb).sum().view(1))
            self.counter += 1

    def _full_step(self) -> None:
        rows = self.order[:self.full * self.batch_size].view(self.full, self.batch_size)
        self._step(rows.index_select(0, self.counter).view(-1))

    def _rest_step(self) -> None:
        self._step(self.order[self.full * self.batch_size:])

    def _capture(self) -> None:
        """Warm up, capture the full-batch step, and undo everything the warm-up changed."""
        snapshot = _Snapshot(self.model, self.optimizer, self.device)
        graph = self.graph_factory()
        try:
            def warm():
                self.counter.zero_()
                self._full_step()
            graph.warm_up(warm, WARMUP_STEPS)
            self.counter.zero_()
            graph.capture(self._full_step)
        finally:
            snapshot.restore()
            self.counter.zero_()
        self.graph = graph

    def run_epoch(self, order: torch.Tensor, check_every: int, bar=None, epoch: int = 0, on_step=None) -> int:
        """Train one epoch in the given sample order; return the number of steps taken.

        Every `check_every` steps the last loss is read on the host (the only sync): a non-finite
        loss stops the epoch there, and the steps taken end at the first non-finite loss.
        `on_step(k)`, if given, is called after the epoch's k-th step, outside any captured graph.
        """
        self.model.train()  # before a capture too: the graph records train-mode layers
        if self.use_graphs and self.graph is None:
            self._capture()
        self.order.copy_(order)
        self.counter.zero_()
        done = self.steps
        for i in range(self.steps):
            if i < self.full:
                self.graph.replay() if self.graph is not None else self._full_step()
            else:
                self._rest_step()
            if on_step is not None:
                on_step(i + 1)
            if (i + 1) % check_every == 0 or i + 1 == self.steps:
                value = self.losses[i].item()
                if bar is not None:
                    bar.update(check_every if (i + 1) % check_every == 0 else (i + 1) % check_every)
                    bar.set_postfix(epoch=epoch, loss=f"{value:.4f}", refresh=False)
                if not math.isfinite(value):
                    bad = (~torch.isfinite(self.losses[:i + 1])).nonzero()
                    done = int(bad[0]) + 1
                    break
        return done

