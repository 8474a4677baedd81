"""data=mnist: torchvision's MNIST class on IDX files in MNIST/raw/, tested on synthetic files in the real format."""

import pytest

import synth
from bnexp import layout as L
from bnexp import config as C
from bnexp import data
from bnexp import train as T
from bnexp.errors import BnexpError
from bnexp.nn import functional as bn_functional


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_loads_unpacked_files_and_archives(tmp_path, gz):
    arrays = synth.write_fashion_mnist(tmp_path, 64, 32, gz=gz, folder="MNIST")
    split = data.load_split("mnist", tmp_path, True, None, verify=False, download=False)
    assert tuple(split.x.shape) == (64, 1, 28, 28) and split.num_classes == 10
    assert (split.y.numpy() == arrays["train"][1]).all()
    assert len(data.load_split("mnist", tmp_path, False, None, verify=False, download=False)) == 32
    if gz:
        assert (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file()  # unpacked beside them


def test_mnist_archives_that_are_not_the_originals_are_refused_with_verify(tmp_path):
    synth.write_fashion_mnist(tmp_path, 64, 32, gz=True, folder="MNIST")
    with pytest.raises(BnexpError, match=r"train-images-idx3-ubyte.gz: md5 mismatch.*original MNIST"):
        data.load_split("mnist", tmp_path, True, None, verify=True, download=False)


def test_fashion_mnist_files_are_not_mnist(tmp_path):
    synth.write_fashion_mnist(tmp_path, 64, 32)  # FashionMNIST/raw only
    with pytest.raises(BnexpError, match=r"MNIST not found \(looked in .*MNIST/raw"):
        data.load_split("mnist", tmp_path, True, None, verify=False, download=False)


def test_train_on_mnist(tmp_path):
    synth.write_fashion_mnist(tmp_path / "data", 256, 64, folder="MNIST")
    cfg = C.compose([f"data_dir={tmp_path / 'data'}", f"results_dir={tmp_path / 'r'}", "data=mnist",
                     "data.verify=false", "model=mlp_ioffe", "device=cpu", "epochs=1", "batch_size=32",
                     "progress=false"])
    with bn_functional.use_backend("eager"):
        result = T.run(cfg)
    assert result.status == L.COMPLETED and result.run_id.startswith("mlp_ioffe-mnist-bn-")
