"""bnexp.nn: the in-repo normalisation layer family (depends on torch only).

`bnexp.nn.kinds` (NORM_KINDS, check_norm, ...) imports without torch; the layers are imported
on first access of their name, so `import bnexp.nn.kinds` stays torch-free.
"""

import importlib

_EXPORTS = {
    "BatchNorm1d": "batchnorm", "BatchNorm2d": "batchnorm",
    "GroupNorm": "groupnorm", "LayerNorm": "groupnorm", "InstanceNorm2d": "instancenorm",
    "BatchRenorm1d": "batchrenorm", "BatchRenorm2d": "batchrenorm",
    "GhostBatchNorm1d": "ghostnorm", "GhostBatchNorm2d": "ghostnorm",
    "NoisyBatchNorm1d": "noisynorm", "NoisyBatchNorm2d": "noisynorm",
    "SyncBatchNorm1d": "syncbatchnorm", "SyncBatchNorm2d": "syncbatchnorm",
    "convert_sync_batchnorm": "syncbatchnorm",
    "make_norm": "norms",
    "NORM_KINDS": "kinds", "BATCH_STAT_KINDS": "kinds", "DIMS1_KINDS": "kinds", "SYNC_KINDS": "kinds",
    "check_norm": "kinds",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
