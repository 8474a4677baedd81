"""The trainer's side of a data-parallel run (bnexp/distributed.py has the processes and the data shards).

Every process runs the whole of `train.run`, in step: the same preparation, the same training
steps on its shard (DDP averages the gradients), the same evaluations, probes and measurements
(so the collectives of synchronised BN in them pair up, and every process takes the same branches).
Only rank 0 writes: the others get a `Muted` run directory and a `NullLog` for TensorBoard. All of
them resume from rank 0's checkpoint (`shared_checkpoint`), which holds every rank's random state.
"""

from __future__ import annotations

import torch

from . import distributed as D


class Muted:
    """The run directory of a rank > 0: the same names (run_id, path), nothing written or read."""

    def __init__(self, rd):
        self.run_id, self.path, self.damaged = rd.run_id, rd.path, {}

    def __getattr__(self, name: str):
        if name == "read_activations":
            return lambda *a, **k: {}
        if name == "record_writes":
            return lambda *a, **k: []
        if name.startswith(("write_", "save_", "read_", "load_")) or name in ("clear", "release"):
            return lambda *a, **k: None
        if name == "acquire":
            return lambda *a, **k: True
        raise AttributeError(name)


class NullLog:
    """TensorBoard of a rank > 0: every call does nothing."""

    def __getattr__(self, name: str):
        return lambda *a, **k: None


def device_of(device: torch.device, place: D.Place) -> torch.device:
    """One GPU per process on CUDA (cuda:LOCAL_RANK); other devices as they are."""
    return torch.device("cuda", place.local_rank) if device.type == "cuda" and place.world_size > 1 else device


def models(model: torch.nn.Module, sync: bool, place: D.Place, device: torch.device):
    """(the run's model, the model the training step calls): norm.sync converts the BN layers (in one
    process too, where they compute BN exactly); on several processes the step calls the DDP wrapper."""
    if sync:
        from .nn.syncbatchnorm import convert_sync_batchnorm

        model = convert_sync_batchnorm(model)
    if place.world_size == 1:
        return model, model
    from torch.nn.parallel import DistributedDataParallel

    step_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    step_model.input_size = model.input_size
    return model, step_model


def rng_states(place: D.Place, device: torch.device) -> list[dict]:
    """Every rank's random state, in rank order (a checkpoint's; collective)."""
    own = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    return D.gather(own, place)


def restore_rng(states: list[dict] | None, place: D.Place, device: torch.device) -> None:
    """This rank's random state from a checkpoint's `rng_states` (None: as rank 0's, an older checkpoint)."""
    if not states:
        return
    own = states[place.rank]
    torch.set_rng_state(own["cpu"])
    if own.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(own["cuda"], device)


def shared_checkpoint(load, place: D.Place):
    """Rank 0's checkpoint (load()) on every rank, so that all resume from the same one."""
    return D.broadcast(load() if place.main else None, place)
