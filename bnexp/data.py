"""Data sets as uint8 tensors resident on the run's device, loaded through torchvision.

A split is read once through torchvision's own dataset class (so its file checks run), kept on the
device as uint8 (FashionMNIST train: 47 MB) and batched by indexing it with a per-epoch permutation:
no DataLoader, no per-image transform. `to_input` scales to [0, 1] (`ToTensor()` only, as the
reference code does: no mean/std normalisation) and upsamples on the device when a model wants
another size (AlexNet: 32 -> 224).

Where data comes from, in order: the data dir (torchvision's layout, unpacked or as the original
archives), the user cache, offline copies (Debian's dataset-fashion-mnist package), and finally
torchvision's download. Local archives are checked (md5) and unpacked here rather than by
torchvision's download=True, so a local file never triggers a network request, a data dir we cannot
write to falls back to the cache, and unpacking is atomic (concurrent runs never see half a file).
With verify, unpacked FashionMNIST files of the original's size must also have the original's md5
(torchvision checks none with download=False); each file is hashed once, then its md5 is cached in
the user cache against its size, mtime, ctime and inode.
"""

import functools
import gzip
import hashlib
import json
import math
import os
import pickle
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torchvision.datasets import CIFAR100, MNIST, FashionMNIST
from torchvision.datasets.utils import check_integrity

from bnexp.errors import BnexpError

ENV_DATA_DIR = "BNEXP_DATA_DIR"
ENV_CACHE_DIR = "BNEXP_CACHE_DIR"  # overrides the user cache (the tests point it at a temp dir)
ENV_OFFLINE = "BNEXP_OFFLINE"  # set (non-empty, not "0"): never download (the tests set it)

# Offline copies searched when the data dir has nothing. Debian/Ubuntu's dataset-fashion-mnist holds
# the original .gz files with gzip headers rewritten by strip-nondeterminism: same deflate data,
# different md5, so they are checked through the md5 of their unpacked contents (FMNIST_RAW_MD5).
OFFLINE_SOURCES: dict[str, list[Path]] = {
    "fashion_mnist": [Path("/usr/share/datasets/fashion-mnist")],
    "mnist": [],
    "cifar100": [],
}

# ======================================================================== where data lives

def user_cache_dir() -> Path:
    """bnexp's cache: $BNEXP_CACHE_DIR, else $XDG_CACHE_HOME/bnexp, else ~/.cache/bnexp."""
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "bnexp"


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """The data root: the argument, else $BNEXP_DATA_DIR, else <user cache>/data."""
    if data_dir not in (None, ""):
        return Path(data_dir).expanduser()
    if os.environ.get(ENV_DATA_DIR):
        return Path(os.environ[ENV_DATA_DIR]).expanduser()
    return user_cache_dir() / "data"


def data_root(data_dir: str | os.PathLike | None, data_set: str) -> Path:
    """resolve_data_dir, refusing a data_dir that is given but is not an existing directory: bnexp
    does not create it, nor silently fall back to the cache for it ($BNEXP_DATA_DIR and the default
    cache behave as before)."""
    root = resolve_data_dir(data_dir)
    if data_dir not in (None, "") and not root.is_dir():
        title = DATASETS[data_set].title if data_set in DATASETS else data_set
        why = "is not a directory" if root.exists() else "does not exist"
        raise BnexpError(f"{title} not found: data_dir={data_dir} {why}; point data_dir at the existing folder "
                         f"that holds the data, or leave data_dir unset to use ${ENV_DATA_DIR} or the user cache")
    return root


def _writable(d: Path) -> bool:
    """True if files can be created in d (created if missing); tried, because os.access lies for root."""
    try:
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=d):
            return True
    except OSError:
        return False


def _unpack_root(root: Path, sub: str) -> Path:
    """Where to unpack or download into: root if root/sub is writable, else the user cache."""
    return root if _writable(root / sub) else user_cache_dir() / "data"


def _offline() -> bool:
    return os.environ.get(ENV_OFFLINE, "") not in ("", "0")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# ======================================================================== registry

@dataclass(frozen=True)
class DatasetSpec:
    """What the rest of bnexp needs to know about a data set, and how to load one split of it."""

    name: str
    title: str
    num_classes: int
    in_channels: int
    image_size: int  # native H = W
    how_to_get: str  # appended to the "not found" error
    load: Callable[[Path, bool, bool, bool], tuple[torch.Tensor, torch.Tensor]]
    # load(root, train, verify, download) -> (x uint8 (N,C,H,W), y int64 (N,)) on the CPU
    count: Callable[[Path, bool, bool, bool], int]
    # count(root, train, verify, download) -> the split's number of samples, from the files' headers or a
    # cached count, without loading the split (start-up checks of a sweep: bnexp/preflight.py)


@dataclass
class Split:
    """One split resident on a device: x uint8 (N, C, H, W), y int64 (N,)."""

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def in_channels(self) -> int:
        return self.x.shape[1]

    @property
    def image_size(self) -> int:
        return self.x.shape[-1]


def load_split(name: str, root: str | os.PathLike | None, train: bool, size: int | None,
               device: str | torch.device = "cpu", verify: bool = True,
               download: bool = True) -> Split:
    """Load split `train`/test of data set `name` onto `device`, keeping the first `size` samples.

    verify=False skips the md5 checks of archives, original-sized unpacked FashionMNIST files and
    CIFAR pickles (synthetic test data) but nothing else; download=False (or $BNEXP_OFFLINE=1) never touches the network.
    """
    if name not in DATASETS:
        raise BnexpError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    spec = DATASETS[name]
    x, y = spec.load(resolve_data_dir(root), train, verify, download and not _offline())
    split = "train" if train else "test"
    if size is not None:
        if not 1 <= size <= len(y):
            raise BnexpError(f"{name} {split}: size must be between 1 and {len(y)}, got {size}")
        x, y = x[:size].clone(), y[:size].clone()
    return Split(x.to(device), y.to(device), spec.num_classes)


def split_size(name: str, root: str | os.PathLike | None, train: bool, verify: bool = True,
               download: bool = True) -> int:
    """The number of samples of split `train`/test of data set `name`, as `load_split` would load them
    (the same files found, unpacked or downloaded, the same header and md5 checks), without loading it."""
    if name not in DATASETS:
        raise BnexpError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name].count(resolve_data_dir(root), train, verify, download and not _offline())


def _check_labels(y: torch.Tensor, n_images: int, num_classes: int, where: str) -> None:
    if len(y) != n_images:
        raise BnexpError(f"{where}: {len(y)} labels for {n_images} images; the files do not belong together")
    bad = y[(y < 0) | (y >= num_classes)]
    if len(bad):
        raise BnexpError(f"{where}: label {int(bad[0])} out of range 0..{num_classes - 1}; the file is corrupt")


def _not_found(spec: DatasetSpec, looked: list[Path], why: str) -> BnexpError:
    dirs = ", ".join(dict.fromkeys(str(d) for d in looked))
    return BnexpError(f"{spec.title} not found (looked in {dirs}; {why}). {spec.how_to_get}")


# ======================================================================== FashionMNIST and MNIST (IDX files)

FMNIST_FOLDER = "FashionMNIST/raw"
FMNIST_GZ_MD5 = dict(FashionMNIST.resources)  # "train-images-idx3-ubyte.gz" -> md5 of the original
# md5 of the unpacked originals (shared/data/README.md): checks archives whose headers were rewritten
FMNIST_RAW_MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}


# their sizes: an unpacked file of exactly this size claims to be the original, so with verify its md5
# must match (a flipped byte or a label changed to another valid label keeps the size and the header)
FMNIST_RAW_SIZE = {
    "train-images-idx3-ubyte": 47_040_016,
    "train-labels-idx1-ubyte": 60_008,
    "t10k-images-idx3-ubyte": 7_840_016,
    "t10k-labels-idx1-ubyte": 10_008,
}
MD5_CACHE = "md5-cache.json"  # in the user cache: {path: {"stat": ..., "md5": ..., "count": ...}}

# MNIST: the same four file names and sizes. torchvision publishes the md5s of its archives only, so
# archives are checked when unpacked, while unpacked files without archives get the IDX checks alone.
MNIST_FOLDER = "MNIST/raw"
MNIST_GZ_MD5 = dict(MNIST.resources)
IDX_CLASSES = {"fashion_mnist": FashionMNIST, "mnist": MNIST}


def _idx_meta(name: str) -> tuple[str, dict[str, str | None], dict[str, int], dict[str, str]]:
    """(folder, md5 of each unpacked original or None, their sizes, md5 of each archive) of an IDX data
    set, read when called (tests replace the FashionMNIST tables with synthetic ones)."""
    if name == "fashion_mnist":
        return FMNIST_FOLDER, FMNIST_RAW_MD5, FMNIST_RAW_SIZE, FMNIST_GZ_MD5
    return MNIST_FOLDER, dict.fromkeys(FMNIST_RAW_MD5), FMNIST_RAW_SIZE, MNIST_GZ_MD5


def _stat_key(path: Path) -> list[int]:
    """What says a file is unchanged since it was hashed: size, mtime, ctime (set by the kernel on
    every write, rename or touch, so also a write that restores the mtime) and inode."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _md5_cache() -> dict:
    try:
        cache = json.loads((user_cache_dir() / MD5_CACHE).read_text())
        return cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):  # none yet, or damaged: start a new one
        return {}


def _cached(path: Path, what: str):
    """What the user cache remembers about path ("md5", "count"), if path is unchanged since; else None."""
    entry = _md5_cache().get(str(path.resolve()))
    return entry.get(what) if isinstance(entry, dict) and entry.get("stat") == _stat_key(path) else None


def _remember(path: Path, what: str, value) -> None:
    """Record a fact about path (its md5, its count of samples) against its current stat; best effort
    (a read-only cache only costs time)."""
    cache, key, stat = _md5_cache(), str(path.resolve()), _stat_key(path)
    entry = cache.get(key)
    cache[key] = {**(entry if isinstance(entry, dict) and entry.get("stat") == stat else {"stat": stat}), what: value}
    cache_file = user_cache_dir() / MD5_CACHE
    tmp = cache_file.with_name(f".{MD5_CACHE}.{os.getpid()}.tmp")
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(cache, indent=1) + "\n")
        os.replace(tmp, cache_file)  # concurrent writers: the last one wins, a lost entry is hashed again
    except OSError:
        tmp.unlink(missing_ok=True)


def file_md5(path: Path) -> str:
    """The md5 of path, hashed once and then read from the user cache while the file's size, mtime,
    ctime and inode stay the same (FashionMNIST's 47 MB train images: ~70 ms hashed, <1 ms cached)."""
    if isinstance(md5 := _cached(path, "md5"), str):
        return md5
    md5 = _hash_file(path)
    _remember(path, "md5", md5)
    return md5


def _hash_file(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _verify_raw(path: Path, name: str = "fashion_mnist") -> None:
    """With verify: an unpacked file of the original's size must have the original's md5 (if known)."""
    _, raw_md5, raw_size, _ = _idx_meta(name)
    if path.stat().st_size != raw_size[path.name] or raw_md5[path.name] is None:
        return  # not the original's size: other data (a subset, synthetic test data), not a damaged copy
    if (md5 := file_md5(path)) != raw_md5[path.name]:
        raise BnexpError(f"{path}: md5 {md5} is not the original {DATASETS[name].title}'s ({raw_md5[path.name]}); "
                         "the file is corrupt (changed bytes or labels), delete it and unpack or get it again "
                         "(or pass data.verify=false to train on it anyway)")


def _has_raw(d: Path, name: str = "fashion_mnist") -> bool:
    folder, raw_md5, _, _ = _idx_meta(name)
    return all((d / folder / f).is_file() for f in raw_md5)


def _gunzip(src: Path, dst: Path) -> None:
    """Unpack src to dst via a temporary file and an atomic rename; gzip checks CRC and length."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        with gzip.open(src, "rb") as fi, open(tmp, "wb") as fo:
            shutil.copyfileobj(fi, fo, 1 << 20)
        os.replace(tmp, dst)
    except (OSError, EOFError, zlib.error) as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, (gzip.BadGzipFile, EOFError, zlib.error)):
            raise BnexpError(f"{src}: not a valid gzip file ({_one_line(e)}); delete it and get it again") from e
        raise BnexpError(f"cannot unpack {src} into {dst.parent}: {_one_line(e)}") from e


def _unpack_idx(src_dir: Path, dest_root: Path, verify: bool, name: str = "fashion_mnist") -> None:
    """Unpack the four .gz files of src_dir into dest_root/<Name>/raw.

    verify: each archive must have torchvision's md5, or else its unpacked contents the original's
    (archives whose gzip header was rewritten, like Debian's, differ only in the header).
    """
    folder, raw_md5s, _, gz_md5 = _idx_meta(name)
    dest = dest_root / folder
    dest.mkdir(parents=True, exist_ok=True)
    for raw, raw_md5 in raw_md5s.items():
        gz = src_dir / f"{raw}.gz"
        archive_ok = not verify or check_integrity(str(gz), gz_md5[gz.name])
        _gunzip(gz, dest / raw)
        if verify and archive_ok and raw_md5:  # the original archive (gzip checked its CRC): so are its contents
            _remember(dest / raw, "md5", raw_md5)
        elif not archive_ok and (raw_md5 is None or file_md5(dest / raw) != raw_md5):
            (dest / raw).unlink()
            raise BnexpError(f"{gz}: md5 mismatch, neither the archive nor its contents are the original "
                             f"{DATASETS[name].title}; delete it and get it again (or pass verify=False for other data)")


def _locate_idx(root: Path, verify: bool, download: bool, name: str = "fashion_mnist") -> Path:
    """A root whose <Name>/raw holds the four unpacked files, unpacking or downloading if needed."""
    spec, cache, cls = DATASETS[name], user_cache_dir() / "data", IDX_CLASSES[name]
    folder, raw_md5, _, _ = _idx_meta(name)
    if _has_raw(root, name):
        return root
    gz_dir = root / folder
    if all((gz_dir / f"{raw}.gz").is_file() for raw in raw_md5):
        dest = _unpack_root(root, folder)
        if not _has_raw(dest, name):
            _unpack_idx(gz_dir, dest, verify, name)
        return dest
    if _has_raw(cache, name):
        return cache
    sources = OFFLINE_SOURCES.get(name, [])
    for src in sources:
        if all((src / f"{raw}.gz").is_file() for raw in raw_md5):
            dest = _unpack_root(root, folder)
            _unpack_idx(src, dest, verify, name)
            return dest
    looked = [root / folder, cache / folder, *sources]
    if not download:
        raise _not_found(spec, looked, f"download disabled{f' by ${ENV_OFFLINE}' if _offline() else ''}")
    dest = _unpack_root(root, folder)
    try:
        cls(dest, train=True, download=True)
    except Exception as e:  # torchvision raises RuntimeError/URLError/OSError; all mean "no data"
        reason = f"download from {', '.join(cls.mirrors)} failed: {_one_line(e)[:200]}"
        raise _not_found(spec, looked, reason) from e
    return dest


def _check_idx(path: Path, item_shape: tuple[int, ...]) -> int:
    """Check an unsigned-byte IDX file's magic, dims and size; return its number of items."""
    nd = 1 + len(item_shape)
    with open(path, "rb") as f:
        header = f.read(4 + 4 * nd)
    magic = int.from_bytes(header[:4], "big") if len(header) >= 4 else None
    if magic != 0x0800 + nd:
        got = "file too short" if magic is None else f"0x{magic:08x}"
        raise BnexpError(f"{path}: not an IDX {'label' if nd == 1 else 'image'} file (magic {got}, "
                         f"expected 0x{0x0800 + nd:08x}); delete it and get the data again")
    if len(header) < 4 + 4 * nd:
        raise BnexpError(f"{path}: truncated IDX header; delete it and get the data again")
    dims = [int.from_bytes(header[4 + 4 * i: 8 + 4 * i], "big") for i in range(nd)]
    if tuple(dims[1:]) != item_shape:
        raise BnexpError(f"{path}: items of shape {tuple(dims[1:])}, expected {item_shape}")
    expected = 4 + 4 * nd + dims[0] * math.prod(item_shape)
    if (actual := path.stat().st_size) != expected:
        raise BnexpError(f"{path}: {actual} bytes, expected {expected} for {dims[0]} items; "
                         "the file is truncated or corrupt, delete it and get the data again")
    return dims[0]


def _idx_split(name: str, root: Path, train: bool, verify: bool, download: bool) -> tuple[Path, Path, int]:
    """(the root holding the split's files, its labels file, its number of samples), after every
    check that needs no loading: the IDX headers and sizes, and with verify the originals' md5."""
    base, folder = _locate_idx(root, verify, download, name), _idx_meta(name)[0]
    prefix = "train" if train else "t10k"
    images, labels = (base / folder / f"{prefix}-{k}-idx{d}-ubyte" for k, d in (("images", 3), ("labels", 1)))
    n_images, n_labels = _check_idx(images, (28, 28)), _check_idx(labels, ())
    if n_images != n_labels:
        raise BnexpError(f"{labels}: {n_labels} labels for {n_images} images in {images.name}; "
                         "the files do not belong together")
    if verify:  # torchvision checks no md5 of unpacked files: a flipped byte would train silently
        _verify_raw(images, name)
        _verify_raw(labels, name)
    return base, labels, n_images


def _count_idx(name: str, root: Path, train: bool, verify: bool, download: bool) -> int:
    return _idx_split(name, root, train, verify, download)[2]


def _load_idx(name: str, root: Path, train: bool, verify: bool, download: bool):
    base, labels, _ = _idx_split(name, root, train, verify, download)
    folder, cls = _idx_meta(name)[0], IDX_CLASSES[name]
    try:  # the headers were checked above, so a failure here is unexpected: still say where
        ds = cls(base, train=train, download=False)
    except Exception as e:
        raise BnexpError(f"cannot load {DATASETS[name].title} from {base / folder}: {_one_line(e)}") from e
    _check_labels(ds.targets, len(ds.data), 10, str(labels))
    return ds.data.unsqueeze(1), ds.targets.long()


# ======================================================================== CIFAR-100

CIFAR_FOLDER = CIFAR100.base_folder  # "cifar-100-python"


class _UnverifiedCIFAR100(CIFAR100):
    """torchvision's CIFAR100 with its md5s set to None: check_integrity then only checks that
    each file exists, and everything else (pickle loading, reshaping, labels, meta) is unchanged."""

    train_list = [[f, None] for f, _ in CIFAR100.train_list]
    test_list = [[f, None] for f, _ in CIFAR100.test_list]
    meta = {**CIFAR100.meta, "md5": None}


def _cifar_files(d: Path) -> list[tuple[Path, str]]:
    lists = CIFAR100.train_list + CIFAR100.test_list + [[CIFAR100.meta["filename"], CIFAR100.meta["md5"]]]
    return [(d / CIFAR_FOLDER / f, md5) for f, md5 in lists]


def _locate_cifar100(root: Path, verify: bool, download: bool) -> Path:
    """A root holding cifar-100-python/{train,test,meta}, extracting or downloading the archive if needed."""
    spec, cache = DATASETS["cifar100"], user_cache_dir() / "data"
    for d in (root, cache):
        if all(p.is_file() for p, _ in _cifar_files(d)):
            return d
    sources = OFFLINE_SOURCES.get("cifar100", [])
    for src in (root, *sources):
        tarball = src / CIFAR100.filename
        if tarball.is_file():
            dest = _unpack_root(root, "")
            if verify and not check_integrity(str(tarball), CIFAR100.tgz_md5):
                raise BnexpError(f"{tarball}: md5 mismatch (expected {CIFAR100.tgz_md5}); the archive is "
                                 "corrupt or incomplete, delete it and download it again")
            try:
                with tarfile.open(tarball) as tar:  # the "data" filter refuses paths outside dest
                    tar.extractall(dest, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
            except Exception as e:
                raise BnexpError(f"{tarball}: cannot extract ({_one_line(e)}); delete it and download it again") from e
            return dest
    looked = [root / CIFAR_FOLDER, cache / CIFAR_FOLDER, *sources]
    if not download:
        raise _not_found(spec, looked, f"download disabled{f' by ${ENV_OFFLINE}' if _offline() else ''}")
    dest = _unpack_root(root, "")
    try:
        CIFAR100(dest, train=True, download=True)
    except Exception as e:
        raise _not_found(spec, looked, f"download of {CIFAR100.url} failed: {_one_line(e)[:200]}") from e
    return dest


def _load_cifar100(root: Path, train: bool, verify: bool, download: bool):
    base = _locate_cifar100(root, verify, download)
    data_file = base / CIFAR_FOLDER / ("train" if train else "test")
    meta_file = base / CIFAR_FOLDER / CIFAR100.meta["filename"]
    try:
        ds = (CIFAR100 if verify else _UnverifiedCIFAR100)(base, train=train, download=False)
    except RuntimeError as e:
        if verify:  # torchvision says "not found or corrupted": name the file that fails its md5
            for path, md5 in _cifar_files(base):
                if not check_integrity(str(path), md5):
                    raise BnexpError(f"{path}: md5 mismatch (expected {md5}); the file is corrupt or not the "
                                     "original CIFAR-100, delete it and download it again (or pass verify=False "
                                     "for non-original data)") from e
        raise BnexpError(f"cannot load CIFAR-100 from {base / CIFAR_FOLDER}: {_one_line(e)}") from e
    except Exception as e:  # truncated pickle, missing key, bad array size...: which of the two files?
        try:
            with open(meta_file, "rb") as f:
                pickle.load(f, encoding="latin1")[CIFAR100.meta["key"]]
            bad = data_file
        except Exception:
            bad = meta_file
        raise BnexpError(f"{bad}: not a valid CIFAR-100 pickle ({type(e).__name__}: {_one_line(e)[:120]}); "
                         "delete it and download the data again") from e
    y = torch.tensor(ds.targets, dtype=torch.int64)
    _check_labels(y, len(ds.data), 100, str(data_file))
    _remember(data_file, "count", len(y))
    x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # torchvision keeps HWC
    return x, y


def _count_cifar100(root: Path, train: bool, verify: bool, download: bool) -> int:
    """A pickle has no header to read the count from: it is remembered against the file's stat when the
    split is loaded (user cache, as the md5s), and the split is loaded once if it is not known yet."""
    data_file = _locate_cifar100(root, verify, download) / CIFAR_FOLDER / ("train" if train else "test")
    count = _cached(data_file, "count")
    return count if isinstance(count, int) else len(_load_cifar100(root, train, verify, download)[1])


DATASETS: dict[str, DatasetSpec] = {
    "fashion_mnist": DatasetSpec(
        "fashion_mnist", "FashionMNIST", 10, 1, 28,
        "Get the four .gz files from http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/ "
        "(or run torchvision.datasets.FashionMNIST(root, download=True) on a machine with internet) "
        "into <data_dir>/FashionMNIST/raw/, or install the Debian/Ubuntu package dataset-fashion-mnist; "
        f"point bnexp at the data with data_dir=... or ${ENV_DATA_DIR}",
        functools.partial(_load_idx, "fashion_mnist"), functools.partial(_count_idx, "fashion_mnist")),
    "mnist": DatasetSpec(
        "mnist", "MNIST", 10, 1, 28,
        "Run torchvision.datasets.MNIST(root, download=True) on a machine with internet (or copy its four "
        "train-/t10k- .gz files) into <data_dir>/MNIST/raw/; "
        f"point bnexp at the data with data_dir=... or ${ENV_DATA_DIR}",
        functools.partial(_load_idx, "mnist"), functools.partial(_count_idx, "mnist")),
    "cifar100": DatasetSpec(
        "cifar100", "CIFAR-100", 100, 3, 32,
        f"Download {CIFAR100.url} (or run torchvision.datasets.CIFAR100(root, download=True) on a machine "
        "with internet) into <data_dir>/ (the archive or its unpacked cifar-100-python/ folder); "
        f"point bnexp at the data with data_dir=... or ${ENV_DATA_DIR}",
        _load_cifar100, _count_cifar100),
}

# ======================================================================== batching

def batch_sizes(n: int, batch_size: int, shuffled: bool, drop_last: bool) -> list[int]:
    """The sizes of one epoch's batches over n samples: the rule `batch_indices` and the training step share.

    As with DataLoader the last partial batch is kept unless drop_last, except that a shuffled
    (training) epoch drops a last batch of exactly one sample: BN's FC layers would see one value
    per channel ("Expected more than 1 value per channel when training").
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"batch_sizes: need n >= 1 and batch_size >= 1, got n={n}, batch_size={batch_size}")
    sizes = [batch_size] * (n // batch_size)
    rest = n % batch_size
    if rest and not (drop_last or (shuffled and rest == 1)):
        sizes.append(rest)
    return sizes


def batch_indices(n: int, batch_size: int, generator: torch.Generator | None, drop_last: bool,
                  device: str | torch.device = "cpu") -> list[torch.Tensor]:
    """One epoch of index batches over n samples, on `device`, sized by `batch_sizes`.

    generator: a CPU generator (the same permutation on every device) for a shuffled training
    epoch; None for evaluation, in order.
    """
    sizes = batch_sizes(n, batch_size, generator is not None, drop_last)
    order = torch.arange(n) if generator is None else torch.randperm(n, generator=generator)
    return list(order[:sum(sizes)].to(device).split(batch_size)) if sizes else []


def to_input(xb: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N,C,H,W) -> float32 in [0, 1], resized bilinearly to size x size when it differs.

    The reference resizes PIL images (uint8) before ToTensor; resizing the floats instead skips
    that rounding, a difference below 1/255 per pixel.
    """
    x = xb.float().div_(255)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return x
