"""One reproducible training run: `run(cfg)` prepares, trains (or resumes, or skips) and records.

The loop follows the moon-hotel 07_BN reference: mean cross-entropy, plain SGD or Adam,
training loss/accuracy = the mean over the epoch's training batches (what its logged
per-iteration losses average to), test metrics from a separate pass in eval mode.
The data set stays on the device as uint8 and batches are drawn by indexing (no DataLoader).
"""

from __future__ import annotations

import copy
import math
import sys
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from . import config as C
from . import layout as L
from . import data, engine, execution, measure, models, precise, preflight, probes
from . import measures_format as MF
from .nn.kinds import BATCH_STAT_KINDS, KIND_KWARGS
from .errors import BnexpError
from .tblog import TensorBoardLog
from .tracking import (Attempt, RunDir, RunResult, RunState, atomic_write_text, check_writable, now_iso,
                       reason, run_info, skipped_result)

PROBE_BATCH = 256  # test images in the fixed activation-probe batch


# ----------------------------------------------------------------------------- setup

def resolve_device(spec: str) -> torch.device:
    """`auto` picks CUDA, then MPS, then CPU; an explicit device must exist."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BnexpError(f"device={spec} but CUDA is not available here; use device=cpu or device=auto")
        index = int(spec.split(":")[1]) if ":" in spec else 0
        if index >= torch.cuda.device_count():
            raise BnexpError(f"device={spec} but only {torch.cuda.device_count()} CUDA device(s) exist")
    if spec == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise BnexpError("device=mps but MPS is not available here; use device=cpu or device=auto")
    return torch.device(spec)


def effective_lr(cfg) -> float:
    """`lr`, or with lr_scale_batch=N the linear scaling rule (Goyal et al. 2017, as Wu & He 2018 use
    it for their batch-size sweeps): lr * batch_size / N. metrics.csv's lr column is this value."""
    return cfg.lr if cfg.lr_scale_batch is None else cfg.lr * cfg.batch_size / cfg.lr_scale_batch


def build_optimizer(cfg, params, capturable: bool = False):
    """SGD or Adam; `capturable` keeps Adam's step count on the device, as CUDA graphs need."""
    o, lr = cfg.optim, effective_lr(cfg)
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return torch.optim.Adam(params, lr=lr, betas=(o.momentum, 0.999), weight_decay=o.weight_decay,
                            capturable=capturable)


@dataclass
class Setup:
    device: torch.device
    train: data.Split
    test: data.Split
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    opts: engine.ExecOptions
    program: engine.StepProgram
    execution: dict  # execution.record(): the settings that can change the numbers (run.json, checkpoint)
    meter: measure.Measurer | None = None  # the instruments of `measure`, None when it is []

    @property
    def threads(self) -> int:
        return self.execution["threads"]

    @property
    def bn_backend(self) -> str | None:
        return self.execution["bn_backend"]


def use_graphs(cfg, device: torch.device) -> bool:
    """Whether the run captures its training step as a CUDA graph (raises on an impossible cuda_graphs=on)."""
    momentum = cfg.norm.momentum if cfg.norm.kind in BATCH_STAT_KINDS else 0.0  # only they count batches
    return engine.graphs_wanted(engine.ExecOptions.from_cfg(cfg), device, momentum)


def load_data(cfg, device) -> tuple[data.Split, data.Split]:
    """The training and test splits on `device`, cut to train_size / test_size (slices are views;
    preflight.check has checked that the sizes fit)."""
    root = data.data_root(cfg.data_dir, cfg.data.name)
    train = data.load_split(cfg.data.name, root, True, None, device, verify=cfg.data.verify)
    test = data.load_split(cfg.data.name, root, False, None, device, verify=cfg.data.verify)
    train = replace(train, x=train.x[:cfg.train_size], y=train.y[:cfg.train_size])  # [:None] keeps all
    test = replace(test, x=test.x[:cfg.test_size], y=test.y[:cfg.test_size])
    return train, test


def prepare(cfg) -> Setup:
    """Everything that can fail on bad input, before any training step: device, data, model, and the
    execution settings (thread count, pinned BN backend) the run's numbers depend on."""
    device = resolve_device(cfg.device)
    threads = execution.resolve_threads(cfg.threads)
    with execution.applied(threads, None):
        return _prepare(cfg, device, threads)


def norm_kwargs(cfg) -> dict:
    """The norm keys of the config that its kind takes (bnexp.nn.kinds.KIND_KWARGS), as make_norm's
    keywords; null means the layer's default, except momentum, where null is the cumulative average."""
    kind, n = cfg.norm.kind, cfg.norm
    if kind == "none":
        return {}
    keys = [k for k in KIND_KWARGS[kind] if k in n and (k == "momentum" or n[k] is not None)]
    return {"eps": n.eps, **{k: n[k] for k in keys}}


def build(cfg, num_classes: int, in_channels: int, image_size: int) -> models.NormModel:
    """The run's model, freshly initialised from the current RNG state (prepare seeds it first)."""
    arch = models.Arch(cfg.model.activation, cfg.model.pool, cfg.model.norm_position, cfg.model.init)
    return models.build_model(cfg.model.name, cfg.norm.kind, num_classes=num_classes, in_channels=in_channels,
                              image_size=image_size, dropout=cfg.model.dropout, arch=arch, **norm_kwargs(cfg))


def _prepare(cfg, device: torch.device, threads: int) -> Setup:
    train, test = load_data(cfg, device)
    torch.manual_seed(cfg.seed)  # model init
    model = build(cfg, train.num_classes, train.x.shape[1], train.x.shape[-1]).to(device)
    opts = engine.ExecOptions.from_cfg(cfg)
    if opts.channels_last:
        model = model.to(memory_format=torch.channels_last)
    graphs = use_graphs(cfg, device)
    example = engine.model_input(train.x[:cfg.batch_size], model.input_size, opts.channels_last)
    bn_backend = execution.pin_bn_backend(model, cfg.norm.backend, example,
                                          lambda: engine.autocast(device, opts.precision))
    optimizer = build_optimizer(cfg, model.parameters(), capturable=graphs)
    program = engine.StepProgram(model, optimizer, train, cfg.batch_size, cfg.drop_last, device, opts, graphs)
    record = execution.record(device, threads, bn_backend, opts, program.use_graphs)
    meter = None
    if cfg.measure:  # an instrument with nothing to measure on this model fails here, before training
        meter = measure.Measurer(model, optimizer, tuple(cfg.measure), tuple(cfg.measure_steps), effective_lr(cfg),
                                 opts, device, probe_input(model, test, opts), cfg.norm.kind)
    return Setup(device, train, test, model, optimizer, opts, program, record, meter)


def probe_input(model, test: data.Split, opts: engine.ExecOptions) -> torch.Tensor:
    """The run's fixed probe batch: the first PROBE_BATCH test images (activation probes, saturation)."""
    return engine.model_input(test.x[:PROBE_BATCH], model.input_size, opts.channels_last)


# ----------------------------------------------------------------------------- epochs

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def epoch_order(cfg, n: int, epoch: int) -> torch.Tensor:
    """The sample order of `epoch` (data.batch_indices' order): it depends on (seed, epoch) only."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen)


def train_epoch(s: Setup, cfg, epoch: int, bar=None, on_step=None) -> dict:
    """One pass over the training set; returns losses per step (tensor), mean loss/acc, seconds.
    `on_step(k)` runs after the epoch's k-th step (mid-epoch evaluations, measurements); its time is not counted."""
    order = epoch_order(cfg, len(s.train), epoch)
    # Checking for a non-finite loss needs a host sync; on CPU that is free, on a GPU do it rarely.
    check_every = 1 if s.device.type == "cpu" else 50
    _sync(s.device)
    t0 = time.perf_counter()
    paused = [0.0]

    def timed(k):
        t = time.perf_counter()
        on_step(k)
        paused[0] += time.perf_counter() - t

    steps = s.program.run_epoch(order, check_every, bar, epoch, timed if on_step else None)
    _sync(s.device)
    seconds = time.perf_counter() - t0 - paused[0]
    losses, step_correct = s.program.losses[:steps], s.program.correct[:steps]
    sizes = torch.tensor(s.program.batch_sizes[:steps], device=s.device, dtype=losses.dtype)
    return {"losses": losses.cpu(), "step_acc": (step_correct / sizes).cpu(),
            "train_loss": float((losses * sizes).sum() / sizes.sum()),
            "train_acc": step_correct.sum().item() / sizes.sum().item(), "seconds": seconds}


@torch.no_grad()
def evaluate(model, split: data.Split, batch_size: int, opts: engine.ExecOptions = engine.ExecOptions()
             ) -> tuple[float, float]:
    """Mean loss and accuracy over `split` in eval mode (running statistics); one host sync at the end."""
    model.eval()
    device = split.x.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for start in range(0, len(split), batch_size):  # contiguous slices: no gather needed in eval
        xb = engine.model_input(split.x[start:start + batch_size], model.input_size, opts.channels_last)
        yb = split.y[start:start + batch_size]
        with engine.autocast(device, opts.precision):
            out = model(xb)
        loss_sum += F.cross_entropy(out.float(), yb, reduction="sum")
        correct += (out.argmax(1) == yb).sum()
    model.train()
    return loss_sum.item() / len(split), correct.item() / len(split)


# ----------------------------------------------------------------------------- the run

def run(cfg, force: bool = False) -> RunResult:
    """Train the run `cfg` describes, unless it already finished; resume it if it was interrupted."""
    results_dir = Path(cfg.results_dir)
    check_writable(results_dir)
    rd = RunDir(results_dir, C.run_id(cfg))
    if not force and rd.status() in L.FINISHED:
        return skipped_result(rd)
    preflight.check(cfg)  # bad input fails here or in prepare, before the run directory is touched
    s = prepare(cfg)
    if not rd.acquire():
        return RunResult(rd.run_id, rd.path, L.BUSY, message="another process is training this run")
    try:
        if not force and rd.status() in L.FINISHED:  # another process finished it while we prepared
            return skipped_result(rd)
        if force:
            rd.clear()
        with execution.applied(s.threads, s.bn_backend):
            return _train(cfg, rd, s)
    finally:
        rd.release()


@dataclass
class Training:
    """One attempt at a run: its config, setup and state, and where its records go. Every write to the
    run directory goes through `rd` and every TensorBoard event through `tb`."""
    cfg: DictConfig
    s: Setup
    rd: RunDir
    state: RunState
    attempt: Attempt
    tb: TensorBoardLog
    samples: dict  # the activation probes so far: "e<epoch>/<layer>/<where>" -> samples (activations.npz)
    resumed: int  # the epochs the checkpoint held when this attempt started
    saved: int  # the epochs checkpoint.pt holds now: run.json never claims more
    probe_x: torch.Tensor  # the fixed probe batch (probe_input)
    probe_at: set  # the epochs whose activations are probed (0: at initialisation)
    bar: object  # the step progress bar, None with progress=false
    t_start: float  # perf_counter() at the run's start, earlier attempts included

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def info(self, status: str, state: RunState | None = None, **extra) -> dict:
        """run.json for `status`, as of `state` (default: the current one)."""
        return run_info(self.rd.run_id, self.cfg, status, state or self.state, self.attempt, str(self.s.device),
                        self.s.execution, **extra)


def _train(cfg, rd: RunDir, s: Setup) -> RunResult:
    """One attempt, top to bottom: resume (or start), then per epoch train, evaluate, log, probe and
    save. A crash is recorded (run.json failed, error.log) and re-raised."""
    t = _begin(cfg, rd, s)
    status, failed = L.RUNNING, False
    try:
        if t.resumed == 0:
            _record_initial(t)
        for epoch in range(t.resumed + 1, cfg.epochs + 1):
            ep = _train_epoch(t, epoch)
            if not all(math.isfinite(v) for v in ep["losses"]):
                _diverged(t, epoch)
                status = L.DIVERGED
                break
            row = _evaluate_epoch(t, epoch, ep)
            _log_epoch(t, row)
            _probe_epoch(t, epoch)
            _save(t, epoch)
        else:
            status = L.COMPLETED
    except Exception as e:  # a crash mid-training is a recorded result, then re-raised for the caller
        failed = True
        _record_failure(t, e)
        raise
    finally:
        _close_progress(t, failed)
    return _finish(t, status)


def _begin(cfg, rd: RunDir, s: Setup) -> Training:
    """Restore the checkpoint (if any), act on damaged files, write config.yaml and a running run.json,
    and open the TensorBoard log (purging the steps a resumed attempt replays)."""
    state = _resume_state(rd, s, cfg)
    resumed = state.epoch
    prior = rd.read_info() or {}
    attempt = Attempt.begin(prior.get("started") if resumed and prior.get("started") else now_iso())
    samples = {k: v for k, v in rd.read_activations().items() if L.parse_activation_key(k)[0] <= resumed}
    _take_stock(rd, resumed)
    rd.write_config(cfg)
    rd.write_info(run_info(rd.run_id, cfg, L.RUNNING, state, attempt, str(s.device), s.execution))
    tb = TensorBoardLog(rd.path, purge_step=state.step + 1 if resumed else None)
    tb.hparams(C.hparams(cfg), group_name=C.run_label(cfg, rd.run_id))  # the table lists a run as it starts
    return Training(cfg, s, rd, state, attempt, tb, samples, resumed, saved=resumed,
                    probe_x=probe_input(s.model, s.test, s.opts), probe_at=probes.probe_epochs(cfg.epochs, cfg.probe_every),
                    bar=_progress_bar(cfg, cfg.epochs * s.program.steps, state.step),
                    t_start=time.perf_counter() - state.elapsed)


def _record_initial(t: Training) -> None:
    """Before the first step: the activation probes at initialisation, and the instruments at step 0."""
    _probe(t, 0)
    if t.s.meter is not None:
        measure_at(t.s, t.state, 0, epoch_order(t.cfg, len(t.s.train), 1), 0, t.tb)


def _train_epoch(t: Training, epoch: int) -> dict:
    """Train one epoch (with its mid-epoch evaluations and measurements), log its steps, add their
    losses to the state; returns train_epoch's dict with the losses as a list and the epoch's lr."""
    s, cfg, state, step0 = t.s, t.cfg, t.state, t.state.step
    on_step = _both(_mid_epoch_evals(s, cfg, state, epoch, step0, t.tb), measure_hook(s, cfg, state, epoch, step0, t.tb))
    ep = train_epoch(s, cfg, epoch, t.bar, on_step)
    losses, lr = ep["losses"].tolist(), s.optimizer.param_groups[0]["lr"]
    t.tb.step_scalars(step0 + 1, {"batch/loss": losses, "batch/acc": ep["step_acc"].tolist(), "batch/lr": [lr] * len(losses)})
    state.losses += losses
    state.steps_per_epoch.append(len(losses))
    return {**ep, "losses": losses, "lr": lr}


def _diverged(t: Training, epoch: int) -> None:
    t.state.diverged_at = {"epoch": epoch, "step": t.state.step}
    # a GPU checks every 50 steps: the steps it ran past the first non-finite loss, and their
    # measurements, are not the run's
    t.state.measures = [r for r in t.state.measures if r[0] <= t.state.step]


def _evaluate_epoch(t: Training, epoch: int, ep: dict) -> dict:
    """The epoch's metrics.csv row (test set with running statistics), and with precise_bn the test
    set with recomputed statistics too."""
    test_loss, test_acc = _epoch_evaluation(t.s, t.cfg, t.state, t.state.step)
    row = {"epoch": epoch, "train_loss": round(ep["train_loss"], 6), "train_acc": round(ep["train_acc"], 6),
           "test_loss": round(test_loss, 6), "test_acc": round(test_acc, 6), "lr": ep["lr"], "seconds": round(ep["seconds"], 4)}
    t.state.metrics.append(row)
    if t.cfg.precise_bn:
        _precise_evaluation(t.s, t.cfg, t.state, epoch, t.state.step, t.tb)
    return row


def _log_epoch(t: Training, row: dict) -> None:
    _epoch_line(t.bar, t.cfg, row)
    t.tb.scalars({f"epoch/{k}": row[k] for k in (*L.FINAL_METRICS, "lr")}, t.state.step)


def _probe_epoch(t: Training, epoch: int) -> None:
    if epoch in t.probe_at:
        _probe(t, epoch)
        t.rd.write_activations(t.samples)


def _save(t: Training, epoch: int) -> None:
    """Mark `epoch` done: the checkpoint, then the records and run.json it vouches for."""
    t.state.epoch = epoch
    t.state.elapsed = t.elapsed()
    # The epoch's events reach disk before the checkpoint that marks the epoch done: a kill between
    # the two replays the epoch, and the resumed attempt's purge hides the replayed steps' first copy.
    t.tb.flush()
    _checkpoint(t.rd, t.s, t.cfg, t.state)
    t.saved = epoch
    t.rd.write_records(t.cfg, t.state)
    t.rd.write_info(t.info(L.RUNNING))


def _finish(t: Training, status: str) -> RunResult:
    """The final records and run.json, and the TensorBoard session's end."""
    t.state.elapsed = t.elapsed()
    t.rd.write_records(t.cfg, t.state)
    if t.samples:
        t.rd.write_activations(t.samples)
    info = t.info(status, ended=now_iso())
    t.rd.write_info(info)
    t.tb.session_end(status)
    t.tb.close()
    return RunResult(t.rd.run_id, t.rd.path, status, info["final"], t.state.elapsed,
                     epochs_completed=len(t.state.metrics),
                     extra={"resumed_from": t.resumed, "diverged_at": t.state.diverged_at})


def _close_progress(t: Training, failed: bool) -> None:
    """Flush the TensorBoard log and close the progress bar, whether the attempt ended or crashed."""
    try:
        t.tb.flush()
    except OSError:
        if not failed:  # after a crash (a full disk, say) the crash is what to report
            raise
    finally:
        if t.bar is not None:
            t.bar.close()


def _record_failure(t: Training, e: Exception) -> None:
    """A crash's error.log, then metrics, steps and a failed run.json as of the last checkpoint.

    Each write may fail too (a full disk): the others are still tried, and an error.log that could
    not be written is removed rather than left empty or holding an earlier attempt's traceback.
    Sets e.error_log to the log written, if one was.
    """
    t.state.elapsed = t.elapsed()
    state = t.state.as_of(t.saved)
    log = t.rd.path / L.ERROR_LOG
    try:
        atomic_write_text(log, traceback.format_exc())
    except OSError:
        log.unlink(missing_ok=True)
    else:
        try:
            e.error_log = log
        except (AttributeError, TypeError):  # an exception type that takes no attributes
            pass
    failed = t.info(L.FAILED, state, error=f"{type(e).__name__}: {e}", ended=now_iso())
    for write in (*t.rd.record_writes(t.cfg, state), lambda: t.rd.write_info(failed)):
        try:
            write()
        except OSError:
            pass


def _progress_bar(cfg, total: int, initial: int):
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", file=sys.stderr, leave=False,
                dynamic_ncols=True, disable=None)


def _epoch_line(bar, cfg, row: dict) -> None:
    """One line that stays per finished epoch (as pytorch/examples and Keras print), above the step
    bar; nothing with progress=false, so scripts get only the final summary line."""
    if bar is None:
        return
    bar.write(f"epoch {row['epoch']}/{cfg.epochs}  train_loss {row['train_loss']:.4f}  train_acc {row['train_acc']:.4f}"
              f"  test_loss {row['test_loss']:.4f}  test_acc {row['test_acc']:.4f}  {row['seconds']:.1f}s", file=sys.stderr)


# ----------------------------------------------------------------------------- evaluations, probes, instruments

def _epoch_evaluation(s: Setup, cfg, state: RunState, step: int) -> tuple[float, float]:
    """Test loss and accuracy at the end of an epoch (its last step is `step`): the eval_every
    evaluation of that same step when there is one (the model has not changed since), else a new one."""
    last = state.evals[-1] if state.evals else None
    if last is not None and last["step"] == step:
        return last["test_loss"], last["test_acc"]
    t = time.perf_counter()
    test_loss, test_acc = evaluate(s.model, s.test, cfg.batch_size, s.opts)
    state.eval_seconds += time.perf_counter() - t
    return test_loss, test_acc


def _mid_epoch_evals(s: Setup, cfg, state: RunState, epoch: int, step0: int, tb):
    """The `on_step` of an epoch when eval_every > 0: test loss/accuracy every eval_every steps."""
    if not cfg.eval_every:
        return None

    def on_step(k):
        step = step0 + k
        if step % cfg.eval_every == 0:
            t = time.perf_counter()
            test_loss, test_acc = evaluate(s.model, s.test, cfg.batch_size, s.opts)
            state.eval_seconds += time.perf_counter() - t
            state.evals.append({"step": step, "epoch": epoch, "test_loss": round(test_loss, 6),
                                "test_acc": round(test_acc, 6)})
            tb.scalars({"eval/test_loss": test_loss, "eval/test_acc": test_acc}, step)
    return on_step


def _precise_evaluation(s: Setup, cfg, state: RunState, epoch: int, step: int, tb) -> None:
    """precise_bn: the test set with population statistics recomputed over precise_bn training batches,
    on a copy of the model (bnexp/precise.py), recorded beside the epoch's usual evaluation."""
    t = time.perf_counter()
    batches = precise.precise_batches(len(s.train), cfg.batch_size, cfg.precise_bn, cfg.seed)
    twin = precise.recompute(s.model, s.train, batches, s.opts)
    test_loss, test_acc = evaluate(twin, s.test, cfg.batch_size, s.opts)
    state.precise.append({"epoch": epoch, "test_loss": round(test_loss, 6), "test_acc": round(test_acc, 6),
                          "batches": len(batches)})
    tb.scalars({"epoch/test_loss_precise": test_loss, "epoch/test_acc_precise": test_acc}, step)
    state.precise_seconds += time.perf_counter() - t


def _probe(t: Training, epoch: int) -> None:
    """Record the activation probes of `epoch` and count the time they take."""
    t0 = time.perf_counter()
    with engine.autocast(t.s.device, t.s.opts.precision):
        probes.record(t.s.model, t.probe_x, epoch, t.state.step, t.samples, t.tb)
    t.state.probe_seconds += time.perf_counter() - t0


def measure_at(s: Setup, state: RunState, step: int, order: torch.Tensor, k: int, tb) -> None:
    """Record the instruments at `step` on the batch that step + 1 trains on: batch k (0-based) of `order`."""
    t = time.perf_counter()
    start = sum(s.program.batch_sizes[:k])
    idx = order[start:start + s.program.batch_sizes[k]].to(s.device)
    x = engine.model_input(s.train.x[idx], s.model.input_size, s.opts.channels_last)
    rows = s.meter.measure(step, x, s.train.y[idx])
    state.measures += rows
    tb.scalars({MF.tensorboard_tag(inst, layer, stat): value for _, inst, layer, stat, value in rows}, step)
    state.measure_seconds += time.perf_counter() - t


def measure_hook(s: Setup, cfg, state: RunState, epoch: int, step0: int, tb):
    """The `on_step` of an epoch with instruments on: a measurement after every step that is a
    multiple of measure_every. After the epoch's last step the batch of step + 1 is the next epoch's
    first, so that measurement belongs to this epoch (and its checkpoint); after the run's last step
    there is no next batch and none is taken. Step 0 is measured before the first epoch (_record_initial)."""
    if s.meter is None:
        return None
    order = epoch_order(cfg, len(s.train), epoch)

    def on_step(k):
        step = step0 + k
        if step % cfg.measure_every:
            return
        if k < s.program.steps:
            measure_at(s, state, step, order, k, tb)
        elif epoch < cfg.epochs:
            measure_at(s, state, step, epoch_order(cfg, len(s.train), epoch + 1), 0, tb)
    return on_step


def _both(first, second):
    """One `on_step` that runs two (either may be None)."""
    if first is None or second is None:
        return first or second
    return lambda k: (first(k), second(k))


# ----------------------------------------------------------------------------- checkpoint and resume

def _checkpoint(rd: RunDir, s: Setup, cfg, state: RunState) -> None:
    """checkpoint.pt: config hash, execution settings, model, optimiser, RNG and the run's state."""
    rng = {"cpu": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state(s.device) if s.device.type == "cuda" else None}
    rd.save_checkpoint({"config_hash": C.config_hash(cfg), "execution": s.execution, "model": s.model.state_dict(),
                        "optimizer": s.optimizer.state_dict(), "rng": rng, "state": state.to_checkpoint()})


def _resume_state(rd: RunDir, s: Setup, cfg) -> RunState:
    """Restore model, optimiser and RNG from the last checkpoint (_checkpoint), if it belongs to this
    config; refuse (BnexpError, nothing written) if it was taken under other execution settings.

    A checkpoint that loads but cannot be restored (missing keys, wrong shapes, an inconsistent
    state) is noted in rd.damaged like an unreadable one, and the setup is put back as it was.
    """
    ckpt = rd.load_checkpoint()
    if ckpt is None or ckpt.get("config_hash") != C.config_hash(cfg):
        return RunState()
    refused = execution.mismatch(rd.run_id, ckpt.get("execution"), s.execution)
    if refused:
        raise refused
    fresh = _snapshot(s)
    try:
        s.model.load_state_dict(ckpt["model"])
        s.optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if ckpt["rng"].get("cuda") is not None and s.device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], s.device)
        return RunState.from_checkpoint(ckpt["state"], cfg.epochs)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as e:
        _restore_snapshot(s, fresh)
        rd.damaged[L.CHECKPOINT] = f"cannot be restored ({reason(e)})"
        return RunState()


def _snapshot(s: Setup) -> tuple:
    """Model, optimiser and RNG state of a setup, copied: what a failed restore puts back."""
    cuda = torch.cuda.get_rng_state(s.device) if s.device.type == "cuda" else None
    return (copy.deepcopy(s.model.state_dict()), copy.deepcopy(s.optimizer.state_dict()), torch.get_rng_state(), cuda)


def _restore_snapshot(s: Setup, snap: tuple) -> None:
    model, optimizer, rng, cuda = snap
    s.model.load_state_dict(model)
    s.optimizer.load_state_dict(optimizer)
    torch.set_rng_state(rng)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, s.device)


def _take_stock(rd: RunDir, resumed: int) -> None:
    """Act on the damaged files the readers found, and say so: one stderr line per file."""
    if L.CHECKPOINT in rd.damaged:  # nothing else can be trusted to belong to a resumable state
        rd.clear()
        actions = {L.CHECKPOINT: "retraining the run from scratch (its other files were removed)"}
    else:
        actions = {L.INFO: "treating the run as unfinished: " + (
                       f"resuming it from {L.CHECKPOINT} after epoch {resumed}" if resumed else "training it from the start"),
                   L.ACTIVATIONS: "removed it; recording the activation probes again" + (
                       f" from epoch {resumed + 1} (those up to epoch {resumed} are lost; --force retrains)"
                       if resumed else "")}
        if L.ACTIVATIONS in rd.damaged:
            (rd.path / L.ACTIVATIONS).unlink(missing_ok=True)
    for name, action in actions.items():
        if name in rd.damaged:
            print(f"warning: {rd.path / name} {rd.damaged[name]}; {action}", file=sys.stderr)
    rd.damaged.clear()
