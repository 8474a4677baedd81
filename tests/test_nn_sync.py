"""bnexp.nn.syncbatchnorm: synchronised BN on 2 CPU processes (gloo) against BN on the concatenated batch,
bit-equality with BN in one process, the state dict, and the converter.

Tolerances of the 2-process parity (the reduction order differs from one process's): float64
rtol 1e-10 / atol 1e-11, float32 rtol 1e-5 / atol 2e-5 (outputs and gradients are O(1)).
"""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import bnexp.nn
from bnexp import models
from bnexp.nn import functional as bnF
from bnexp.nn.syncbatchnorm import SyncBatchNorm1d, SyncBatchNorm2d, convert_sync_batchnorm

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-11), torch.float32: dict(rtol=1e-5, atol=2e-5)}
# (dims, shape of the global batch, shard sizes, dtype, layer keywords, mean offset of the input)
CASES = [
    (2, (8, 3, 5, 5), (4, 4), torch.float64, {}, 3.0),
    (2, (8, 3, 5, 5), (5, 3), torch.float32, dict(momentum=None), 3.0),
    (1, (10, 6), (7, 3), torch.float32, dict(affine=False), 1e4),  # 1e4 + noise: a naive E[x^2] - E[x]^2 fails
    (1, (9, 4, 3), (1, 8), torch.float64, dict(biased_running_var=True), -2.0),  # a shard of one sample
    (1, (6, 5), (6, 0), torch.float32, {}, 0.5),  # an empty shard
]
STEPS = 3


def _layer(dims, c, dtype, kwargs):
    return (bnexp.nn.BatchNorm1d if dims == 1 else bnexp.nn.BatchNorm2d)(c, **kwargs).to(dtype)


def _batch(shape, dtype, offset, gen):
    view = (1, shape[1]) + (1,) * (len(shape) - 2)
    scale = 0.5 + 2 * torch.rand(view, generator=gen, dtype=torch.float64)
    noise = torch.randn(shape, generator=gen, dtype=torch.float64)
    return (offset + (noise * scale if abs(offset) < 100 else 1e-2 * noise)).to(dtype)


def _check_case(rank, dims, shape, shards, dtype, kwargs, offset):
    gen = torch.Generator().manual_seed(len(shape) * 100 + shards[0])
    ref = _layer(dims, shape[1], dtype, kwargs)
    if ref.affine:  # non-trivial affine parameters
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5, generator=gen)
            ref.bias.uniform_(-1, 1, generator=gen)
    synced = convert_sync_batchnorm(copy.deepcopy(ref))
    lo, hi = sum(shards[:rank]), sum(shards[:rank + 1])
    tol = TOL[dtype]
    for step in range(STEPS):
        x, g = _batch(shape, dtype, offset, gen), torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        x_ref, x_sync = x.clone().requires_grad_(), x[lo:hi].clone().requires_grad_()
        y_ref, y_sync = ref(x_ref), synced(x_sync)
        y_ref.backward(g)
        y_sync.backward(g[lo:hi])
        what = f"rank {rank} step {step} {dims}d {dtype} {kwargs}"
        torch.testing.assert_close(y_sync, y_ref[lo:hi].detach(), **tol, msg=lambda m: f"output, {what}: {m}")
        torch.testing.assert_close(x_sync.grad, x_ref.grad[lo:hi], **tol, msg=lambda m: f"input grad, {what}: {m}")
        if ref.affine:  # the local sums add up to the global ones (DDP averages them in training)
            for name in ("weight", "bias"):
                total = getattr(synced, name).grad.clone()
                dist.all_reduce(total)
                torch.testing.assert_close(total, getattr(ref, name).grad, **tol, msg=lambda m: f"{name} grad, {what}: {m}")
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(synced, name), getattr(ref, name), **tol,
                                       msg=lambda m: f"{name}, {what}: {m}")
        for layer in (ref, synced):
            layer.zero_grad()
    synced.eval()  # eval mode: the running statistics, as BN
    x = _batch(shape, dtype, offset, gen)
    torch.testing.assert_close(synced(x[lo:hi]), ref.eval()(x)[lo:hi], **tol)


def _worker(rank, world, store):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        with bnF.use_backend("eager"):
            for case in CASES:
                _check_case(rank, *case)
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_bn_on_the_concatenated_batch(tmp_path):
    """Outputs, input gradients, summed weight/bias gradients and running statistics of each process
    equal BN's on the whole batch, over 3 training steps, then in eval mode (5 cases, one spawn)."""
    mp.spawn(_worker, args=(2, str(tmp_path / "store")), nprocs=2, join=True)


def _train_steps(layer, xs, gs):
    out = []
    for x, g in zip(xs, gs):
        x = x.clone().requires_grad_()
        y = layer(x)
        y.backward(g)
        out += [y.detach(), x.grad, layer.weight.grad.clone(), layer.bias.grad.clone()]
        layer.zero_grad()
    return out + [b.clone() for b in layer.buffers()]


@pytest.mark.parametrize("process_group", [False, True])
def test_one_process_is_bn_bit_for_bit(tmp_path, process_group):
    """Without a process group, and in a process group of one, the layer computes exactly what BN computes."""
    gen = torch.Generator().manual_seed(0)
    xs = [_batch((6, 4, 3, 3), torch.float32, 3.0, gen) for _ in range(3)]
    gs = [torch.randn((6, 4, 3, 3), generator=gen) for _ in range(3)]
    bn = bnexp.nn.BatchNorm2d(4)
    synced = SyncBatchNorm2d(4)
    if process_group:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with bnF.use_backend("eager"):
            expected, got = _train_steps(bn, xs, gs), _train_steps(synced, xs, gs)
    finally:
        if process_group:
            dist.destroy_process_group()
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


def test_state_dict_has_pytorchs_names():
    synced = SyncBatchNorm1d(5)
    ref = torch.nn.BatchNorm1d(5)
    assert list(synced.state_dict()) == list(ref.state_dict())
    synced.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(synced.state_dict(), strict=True)


def test_converter_keeps_parameters_buffers_and_settings():
    model = models.build_model("lenet5", "bn", num_classes=10, in_channels=1, image_size=28, momentum=None, eps=1e-3)
    norms = dict(model.norm_layers())
    params = {name: p for name, p in model.named_parameters()}
    converted = convert_sync_batchnorm(model)
    kinds = {name: type(m) for name, m in converted.norm_layers()}
    assert set(kinds.values()) == {SyncBatchNorm1d, SyncBatchNorm2d}
    assert {name: p for name, p in converted.named_parameters()}.keys() == params.keys()
    assert all(p is params[name] for name, p in converted.named_parameters())  # shared, as torch's converter
    for name, m in converted.norm_layers():
        assert m.momentum is None and m.eps == 1e-3 and m.running_mean is norms[name].running_mean
    noisy = models.build_model("lenet5", "noisy", num_classes=10, in_channels=1, image_size=28, noise=0.25)
    assert all(type(m).__name__.startswith("SyncNoisy") and m.noise == 0.25
               for _, m in convert_sync_batchnorm(noisy).norm_layers())


@pytest.mark.parametrize("kind, why", [("gn", "no batch statistics"), ("ln", "no batch statistics"),
                                       ("ghost", "per process"), ("brn", "not synchronised"),
                                       ("torch", "norm=bn is the same math")])
def test_converter_refuses_layers_it_cannot_synchronise(kind, why):
    model = models.build_model("lenet5", kind, num_classes=10, in_channels=1, image_size=28)
    with pytest.raises(ValueError, match=f"cannot synchronise .*{why}"):
        convert_sync_batchnorm(model)
