"""Corrupt inputs and artefacts: detected with one line, never fatal forever.

Data files that differ from the original FashionMNIST by a byte or a label; damaged files in a run
directory (run.json, activations.npz, checkpoint.pt); a disk that fills up in the middle of a run.
"""

import gzip
import hashlib
import json
import os
import shutil
import time

import numpy as np
import pytest

import synth
from bnexp import data
from bnexp.data import load_split
from bnexp.errors import BnexpError

RAW = ("FashionMNIST", "raw")


@pytest.fixture
def fm_root(tmp_path, monkeypatch):
    """A synthetic FashionMNIST (40 / 10) whose files bnexp takes for the originals: their sizes and
    md5s replace the real ones in data.FMNIST_RAW_SIZE / FMNIST_RAW_MD5; its own user cache."""
    monkeypatch.setenv("BNEXP_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "root"
    synth.write_fashion_mnist(root, n_train=40, n_test=10)
    raw = root.joinpath(*RAW)
    monkeypatch.setattr(data, "FMNIST_RAW_SIZE", {n: (raw / n).stat().st_size for n in data.FMNIST_RAW_SIZE})
    monkeypatch.setattr(data, "FMNIST_RAW_MD5", {n: hashlib.md5((raw / n).read_bytes()).hexdigest()
                                                 for n in data.FMNIST_RAW_MD5})
    return root


def _change_label(path, index=0):
    """Change one label of an IDX label file to another valid label (same size, same header)."""
    b = bytearray(path.read_bytes())
    b[8 + index] = (b[8 + index] + 1) % 10
    path.write_bytes(bytes(b))


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("what", ["flipped image byte", "changed label"])
def test_unpacked_file_differing_from_the_original_is_refused(fm_root, what):
    raw = fm_root.joinpath(*RAW)
    assert len(load_split("fashion_mnist", fm_root, True, None, "cpu")) == 40  # intact: loads
    if what == "flipped image byte":
        bad = raw / "train-images-idx3-ubyte"
        synth.corrupt(bad, "flip")
    else:
        bad = raw / "train-labels-idx1-ubyte"
        _change_label(bad)
    with pytest.raises(BnexpError) as e:
        load_split("fashion_mnist", fm_root, True, None, "cpu")
    msg = _one_line(e)
    assert msg.startswith(f"{bad}: md5 ") and "not the original FashionMNIST" in msg and "data.verify=false" in msg
    assert len(load_split("fashion_mnist", fm_root, True, None, "cpu", verify=False)) == 40  # opt-out
    assert len(load_split("fashion_mnist", fm_root, False, None, "cpu")) == 10  # the test split is intact


def test_md5_is_hashed_once_and_cached_by_stat(fm_root, monkeypatch):
    raw = fm_root.joinpath(*RAW)
    load_split("fashion_mnist", fm_root, True, None, "cpu")
    cache = json.loads((fm_root.parent / "cache" / data.MD5_CACHE).read_text())
    assert {os.path.basename(k) for k in cache} == {"train-images-idx3-ubyte", "train-labels-idx1-ubyte"}

    def no_hashing(*a, **k):
        raise AssertionError("hashed again although the file did not change")

    with monkeypatch.context() as m:
        m.setattr(data, "_hash_file", no_hashing)
        load_split("fashion_mnist", fm_root, True, None, "cpu")  # cached: no hashing
    # a change that keeps size and mtime (written, then the mtime restored): ctime still differs
    images = raw / "train-images-idx3-ubyte"
    st = images.stat()
    synth.corrupt(images, "flip")
    os.utime(images, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(BnexpError, match="md5 .* not the original"):
        load_split("fashion_mnist", fm_root, True, None, "cpu")


def test_damaged_md5_cache_is_rebuilt(fm_root):
    cache = fm_root.parent / "cache" / data.MD5_CACHE
    cache.parent.mkdir(parents=True)
    for junk in ("42", "{not json", '{"x": 1}'):
        cache.write_text(junk)
        assert len(load_split("fashion_mnist", fm_root, True, None, "cpu")) == 40
        assert isinstance(json.loads(cache.read_text()), dict)


def test_verified_archive_needs_no_second_hash_of_its_contents(tmp_path, monkeypatch):
    """Unpacking a .gz whose md5 is torchvision's records its contents as verified."""
    monkeypatch.setenv("BNEXP_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "root"
    synth.write_fashion_mnist(root, n_train=40, n_test=10, gz=True)
    raw = root.joinpath(*RAW)
    monkeypatch.setattr(data, "FMNIST_GZ_MD5", {f"{n}.gz": hashlib.md5((raw / f"{n}.gz").read_bytes()).hexdigest()
                                                for n in data.FMNIST_RAW_MD5})
    monkeypatch.setattr(data, "FMNIST_RAW_SIZE", {n: len(gzip.decompress((raw / f"{n}.gz").read_bytes()))
                                                  for n in data.FMNIST_RAW_SIZE})
    monkeypatch.setattr(data, "FMNIST_RAW_MD5", {n: hashlib.md5(gzip.decompress((raw / f"{n}.gz").read_bytes()))
                                                 .hexdigest() for n in data.FMNIST_RAW_MD5})
    calls = []
    monkeypatch.setattr(data, "_hash_file", lambda p, f=data._hash_file: calls.append(p) or f(p))
    assert len(load_split("fashion_mnist", root, True, None, "cpu")) == 40
    assert calls == []  # neither the archives' contents nor the unpacked files were hashed by bnexp


@pytest.mark.realdata
def test_real_fashion_mnist_copy_with_a_flipped_byte_or_label_is_refused(real_data_dir, tmp_path, monkeypatch):
    """On a copy of the real files: the original loads; a flipped byte or a changed label stops with
    one line; the md5 of the 47 MB train images costs once, then nothing."""
    monkeypatch.setenv("BNEXP_CACHE_DIR", str(tmp_path / "cache"))
    src, raw = real_data_dir.joinpath(*RAW), tmp_path.joinpath("root", *RAW)
    raw.mkdir(parents=True)
    for name in data.FMNIST_RAW_MD5:
        if (src / name).is_file():
            shutil.copyfile(src / name, raw / name)
        else:
            (raw / name).write_bytes(gzip.decompress((src / f"{name}.gz").read_bytes()))
    root = raw.parent.parent
    t0 = time.perf_counter()
    data._verify_raw(raw / "train-images-idx3-ubyte")
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    data._verify_raw(raw / "train-images-idx3-ubyte")
    cached = time.perf_counter() - t0
    print(f"md5 of train-images-idx3-ubyte: {first * 1e3:.1f} ms hashed, {cached * 1e3:.2f} ms cached")
    assert cached < first and cached < 0.05
    assert load_split("fashion_mnist", root, True, None, "cpu").y[:3].tolist() == [9, 0, 0]
    for name, damage in (("train-images-idx3-ubyte", lambda p: synth.corrupt(p, "flip")),
                         ("train-labels-idx1-ubyte", _change_label)):
        saved = (raw / name).read_bytes()
        damage(raw / name)
        with pytest.raises(BnexpError) as e:
            load_split("fashion_mnist", root, True, None, "cpu")
        assert _one_line(e).startswith(f"{raw / name}: md5 ")
        (raw / name).write_bytes(saved)
    assert len(load_split("fashion_mnist", root, True, None, "cpu")) == 60000
