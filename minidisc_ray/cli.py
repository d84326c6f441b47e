"""The ``minidisc`` command line.

Every command that writes artifacts takes ``--output DIR``; results that scripts read are printed as
one JSON object on the last stdout line; progress goes to stderr. Bad input ends in one line that
names the field, the value and the fix, with exit code 2.

The commands that run on Ray (``run``, ``search``, ``compare``, ``study``, ``finetune``, ``score``) import their
implementation when they run: Ray, ``datasets`` and Optuna take ~3 s to import here, and ``minidisc --help``,
``plan``, ``prune``, ``export`` and every refusal of bad input answer without them.
"""

from __future__ import annotations

import argparse
import errno
import faulthandler
import json
import os
import sys
import time
import typing
from pathlib import Path
from typing import Any

from minidisc_ray.config import Config, TaskConfig, config_from_dict, load_config, parse_overrides
from minidisc_ray.depth import drop_layers, layer_importance, layers_to_drop
from minidisc_ray.errors import ConfigError, MinidiscError, UserInputError
from minidisc_ray.export import export_model
from minidisc_ray.families import count_params, unit_widths
from minidisc_ray.interrupts import VERBOSE_ENV, Terminated, handle_sigterm, shutdown_quietly
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
from minidisc_ray.plan import check_gpus, load_architecture, make_plan, render
from minidisc_ray.pruning import (
    PruningPlan,
    check_sparsity,
    compute_importance,
    param_sparsity,
    plan_for_sparsity,
    prune_model,
)
from minidisc_ray.training import evaluate


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
    from minidisc_ray.data import resolve_data_path  # deferred: Ray and datasets (module docstring)

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
    p = make_plan(arch, kind, list(cfg.pruning.grid), cfg.pruning.student_sparsity, cfg.task.max_length,
                  cfg.recovery.batch_size, cfg.distill.batch_size, args.gpus, args.gpu_memory,
                  source=str(args.config), nodes=args.nodes, placement=args.placement, top_k=cfg.teacher.top_k)
    print(render(p), file=sys.stderr)
    if args.output:
        atomic_write_text(Path(args.output), json.dumps({"written_by": PLAN_MARK, **p}, indent=1) + "\n")
    _print_result(p)
    return 0


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


def _load_model_and_task(model_dir: str, data: str | None, field: str, overrides: list[str] | None,
                         seed: int = 42) -> Any:
    from minidisc_ray.data import load_task, tokenize_task  # deferred: Ray and datasets (module docstring)

    task_cfg = _task_cfg_for_model(model_dir, data, field, overrides)
    model, tokenizer, record, _ = load_model_dir(model_dir, field=field, kind="lm" if task_cfg.type == "lm"
                                                 else "classification")
    check_max_length(model, task_cfg.max_length)
    task = load_task(task_cfg, seed)
    if not task.is_lm and int(model.config.num_labels) != task.num_labels:
        raise UserInputError("--data", task_cfg.data, f"the model has {model.config.num_labels} labels but the data "
                             f"has {task.num_labels}; pass data of the task the model was trained on")
    train, dev, _ = tokenize_task(task, tokenizer, task_cfg.max_length)
    return model, tokenizer, record, task, task_cfg, train, dev


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
    model, tokenizer, record, task, task_cfg, train, _ = _load_model_and_task(args.teacher, args.data, "--teacher",
                                                                              args.set)
    sample = train.shuffle(seed=args.seed).select(range(min(args.samples, len(train))))
    imp = compute_importance(model, make_loader(sample, tokenizer, 32), args.samples, method=args.importance)
    log(f"[importance] {args.importance}: {imp.samples} samples")
    plan = plan_for_sparsity(imp, s, layout=args.layout)
    pruned = prune_model(model, plan)
    depth: dict[str, Any] = {}
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
        "role": "pruned", "source": str(args.teacher), "task": task_record(task, task_cfg), "sparsity": s,
        "params": {"prunable": pa, "total": ta, "teacher_prunable": pb, "teacher_total": tb}, **depth,
        "command": " ".join(["minidisc", *sys.argv[1:]])})
    _print_result(result)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from minidisc_ray.data import make_loader  # deferred: Ray and datasets (module docstring)

    t0 = time.perf_counter()
    model, tokenizer, _, task, _, _, dev = _load_model_and_task(args.model, args.data, "--model", args.set)
    metrics = evaluate(model, make_loader(dev, tokenizer, 64), task.metric)
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


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="minidisc", description="MiniDisc teacher-assistant distillation on Ray.")
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's and Tune's own output (worker logs, status tables) besides minidisc's progress")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)

    def with_config(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("config", help="YAML config, e.g. search_spaces/default.yaml")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
        sp.add_argument("--output", help="output directory (default: the config's output_dir)")
        sp.add_argument("--trust-remote-code", action="store_true",
                        help="allow teacher.trust_remote_code: true in the config to run the model's own code")
        return sp

    sp = with_config("validate", "check a config and report every problem at once")
    sp.set_defaults(func=cmd_validate)
    sp = sub.add_parser("plan", help="parameters, FLOPs and GPU memory of a job from the architecture alone")
    sp.add_argument("config", help="YAML config, a config.json, a model directory or a known hub id")
    sp.add_argument("--gpus", type=int, default=8, help="GPUs per node (default 8)")
    sp.add_argument("--nodes", type=int, default=1, help="nodes of --gpus GPUs each (default 1)")
    sp.add_argument("--placement", default="auto", choices=("auto", "replicated", "sharded", "offline"),
                    help="where the frozen teacher lives (default auto: the first of replicated, offline that fits)")
    sp.add_argument("--gpu-memory", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    sp.add_argument("--output", help="also write the plan as JSON to this file")
    sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
    sp.set_defaults(func=cmd_plan)
    sp = with_config("finetune", "fine-tune the teacher on the task")
    sp.add_argument("--force", action="store_true", help="fine-tune even when the teacher already has a head")
    sp.set_defaults(func=cmd_finetune)
    sp = with_config("run", "the whole job: fine-tune, search the TA, distil the chain, report")
    sp.set_defaults(func=cmd_run)
    sp = with_config("search", "search the teacher assistant with Ray Tune")
    sp.add_argument("--strategy", help="override search.strategy")
    sp.set_defaults(func=cmd_search)
    sp = with_config("compare", "run several search strategies side by side")
    sp.add_argument("--strategies", default="bisection,grid,optuna", help="comma-separated strategy names")
    sp.set_defaults(func=cmd_compare)

    sp = with_config("study", "measure whether the lambda-tradeoff's TA pick can be trusted on this task")
    sp.add_argument("--seeds", type=int, default=3,
                    help="repeats of every trial, with seeds seed, seed+1, ... (default 3)")
    sp.add_argument("--candidates", type=int, default=None,
                    help="TA candidates spread over pruning.grid, both ends kept (default: the whole grid)")
    sp.add_argument("--no-sandwich", action="store_true", help="leave out the sandwich strategy's trials")
    sp.add_argument("--assistants", type=int, default=1,
                    help="2: also distil, per seed, a chain with two assistants at the same total steps (default 1)")
    sp.set_defaults(func=cmd_study)

    sp = with_config("submit", "submit the job to a Ray cluster through the Ray Jobs API")
    sp.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:8265"),
                    help="Ray dashboard URL (default http://127.0.0.1:8265, e.g. through kubectl port-forward)")
    sp.add_argument("--command", dest="command_name", default="run", help="run (default), search, compare, finetune")
    sp.add_argument("--token-file", help="file holding the cluster's auth token (default: $RAY_AUTH_TOKEN)")
    sp.add_argument("--job-id", help="submission id to use (default: generated)")
    sp.add_argument("--no-wait", action="store_true", help="print the job id and return without streaming logs")
    sp.add_argument("--pip", action="store_true", help="install the dependencies in the job's runtime environment")
    sp.set_defaults(func=cmd_submit)
    sp = sub.add_parser("jobs", help="status, logs or stop of a submitted job")
    sp.add_argument("action", choices=["status", "logs", "stop"])
    sp.add_argument("job_id")
    sp.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:8265"))
    sp.add_argument("--token-file")
    sp.set_defaults(func=cmd_jobs)

    sp = sub.add_parser("prune", help="cut a pruned candidate out of a teacher")
    sp.add_argument("--teacher", required=True, help="teacher model directory")
    sp.add_argument("--sparsity", required=True, type=float, help="fraction of heads and neurons to remove, [0, 1)")
    sp.add_argument("--output", required=True, help="directory for the pruned model")
    sp.add_argument("--data", help="data for the importance pass (default: the teacher's task)")
    sp.add_argument("--samples", type=int, default=512, help="importance samples (default 512)")
    sp.add_argument("--importance", choices=("gradient", "activation"), default="gradient",
                    help="gradient: |d loss / d mask| (the paper); activation: no backward pass (default gradient)")
    sp.add_argument("--layout", choices=("global", "uniform"), default="global",
                    help="global: rank units across layers (default); uniform: the same width in every layer")
    sp.add_argument("--drop-layers", type=int, default=0,
                    help="also remove this many whole layers, the least important by 1 - cos(input, output) of the "
                         "hidden states (depth pruning, after the width pruning; default 0)")
    sp.add_argument("--seed", type=int, default=42)
    sp.add_argument("--set", action="append", metavar="task.KEY=VALUE", help="override a task field (repeatable)")
    sp.set_defaults(func=cmd_prune)
    sp = sub.add_parser("export", help="a model directory as ONNX, a torch.export program or a stock HF directory")
    sp.add_argument("model_dir", help="model directory written by minidisc (teacher, TA, student, pruned)")
    sp.add_argument("--format", required=True, choices=("onnx", "torch", "hf"),
                    help="onnx (onnxruntime), torch (torch.export .pt2), hf (from_pretrained; uniform layouts)")
    sp.add_argument("--output", required=True, help="directory for the exported files")
    sp.set_defaults(func=cmd_export)
    sp = sub.add_parser("eval", help="evaluate a model directory on a task's dev split")
    sp.add_argument("--model", required=True, help="model directory (pruned or not)")
    sp.add_argument("--data", help="task data (default: the model's recorded task)")
    sp.add_argument("--set", action="append", metavar="task.KEY=VALUE", help="override a task field (repeatable)")
    sp.set_defaults(func=cmd_eval)
    return p


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as every other error: one line, exit 2 (``--help`` unchanged)."""

    def error(self, message: str) -> typing.NoReturn:
        print(f"minidisc: error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


_PATH_ARGS = ("config", "output", "teacher", "model", "model_dir", "data", "token_file")


def _expand_user(args: argparse.Namespace) -> None:
    """``~`` and ``~user`` in path arguments mean what a shell user expects, even when the shell left them
    (``--output=~/x``) or a script passed them quoted."""
    for name in _PATH_ARGS:
        value = getattr(args, name, None)
        if isinstance(value, str) and value.startswith("~"):
            setattr(args, name, os.path.expanduser(value))


def _os_error(exc: OSError) -> str | None:
    """One line for the file-system failures a user can act on (disk full, read-only, permission)."""
    fixes = {errno.ENOSPC: "the disk is full: free space or choose another --output",
             errno.EDQUOT: "the disk quota is exhausted: free space or choose another --output",
             errno.EROFS: "the file system is read-only: choose another --output",
             errno.EFBIG: "the file is larger than this system allows: free space or choose another --output",
             errno.EACCES: "permission denied: choose a place you can write to",
             errno.EPERM: "permission denied: choose a place you can write to"}
    fix = fixes.get(exc.errno or -1)
    if fix is None:
        return None
    where = exc.filename or "a file"
    return f"writing {where} failed ({exc.strerror}); {fix} (what was being written was removed)"


def main(argv: list[str] | None = None) -> int:

    try:  # a crash in native code (torch, Ray's core) leaves every thread's Python stack on stderr
        faulthandler.enable()
    except (AttributeError, ValueError, OSError):  # a stderr without a file descriptor (captured in-process)
        pass
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    _expand_user(args)

    handle_sigterm()
    if args.verbose:

        os.environ[VERBOSE_ENV] = "1"
    try:
        return int(args.func(args))
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"minidisc: error: {problem}", file=sys.stderr)
        return 2
    except MinidiscError as exc:
        print(f"minidisc: error: {exc}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 2))
    except OSError as exc:
        line = _os_error(exc)
        if line is None:
            raise
        print(f"minidisc: error: {line}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:

        handle_sigterm()  # a second SIGTERM during the shutdown also ends as one line
        terminated = isinstance(exc, Terminated)
        try:
            shutdown_quietly()  # trials and workers end with the Ray this job started or joined
        except KeyboardInterrupt:
            pass
        print(f"minidisc: {'terminated (SIGTERM)' if terminated else 'interrupted'}; rerun the same command to "
              "resume", file=sys.stderr, flush=True)
        return 143 if terminated else 130


if __name__ == "__main__":
    sys.exit(main())
