"""A resume reads nothing that can run code: sharded (FSDP2) checkpoints are safetensors + JSON, and a pickle
planted in any file of a checkpoint (or where ``torch.distributed.checkpoint`` would look) is never
unpickled. Two real gloo processes, a real FSDP2-sharded tiny BERT, the chain's own save/check/load."""

from __future__ import annotations

import os
import pickle
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import _Planted, tiny_bert


def _plant(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(_Planted(str(marker))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _loop(model: torch.nn.Module):  # type: ignore[no-untyped-def]
    from minidisc_ray.engine import Loop, LoopSpec

    def loss_fn(m: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return m(**batch).logits.float().pow(2).mean()

    return Loop(model, LoopSpec(steps=4, lr=1e-2), loss_fn)


def _batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(5, 100, (4, 12), generator=g), "attention_mask": torch.ones(4, 12).long()}


def _worker(rank: int, world: int, port: int, directory: str, result_dir: str) -> None:
    from minidisc_ray.chain.placement import ModelPlacement

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        placement = ModelPlacement("fsdp", world)
        model, core = placement.wrap(tiny_bert(seed=0).train(), torch.device("cpu"))
        loop = _loop(model)
        for step in range(2):  # two real optimiser steps: the moments are not zero
            loss = loop.loss_fn(model, _batch(100 * step + rank))
            loss.backward()
            loop.optimizer.step()
            loop.optimizer.zero_grad()
            loop.scheduler.step()
        loop.state.step = 2
        loop.best_state = placement.full_state(core)
        placement.save(directory, loop, rank)
        dist.barrier()
        saved = placement.full_state(core)
        saved_moments = {k: v.to_local().clone() for k, v in
                         loop.optimizer.state[next(iter(loop.optimizer.state))].items()
                         if hasattr(v, "to_local")}

        d = Path(directory)
        marker = Path(result_dir) / "unpickled"
        if rank == 0:  # what torch.distributed.checkpoint would read on resume
            for name in (".metadata", "__0_0.distcp", "__1_0.distcp"):
                _plant(d / name, marker)
        dist.barrier()

        # a fresh worker group (other random init) resumes: the planted DCP files are never opened
        fresh, fresh_core = placement.wrap(tiny_bert(seed=1).train(), torch.device("cpu"))
        loop2 = _loop(fresh)
        assert placement.check(directory, loop2, rank) is None
        placement.load(directory, loop2, rank)
        restored = placement.full_state(fresh_core)
        same = all(torch.equal(saved[k], restored[k]) for k in saved)
        moments = {k: v.to_local() for k, v in loop2.optimizer.state[next(iter(loop2.optimizer.state))].items()
                   if hasattr(v, "to_local")}
        same_moments = all(torch.equal(saved_moments[k], moments[k]) for k in saved_moments)
        lr_same = loop2.scheduler.state_dict()["last_epoch"] == loop.scheduler.state_dict()["last_epoch"]

        # every file the resume reads, replaced by a pickle in turn: refused, never unpickled
        refused = {}
        files = sorted(p.name for p in d.iterdir() if not p.name.startswith(("__", ".")))
        for name in files:
            dist.barrier()
            original = (d / name).read_bytes()
            if rank == 0:
                _plant(d / name, marker)
            dist.barrier()
            problem = placement.check(directory, loop2, rank)
            refused[name] = problem
            dist.barrier()
            if rank == 0:
                (d / name).write_bytes(original)
        Path(result_dir, f"rank{rank}.txt").write_text(repr({
            "same": same, "same_moments": same_moments and bool(saved_moments), "lr_same": lr_same,
            "files": files, "refused": refused}))
    finally:
        dist.destroy_process_group()


def test_sharded_checkpoint_resumes_exactly_and_unpickles_nothing(tmp_path: Path) -> None:
    ckpt, results = tmp_path / "checkpoint_000001", tmp_path / "results"
    ckpt.mkdir()
    results.mkdir()
    mp.start_processes(_worker, args=(2, _free_port(), str(ckpt), str(results)), nprocs=2, join=True,
                       start_method="spawn")
    assert not (results / "unpickled").exists(), "a planted pickle was unpickled"
    for rank in (0, 1):
        r = eval((results / f"rank{rank}.txt").read_text())  # noqa: S307 - our own repr of plain data
        assert r["same"]
        assert r["same_moments"]
        assert r["lr_same"]
        # the files a resume reads: per-rank shards and manifests, loop state, RNG, best weights; no DCP files
        assert {"shard_0.safetensors", "shard_1.safetensors", "shard_0.json", "shard_1.json", "state.json",
                "rng_0.safetensors", "rng_1.safetensors", "best.safetensors"} <= set(r["files"])
        assert not any(f.endswith(".distcp") or f == ".metadata" for f in r["files"])
        own = {f for f in r["files"] if not f.endswith(("_0.safetensors", "_0.json", "_1.safetensors", "_1.json"))
               or f.endswith(f"_{rank}.safetensors") or f.endswith(f"_{rank}.json")}
        for name in own:  # a rank reads its own shard, manifest and RNG, and the shared state and best weights
            assert r["refused"][name] is not None, f"rank {rank} accepted a pickle as {name}"


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "optimizer.json", "state.json",
                                  "rng_0.safetensors", "best.safetensors"])
def test_replicated_checkpoint_refuses_a_planted_pickle(tmp_path: Path, name: str) -> None:
    """The DDP / single-worker checkpoint: every file it reads, planted with a pickle, is refused unread."""
    from minidisc_ray.chain.placement import ModelPlacement

    placement = ModelPlacement("ddp", 1)
    model = tiny_bert(seed=0).train()
    loop = _loop(model)
    loss = loop.loss_fn(model, _batch(0))
    loss.backward()
    loop.optimizer.step()
    loop.best_state = placement.full_state(model)
    placement.save(str(tmp_path), loop, 0)
    assert placement.check(str(tmp_path), _loop(tiny_bert(seed=1).train()), 0) is None
    _plant(tmp_path / name, tmp_path / "unpickled")
    problem = placement.check(str(tmp_path), _loop(tiny_bert(seed=1).train()), 0)
    assert problem is not None
    assert not (tmp_path / "unpickled").exists()
