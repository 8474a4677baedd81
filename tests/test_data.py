"""Data layer: loading through torchvision (synthetic files in the real formats), where data is
looked for, the errors for missing and corrupt files, batching and input conversion."""

import hashlib
import pickle
import tarfile
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.datasets import CIFAR100, FashionMNIST

import synth
from bnexp import data
from bnexp.data import DATASETS, batch_indices, batch_sizes, load_split, resolve_data_dir, to_input
from bnexp.errors import BnexpError


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """An empty data root, its own user cache and no offline sources; returns the root."""
    monkeypatch.setenv("BNEXP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "OFFLINE_SOURCES", {"fashion_mnist": [tmp_path / "no-debian"], "cifar100": []})
    root = tmp_path / "root"
    root.mkdir()
    return root


def _one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


# ======================================================================== where data lives

def test_resolve_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("BNEXP_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("BNEXP_DATA_DIR")
    monkeypatch.delenv("BNEXP_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_data_dir(None) == tmp_path / "xdg" / "bnexp" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_data_dir("") == tmp_path / "home" / ".cache" / "bnexp" / "data"


def test_registry():
    fm, c100 = DATASETS["fashion_mnist"], DATASETS["cifar100"]
    assert (fm.num_classes, fm.in_channels, fm.image_size) == (10, 1, 28)
    assert (c100.num_classes, c100.in_channels, c100.image_size) == (100, 3, 32)
    mn = DATASETS["mnist"]
    assert (mn.num_classes, mn.in_channels, mn.image_size) == (10, 1, 28)
    with pytest.raises(BnexpError, match="unknown data set 'svhn'; choose one of fashion_mnist, mnist, cifar100"):
        load_split("svhn", None, True, None, "cpu")


# ======================================================================== loading synthetic data

@pytest.mark.parametrize("train", [True, False])
def test_fashion_mnist_loads_through_torchvision(tmp_path, train):
    arrays = synth.write_fashion_mnist(tmp_path, n_train=40, n_test=30)
    x, y = arrays["train" if train else "test"]
    s = load_split("fashion_mnist", tmp_path, train, None, "cpu")
    assert s.x.dtype == torch.uint8 and s.x.shape == (len(y), 1, 28, 28)
    assert s.y.dtype == torch.int64 and s.num_classes == 10
    assert (s.in_channels, s.image_size, len(s)) == (1, 28, len(y))
    assert torch.equal(s.x[:, 0], torch.from_numpy(x)) and torch.equal(s.y, torch.from_numpy(y))


@pytest.mark.parametrize("train", [True, False])
def test_cifar100_loads_through_torchvision(tmp_path, train):
    arrays = synth.write_cifar100(tmp_path, n_train=30, n_test=20)
    x, y = arrays["train" if train else "test"]
    s = load_split("cifar100", tmp_path, train, None, "cpu", verify=False)
    assert s.x.dtype == torch.uint8 and s.x.shape == (len(y), 3, 32, 32) and s.x.is_contiguous()
    assert s.num_classes == 100
    assert torch.equal(s.x, torch.from_numpy(x))  # CHW order survives torchvision's HWC round trip
    assert torch.equal(s.y, torch.from_numpy(y))


def test_synthetic_cifar_pickles_look_like_the_real_ones(synth_data_dir):
    ds = data._UnverifiedCIFAR100(synth_data_dir, train=True)
    assert ds.classes[:2] == ["fine_00", "fine_01"] and len(ds.classes) == 100
    with open(synth_data_dir / "cifar-100-python" / "test", "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    assert set(entry) == {"filenames", "batch_label", "fine_labels", "coarse_labels", "data"}
    assert entry["data"].dtype == np.uint8 and entry["data"].shape == (200, 3072)


def test_size_keeps_the_first_samples(synth_data_dir):
    full = load_split("fashion_mnist", synth_data_dir, True, None, "cpu")
    part = load_split("fashion_mnist", synth_data_dir, True, 100, "cpu")
    assert torch.equal(part.x, full.x[:100]) and torch.equal(part.y, full.y[:100])
    for bad in (0, 513):
        with pytest.raises(BnexpError, match="size must be between 1 and 512"):
            load_split("fashion_mnist", synth_data_dir, True, bad, "cpu")


def test_cifar100_md5_checked_unless_verify_false(synth_data_dir):
    with pytest.raises(BnexpError) as e:
        load_split("cifar100", synth_data_dir, True, None, "cpu")
    msg = _one_line_error(e)
    assert "cifar-100-python/train: md5 mismatch" in msg and "verify=False" in msg


# ======================================================================== archives and offline sources

def test_gz_files_are_unpacked_once_next_to_them(isolated):
    arrays = synth.write_fashion_mnist(isolated, n_train=20, n_test=10, gz=True)
    raw = isolated / "FashionMNIST" / "raw"
    with pytest.raises(BnexpError) as e:  # not the originals
        load_split("fashion_mnist", isolated, True, None, "cpu")
    assert "train-images-idx3-ubyte.gz: md5 mismatch" in _one_line_error(e) and "verify=False" in str(e.value)
    assert not (raw / "train-images-idx3-ubyte").exists()
    s = load_split("fashion_mnist", isolated, False, None, "cpu", verify=False)
    assert torch.equal(s.y, torch.from_numpy(arrays["test"][1]))
    mtime = (raw / "train-images-idx3-ubyte").stat().st_mtime_ns
    load_split("fashion_mnist", isolated, True, None, "cpu")  # unpacked files exist now: no md5, no unpacking
    assert (raw / "train-images-idx3-ubyte").stat().st_mtime_ns == mtime
    assert not list(raw.glob(".*tmp"))


def test_unwritable_data_dir_unpacks_into_user_cache(isolated, monkeypatch):
    synth.write_fashion_mnist(isolated, n_train=20, n_test=10, gz=True)
    real_writable = data._writable
    monkeypatch.setattr(data, "_writable", lambda d: not d.is_relative_to(isolated) and real_writable(d))
    s = load_split("fashion_mnist", isolated, True, None, "cpu", verify=False)
    assert len(s) == 20
    assert not (isolated / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").exists()
    assert (data.user_cache_dir() / "data" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file()


def test_debian_package_files_are_used_offline(isolated, tmp_path, monkeypatch):
    debian = tmp_path / "usr-share-datasets-fashion-mnist"
    arrays = synth.write_debian_fashion_mnist(debian, n_train=24, n_test=12)
    assert (debian / "t10k-labels-idx1-ubyte.gz").read_bytes()[3] == 0  # no FNAME: Debian's header
    monkeypatch.setattr(data, "OFFLINE_SOURCES", {"fashion_mnist": [tmp_path / "absent", debian]})
    with pytest.raises(BnexpError) as e:  # verify: the unpacked contents must be FashionMNIST's
        load_split("fashion_mnist", isolated, True, None, "cpu")
    assert "train-images-idx3-ubyte.gz: md5 mismatch" in _one_line_error(e)
    s = load_split("fashion_mnist", isolated, True, None, "cpu", verify=False)
    assert torch.equal(s.x[:, 0], torch.from_numpy(arrays["train"][0]))
    assert (isolated / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte").is_file()


def test_cifar100_archive_is_extracted(isolated, tmp_path):
    arrays = synth.write_cifar100(tmp_path / "src", n_train=10, n_test=10)
    with tarfile.open(isolated / "cifar-100-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-100-python", arcname="cifar-100-python")
    with pytest.raises(BnexpError, match="cifar-100-python.tar.gz: md5 mismatch"):
        load_split("cifar100", isolated, False, None, "cpu")
    s = load_split("cifar100", isolated, False, None, "cpu", verify=False)
    assert torch.equal(s.y, torch.from_numpy(arrays["test"][1]))


# ======================================================================== missing data

@pytest.mark.parametrize("name, title", [("fashion_mnist", "FashionMNIST"), ("cifar100", "CIFAR-100")])
def test_missing_data_says_where_it_looked_and_how_to_get_it(isolated, monkeypatch, name, title):
    monkeypatch.delenv("BNEXP_OFFLINE")
    with pytest.raises(BnexpError) as e:
        load_split(name, isolated, True, None, "cpu", download=False)
    msg = _one_line_error(e)
    assert list(isolated.iterdir()) == []  # looking leaves no trace
    assert msg.startswith(f"{title} not found") and "download disabled" in msg
    assert str(isolated) in msg and str(data.user_cache_dir() / "data") in msg
    assert "BNEXP_DATA_DIR" in msg and "data_dir=" in msg and "download=True" in msg
    if name == "fashion_mnist":
        assert "dataset-fashion-mnist" in msg and "no-debian" in msg and "fashion-mnist.s3" in msg
    else:
        assert CIFAR100.url in msg


def test_offline_env_turns_downloads_off(isolated, monkeypatch):
    monkeypatch.setattr(FashionMNIST, "mirrors", ["http://127.0.0.1:9/"])  # must not even be tried
    for value, expected in (("1", "download disabled by $BNEXP_OFFLINE"), ("0", "download from http://127.0.0.1:9/ failed")):
        monkeypatch.setenv("BNEXP_OFFLINE", value)
        with pytest.raises(BnexpError, match=expected.replace("$", r"\$")):
            load_split("fashion_mnist", isolated, True, None, "cpu")


@pytest.mark.parametrize("name", ["fashion_mnist", "cifar100"])
def test_failed_download_is_one_fast_line(isolated, monkeypatch, name):
    monkeypatch.delenv("BNEXP_OFFLINE")
    # port 9 on localhost refuses at once, with or without internet
    monkeypatch.setattr(FashionMNIST, "mirrors", ["http://127.0.0.1:9/"])
    monkeypatch.setattr(CIFAR100, "url", "http://127.0.0.1:9/cifar-100-python.tar.gz")
    t = time.perf_counter()
    with pytest.raises(BnexpError) as e:
        load_split(name, isolated, False, None, "cpu")
    assert time.perf_counter() - t < 10
    msg = _one_line_error(e)
    assert "not found" in msg and "failed" in msg and "http://127.0.0.1:9/" in msg


# ======================================================================== corrupt files

def _fmnist_corrupt(root, what):
    raw = root / "FashionMNIST" / "raw"
    if what == "truncated images":
        synth.corrupt(raw / "train-images-idx3-ubyte", "truncate")
        return "train-images-idx3-ubyte: ", "truncated or corrupt"
    if what == "bad label magic":
        synth.corrupt(raw / "train-labels-idx1-ubyte", "magic")
        return "train-labels-idx1-ubyte: ", "not an IDX label file (magic 0xdeadbeef"
    if what == "label out of range":
        synth.write_idx(raw / "train-labels-idx1-ubyte", np.full(40, 10, np.uint8))
        return "train-labels-idx1-ubyte: ", "label 10 out of range 0..9"
    if what == "count mismatch":
        synth.write_idx(raw / "train-labels-idx1-ubyte", np.zeros(39, np.uint8))
        return "train-labels-idx1-ubyte: ", "39 labels for 40 images"
    if what == "wrong image shape":
        synth.write_idx(raw / "train-images-idx3-ubyte", np.zeros((40, 32, 32), np.uint8))
        return "train-images-idx3-ubyte: ", "items of shape (32, 32), expected (28, 28)"
    raise AssertionError(what)


@pytest.mark.parametrize("what", ["truncated images", "bad label magic", "label out of range",
                                  "count mismatch", "wrong image shape"])
def test_corrupt_fashion_mnist_names_the_file(isolated, what):
    synth.write_fashion_mnist(isolated, n_train=40, n_test=10)
    path_part, reason = _fmnist_corrupt(isolated, what)
    with pytest.raises(BnexpError) as e:
        load_split("fashion_mnist", isolated, True, None, "cpu")
    msg = _one_line_error(e)
    assert path_part in msg and reason in msg
    assert len(load_split("fashion_mnist", isolated, False, None, "cpu")) == 10  # the test split is intact


@pytest.mark.parametrize("how", ["truncate", "magic"])
def test_corrupt_gzip_names_the_file(isolated, how):
    synth.write_fashion_mnist(isolated, n_train=40, n_test=10, gz=True)
    synth.corrupt(isolated / "FashionMNIST" / "raw" / "train-images-idx3-ubyte.gz", how)
    with pytest.raises(BnexpError) as e:
        load_split("fashion_mnist", isolated, True, None, "cpu", verify=False)
    assert "train-images-idx3-ubyte.gz: not a valid gzip file" in _one_line_error(e)
    assert not (isolated / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").exists()


def _rewrite_pickle(path, **changes):
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    entry.update(changes)
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)


@pytest.mark.parametrize("what", ["truncated train", "truncated meta", "label out of range", "count mismatch"])
def test_corrupt_cifar100_names_the_file(isolated, what):
    synth.write_cifar100(isolated, n_train=20, n_test=10)
    folder = isolated / "cifar-100-python"
    if what == "truncated train":
        synth.corrupt(folder / "train", "truncate")
        expected = "cifar-100-python/train: not a valid CIFAR-100 pickle"
    elif what == "truncated meta":
        synth.corrupt(folder / "meta", "truncate")
        expected = "cifar-100-python/meta: not a valid CIFAR-100 pickle"
    elif what == "label out of range":
        _rewrite_pickle(folder / "train", fine_labels=[100] * 20)
        expected = "cifar-100-python/train: label 100 out of range 0..99"
    else:
        _rewrite_pickle(folder / "train", fine_labels=[0] * 19)
        expected = "cifar-100-python/train: 19 labels for 20 images"
    with pytest.raises(BnexpError) as e:
        load_split("cifar100", isolated, True, None, "cpu", verify=False)
    assert expected in _one_line_error(e)


# ======================================================================== batching

def test_batch_indices_cover_every_sample_once_in_a_seeded_order():
    g = torch.Generator().manual_seed(0)
    batches = batch_indices(100, 32, g, drop_last=False, device="cpu")
    assert [len(b) for b in batches] == [32, 32, 32, 4]
    assert torch.equal(torch.cat(batches).sort().values, torch.arange(100))
    assert torch.equal(torch.cat(batches), torch.randperm(100, generator=torch.Generator().manual_seed(0)))
    again = batch_indices(100, 32, torch.Generator().manual_seed(0), False, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    other = batch_indices(100, 32, torch.Generator().manual_seed(1), False, "cpu")
    assert not torch.equal(torch.cat(batches), torch.cat(other))
    next_epoch = batch_indices(100, 32, g, False, "cpu")  # the generator advances: a new order
    assert not torch.equal(torch.cat(batches), torch.cat(next_epoch))


def test_batch_indices_eval_is_in_order_and_keeps_everything():
    batches = batch_indices(65, 16, None, drop_last=False, device="cpu")
    assert [len(b) for b in batches] == [16, 16, 16, 16, 1]
    assert torch.equal(torch.cat(batches), torch.arange(65))


def test_batch_indices_last_batch_rules():
    g = torch.Generator().manual_seed(0)
    # training: a last batch of one sample would give BN one value per channel: dropped
    assert [len(b) for b in batch_indices(65, 16, g, False, "cpu")] == [16] * 4
    assert [len(b) for b in batch_indices(70, 16, g, False, "cpu")] == [16] * 4 + [6]
    assert [len(b) for b in batch_indices(64, 16, g, False, "cpu")] == [16] * 4
    assert [len(b) for b in batch_indices(70, 16, g, True, "cpu")] == [16] * 4
    assert [len(b) for b in batch_indices(70, 16, None, True, "cpu")] == [16] * 4
    assert [len(b) for b in batch_indices(3, 1, g, False, "cpu")] == [1, 1, 1]  # full batches stay
    assert batch_indices(10, 16, g, True, "cpu") == []  # drop_last and no full batch: an empty epoch
    assert [len(b) for b in batch_indices(10, 16, g, False, "cpu")] == [10]
    for n, bs, shuffled, drop in ((65, 16, True, False), (70, 16, True, False), (65, 16, False, False), (70, 16, False, True)):
        gen = torch.Generator().manual_seed(0) if shuffled else None
        assert [len(b) for b in batch_indices(n, bs, gen, drop, "cpu")] == batch_sizes(n, bs, shuffled, drop)
    with pytest.raises(ValueError):
        batch_indices(10, 0, None, False, "cpu")


def test_batch_indices_index_a_resident_split(synth_data_dir):
    s = load_split("fashion_mnist", synth_data_dir, True, None, "cpu")
    (b, *_) = batch_indices(len(s), 64, torch.Generator().manual_seed(0), False, s.x.device)
    assert b.device == s.x.device and b.dtype == torch.int64
    assert s.x[b].shape == (64, 1, 28, 28)


def test_to_input_scales_to_unit_range_without_normalising():
    xb = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3).expand(2, 3, 3, 3).contiguous()
    x = to_input(xb, 3)
    assert x.dtype == torch.float32 and x.shape == (2, 3, 3, 3)
    torch.testing.assert_close(x[0, 0, 0], torch.tensor([0.0, 0.2, 1.0]))
    assert xb.dtype == torch.uint8 and int(xb.max()) == 255  # input untouched


def test_to_input_resizes_bilinearly():
    xb = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    x = to_input(xb, 224)
    assert x.shape == (2, 3, 224, 224)
    expected = F.interpolate(xb.float() / 255, size=(224, 224), mode="bilinear", align_corners=False)
    torch.testing.assert_close(x, expected)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    flat = to_input(torch.full((1, 1, 28, 28), 128, dtype=torch.uint8), 32)
    torch.testing.assert_close(flat, torch.full((1, 1, 32, 32), 128 / 255))


# ======================================================================== synthetic data is learnable

@pytest.mark.slow
@pytest.mark.parametrize("name, steps", [("fashion_mnist", 16), ("cifar100", 40)])
def test_synthetic_data_is_learnable(synth_data_dir, name, steps):
    """Other tests check that training reduces the loss on these files: make sure it can."""
    from bnexp.models import build_model

    torch.manual_seed(0)
    s = load_split(name, synth_data_dir, True, None, "cpu", verify=False)
    model = build_model("lenet5", "torch", s.num_classes, s.in_channels, s.image_size)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g, losses = torch.Generator().manual_seed(0), []
    while len(losses) < steps:
        for idx in batch_indices(len(s), 64, g, False, "cpu"):
            loss = F.cross_entropy(model(to_input(s.x[idx], model.input_size)), s.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    chance = float(np.log(s.num_classes))
    assert losses[0] > 0.8 * chance and np.mean(losses[-4:]) < 0.5 * chance


# ======================================================================== the real FashionMNIST

@pytest.mark.realdata
def test_real_fashion_mnist(real_data_dir):
    train = load_split("fashion_mnist", real_data_dir, True, None, "cpu")
    test = load_split("fashion_mnist", real_data_dir, False, None, "cpu")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.y[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert test.y[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    assert torch.bincount(train.y).tolist() == [6000] * 10
    assert abs(to_input(train.x, 28).mean().item() - 0.2860) < 1e-3


def _debian_style(gz: bytes) -> bytes:
    """An original archive with its header rewritten as Debian's strip-nondeterminism does."""
    flags, body = gz[3], gz[10:]
    assert flags in (0, 8)  # nothing, or FNAME only
    if flags == 8:
        body = body[body.index(b"\0") + 1:]  # drop the stored file name
    return b"\x1f\x8b\x08\x00" + synth.DEBIAN_MTIME.to_bytes(4, "little") + b"\x00\x03" + body


@pytest.mark.realdata
@pytest.mark.parametrize("where", ["offline source", "data dir"])
def test_real_fashion_mnist_from_debian_style_archives(real_data_dir, isolated, tmp_path, monkeypatch, where):
    """Archives with Debian's headers fail torchvision's md5 but pass on their contents (verify=True)."""
    src = real_data_dir / "FashionMNIST" / "raw"
    debian = tmp_path / "debian" if where == "offline source" else isolated / "FashionMNIST" / "raw"
    debian.mkdir(parents=True)
    for name in data.FMNIST_RAW_MD5:
        if (src / f"{name}.gz").is_file():
            blob = _debian_style((src / f"{name}.gz").read_bytes())
        else:  # only unpacked files in the data dir: compress them Debian-style
            blob = synth.gzip_bytes((src / name).read_bytes(), None, synth.DEBIAN_MTIME)
        assert not check_integrity_bytes(blob, data.FMNIST_GZ_MD5[f"{name}.gz"])
        (debian / f"{name}.gz").write_bytes(blob)
    monkeypatch.setattr(data, "OFFLINE_SOURCES", {"fashion_mnist": [debian]})
    s = load_split("fashion_mnist", isolated, False, None, "cpu")
    assert len(s) == 10000 and s.y[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    assert (isolated / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").stat().st_size == 47_040_016


def check_integrity_bytes(blob: bytes, md5: str) -> bool:
    return hashlib.md5(blob).hexdigest() == md5


# ======================================================================== on the GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_split_batches_and_inputs_live_on_the_gpu(synth_data_dir):
    s = load_split("cifar100", synth_data_dir, True, 100, "cuda", verify=False)
    assert s.x.is_cuda and s.y.is_cuda and s.x.dtype == torch.uint8
    batches = batch_indices(len(s), 32, torch.Generator().manual_seed(0), False, "cuda")
    same_on_cpu = batch_indices(len(s), 32, torch.Generator().manual_seed(0), False, "cpu")
    assert all(b.is_cuda and torch.equal(b.cpu(), c) for b, c in zip(batches, same_on_cpu))
    x = to_input(s.x[batches[0]], 224)
    assert x.is_cuda and x.shape == (32, 3, 224, 224)
    torch.testing.assert_close(x.cpu(), to_input(s.x.cpu()[batches[0].cpu()], 224), atol=1e-5, rtol=0)
