"""`bnexp train --help` lists every config key with the default a composed config really has."""

import pytest
from omegaconf import OmegaConf

from bnexp import config as C
from bnexp.cli import main


def _as_override(v) -> str:
    if isinstance(v, list):  # one shell word: measure_steps=[0.5,1.0,2.0,4.0]
        return "[" + ",".join(map(_as_override, v)) + "]"
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def test_help_defaults_are_the_composed_defaults(monkeypatch, capsys):
    monkeypatch.delenv("BNEXP_BN_BACKEND", raising=False)
    composed = C.flatten(OmegaConf.to_container(C.compose([])))
    keys, groups = C.key_docs()
    documented = {k: v for k, v, _ in keys}
    assert set(documented) == set(composed)  # every key, no stale one
    assert documented["bn"] == "null" and composed["bn"] == "on"  # null = follow norm, which is bn
    for key, value in composed.items():
        if key == "bn":
            continue
        text = documented[key]
        assert text == _as_override(value) or float(text) == value, key
    assert groups == {"model": "lenet5", "data": "fashion_mnist", "norm": "bn", "optim": "sgd"}
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for key, value in composed.items():
        assert f"{key}={documented[key]}" in out
    assert "norm.backend=auto" in out and "$BNEXP_BN_BACKEND if set" in out
    assert "model=alexnet|alexnet_cifar|lenet5|lenet5_d2l|mlp_ioffe (default lenet5)" in out


@pytest.mark.parametrize("group", ["model", "data", "norm", "optim"])
def test_every_option_of_a_group_has_the_keys_of_the_default(group):
    """Hydra replaces a whole group node: an option that lacked a key would fail validation."""
    _, groups = C.key_docs()
    base = set(C.flatten(OmegaConf.to_container(C.compose([]))))
    for option in C.group_options(group):
        assert set(C.flatten(OmegaConf.to_container(C.compose([f"{group}={option}"])))) == base, option


def test_the_choices_come_from_the_registries_and_the_shipped_options():
    """A config group's names are those its shipped options declare; each is one bnexp has code for."""
    import torch

    from bnexp import data, models, train
    from bnexp.nn.kinds import NORM_KINDS

    assert C.MODEL_NAMES == tuple(sorted(models.MODELS)) and C.DATA_NAMES == tuple(sorted(data.DATASETS))
    assert set(C.declared("norm", "kind")) == set(NORM_KINDS)
    built = {type(train.build_optimizer(C.compose([f"optim={o}"]), [torch.zeros(1, requires_grad=True)]))
             for o in C.OPTIM_NAMES}
    assert len(built) == len(C.OPTIM_NAMES)  # every optimiser name builds its own optimiser
    assert set(models.ACTIVATIONS) == set(C.CHOICES["model.activation"]) and None in C.CHOICES["model.pool"]
    for key, choices in C.CHOICES.items():
        assert C.flatten(OmegaConf.to_container(C.compose([])))[key] in choices, key


def test_the_key_list_is_composed_only_for_the_help(monkeypatch, capsys):
    def refuse():
        raise AssertionError("composed without --help")

    monkeypatch.setattr(C, "key_docs", refuse)
    assert main(["sweep", "--list-presets"]) == 0
    monkeypatch.undo()
    assert main(["sweep", "--help"]) == 0
    assert "model.activation=relu          relu | sigmoid | tanh;" in capsys.readouterr().out
