"""The `bnexp` command line: parses arguments and delegates; no experiment logic lives here.

Every user mistake (BnexpError, a bad option) becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import os
import sys
import time
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperCommand
from typer.exceptions import TyperException

from . import __version__
from .bench.suite import BENCHMARKS, DEFAULT as DEFAULT_BENCH
from . import layout
from .errors import BnexpError
from .execution import PRECISIONS
from .launch import LAUNCHERS
from .nn.kinds import BACKENDS as BN_BACKENDS

STARTED = time.perf_counter()  # when this module was imported: the fallback of `elapsed`


def _config_keys_help() -> str:
    """Every config key with the default of the composed config and its comment (config.key_docs),
    and the limits that bad input is checked against."""
    from .config import BN_NEEDS_TWO, LIMITS, group_options, key_docs
    from .nn.kinds import BATCH_STAT_KINDS

    keys, groups = key_docs()
    lines = [f"  {key + '=' + default:<30} {comment}".rstrip() for key, default, comment in keys]
    groups_line = "  " + "  ".join(f"{g}={'|'.join(group_options(g))} (default {d})" for g, d in groups.items())
    limits = ", ".join(f"{k} <= {v:g}" if isinstance(v, float) else f"{k} <= {v}" for k, (v, _) in LIMITS.items())
    return "\n".join(["\b", "Config keys (key=default):", *lines, "Config groups (group=option):", groups_line,
                      "Limits (bad input stops before any work, exit code 2):", "  " + limits,
                      f"  with batch statistics (norm={'|'.join(BATCH_STAT_KINDS)}): {', '.join(BN_NEEDS_TWO)} >= 2; "
                      "data_dir must exist"])


class KeysInEpilog(TyperCommand):
    """A command whose help ends with the config keys; composed only when the help is shown, so the
    commands themselves never pay for it."""

    def format_epilog(self, ctx, formatter) -> None:
        base = self.epilog
        self.epilog = (base or "") + _config_keys_help()
        try:
            super().format_epilog(ctx, formatter)
        finally:
            self.epilog = base


app = typer.Typer(
    name="bnexp", add_completion=False, pretty_exceptions_enable=False,
    rich_markup_mode=None, context_settings={"help_option_names": ["-h", "--help"]},
    help="Reproduce and extend the classic Batch Normalization experiments.",
)


def _version(value: bool):
    if value:
        typer.echo(f"bnexp {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")):
    """Reproduce and extend the classic Batch Normalization experiments."""


class OnOff(str, Enum):
    on = "on"
    off = "off"


CONFIG_DIR_HELP = ("Your own config folder: DIR/<group>/NAME.yaml options (model, data, norm, optim; then "
                   "group=NAME) and DIR/experiment/NAME.yaml presets, checked as bnexp's own (default: "
                   "$BNEXP_CONFIG_DIR).")

TRAIN_EPILOG = """\b
Examples:
  bnexp train --bn on lr=0.5
  bnexp train --bn off lr=0.5 batch_size=512 epochs=20 seed=1
  bnexp train model=alexnet_cifar data=cifar100 optim=adam lr=1e-3 batch_size=256
  bnexp train epochs=1 train_size=5000 device=cpu data_dir=../shared/data
  bnexp train device=cuda precision=bf16 channels_last=true cuda_graphs=on

"""


@app.command(cls=KeysInEpilog, epilog=TRAIN_EPILOG)
def train(
    overrides: Optional[List[str]] = typer.Argument(None, metavar="[KEY=VALUE]...",
                                                    help="Hydra overrides on conf/config.yaml (see below)."),
    bn: Optional[OnOff] = typer.Option(None, "--bn", help="Shortcut for bn=on|off (default: on)."),
    force: bool = typer.Option(False, "--force", help="Retrain even if this config already finished."),
    config_dir: Optional[Path] = typer.Option(None, "--config-dir", metavar="DIR", help=CONFIG_DIR_HELP),
):
    """Train one run (LeNet5 on FashionMNIST by default) and record it under results/runs/<run_id>/."""
    from . import config

    config.use_config_dir(config_dir)
    args = with_bn(list(overrides or []), bn.value if bn else None)
    cfg = config.compose(args)  # bad input is answered here, before torch is imported
    from .launch import train_one
    from .tracking import check_writable

    check_writable(Path(cfg.results_dir))
    if code := train_one(cfg, force=force, echo=typer.echo):
        raise typer.Exit(code)


Launcher = Enum("Launcher", {name: name for name in LAUNCHERS}, type=str)  # launch.py's launchers


SWEEP_EPILOG = """\b
Examples:
  bnexp sweep                                    # the default grid (bnexp sweep --list-presets)
  bnexp sweep --preset lr_sensitivity seed=0,1,2 --jobs 2
  bnexp sweep lr=0.01,0.05,0.1,0.3,0.5 batch_size=512 seed=range(0,3) --jobs 4
  bnexp sweep --preset convergence epochs=5 train_size=5000 device=cpu --dry-run
  bnexp sweep --preset generalization --launcher submitit \\
      --launcher-opt slurm_partition=gpu --launcher-opt gpus_per_node=1 --launcher-opt timeout_min=240
\b
Sweeps use Hydra's override grammar: key=a,b,c  key=range(start,stop[,step])  key=choice(a,b).
Without --preset the `default` preset applies; a KEY=VALUE here replaces the preset's entry for KEY.
Each run is the run `bnexp train` makes for its config: finished runs are skipped, interrupted
ones resume, failed ones are retried. A run another process is training is waited for at the
end (--wait), with a line naming the process. Exit code 1 if a run failed or is still held by
another process, 2 for bad input.

"""


@app.command(cls=KeysInEpilog, epilog=SWEEP_EPILOG)
def sweep(
    overrides: Optional[List[str]] = typer.Argument(None, metavar="[KEY=VALUE[,VALUE]]...",
                                                    help="Hydra overrides and sweeps on conf/config.yaml."),
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="A grid from conf/experiment/ or "
                                         "DIR/experiment/, or the path of a preset file PATH.yaml "
                                         "(default: default; see --list-presets)."),
    bn: Optional[str] = typer.Option(None, "--bn", help="Shortcut for bn=on|off|on,off (replaces the preset's bn)."),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", min=1, help="Runs at once (default: 1 for local, "
                                       "the CPU cores for joblib, all for submitit)."),
    launcher: Launcher = typer.Option(Launcher(LAUNCHERS[0]), "--launcher", help="local processes | joblib (loky) | "
                                      "submitit (SLURM if present, else local processes)."),
    launcher_opt: Optional[List[str]] = typer.Option(None, "--launcher-opt", metavar="KEY=VALUE",
                                                     help="Launcher parameter, repeatable: submitit's "
                                                     "update_parameters (cluster=local|slurm, slurm_partition=..., "
                                                     "gpus_per_node=1, timeout_min=...) or joblib.Parallel's."),
    list_presets: bool = typer.Option(False, "--list-presets", help="List the presets and exit."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the grid (run ids) and exit; for a grid above "
                                 "--max-runs, its size and first points."),
    max_runs: int = typer.Option(10_000, "--max-runs", min=1, help="Refuse a grid of more points than this "
                                 "(default: 10000); raise it to run a larger grid."),
    wait: float = typer.Option(3600.0, "--wait", min=0, metavar="SECONDS", help="How long to wait, once the "
                               "rest is done, for runs another process is training (default: 3600; 0: not at "
                               "all); runs still held then end as busy (exit code 1)."),
    config_dir: Optional[Path] = typer.Option(None, "--config-dir", metavar="DIR", help=CONFIG_DIR_HELP),
):
    """Run a grid of training runs (BN on/off x lr x batch size by default), then print a summary."""
    from . import config, launch as L, sweep as S

    config.use_config_dir(config_dir)  # before anything reads presets or composes
    if list_presets:
        typer.echo(S.format_presets())
        return
    if bn is not None and bn.replace(" ", "").lower() not in ("on", "off", "on,off", "off,on"):
        raise BnexpError(f"--bn must be on, off or on,off, got {bn!r}")
    overrides = with_bn(list(overrides or []), bn.replace(" ", "").lower() if bn else None)  # a list from here
    options = L.parse_options(launcher_opt)
    parallel = (jobs or 1) > 1 or launcher.value != LAUNCHERS[0]
    if dry_run:  # a grid above the maximum is counted and previewed, never expanded
        p, grids = S.preset_grid(overrides, preset)
        if sum(g.size for g in grids) > max_runs:
            typer.echo(S.describe_grid(p, grids, max_runs))
            return
    plan = S.plan(overrides, preset=preset, quiet=parallel, max_runs=max_runs)
    if dry_run:  # the configs are validated; device, data and model checks need torch and wait for the sweep
        typer.echo(S.describe(plan, dry_run=True))
        for p in plan.points:
            typer.echo(f"  {p.run_id}  {' '.join(p.overrides)}")
        return
    S.check_inputs(plan)
    typer.echo(S.describe(plan))
    if note := S.oversubscription(plan, jobs, launcher.value):
        typer.echo(note, err=True)

    def progress(r, done, total):
        typer.echo(f"[{done}/{total}] {L.summary_line(r)}" if done else f"[wait] {L.summary_line(r)}")

    result = S.run_sweep(plan, jobs=jobs, launcher=launcher.value, options=options, on_result=progress,
                         wait=wait, on_wait=lambda line: typer.echo(f"[wait] {line}"))
    typer.echo(S.format_summary(result, elapsed()))
    if result.counts[layout.FAILED] or result.counts[layout.BUSY]:
        raise typer.Exit(1)


def elapsed() -> float:
    """Seconds since this process started (Linux: /proc, so Python's start-up and imports count too),
    else since the CLI module was imported: what the sweep summary reports as the command's time."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - STARTED


def with_bn(overrides: list[str], bn: str | None) -> list[str]:
    """The --bn shortcut as the override bn=...; the same key given differently is a contradiction."""
    if bn is None:
        return overrides
    given = [o for o in overrides if o.lstrip("+~").partition("=")[0] == "bn"]
    if given and given[-1].partition("=")[2].strip().lower() != bn.lower():
        raise BnexpError(f"--bn {bn} conflicts with {given[-1]}; give one of them")
    return overrides + [f"bn={bn}"]


class ReportFormat(str, Enum):
    md = "md"
    html = "html"
    both = "both"


@app.command(epilog="\b\nExamples:\n  bnexp report\n  bnexp report --format html --where model.name=lenet5"
                    "\n  bnexp report --results-dir /shared/bnexp-results --out /tmp/report --where bn=on")
def report(
    results_dir: Path = typer.Option(Path("results"), "--results-dir", help="Results root (default: results)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: RESULTS_DIR/report)."),
    where: Optional[List[str]] = typer.Option(None, "--where", metavar="KEY=VALUE",
                                              help="Only runs whose config matches, repeatable (e.g. lr=0.5)."),
    fmt: ReportFormat = typer.Option(ReportFormat.md, "--format", help="md | html | both (default: md)."),
):
    """Tables, figures and the comparison with the published numbers, from every run on disk."""
    from .report import write_report

    result = write_report(results_dir, out, list(where or []), fmt.value)
    for w in result.warnings:
        typer.echo(f"warning: {w}", err=True)
    typer.echo(result.summary)


BenchName = Enum("BenchName", {name: name for name in BENCHMARKS}, type=str)  # bench.suite's benchmarks


@app.command(epilog="\b\nExamples:\n  bnexp bench bn\n  bnexp bench epoch --device cuda\n"
                    "  bnexp bench bn --device cuda --backends triton,compiled --channels-last\n"
                    "  bnexp bench epoch --device cuda --precision bf16\n  bnexp bench log\n  bnexp bench measure\n  bnexp bench cli")
def bench(
    which: Optional[List[BenchName]] = typer.Argument(None, help=f"Benchmarks to run (default: {' '.join(DEFAULT_BENCH)}; "
                                                      + "; ".join(f"{k} = {v}" for k, v in BENCHMARKS.items()) + ")."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda (default: auto)."),
    out: Path = typer.Option(Path("results/bench"), "--out", help="Where JSON results go (default: results/bench)."),
    backends: Optional[str] = typer.Option(None, "--backends", help="bn: bnexp BN backends to time side by side, "
                                           f"comma-separated ({', '.join(BN_BACKENDS)}; default: what auto picks)."),
    channels_last: bool = typer.Option(False, "--channels-last", help="bn, epoch: NHWC tensors and model."),
    kinds: Optional[str] = typer.Option(None, "--kinds", help="bn: norm kinds to time against their PyTorch "
                                        "counterparts, comma-separated (e.g. gn,ln,in,brn,ghost,noisy; default: bn)."),
    precision: str = typer.Option(next(iter(PRECISIONS)), "--precision",
                                  help=f"epoch: {' | '.join(PRECISIONS)} for bnexp's pipeline."),
):
    """Time bnexp against plain PyTorch in the same process: each ratio as min / median / max over
    interleaved pairs, marked UNSETTLED when another invocation may differ by more than ±10%."""
    from .bench import suite

    suite.run([w.value for w in which or []], device, out, echo=typer.echo, backends=backends,
              channels_last=channels_last, kinds=kinds, precision=precision)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the Typer app, mapping user errors to one line and exit code 2."""
    argv = sys.argv[1:] if argv is None else argv
    from .launch import quiet_torch_warnings

    quiet_torch_warnings()
    try:
        code = app(args=argv or ["--help"], prog_name="bnexp", standalone_mode=False)
    except BnexpError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TyperException as e:  # usage errors: unknown option, missing value, bad choice
        print(f"error: {e.format_message()} (see `bnexp --help`)", file=sys.stderr)
        return getattr(e, "exit_code", 2) or 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume from the last finished epoch", file=sys.stderr)
        return 130
    if code == 130:  # Typer turns Ctrl-C into exit code 130 itself
        print("interrupted: rerun the same command to resume from the last finished epoch", file=sys.stderr)
    return code if isinstance(code, int) else 0

if __name__ == "__main__":
    sys.exit(main())
