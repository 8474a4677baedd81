"""bnexp.tblog: TensorBoard event files written without SummaryWriter, read back by TensorBoard itself."""

import os

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
from torch.utils.tensorboard.summary import histogram as torch_histogram

from bnexp import tblog
from bnexp.tblog import TensorBoardLog, histogram_summary


def load(path, kind="scalars"):
    return EventAccumulator(str(path), size_guidance={kind: 0}).Reload()


def points(path, tag):
    return [(e.step, e.value) for e in load(path).Scalars(tag)]


def test_crc_is_tensorboards_masked_crc32c():
    for n in (0, 1, 7, 8, 45, 1000):
        data = os.urandom(n)
        assert tblog._masked_crc(data) == masked_crc32c(data)


def test_step_scalars_one_event_per_step_read_back_by_tensorboard(tmp_path):
    tb = TensorBoardLog(tmp_path, purge_step=None)
    loss, acc = [2.0, 1.5, 1.25, 1.0], [0.1, 0.3, 0.5, 0.7]
    tb.step_scalars(11, {"batch/loss": loss, "batch/acc": acc, "batch/lr": [0.1] * 4})
    tb.scalars({"epoch/test_acc": 0.5}, 14)
    tb.close()
    assert points(tmp_path, "batch/loss") == [(11 + i, v) for i, v in enumerate(loss)]
    assert [s for s, _ in points(tmp_path, "batch/acc")] == [11, 12, 13, 14]
    assert points(tmp_path, "epoch/test_acc") == [(14, 0.5)]
    files = list(tmp_path.glob("events.out.tfevents.*"))
    assert len(files) == 1
    events = [e for e in EventFileLoader(str(files[0])).Load() if e.HasField("summary")]
    assert [len(e.summary.value) for e in events] == [3, 3, 3, 3, 1]  # a step's scalars share one event


def test_events_reach_the_file_at_flush(tmp_path):
    tb = TensorBoardLog(tmp_path, purge_step=None)
    (f,) = tmp_path.glob("events.out.tfevents.*")
    size = f.stat().st_size
    assert size > 0  # the file-version header is written at once
    tb.scalars({"a": 1.0}, 1)
    assert f.stat().st_size == size
    tb.flush()
    assert f.stat().st_size > size
    assert points(tmp_path, "a") == [(1, 1.0)]


def test_a_resumed_attempt_hides_what_the_killed_one_wrote_after_its_checkpoint(tmp_path, monkeypatch):
    # The resumed process starts within the same second, with a lower pid ('1000' < '999' as text):
    # its file must still sort after the killed one's, since TensorBoard reads files in name order.
    now = [1795000000.2]
    monkeypatch.setattr(tblog.time, "time", lambda: now[0])
    monkeypatch.setattr(tblog.os, "getpid", lambda: 999)
    first = TensorBoardLog(tmp_path, purge_step=None)
    first.step_scalars(1, {"loss": [1.0] * 10})  # steps 1-10; the checkpoint holds steps 1-5
    first.flush()  # then the process is killed: no close()
    now[0], pid = 1795000000.7, 1000
    monkeypatch.setattr(tblog.os, "getpid", lambda: pid)
    monkeypatch.setattr(tblog, "_file_ids", iter([0]))
    second = TensorBoardLog(tmp_path, purge_step=6)
    second.step_scalars(6, {"loss": [2.0] * 5})
    second.close()
    assert points(tmp_path, "loss") == [(s, 1.0) for s in range(1, 6)] + [(s, 2.0) for s in range(6, 11)]


def test_histogram_has_the_moments_and_counts_of_torchs(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(64, 6, 10, 10) * 3 + 1
    ours = histogram_summary("h", x).value[0].histo
    ref = torch_histogram("h", x.numpy(), "auto").value[0].histo
    assert ours.num == ref.num == x.numel()
    assert (ours.min, ours.max) == (ref.min, ref.max)
    assert ours.sum == pytest.approx(ref.sum, rel=1e-5, abs=1e-2)
    assert ours.sum_squares == pytest.approx(ref.sum_squares, rel=1e-5)
    assert sum(ours.bucket) == x.numel() and ours.bucket[0] == 0
    limits = np.array(ours.bucket_limit)
    assert len(limits) == len(ours.bucket) == tblog.HISTOGRAM_BUCKETS + 1
    assert np.all(np.diff(limits) > 0) and limits[0] == ours.min and limits[-1] == pytest.approx(ours.max)
    # the counts are those of numpy's uniform buckets over [min, max]
    expected, _ = np.histogram(x.numpy().astype(np.float64), bins=limits)
    assert np.abs(np.array(ours.bucket[1:]) - expected).sum() <= 2  # float32 vs float64 edge rounding


def test_histogram_of_special_tensors(tmp_path):
    mixed = histogram_summary("h", torch.tensor([1.0, float("nan"), 3.0, float("inf"), -float("inf")])).value[0].histo
    assert (mixed.num, mixed.min, mixed.max, mixed.sum) == (2, 1.0, 3.0, 4.0)
    assert histogram_summary("h", torch.tensor([float("nan"), float("inf")])) is None
    const = histogram_summary("h", torch.full((5, 3), 2.0)).value[0].histo
    assert (const.num, const.min, const.max) == (15, 2.0, 2.0) and sum(const.bucket) == 15
    bf16 = histogram_summary("h", torch.randn(100).bfloat16()).value[0].histo
    assert bf16.num == 100
    tb = TensorBoardLog(tmp_path, purge_step=None)
    tb.histogram("only/nan", torch.tensor([float("nan")]), 1)  # nothing to show: no event, no error
    tb.histogram("ok", torch.randn(50), 1)
    tb.close()
    assert load(tmp_path, "histograms").Tags()["histograms"] == ["ok"]


def test_hparams_land_in_the_runs_own_file_without_an_experiment(tmp_path):
    from tensorboard.plugins.hparams import metadata as hp_metadata

    tb = TensorBoardLog(tmp_path, purge_step=None)
    tb.hparams({"lr": 0.1, "model": "lenet5", "momentum": None}, group_name="bn lr=0.1")
    tb.session_end("completed")
    tb.close()
    assert list(tmp_path.iterdir()) == list(tmp_path.glob("events.out.tfevents.*"))  # no hparams/ folder
    acc = load(tmp_path)
    assert "_hparams_/experiment" not in acc.summary_metadata  # TensorBoard infers it from all runs
    content = acc.summary_metadata["_hparams_/session_start_info"].plugin_data.content
    start = hp_metadata.parse_session_start_info_plugin_data(content)
    assert start.group_name == "bn lr=0.1"
    assert {k: v.WhichOneof("kind") for k, v in start.hparams.items()} == \
        {"lr": "number_value", "model": "string_value", "momentum": "string_value"}
