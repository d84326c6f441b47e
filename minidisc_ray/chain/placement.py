"""Where a stage's student lives (``distill.parallelism``): replicated under DistributedDataParallel or sharded with
FSDP2, and the mixed-precision policy for each device."""

from __future__ import annotations

import json
import os
from pathlib import Path

import ray.train.torch
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from minidisc_ray.chain.checkpoint import (
    CheckpointMismatch,
    load_optimizer_files,
    load_sharded,
    save_optimizer_files,
    save_sharded,
    unaliased,
    write_loop_state,
)
from minidisc_ray.engine import Loop, LoopState
from minidisc_ray.families import get_adaptor


class ModelPlacement:
    """How the student is placed on the workers: ``ddp`` or ``fsdp`` (see the module docstring)."""

    def __init__(self, kind: str, world: int) -> None:
        self.kind, self.world = kind, world

    def wrap(self, student: torch.nn.Module, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(the model the loop trains, the unwrapped module for evaluation and state)."""
        if self.kind == "fsdp" and self.world > 1:
            student = student.to(device)
            policy = self.mixed_precision(device)
            # a fully pruned block leaves zero-size weights: nothing to shard or synchronise, and FSDP2
            # cannot gather an empty shard back, so they stay plain (replicated, empty) tensors
            empty = {p for p in student.parameters() if p.numel() == 0}
            for layer in get_adaptor(student).layers(student):
                fully_shard(layer, mp_policy=policy, ignored_params=empty)
            fully_shard(student, mp_policy=policy, ignored_params=empty)
            return student, student
        model = ray.train.torch.prepare_model(student)
        return model, getattr(model, "module", model)

    @staticmethod
    def mixed_precision(device: torch.device) -> MixedPrecisionPolicy:
        """FSDP2's policy for a trained model: bf16 compute with fp32 gradient reduction on a GPU, fp32 on CPU."""
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if device.type == "cuda" else MixedPrecisionPolicy()

    def full_state(self, core: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The whole student's weights on the CPU (a collective under FSDP; every rank must call it)."""
        if self.kind == "fsdp" and self.world > 1:
            full = get_model_state_dict(core, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            return {k: v.detach().clone() for k, v in full.items() if isinstance(v, torch.Tensor)}
        return {k: v.detach().cpu().clone() for k, v in core.state_dict().items()}

    def save(self, directory: str, loop: Loop, rank: int) -> None:
        if self.kind == "fsdp" and self.world > 1:
            save_sharded(directory, loop.core, loop.optimizer, rank, self.world)
        elif rank == 0:
            save_file(unaliased(loop.core.state_dict()),
                      os.path.join(directory, "model.safetensors"))
            save_optimizer_files(directory, loop.optimizer)
        write_loop_state(directory, loop, rank)

    def check(self, directory: str, loop: Loop, rank: int) -> str | None:
        """Why this rank cannot resume from ``directory`` (nothing is changed), or None when it can."""
        try:
            if self.kind == "fsdp" and self.world > 1:
                load_sharded(directory, loop.core, loop.optimizer, rank, self.world, apply=False)
            else:
                weights = load_file(os.path.join(directory, "model.safetensors"))
                mine = loop.core.state_dict()
                if set(weights) != set(mine) or any(weights[k].shape != mine[k].shape for k in mine):
                    return "model.safetensors holds another model's weights"
                json.loads(Path(directory, "optimizer.json").read_text(encoding="utf-8"))
                load_file(os.path.join(directory, "optimizer.safetensors"))
            meta = json.loads(Path(directory, "state.json").read_text(encoding="utf-8"))
            LoopState.from_dict(meta)
            if not isinstance(meta.get("scheduler"), dict):
                return "state.json has no scheduler state"
            for name in (f"rng_{rank}.safetensors", "best.safetensors"):
                if Path(directory, name).is_file():
                    load_file(os.path.join(directory, name))
        except CheckpointMismatch as exc:
            return str(exc)
        except Exception as exc:  # noqa: BLE001 - not JSON / not safetensors / wrong fields: damaged or planted
            return f"a file is damaged or not ours ({type(exc).__name__})"
        return None

    def load(self, directory: str, loop: Loop, rank: int) -> None:
        if self.kind == "fsdp" and self.world > 1:
            load_sharded(directory, loop.core, loop.optimizer, rank, self.world)
        else:
            loop.core.load_state_dict(load_file(os.path.join(directory, "model.safetensors")))
            load_optimizer_files(directory, loop.optimizer)
        meta = json.loads(Path(directory, "state.json").read_text())
        loop.state = LoopState.from_dict(meta)
        loop.scheduler.load_state_dict(meta["scheduler"])
        rng = Path(directory, f"rng_{rank}.safetensors")
        if rng.is_file():
            torch.set_rng_state(load_file(str(rng))["cpu"])
        best = Path(directory, "best.safetensors")
        loop.best_state = load_file(str(best)) if best.is_file() else None
