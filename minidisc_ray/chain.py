"""The distillation chain on Ray Train: teacher -> TA -> student, one ``TorchTrainer`` run per stage.

Each stage runs the one loop of :mod:`minidisc_ray.engine` on every worker with the MiniDisc loss;
this module adds only what Ray Train needs: placing the model (``distill.parallelism``), checkpoints
and reports.

* ``ddp`` (default): the student is replicated and wrapped in DistributedDataParallel (gloo on CPU,
  NCCL on GPU); rank 0 writes the checkpoint (safetensors weights and optimiser moments + JSON).
* ``fsdp``: the student is sharded with FSDP2 (``fully_shard`` on every layer, then the root) across
  the workers; every rank writes its shard as safetensors with a JSON manifest (:func:`save_sharded`,
  never ``torch.distributed.checkpoint``, whose metadata is a pickle) and Ray Train gathers the shards
  into one checkpoint directory. The frozen teacher is held once per worker without
  gradients (bf16 on GPU): it needs no optimiser state, so sharding it would only add an all-gather per
  layer per step to save one copy of its weights; a teacher too large for one GPU is the case for
  sharding it too, which the loop does not need to know about.

Checkpoints carry the loop state, the scheduler and the RNG state, and the data order is a function of
the step, so a worker group restarted by ``FailureConfig(max_failures)`` continues exactly where the
checkpoint left it: the resumed run ends with the weights an uninterrupted run ends with.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from minidisc_ray.config import DistillConfig
from minidisc_ray.engine import Loop, LoopSpec, LoopState, evaluate
from minidisc_ray.logs import log
from minidisc_ray.ray_env import interruptible


@dataclass
class StageResult:
    """What one stage hands back to the driver."""

    name: str
    best_state: dict[str, torch.Tensor]
    best_metric: float
    best_step: int
    steps_run: int
    seconds: float
    history: list[dict[str, Any]]
    attempts: int
    final_state: dict[str, torch.Tensor] | None = None


# ----------------------------------------------------------------------------- checkpoint files


def _optimizer_files(directory: str, opt: torch.optim.Optimizer, prefix: str = "optimizer") -> None:
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


def _load_optimizer_files(directory: str, opt: torch.optim.Optimizer, prefix: str = "optimizer") -> None:
    meta = json.loads(Path(directory, f"{prefix}.json").read_text())
    state: dict[int, dict[str, Any]] = {}
    for key, value in load_file(os.path.join(directory, f"{prefix}.safetensors")).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _write_common(directory: str, loop: Loop, rank: int) -> None:
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


# ----------------------------------------------------------------------------- sharded (FSDP) checkpoints
#
# ``torch.distributed.checkpoint`` reads a pickled ``.metadata`` (and its default planner calls
# ``torch.load``) on resume, so whoever can write the output directory could run code in every worker.
# The shards are written instead as one safetensors file of local tensors per rank with a JSON manifest:
# nothing on the resume path is unpickled. A checkpoint is resumed by the same number of workers that
# wrote it (what Ray Train's ``FailureConfig`` restarts do); anything else starts the stage afresh.


class CheckpointMismatch(Exception):
    """The checkpoint cannot be resumed by this worker group (other world size, other model, damaged)."""


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

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
    from torch.distributed.checkpoint.state_dict import set_state_dict

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


class ModelPlacement:
    """How the student is placed on the workers: ``ddp`` or ``fsdp`` (see the module docstring)."""

    def __init__(self, kind: str, world: int) -> None:
        self.kind, self.world = kind, world

    def wrap(self, student: torch.nn.Module, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(the model the loop trains, the unwrapped module for evaluation and state)."""
        import ray.train.torch

        if self.kind == "fsdp" and self.world > 1:
            from torch.distributed.fsdp import fully_shard

            from minidisc_ray.families import get_adaptor

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
    def mixed_precision(device: torch.device) -> Any:
        """FSDP2's policy for a trained model: bf16 compute with fp32 gradient reduction on a GPU, fp32 on CPU."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if device.type == "cuda" else MixedPrecisionPolicy()

    def full_state(self, core: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The whole student's weights on the CPU (a collective under FSDP; every rank must call it)."""
        if self.kind == "fsdp" and self.world > 1:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(core, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            return {k: v.detach().clone() for k, v in full.items() if isinstance(v, torch.Tensor)}
        return {k: v.detach().cpu().clone() for k, v in core.state_dict().items()}

    def save(self, directory: str, loop: Loop, rank: int) -> None:
        if self.kind == "fsdp" and self.world > 1:
            save_sharded(directory, loop.core, loop.optimizer, rank, self.world)
        elif rank == 0:
            save_file(unaliased(loop.core.state_dict()),
                      os.path.join(directory, "model.safetensors"))
            _optimizer_files(directory, loop.optimizer)
        _write_common(directory, loop, rank)

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
            _load_optimizer_files(directory, loop.optimizer)
        meta = json.loads(Path(directory, "state.json").read_text())
        loop.state = LoopState.from_dict(meta)
        loop.scheduler.load_state_dict(meta["scheduler"])
        rng = Path(directory, f"rng_{rank}.safetensors")
        if rng.is_file():
            torch.set_rng_state(load_file(str(rng))["cpu"])
        best = Path(directory, "best.safetensors")
        loop.best_state = load_file(str(best)) if best.is_file() else None


def _batches(train: Any, tokenizer: Any, batch_size: int, seed: int, skip: int) -> Iterator[dict[str, torch.Tensor]]:
    """The worker's batch stream: a fixed function of the seed, ``skip`` batches already consumed."""
    from minidisc_ray.data import infinite, make_loader

    stream = infinite(make_loader(train, tokenizer, batch_size, shuffle=True, seed=seed))
    for _ in range(skip):
        next(stream)
    return stream


def stage_loop(config: dict[str, Any]) -> None:
    """Ray Train worker loop of one distillation stage (runs on every worker)."""
    import datasets
    import ray
    import ray.train
    import ray.train.torch
    from datasets.table import InMemoryTable

    from minidisc_ray import memprobe
    from minidisc_ray.data import make_loader
    from minidisc_ray.modelio import model_from_blob
    from minidisc_ray.training import kd_loss_fn, memory_savers

    probe = None
    if memprobe.enabled():  # benchmarks/memory.py: the stage's own memory, after torch's one-time set-up
        memprobe.warm_up_torch()
        probe = memprobe.PeakRSS().__enter__()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    dc: DistillConfig = config["distill"]
    torch.manual_seed(config["seed"] + rank)
    torch.set_num_threads(max(1, int(dc.cpus_per_worker) if not dc.use_gpu else 1))
    device = ray.train.torch.get_device()
    if config.get("offline_targets"):  # teacher.placement: offline: no teacher here, its stored top-k logits
        from minidisc_ray.offline import OfflineTargets, offline_kd_loss_fn

        loss_fn = offline_kd_loss_fn(OfflineTargets.load(config["offline_targets"]), dc.hard_label_weight)
    else:
        half = torch.bfloat16 if device.type == "cuda" else None  # frozen: no gradients, no optimiser state
        if config.get("teacher_dir"):  # teacher.placement: sharded: FSDP2 over these workers, read shard by shard
            from minidisc_ray.modelio import load_frozen_sharded

            teacher = load_frozen_sharded(config["teacher_dir"], config["kind"], device, half)
        else:
            teacher = model_from_blob(ray.get(config["teacher_ref"]), trainable=False).to(device)
            if half is not None:
                teacher = teacher.to(half)
        loss_fn = kd_loss_fn(teacher, dc.temperature, config["regression"], dc.hard_label_weight, dc.kl_chunk)
    presharded = False
    if config.get("student_cut"):  # teacher.placement: sharded: the student is cut from the files here
        from minidisc_ray.modelio import load_sharded
        from minidisc_ray.pruning import PruningPlan

        cut = config["student_cut"]
        plan = PruningPlan.from_dict(cut["plan"])
        presharded = dc.parallelism == "fsdp" and world > 1
        if presharded:  # each rank reads its own rows of the kept units: no process holds the whole student
            student = load_sharded(cut["directory"], config["kind"], device, plan=plan, trainable=True,
                                   mp_policy=ModelPlacement.mixed_precision(device))
        else:  # one whole student per worker, read from the kept rows and columns only
            student = load_sharded(cut["directory"], config["kind"], torch.device("cpu"), plan=plan,
                                   trainable=True, shard=False)
    else:
        student = model_from_blob(ray.get(config["student_ref"]), trainable=True)
    tokenizer = config["tokenizer"]
    train = datasets.Dataset(InMemoryTable(ray.get(config["train_ref"])))
    dev = datasets.Dataset(InMemoryTable(ray.get(config["dev_ref"])))
    if world > 1:
        train = train.shard(num_shards=world, index=rank, contiguous=True)
    memory_savers(student, dc)
    placement = ModelPlacement(dc.parallelism, world)
    model, core = (student, student) if presharded else placement.wrap(student, device)
    dev_loader = make_loader(dev, tokenizer, 64)
    spec = LoopSpec(steps=dc.steps, lr=dc.lr, weight_decay=dc.weight_decay, warmup_ratio=dc.warmup_ratio,
                    grad_accum=dc.grad_accum, eval_every=dc.eval_every, patience=dc.patience)
    loop = Loop(model, spec, loss_fn,
                evaluate_fn=lambda m: evaluate(m, dev_loader, config["metric"]), core=core)
    checkpoint = ray.train.get_checkpoint()
    resumed = checkpoint is not None
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            problem = placement.check(d, loop, rank)
            if world > 1:  # every rank resumes, or none does
                flag = torch.tensor([0.0 if problem else 1.0], device=device)
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
                problem = problem or (None if flag.item() == 1.0 else "another worker's shard is unusable")
            if problem is None:
                placement.load(d, loop, rank)
            else:
                if rank == 0:
                    print(f"minidisc: warning: not resuming stage {config.get('name')} from its checkpoint "
                          f"({problem}); starting the stage afresh", flush=True)
                resumed = False
    if not resumed:
        loop.best_state = placement.full_state(core)
    if rank == 0:
        _event(config, "start", start_step=loop.state.step, resumed=resumed)
    data = _batches(train, tokenizer, dc.batch_size, config["seed"] + 1000 * rank, loop.state.step * dc.grad_accum)
    crash_at = config.get("crash_at_step")

    def report(lp: Loop, entry: dict[str, Any] | None) -> None:
        if entry is not None and lp.state.best_step == lp.state.step:
            lp.best_state = placement.full_state(core)  # a collective under FSDP: every rank gathers
        final = placement.full_state(core) if lp.state.stopped else None  # the last weights, for the record
        if entry is not None and rank == 0:
            st = lp.state
            _event(config, "eval", step=st.step, loss=entry["loss"], metric=entry["metric"],
                   best_metric=st.best_metric, best_step=st.best_step,
                   early_stop=bool(st.stopped and st.step < dc.steps))
        with tempfile.TemporaryDirectory() as tmp:
            placement.save(tmp, lp, rank)
            if final is not None and rank == 0:
                save_file(final, os.path.join(tmp, "final.safetensors"))
            ckpt = ray.train.Checkpoint.from_directory(tmp) if (rank == 0 or placement.kind == "fsdp") else None
            ray.train.report({"step": lp.state.step, "best_metric": lp.state.best_metric,
                              "best_step": lp.state.best_step, **({"loss": entry["loss"], "metric": entry["metric"]}
                                                                  if entry else {})}, checkpoint=ckpt)

    last_progress = [time.time()]

    def maybe_crash(lp: Loop, loss: float) -> None:
        if rank == 0 and time.time() - last_progress[0] >= PROGRESS_EVERY_S:
            last_progress[0] = time.time()
            _event(config, "progress", step=lp.state.step, loss=loss)
        if crash_at is not None and lp.state.step == crash_at and not resumed and rank == 0:
            os._exit(1)  # test hook: a worker dies mid-stage

    if loop.state.stopped:
        report(loop, None)  # a finished run resumed (the driver died before taking the result): hand it back
        return
    loop.run(data, on_eval=report, on_step=maybe_crash)
    if probe is not None and rank == 0:
        probe.__exit__(None, None, None)
        _event(config, "memory", rss_start=probe.start, rss_peak=probe.peak)


PROGRESS_EVERY_S = 5.0


def _event(config: dict[str, Any], event: str, **fields: Any) -> None:
    """One line in the stage's events file (rank 0): how the driver follows a stage it does not run."""
    if config.get("events_path"):
        with open(config["events_path"], "a") as fh:
            fh.write(json.dumps({"event": event, "stage": config["name"], "run_id": config.get("run_id"),
                                 "time": time.time(), **fields}) + "\n")


class StageProgress:
    """Follows a running stage from the driver: reads the workers' events and prints a progress line
    (steps, loss, dev metric, seconds per step, ETA) to stderr; every evaluation gets a line, between
    evaluations at most one line per ``every_s`` (the line is rewritten in place on a terminal)."""

    def __init__(self, events_path: str | None, name: str, run_id: str | None, steps: int, metric: str,
                 every_s: float = 30.0) -> None:
        import sys
        import threading

        self.path, self.name, self.run_id, self.steps, self.metric = events_path, name, run_id, steps, metric
        self.every_s, self.tty = every_s, sys.stderr.isatty()
        self.offset, self.last_print = 0, 0.0
        self.first: tuple[float, int] | None = None
        self.last_metric: float | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._follow, daemon=True)

    def __enter__(self) -> StageProgress:
        if self.path:
            self.offset = Path(self.path).stat().st_size if Path(self.path).is_file() else 0
            self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=5)
            self.poll()  # what the workers wrote after the last poll (a short stage may finish within one)
        if self.tty and self.last_print:
            import sys

            print(file=sys.stderr, flush=True)

    def _follow(self) -> None:
        while not self.stop.wait(1.0):
            self.poll()

    def poll(self) -> list[str]:
        """Read new events and print what they say; returns the lines printed (for tests)."""
        import sys

        path = Path(self.path or "")
        if not path.is_file():
            return []
        with open(path) as fh:
            fh.seek(self.offset)
            chunk = fh.read()
        complete, _, _ = chunk.rpartition("\n")
        self.offset += len(complete.encode()) + (1 if complete else 0)
        printed = []
        for line in complete.splitlines():
            try:
                e = json.loads(line)
                if not isinstance(e, dict) or e.get("event") not in ("progress", "eval"):
                    continue
                step, when, loss = int(e["step"]), float(e["time"]), float(e["loss"])
                metric = float(e["metric"]) if e["event"] == "eval" else None
            except (ValueError, KeyError, TypeError):
                continue  # a torn or foreign line: progress is cosmetic, skip it
            if e.get("stage") != self.name or (self.run_id and e.get("run_id") != self.run_id):
                continue
            if self.first is None:
                self.first = (when, step)
            if metric is not None:
                self.last_metric = metric
            t0, s0 = self.first
            rate = (when - t0) / (step - s0) if step > s0 else None
            eta = f"ETA {_duration(rate * (self.steps - step))}" if rate else "ETA -"
            dev = f" dev {self.metric} {self.last_metric:.4f}" if self.last_metric is not None else ""
            text = (f"[distill {self.name}] {step}/{self.steps} steps, loss {loss:.4f}{dev}"
                    f"{f', {rate:.2f} s/step' if rate else ''}, {eta}"
                    f"{' (early stop)' if e.get('early_stop') else ''}")
            now = time.time()
            if e["event"] == "eval" or now - self.last_print >= self.every_s or self.tty:
                end = "" if self.tty and e["event"] != "eval" else "\n"
                print(("\r" if self.tty else "") + text, end=end, file=sys.stderr, flush=True)
                self.last_print = now
                printed.append(text)
        return printed


def _duration(seconds: float) -> str:
    m, s = divmod(int(max(0.0, seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def run_stage(name: str, teacher_ref: Any, student_blob: dict[str, Any] | None, tokenizer: Any,
              train_ref: Any, dev_ref: Any, metric: str, regression: bool, dc: DistillConfig, seed: int,
              storage_path: str, crash_at_step: int | None = None, events_path: str | None = None,
              run_name: str | None = None, run_id: str | None = None,
              offline_targets: str | None = None, teacher_dir: str | None = None,
              kind: str = "classification", student_cut: dict[str, Any] | None = None) -> StageResult:
    """Run one stage as a ``TorchTrainer``; returns the best weights and what happened.

    ``teacher_ref``, ``train_ref`` and ``dev_ref`` are object references (put once per job) or the
    objects themselves. ``run_name`` names the Ray Train run under ``storage_path``: running a stage
    again under the same name resumes it from its last checkpoint (how ``minidisc run`` continues after
    a kill), so the name must identify everything that determines the stage. ``run_id`` tags this
    job's events, so ``attempts`` counts the attempts of this run only. ``offline_targets`` (a directory of
    :mod:`minidisc_ray.offline`) replaces the teacher: ``teacher_ref`` may then be None, and the training
    rows must carry their ``row_id``. ``teacher_dir`` (a model directory on storage every worker reads;
    ``kind`` its head) replaces ``teacher_ref`` with the teacher sharded over the workers
    (:func:`minidisc_ray.modelio.load_frozen_sharded`). ``student_cut`` (``{"directory", "plan"}``) replaces
    ``student_blob``: the workers cut the student from that directory's files (:class:`ShardCut`).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    def ref(x: Any) -> Any:
        return x if type(x).__name__ == "ObjectRef" else ray.put(x)

    t0 = time.perf_counter()
    log(f"[distill {name}] Ray Train: {dc.num_workers} worker(s), {dc.parallelism}, "
        f"{'GPU' if dc.use_gpu else 'CPU'}, {dc.steps} steps, batch {dc.batch_size} x {dc.grad_accum}, "
        f"eval every {dc.eval_every}" + (f"; teacher sharded over the workers from {teacher_dir}" if teacher_dir
                                        else "; teacher from its stored top-k" if offline_targets else ""))
    loop_config = {"name": name, "distill": dc, "seed": seed, "metric": metric, "regression": regression,
                   "teacher_ref": None if teacher_ref is None else ref(teacher_ref),
                   "student_ref": None if student_blob is None else ray.put(student_blob),
                   "student_cut": student_cut, "offline_targets": offline_targets,
                   "teacher_dir": teacher_dir, "kind": kind,
                   "train_ref": ref(train_ref), "dev_ref": ref(dev_ref), "tokenizer": tokenizer,
                   "crash_at_step": crash_at_step, "events_path": events_path, "run_id": run_id}
    resources = {"CPU": dc.cpus_per_worker}
    if dc.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        stage_loop, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=dc.num_workers, use_gpu=dc.use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if dc.use_gpu else "gloo", timeout_s=1800),
        run_config=RunConfig(name=run_name or f"distill-{name}-{int(time.time())}", storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=dc.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    with StageProgress(events_path, name, run_id, dc.steps, metric):
        result = interruptible(trainer.fit)
    if result.checkpoint is None:
        raise RuntimeError(f"stage {name} produced no checkpoint")
    with result.checkpoint.as_directory() as d:
        best = load_file(os.path.join(d, "best.safetensors"))
        state = json.loads(Path(d, "state.json").read_text())
        final_path = os.path.join(d, "final.safetensors")
        final = load_file(final_path) if os.path.isfile(final_path) else None
    attempts = 1
    if events_path and Path(events_path).is_file():
        from minidisc_ray.records import read_jsonl

        attempts = max(1, sum(1 for e in read_jsonl(events_path) if e.get("stage") == name
                              and e.get("event") == "start" and (run_id is None or e.get("run_id") == run_id)))
    return StageResult(name, best, float(state["best_metric"]), int(state["best_step"]), int(state["step"]),
                       time.perf_counter() - t0, list(state["history"]), attempts, final)


# ----------------------------------------------------------------------------- the stages of one job


@dataclass
class ShardCut:
    """A link's starting model as the units ``plan`` keeps of the model stored in ``directory``: what
    ``teacher.placement: sharded`` gives a link that starts from the teacher (teacher -> assistant, and the
    student of direct KD). The driver holds its shapes only (``model``, on the meta device); the stage's
    workers cut it from the files (:func:`minidisc_ray.modelio.load_sharded`)."""

    directory: str
    plan: Any  # PruningPlan
    model: Any  # the cut on the meta device
    source_fp: str  # the stored model's files (:func:`minidisc_ray.modelio.files_fingerprint`)

    def fingerprint(self) -> str:
        from minidisc_ray.records import digest

        return digest("cut", self.source_fp, self.plan.to_dict())

    def job(self) -> dict[str, Any]:
        return {"directory": self.directory, "plan": self.plan.to_dict()}


class ChainRunner:
    """Runs the links of one ``minidisc run`` on Ray Train: each reused when finished (its signed model
    directory, :mod:`minidisc_ray.stages`), resumed when interrupted, exported when done. Teachers and
    data go into the object store once per job (:func:`ray_env.shared_ref`)."""

    def __init__(self, prep: Any, out: Path, command: str, run_id: str, storage: str,
                 crash_at: int | None = None) -> None:
        self.prep, self.out, self.command, self.run_id, self.storage = prep, out, command, run_id, storage
        self.crash_at = crash_at
        self.events = str((out / "train_events.jsonl").resolve())

    def key(self, name: str, teacher_key: str, student: Any, dc: DistillConfig) -> str:
        """Everything that determines a link's result."""
        from minidisc_ray.records import digest, tensor_fingerprint

        tc = self.prep.cfg.teacher  # an offline teacher is a different loss (top-k, no hidden states)
        placement = ("offline", tc.top_k) if tc.placement == "offline" else ()
        start = student.fingerprint() if isinstance(student, ShardCut) else tensor_fingerprint(student.state_dict())
        return digest(name, teacher_key, start, self.prep.data_key, dc.what_it_computes(), self.prep.cfg.seed,
                      *placement)

    def offline_targets(self, teacher_ref: Any, teacher_fp: str, dc: DistillConfig) -> str:
        """The teacher's top-k targets over the training rows (:mod:`minidisc_ray.offline`): one Ray Data pass
        the first time this teacher teaches, the same files for every later link, baseline and rerun."""
        from minidisc_ray.offline import ensure_targets

        prep = self.prep
        where, written = ensure_targets(self.out, teacher_ref, teacher_fp, prep.train.with_format(None).data.table,
                                        prep.data_key, prep.tokenizer, prep.cfg.teacher.top_k, dc.temperature,
                                        use_gpu=dc.use_gpu, replicas=max(1, dc.num_workers), who="chain")
        _event({"events_path": self.events, "name": "offline_targets", "run_id": self.run_id},
               "offline_targets", written=written, directory=str(where), teacher=teacher_fp[:16])
        return str(where)

    def stage(self, link: Any, teacher: Any, teacher_key: str, init: Any, role: str, assistant: str | None,
              teacher_fp: str | None = None) -> tuple[Any, dict[str, Any], dict[str, Any], str]:
        """Distil ``init`` from ``teacher`` along ``link`` (a :class:`schedule.Link`: name, steps, directory),
        or reuse a finished export; returns (model, summary, stage info, key).

        ``teacher_fp`` (the weights' fingerprint, when the caller has it) names the teacher's object-store
        copy, so a teacher the search already put there is not put again.
        """
        import dataclasses

        from minidisc_ray.modelio import model_blob, model_from_blob, share_key
        from minidisc_ray.offline import with_row_ids
        from minidisc_ray.ray_env import shared_ref
        from minidisc_ray.records import tensor_fingerprint
        from minidisc_ray.stages import export_stage, finished_stage

        prep = self.prep
        dc = dataclasses.replace(prep.cfg.distill, steps=link.steps)
        key = self.key(link.name, teacher_key, init, dc)
        target = self.out / link.directory
        done = finished_stage(target, key)
        if done is not None:
            log(f"[chain] {link.name}: finished by an earlier run with the same inputs; reusing {target}")
            return (*done, key)
        placement = prep.cfg.teacher.placement
        dev_ref = shared_ref("dev", prep.data_key, lambda: prep.dev.with_format(None).data.table)
        offline = teacher_dir = None
        if placement == "sharded":  # the workers read it shard by shard: it never goes to the object store
            teacher_ref = None
            teacher_dir = str(Path(assistant).resolve() if assistant else Path(prep.teacher_dir).resolve())
        else:
            teacher_fp = teacher_fp or tensor_fingerprint(teacher.state_dict())
            teacher_ref = shared_ref("teacher", share_key(teacher, teacher_fp), lambda: model_blob(teacher))
        if placement == "offline":
            assert teacher_fp is not None
            offline = self.offline_targets(teacher_ref, teacher_fp, dc)
            train_ref = shared_ref("train_rows", prep.data_key,
                                   lambda: with_row_ids(prep.train.with_format(None).data.table))
            teacher_ref = None  # the stage never loads the teacher
        else:
            train_ref = shared_ref("train", prep.data_key, lambda: prep.train.with_format(None).data.table)
        cut = init if isinstance(init, ShardCut) else None
        res = run_stage(link.name, teacher_ref, None if cut else model_blob(init),
                        prep.tokenizer, train_ref, dev_ref, prep.task.metric, prep.task.is_regression, dc,
                        prep.cfg.seed, self.storage, crash_at_step=self.crash_at, events_path=self.events,
                        run_name=f"distill-{link.name}-{key[:16]}", run_id=self.run_id, offline_targets=offline,
                        teacher_dir=teacher_dir, kind="lm" if prep.task.is_lm else "classification",
                        student_cut=cut.job() if cut else None)
        self.crash_at = None
        blob = model_blob(cut.model if cut else init, state=res.best_state)
        trained = model_from_blob(blob)
        info = {"seconds": round(res.seconds, 1), "steps_run": res.steps_run, "best_step": res.best_step,
                "best_metric": res.best_metric, "attempts": res.attempts, "history": res.history,
                "teacher_placement": placement}
        summary = export_stage(prep, trained, target, role, link.unit_sparsity, self.command, assistant,
                               {**info, "key": key})
        return trained, summary, info, key
