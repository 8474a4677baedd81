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

import decimal
import itertools
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import config as C
from . import launch as L
from . import layout
from .errors import BnexpError

PRESET_DIR = C.CONF_DIR / "experiment"
DEFAULT_PRESET = "default"  # applies when no --preset is given; user overrides replace its keys
MAX_RUNS = 10_000  # the largest grid a sweep expands unless --max-runs says more (README, "Bad input")
PREVIEW = 10  # grid points that --dry-run lists for a grid above the maximum


# ----------------------------------------------------------------------------- presets

@dataclass
class Preset:
    """A named grid: `params` maps config keys to a value or sweep in Hydra's override grammar.

    `arms` (optional) makes it a union of grids: each arm's entries replace or add to `params`,
    for experiments whose arms are not a Cartesian product (d2l's three runs: scratch BN at lr 1.0
    with the biased running variance, nn.BatchNorm at lr 1.0, no BN at lr 0.9).
    """
    name: str
    description: str
    params: dict[str, str]
    arms: list[dict[str, str]] = field(default_factory=lambda: [{}])
    path: Path | None = None  # where it was read from
    user: bool = False  # from the user's config folder or a --preset PATH, not shipped with bnexp

    def overrides(self, arm: dict[str, str] | None = None) -> list[str]:
        return [f"{k}={v}" for k, v in {**self.params, **(arm or {})}.items()]

    def arm_overrides(self) -> list[list[str]]:
        return [self.overrides(arm) for arm in self.arms]


def preset_names() -> list[str]:
    """The shipped presets and those of the user's config folder (config.check_user_dir refuses a
    user preset with a shipped one's name, so each name is one file)."""
    return sorted(preset_paths())


def preset_paths() -> dict[str, Path]:
    """name -> file of every preset: conf/experiment/, then the user's config folder's experiment/."""
    folders = [PRESET_DIR] + ([d / C.PRESET_GROUP] if (d := C.user_config_dir()) else [])
    return {p.stem: p for folder in folders for p in sorted(folder.glob("*.yaml"))}


def _preset_path(name: str) -> Path:
    """--preset NAME (shipped or the user's) or --preset PATH.yaml (any file) -> the file to read."""
    if name.endswith((".yaml", ".yml")) or "/" in name or os.sep in name:
        path = Path(name).expanduser()
        if not path.is_file():
            raise BnexpError(f"preset file {name} {'is not a file' if path.exists() else 'does not exist'}; "
                             f"--preset takes a name ({', '.join(preset_names())}) or the path of a .yaml file")
        return path
    paths = preset_paths()
    if name not in paths:
        user = (f"; yours go in {d / C.PRESET_GROUP}/{name}.yaml" if (d := C.user_config_dir()) else
                f"; a file of your own: --preset PATH.yaml, or put it in DIR/{C.PRESET_GROUP}/ with --config-dir DIR")
        raise BnexpError(f"unknown preset '{name}'; choose one of: {', '.join(sorted(paths))}{user}")
    return paths[name]


def load_preset(name: str) -> Preset:
    """Read a preset by name (conf/experiment/<name>.yaml or the user's) or from a path (format: the
    comment at the top of each shipped file); a user's preset is checked exactly as a shipped one."""
    import yaml

    if not name or not name.strip():
        raise BnexpError(f"--preset needs a name; choose one of: {', '.join(preset_names())} "
                         f"(leave --preset out for the default grid)")
    path = _preset_path(name)
    # BaseLoader keeps every scalar as the text written (`on` stays "on", `1e-3` stays "1e-3"):
    # the values are override-grammar strings, not YAML values.
    doc = C.read_yaml(path, "preset", "fix the file (format: the comment at the top of each preset)",
                      loader=yaml.BaseLoader) or {}
    params = doc.get("params") if isinstance(doc, dict) else None
    arms = doc.get("arms", [{}]) if isinstance(doc, dict) else None
    if not isinstance(doc, dict) or not isinstance(doc.get("description"), str) or not isinstance(params, dict) or \
            not all(isinstance(v, str) for v in params.values()):
        raise BnexpError(f"{path}: a preset needs `description: <one line>` and `params:` mapping each "
                         f"key to a value or sweep in override grammar (e.g. `lr: 0.01,0.1`)")
    if not isinstance(arms, list) or not arms or not all(
            isinstance(a, dict) and all(isinstance(v, str) for v in a.values()) for a in arms):
        raise BnexpError(f"{path}: `arms:` must be a list of mappings of keys to values or sweeps, like `params:`")
    return Preset(path.stem, doc["description"], dict(params), [dict(a) for a in arms], path,
                  path.resolve().parent != PRESET_DIR.resolve())


# ----------------------------------------------------------------------------- grid expansion

_parser = None  # (user config folder, Hydra's override parser with a config loader), made once per folder


def _override_parser():
    """Hydra's override parser, with a config loader so that `model=glob(*)` can list the group.

    Made once: setting Hydra up costs ~20 ms (more on a busy CPU), and --list-presets parses the
    grids of every preset. The loader only reads the config directory, so it stays valid after
    Hydra's global state is cleared again (config.compose clears it for each composition)."""
    global _parser
    folder = C.user_config_dir()  # the user's folder is on the loader's search path (_config_loader)
    if _parser is None or _parser[0] != folder:
        from hydra import initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra
        from hydra.core.override_parser.overrides_parser import OverridesParser

        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(config_dir=str(C.CONF_DIR), version_base=None):
                _parser = (folder, OverridesParser.create(config_loader=_config_loader()))
        finally:
            GlobalHydra.instance().clear()
    return _parser[1]


def _parse(overrides: list[str]):
    """Overrides -> Hydra's parsed Override objects; a malformed one is one line."""
    from hydra.errors import OverrideParseException

    parser = _override_parser()
    parsed = []
    for o in overrides:
        try:
            parsed += parser.parse_overrides([o])
        except OverrideParseException as e:
            if (lexed := C.lexer_error(e)) is not None:
                raise lexed from None
            lines = str(e).splitlines()
            why = lines[1].split(" expecting ")[0] if len(lines) > 1 else lines[0]
            raise BnexpError(f"malformed override '{o}' ({why}); expected key=value, key=v1,v2,..., "
                             f"key=range(start,stop[,step]) or key=choice(v1,v2,...)") from None
    return parsed


def _config_loader():
    """Hydra's config loader, with the user's config folder on its search path when there is one (as
    `config.compose` adds it), so that `norm=glob(*)` lists the user's options too."""
    from hydra.core.global_hydra import GlobalHydra

    loader = GlobalHydra.instance().config_loader()
    folder = C.user_config_dir()
    if folder is None:
        return loader
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.config_search_path_impl import ConfigSearchPathImpl

    search_path = ConfigSearchPathImpl()
    for element in loader.get_search_path().get_path():
        search_path.append(element.provider, element.path)
    search_path.append("bnexp-user", f"file://{folder}")  # after conf/, as hydra.searchpath puts it
    return ConfigLoaderImpl(config_search_path=search_path)


def _count(o) -> int:
    """How many values a parsed override stands for, without enumerating a range."""
    from hydra.core.override_parser.types import ChoiceSweep, RangeSweep

    if not o.is_sweep_override():
        return 1
    v = o.value()
    if isinstance(v, ChoiceSweep):
        return len(v.list)
    if isinstance(v, RangeSweep):
        start, stop, step = (decimal.Decimal(x) for x in (v.start, v.stop, v.step))  # as FloatRange
        if step == 0:  # Hydra would loop for ever on a float range, raise on an int one
            raise BnexpError(f"'{o.input_line}': the step of a range must not be 0")
        return max(0, math.ceil((stop - start) / step))
    return sum(1 for _ in o.sweep_string_iterator())  # glob(...): the options of a config group


def _nth(o, j: int) -> str:
    """The j-th value of an override as BasicSweeper writes it, enumerating only the first j + 1 values
    (a shuffled range is previewed in order: shuffling would enumerate it)."""
    from hydra.core.override_parser.types import RangeSweep, Transformer

    if not o.is_sweep_override():
        return o.get_value_element_as_str()
    v = o.value()
    values = map(Transformer.str, v.range()) if isinstance(v, RangeSweep) else o.sweep_string_iterator()
    return next(itertools.islice(values, j, None))


@dataclass
class Grid:
    """Parsed overrides before expansion: one override per key, at the key's first position and holding
    its last value (BasicSweeper's order and precedence), with how many values each stands for."""
    overrides: list
    counts: list[int]

    @property
    def size(self) -> int:
        return math.prod(self.counts)

    def axes_text(self) -> str:
        """`bn=on,off x seed=range(0,100000000) (100000000 values)`: the swept keys, not enumerated."""
        parts = []
        for o, n in zip(self.overrides, self.counts):
            if o.is_sweep_override():
                text = o.input_line if o.input_line else f"{o.get_key_element()}=..."
                parts.append(text if n <= 12 else f"{text} ({n:,} values)")
        return " x ".join(parts) or "a single point"

    def preview(self, n: int) -> list[list[str]]:
        """The first n grid points (the last key varies fastest), without expanding the grid."""
        out = []
        for i in range(min(n, self.size)):
            digits = []
            for count in reversed(self.counts):
                i, j = divmod(i, count)
                digits.append(j)
            out.append([f"{o.get_key_element()}={_nth(o, j)}" for o, j in zip(self.overrides, reversed(digits))])
        return out


def parse_grid(overrides: list[str]) -> Grid:
    """Overrides (with sweeps) -> a Grid, counting the points without expanding them."""
    parsed = _parse(C.apply_aliases(list(overrides)))
    for o in parsed:
        if o.is_sweep_override() and not o.is_discrete_sweep():
            raise BnexpError(f"'{o.input_line}' is a continuous range, not a grid; "
                             f"use key=a,b,c, key=range(start,stop,step) or key=choice(a,b,...)")
    last = {}  # key -> its last override, at the key's first position (BasicSweeper's order)
    for o in parsed:
        last[o.get_key_element()] = o
    return Grid(list(last.values()), [_count(o) for o in last.values()])


def check_size(grid: Grid, max_runs: int = MAX_RUNS) -> None:
    if grid.size > max_runs:
        raise BnexpError(f"the grid has {grid.size:,} points ({grid.axes_text()}), more than the maximum of "
                         f"{max_runs:,} runs; narrow the grid, or pass --max-runs {grid.size} to run it anyway "
                         f"(--dry-run prints its size without composing it)")


def expand(overrides: list[str], max_runs: int = MAX_RUNS) -> tuple[dict[str, list[str]], list[list[str]]]:
    """Overrides (with sweeps) -> (swept key -> values, one override list per grid point).

    The product is Hydra's BasicSweeper.split_arguments: keys in order of first appearance, the
    last override of a key wins (so a user's `lr=...` replaces the preset's lr sweep). The grid is
    counted first and refused above `max_runs` points, so memory stays what the grid needs; a
    replaced override is never enumerated.
    """
    return expand_grid(parse_grid(overrides), max_runs)


def expand_grid(grid: Grid, max_runs: int = MAX_RUNS) -> tuple[dict[str, list[str]], list[list[str]]]:
    """`expand` of an already parsed grid."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.errors import HydraException

    check_size(grid, max_runs)
    try:
        [points] = BasicSweeper.split_arguments(grid.overrides, None)
    except HydraException as e:
        raise BnexpError(str(e).splitlines()[0]) from None
    axes = {o.get_key_element(): list(o.sweep_string_iterator()) for o in grid.overrides if o.is_sweep_override()}
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
    arms: list[str] = field(default_factory=list)  # each arm's own entries, for a preset with several


def preset_grid(overrides: list[str] = (), preset: str | None = None) -> tuple[Preset, list[Grid]]:
    """The preset (the default one when None) and the grid of each of its arms with the user's
    overrides (which come last, so they replace the preset's and the arms' entries), unexpanded."""
    p = load_preset(DEFAULT_PRESET if preset is None else preset)
    return p, [parse_grid(arm + list(overrides)) for arm in p.arm_overrides()]


def _merge_axes(arm_axes: list[dict[str, list[str]]], points: list[list[str]]) -> dict[str, list[str]]:
    """The keys that vary over the whole grid, with their values in order: those swept in an arm, those
    the arms set to different values, and those only some arms set."""
    values: dict[str, list[str]] = {}
    seen: dict[str, int] = {}
    for point in points:
        for o in point:
            k, _, v = o.partition("=")
            seen[k] = seen.get(k, 0) + 1
            if v not in values.setdefault(k, []):
                values[k].append(v)
    swept = {k for axes in arm_axes for k in axes}
    return {k: v for k, v in values.items() if k in swept or len(v) > 1 or seen[k] < len(points)}


def plan(overrides: list[str] = (), preset: str | None = None, quiet: bool = False,
         max_runs: int = MAX_RUNS) -> Plan:
    """Preset + user overrides -> every grid point composed and validated, before anything runs.

    `quiet` turns per-run progress bars off (parallel runs); `progress` is not part of the run id.
    A grid of more than `max_runs` points is refused before it is expanded.
    """
    p, grids = preset_grid(overrides, preset)
    if len(grids) > 1 and (size := sum(g.size for g in grids)) > max_runs:
        raise BnexpError(f"the grid has {size:,} points over the preset's {len(grids)} arms, more than the maximum "
                         f"of {max_runs:,} runs; narrow the grid, or pass --max-runs {size} to run it anyway")
    expanded = [expand_grid(g, max_runs) for g in grids]  # each arm's grid, parsed once
    grid = [point for _, points in expanded for point in points]
    axes = _merge_axes([a for a, _ in expanded], grid)
    swept = set(axes)
    fixed = [o for o in grid[0] if o.split("=", 1)[0] not in swept] if grid else []
    points, seen, merged = [], set(), 0
    compose = C.Composer()  # Hydra's config-file stage once per set of group choices, not once per point
    for i, point in enumerate(grid, start=1):
        try:
            cfg = compose(point + (["progress=false"] if quiet else []))
        except BnexpError as e:
            where = " ".join(o for o in point if o.split("=", 1)[0] in swept) or " ".join(point)
            raise BnexpError(f"{e} (grid point {i} of {len(grid)}: {where})") from None
        run_id = C.run_id(cfg)
        if (cfg.results_dir, run_id) in seen:  # e.g. bn=off makes norm.* settings irrelevant
            merged += 1
            continue
        seen.add((cfg.results_dir, run_id))
        points.append(Point(point, cfg, run_id))
    arms = [" ".join(f"{k}={v}" for k, v in arm.items()) for arm in p.arms] if len(p.arms) > 1 else []
    return Plan(p.name, axes, fixed, points, merged, arms)


def check_inputs(pl: Plan) -> None:
    """The start-up checks of `bnexp train` (preflight.check) for every point that will train, before
    any run. A finished point is skipped whatever its inputs (as `bnexp train` skips it), so a sweep
    whose points are all finished needs neither torch nor the data."""
    todo = [(i, p) for i, p in enumerate(pl.points, start=1) if not _is_finished(p)]
    if not todo:
        return
    from . import preflight  # torch: not needed to plan, list or refuse a grid

    seen = preflight.Seen()  # each data source is counted, each model built, once for the whole grid
    for i, p in todo:
        try:
            preflight.check(p.cfg, seen)
        except BnexpError as e:
            where = " ".join(o for o in p.overrides if o.split("=", 1)[0] in pl.axes) or p.run_id
            raise BnexpError(f"{e} (grid point {i} of {len(pl.points)}: {where})") from None


def _values_text(values: list[str], most: int = 12) -> str:
    """`a,b,c`, or for a long axis its first and last values and their number."""
    if len(values) <= most:
        return ",".join(values)
    return f"{','.join(values[:3])},...,{values[-1]} ({len(values):,} values)"


def describe_grid(p: Preset, grids: list[Grid], max_runs: int = MAX_RUNS) -> str:
    """For --dry-run of a grid above the maximum: its size and first points, none of them composed."""
    size = sum(g.size for g in grids)
    axes = " + ".join(f"({g.axes_text()})" for g in grids) if len(grids) > 1 else grids[0].axes_text()
    lines = [f"sweep: {size:,} grid points (preset {p.name}): {axes}",
             f"  more than the maximum of {max_runs:,} runs: not expanded or composed; a sweep of it needs "
             f"--max-runs {size} (or a narrower grid)",
             f"  first {min(PREVIEW, size)} points:"]
    first = [point for g in grids for point in g.preview(PREVIEW)][:PREVIEW]
    lines += [f"  {' '.join(point)}" for point in first]
    return "\n".join(lines)


def describe(pl: Plan, dry_run: bool = False) -> str:
    """What will run: the number of runs, the grid axes, the fixed overrides; for a dry run, how many
    are finished already and what was not checked."""
    grid = " x ".join(f"{k}={_values_text(v)}" for k, v in pl.axes.items()) or "a single point"
    if pl.arms:  # a union of grids: say which
        own = {o.split("=", 1)[0] for arm in pl.arms for o in arm.split()}
        shared = " x ".join(f"{k}={_values_text(v)}" for k, v in pl.axes.items() if k not in own)
        grid = (f"{shared} x " if shared else "") + "(" + " | ".join(pl.arms) + ")"
    dirs = sorted({str(p.results_dir) for p in pl.points})
    lines = [f"sweep: {len(pl.points)} run{'s' * (len(pl.points) != 1)} (preset {pl.preset}): {grid}"]
    if pl.fixed:
        lines.append(f"  fixed: {' '.join(pl.fixed)}")
    if pl.merged:
        lines.append(f"  {pl.merged} grid point(s) describe a run already in the grid and were merged")
    lines.append(f"  results: {', '.join(str(Path(d) / 'runs') for d in dirs)}")
    if dry_run:
        done = sum(_is_finished(p) for p in pl.points)
        lines.append(f"  dry run: every config validated; {done} of {len(pl.points)} runs finished already (the "
                     f"sweep skips them); device, data and model fit are checked when the sweep starts")
    return "\n".join(lines)


def oversubscription(pl: Plan, jobs: int | None, launcher: str) -> str | None:
    """A hint when parallel CPU runs ask for more threads than this machine has cores (it cannot
    lower them itself: a run's thread count is part of how its numbers are computed)."""
    from .execution import cpu_cores, resolve_threads

    jobs = jobs or L.default_jobs(launcher, len(pl.points))
    workers = min(jobs, len(pl.points))
    if launcher == "submitit" or workers < 2:
        return None
    threads = max((resolve_threads(p.cfg.threads) for p in pl.points if p.cfg.device in ("cpu", "auto")), default=0)
    if workers * threads <= cpu_cores():
        return None
    return (f"note: {workers} runs at once x {threads} threads each oversubscribe this machine's {cpu_cores()} cores; "
            f"threads={max(1, cpu_cores() // workers)} is faster (a run's thread count can change its numbers, so "
            f"bnexp does not lower it by itself; see `threads` in README)")


def format_presets() -> str:
    """One line per preset: name, number of runs, description."""
    lines, folder = [], C.user_config_dir()
    for name in preset_names():
        p, grids = preset_grid([], name)
        mine = f"  (yours: {p.path})" if p.user else ""
        lines.append(f"  {name:<30} {sum(g.size for g in grids):>3} runs  {p.description}{mine}")
    mine = "" if folder else "\nyour own: --preset PATH.yaml, or --config-dir DIR with DIR/experiment/NAME.yaml"
    return "presets (bnexp sweep --preset NAME [KEY=VALUE...]):\n" + "\n".join(lines) + mine


# ----------------------------------------------------------------------------- scheduling

@dataclass
class SweepResult:
    plan: Plan
    results: list  # RunResult per point, in grid order
    seconds: float

    @property
    def counts(self) -> dict[str, int]:
        return {s: sum(r.status == s for r in self.results) for s in layout.RESULT_STATUSES}


def _is_finished(p: Point) -> bool:
    return _run_dir(p).status() in layout.FINISHED


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
    gpus = L.visible_gpus([p.cfg.device for p in pl.points]) if name != "serial" else []
    env = {k: v for k, v in os.environ.items() if k.startswith("BNEXP_") or k == "OMP_NUM_THREADS"}
    tasks = [L.Task(i, p.cfg, os.getcwd(), env, gpus) for i, p in enumerate(pl.points)]
    results: list = [None] * len(tasks)
    t0 = time.perf_counter()

    def finish(i, r, final=False):  # a busy result is final only once the sweep gave up waiting
        if r.status != layout.BUSY or final:
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
            if r.status == layout.BUSY:
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
    from .tracking import RunResult

    return RunResult(p.run_id, _run_dir(p).path, layout.BUSY, message=f"gave up waiting: still held by {holder}")


# ----------------------------------------------------------------------------- summary

NOTE_WIDTH = 72  # characters of a run's note in the summary table


def summary_rows(res: SweepResult) -> list[dict]:
    """One dict per run: the swept axes, status, epochs, final metrics, recorded time, note."""
    from .outcome import DIVERGED, classify_run, diverged_where
    from .reference import load_reference
    from .tracking import RunDir

    num_classes = load_reference().num_classes
    rows = []
    for p, r in zip(res.plan.points, res.results):
        values = dict(o.partition("=")[::2] for o in p.overrides)
        rd = RunDir(Path(p.results_dir), p.run_id)
        info = rd.read_info() or {}
        final = r.final or {}
        note = r.message if r.status in (layout.FAILED, layout.BUSY) else ""
        if info.get("status") in layout.FINISHED and r.status in (*layout.FINISHED, layout.SKIPPED):  # how it ended (outcome.py)
            note = classify_run(rd.path, info["status"], num_classes.get(p.cfg.data.name), p.cfg.model.activation,
                                p.cfg.model.norm_position, info.get("final")).text()
        if r.status == layout.DIVERGED and r.extra.get("diverged_at"):
            note = f"{DIVERGED}: {diverged_where(r.extra['diverged_at'])}"
        rows.append({**{k: values.get(k) for k in res.plan.axes}, "status": r.status,
                     "epochs": f"{r.epochs_completed}/{p.cfg.epochs}",
                     **{k: final.get(k) for k in layout.FINAL_METRICS},
                     "seconds": (info.get("seconds") or {}).get("total", r.seconds or None),
                     "note": note[:NOTE_WIDTH]})
    return rows


def _text_table(rows: list[dict]) -> str:
    """Rows of equal keys as aligned text: numbers right-aligned with 4 decimals, text left, '-' for none.
    (Plain Python: pandas would cost the summary of an all-skipped sweep more than the sweep itself.)"""
    if not rows:
        return ""
    cols = list(rows[0])

    def cell(v) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    cells = [[cell(r[c]) for c in cols] for r in rows]
    numeric = [all(isinstance(r[c], (int, float)) or r[c] is None for r in rows) for c in cols]
    widths = [max(len(c), *(len(row[j]) for row in cells)) for j, c in enumerate(cols)]
    fmt = [(str.rjust if num else str.ljust) for num in numeric]
    lines = [" ".join(f(c, w) for f, c, w in zip(fmt, cols, widths))]
    lines += [" ".join(f(v, w) for f, v, w in zip(fmt, row, widths)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def format_summary(res: SweepResult, seconds: float | None = None) -> str:
    """The table and a count line; `seconds` is the whole command's wall time (planning, checks and
    skipped runs included), else the time spent running the points."""
    counts = ", ".join(f"{n} {s}" for s, n in res.counts.items())
    took = res.seconds if seconds is None else seconds
    return f"{_text_table(summary_rows(res))}\n{len(res.results)} runs in {took:.1f}s: {counts}"
