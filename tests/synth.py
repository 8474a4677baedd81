"""Tiny synthetic data sets written in the real on-disk formats, for tests.

FashionMNIST: IDX files (magic 0x00000803 images / 0x00000801 labels, big-endian dims) under
root/FashionMNIST/raw/, unpacked (what torchvision loads with download=False; synthetic .gz files
would fail torchvision's md5 check) or gzipped. CIFAR-100: root/cifar-100-python/{train,test,meta},
protocol-2 pickles of the same dicts as the real files ('data' uint8 (N, 3072) in CHW order,
'fine_labels', 'coarse_labels', 'filenames', 'batch_label'; meta 'fine_label_names',
'coarse_label_names'), read by torchvision with encoding="latin1" like the originals.

The images are learnable: each class is a fixed blocky pattern, each image its pattern plus
Gaussian noise, so a few epochs of training reduce the loss well below ln(num_classes).
"""

import gzip
import io
import pickle
from pathlib import Path

import numpy as np

FMNIST_NAMES = {  # split -> (images file, labels file), torchvision's names
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
DEBIAN_MTIME = 0x5EDA0AED  # the MTIME Debian's strip-nondeterminism wrote (shared/data/README.md)


def synth_labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """n labels covering the classes as evenly as possible, in random order."""
    return rng.permutation(np.arange(n) % num_classes).astype(np.int64)


def synth_images(labels: np.ndarray, num_classes: int, channels: int, size: int, cells: int,
                 rng: np.random.Generator, pattern_seed: int = 1234) -> np.ndarray:
    """uint8 (N, C, size, size): class pattern (cells x cells blocks, shared by both splits) + noise."""
    patterns = np.random.default_rng(pattern_seed).random((num_classes, channels, cells, cells))
    patterns = patterns.repeat(size // cells, axis=2).repeat(size // cells, axis=3)
    x = 30 + 190 * patterns[labels] + rng.normal(0, 30, (len(labels), channels, size, size))
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def fashion_mnist_arrays(n_train: int, n_test: int, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """split -> (images uint8 (N, 28, 28), labels int64 (N,))."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        y = synth_labels(n, 10, rng)
        out[split] = (synth_images(y, 10, 1, 28, 7, rng)[:, 0], y)
    return out


def idx_bytes(a: np.ndarray) -> bytes:
    """An unsigned-byte IDX file: magic 0x0000080<ndim>, big-endian int32 dims, then the bytes."""
    a = np.ascontiguousarray(a, dtype=np.uint8)
    header = (0x0800 + a.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in a.shape)
    return header + a.tobytes()


def gzip_bytes(data: bytes, name: str | None, mtime: int) -> bytes:
    """gzip with the original-style header (FNAME = name) or, with name None, Debian's (no FNAME)."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename=name or "", mode="wb", fileobj=buf, mtime=mtime) as f:
        f.write(data)
    return buf.getvalue()


def write_idx(path: Path, a: np.ndarray, gz: bool = False) -> Path:
    """Write array `a` as an IDX file at path (plus ".gz" and gzipped if gz); return the path written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = idx_bytes(a)
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip_bytes(data, path.stem, 1504176606)
    path.write_bytes(data)
    return path


def write_fashion_mnist(root: Path, n_train: int = 512, n_test: int = 256, gz: bool = False,
                        seed: int = 0, folder: str = "FashionMNIST") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write a synthetic FashionMNIST into root/FashionMNIST/raw/ (unpacked, or .gz files if gz);
    folder="MNIST" writes the same format where torchvision's MNIST looks (MNIST/raw/)."""
    arrays = fashion_mnist_arrays(n_train, n_test, seed)
    raw = Path(root) / folder / "raw"
    for split, (x, y) in arrays.items():
        images, labels = FMNIST_NAMES[split]
        write_idx(raw / images, x, gz=gz)
        write_idx(raw / labels, y, gz=gz)
    return arrays


def write_debian_fashion_mnist(directory: Path, n_train: int = 64, n_test: int = 32,
                               seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write the four .gz files flat into directory, with headers rewritten the way Debian's package
    has them (no file name, MTIME of the changelog): what /usr/share/datasets/fashion-mnist holds."""
    arrays = fashion_mnist_arrays(n_train, n_test, seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for split, (x, y) in arrays.items():
        for name, a in zip(FMNIST_NAMES[split], (x, y)):
            (directory / f"{name}.gz").write_bytes(gzip_bytes(idx_bytes(a), None, DEBIAN_MTIME))
    return arrays


def write_cifar100(root: Path, n_train: int = 500, n_test: int = 200,
                   seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write a synthetic CIFAR-100 into root/cifar-100-python/; return split -> (x (N,3,32,32), y)."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n, batch_label in (("train", n_train, "training batch 1 of 1"),
                                  ("test", n_test, "testing batch 1 of 1")):
        y = synth_labels(n, 100, rng)
        x = synth_images(y, 100, 3, 32, 4, rng)
        entry = {
            "filenames": [f"synthetic_{split}_{i:05d}.png" for i in range(n)],
            "batch_label": batch_label,
            "fine_labels": [int(v) for v in y],
            "coarse_labels": [int(v) // 5 for v in y],
            "data": x.reshape(n, 3 * 32 * 32),  # rows: 1024 red, 1024 green, 1024 blue values
        }
        with open(folder / split, "wb") as f:
            pickle.dump(entry, f, protocol=2)
        arrays[split] = (x, y)
    meta = {"fine_label_names": [f"fine_{i:02d}" for i in range(100)],
            "coarse_label_names": [f"coarse_{i:02d}" for i in range(20)]}
    with open(folder / "meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return arrays


def corrupt(path: Path, how: str = "truncate") -> None:
    """Damage a file in place: "truncate" (keep the first half), "flip" (invert one byte in the
    middle: same size, different md5) or "magic" (overwrite the first 4 bytes)."""
    path = Path(path)
    data = bytearray(path.read_bytes())
    if how == "truncate":
        data = data[: len(data) // 2]
    elif how == "flip":
        data[len(data) // 2] ^= 0xFF
    elif how == "magic":
        data[:4] = b"\xde\xad\xbe\xef"
    else:
        raise ValueError(f"corrupt: how must be truncate, flip or magic, got {how!r}")
    path.write_bytes(bytes(data))
