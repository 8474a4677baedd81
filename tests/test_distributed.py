"""bnexp.distributed: shards of the global batch, torchrun's environment, checks, the timeout."""

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bnexp import distributed as D
from bnexp import preflight
from bnexp.config import compose
from bnexp.errors import BnexpError
from bnexp.train import resolve_device


def test_shards_of_a_batch_cover_it_once_in_order():
    for size, world in ((8, 2), (7, 2), (9, 4), (2, 4)):
        bounds = [D.shard_bounds(size, r, world) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == size
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # contiguous, in rank order
        assert max(hi - lo for lo, hi in bounds) - min(hi - lo for lo, hi in bounds) <= 1


def test_partial_batch_too_small_for_every_process_is_dropped():
    assert D.global_batch_sizes([8, 8, 3], 8, 2, min_shard=2) == [8, 8]  # a shard of 1: per-process BN fails on it
    assert D.global_batch_sizes([8, 8, 4], 8, 2, min_shard=2) == [8, 8, 4]
    assert D.global_batch_sizes([8, 8, 3], 8, 2) == [8, 8, 3]  # 2 + 1: every process has a sample
    assert D.global_batch_sizes([8, 8, 3], 8, 4) == [8, 8]  # 1 + 1 + 1 + 0
    assert D.global_batch_sizes([8, 8, 3], 8, 1, min_shard=2) == [8, 8, 3]  # one process: data.batch_sizes' rule


def test_loss_weights_make_the_average_the_global_mean():
    assert D.loss_weight(8, 0, 2) == D.loss_weight(8, 1, 2) == 1.0  # equal shards: the mean as it is
    assert D.loss_weight(8, 0, 1) == 1.0
    # 7 samples as 4 + 3: (mean_0 * w_0 + mean_1 * w_1) / 2 = (sum_0 + sum_1) / 7
    assert D.loss_weight(7, 0, 2) / 2 == pytest.approx(4 / 7) and D.loss_weight(7, 1, 2) / 2 == pytest.approx(3 / 7)


def test_place_from_torchrun_environment():
    assert D.from_env({}) == D.Place(0, 1, 0) and D.from_env({}).main
    place = D.from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert place == D.Place(1, 2, 1) and not place.main
    with pytest.raises(BnexpError, match="must be integers"):
        D.from_env({"RANK": "x", "WORLD_SIZE": "2"})


def test_split_and_gpus_refused():
    with pytest.raises(BnexpError, match="batch_size=8 does not divide by nproc=3"):
        D.check_split(3, 8)
    D.check_split(2, 8)
    D.check_gpus(4, "cpu", torch.device("cpu"))  # CPU processes: any number


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine")
def test_check_gpus_cuda_without_gpus():
    with pytest.raises(BnexpError, match="CUDA is not available"):
        preflight.check(compose(["nproc=2", "device=cuda"]))  # train.resolve_device, before check_gpus
    D.check_gpus(2, "auto", resolve_device("auto"))  # auto on a CPU machine: CPU processes


def test_port_in_use_is_refused():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(BnexpError, match=f"MASTER_PORT={port} on 127.0.0.1 is in use"):
            D.rendezvous({"MASTER_PORT": str(port)})
    addr, port = D.rendezvous({})  # unset: a free port
    assert addr == "127.0.0.1" and 0 < port < 65536
    assert D.rendezvous({"MASTER_PORT": str(port)}) == ("127.0.0.1", port)
    with pytest.raises(BnexpError, match="must be a port number"):
        D.rendezvous({"MASTER_PORT": "http"})


def test_timeout_setting():
    assert D.timeout_s({}) == D.DEFAULT_TIMEOUT_S
    assert D.timeout_s({D.TIMEOUT_ENV: "2.5"}) == 2.5
    with pytest.raises(BnexpError, match="positive number of seconds"):
        D.timeout_s({D.TIMEOUT_ENV: "0"})


def _hung_peer(rank, port, out):
    os.environ.update({D.TIMEOUT_ENV: "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    place = D.Place(rank, 2, rank)
    D.init(place, "cpu")
    if rank == 1:  # hangs: never joins the collective (and stays alive until rank 0 has given up)
        deadline = time.time() + 120
        while not os.path.exists(out) and time.time() < deadline:
            time.sleep(0.1)
        return
    t = time.perf_counter()
    try:
        dist.all_reduce(torch.ones(2))
    except RuntimeError as e:
        err = D.timeout_error(e, place)
        with open(out + ".tmp", "w") as f:
            f.write(f"{time.perf_counter() - t:.1f} {err}")
        os.replace(out + ".tmp", out)
        os._exit(0)  # gloo's threads may abort the interpreter's exit after a timed-out operation


@pytest.mark.slow
def test_hung_peer_fails_with_one_line_after_the_timeout(tmp_path):
    out = tmp_path / "out"
    mp.spawn(_hung_peer, args=(D.free_port(), str(out)), nprocs=2, join=True)
    seconds, message = out.read_text().split(" ", 1)
    assert 1.5 < float(seconds) < 30  # 2 s, and a loaded machine
    assert message.startswith("rank 0 of 2 lost the other processes (no answer within 2 s: one of them hung or died")


def test_torchrun_sets_nproc_to_its_world_size():
    two = D.Place(1, 2, 1)
    assert D.torchrun_overrides(["lr=0.1"], two) == ["lr=0.1", "nproc=2"]
    assert D.torchrun_overrides(["nproc=2"], two) == ["nproc=2"]
    assert D.torchrun_overrides(["lr=0.1"], D.Place()) == ["lr=0.1"]
    with pytest.raises(BnexpError, match="nproc=3 but torchrun started 2 processes"):
        D.torchrun_overrides(["nproc=3"], two)


def test_ranks_above_zero_write_nothing(tmp_path):
    from bnexp import ddp
    from bnexp.tracking import RunDir

    rd = RunDir(tmp_path / "results", "some-run")
    muted = ddp.Muted(rd)
    assert muted.run_id == "some-run" and muted.path == rd.path and muted.acquire()
    muted.write_metrics([{"epoch": 1}])
    muted.save_checkpoint({})
    muted.clear()
    assert muted.read_info() is None and muted.read_activations() == {} and muted.load_checkpoint() is None
    ddp.NullLog().scalars({"a": 1.0}, 3)
    assert not (tmp_path / "results").exists()
    with pytest.raises(AttributeError):
        muted.no_such_thing


def test_one_process_sync_model_is_converted_not_wrapped():
    from bnexp import ddp, models
    from bnexp.nn.syncbatchnorm import SyncBatchNorm2d

    model = models.build_model("lenet5", "bn", num_classes=10, in_channels=1, image_size=28)
    run_model, step_model = ddp.models(model, True, D.Place(), torch.device("cpu"))
    assert run_model is step_model and isinstance(dict(run_model.norm_layers())["conv1.norm"], SyncBatchNorm2d)
