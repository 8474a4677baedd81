"""Sweeps: a grid of ordinary runs, expanded from Hydra overrides, run locally or on a cluster.

A grid point is exactly the run `bnexp train` would make: its config comes from
`config.compose(point_overrides)` and it is trained by `train.run(cfg)`, so it gets the same run
id and directory, a finished run is skipped, an interrupted one resumes from its checkpoint and a
failed one is retried. The grid is expanded with Hydra's own override parser and BasicSweeper
(`a=1,2 b=range(0,3)` -> the Cartesian product), and every point is composed and validated
before the first run starts, so a typo costs nothing.

Runs execute in this process (`--jobs 1`), in a pool of spawned processes (`--jobs N`), or
through joblib or submitit for clusters (launch.py). `train.run` holds a per-run file lock: a
run another process is training comes back "busy"; the sweep waits for such runs at the end of
its queue and then asks again, so two overlapping sweeps both finish with every run done and
each run trained once.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import config as C
from . import data
from . import launch as L
from . import train as T
from .errors import BnexpError

PRESET_DIR = C.CONF_DIR / "experiment"
DEFAULT_PRESET = "default"  # applies when no --preset is given; user overrides replace its keys
STATUSES = ("completed", "skipped", "diverged", "failed", "busy")


# ----------------------------------------------------------------------------- presets

@dataclass
class Preset:
    """A named grid: `params` maps config keys to a value or sweep in Hydra's override grammar."""
    name: str
    description: str
    params: dict[str, str]

    def overrides(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.params.items()]


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> Preset:
    """Read conf/experiment/<name>.yaml (format: the comment at the top of each file)."""
    import yaml

    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise BnexpError(f"unknown preset '{name}'; choose one of: {', '.join(preset_names())}")
    # BaseLoader keeps every scalar as the text written (`on` stays "on", `1e-3` stays "1e-3"):
    # the values are override-grammar strings, not YAML values.
    doc = yaml.load(path.read_text(), Loader=yaml.BaseLoader) or {}
    params = doc.get("params")
    if not isinstance(doc.get("description"), str) or not isinstance(params, dict) or \
            not all(isinstance(v, str) for v in params.values()):
        raise BnexpError(f"{path}: a preset needs `description: <one line>` and `params:` mapping each "
                         f"key to a value or sweep in override grammar (e.g. `lr: 0.01,0.1`)")
    return Preset(name, doc["description"], dict(params))


# ----------------------------------------------------------------------------- grid expansion

def _parse(overrides: list[str]):
    """Hydra's parser, with a config loader so that `model=glob(*)` can list the group."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(C.CONF_DIR), version_base=None):
            parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
            parsed = []
            for o in overrides:
                try:
                    parsed += parser.parse_overrides([o])
                except OverrideParseException as e:
                    lines = str(e).splitlines()
                    why = lines[1].split(" expecting ")[0] if len(lines) > 1 else lines[0]
                    raise BnexpError(f"malformed override '{o}' ({why}); expected key=value, key=v1,v2,..., "
                                     f"key=range(start,stop[,step]) or key=choice(v1,v2,...)") from None
            return parsed
    finally:
        GlobalHydra.instance().clear()


def expand(overrides: list[str]) -> tuple[dict[str, list[str]], list[list[str]]]:
    """Overrides (with sweeps) -> (swept key -> values, one override list per grid point).

    The product is Hydra's BasicSweeper.split_arguments: keys in order of first appearance, the
    last override of a key wins (so a user's `lr=...` replaces the preset's lr sweep).
    """
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.errors import HydraException

    parsed = _parse(C.apply_aliases(list(overrides)))
    for o in parsed:
        if o.is_sweep_override() and not o.is_discrete_sweep():
            raise BnexpError(f"'{o.input_line}' is a continuous range, not a grid; "
                             f"use key=a,b,c, key=range(start,stop,step) or key=choice(a,b,...)")
    try:
        [points] = BasicSweeper.split_arguments(parsed, None)
    except HydraException as e:
        raise BnexpError(str(e).splitlines()[0]) from None
    last = {}  # key -> its last override, at the key's first position (BasicSweeper's order)
    for o in parsed:
        last[o.get_key_element()] = o
    axes = {k: list(o.sweep_string_iterator()) for k, o in last.items() if o.is_sweep_override()}
    return axes, points


@dataclass
class Point:
    """One run of the grid: the overrides that compose it, the composed config, its run id."""
    overrides: list[str]
    cfg: object
    run_id: str

    @property
    def results_dir(self) -> str:
        return self.cfg.results_dir


@dataclass
class Plan:
    """A validated grid: every point composed, duplicates (same run) merged."""
    preset: str
    axes: dict[str, list[str]]
    fixed: list[str]
    points: list[Point]
    merged: int = 0


def plan(overrides: list[str] = (), preset: str | None = None, quiet: bool = False) -> Plan:
    """Preset + user overrides -> every grid point composed and validated, before anything runs.

    `quiet` turns per-run progress bars off (parallel runs); `progress` is not part of the run id.
    """
    p = load_preset(preset or DEFAULT_PRESET)
    axes, grid = expand(p.overrides() + list(overrides))
    swept = set(axes)
    fixed = [o for o in grid[0] if o.split("=", 1)[0] not in swept] if grid else []
    points, seen, merged = [], set(), 0
    for i, point in enumerate(grid, start=1):
        try:
            cfg = C.compose(point + (["progress=false"] if quiet else []))
        except BnexpError as e:
            where = " ".join(o for o in point if o.split("=", 1)[0] in swept) or " ".join(point)
            raise BnexpError(f"{e} (grid point {i} of {len(grid)}: {where})") from None
        run_id = C.run_id(cfg)
        if (cfg.results_dir, run_id) in seen:  # e.g. bn=off makes norm.* settings irrelevant
            merged += 1
            continue
        seen.add((cfg.results_dir, run_id))
        points.append(Point(point, cfg, run_id))
    return Plan(p.name, axes, fixed, points, merged)


def check_inputs(pl: Plan) -> None:
    """What `bnexp train` would reject at start-up (device, data, sizes), for every point, before any run."""
    data_sizes: dict[tuple, tuple[int, int]] = {}  # each data source is read once for the whole grid
    for i, p in enumerate(pl.points, start=1):
        cfg = p.cfg
        try:
            T.use_graphs(cfg, T.resolve_device(cfg.device))
            key = (cfg.data.name, cfg.data_dir, cfg.data.verify)
            if key not in data_sizes:
                root = data.resolve_data_dir(cfg.data_dir)
                data_sizes[key] = tuple(len(data.load_split(cfg.data.name, root, is_train, None, "cpu",
                                                            verify=cfg.data.verify)) for is_train in (True, False))
            T.check_sizes(cfg, *data_sizes[key])
        except BnexpError as e:
            where = " ".join(o for o in p.overrides if o.split("=", 1)[0] in pl.axes) or p.run_id
            raise BnexpError(f"{e} (grid point {i} of {len(pl.points)}: {where})") from None


def describe(pl: Plan) -> str:
    """What will run: the number of runs, the grid axes, the fixed overrides."""
    grid = " x ".join(f"{k}={','.join(v)}" for k, v in pl.axes.items()) or "a single point"
    dirs = sorted({str(p.results_dir) for p in pl.points})
    lines = [f"sweep: {len(pl.points)} run{'s' * (len(pl.points) != 1)} (preset {pl.preset}): {grid}"]
    if pl.fixed:
        lines.append(f"  fixed: {' '.join(pl.fixed)}")
    if pl.merged:
        lines.append(f"  {pl.merged} grid point(s) describe a run already in the grid and were merged")
    lines.append(f"  results: {', '.join(str(Path(d) / 'runs') for d in dirs)}")
    return "\n".join(lines)


def format_presets() -> str:
    """One line per preset: name, number of runs, description."""
    lines = []
    for name in preset_names():
        p = load_preset(name)
        _, grid = expand(p.overrides())
        lines.append(f"  {name:<30} {len(grid):>3} runs  {p.description}")
    return "presets (bnexp sweep --preset NAME [KEY=VALUE...]):\n" + "\n".join(lines)


# ----------------------------------------------------------------------------- scheduling

@dataclass
class SweepResult:
    plan: Plan
    results: list  # RunResult per point, in grid order
    seconds: float

    @property
    def counts(self) -> dict[str, int]:
        return {s: sum(r.status == s for r in self.results) for s in STATUSES}


def _is_finished(p: Point) -> bool:
    from .tracking import FINISHED

    return _run_dir(p).status() in FINISHED


def _run_dir(p: Point):
    from .tracking import RunDir

    return RunDir(Path(p.results_dir), p.run_id)


DEFAULT_WAIT = 3600.0  # seconds a sweep waits, at the end, for runs other processes hold (--wait)


def run_sweep(pl: Plan, jobs: int | None = None, launcher: str = "local", options: dict | None = None,
              on_result: Callable | None = None, poll: float = 2.0, wait: float | None = DEFAULT_WAIT,
              on_wait: Callable[[str], None] | None = None) -> SweepResult:
    """Run every point of the plan; `on_result(result, done, total)` is called as runs finish
    (and with done=None for a run found busy, which is retried after the rest of the queue).

    Runs still held by other processes once the rest is done are waited for, up to `wait`
    seconds in all (None: as long as they are held); `on_wait(line)` hears which run waits on
    which process, and a run given up on ends as 'busy' with the holder in its message."""
    if launcher not in L.LAUNCHERS:
        raise BnexpError(f"unknown launcher '{launcher}'; choose one of: {', '.join(L.LAUNCHERS)}")
    jobs = jobs or L.default_jobs(launcher, len(pl.points))
    name = "serial" if launcher == "local" and jobs == 1 else launcher
    workers = min(jobs, max(1, len(pl.points)))
    threads = None if name == "serial" else max(1, L.cpu_cores() // workers)  # split the cores between workers
    gpus = L.visible_gpus([p.cfg.device for p in pl.points]) if name != "serial" else []
    env = {k: v for k, v in os.environ.items() if k.startswith("BNEXP_")}
    tasks = [L.Task(i, p.cfg, os.getcwd(), env, threads, gpus) for i, p in enumerate(pl.points)]
    results: list = [None] * len(tasks)
    t0 = time.perf_counter()

    def finish(i, r, final=False):  # a busy result is final only once the sweep gave up waiting
        if r.status != "busy" or final:
            results[i] = r
        if on_result:
            on_result(r, sum(x is not None for x in results) if results[i] is r else None, len(results))

    pending, waiting, deadline = list(range(len(tasks))), [], None
    while pending or waiting:
        if not pending:  # everything else is done: wait for runs other processes are training
            if deadline is None and wait is not None:  # the clock starts with the first wait
                deadline = time.monotonic() + wait
            pending, gave_up = _wait_free(pl, waiting, poll, deadline, on_wait or (lambda line: None))
            for i, r in gave_up:
                finish(i, r, final=True)
            waiting = [i for i in waiting if i not in pending and results[i] is None]
        todo = []
        for i in pending:  # finished runs are skipped here, without dispatching them anywhere
            if _is_finished(pl.points[i]):
                finish(i, L.run_point(pl.points[i].cfg))
            else:
                todo.append(tasks[i])
        pending = []
        for i, r in (L.launch(name, todo, jobs, options) if todo else ()):
            finish(i, r)
            if r.status == "busy":
                waiting.append(i)
    return SweepResult(pl, results, time.perf_counter() - t0)


def _wait_free(pl: Plan, indices: list[int], poll: float, deadline: float | None,
               say: Callable[[str], None]) -> tuple[list[int], list[tuple[int, object]]]:
    """Block until at least one of these runs is no longer locked by another process, or the
    deadline passes: (the runs now free, [(index, busy RunResult)] for those given up on).
    `say` hears, once per run and holder, which process holds which run."""
    told: dict[int, str] = {}
    while True:
        free = [i for i in indices if _run_dir(pl.points[i]).lock_free()]
        if free:
            return free, []
        for i in indices:
            holder = _run_dir(pl.points[i]).lock_holder()
            if told.get(i) != holder:
                told[i] = holder
                left = "" if deadline is None else f", for at most {max(0, deadline - time.monotonic()):.0f}s more"
                say(f"waiting for {pl.points[i].run_id}: held by {holder}{left}")
        if deadline is not None and time.monotonic() >= deadline:
            return [], [(i, _busy(pl.points[i], told[i])) for i in indices]
        time.sleep(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))


def _busy(p: Point, holder: str):
    from .train import RunResult

    return RunResult(p.run_id, _run_dir(p).path, "busy", message=f"gave up waiting: still held by {holder}")


# ----------------------------------------------------------------------------- summary

def summary_table(res: SweepResult):
    """pandas DataFrame, one row per run: the swept axes, status, final metrics, recorded time."""
    import pandas as pd

    from .tracking import RunDir

    rows = []
    for p, r in zip(res.plan.points, res.results):
        values = dict(o.partition("=")[::2] for o in p.overrides)
        info = RunDir(Path(p.results_dir), p.run_id).read_info() or {}
        final = r.final or {}
        note = r.message if r.status in ("failed", "skipped", "busy") else ""
        if r.status == "diverged" and r.extra.get("diverged_at"):
            note = f"non-finite loss at epoch {r.extra['diverged_at']['epoch']}"
        rows.append({**{k: values.get(k) for k in res.plan.axes}, "status": r.status,
                     "epochs": f"{r.epochs_completed}/{p.cfg.epochs}",
                     **{k: final.get(k) for k in ("train_loss", "train_acc", "test_loss", "test_acc")},
                     "seconds": (info.get("seconds") or {}).get("total", r.seconds or None),
                     "note": note[:60]})
    return pd.DataFrame(rows)


def format_summary(res: SweepResult) -> str:
    df = summary_table(res)
    table = df.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.4f}")
    counts = ", ".join(f"{n} {s}" for s, n in res.counts.items())
    return f"{table}\n{len(res.results)} runs in {res.seconds:.1f}s: {counts}"
