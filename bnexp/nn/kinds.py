"""The normalisation kinds as data, importable without torch (for the config layer), and `check_norm`.

    kind     layer (dims=2 / dims=1)                          statistics        dims=1 (N, C)
    bn       BatchNorm2d / BatchNorm1d (in-repo)              batch             yes
    torch    torch.nn.BatchNorm2d / BatchNorm1d               batch             yes
    none     nn.Identity                                      -                 yes
    gn       GroupNorm(groups, C)      (Wu & He 2018)         per sample+group  yes: over the C/G features of a group
    ln       LayerNorm = GroupNorm(1, C) (Wu & He's LN)       per sample        yes: over the C features
    in       InstanceNorm2d(C, affine=True)                   per sample+channel no: one value per channel
    brn      BatchRenorm2d / 1d        (Ioffe 2017)           batch + running   yes
    ghost    GhostBatchNorm2d / 1d     (Hoffer et al. 2017)   virtual batches   yes
    noisy    NoisyBatchNorm2d / 1d     (Santurkar et al. 2018) batch, + noise   yes

`check_norm(kind, num_features, dims, **kwargs)` raises ValueError with the message `make_norm`
would raise, so a config can be checked before a model is built. The rule for `groups` (gn):
`groups=None` (the default) takes the largest divisor of C not above DEFAULT_GROUPS = 32 (Wu &
He's default), e.g. 6 channels (LeNet5's first conv) -> 6 groups, 16 -> 16, 64 -> 32; an explicit
`groups` must divide C, else ValueError (a silent change of an explicit setting would hide a typo).
For fully connected (N, C) inputs (dims=1) a group needs at least two features (one feature per
group has one value per sample, so the output would be the bias): the default takes the largest
divisor of C not above min(32, C // 2) (e.g. 120 -> 30, 84 -> 28, 6 -> 3) and an explicit
groups > C // 2 is a ValueError.
"""

NORM_KINDS = ("bn", "torch", "none", "gn", "ln", "in", "brn", "ghost", "noisy")
BATCH_STAT_KINDS = ("bn", "torch", "brn", "ghost", "noisy")  # need > 1 value per channel when training
DIMS1_KINDS = tuple(k for k in NORM_KINDS if k != "in")  # defined for fully connected (N, C) inputs
DEFAULT_GROUPS = 32  # Wu & He 2018, section 4: G = 32 is their default
# The kernels that run the layers' math (bnexp.nn.dispatch), as the config key norm.backend names them.
BACKENDS = ("auto", "compiled", "eager", "triton")
BACKEND_ENV = "BNEXP_BN_BACKEND"  # its default for a process (conf/config.yaml reads it too)

# Keywords each kind accepts beyond the common ones (eps, affine, device, dtype).
_BN_KW = ("momentum", "track_running_stats", "biased_running_var")
KIND_KWARGS = {
    "bn": _BN_KW, "torch": _BN_KW, "none": None,  # None: ignores every keyword
    "gn": ("groups",), "ln": (), "in": ("momentum", "track_running_stats"),
    "brn": _BN_KW + ("r_max", "d_max", "warmup_steps", "r_max_steps", "d_max_steps"),
    "ghost": _BN_KW + ("ghost_size",),
    "noisy": _BN_KW + ("noise",),
}
_COMMON_KW = ("eps", "affine", "device", "dtype")

_LAYER_NAMES = {"bn": "BatchNorm", "torch": "torch.nn.BatchNorm", "gn": "GroupNorm", "ln": "LayerNorm",
                "in": "InstanceNorm2d", "brn": "BatchRenorm", "ghost": "GhostBatchNorm", "noisy": "NoisyBatchNorm"}


def resolve_groups(num_channels: int, groups: int | None, dims: int = 2) -> int:
    """The number of groups GroupNorm uses for `num_channels` (see the module docstring)."""
    # (N, C) inputs: a group of one feature has one value per sample (output = bias), as IN there
    most = num_channels // 2 if dims == 1 and num_channels > 1 else num_channels
    if groups is None:
        return max(g for g in range(1, min(DEFAULT_GROUPS, most) + 1) if num_channels % g == 0)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"GroupNorm: groups must be a positive integer, got {groups!r}")
    if num_channels % groups:
        raise ValueError(f"GroupNorm: groups={groups} does not divide the {num_channels} channels; choose a divisor "
                         f"of {num_channels}, or leave groups unset for the largest divisor not above {DEFAULT_GROUPS}")
    if groups > most:
        raise ValueError(f"GroupNorm: groups={groups} on fully connected (N, {num_channels}) inputs leaves one "
                         f"feature per group (the output would be the bias); use at most {most} groups, or 'ln'")
    return groups


def _check_at_least(name: str, layer: str, value, low: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low:  # also NaN
        raise ValueError(f"{layer}: {name} must be >= {low}, got {value!r}")


def check_layer_kwargs(kind: str, **kwargs) -> None:
    """Range checks shared by the layers' constructors and check_norm (ValueError with the layer's name)."""
    layer = _LAYER_NAMES.get(kind, kind)
    _check_at_least("r_max", layer, kwargs.get("r_max", 1.0), 1.0)
    _check_at_least("d_max", layer, kwargs.get("d_max", 0.0), 0.0)
    for steps in ("warmup_steps", "r_max_steps", "d_max_steps"):
        value = kwargs.get(steps, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{layer}: {steps} must be an integer >= 0, got {value!r}")
    ghost_size = kwargs.get("ghost_size", 1)
    if isinstance(ghost_size, bool) or not isinstance(ghost_size, int) or ghost_size < 1:
        raise ValueError(f"{layer}: ghost_size must be an integer >= 1, got {ghost_size!r}")
    _check_at_least("noise", layer, kwargs.get("noise", 0.0), 0.0)


def check_norm(kind: str, num_features: int, dims: int, **kwargs) -> None:
    """Raise ValueError (TypeError for an unknown keyword) if make_norm(kind, num_features, dims, **kwargs) would."""
    if dims not in (1, 2):
        raise ValueError(f"make_norm: dims must be 1 or 2, got {dims}")
    if kind not in NORM_KINDS:
        raise ValueError(f"unknown norm kind {kind!r}; choose one of {', '.join(NORM_KINDS)}")
    if kind == "none":
        return
    allowed = KIND_KWARGS[kind] + _COMMON_KW
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise TypeError(f"make_norm: kind {kind!r} takes no keyword {', '.join(unknown)} "
                        f"(it takes {', '.join(allowed)})")
    if kind == "in" and dims == 1:
        raise ValueError("InstanceNorm2d (kind 'in') is undefined for fully connected (N, C) inputs: it has one "
                         "value per channel per sample; use 'ln' (over the features) or 'gn' there")
    if kind == "torch" and kwargs.get("biased_running_var", False):
        raise ValueError("make_norm: kind 'torch' (torch.nn.BatchNorm) has no biased_running_var option; "
                         "use kind 'bn' for it")
    if kind == "brn" and kwargs.get("track_running_stats", True) is False:
        raise ValueError("BatchRenorm needs running statistics (r and d compare the batch with them); "
                         "track_running_stats=False is not defined for it")
    if kind == "gn":
        resolve_groups(num_features, kwargs.get("groups"), dims)
    check_layer_kwargs(kind, **kwargs)
