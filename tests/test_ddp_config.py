"""nproc and norm.sync in the config: validation, and the run identity (nproc only where it changes the numbers)."""

import pytest

from bnexp import config as C
from bnexp.errors import BnexpError
from bnexp.nn.kinds import NORM_KINDS, SYNC_KINDS


def _id(*overrides):
    return C.run_id(C.compose(list(overrides)))


def test_defaults_keep_todays_run_ids():
    """nproc=1 and norm.sync=false leave every run id as it was (the keys are out of the hash there)."""
    for kind in NORM_KINDS:
        base = _id(f"norm={kind}")
        assert _id(f"norm={kind}", "nproc=1", "norm.sync=false") == base
    assert _id() == "lenet5-fashion_mnist-bn-sgd-lr0.1-bs512-e20-s0-16c7975ccf"  # the id before the keys existed


@pytest.mark.parametrize("kind", ["bn", "ghost", "brn", "noisy", "torch"])
def test_per_process_statistics_make_another_run(kind):
    assert _id(f"norm={kind}", "nproc=2") != _id(f"norm={kind}")
    assert "-np2-" in _id(f"norm={kind}", "nproc=2")


@pytest.mark.parametrize("overrides", [["norm.sync=true", "nproc=2"], ["norm.sync=true"], ["norm=gn", "nproc=2"],
                                       ["bn=off", "nproc=4"], ["norm=noisy", "norm.sync=true", "nproc=2"]])
def test_nproc_is_not_identity_where_the_numbers_are_one_process(overrides):
    """Synchronised statistics, or none, compute the one-process run (to float rounding): the same run id."""
    one = [o for o in overrides if not o.startswith("nproc")]
    assert _id(*overrides) == _id(*[o for o in one if o != "norm.sync=true"])


@pytest.mark.parametrize("overrides, message", [
    (["nproc=0"], "nproc must be a positive integer"),
    (["nproc=-1"], "nproc must be a positive integer"),
    (["nproc=3"], "batch_size=512 does not divide by nproc=3"),
    (["norm=gn", "norm.sync=true"], "norm.sync=true with norm=gn: it has no batch statistics"),
    (["bn=off", "norm.sync=true"], "norm.sync=true with norm=none: it has no norm layers"),
    (["norm=ghost", "norm.sync=true"], "virtual batches are per process"),
    (["norm=torch", "norm.sync=true"], "torch.nn.SyncBatchNorm runs on CUDA only"),
    (["nproc=4", "batch_size=4"], "leaves 1 sample per process for norm=bn's per-process batch statistics"),
    (["norm.sync=perhaps"], "norm.sync must be true or false"),
])
def test_bad_values(overrides, message):
    with pytest.raises(BnexpError, match=message):
        C.compose(overrides)


def test_sync_kinds_and_small_shards_with_sync_are_valid():
    for kind in SYNC_KINDS:
        C.compose([f"norm={kind}", "norm.sync=true", "nproc=4", "batch_size=4"])  # global statistics: 4 samples
