"""Does SIGTERM end a job like Ctrl-C in every phase, and does the rerun finish with the same result?

    python benchmarks/interrupts.py [--per-kind 20] [--seed 0] [--quick]

Starts whole jobs as a user would (``python -m minidisc_ray.cli``, embedded Ray), on a tiny BERT teacher and
a small made-up sentiment task (no ``../shared`` needed), and sends SIGTERM at a random point of one phase:

- ``run`` (``search.strategy: auto``): data, fine-tune, importance, the lambda search, the halving round;
- ``run`` (``search.strategy: bisection``, so the chain has an assistant): the assistant stage, the student
  stage, the direct-KD baseline;
- ``export`` (``minidisc export --format onnx`` of a finished student);
- ``study`` (``minidisc study --seeds 1``).

A phase starts at its first progress line and ends at the next phase's, as timed in an undisturbed reference
run of the same command; the signal goes at a uniform random point of that span. Each kind (run, export,
study) is interrupted ``--per-kind`` times, the run's times spread round-robin over its phases. Every
interruption must give exit 143, ``minidisc: terminated (SIGTERM); rerun the same command to resume`` as the
last line, and no C++ or Python stack lines; the same command run again must exit 0 with the reference's
result (the pick, every metric, the student's weights). Writes ``benchmarks/results/interrupts.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402
from _common import write  # noqa: E402

LAST_LINE = "minidisc: terminated (SIGTERM); rerun the same command to resume"
CRASH_LINES = ("SIGTERM received", "SIGABRT", "*** ", "logging.cc", "Traceback", "core worker has already been")

# (kind, phase, the progress line that opens it); a phase ends where the next one opens (or the job ends)
PHASES = {
    "run-auto": [("data", "[data]"), ("fine-tune", "[finetune]"), ("importance", "[importance]"),
                 ("search", "[search] strategy"), ("halving round", "[halving]"), ("chain", "[chain]")],
    "run-bisection": [("assistant stage", "[distill assistant]"), ("student stage", "[distill student]"),
                      ("direct-KD baseline", "[distill direct_kd]"), ("report", "[run] done")],
    "export": [("export", "")],
    "study": [("study data", "[data]"), ("study trials", "[study]")],
}


def workspace(root: Path, quick: bool) -> dict[str, Path]:
    from tests.conftest import make_glue_dir, make_tokenizer, save_tiny_teacher

    tok = make_tokenizer(root / "tokenizer")
    teacher = save_tiny_teacher(root / "teacher", tok)
    data = make_glue_dir(root / "data", n_train=600, n_dev=120)
    steps = 120 if quick else 400
    configs = {}
    for name, strategy in (("run-auto", "auto"), ("run-bisection", "bisection"), ("study", "bisection")):
        cfg = {"seed": 1, "output_dir": str(root / "unused"),
               "task": {"data": str(data), "max_train_samples": 600, "max_dev_samples": 120, "max_length": 32},
               "teacher": {"model": str(teacher), "finetune": "always"},
               "finetune": {"max_steps": 150, "batch_size": 16, "lr": 1e-3, "eval_every": 50},
               "pruning": {"grid": [0.5, 0.6, 0.7, 0.8, 0.9], "importance_samples": 64, "student_sparsity": 0.9},
               "recovery": {"steps": 10, "batch_size": 16},
               "search": {"strategy": strategy, "max_concurrent_trials": 2},
               "distill": {"steps": steps, "batch_size": 16, "eval_every": 50, "num_workers": 1,
                           "cpus_per_worker": 1},
               "ray": {"num_cpus": 2}}
        if name == "run-bisection":
            cfg["teacher"]["finetune"] = "never"  # the auto config covers the fine-tune; this one the chain
            cfg["pruning"]["grid"] = [0.5, 0.6, 0.7]  # every candidate is an assistant: the chain has its stage
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        configs[name] = path
    return configs


def command(kind: str, configs: dict[str, Path], out: Path, finished: Path) -> list[str]:
    cli = [sys.executable, "-m", "minidisc_ray.cli"]
    if kind == "export":
        return [*cli, "export", str(finished / "student"), "--format", "onnx", "--output", str(out)]
    if kind == "study":
        return [*cli, "study", str(configs[kind]), "--output", str(out), "--seeds", "1", "--candidates", "3"]
    return [*cli, "run", str(configs[kind]), "--output", str(out)]


def start(argv: list[str], log: Path) -> tuple[subprocess.Popen[bytes], float]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    with open(log, "w") as fh:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=fh, start_new_session=True, env=env)
    return proc, time.monotonic()


def timed_reference(argv: list[str], log: Path, phases: list[tuple[str, str]]) -> dict[str, Any]:
    """Run to the end, noting when each phase's first line appeared (seconds from the start)."""
    proc, t0 = start(argv, log)
    seen: dict[str, float] = {}
    while proc.poll() is None:
        text = log.read_text(errors="replace")
        for name, marker in phases:
            if name not in seen and marker in text:
                seen[name] = time.monotonic() - t0
        time.sleep(0.05)
    end = time.monotonic() - t0
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"interrupts: the reference run of {' '.join(argv)} failed:\n{text[-3000:]}")
    for name, marker in phases:
        seen.setdefault(name, end if marker not in text else end)
    spans = {}
    opens = [seen[name] for name, _ in phases] + [end]
    for i, (name, _) in enumerate(phases):
        spans[name] = (opens[i], max(opens[i], min(o for o in opens[i + 1:])))
    return {"seconds": round(end, 1), "spans": {k: [round(a, 2), round(b, 2)] for k, (a, b) in spans.items()}}


def result_of(kind: str, out: Path) -> dict[str, Any]:
    """What must be the same after an interruption and a rerun as in the undisturbed run."""
    if kind == "export":  # the model and its files; the card names the output directory, which differs
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in sorted(out.iterdir())
                if p.is_file() and p.name != "README.md"}
    if kind == "study":  # every metric it measured and every figure it derived, not the seconds they took
        data = json.loads((out / "study.json").read_text())
        kept = _without_times(data)
        return {"best_student_sparsity": data["best_student_sparsity"],
                "_doc": kept}
    report = json.loads((out / "report.json").read_text())
    weights = sorted((out / "student").glob("*.safetensors"))
    return {"assistant": [a.get("sparsity") for a in report.get("assistants") or [report.get("assistant")] if a],
            "student_metric": report["student"]["metric"],
            "teacher_metric": report["teacher"]["metric"],
            "baseline_metric": (report.get("baseline_direct_kd") or {}).get("metric"),
            "student_weights": hashlib.sha256(b"".join(p.read_bytes() for p in weights)).hexdigest()[:16]}


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    """The paths where two JSON documents differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _diff(x, y, f"{path}[{i}]")]
    same_nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
    return [] if a == b or same_nan else [path or "."]


def _public(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if not k.startswith("_")}


def _without_times(x: Any) -> Any:
    """``x`` without what a rerun changes: wall and CPU times, paths, commands, and how many results it found
    recorded by the interrupted run."""
    if isinstance(x, dict):
        return {k: _without_times(v) for k, v in x.items()
                if not any(t in k for t in ("seconds", "cpu", "cost", "vs_exhaustive", "time", "path", "command",
                                            "machine", "run_id", "recorded", "reused"))}
    if isinstance(x, list):
        return [_without_times(v) for v in x]
    return x


def interrupt_once(argv: list[str], log: Path, marker: str, after: float, patience: float = 600) -> dict[str, Any]:
    proc, t0 = start(argv, log)
    opened = None
    while proc.poll() is None and time.monotonic() - t0 < patience:
        if opened is None and marker in log.read_text(errors="replace"):
            opened = time.monotonic()
        if opened is not None and time.monotonic() - opened >= after:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    sent = round(time.monotonic() - t0, 2) if proc.poll() is None else None
    try:
        rc = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
    text = log.read_text(errors="replace")
    lines = text.strip().splitlines()
    return {"signal_at_s": sent, "exit": rc, "last_line_ok": bool(lines) and lines[-1].startswith(LAST_LINE),
            "crash_lines": [c for c in CRASH_LINES if c in text],
            "tail": lines[-3:] if (rc != 143 or not lines or not lines[-1].startswith(LAST_LINE)) else []}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-kind", default="20", help="interruptions of each kind: N, or run=N,export=N,study=N")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="shorter stages (a smoke run of the script)")
    ap.add_argument("--kinds", default="run,export,study")
    ap.add_argument("--merge", help="a JSON-lines file of trial rows an earlier invocation printed (counted too)")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="minidisc-interrupts-"))
    configs = workspace(root, args.quick)
    logs = root / "logs"
    logs.mkdir()
    references: dict[str, Any] = {}
    wanted = set(args.kinds.split(","))
    for kind in ("run-auto", "run-bisection", "export", "study"):
        exported = kind == "run-bisection" and "export" in wanted  # the student the export kind exports
        if kind.split("-")[0] not in wanted and not exported:
            continue
        out = root / f"reference-{kind}"
        ref = timed_reference(command(kind, configs, out, root / "reference-run-bisection"), logs / f"{kind}.log",
                              PHASES[kind])
        ref["result"] = result_of(kind, out)
        references[kind] = ref
        print(f"reference {kind}: {ref['seconds']} s, phases {ref['spans']}", flush=True)
    counts = ({k: int(v) for k, v in (p.split("=") for p in args.per_kind.split(","))} if "=" in args.per_kind
              else {k: int(args.per_kind) for k in args.kinds.split(",")})
    plan: list[tuple[str, str, str]] = []
    for family in args.kinds.split(","):
        phases = [(kind, name, marker) for kind in PHASES if kind.split("-")[0] == family
                  for name, marker in PHASES[kind] if name != "report"]
        plan += [phases[i % len(phases)] for i in range(counts.get(family, 0))]
    trials = []
    for i, (kind, phase, marker) in enumerate(plan):
        a, b = references[kind]["spans"][phase]
        after = rng.uniform(0, max(b - a, 0.05) * 0.95)
        out = root / f"t{i}-{kind}"
        argv = command(kind, configs, out, root / "reference-run-bisection")
        row = {"kind": kind, "phase": phase, "after_phase_opened_s": round(after, 2),
               **interrupt_once(argv, logs / f"t{i}.log", marker, after)}
        t = time.monotonic()
        rerun = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
        row["rerun_exit"], row["rerun_s"] = rerun.returncode, round(time.monotonic() - t, 1)
        got = result_of(kind, out) if rerun.returncode == 0 else {}
        want = references[kind]["result"]
        row["same_result"] = rerun.returncode == 0 and _public(got) == _public(want) and not _diff(
            got.get("_doc"), want.get("_doc"))
        if rerun.returncode != 0:
            row["rerun_tail"] = rerun.stderr.strip().splitlines()[-3:]
        elif not row["same_result"]:
            row["result"] = _public(got)
            row["differs_in"] = _diff(got.get("_doc"), want.get("_doc"))[:10]
        row["ok"] = (row["exit"] == 143 and row["last_line_ok"] and not row["crash_lines"] and row["same_result"])
        trials.append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(out, ignore_errors=True)  # this script's own temporary output
    if args.merge:
        trials = [{**json.loads(line), "invocation": 1} for line in Path(args.merge).read_text().splitlines()
                  if line.startswith("{")] + trials
    by_kind: dict[str, dict[str, int]] = {}
    for row in trials:
        k = row["kind"].split("-")[0]
        s = by_kind.setdefault(k, {"interrupted": 0, "exit_143": 0, "one_line": 0, "no_stack": 0, "same_result": 0,
                                   "ended_before_the_signal": 0})
        # the job finished before the drawn point, or its work was done when the signal came (exit 0 with its
        # result written; a finished command ignores signals in its teardown): nothing was interrupted
        if row["signal_at_s"] is None or row["exit"] == 0:
            s["ended_before_the_signal"] += 1
            continue
        s["interrupted"] += 1
        s["exit_143"] += row["exit"] == 143
        s["one_line"] += row["last_line_ok"]
        s["no_stack"] += not row["crash_lines"]
        s["same_result"] += row["same_result"]
    print(json.dumps(by_kind, indent=1))
    public = {k: {**v, "result": _public(v["result"])} for k, v in references.items()}
    write("interrupts", {"references": public, "summary": by_kind, "trials": trials}, args.quick)
    shutil.rmtree(root, ignore_errors=True)  # this script's own temporary workspace


if __name__ == "__main__":
    main()
