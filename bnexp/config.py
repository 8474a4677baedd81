"""Compose and validate run configs; derive a run's identity from its resolved config.

Config is read here and nowhere else: `compose(overrides)` turns Hydra overrides on
`bnexp/conf/config.yaml` into a validated, read-only DictConfig; every later layer
only reads plain values from it. User mistakes raise BnexpError with one line.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from . import measures_format as MF
from . import model_knobs as MK
from .errors import BnexpError
from .execution import CUDA_GRAPHS, PRECISIONS  # torch-free
from .nn.kinds import BACKENDS, BATCH_STAT_KINDS, KIND_KWARGS, NORM_KINDS  # torch-free

CONF_DIR = Path(__file__).parent / "conf"
# A user's own config folder (`--config-dir DIR` sets it for the command and the processes it starts):
# DIR/experiment/*.yaml presets and DIR/<group>/*.yaml options, added to Hydra's search path.
CONFIG_DIR_ENV = "BNEXP_CONFIG_DIR"
GROUPS = tuple(re.findall(r"^\s+-\s+(\w+):", (CONF_DIR / "config.yaml").read_text(), re.M))  # its defaults list
PRESET_GROUP = "experiment"

# Override keys users may type that are spelled differently in the config tree.
ALIASES = {"optimizer": "optim"}

# Keys that say where or how a run executes, not what is trained: excluded from the run id.
# probe_every and eval_every stay in the identity: they change which records (activation histograms,
# mid-epoch test accuracies) a run holds, though not its training numbers.
# channels_last and cuda_graphs change kernels, not the computation (like device): same numbers
# up to floating-point reassociation. precision does change the numbers; see `identity`.
# threads and norm.backend do change the numbers, but they say how a run computes, not what: they are
# recorded in run.json's `execution` block, and a resume under other values is refused (execution.py).
NON_IDENTITY_KEYS = ("device", "data_dir", "results_dir", "progress", "channels_last", "cuda_graphs", "threads",
                     "norm.backend")
# Keys added after run ids were first published: at these values they are left out of the hash,
# so runs made before the key existed keep their ids.
HASH_DEFAULTS = {"precision": "fp32", "eval_every": 0, "precise_bn": 0, "lr_scale_batch": None, "model.activation": "relu", "model.pool": "max",
                 "model.norm_position": "before", "model.init": "default"}

DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")

INSTRUMENTS = MF.INSTRUMENTS  # bnexp.measures_format is torch-free: composing a config stays instant
# The instrument keys: left out of the run id while `measure` is [] (runs without instruments keep their ids);
# with instruments on, all three are part of it (a run with instruments is another run directory).
MEASURE_KEYS = MF.CONFIG_KEYS

# Upper limits on values that would otherwise fail mid-run or exhaust memory (README, "Bad input"),
# checked after the type checks: key -> (largest value allowed, why).
MAX_EPOCHS = 100_000
MAX_SEED = 2**32 - 1
MAX_RATE = 1e6
LIMITS: dict[str, tuple[int | float, str]] = {
    "epochs": (MAX_EPOCHS, "100000 LeNet5 epochs are already weeks of compute"),
    "seed": (MAX_SEED, "2**32 - 1; the batch order is seeded with seed * 1000003 + epoch, a 64-bit integer"),
    "lr": (MAX_RATE, "torch's optimisers compute in float32 and raise mid-run above 3.4e38"),
    "optim.weight_decay": (MAX_RATE, "torch's optimisers compute in float32 and raise mid-run above 3.4e38"),
}


# ----------------------------------------------------------------------------- value checks

def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _non_negative_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def one_of(choices) -> str:
    """Choices as a message lists them: 'a, b or c'."""
    *rest, last = [str(c) for c in choices]
    return f"{', '.join(rest)} or {last}" if rest else last


def declared(group: str, key: str = "name") -> tuple[str, ...]:
    """The `key` values the shipped options of a config group declare (conf/<group>/*.yaml, one line
    `key: value` each): the networks, data sets and optimisers bnexp has code for (a test pins them
    to the registries). A user's option may choose among them, not add one."""
    pattern = re.compile(rf"^{key}:\s*(\w+)", re.M)
    return tuple(sorted({m.group(1) for p in (CONF_DIR / group).glob("*.yaml") if (m := pattern.search(p.read_text()))}))


MODEL_NAMES, DATA_NAMES, OPTIM_NAMES = declared("model"), declared("data"), declared("optim")
# The keys whose values are a fixed set, each from its owner; `--help` lists them with the key.
CHOICES: dict[str, tuple] = {
    "precision": tuple(PRECISIONS), "cuda_graphs": CUDA_GRAPHS, "model.name": MODEL_NAMES,
    "model.activation": tuple(MK.ACTIVATIONS), "model.pool": (*MK.POOLS, None), "model.norm_position": MK.NORM_POSITIONS,
    "model.init": MK.INITS, "data.name": DATA_NAMES, "norm.kind": NORM_KINDS, "norm.backend": BACKENDS,
    "optim.name": OPTIM_NAMES,
}

_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "bn": (lambda v: v is None or v in ("on", "off"), "on or off"),
    "lr": (lambda v: _number(v) and v > 0, "a positive number"),
    "lr_scale_batch": (lambda v: v is None or _positive_int(v), "null or a positive integer (the batch size lr is for)"),
    "batch_size": (_positive_int, "a positive integer"),
    "epochs": (_positive_int, "a positive integer"),
    "seed": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a non-negative integer"),
    "device": (lambda v: isinstance(v, str) and bool(DEVICE_RE.match(v)), "auto, cpu, cuda, cuda:N or mps"),
    "data_dir": (lambda v: v is None or (isinstance(v, str) and v != ""), "a directory path or null"),
    "results_dir": (lambda v: isinstance(v, str) and v != "", "a directory path"),
    "train_size": (lambda v: v is None or _positive_int(v), "a positive integer or null"),
    "test_size": (lambda v: v is None or _positive_int(v), "a positive integer or null"),
    "drop_last": (lambda v: isinstance(v, bool), "true or false"),
    "probe_every": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a non-negative integer"),
    "eval_every": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a non-negative integer"),
    "precise_bn": (_non_negative_int, "a non-negative integer (training batches; 0 = off)"),
    "progress": (lambda v: isinstance(v, bool), "true or false"),
    "precision": (lambda v: v in PRECISIONS, one_of(PRECISIONS)),
    "channels_last": (lambda v: isinstance(v, bool), "true or false"),
    "cuda_graphs": (lambda v: v in CUDA_GRAPHS, one_of(CUDA_GRAPHS)),
    "threads": (lambda v: v == "auto" or _positive_int(v), "auto or a positive integer"),
    "model.name": (lambda v: v in MODEL_NAMES, one_of(MODEL_NAMES)),
    "model.dropout": (lambda v: v is None or (_number(v) and 0 <= v < 1), "null or a number in [0, 1)"),
    "model.activation": (lambda v: v in MK.ACTIVATIONS, one_of(MK.ACTIVATIONS)),
    "model.pool": (lambda v: v is None or v in MK.POOLS, f"{', '.join(MK.POOLS)} or null (networks without pooling)"),
    "model.norm_position": (lambda v: v in MK.NORM_POSITIONS, f"{one_of(MK.NORM_POSITIONS)} (the nonlinearity)"),
    "model.init": (lambda v: v in MK.INITS, one_of(MK.INITS)),
    "data.name": (lambda v: v in DATA_NAMES, one_of(DATA_NAMES)),
    "data.verify": (lambda v: isinstance(v, bool), "true or false"),
    "norm.kind": (lambda v: v in NORM_KINDS, ", ".join(NORM_KINDS)),
    "norm.eps": (lambda v: _number(v) and v > 0, "a positive number"),
    "norm.momentum": (lambda v: v is None or (_number(v) and 0 <= v <= 1), "null or a number in [0, 1]"),
    "norm.biased_running_var": (lambda v: isinstance(v, bool), "true or false"),
    "norm.groups": (lambda v: v is None or _positive_int(v), "null or a positive integer"),
    "norm.r_max": (lambda v: v is None or (_number(v) and v >= 1), "null or a number >= 1"),
    "norm.d_max": (lambda v: v is None or (_number(v) and v >= 0), "null or a number >= 0"),
    "norm.warmup_steps": (lambda v: v is None or _non_negative_int(v), "null or an integer >= 0"),
    "norm.r_max_steps": (lambda v: v is None or _non_negative_int(v), "null or an integer >= 0"),
    "norm.d_max_steps": (lambda v: v is None or _non_negative_int(v), "null or an integer >= 0"),
    "norm.ghost_size": (lambda v: v is None or _positive_int(v), "null or a positive integer"),
    "norm.noise": (lambda v: v is None or (_number(v) and v >= 0), "null or a number >= 0"),
    "norm.backend": (lambda v: v in BACKENDS, " or ".join(BACKENDS)),
    "optim.name": (lambda v: v in OPTIM_NAMES, one_of(OPTIM_NAMES)),
    "optim.momentum": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "optim.weight_decay": (lambda v: _number(v) and v >= 0, "a non-negative number"),
    "measure": (lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v),
                f"a list of instrument names ({', '.join(INSTRUMENTS)}), all, or []"),
    "measure_every": (_positive_int, "a positive integer (steps between measurements)"),
    "measure_steps": (lambda v: isinstance(v, list) and len(v) > 0 and all(_number(m) and m > 0 for m in v),
                      "a non-empty list of positive numbers (multiples of lr), e.g. [0.5,1,2,4]"),
}


def check_value(key: str, value, option: str | None = None) -> None:
    """Refuse a value that config key `key` would refuse, in the same words (for a command-line
    option that takes one, e.g. bench's --device: `option` names it)."""
    ok, expected = _CHECKS[key]
    if not ok(value):
        raise BnexpError(f"{option or key} must be {expected}, got {value!r}")


FLOAT_KEYS = ("lr", "model.dropout", "norm.eps", "norm.momentum", "optim.momentum", "optim.weight_decay",
              "norm.r_max", "norm.d_max", "norm.noise")
BOOL_WORDS = {"on": True, "off": False, "true": True, "false": False}


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def bn_word(value) -> str | None:
    """`bn` as users and YAML spell it (on, off, true, False, ...) -> "on" / "off"; None for anything else."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, str) and value.lower() in BOOL_WORDS:
        return "on" if BOOL_WORDS[value.lower()] else "off"
    return None


def bn_of(norm_kind: str | None) -> str:
    """The recorded `bn` of a config: on iff it has normalisation layers (norm.kind is not none)."""
    return "off" if norm_kind == "none" else "on"


def default_dropout(norm_kind: str) -> float:
    """model.dropout null: the reference rule, dropout 0.5 without normalisation, none with it (BN regularises)."""
    return 0.5 if norm_kind == "none" else 0.0


def _set(d: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        d = d[p]
    d[leaf] = value


def _normalise_values(flat: dict[str, Any]) -> dict[str, Any]:
    """Accept the spellings users type: `bn=true`, `lr=1` (int for a float), `drop_last=on`."""
    if (bn := bn_word(flat.get("bn"))) is not None:
        flat["bn"] = bn
    for key in FLOAT_KEYS:
        v = flat.get(key)
        if isinstance(v, int) and not isinstance(v, bool):
            flat[key] = float(v)
    threads = flat.get("threads")
    if isinstance(threads, str) and threads.strip().isdigit():  # from $BNEXP_THREADS-style interpolations
        flat["threads"] = int(threads)
    if isinstance(flat.get("norm.backend"), str):
        flat["norm.backend"] = flat["norm.backend"].strip().lower()
    measure = flat.get("measure")
    if isinstance(measure, str):  # `measure=all`, or one name without brackets
        flat["measure"] = list(INSTRUMENTS) if measure.strip().lower() == "all" else [measure]
    steps = flat.get("measure_steps")
    if _number(steps):  # `measure_steps=0.5`: a grid of one step
        flat["measure_steps"] = [steps]
    if isinstance(flat.get("measure_steps"), list):
        flat["measure_steps"] = [float(m) if isinstance(m, int) and not isinstance(m, bool) else m
                                 for m in flat["measure_steps"]]
    if isinstance(flat.get("cuda_graphs"), bool):  # YAML reads on/off as booleans
        flat["cuda_graphs"] = "on" if flat["cuda_graphs"] else "off"
    for key in ("drop_last", "progress", "channels_last", "data.verify", "norm.biased_running_var"):
        v = flat.get(key)
        if isinstance(v, str) and v.lower() in BOOL_WORDS:
            flat[key] = BOOL_WORDS[v.lower()]
    return flat


def _text(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


# BN in training mode normalises with the batch's own statistics: one sample is one value per channel
# in the FC layers, and torch raises "Expected more than 1 value per channel when training".
BN_NEEDS_TWO = {
    "batch_size": "every training batch",
    "train_size": "a training batch",
    "test_size": "the activation probe (test images normalised with their own batch statistics)",
}


def _check_batch_statistics(flat: dict) -> None:
    """With a BN model, refuse sizes that give a batch of one sample (the check needs no data)."""
    for key, what in BN_NEEDS_TWO.items():
        if flat[key] == 1:
            raise BnexpError(f"{key}=1 with batch normalisation (norm={flat['norm.kind']}): {what} needs at "
                             f"least 2 samples for batch statistics; use {key}=2 or more, or bn=off")


def _check_measure(names: list[str]) -> None:
    """Every name an instrument, none twice (the order is free: measures.csv follows INSTRUMENTS)."""
    for name in names:
        if name not in INSTRUMENTS:
            raise BnexpError(f"measure: unknown instrument {name!r}; choose from {', '.join(INSTRUMENTS)}, "
                             f"or measure=all")
        if names.count(name) > 1:
            raise BnexpError(f"measure: {name!r} is listed twice; list each instrument once")


def validate(raw: dict) -> dict:
    """Check every key's type and range, reconcile `bn` with `norm`; return the resolved dict."""
    flat = _normalise_values(flatten(raw))
    unknown = sorted(set(flat) - set(_CHECKS))
    if unknown:
        raise BnexpError(f"unknown config key '{unknown[0]}'; valid keys: {', '.join(sorted(_CHECKS))}")
    missing = sorted(set(_CHECKS) - set(flat))
    if missing:
        raise BnexpError(f"config key '{missing[0]}' is missing (did a config group file lose it?)")
    for key in _CHECKS:
        check_value(key, flat[key])
    for key, (limit, why) in LIMITS.items():
        if flat[key] > limit:
            raise BnexpError(f"{key}={_text(flat[key])} is above the limit of {_text(limit)} ({why}); "
                             f"use a smaller {key}")
    _check_measure(flat["measure"])
    # `bn` is a shortcut for `norm`: off means no normalisation; on requires a BN kind.
    if flat["bn"] == "off":
        flat["norm.kind"] = "none"
    elif flat["bn"] == "on" and flat["norm.kind"] == "none":
        raise BnexpError("bn=on conflicts with norm=none; use bn=off, or norm=bn / norm=torch")
    flat["bn"] = bn_of(flat["norm.kind"])
    if flat["norm.kind"] == "torch" and flat["norm.biased_running_var"]:
        raise BnexpError("norm.biased_running_var=true needs norm=bn: torch.nn.BatchNorm has no such option")
    if flat["norm.kind"] in BATCH_STAT_KINDS:
        _check_batch_statistics(flat)
    if flat["precise_bn"] and flat["norm.kind"] not in BATCH_STAT_KINDS:
        raise BnexpError(f"precise_bn={flat['precise_bn']} needs a norm with running statistics ({', '.join(BATCH_STAT_KINDS)}); "
                         f"norm={flat['norm.kind']} has none to recompute: use precise_bn=0")
    if flat["norm.kind"] == "ghost" and (flat["norm.ghost_size"] or 0) > flat["batch_size"]:
        raise BnexpError(f"norm.ghost_size={flat['norm.ghost_size']} is larger than batch_size={flat['batch_size']}: "
                         f"a virtual batch is part of a batch; use norm.ghost_size <= {flat['batch_size']}")
    out = OmegaConf.to_container(OmegaConf.create(raw))
    for key, value in flat.items():
        _set(out, key, value)
    return out


# ----------------------------------------------------------------------------- documentation

_KEY_LINE = re.compile(r"^(\w+):\s*([^#]*?)\s*(?:#\s*(.*))?$")
_ENV_DEFAULT = re.compile(r"^\$\{oc\.env:(\w+),([^}]*)\}$")


def _doc_text(value, comment: str) -> tuple[str, str]:
    """A config value as a user types it in an override (null, true, 0.1), and its comment; a default
    taken from an environment variable shows its fallback, the comment names the variable."""
    m = _ENV_DEFAULT.match(value) if isinstance(value, str) else None
    if m:
        return m.group(2), f"(${m.group(1)} if set) {comment}"
    return override_text(value), comment


def override_text(value) -> str:
    """A value as an override spells it: null, true, 0.1, [0.5,1.0] (a list without spaces: one shell word)."""
    if isinstance(value, list):
        return "[" + ",".join(override_text(v) for v in value) + "]"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def key_docs() -> tuple[list[tuple[str, str, str]], dict[str, str]]:
    """((key, default, comment) for every config key, {group: default option}): the defaults of the
    composed config itself (`compose([])` before its values are resolved and checked: `bn` shows
    null, a default read from an environment variable its fallback), each with the comment of the
    yaml line that sets it. For `--help` (which composes; the other commands do not call this)."""
    cfg = _hydra_compose([], hydra_node=True)
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    groups = {g: choices[g] for g in GROUPS}
    comments = {}
    for prefix, path in [("", CONF_DIR / "config.yaml"), *((f"{g}.", CONF_DIR / g / f"{o}.yaml") for g, o in groups.items())]:
        for line in path.read_text().splitlines():
            if m := _KEY_LINE.match(line):
                comments[prefix + m.group(1)] = m.group(3) or ""
    container = OmegaConf.to_container(cfg, resolve=False)
    container.pop("hydra")
    flat = flatten(container)
    for key, choices in CHOICES.items():
        comments[key] = " | ".join(map(override_text, choices)) + (f"; {comments[key]}" if comments.get(key) else "")
    keys = [(k, *_doc_text(flat[k], comments.get(k, ""))) for k in sorted(flat, key=lambda k: "." in k)]
    return keys, groups


def group_options(group: str, user: bool = False) -> list[str]:
    """The options of a config group: the shipped ones, and with `user` those of the user's config folder."""
    folders = [CONF_DIR] + ([d] if user and (d := user_config_dir()) else [])
    return sorted(p.stem for folder in folders for p in (folder / group).glob("*.yaml"))


# ----------------------------------------------------------------------------- the user's config folder

def read_yaml(path: Path, what: str, fix: str | None = None, loader=None):
    """A user's YAML file (a preset, a config option) -> its document; a file that cannot be read or
    parsed is one line naming it, where the problem is and `fix` (default: fix the <what>).
    `loader` None is yaml.safe_load; presets pass BaseLoader (every scalar kept as the text written)."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
        return yaml.safe_load(text) if loader is None else yaml.load(text, Loader=loader)
    except UnicodeDecodeError as e:
        raise BnexpError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                         f"save the {what} as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise BnexpError(f"{path}: YAML syntax error{where} ({problem}); {fix or f'fix the {what}'}") from None
    except OSError as e:
        raise BnexpError(f"{path}: cannot read the {what} ({e.strerror or e})") from None


def _read_mapping(path: Path, what: str) -> dict:
    """A YAML file that must hold a mapping -> the mapping; anything else is one line naming the file."""
    doc = read_yaml(path, what)
    if not isinstance(doc, dict):
        raise BnexpError(f"{path}: a {what} must be a YAML mapping of keys to values, got "
                         f"{'an empty file' if doc is None else type(doc).__name__}")
    return doc


def check_user_dir(folder: Path) -> None:
    """What a user config folder may hold, checked before anything is composed: experiment/*.yaml
    presets (read by sweep.load_preset) and <group>/*.yaml options that set only their group's keys
    (the same keys as the shipped options; the values are checked on compose, like the shipped
    ones). No option may have a shipped option's name: Hydra would silently take the shipped one
    (the search path lists conf/ first), so the user's file would be ignored."""
    if not folder.is_dir():
        raise BnexpError(f"config folder {folder} {'is not a directory' if folder.exists() else 'does not exist'}; "
                         f"give --config-dir (or ${CONFIG_DIR_ENV}) a folder holding experiment/*.yaml and "
                         f"<group>/*.yaml, groups {', '.join(GROUPS)}")
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or (path.is_file() and path.suffix not in (".yaml", ".yml")):
            continue  # a README, an editor's backup: not config
        if path.is_file():
            raise BnexpError(f"{path}: a config folder holds option folders ({', '.join(GROUPS)}, {PRESET_GROUP}), "
                             f"not top-level YAML files (the primary config is bnexp's own); move it into one of them")
        if path.name not in (*GROUPS, PRESET_GROUP):
            raise BnexpError(f"{path}: not a config group; the folders of a config folder are "
                             f"{', '.join(GROUPS)} (options) and {PRESET_GROUP} (presets)")
        known = {k.split(".", 1)[1] for k in _CHECKS if k.startswith(path.name + ".")}
        for option in sorted(path.iterdir()):
            if option.suffix == ".yml":
                raise BnexpError(f"{option}: Hydra reads only .yaml files; rename it to {option.with_suffix('.yaml').name}")
            if option.suffix != ".yaml":
                continue
            if (CONF_DIR / path.name / option.name).exists():
                what = "preset" if path.name == PRESET_GROUP else f"{path.name} option"
                raise BnexpError(f"{option}: shadows bnexp's own {what} '{option.stem}' (the shipped one would be "
                                 f"used); give yours another name")
            if path.name == PRESET_GROUP:
                continue
            unknown = sorted(set(_read_mapping(option, f"{path.name} option")) - known)
            if unknown:
                raise BnexpError(f"{option}: unknown {path.name} key '{unknown[0]}'; a {path.name} option sets "
                                 f"only {', '.join(sorted(known))}")


_checked: set[tuple] = set()  # folder states that passed check_user_dir (a sweep composes once per grid point)


def _state(folder: Path) -> tuple:
    """The folder and the name, size and mtime of everything two levels down: changes when a file does."""
    try:
        entries = [p for sub in folder.iterdir() for p in ([sub, *sub.iterdir()] if sub.is_dir() else [sub])]
        return (str(folder), *sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in entries))
    except OSError:
        return (str(folder), None)  # missing or unreadable: never cached, check_user_dir says why


def user_config_dir() -> Path | None:
    """The user's config folder from $BNEXP_CONFIG_DIR (absolute, checked), or None when unset."""
    raw = os.environ.get(CONFIG_DIR_ENV, "").strip()
    if not raw:
        return None
    folder = Path(raw).expanduser().absolute()
    state = _state(folder)
    if state not in _checked:
        check_user_dir(folder)
        if state[1:] != (None,):
            _checked.add(state)
    return folder


def use_config_dir(folder: str | Path | None) -> None:
    """`--config-dir DIR`: check DIR and export it, so that this command and every process it starts
    (sweep workers, cluster jobs: they inherit BNEXP_* variables) compose with the same folder."""
    if folder is None:
        return
    path = Path(folder).expanduser().absolute()
    check_user_dir(path)
    os.environ[CONFIG_DIR_ENV] = str(path)


def search_path_overrides() -> list[str]:
    """The Hydra override that adds the user's config folder to the config search path (after conf/)."""
    folder = user_config_dir()
    if folder is None:
        return []
    quoted = str(folder).replace("\\", "\\\\").replace("'", "\\'")
    return [f"hydra.searchpath=['file://{quoted}']"]


# ----------------------------------------------------------------------------- composition

def apply_aliases(overrides: list[str]) -> list[str]:
    """Rename alias keys (`optimizer=adam` -> `optim=adam`), keeping any +/~ prefix."""
    out = []
    for o in overrides:
        m = re.match(r"^([+~]{0,2})([\w.]+)(.*)$", o, re.S)
        if m and m.group(2) in ALIASES:
            o = m.group(1) + ALIASES[m.group(2)] + m.group(3)
        out.append(o)
    return out


def lexer_error(e: Exception) -> BnexpError | None:
    """Hydra's lexer rejects a character (non-ASCII, `;`, ...) before parsing and reports it only as
    `LexerNoViableAltException: <override>` plus a caret: name the override, the character and the fix."""
    lines = str(e).splitlines()
    prefix = "LexerNoViableAltException: "
    if not lines or not lines[0].startswith(prefix):
        return None
    o = lines[0][len(prefix):]
    col = lines[1].find("^") - len(prefix) if len(lines) > 1 else -1
    what = f"character {o[col]!r}" if 0 <= col < len(o) else "a character"
    key, eq, value = o.partition("=")
    if eq and col > len(key):
        fix = f"quote the value inside the shell's quotes: \"{key}='{value}'\""
    else:
        fix = "keys are ASCII names (see `bnexp train --help`)"
    return BnexpError(f"malformed override '{o}': {what} is not allowed unquoted; {fix}")


def _hydra_error(e: Exception) -> BnexpError:
    """Turn a Hydra composition/parse error into one actionable line."""
    from hydra.errors import MissingConfigException, OverrideParseException

    text = str(e)
    if isinstance(e, MissingConfigException):
        m = re.search(r"Could not find '(\w+)/([^']*)'", text)
        if m:
            group = m.group(1)
            options = group_options(group, user=True)
            where = (f"yours go in {folder / group}/NAME.yaml" if (folder := user_config_dir()) else
                     f"your own go in DIR/{group}/NAME.yaml with --config-dir DIR")
            return BnexpError(f"unknown {group} '{m.group(2)}'; choose one of: {', '.join(options)} ({where})")
    if isinstance(e, OverrideParseException):
        if (lexed := lexer_error(e)) is not None:
            return lexed
        m = re.search(r"Error parsing override '([^']*)'", text)
        what = m.group(1) if m else "?"
        return BnexpError(f"malformed override '{what}': expected key=value (see `bnexp train --help`)")
    m = re.search(r"Could not override '([^']*)'", text)
    if m:
        return BnexpError(f"unknown config key '{m.group(1)}'; see `bnexp train --help` for the keys")
    m = re.search(r"Ambiguous value for argument '([^']*)'", text)
    if m:
        return BnexpError(f"'{m.group(1)}' is a sweep (several values); use `bnexp sweep` for grids")
    return BnexpError(text.strip().splitlines()[0])


def _interpolation_error(cfg: DictConfig, e: Exception) -> BnexpError:
    """An interpolation that cannot be resolved -> one line naming the key, its value and the reason."""
    key = getattr(e, "full_key", None) or "?"
    value = flatten(OmegaConf.to_container(cfg, resolve=False)).get(key, "?")
    reason = (getattr(e, "msg", None) or str(e)).strip().splitlines()[0]
    reason = re.sub(r"^\w+ raised while resolving interpolation: ", "", reason)
    return BnexpError(f"{key}: interpolation {value!r} cannot be resolved ({reason}); give {key} a plain "
                      f"value instead (e.g. {key}=<value>), or set what it refers to")


def check_bn_shortcut(overrides: list[str]) -> None:
    """`bn` is a shortcut for `norm`: an explicit bn=off beside an explicit norm, or bn=on beside
    norm=none, contradicts it (the config files alone never do: their bn is null)."""
    given = {}
    for o in overrides:
        key, sep, value = o.lstrip("+~").partition("=")
        if sep and key in ("bn", "norm", "norm.kind"):
            given["norm" if key == "norm.kind" else key] = value.strip().strip("'\"").lower()
    bn, norm = bn_word(given.get("bn")), given.get("norm")
    if bn is None or norm is None:
        return
    if bn == "off" and norm != "none":
        raise BnexpError(f"bn=off conflicts with norm={norm}: bn=off means norm=none; give one of them "
                         f"(norm={norm} for that layer, or bn=off for none)")
    if bn == "on" and norm == "none":
        raise BnexpError("bn=on conflicts with norm=none; use bn=off, or norm=bn / norm=torch")


def compose(overrides: list[str] = ()) -> DictConfig:
    """Hydra overrides -> validated, resolved, read-only config."""
    overrides = apply_aliases(list(overrides))
    check_keys(overrides)
    check_bn_shortcut(overrides)
    return _finish(_hydra_compose(overrides))


def check_keys(overrides: list[str]) -> None:
    """A plain `key=value` whose key no config has is refused before Hydra is set up (a typo is
    answered at once), with the words Hydra's own refusal gets (`_hydra_error`). Prefixed (+, ~),
    packaged (@) and hydra.* overrides are left to Hydra."""
    for o in overrides:
        m = re.match(r"^([A-Za-z_][\w.]*)=", o)
        if m and not m.group(1).startswith("hydra.") and m.group(1) not in _CHECKS \
                and not (CONF_DIR / m.group(1)).is_dir():
            raise BnexpError(f"unknown config key '{m.group(1)}'; see `bnexp train --help` for the keys")


def _hydra_compose(overrides: list[str], hydra_node: bool = False) -> DictConfig:
    """Hydra's own composition of conf/config.yaml (struct mode, the `hydra` node removed unless `hydra_node`)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    for o in overrides:  # Hydra's own settings are not run config; the search path is --config-dir's
        if o.lstrip("+~").startswith("hydra."):
            raise BnexpError(f"'{o}': hydra.* settings are not config keys; add your own options and presets "
                             f"with --config-dir DIR (or ${CONFIG_DIR_ENV})")
    search = search_path_overrides()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            return hydra_compose(config_name="config", overrides=search + overrides, return_hydra_config=hydra_node)
    except Exception as e:  # Hydra raises several types; all mean bad user input here
        raise _hydra_error(e) from None
    finally:
        GlobalHydra.instance().clear()


def _finish(cfg: DictConfig) -> DictConfig:
    """A composed config -> resolved, validated, read-only (what compose returns)."""
    try:
        container = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:  # `lr=${nosuch}`, `results_dir=${oc.env:UNSET}`, `lr=${lr}`
        raise _interpolation_error(cfg, e) from None
    resolved = validate(container)
    out = OmegaConf.create(resolved)
    OmegaConf.set_readonly(out, True)
    OmegaConf.set_struct(out, True)
    return out


class Composer:
    """`compose` for the many points of a grid, at a fraction of the cost (a sweep's plan and --dry-run).

    Hydra composes in two stages: the defaults list (config-group choices such as model=alexnet)
    picks and merges the config files, then the plain value overrides (lr=0.1) are applied to the
    merged config by `ConfigLoaderImpl._apply_overrides_to_config`. The first stage is what costs
    (~0.1 s a point on an idle 2-core CPU, several times that on a busy one); it is the same for
    every point with the same group choices. So this runs Hydra's first stage once per distinct
    set of group overrides and the second, Hydra's own function, on a copy for each point. A point
    with anything but plain `key=value` value overrides (`+key`, `~key`, `key@pkg`, `hydra.*`) is
    composed whole by `compose`; a test pins both ways to the same configs.
    """

    def __init__(self):
        self._bases: dict[tuple[str, ...], DictConfig] = {}
        self._parser = None

    def __call__(self, overrides: list[str]) -> DictConfig:
        from hydra._internal.config_loader_impl import ConfigLoaderImpl

        overrides = apply_aliases(list(overrides))
        check_keys(overrides)
        check_bn_shortcut(overrides)
        split = self._split(overrides)
        if split is None:
            return _finish(_hydra_compose(overrides))
        groups, values = split
        if groups not in self._bases:
            self._bases[groups] = _hydra_compose(list(groups))
        cfg = copy.deepcopy(self._bases[groups])  # flags (struct mode) are copied too
        try:
            ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
        except Exception as e:  # the same ConfigCompositionException a whole composition raises
            raise _hydra_error(e) from None
        return _finish(cfg)

    def _split(self, overrides: list[str]):
        """(group overrides as text, parsed value overrides), or None if a point needs a whole composition."""
        from hydra.core.override_parser.overrides_parser import OverridesParser

        if self._parser is None:
            self._parser = OverridesParser.create()
        try:
            parsed = self._parser.parse_overrides(overrides)
        except Exception:  # noqa: BLE001  a malformed override: the whole composition words the error
            return None
        groups, values = [], []
        for o in parsed:
            if o.is_hydra_override() or o.package is not None or o.is_sweep_override() or \
                    o.is_delete() or o.is_add() or o.is_force_add():
                return None
            if (CONF_DIR / o.key_or_group).is_dir():
                groups.append(o.input_line)
            else:
                values.append(o)
        return tuple(groups), values


def from_yaml(path: Path) -> DictConfig:
    """Load a saved resolved config (a run's config.yaml) and validate it again."""
    out = OmegaConf.create(validate(OmegaConf.to_container(OmegaConf.load(path))))
    OmegaConf.set_readonly(out, True)
    return out


# ----------------------------------------------------------------------------- run identity

def _parent(d: dict, dotted: str) -> tuple[dict, str]:
    """The dict holding `dotted`'s leaf ({} if a parent is missing) and the leaf's name."""
    *parents, leaf = dotted.split(".")
    for p in parents:
        d = d.get(p, {})
    return d, leaf


def identity(cfg: DictConfig) -> dict:
    """The part of the config that determines the numbers a run produces."""
    d = OmegaConf.to_container(cfg)
    for key in NON_IDENTITY_KEYS:
        node, leaf = _parent(d, key)
        node.pop(leaf, None)
    for key, default in HASH_DEFAULTS.items():
        node, leaf = _parent(d, key)
        if leaf in node and node[leaf] == default:
            node.pop(leaf)
    if not d.get("measure"):
        for key in MEASURE_KEYS:
            d.pop(key, None)
    # Only the keys the norm kind uses (bnexp.nn.kinds.KIND_KWARGS) can change the numbers: none has
    # no layers, GroupNorm no running statistics, and BN no groups (the same keys as before the family).
    kind = d["norm"]["kind"]
    used = () if kind == "none" else ("eps", *KIND_KWARGS[kind])
    d["norm"] = {"kind": kind, **{k: v for k, v in d["norm"].items() if k in used}}
    return d


# Identity keys that still say nothing about the run to a reader: `bn` restates norm.kind, and
# data.verify only checks the files. Left out of TensorBoard's hparams with NON_IDENTITY_KEYS.
NON_HPARAM_KEYS = ("bn", "data.verify")


def hparams(cfg: DictConfig) -> dict[str, Any]:
    """The keys that define a run, flat, for TensorBoard's hparams table: the identity's keys
    (HASH_DEFAULTS ones at their default values too, so every run has the same columns) less
    NON_HPARAM_KEYS. None becomes "None" and a list its override text, "[ics,weights]" (the plugin
    takes only bool, number and string)."""
    full = flatten(OmegaConf.to_container(cfg))
    keep = (set(flatten(identity(cfg))) | set(HASH_DEFAULTS)) - set(NON_HPARAM_KEYS)
    return {k: ("None" if v is None else override_text(v) if isinstance(v, list) else v)
            for k, v in full.items() if k in keep}


def run_label(cfg: DictConfig, run_id: str) -> str:
    """A name a person can read for TensorBoard's hparams table (its Trial ID column, which cuts
    names after ~18 characters): what a sweep usually varies first, as compactly as the run id
    writes it, then the rest of the run id's fields and its hash, which keeps it unique, e.g.
    `bn lr0.5 s0 bs512 | lenet5 fashion_mnist sgd e20 | 3f9c2a1b0d`."""
    rest = f"{cfg.model.name} {cfg.data.name} {cfg.optim.name} e{cfg.epochs}" + (
        "" if cfg.precision == "fp32" else f" {cfg.precision}")
    return f"{cfg.norm.kind} lr{cfg.lr:g} s{cfg.seed} bs{cfg.batch_size} | {rest} | {run_id.rsplit('-', 1)[-1]}"


def config_hash(cfg: DictConfig) -> str:
    blob = json.dumps(identity(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def run_id(cfg: DictConfig) -> str:
    """Readable prefix + hash of the identity, e.g. lenet5-fashion_mnist-bn-sgd-lr0.5-bs512-e20-s0-3f9c2a1b0d."""
    prefix = (f"{cfg.model.name}-{cfg.data.name}-{cfg.norm.kind}-{cfg.optim.name}"
              f"-lr{cfg.lr:g}-bs{cfg.batch_size}-e{cfg.epochs}-s{cfg.seed}"
              + ("" if cfg.precision == "fp32" else f"-{cfg.precision}"))
    return f"{prefix}-{config_hash(cfg)}"
