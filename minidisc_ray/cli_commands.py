"""The ``minidisc`` commands: one ``cmd_*`` function per subcommand of :mod:`minidisc_ray.cli`, each taking the
parsed arguments, printing its result as one JSON line on stdout and returning the exit code.

The commands that run on Ray (``run``, ``search``, ``compare``, ``study``, ``finetune``, ``score``) import their
implementation when they run: Ray, ``datasets`` and Optuna take ~3 s to import here, and ``minidisc --help``,
``plan``, ``validate``, ``export`` and every refusal of bad input answer without them. ``prune`` and ``eval`` read
task data, so they import ``datasets`` (and the data helpers) when they run too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import PreTrainedTokenizerBase

from minidisc_ray.axes import AXES
from minidisc_ray.budget import CostModel, architectures, check_axes, choose_cut, parse_shape
from minidisc_ray.config import Config, TaskConfig, config_from_dict, load_config, parse_overrides
from minidisc_ray.data_paths import resolve_data_path
from minidisc_ray.depth import drop_layers, layer_importance, layers_to_drop
from minidisc_ray.errors import ConfigError, UserInputError
from minidisc_ray.export import export_model
from minidisc_ray.families import count_params, unit_widths
from minidisc_ray.jobs import jobs, submit
from minidisc_ray.logs import log
from minidisc_ray.modelio.load import load_model_dir, save_model_dir
from minidisc_ray.modelio.locate import (
    check_max_length,
    check_remote_code,
    kind_of,
    read_record,
    remote_code_allowed,
    resolve_model,
)
from minidisc_ray.outputs import atomic_write_text, check_model_output, refuse_overlap
from minidisc_ray.plan import check_gpus, make_plan
from minidisc_ray.plan_render import render
from minidisc_ray.plan_shapes import load_architecture
from minidisc_ray.pruning import (
    PruningPlan,
    check_sparsity,
    compute_importance,
    param_sparsity,
    plan_for_sparsity,
    prune_model,
)
from minidisc_ray.training import evaluate

if TYPE_CHECKING:  # annotations only: importing it loads transformers' modeling code (~1 s)
    from transformers import PreTrainedModel

if TYPE_CHECKING:  # types only: importing them loads datasets (module docstring)
    import datasets

    from minidisc_ray.data import TaskData


def _command() -> str:
    return " ".join(["minidisc", *sys.argv[1:]])


def _print_result(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, default=float), flush=True)


def _load(args: argparse.Namespace) -> Config:

    cfg = load_config(args.config, getattr(args, "set", None))
    check_remote_code(cfg.teacher.model, cfg.teacher.trust_remote_code,
                      remote_code_allowed(bool(getattr(args, "trust_remote_code", False))))
    return cfg


def _output(args: argparse.Namespace, cfg: Config | None = None) -> Path:
    out = getattr(args, "output", None) or (cfg.output_dir if cfg else None)
    if not out:
        raise UserInputError("--output", out, "give an output directory")
    return Path(os.path.expanduser(str(out)))


def cmd_validate(args: argparse.Namespace) -> int:
    cfg = _load(args)
    problems: list[UserInputError] = []
    for check in (lambda: resolve_data_path(cfg.task.data), lambda: resolve_model(cfg.teacher.model)):
        try:
            check()
        except UserInputError as exc:
            problems.append(exc)
    if problems:
        raise ConfigError(problems)
    _print_result({"config": str(args.config), "valid": True, "strategy": cfg.search.strategy,
                   "grid": list(cfg.pruning.grid), "student_sparsity": cfg.pruning.student_sparsity})
    return 0


def cmd_plan(args: argparse.Namespace) -> int:

    check_gpus(args.gpus, args.gpu_memory, args.nodes)
    for flag, value in (("--head-memory", args.head_memory), ("--worker-memory", args.worker_memory)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UserInputError(flag, value, "give the host RAM of one node in GiB, e.g. 64")
    target = Path(args.config)
    if target.suffix in (".yaml", ".yml"):
        cfg = load_config(target, args.set)
        arch = load_architecture(cfg.teacher.model)
        kind = "lm" if cfg.task.type == "lm" else "classification"
    else:  # a config.json, a model directory, a GGUF file or a known hub id: the job's defaults
        if args.set:
            raise UserInputError("--set", args.set[0], "overrides apply to a YAML config; plan the YAML instead")
        cfg = Config()
        arch = load_architecture(str(args.config), "CONFIG")
        kind = kind_of(arch)
    if args.output:
        check_plan_output(Path(args.output), target)
    p = make_plan(arch, kind, grid=list(cfg.pruning.grid), student_sparsity=cfg.pruning.student_sparsity,
                  length=cfg.task.max_length, trial_batch=cfg.recovery.batch_size,
                  distill_batch=cfg.distill.batch_size, gpus=args.gpus, gpu_gib=args.gpu_memory,
                  source=str(args.config), nodes=args.nodes, placement=args.placement, top_k=cfg.teacher.top_k,
                  head_gib=args.head_memory, worker_gib=args.worker_memory)
    if args.shape or args.shapes_at is not None:
        p["shapes"] = _plan_shapes(arch, kind, args.shape, args.shapes_at, cfg.task.max_length)
    print(render(p), file=sys.stderr)
    if args.output:
        atomic_write_text(Path(args.output), json.dumps({"written_by": PLAN_MARK, **p}, indent=1) + "\n")
    _print_result(p)
    return 0


def _plan_shapes(arch: Any, kind: str, shape: str | None, budget: float | None, length: int) -> dict[str, Any]:
    """``plan --shape`` / ``--shapes-at``: the parameters and forward FLOPs per token of one cut, and the shapes a
    budget admits (every axis), from the teacher's architecture on the meta device."""
    from minidisc_ray.modelio.weights import empty_model

    cost = CostModel(empty_model(arch, kind=kind), context=length)
    out: dict[str, Any] = {"teacher": cost.arch(cost.L, cost.H, cost.U, cost.N).to_dict()}
    if shape:
        one = parse_shape(shape, cost)
        out["shape"] = {**one.to_dict(), "fraction_of_teacher_params": round(one.params / cost.total, 6)}
        log(f"[plan] shape {one.text()}: {one.params:,} parameters ({one.params / 1e9:.3f}B, "
            f"{one.params / cost.total:.1%} of the teacher), {one.flops / 1e9:.2f} GFLOPs per token at {length}")
    if budget is not None:
        found = architectures(cost, budget, AXES)
        out["shapes_at"] = {"budget": budget, "shapes": [a.to_dict() for a in found]}
        log(f"[plan] {len(found)} shapes within {budget:.0%} of the teacher's parameters removed "
            "(each depth and hidden size with the smallest head/FFN cut that fits):")
        for a in found:
            log(f"[plan]   {a.text()}: {a.params:,} parameters")
    return out


PLAN_MARK = "minidisc-plan"


def check_plan_output(out: Path, source: Path) -> None:
    """``plan --output`` writes only a new file or a plan it wrote before (never the user's other files)."""

    refuse_overlap(out, {"CONFIG": str(source)})
    if out.is_dir():
        raise UserInputError("--output", str(out), "this is a directory; give a file path for the plan's JSON, "
                             "e.g. plan.json")
    for parent in out.absolute().parents:
        if parent.exists() and not parent.is_dir():
            raise UserInputError("--output", str(out), f"{parent} is a file; give a path in a directory")
    if out.exists():
        try:
            ours = json.loads(out.read_text(encoding="utf-8")[:1 << 22]).get("written_by") == PLAN_MARK
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise UserInputError("--output", str(out), "the file exists and is not a plan minidisc wrote; give a "
                                 "new file name (nothing was changed)")


def cmd_export(args: argparse.Namespace) -> int:

    _print_result(export_model(args.model_dir, args.format, args.output))
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from minidisc_ray.pipeline import prepare  # deferred: Ray and datasets (module docstring)

    cfg = _load(args)
    prep = prepare(cfg, _output(args, cfg), finetune_mode="always" if args.force else None)
    _print_result({"teacher": prep.teacher_dir, "metric": prep.teacher_metrics["metric"],
                   "metric_name": prep.task.metric, "params": {"prunable": prep.prunable, "total": prep.total}})
    return 0


def _task_cfg_for_model(model_dir: str, data: str | None, field: str, overrides: list[str] | None) -> TaskConfig:
    """The model's recorded task settings, with ``--data`` and ``--set task.KEY=VALUE`` applied."""

    resolve_model(model_dir, field)  # a missing or broken directory is reported as such, first
    recorded = read_record(model_dir, field).get("task", {}).get("config")
    extra = parse_overrides(overrides)
    unknown = sorted(set(extra) - {"task"})
    if unknown:
        raise UserInputError("--set", unknown[0], "only task fields can be set here, e.g. --set task.text_column=body")
    base = dict(recorded) if isinstance(recorded, dict) else {}
    if data:
        base["data"] = data
    elif not recorded:
        raise UserInputError("--data", None, f"{model_dir} records no task data (minidisc.json); pass --data "
                             "PATH_OR_NAME")
    base.update(extra.get("task", {}))
    return config_from_dict({"task": base}).task


@dataclass(frozen=True)
class ModelAndTask:
    """A model directory loaded with the task it is pruned or evaluated on, tokenised by its tokenizer."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    record: dict[str, Any]  # the model's minidisc.json
    task: TaskData
    task_cfg: TaskConfig
    train: datasets.Dataset
    dev: datasets.Dataset


def _load_model_and_task(model_dir: str, data: str | None, field: str, overrides: list[str] | None,
                         seed: int = 42) -> ModelAndTask:
    from minidisc_ray.data import load_task, tokenize_task  # deferred: Ray and datasets (module docstring)

    task_cfg = _task_cfg_for_model(model_dir, data, field, overrides)
    loaded = load_model_dir(model_dir, field=field, kind="lm" if task_cfg.type == "lm" else "classification")
    model = loaded.model
    check_max_length(model, task_cfg.max_length)
    task = load_task(task_cfg, seed)
    if not task.is_lm and model.config.num_labels != task.num_labels:
        raise UserInputError("--data", task_cfg.data, f"the model has {model.config.num_labels} labels but the data "
                             f"has {task.num_labels}; pass data of the task the model was trained on")
    splits = tokenize_task(task, loaded.tokenizer, task_cfg.max_length)
    return ModelAndTask(model, loaded.tokenizer, loaded.record, task, task_cfg, splits.train, splits.dev)


def cmd_prune(args: argparse.Namespace) -> int:
    from minidisc_ray.data import make_loader  # deferred: Ray and datasets (module docstring)
    from minidisc_ray.pipeline import task_record  # deferred: Ray and datasets (module docstring)

    s = check_sparsity(args.sparsity)
    if args.samples < 1:
        raise UserInputError("--samples", args.samples, "use a positive number of importance samples, e.g. 512")
    if not 0 <= args.seed < 2**32:
        raise UserInputError("--seed", args.seed, "use a seed between 0 and 2**32 - 1, e.g. 42")
    refuse_overlap(args.output, {"--teacher": args.teacher, "--data": args.data})
    out = check_model_output(args.output)
    loaded = _load_model_and_task(args.teacher, args.data, "--teacher", args.set)
    model, tokenizer = loaded.model, loaded.tokenizer
    sample = loaded.train.shuffle(seed=args.seed).select(range(min(args.samples, len(loaded.train))))
    axes = check_axes([a.strip() for a in args.axes.split(",") if a.strip()], "--axes")
    depth: dict[str, Any] = {}
    if set(axes) == {"heads", "ffn"}:  # the unit sparsity of the paper's candidates
        imp = compute_importance(model, make_loader(sample, tokenizer, 32), args.samples, method=args.importance)
        log(f"[importance] {args.importance}: {imp.samples} samples")
        plan = plan_for_sparsity(imp, s, layout=args.layout)
        pruned = prune_model(model, plan)
    else:
        pruned, plan, depth = _cut_by_budget(model, tokenizer, loaded.train, sample, s, axes, args)
    if args.drop_layers:  # depth after width: the layers that turn the (width-pruned) residual stream least

        scores = layer_importance(pruned, make_loader(sample, tokenizer, 32), args.samples)
        drop = layers_to_drop(scores, args.drop_layers, "--drop-layers")
        pruned = drop_layers(pruned, drop)
        plan = PruningPlan.prefix(*unit_widths(pruned), s)
        depth = {"dropped_layers": drop, "layer_importance": [round(x, 6) for x in scores]}
        log(f"[depth] dropped layers {drop} (1 - cos of each layer's input and output: "
            f"{', '.join(f'{x:.4f}' for x in scores)})")
    pb, tb = count_params(model)
    pa, ta = count_params(pruned)
    result = {"sparsity": s, "prunable_before": pb, "prunable_after": pa, "total_before": tb, "total_after": ta,
              "param_sparsity": round(param_sparsity(pa, pb), 6), **depth, "output": str(out)}
    save_model_dir(pruned, tokenizer, out, plan=plan, record={
        "role": "pruned", "source": str(args.teacher), "task": task_record(loaded.task, loaded.task_cfg),
        "sparsity": s, "params": {"prunable": pa, "total": ta, "teacher_prunable": pb, "teacher_total": tb}, **depth,
        "command": " ".join(["minidisc", *sys.argv[1:]])})
    _print_result(result)
    return 0


def _cut_by_budget(model: Any, tokenizer: PreTrainedTokenizerBase, train: Any, sample: Any, budget: float,
                   axes: tuple[str, ...], args: argparse.Namespace) -> tuple[Any, PruningPlan, dict[str, Any]]:
    """``minidisc prune --axes ...`` with hidden or depth: every uniform shape within the budget, scored on 64
    training rows outside the importance sample (distillation loss of the cut teacher, no training)."""
    from minidisc_ray.data import make_loader  # deferred: Ray and datasets (module docstring)

    shuffled = train.shuffle(seed=args.seed)  # the importance sample is its first rows; the held rows follow them
    held_rows = shuffled.select(range(len(sample), min(len(sample) + 64, len(train)))) if len(train) > len(
        sample) else sample
    batches = list(make_loader(sample, tokenizer, 32))
    pruned, plan, ranked = choose_cut(model, batches, list(make_loader(held_rows, tokenizer, 32)), budget, axes,
                                      args.budget, args.importance)
    for arch, loss in ranked[:5]:
        log(f"[prune] {arch.text()}: {arch.params:,} parameters, distillation loss {loss:.4f} on {len(held_rows)} "
            "held rows")
    log(f"[prune] {len(ranked)} shapes within the budget on axes {','.join(axes)}; kept the first")
    best = ranked[0][0]
    return pruned, plan, {"axes": list(axes), "budget": args.budget, "shape": best.to_dict(),
                          "shapes_scored": len(ranked), "distillation_loss": round(ranked[0][1], 6)}


def cmd_eval(args: argparse.Namespace) -> int:
    from minidisc_ray.data import make_loader  # deferred: Ray and datasets (module docstring)

    t0 = time.perf_counter()
    loaded = _load_model_and_task(args.model, args.data, "--model", args.set)
    task, dev = loaded.task, loaded.dev
    metrics = evaluate(loaded.model, make_loader(dev, loaded.tokenizer, 64), task.metric)
    _print_result({"model": args.model, "data": task.source, "metric_name": task.metric, **metrics,
                   "rows": len(dev), "seconds": round(time.perf_counter() - t0, 2)})
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from minidisc_ray.run import run_job  # deferred: Ray and datasets (module docstring)

    cfg = _load(args)
    report = run_job(cfg, _output(args, cfg), command=_command())
    _print_result({k: report[k] for k in ("teacher", "assistant", "student") if k in report})
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from minidisc_ray.search.driver import run_search  # deferred: Ray and datasets (module docstring)

    cfg = _load(args)
    result = run_search(cfg, _output(args, cfg), strategy=args.strategy)
    _print_result({"strategy": result["strategy"], "chosen_sparsity": result["chosen_sparsity"],
                   "evaluations": result["evaluations"], "seconds": result["seconds"]})
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from minidisc_ray.search.driver import run_compare  # deferred: Ray and datasets (module docstring)

    cfg = _load(args)
    names = [s.strip() for s in args.strategies.split(",") if s.strip()]
    result = run_compare(cfg, _output(args, cfg), names)
    _print_result({n: {"chosen_sparsity": r["chosen_sparsity"], "evaluations": r["evaluations"]}
                   for n, r in result["strategies"].items()})
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from minidisc_ray.study.run import run_study  # deferred: Ray and datasets (module docstring)

    cfg = _load(args)
    data = run_study(cfg, _output(args, cfg), seeds=args.seeds, candidates=args.candidates,
                     sandwich=not args.no_sandwich, command=_command(), assistants=args.assistants)
    paper = data["strategies"]["paper"]
    _print_result({"best_student_sparsity": data["best_student_sparsity"],
                   "spearman": data["correlation"]["paper"]["spearman"],
                   "regret": {k: v["regret"]["mean"] for k, v in paper.items()},
                   "direct_kd": data["direct_kd"]["mean"] if data.get("direct_kd") else None,
                   "seconds": data["seconds"]})
    return 0


def cmd_submit(args: argparse.Namespace) -> int:

    return submit(args.config, args.address, args.command_name, args.set, args.output, args.token_file,
                  wait=not args.no_wait, pip=args.pip, job_id=args.job_id,
                  trust_remote_code=bool(getattr(args, "trust_remote_code", False)))


def cmd_jobs(args: argparse.Namespace) -> int:

    return jobs(args.action, args.job_id, args.address, args.token_file)
