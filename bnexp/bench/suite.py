"""`bnexp bench`: which benchmarks there are, their options checked, each run and its JSON written.

Every benchmark is a module of this package with `run(**options) -> dict` (JSON-serialisable) and
`format_table(result) -> str`; its result goes to OUT/<name>-<device>.json, compared first with
the one the last invocation left there (`stats.against_previous`).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path

from ..errors import BnexpError

# name -> what it times; the CLI offers these, in this order
BENCHMARKS = {
    "bn": "the BN layers against torch's",
    "epoch": "a training epoch against a hand-written PyTorch loop",
    "sweep": "sweep throughput at --jobs 1 and 2",
    "report": "bnexp report on 200 fabricated runs",
    "log": "TensorBoard logging",
    "measure": "the instruments' cost",
    "cli": "answer time of commands that train nothing",
}
DEFAULT = ("bn", "epoch")
CPU_ONLY = ("report", "cli")  # their run() takes no device


def _names(text: str | None) -> list[str] | None:
    return [b.strip() for b in text.split(",") if b.strip()] if text else None


def options(device: str, backends: str | None = None, channels_last: bool = False, kinds: str | None = None,
            precision: str = "fp32") -> dict[str, dict]:
    """The CLI's options checked (BnexpError), as each benchmark's keyword arguments; `device` resolved."""
    from ..config import check_value
    from ..nn.kinds import BACKENDS, NORM_KINDS

    check_value("device", device, "--device")
    check_value("precision", precision, "--precision")
    names = _names(backends)
    for b in names or []:
        if b not in BACKENDS:
            raise BnexpError(f"--backends: unknown batch-norm backend {b!r}; choose from {', '.join(BACKENDS)}")
    kind_names = _names(kinds)
    if set(kind_names or []) - set(NORM_KINDS):
        raise BnexpError(f"--kinds: unknown norm kind in {kinds!r}; choose from {', '.join(NORM_KINDS)}")
    from ..train import resolve_device

    dev = str(resolve_device(device))
    if "triton" in (names or []) and not dev.startswith("cuda"):
        raise BnexpError("--backends triton needs --device cuda: on CPU the Triton kernels run in Triton's "
                         "interpreter (for tests), far too slow to time")
    every = {name: ({} if name in CPU_ONLY else {"device": dev}) for name in BENCHMARKS}
    every["bn"].update(backends=names, channels_last=channels_last, kinds=kind_names)
    every["epoch"].update(precision=precision, channels_last=channels_last)
    return every


def run(which: list[str], device: str, out: Path, echo: Callable[[str], object] = print, **opts) -> None:
    """Run the benchmarks `which` (default: DEFAULT) in order: each one's table, its comparison with
    the previous invocation's JSON, then the new JSON under `out`."""
    from .stats import against_previous, read_previous

    every = options(device, **opts)
    dev = every["bn"]["device"]
    out.mkdir(parents=True, exist_ok=True)
    for name in which or DEFAULT:
        mod = importlib.import_module(f"{__package__}.{name}")
        result = mod.run(**every[name])
        echo(mod.format_table(result))
        path = out / f"{name}-{dev.replace(':', '')}.json"
        for line in against_previous(read_previous(path), result):  # the same benchmark, last time
            echo(line)
        path.write_text(json.dumps(result, indent=2) + "\n")
        echo(f"wrote {path}")
