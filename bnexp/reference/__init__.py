"""Reference numbers of docs/references.md (reference.yaml), flattened into one entry per number.

`load_reference()` returns a `ReferenceData`: the tolerances, the sources and a list of
`Reference` entries, each with the config keys a run group must match. The report
(bnexp.report.compare) does the matching; this module only reads and validates the data.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from bnexp import layout
from bnexp.errors import BnexpError

QUALITIES = ("exact", "approximate", "not_comparable")
# Metrics a run group can be compared on (the rest, e.g. "steps", are listed only): run.json's final
# metrics and the first epoch's training loss (metrics.csv's first row; the report reads it).
RUN_METRICS = (*layout.FINAL_METRICS, "epoch1_train_loss")
_ROW_META = {"value", "values", "outcome", "note", "label", "metric"}


@dataclass(frozen=True)
class Reference:
    """One reference number (or range) and the run configuration it belongs to."""

    id: str
    set_name: str
    source: str
    quality: str                 # exact | approximate | not_comparable
    metric: str                  # train_loss | train_acc | test_loss | test_acc | epoch1_train_loss | ...
    metric_text: str
    value: float | None          # one number, or None when `values` holds a range
    values: tuple[float, ...]    # the printed values whose [min, max] is the target (may be empty)
    match: dict[str, Any]        # config key -> value (a list = any of)
    outcome: str | None = None   # "dead": compare by outcome, not value
    note: str = ""
    label: str = ""              # names the row: its own match keys (lr=0.5, bn=on) unless given
    reason: str = ""
    preset: str | None = None

    @property
    def target(self) -> tuple[float, float]:
        """The [low, high] interval the reference states (low == high for a single value)."""
        if self.value is not None:
            return (self.value, self.value)
        return (min(self.values), max(self.values))

    @property
    def is_loss(self) -> bool:
        return "loss" in self.metric


@dataclass(frozen=True)
class ReferenceData:
    tolerances: dict[str, dict[str, float]]
    num_classes: dict[str, int]
    sources: dict[str, dict[str, Any]]
    references: list[Reference] = field(default_factory=list)


def default_path() -> Path:
    return Path(str(resources.files("bnexp.reference").joinpath("reference.yaml")))


def load_reference(path: Path | None = None) -> ReferenceData:
    """Read reference.yaml (the packaged one by default) and flatten its sets into entries."""
    path = Path(path) if path else default_path()
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise BnexpError(f"cannot read reference data {path}: {e}") from e
    try:
        refs = [ref for i, s in enumerate(raw["sets"]) for ref in _flatten_set(i, s, raw["sources"])]
        return ReferenceData(raw["tolerances"], raw["num_classes"], raw["sources"], refs)
    except (KeyError, TypeError, ValueError) as e:
        raise BnexpError(f"malformed reference data {path}: {e!r}") from e


def _flatten_set(index: int, s: dict, sources: dict) -> list[Reference]:
    quality = s.get("quality", "exact")
    if quality not in QUALITIES:
        raise ValueError(f"set {s.get('name')!r}: quality {quality!r} not in {QUALITIES}")
    if s["source"] not in sources:
        raise ValueError(f"set {s.get('name')!r}: unknown source {s['source']!r}")
    out = []
    for j, row in enumerate(s["rows"]):
        metric = row.get("metric", s.get("metric"))
        if metric is None:
            raise ValueError(f"set {s['name']!r} row {j}: no metric")
        if quality != "not_comparable" and metric not in RUN_METRICS:
            raise ValueError(f"set {s['name']!r} row {j}: metric {metric!r} not in {RUN_METRICS}")
        value, values = row.get("value"), tuple(float(v) for v in row.get("values") or ())
        if (value is None) == (not values):
            raise ValueError(f"set {s['name']!r} row {j}: give exactly one of value / values")
        own = {k: v for k, v in row.items() if k not in _ROW_META}
        match = {**(s.get("match") or {}), **own}
        label = row.get("label") or ", ".join(f"{k}={_text(v)}" for k, v in own.items())
        out.append(Reference(
            id=f"{index}.{j}", set_name=s["name"], source=s["source"], quality=quality,
            metric=metric, metric_text=s.get("metric_text", metric),
            value=None if value is None else float(value), values=values, match=match,
            outcome=row.get("outcome"), note=row.get("note", ""), label=label,
            reason=s.get("reason", ""), preset=s.get("preset"),
        ))
    return out


def _text(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "|".join(_text(x) for x in v)
    return "null" if v is None else f"{v:g}" if isinstance(v, float) else str(v)
