"""The ``minidisc`` command line: its parser (:func:`build_parser`) and :func:`main`, which runs a command and turns
every failure a user can act on into one line.

Every command that writes artifacts takes ``--output DIR``; results that scripts read are printed as
one JSON object on the last stdout line; progress goes to stderr. Bad input ends in one line that
names the field, the value and the fix, with exit code 2. The commands themselves are in
:mod:`minidisc_ray.cli_commands`; those that run on Ray (``run``, ``search``, ``compare``, ``study``, ``finetune``,
``score``) import their implementation when they run, so ``minidisc --help``, ``plan``, ``prune``, ``export`` and
every refusal of bad input answer without Ray, ``datasets`` and Optuna (~3 s to import here).
"""

from __future__ import annotations

import argparse
import errno
import faulthandler
import os
import signal
import sys
import typing

from minidisc_ray.cli_commands import (
    cmd_compare,
    cmd_eval,
    cmd_export,
    cmd_finetune,
    cmd_jobs,
    cmd_plan,
    cmd_prune,
    cmd_run,
    cmd_search,
    cmd_study,
    cmd_submit,
    cmd_validate,
)
from minidisc_ray.errors import ConfigError, MinidiscError
from minidisc_ray.interrupts import (
    VERBOSE_ENV,
    Terminated,
    driver_without_core_signal_handler,
    exit_now,
    handle_sigterm,
    ray_call_running,
    shutdown_quietly,
)


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
    sp.add_argument("--head-memory", type=float, default=None, metavar="GIB",
                    help="host RAM of the driver's node in GiB: say whether the driver fits it")
    sp.add_argument("--worker-memory", type=float, default=None, metavar="GIB",
                    help="host RAM of a worker node in GiB: say whether a stage's rank 0 fits it")
    sp.add_argument("--output", help="also write the plan as JSON to this file")
    sp.add_argument("--shape", help="also size one cut of the teacher: layers=,hidden=,ffn=,heads=,kv_heads=,head_dim= "
                                    "(any subset; the rest stay the teacher's)")
    sp.add_argument("--shapes-at", type=float, metavar="BUDGET",
                    help="also list the uniform shapes pruning.axes heads,ffn,hidden,depth would consider at this "
                         "fraction of the teacher's parameters removed, e.g. 0.5")
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
    sp.add_argument("--sparsity", required=True, type=float,
                    help="fraction to remove, [0, 1): of heads and neurons with --axes heads,ffn (default); of the "
                         "teacher's total parameters (or --budget) when the axes include hidden or depth")
    sp.add_argument("--axes", default="heads,ffn",
                    help="what to cut: any of heads, ffn, hidden, depth (comma-separated; default heads,ffn). With "
                         "hidden or depth, every shape within the budget is scored by its distillation loss on "
                         "held rows and the best is cut, with the same width in every layer")
    sp.add_argument("--budget", choices=("params", "flops", "latency"), default="params",
                    help="what --sparsity removes with hidden or depth: parameters (default), forward FLOPs per "
                         "token, or CPU latency measured here")
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
    """The ``minidisc`` command. Run as the process (``argv`` None), the exit code it returns is final: a signal
    in the interpreter's teardown that follows (which puts the default SIGTERM action back, so the process would
    die with -15 after its work was done and said) is ignored."""
    code = _main(argv)
    if argv is None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
    return code


def _main(argv: list[str] | None) -> int:

    try:  # a crash in native code (torch, Ray's core) leaves every thread's Python stack on stderr
        faulthandler.enable()
    except (AttributeError, ValueError, OSError):  # a stderr without a file descriptor (captured in-process)
        pass
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    driver_without_core_signal_handler()  # SIGTERM ends the job with its one line, no C++ lines (module interrupts)
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
        # the job is ending: a second signal must not cut the line off (the handlers come back before returning)
        before = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        terminated = isinstance(exc, Terminated)
        line = (f"minidisc: {'terminated (SIGTERM)' if terminated else 'interrupted'}; rerun the same command to "
                "resume")
        code = 143 if terminated else 130
        if ray_call_running():  # Ray cannot be shut down under a live call: end now (module interrupts)
            print(line, file=sys.stderr, flush=True)
            exit_now(code)
        shutdown_quietly()  # trials and workers end with the Ray this job started or joined
        print(line, file=sys.stderr, flush=True)
        for sig, handler in before.items():
            signal.signal(sig, handler)
        return code


if __name__ == "__main__":
    sys.exit(main())
