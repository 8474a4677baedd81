"""Measurement instruments recorded during training (measures.csv): why BN helps, not only that it does.

At a measurement of step t (after t updates; results/README.md) the parameters are theta, the batch
is the one step t+1 trains on, and g = grad L(theta) is that batch's gradient (L: the training
step's mean cross-entropy, under the run's precision and memory format).

  landscape        L(theta - eta g) over the step grid: min and max, and L(theta) itself
                   (Santurkar et al. 2018, Fig. 4a: the band of losses one step could reach)
  predictiveness   ||g - grad L(theta - eta g)||_2 over the grid: min and max (Fig. 4b: how well the
                   gradient here predicts the gradient where the step lands)
  beta_smoothness  max over the grid of ||g - grad L(theta - eta g)||_2 / ||eta g||_2 (Fig. 4c: the
                   "effective" beta-smoothness, a Lipschitz constant of the gradient along g)
  ics              per weight layer i: G = grad_{W_i} L(theta) and G' = the same gradient after every
                   parameter before layer i got its step-t+1 update (the optimiser's own update, with
                   momentum, Adam moments and weight decay, on copies), same batch: ||G - G'||_2 and
                   cos(G, G') (Santurkar et al. 2018, section 2.2, their definition of ICS)
  saturation       per nonlinearity, on the run's fixed probe batch of test images (train mode, as the
                   activation probes): sigmoid/tanh: the fraction of inputs in the saturated region and
                   the mean derivative; relu: the fraction of units inactive on the whole batch (dead)
                   and the mean fraction of active units
  weights          per weight layer ||W||_2, ||grad_W L||_2, and for scale-invariant weights the
                   effective step lr * ||grad_W L|| / ||W||

The grid is `measure_steps`, multiples of the run's effective lr: eta = m * lr. Default [0.5, 1, 2, 4]:
the step training takes (m = 1), half of it, and two and four times it. Santurkar et al. move
along g by a range of step sizes; spacing them by factors of 2 around the run's own step makes
one band cover the learning rates on both sides of it, up to the 4x larger ones BN is said to
allow. Multiples of lr rather than absolute sizes keep the band comparable between runs of
different lr. Four points cost four forward-backward passes per measurement (README, "What the
instruments cost").

Saturated region: sigmoid |z| > 4, tanh |z| > 2. There the derivative is below 7.1% of its
maximum (sigmoid'(4) = 0.0177 of 0.25, tanh'(2) = 0.0707 of 1; the two thresholds are the same
point, since tanh(z) = 2 sigmoid(2z) - 1), so a gradient passing through the unit shrinks
more than 14-fold: the "saturated regime" Ioffe & Szegedy 2015 (section 2) say BN keeps
nonlinearities out of.

Scale-invariant weights: a conv/linear weight whose output goes straight into a norm layer that
subtracts a per-channel mean and divides by a per-channel deviation computed from the batch (or
sample) itself: kinds bn, torch, ghost, noisy and in with the norm before the nonlinearity. Then
norm(c W x + b) = norm(W x) for every c > 0 (the bias cancels in the mean), so only W's direction
matters and an SGD step moves it by an angle ~ lr * ||grad W|| / ||W||: weight decay, shrinking
||W||, raises this effective step (van Laarhoven 2017). gn/ln normalise a group of channels with
one mean, so the bias does not cancel (only (W, b) together are scale-invariant); brn's r and d
depend on the running statistics; the output layer has no norm. Those get no effective_step.

No side effects: measuring changes nothing the training reads. Parameters and buffers are used
through torch.func.functional_call with fresh clones of every buffer per forward (BN running
statistics and num_batches_tracked stay untouched), gradients come from torch.autograd.grad (no
.grad of the live model is touched: CUDA graphs hold those tensors), the optimiser's update for
`ics` runs on a copy of the optimiser and parameters, and the CPU and CUDA random streams are
forked (torch.random.fork_rng). Within a measurement every forward starts from the same RNG state
(the one the next training step will use), so dropout masks and noisy-BN draws are the same at
every point of the grid: the grid compares parameters, not noise draws, and L(theta) is the loss
the next training step computes.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from . import engine
from . import measures_format as MF
from .errors import BnexpError

INSTRUMENTS = MF.INSTRUMENTS
GRID_INSTRUMENTS = MF.WHOLE_MODEL  # they share the grid passes
WEIGHT_LAYERS = (nn.Conv2d, nn.Linear)
SIGMOID_SATURATED = 4.0  # |z| beyond which sigmoid' < 0.0177 (7.1% of its maximum 0.25)
TANH_SATURATED = 2.0     # |z| beyond which tanh' < 0.0707 (7.1% of its maximum 1): sigmoid's point, rescaled
# norm kinds that make the preceding weight scale-invariant when the norm sits before the nonlinearity
SCALE_INVARIANT_KINDS = ("bn", "torch", "ghost", "noisy", "in")

Row = tuple[int, str, str, str, float]  # step, instrument, layer, statistic, value (measures.csv)


def _sigmoid_stats(z: torch.Tensor) -> dict[str, torch.Tensor]:
    s = torch.sigmoid(z)
    return {"saturated": (z.abs() > SIGMOID_SATURATED).float().mean(), "mean_derivative": (s * (1 - s)).mean()}


def _tanh_stats(z: torch.Tensor) -> dict[str, torch.Tensor]:
    t = torch.tanh(z)
    return {"saturated": (z.abs() > TANH_SATURATED).float().mean(), "mean_derivative": (1 - t * t).mean()}


def _relu_stats(z: torch.Tensor) -> dict[str, torch.Tensor]:
    """A unit is one output element of a sample (a channel at one position, or a feature)."""
    active = z > 0
    return {"dead": (~active.any(dim=0)).float().mean(), "active": active.float().mean()}


# the nonlinearities saturation has a definition for (module type -> statistics of its inputs z)
SATURATION_STATS = {nn.Sigmoid: _sigmoid_stats, nn.Tanh: _tanh_stats, nn.ReLU: _relu_stats}


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every conv / linear layer, in forward order (models register in that order)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)]


def nonlinearities(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every activation module, in forward order."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, (nn.ReLU, nn.Sigmoid, nn.Tanh, nn.GELU, nn.ELU, nn.LeakyReLU, nn.SiLU, nn.Softplus))]


def scale_invariant(model: nn.Module, kind: str) -> set[str]:
    """Names of the weight layers followed directly by a norm that makes them scale-invariant (module docstring)."""
    if kind not in SCALE_INVARIANT_KINDS:
        return set()
    out = set()
    for parent_name, parent in model.named_modules():
        children = list(parent.named_children())
        for (name, m), (next_name, _) in zip(children, children[1:]):
            if isinstance(m, WEIGHT_LAYERS) and next_name == "norm":
                out.add(f"{parent_name}.{name}" if parent_name else name)
    return out


def check(model: nn.Module, names) -> None:
    """Refuse, with one line naming `measure`, an instrument that has nothing to measure on `model`."""
    if not names:
        return
    if any(n in ("ics", "weights") for n in names) and not weight_layers(model):
        raise BnexpError(f"measure: ics and weights need conv or linear layers, and {type(model).__name__} has "
                         f"none; drop them from measure")
    if "saturation" in names:
        acts = nonlinearities(model)
        if not acts:
            raise BnexpError(f"measure: saturation needs a nonlinearity and {type(model).__name__} has none; "
                             f"drop saturation from measure")
        unknown = sorted({type(m).__name__ for _, m in acts if type(m) not in SATURATION_STATS})
        if unknown:
            raise BnexpError(f"measure: saturation is defined for sigmoid, tanh and relu, not for {unknown[0]}; "
                             f"drop saturation from measure or use model.activation=relu|sigmoid|tanh")


def _norm(tensors) -> torch.Tensor:
    return torch.sqrt(sum(t.float().pow(2).sum() for t in tensors))


@dataclass
class Measurer:
    """The instruments of one run, bound to its live model and optimiser (read, never changed).

    `multiples` is the step grid (eta = m * lr); `probe_x` the fixed probe batch (saturation);
    `kind` the norm kind (which weights are scale-invariant); `loss_fn(output, y)` the loss, the
    training step's cross-entropy unless a test gives another (a quadratic with known curvature).
    """
    model: nn.Module
    optimizer: torch.optim.Optimizer
    names: tuple[str, ...]
    multiples: tuple[float, ...]
    lr: float
    opts: engine.ExecOptions
    device: torch.device
    probe_x: torch.Tensor | None = None
    kind: str = "none"
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy

    def __post_init__(self):
        check(self.model, self.names)
        self.names = tuple(n for n in INSTRUMENTS if n in self.names)  # rows in INSTRUMENTS order
        self.param_names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.layers = [name for name, _ in weight_layers(self.model)]
        self.invariant = scale_invariant(self.model, self.kind)

    # -- one forward, as the training step computes it, with no side effect
    def _loss(self, params: dict, x, y, rng) -> torch.Tensor:
        _set_rng(rng, self.device)
        buffers = {k: b.clone() for k, b in self.model.named_buffers()}  # BN updates them in place
        with engine.autocast(self.device, self.opts.precision):
            out = functional_call(self.model, {**params, **buffers}, (x,), strict=False)
            return self.loss_fn(out, y)

    def _grad(self, params: dict, x, y, rng, wrt=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(loss, grads of `wrt` names, default all) at `params`; the tensors are fresh leaves."""
        leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        loss = self._loss(leaves, x, y, rng)
        names = self.param_names if wrt is None else wrt
        return loss.detach(), list(torch.autograd.grad(loss, [leaves[n] for n in names]))

    def measure(self, step: int, x: torch.Tensor, y: torch.Tensor) -> list[Row]:
        """The rows of every instrument at `step` on the batch (x, y): model input and labels."""
        devices = [self.device] if self.device.type == "cuda" else []
        was_training = self.model.training
        with torch.random.fork_rng(devices=devices):
            rng = _get_rng(self.device)
            try:
                self.model.train()
                values = self._measure(x, y, rng)
            finally:
                self.model.train(was_training)
        keys = list(values)
        numbers = torch.stack([values[k].detach().float().reshape(()) for k in keys]).cpu().tolist() if keys else []
        return [(step, *k, float(v)) for k, v in zip(keys, numbers)]

    def _measure(self, x, y, rng) -> dict[tuple[str, str, str], torch.Tensor]:
        out: dict[tuple[str, str, str], torch.Tensor] = {}
        theta = {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}
        needs_grad = any(n in self.names for n in (*GRID_INSTRUMENTS, "ics", "weights"))
        if needs_grad:
            loss, grads = self._grad(theta, x, y, rng)
            g = dict(zip(self.param_names, grads))
        if any(n in self.names for n in GRID_INSTRUMENTS):
            out.update(self._grid(theta, g, loss, x, y, rng))
        if "ics" in self.names:
            out.update(self._ics(theta, g, x, y, rng))
        if "saturation" in self.names:
            out.update(self._saturation(rng))
        if "weights" in self.names:
            out.update(self._weights(theta, g))
        return out

    def _grid(self, theta, g, loss, x, y, rng):
        """landscape / predictiveness / beta_smoothness: one pass per grid point (a backward only if needed)."""
        gradients = "predictiveness" in self.names or "beta_smoothness" in self.names
        g_norm = _norm(g.values())
        losses, diffs, betas = [], [], []
        for m in self.multiples:
            eta = m * self.lr
            moved = {n: theta[n] - eta * g[n] for n in self.param_names}
            if gradients:
                loss_eta, grads_eta = self._grad(moved, x, y, rng)
                diff = _norm(a - b for a, b in zip(g.values(), grads_eta))
                diffs.append(diff)
                betas.append(diff / (eta * g_norm))
            else:
                with torch.no_grad():
                    loss_eta = self._loss(moved, x, y, rng)
            losses.append(loss_eta.float())
        out = {}
        if "landscape" in self.names:
            stack = torch.stack(losses)
            out.update({("landscape", MF.MODEL_LAYER, "min"): stack.min(), ("landscape", MF.MODEL_LAYER, "max"): stack.max(),
                        ("landscape", MF.MODEL_LAYER, "loss"): loss.float()})
        if "predictiveness" in self.names:
            stack = torch.stack(diffs)
            out.update({("predictiveness", MF.MODEL_LAYER, "min"): stack.min(), ("predictiveness", MF.MODEL_LAYER, "max"): stack.max()})
        if "beta_smoothness" in self.names:
            out[("beta_smoothness", MF.MODEL_LAYER, "max")] = torch.stack(betas).max()
        return out

    def updated(self, theta, g) -> dict[str, torch.Tensor]:
        """The parameters after the optimiser's next update with gradient g, computed on copies."""
        copies = {n: theta[n].clone() for n in self.param_names}
        by_id = {id(p): n for n, p in self.model.named_parameters()}
        groups = [{**{k: v for k, v in group.items() if k != "params"},
                   "params": [copies[by_id[id(p)]] for p in group["params"]]} for group in self.optimizer.param_groups]
        twin = type(self.optimizer)(groups, **self.optimizer.defaults)
        twin.load_state_dict(copy.deepcopy(self.optimizer.state_dict()))
        for n, p in copies.items():
            p.grad = g[n].clone()
        twin.step()
        return copies

    def _ics(self, theta, g, x, y, rng):
        """Per weight layer: G (its gradient at theta) against G' (after the earlier parameters' update)."""
        new = self.updated(theta, g)
        out = {}
        for layer in self.layers:
            first = self.param_names.index(f"{layer}.weight")
            earlier = set(self.param_names[:first])
            shifted = {n: (new[n] if n in earlier else theta[n]) for n in self.param_names}
            name = f"{layer}.weight"
            _, (g_shift,) = self._grad(shifted, x, y, rng, wrt=[name])
            a, b = g[name].double(), g_shift.double()  # float64: cos of equal gradients is 1 to 1e-15
            norms = a.norm() * b.norm()
            out[("ics", layer, "l2")] = (a - b).norm()
            cos = ((a * b).sum() / norms).clamp(-1.0, 1.0)  # rounding can land just past 1
            out[("ics", layer, "cos")] = torch.where(norms > 0, cos, torch.full_like(norms, math.nan))
        return out

    @torch.no_grad()
    def _saturation(self, rng):
        """Statistics of every nonlinearity's inputs on the probe batch (train mode, dropout held as probes do)."""
        seen: dict[str, torch.Tensor] = {}
        hooks = []
        for name, module in nonlinearities(self.model):
            def hook(_m, inputs, _out, name=name):
                seen[name] = inputs[0].detach().float()
            hooks.append(module.register_forward_hook(hook))
        dropouts = [m for m in self.model.modules() if isinstance(m, nn.Dropout) and m.training]
        for m in dropouts:
            m.eval()
        try:
            _set_rng(rng, self.device)
            buffers = {k: b.clone() for k, b in self.model.named_buffers()}
            with engine.autocast(self.device, self.opts.precision):
                functional_call(self.model, buffers, (self.probe_x,), strict=False)
        finally:
            for h in hooks:
                h.remove()
            for m in dropouts:
                m.train()
        out = {}
        for name, module in nonlinearities(self.model):
            for stat, value in SATURATION_STATS[type(module)](seen[name]).items():
                out[("saturation", name, stat)] = value
        return out

    def _weights(self, theta, g):
        lr = {id(p): group["lr"] for group in self.optimizer.param_groups for p in group["params"]}
        params = dict(self.model.named_parameters())
        out = {}
        for layer in self.layers:
            name = f"{layer}.weight"
            w, grad = theta[name].float().norm(), g[name].float().norm()
            out[("weights", layer, "weight_norm")] = w
            out[("weights", layer, "grad_norm")] = grad
            if layer in self.invariant:
                out[("weights", layer, "effective_step")] = lr[id(params[name])] * grad / w
        return out


def _get_rng(device: torch.device) -> tuple:
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng(rng: tuple, device: torch.device) -> None:
    torch.set_rng_state(rng[0])
    if rng[1] is not None:
        torch.cuda.set_rng_state(rng[1], device)
