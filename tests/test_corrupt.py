"""Corrupt inputs and artefacts: detected with one line, never fatal forever.

Data files that differ from the original FashionMNIST by a byte or a label; damaged files in a run
directory (run.json, activations.npz, checkpoint.pt); a disk that fills up in the middle of a run.
"""

import errno
import gzip
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

import synth
from bnexp import layout as L
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


# ======================================================================== damaged run directories

QUICK = ["epochs=2", "batch_size=64", "progress=false", "lr=0.1", "probe_every=1"]


def bnexp(capsys, *args):
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    from bnexp.cli import main

    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def metrics_rows(run):
    """metrics.csv without the wall-clock column."""
    lines = (run / L.METRICS).read_text().splitlines()
    return [line.rsplit(",", 1)[0] for line in lines]


@pytest.fixture(scope="module")
def clean_run(synth_data_dir, tmp_path_factory):
    """The 2-epoch run, trained once without any damage: the numbers every repaired run must give."""
    from bnexp.cli import main

    results = tmp_path_factory.mktemp("clean")
    assert main(["train", f"data_dir={synth_data_dir}", f"results_dir={results}", *QUICK]) == 0
    (run,) = (results / L.RUNS_DIR).iterdir()
    return run


@pytest.fixture
def args(synth_data_dir, tmp_path):
    return ["train", f"data_dir={synth_data_dir}", f"results_dir={tmp_path / 'results'}", *QUICK]


def _run_dir(tmp_path):
    (run,) = (tmp_path / "results" / L.RUNS_DIR).iterdir()
    return run


def _fail_in_epoch_2(capsys, args, monkeypatch):
    """Train until a crash in epoch 2: run.json failed, checkpoint.pt and metrics.csv hold epoch 1."""
    from bnexp import train as T

    real = T.train_epoch

    def crash_in_epoch_2(s, cfg, epoch, *rest, **kw):
        if epoch == 2:
            raise RuntimeError("simulated crash")
        return real(s, cfg, epoch, *rest, **kw)

    with monkeypatch.context() as m:
        m.setattr(T, "train_epoch", crash_in_epoch_2)
        code, _, err = bnexp(capsys, *args)
    assert code == 1 and "simulated crash" in err
    run = args[2].split("=", 1)[1]
    (run,) = (Path(run) / L.RUNS_DIR).iterdir()
    assert json.loads((run / L.INFO).read_text())["epochs_completed"] == 1 and len(metrics_rows(run)) == 2


def _warnings(err):
    lines = err.splitlines()
    assert all(line.startswith("warning: ") for line in lines), err
    return lines


@pytest.mark.parametrize("content", ["42", '{"status": "completed", ', "[1, 2]", "\xff\xfe"])
def test_damaged_run_json_of_a_finished_run_resumes_from_the_checkpoint(capsys, args, tmp_path, clean_run, content):
    """run.json that is not a JSON object used to block the run for good (AttributeError)."""
    assert bnexp(capsys, *args)[0] == 0
    run = _run_dir(tmp_path)
    (run / L.INFO).write_bytes(content.encode("latin1"))
    code, out, err = bnexp(capsys, *args)
    assert code == 0 and out.startswith("completed ") and "resumed after epoch 2" in out
    (line,) = _warnings(err)
    assert line.startswith(f"warning: {run / 'run.json'} ")
    assert line.endswith("treating the run as unfinished: resuming it from checkpoint.pt after epoch 2")
    info = json.loads((run / L.INFO).read_text())
    assert info["status"] == L.COMPLETED and info["epochs_completed"] == 2
    assert metrics_rows(run) == metrics_rows(clean_run)
    code, out, err = bnexp(capsys, *args)
    assert code == 0 and out.startswith("skipped ") and err == ""


def test_damaged_run_json_of_an_unfinished_run_resumes_it(capsys, args, tmp_path, monkeypatch, clean_run):
    _fail_in_epoch_2(capsys, args, monkeypatch)
    run = _run_dir(tmp_path)
    (run / L.INFO).write_text("42\n")
    code, out, err = bnexp(capsys, *args)
    assert code == 0 and "resumed after epoch 1" in out
    assert _warnings(err)[0].endswith("holds 42, not a JSON object; treating the run as unfinished: "
                                      "resuming it from checkpoint.pt after epoch 1")
    assert metrics_rows(run) == metrics_rows(clean_run)
    assert (run / L.STEPS).read_text() == (clean_run / L.STEPS).read_text()


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_damaged_activations_are_recorded_again_from_the_resume(capsys, args, tmp_path, monkeypatch, clean_run, how):
    """A truncated activations.npz used to make every later `bnexp train` of the run fail (BadZipFile)."""
    _fail_in_epoch_2(capsys, args, monkeypatch)
    run = _run_dir(tmp_path)
    synth.corrupt(run / L.ACTIVATIONS, how)
    code, out, err = bnexp(capsys, *args)
    assert code == 0 and "resumed after epoch 1" in out
    (line,) = _warnings(err)
    assert line.startswith(f"warning: {run / 'activations.npz'} is unreadable (BadZipFile: ")
    assert line.endswith("removed it; recording the activation probes again from epoch 2 "
                         "(those up to epoch 1 are lost; --force retrains)")
    with np.load(run / L.ACTIVATIONS) as z:
        epochs = {k.split("/")[0] for k in z.files}
    assert epochs == {"e2"}
    assert metrics_rows(run) == metrics_rows(clean_run)


def _bad_checkpoint(path, what):
    import torch

    if what == "truncated":
        synth.corrupt(path, "truncate")
    elif what == "not a dict":
        torch.save(42, path)
    else:  # loads, same config, but cannot be restored: the model's weights missing, epoch counter off
        ckpt = torch.load(path, weights_only=False)
        if what == "no weights":
            ckpt["model"] = {}
        else:
            ckpt["state"]["epoch"] = 5
        torch.save(ckpt, path)


@pytest.mark.parametrize("what", ["truncated", "not a dict", "no weights", "inconsistent state"])
def test_damaged_checkpoint_retrains_from_scratch(capsys, args, tmp_path, monkeypatch, clean_run, what):
    _fail_in_epoch_2(capsys, args, monkeypatch)
    run = _run_dir(tmp_path)
    _bad_checkpoint(run / L.CHECKPOINT, what)
    code, out, err = bnexp(capsys, *args)
    assert code == 0 and out.startswith("completed ") and "resumed" not in out
    (line,) = _warnings(err)
    assert line.startswith(f"warning: {run / 'checkpoint.pt'} ")
    assert line.endswith("; retraining the run from scratch (its other files were removed)")
    assert not (run / L.ERROR_LOG).exists()  # the failed attempt's files are gone
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    # the same numbers as a clean run: a failed restore put the fresh model, optimiser and RNG back
    assert metrics_rows(run) == metrics_rows(clean_run)
    assert (run / L.STEPS).read_text() == (clean_run / L.STEPS).read_text()


def test_report_skips_damaged_activations_with_a_warning(capsys, args, tmp_path):
    """A truncated activations.npz used to crash `bnexp report` with a traceback."""
    assert bnexp(capsys, *args)[0] == 0
    run = _run_dir(tmp_path)
    synth.corrupt(run / L.ACTIVATIONS, "truncate")
    assert bnexp(capsys, *args)[1].startswith("skipped ")  # finished: not retrained by itself
    code, out, err = bnexp(capsys, "report", "--results-dir", tmp_path / "results")
    assert code == 0 and "Traceback" not in err
    (line,) = [w for w in err.splitlines() if L.ACTIVATIONS in w]
    assert line == (f"warning: partial {run}: activations.npz unreadable (BadZipFile); activation figure "
                    "omitted (`bnexp train ... --force` retrains the run to record it again)")


def test_report_survives_activations_damaged_inside(tmp_path):
    """A flipped byte inside a member passes the zip-directory check; the figure reader skips it."""
    from bnexp.report.figures import read_activations
    from runfactory import fake_run

    from bnexp.report import write_report

    runs = [fake_run(tmp_path, seed=s, bn=bn) for s in (0, 1) for bn in ("on", "off")]
    for run in runs[:2]:
        synth.corrupt(run / L.ACTIVATIONS, "flip")
    assert read_activations(runs[0]) == {}
    assert write_report(tmp_path).summary


def test_report_names_a_run_json_that_is_not_an_object(tmp_path):
    from runfactory import fake_run

    from bnexp.report.load import load_runs

    fake_run(tmp_path, seed=0)
    bad = fake_run(tmp_path, seed=1)
    (bad / L.INFO).write_text("42")
    (line,) = [w for w in load_runs(tmp_path).warnings if bad.name in w]
    assert line.startswith(f"skipped {bad}: run.json holds 42, not a JSON object")


# ======================================================================== a full disk

def _fill_disk_at(monkeypatch, nth_checkpoint: int, stays_full: bool):
    """From the nth write of checkpoint.pt on, atomic writes fail as on a full disk: only that one,
    or (stays_full) every later one too. Event-file appends are not atomic writes and still work."""
    from bnexp import tracking

    real, seen = tracking.atomic_write_bytes, {"checkpoints": 0, "full": False}

    def write(path, data):
        if path.name == L.CHECKPOINT:
            seen["checkpoints"] += 1
            seen["full"] = seen["checkpoints"] >= nth_checkpoint
        if seen["full"]:
            if not stays_full:
                seen["full"] = path.name != L.CHECKPOINT
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr(tracking, "atomic_write_bytes", write)


def _checkpoint_epoch(run) -> int:
    import torch

    return torch.load(run / L.CHECKPOINT, weights_only=False)["state"]["epoch"]


def test_full_disk_at_a_checkpoint_records_the_last_checkpoint(capsys, args, tmp_path, monkeypatch, clean_run):
    """run.json said epochs_completed 2 with epoch-2 finals while metrics.csv and the checkpoint held epoch 1."""
    with monkeypatch.context() as m:
        _fill_disk_at(m, 2, stays_full=False)  # epoch 2's checkpoint does not fit; smaller files do
        code, out, err = bnexp(capsys, *args)
    run = _run_dir(tmp_path)
    assert code == 1 and out == "" and err.count("\n") == 1
    assert err.startswith(f"failed {run.name}: disk full (ENOSPC) writing {run / 'checkpoint.pt'}: "
                          "No space left on device; free space there and rerun the same command")
    assert err.rstrip().endswith(f"; traceback in {run / 'error.log'}") and "ENOSPC" not in (run / L.ERROR_LOG).name
    assert "No space left on device" in (run / L.ERROR_LOG).read_text()
    info = json.loads((run / L.INFO).read_text())
    assert info["status"] == L.FAILED and info["epochs_completed"] == 1 == _checkpoint_epoch(run)
    assert len(metrics_rows(run)) == 2  # header + epoch 1
    epoch1 = dict(zip(metrics_rows(run)[0].split(","), metrics_rows(run)[1].split(",")))
    assert info["final"]["train_loss"] == float(epoch1["train_loss"])
    assert (run / L.STEPS).read_text().count("\n") == 1 + 8  # 512 / 64 steps of epoch 1
    code, out, _ = bnexp(capsys, *args)  # space again: resumes from the checkpoint
    assert code == 0 and "resumed after epoch 1" in out
    assert metrics_rows(run) == metrics_rows(clean_run)


def test_disk_that_stays_full_never_points_to_an_empty_error_log(capsys, args, tmp_path, monkeypatch, clean_run):
    """The message pointed to an error.log of 0 bytes; here an earlier attempt's error.log exists too."""
    _fail_in_epoch_2(capsys, args, monkeypatch)  # leaves error.log (simulated crash) and a checkpoint of epoch 1
    run = _run_dir(tmp_path)
    assert "simulated crash" in (run / L.ERROR_LOG).read_text()
    with monkeypatch.context() as m:
        _fill_disk_at(m, 1, stays_full=True)  # this attempt's first checkpoint (epoch 2) fills the disk
        code, out, err = bnexp(capsys, *args)
    assert code == 1 and err.count("\n") == 1
    assert err == (f"failed {run.name}: disk full (ENOSPC) writing {run / 'checkpoint.pt'}: No space left on "
                   "device; free space there and rerun the same command to resume from the last finished epoch\n")
    assert not (run / L.ERROR_LOG).exists()  # neither empty nor the earlier attempt's traceback
    info = json.loads((run / L.INFO).read_text())  # this attempt's start record: could not be updated
    assert info["status"] == L.RUNNING and info["epochs_completed"] == 1 == _checkpoint_epoch(run)
    assert len(metrics_rows(run)) == 2
    code, out, _ = bnexp(capsys, *args)
    assert code == 0 and "resumed after epoch 1" in out
    assert metrics_rows(run) == metrics_rows(clean_run)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 16 MiB tmpfs (root only); skipped where mounting is not allowed."""
    import subprocess

    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def _fill(path):
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC


@pytest.mark.parametrize("when", ["after checkpoint 1", "during epoch 2"])
def test_really_full_disk_mid_run(capsys, synth_data_dir, small_tmpfs, monkeypatch, clean_run, when):
    """A real ENOSPC: a file fills the tmpfs holding the results, right after epoch 1's checkpoint
    (metrics.csv and run.json of epoch 1 then fail) or while epoch 2 trains (its events, checkpoint...)."""
    from bnexp import train as T

    results, filler = small_tmpfs / "results", small_tmpfs / "filler"
    args = ["train", f"data_dir={synth_data_dir}", f"results_dir={results}", *QUICK]
    real_checkpoint, real_epoch = T._checkpoint, T.train_epoch

    def checkpoint(rd, s, cfg, state, *rest, **kw):
        real_checkpoint(rd, s, cfg, state, *rest, **kw)
        if state.epoch == 1 and when == "after checkpoint 1":
            _fill(filler)

    def train_epoch(s, cfg, epoch, *rest, **kw):
        if epoch == 2 and when == "during epoch 2":
            _fill(filler)
        return real_epoch(s, cfg, epoch, *rest, **kw)

    with monkeypatch.context() as m:
        m.setattr(T, "_checkpoint", checkpoint)
        m.setattr(T, "train_epoch", train_epoch)
        code, out, err = bnexp(capsys, *args)
    (run,) = (results / L.RUNS_DIR).iterdir()
    assert code == 1 and err.count("\n") == 1
    assert err.startswith(f"failed {run.name}: disk full (ENOSPC) writing {run}/"), err
    assert "free space there and rerun the same command to resume from the last finished epoch" in err
    log = run / L.ERROR_LOG
    assert ("traceback in" in err) == log.exists() and (not log.exists() or log.stat().st_size > 0)
    info = json.loads((run / L.INFO).read_text())
    assert info["epochs_completed"] <= _checkpoint_epoch(run) == 1
    assert not (run / L.METRICS).exists() or len(metrics_rows(run)) - 1 <= 1
    filler.unlink()
    code, out, err = bnexp(capsys, *args)
    assert code == 0 and "resumed after epoch 1" in out, err
    assert metrics_rows(run) == metrics_rows(clean_run)
