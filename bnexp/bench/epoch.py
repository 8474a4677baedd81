"""Benchmark: one LeNet5-BN FashionMNIST training epoch, bnexp vs plain PyTorch, in one process.

The pipelines train the same model on the same 60k images at batch 256:
  bnexp       `bnexp.train.train_epoch` (in-repo BN, tensor-resident data, the step `bnexp train` runs:
              on CUDA captured as a CUDA graph)
  bnexp-eager the same with cuda_graphs=off (CUDA only: shows what the graph buys)
  hand        a hand-written tensor-resident loop with torch.nn.BatchNorm2d (the fair baseline)
  dataloader  the usual script: torchvision dataset + ToTensor + DataLoader, torch.nn.BatchNorm2d
Epochs of the pipelines are interleaved (bnexp.bench.stats), so machine noise hits them alike; each
ratio is the min / median / max over the repeats of the ratio within one repeat, with at least
`repeats` repeats and more (within `budget_s`) until the ratios are settled.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .. import config, data, models, train
from ..nn import dispatch
from .stats import Spread, measure, verdict


def _hand_setup(device, num_classes=10):
    torch.manual_seed(0)
    model = models.build_model("lenet5", "torch", num_classes, 1, 28).to(device)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def hand_epoch(model, opt, x_u8, y, batch_size, seed):
    """What a careful user writes: index a resident uint8 tensor, scale on the fly."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=gen).to(x_u8.device)
    model.train()
    for i in range(0, len(y), batch_size):
        idx = perm[i:i + batch_size]
        loss = F.cross_entropy(model(x_u8[idx].float().div_(255)), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return loss.item()


def dataloader_epoch(model, opt, loader, device):
    """The usual script: PIL images through ToTensor and a DataLoader, copied to the device."""
    model.train()
    for xb, yb in loader:
        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return loss.item()


def run(device: str = "cpu", batch_size: int = 256, repeats: int = 3, dataloader: bool = True,
        data_dir: str | None = None, precision: str = "fp32", channels_last: bool = False,
        max_repeats: int = 10, budget_s: float = 150.0) -> dict:
    dev = torch.device(device)
    base = [f"batch_size={batch_size}", f"device={device}", "progress=false", "lr=0.1",
            f"precision={precision}", f"channels_last={channels_last}"] + ([f"data_dir={data_dir}"] if data_dir else [])
    variants = {"bnexp": []} | ({"bnexp-eager": ["cuda_graphs=off"]} if dev.type == "cuda" else {})
    fns, setups = {}, {}
    for name, extra in variants.items():  # bnexp's own setup: data resident on the device, in-repo BN
        cfg = config.compose(base + extra)
        s = setups[name] = train.prepare(cfg)
        fns[name] = lambda e, s=s, cfg=cfg: train.train_epoch(s, cfg, e)
    s = setups["bnexp"]
    hand_model, hand_opt = _hand_setup(dev)
    x_u8, y = s.train.x, s.train.y
    fns["hand"] = lambda e: hand_epoch(hand_model, hand_opt, x_u8, y, batch_size, e)
    if dataloader:
        import torchvision
        from torchvision.transforms import ToTensor

        ds = torchvision.datasets.FashionMNIST(str(data.resolve_data_dir(cfg.data_dir)), train=True,
                                               transform=ToTensor())
        workers = min(4, os.cpu_count() or 1)
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                                             pin_memory=dev.type == "cuda", persistent_workers=True)
        dl_model, dl_opt = _hand_setup(dev)
        fns["dataloader"] = lambda e: dataloader_epoch(dl_model, dl_opt, loader, dev)
    epochs = {k: iter(range(1, 1 << 30)) for k in fns}  # each pipeline's next epoch (batch order seed)
    timed = {k: (lambda k=k: fns[k](next(epochs[k]))) for k in fns}
    ratios = {"bnexp/hand": ("bnexp", "hand")} | ({"dataloader/bnexp": ("dataloader", "bnexp")} if dataloader else {}) \
        | ({"bnexp-eager/bnexp": ("bnexp-eager", "bnexp")} if "bnexp-eager" in fns else {})
    # One untimed round: compilation, CUDA-graph capture, cuDNN autotuning, DataLoader workers' start-up.
    m = measure(timed, ratios, min_repeats=repeats, max_repeats=max(repeats, max_repeats), budget_s=budget_s, warmup=1)
    med = {k: m.median(k) for k in fns}
    return {
        "benchmark": "epoch", "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "model": "lenet5-bn",
        "images": len(y), "batch_size": batch_size, "repeats": repeats,
        "precision": precision, "channels_last": channels_last,
        "cuda_graphs": s.program.use_graphs, "bn_backend": dispatch.resolved_backend(dev),
        "seconds": {k: round(v, 4) for k, v in med.items()},
        "all_seconds": {k: [round(t, 4) for t in v] for k, v in m.samples.items()},
        "ratio_bnexp_vs_hand": round(m.ratios["bnexp/hand"].median, 3),
        **({"speedup_vs_dataloader": round(m.ratios["dataloader/bnexp"].median, 2)} if dataloader else {}),
        "ratios": {label: r.to_json() for label, r in m.ratios.items()},
    }


def format_table(r: dict) -> str:
    lines = [f"epoch benchmark: LeNet5-BN, {r['images']} images, batch {r['batch_size']}, "
             f"{r['device_name']} ({r['device']}), torch {r['torch']}, median of {len(r['all_seconds']['bnexp'])} "
             f"interleaved repeats",
             f"bnexp: {r.get('precision', 'fp32')}, {'channels_last' if r.get('channels_last') else 'contiguous'}, "
             f"CUDA graphs {'on' if r.get('cuda_graphs') else 'off'}, BN backend {r.get('bn_backend', '?')}",
             f"{'pipeline':<12}{'s/epoch':>10}{'vs bnexp':>10}"]
    base = r["seconds"]["bnexp"]
    for name, sec in r["seconds"].items():
        lines.append(f"{name:<12}{sec:>10.3f}{sec / base:>9.2f}x")
    spreads = {label: Spread.from_json(d) for label, d in r["ratios"].items()}
    lines.append(f"bnexp / hand-written loop, per repeat: {spreads['bnexp/hand'].text(digits=3)} (CPU target <= 1.25)")
    if "dataloader/bnexp" in spreads:
        lines.append(f"bnexp is {spreads['dataloader/bnexp'].text(digits=1)} faster than the DataLoader script "
                     f"(H100 target: >= 40x, <= 0.25 s per epoch)")
    lines.append(verdict(spreads))
    return "\n".join(lines)
