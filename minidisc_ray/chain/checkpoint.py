"""The chain's checkpoint format: safetensors weights and optimiser moments with a JSON manifest, one file set per rank
under FSDP (never ``torch.distributed.checkpoint``, whose metadata is a pickle)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from minidisc_ray.engine import Loop


def save_optimizer_files(directory: str, opt: torch.optim.Optimizer, prefix: str = "optimizer") -> None:
    opt_state = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in opt_state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    save_file(tensors, os.path.join(directory, f"{prefix}.safetensors"))
    Path(directory, f"{prefix}.json").write_text(json.dumps({"param_groups": opt_state["param_groups"],
                                                             "scalars": scalars}))


def load_optimizer_files(directory: str, opt: torch.optim.Optimizer, prefix: str = "optimizer") -> None:
    meta = json.loads(Path(directory, f"{prefix}.json").read_text())
    state: dict[int, dict[str, Any]] = {}
    for key, value in load_file(os.path.join(directory, f"{prefix}.safetensors")).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def write_loop_state(directory: str, loop: Loop, rank: int) -> None:
    """Loop state, scheduler, RNG (per rank) and best weights: JSON and safetensors, never pickle."""
    save_file({"cpu": torch.get_rng_state()}, os.path.join(directory, f"rng_{rank}.safetensors"))
    if rank == 0:
        Path(directory, "state.json").write_text(json.dumps({**loop.state.to_dict(),
                                                             "scheduler": loop.scheduler.state_dict()}))
        if loop.best_state is not None:
            save_file(loop.best_state, os.path.join(directory, "best.safetensors"))


def unaliased(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies safetensors can write: a tensor that aliases an earlier one (tied input and output
    embeddings) is cloned, so both names load back (and are tied again by the model)."""
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        t = v.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else id(t)
        out[k] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


class CheckpointMismatch(Exception):
    """The checkpoint cannot be resumed by this worker group (other world size, other model, damaged)."""


# ----------------------------------------------------------------------------- sharded (FSDP) checkpoints
#
# ``torch.distributed.checkpoint`` reads a pickled ``.metadata`` (and its default planner calls
# ``torch.load``) on resume, so whoever can write the output directory could run code in every worker.
# The shards are written instead as one safetensors file of local tensors per rank with a JSON manifest:
# nothing on the resume path is unpickled. A checkpoint is resumed by the same number of workers that
# wrote it (what Ray Train's ``FailureConfig`` restarts do); anything else starts the stage afresh.


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    return get_state_dict(model, optimizer)  # (model FQN -> DTensor, {"state": FQN -> {name: ...}, "param_groups"})


def save_sharded(directory: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int,
                 world: int) -> None:
    """This rank's shards of the model and optimiser: ``shard_RANK.safetensors`` + ``shard_RANK.json``."""
    msd, osd = _sharded_state(model, optimizer)
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for fqn, t in msd.items():
        tensors[f"model/{fqn}"] = _local(t).detach().cpu().contiguous()
    for fqn, entry in osd["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{fqn}/{name}"] = _local(value).detach().cpu().contiguous()
            else:
                scalars[f"{fqn}/{name}"] = value
    save_file(unaliased(tensors), os.path.join(directory, f"shard_{rank}.safetensors"))  # tied embeddings: 2 names
    manifest = {"format": "minidisc-sharded-1", "rank": rank, "world": world, "scalars": scalars,
                "param_groups": osd["param_groups"], "names": sorted(tensors)}
    Path(directory, f"shard_{rank}.json").write_text(json.dumps(manifest))


def load_sharded(directory: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int,
                 world: int, apply: bool = True) -> None:
    """Load :func:`save_sharded`'s files into the sharded model and optimiser (JSON and safetensors only).

    Every check (manifest, world size, tensor names, shapes and dtypes) runs before anything is changed;
    ``apply=False`` runs only the checks. Raises :class:`CheckpointMismatch`.
    """
    try:
        manifest = json.loads(Path(directory, f"shard_{rank}.json").read_text(encoding="utf-8"))
        loaded = load_file(os.path.join(directory, f"shard_{rank}.safetensors"))
    except FileNotFoundError as exc:
        raise CheckpointMismatch(f"no shard for rank {rank} ({exc.filename})") from None
    except Exception as exc:  # noqa: BLE001 - not JSON / not safetensors: a damaged or planted file
        raise CheckpointMismatch(f"shard {rank} is not readable ({type(exc).__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "minidisc-sharded-1":
        raise CheckpointMismatch(f"shard_{rank}.json is not a sharded-checkpoint manifest")
    if manifest.get("world") != world:
        raise CheckpointMismatch(f"written by {manifest.get('world')} workers, resumed by {world}")
    msd, osd = _sharded_state(model, optimizer)
    wanted = {f"model/{k}" for k in msd} | {f"optim/{f}/{n}" for f, e in osd["state"].items()
                                            for n, v in e.items() if isinstance(v, torch.Tensor)}
    if set(loaded) != wanted:
        raise CheckpointMismatch("the shard's tensors are not this model's")

    targets = {f"model/{fqn}": t for fqn, t in msd.items()}
    targets.update({f"optim/{f}/{n}": v for f, e in osd["state"].items() for n, v in e.items()
                    if isinstance(v, torch.Tensor)})
    for name, target in targets.items():
        local, value = _local(target), loaded[name]
        if local.shape != value.shape or local.dtype != value.dtype:
            raise CheckpointMismatch(f"{name}: shard {tuple(value.shape)} {value.dtype}, model {tuple(local.shape)} "
                                     f"{local.dtype}")
    groups = manifest.get("param_groups")
    scalars = manifest.get("scalars")
    if not isinstance(groups, list) or len(groups) != len(osd["param_groups"]) or \
            not all(isinstance(g, dict) for g in groups) or not isinstance(scalars, dict):
        raise CheckpointMismatch("the manifest's optimiser groups are not this optimiser's")
    if not apply:
        return
    with torch.no_grad():
        for name, target in targets.items():
            _local(target).copy_(loaded[name])
    for fqn, entry in osd["state"].items():
        for name, value in entry.items():
            if not isinstance(value, torch.Tensor) and f"{fqn}/{name}" in scalars:
                entry[name] = scalars[f"{fqn}/{name}"]
    for mine, theirs in zip(osd["param_groups"], groups, strict=True):
        for k, v in theirs.items():
            if k != "params" and k in mine:
                mine[k] = tuple(v) if isinstance(mine[k], tuple) else v
    set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd)
