"""Activation probes: batch-statistics view of every norm layer, with no side effects on training."""

import copy
import itertools

import pytest
import torch

from bnexp import models, probes
from bnexp.nn.functional import use_backend


@pytest.mark.parametrize("kind", ["bn", "torch", "none"])
def test_probe_sees_batch_statistics_and_changes_nothing(kind):
    torch.manual_seed(0)
    model = models.build_model("alexnet_cifar", kind, 100, 3, 32)  # has dropout when kind == "none"
    x = torch.rand(64, 3, 32, 32) * 3 + 1
    state, rng = copy.deepcopy(model.state_dict()), torch.get_rng_state()
    with use_backend("eager"):
        seen = probes.capture(model, x)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # running stats restored
    assert torch.equal(rng, torch.get_rng_state())  # dropout drew nothing
    assert model.training
    assert list(seen) == [name for name, _ in model.norm_layers()]
    out = seen["conv1.norm"][1]
    if kind == "none":
        torch.testing.assert_close(out, seen["conv1.norm"][0])
        assert abs(out.std() - 1) > 0.2  # raw pre-activations of a [1, 4] input are not standardised
    else:  # weight 1, bias 0 at init: the output is the batch-normalised input
        assert abs(out.mean()) < 1e-4 and abs(out.std() - 1) < 1e-3


def test_probe_epochs():
    assert set(probes.probe_epochs(20, 5)) == {0, 1, 5, 10, 15, 20}
    assert set(probes.probe_epochs(3, 0)) == {0, 1, 3}
    assert set(probes.probe_epochs(4, 1)) == {0, 1, 2, 3, 4}
    # a predicate and a lazy iterator: constant memory for any number of epochs
    huge = probes.probe_epochs(10**20, 5)
    assert 10**20 in huge and 5 * 10**18 in huge and 10**20 - 1 not in huge and 1 in huge and 10**20 + 5 not in huge
    assert list(itertools.islice(huge, 4)) == [0, 1, 5, 10]
    for epochs in range(1, 25):
        for every in range(0, 9):
            expected = {0, 1, epochs} | set(range(every, epochs + 1, every) if every else ())
            assert list(probes.probe_epochs(epochs, every)) == sorted(expected)
            assert {e for e in range(-1, epochs + 3) if e in probes.probe_epochs(epochs, every)} == expected
