"""Shared fixtures: synthetic data sets in the real formats, the real FashionMNIST when present, and
a per-session bnexp cache so that no test writes into the user's ~/.cache."""

import os
import sys
from pathlib import Path

# Tests run many tiny ops on a small, shared CPU: one intra-op thread is faster there and immune to
# oversubscription (LeNet5 step on 64 images under load: 40 ms with 1 thread, 200-1700 ms with 2).
# Set before torch is imported so that subprocesses (CLI tests) inherit it; OMP_NUM_THREADS overrides.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
sys.path.insert(0, str(Path(__file__).parent))  # `import synth` from any test file

import synth  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SYNTH_SIZES = {"fashion_mnist": (512, 256), "cifar100": (500, 200)}  # (train, test) samples


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache_no_downloads(tmp_path_factory):
    """Point bnexp's user cache (default data dir, unpack fallback) at a session temp dir, and turn
    downloads off, so that a "data not found" test behaves the same with or without internet."""
    mp = pytest.MonkeyPatch()
    mp.setenv("BNEXP_CACHE_DIR", str(tmp_path_factory.mktemp("bnexp-cache")))
    mp.setenv("BNEXP_OFFLINE", "1")
    yield
    mp.undo()


@pytest.fixture(scope="session")
def synth_data_dir(tmp_path_factory) -> Path:
    """A data root with a synthetic FashionMNIST (512 train / 256 test, unpacked IDX) and CIFAR-100
    (500 / 200, pickles; load it with verify=False). Shared by the session: do not modify it."""
    root = tmp_path_factory.mktemp("synth-data")
    synth.write_fashion_mnist(root, *SYNTH_SIZES["fashion_mnist"])
    synth.write_cifar100(root, *SYNTH_SIZES["cifar100"])
    return root


def _has_fashion_mnist(root: Path) -> bool:
    raw = root / "FashionMNIST" / "raw"
    names = [f"{p}-{k}-idx{d}-ubyte" for p in ("train", "t10k") for k, d in (("images", 3), ("labels", 1))]
    return all((raw / n).is_file() or (raw / f"{n}.gz").is_file() for n in names)


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """The data root holding the real FashionMNIST: $BNEXP_DATA_DIR, else ../shared/data; else skip."""
    candidates = [Path(os.environ["BNEXP_DATA_DIR"])] if os.environ.get("BNEXP_DATA_DIR") else []
    candidates.append(REPO.parent / "shared" / "data")
    for root in candidates:
        if _has_fashion_mnist(root):
            return root
    pytest.skip(f"real FashionMNIST not found in {', '.join(map(str, candidates))}")
