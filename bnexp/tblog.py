"""TensorBoard logging for one run: per-step and per-epoch scalars, activation histograms, hparams.

Why not `torch.utils.tensorboard.SummaryWriter`? It hands every event to a writer thread through
a 10-slot queue, and that thread frames each record with tensorboard's pure-Python CRC32C. On
this 2-core CPU a step's three scalars cost ~0.4 ms that way: ~100 ms for a 235-step LeNet5
epoch, about as long as the whole epoch takes on a GPU with CUDA graphs. Here the events are the
same protobufs (scalars as `simple_value`s, as SummaryWriter writes them; histograms
from torch's `summary` helpers), one event per step holds that step's scalars, and the records
are buffered and appended to the file in one write per `flush()` (once per epoch) from the
training thread: no thread, no queue.

Hparams: see `TensorBoardLog.hparams`.

Histograms are reduced on the tensor's device (min, max, sum, sum of squares, and 64 uniform
buckets with `torch.histc`), so ~70 numbers reach the host instead of the whole activation.

One event file per attempt. A resumed attempt starts its file with a SessionLog START at its
first step (as SummaryWriter's purge_step does): TensorBoard then drops the points a killed
attempt wrote after its last checkpoint, so no step is shown twice.
"""

from __future__ import annotations

import itertools
import math
import os
import socket
import struct
import time
from pathlib import Path

import torch
from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.hparams import api_pb2
from tensorboard.plugins.hparams import metadata as hp_metadata
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData, SessionEndInfo, SessionStartInfo
from torch.utils.tensorboard import summary as tb_summary

from . import layout

try:  # Google's C implementation: ~100x faster than tensorboard's pure-Python CRC32C
    from google_crc32c import value as _crc32c

    def _masked_crc(data: bytes) -> int:
        x = _crc32c(data)
        return (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF
except ImportError:  # e.g. a machine that got torch and tensorboard only: correct, just slower
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as _masked_crc

HISTOGRAM_BUCKETS = 64
_file_ids = itertools.count()


def record(data: bytes) -> bytes:
    """TFRecord framing: length, masked CRC32C of the length, data, masked CRC32C of the data."""
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", _masked_crc(header)) + data + struct.pack("<I", _masked_crc(data))


class EventFile:
    """An append-only TensorBoard event file, buffered in memory until `flush()`."""

    def __init__(self, logdir: Path):
        logdir.mkdir(parents=True, exist_ok=True)
        # A fixed-width wall-clock stamp first, so a later attempt's file sorts after an earlier
        # one's (TensorBoard reads a run's files in name order, which the purge relies on).
        name = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}.{next(_file_ids)}"
        self.path = logdir / name
        self._pending: list[bytes] = []
        self.add(Event(wall_time=time.time(), file_version="brain.Event:2"))

    def add(self, event: Event) -> None:
        self._pending.append(record(event.SerializeToString()))

    def add_summary(self, summary: Summary, step: int) -> None:
        self.add(Event(wall_time=time.time(), step=step, summary=summary))

    def flush(self) -> None:
        """Append the pending records. A failed append (a full disk) is cut off again, so the file
        never ends in a torn record, and raises an OSError naming the file; the records stay pending."""
        if self._pending:
            with open(self.path, "ab", buffering=0) as f:
                start = f.seek(0, os.SEEK_END)
                data = memoryview(b"".join(self._pending))
                try:
                    while data:
                        data = data[f.write(data):]
                except OSError as e:
                    f.truncate(start)
                    raise OSError(e.errno, e.strerror, str(self.path)) from e
            self._pending.clear()


def _scalars(values: dict[str, float]) -> Summary:
    return Summary(value=[Summary.Value(tag=tag, simple_value=float(v)) for tag, v in values.items()])


def _moments(t: torch.Tensor) -> list[float]:
    """[min, max, sum, sum of squares] of a 1-d float tensor, in one transfer to the host."""
    lo, hi = torch.aminmax(t)
    return torch.stack([lo, hi, t.sum(), t.square().sum()]).double().tolist()


@torch.no_grad()
def histogram_summary(tag: str, values: torch.Tensor) -> Summary | None:
    """A TensorBoard histogram of the finite entries of `values`, reduced on their device; None if
    there are none. Bucket layout as torch's `summary.histogram`: a leading empty bucket, then
    one bucket per [edge_i, edge_i+1]."""
    t = values.detach().float().reshape(-1)
    stats = _moments(t)
    if not (math.isfinite(stats[0]) and math.isfinite(stats[1])):  # NaN or inf somewhere: drop those
        t = t[torch.isfinite(t)]
        if t.numel() == 0:
            return None
        stats = _moments(t)
    lo, hi = stats[0], stats[1]
    if hi <= lo:  # a constant tensor: one bucket around its value
        lo, hi = lo - 0.5, hi + 0.5
    counts = torch.histc(t, bins=HISTOGRAM_BUCKETS, min=lo, max=hi).tolist()
    edges = torch.linspace(lo, hi, HISTOGRAM_BUCKETS + 1, dtype=torch.float64).tolist()
    return tb_summary.histogram_raw(tag, stats[0], stats[1], t.numel(), stats[2], stats[3],
                                    edges, [0.0] + counts)


class TensorBoardLog:
    """Scalars, histograms and hparams for one run; resumable without duplicate points."""

    def __init__(self, path: Path, purge_step: int | None):
        self.path = path
        self.file = EventFile(path)
        if purge_step is not None:  # hides what a killed attempt wrote after its last checkpoint
            self.file.add(Event(wall_time=time.time(), step=purge_step, session_log=SessionLog(status=SessionLog.START)))
        self.file.flush()

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.file.add_summary(_scalars(values), step)

    def step_scalars(self, first_step: int, columns: dict[str, list[float]]) -> None:
        """Per-step scalars: columns[tag][i] is the value at step first_step + i (one event per step)."""
        tags = list(columns)
        for i, row in enumerate(zip(*columns.values())):
            self.scalars(dict(zip(tags, row)), first_step + i)

    def histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        hist = histogram_summary(tag, values)
        if hist is not None:
            self.file.add_summary(hist, step)

    def hparams(self, hparams: dict, group_name: str = "") -> None:
        """The hparams plugin's session-start summary, in this run's own event file (one TensorBoard
        run per bnexp run, no `hparams/` subfolder). No experiment summary is written: TensorBoard
        then builds the experiment from every run's session start, so `differs` is true exactly for
        the keys that vary among the runs under the logdir, whichever sweeps wrote them; and its
        metrics are the runs' scalar tags (last value each), so no single-point copies are needed.
        `group_name` is the Trial ID the table shows (the run's directory name when empty)."""
        start = SessionStartInfo(group_name=group_name, start_time_secs=time.time())
        for k, v in hparams.items():
            if isinstance(v, bool):
                start.hparams[k].bool_value = v
            elif isinstance(v, (int, float)):
                start.hparams[k].number_value = v
            else:
                start.hparams[k].string_value = str(v)
        self._hparams_summary(hp_metadata.SESSION_START_INFO_TAG, HParamsPluginData(session_start_info=start))
        self.file.flush()

    def session_end(self, status: str) -> None:
        """Marks the session ended: completed -> success, diverged -> failure."""
        code = api_pb2.STATUS_SUCCESS if status == layout.COMPLETED else api_pb2.STATUS_FAILURE
        end = SessionEndInfo(status=code, end_time_secs=time.time())
        self._hparams_summary(hp_metadata.SESSION_END_INFO_TAG, HParamsPluginData(session_end_info=end))

    def _hparams_summary(self, tag: str, data: HParamsPluginData) -> None:
        data.version = hp_metadata.PLUGIN_DATA_VERSION
        meta = hp_metadata.create_summary_metadata(data)
        self.file.add_summary(Summary(value=[Summary.Value(tag=tag, metadata=meta)]), 0)

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.flush()
