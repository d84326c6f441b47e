"""Many jobs on one cluster, one study database: do they finish alone-equal, with no trial lost or counted twice?

    python benchmarks/many_jobs.py [--jobs 4] [--quick]

Starts what a team shares: a Ray head (``ray start --head`` on 127.0.0.1, token authentication on) and Debian's
PostgreSQL (on a Unix socket). Submits ``--jobs`` whole ``minidisc run`` jobs at once through
``minidisc submit`` (the Ray Jobs API), each with its own output directory, half with ``search.strategy:
optuna`` and half with ``optuna-kd``, every one keeping its Optuna study in the one PostgreSQL database
(``search.optuna_storage``). Then runs the same jobs one after another (fresh output directories) and compares:

- wall time, all at once against one after another;
- per job, the pick, every metric and the student's weights, concurrent against alone;
- per study in the database: one per job, its trials by state (COMPLETE = the job's own evaluations, none
  RUNNING or FAILED left, none counted twice).

Tiny BERT teacher and a small made-up task (``tests/conftest.py``): no ``../shared`` needed. Writes
``benchmarks/results/many_jobs.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
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

OPTUNA_TRIALS = 4


def job_configs(root: Path, n: int, storage: str, quick: bool) -> list[Path]:
    from tests.conftest import make_glue_dir, make_tokenizer, save_tiny_teacher

    teacher = save_tiny_teacher(root / "teacher", make_tokenizer(root / "tokenizer"))
    data = make_glue_dir(root / "data", n_train=600, n_dev=120)
    paths = []
    for i in range(n):
        strategy = "optuna" if i % 2 == 0 else "optuna-kd"
        cfg = {"seed": 1 + i // 2, "output_dir": str(root / "unused"),
               "task": {"data": str(data), "max_train_samples": 600, "max_dev_samples": 120, "max_length": 32},
               "teacher": {"model": str(teacher), "finetune": "never"},
               "pruning": {"grid": [0.5, 0.6, 0.7, 0.8, 0.9], "importance_samples": 64, "student_sparsity": 0.9},
               "recovery": {"steps": 20 if quick else 60, "batch_size": 16},
               # one trial at a time: TPE then sees the same history alone and among other jobs (deterministic)
               "search": {"strategy": strategy, "max_concurrent_trials": 1, "optuna_trials": OPTUNA_TRIALS,
                          "optuna_storage": storage},
               "distill": {"steps": 60 if quick else 200, "batch_size": 16, "eval_every": 50, "num_workers": 1,
                           "cpus_per_worker": 1}}
        path = root / f"job{i}-{strategy}.yaml"
        path.write_text("# Run: minidisc submit this file\n" + yaml.safe_dump(cfg))
        paths.append(path)
    return paths


def submit(cfg: Path, out: Path, address: str, token_file: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "minidisc_ray.cli", "submit", str(cfg), "--address", address,
                             "--token-file", str(token_file), "--output", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def result_of(out: Path) -> dict[str, Any]:
    report = json.loads((out / "report.json").read_text())
    weights = sorted((out / "student").glob("*.safetensors"))
    return {"pick": report["search"]["chosen_sparsity"],
            "metrics": [report["teacher"]["metric"], report["student"]["metric"],
                        (report.get("baseline_direct_kd") or {}).get("metric")]
            + [a["metric"] for a in report.get("assistants") or []],
            "evaluations": report["search"]["evaluations"],
            "student_weights": hashlib.sha256(b"".join(p.read_bytes() for p in weights)).hexdigest()[:16]}


def batch(cfgs: list[Path], outs: list[Path], address: str, token_file: Path, env: dict[str, str],
          together: bool) -> tuple[float, list[int], list[str]]:
    t0 = time.monotonic()
    codes, logs = [], []
    if together:
        procs = [submit(c, o, address, token_file, env) for c, o in zip(cfgs, outs, strict=True)]
        for p in procs:
            out, _ = p.communicate()
            codes.append(p.returncode)
            logs.append(out)
    else:
        for c, o in zip(cfgs, outs, strict=True):
            p = submit(c, o, address, token_file, env)
            out, _ = p.communicate()
            codes.append(p.returncode)
            logs.append(out)
    return time.monotonic() - t0, codes, logs


def studies(storage: str) -> dict[str, dict[str, int]]:
    import optuna

    out = {}
    for summary in optuna.get_all_study_summaries(storage):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        states: dict[str, int] = {}
        for t in study.get_trials(deepcopy=False):
            states[t.state.name] = states.get(t.state.name, 0) + 1
        out[summary.study_name] = states
    return out


def main() -> None:
    from tests.servers import postgres_server, start_ray_head, stop_ray_head

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="shorter trials and stages (a smoke run of the script)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mj-"))  # short: Ray's AF_UNIX socket paths must stay under 108 bytes
    token = "minidisc-bench-" + os.urandom(8).hex()
    token_file = root / "token"
    token_file.write_text(token + "\n")
    head_env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"}
    client_env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    client_env.update(RAY_USAGE_STATS_ENABLED="0")
    with postgres_server() as (storage, version):
        print(f"PostgreSQL: {version}", flush=True)
        address = start_ray_head(root / "head", head_env, num_cpus=4)
        try:
            cfgs = job_configs(root, args.jobs, storage, args.quick)
            runs: dict[str, Any] = {}
            for mode in ("together", "one after another"):
                outs = [root / f"{'c' if mode == 'together' else 's'}{i}" for i in range(args.jobs)]
                wall, codes, logs = batch(cfgs, outs, address, token_file, client_env, mode == "together")
                results = [result_of(o) if c == 0 else None for o, c in zip(outs, codes, strict=True)]
                runs[mode] = {"wall_s": round(wall, 1), "exit_codes": codes, "results": results,
                              "failed_tails": [lg.strip().splitlines()[-5:] for lg, c in zip(logs, codes, strict=True)
                                               if c != 0]}
                print(f"{mode}: {wall:.1f} s, exit codes {codes}", flush=True)
            db = studies(storage)
        finally:
            stop_ray_head(root / "head")
    together, alone = runs["together"]["results"], runs["one after another"]["results"]
    same = [a is not None and a == b for a, b in zip(together, alone, strict=True)]
    finished = [v.get("COMPLETE", 0) + v.get("PRUNED", 0) for v in db.values()]
    summary = {
        "postgresql": version, "jobs": args.jobs, "studies_in_database": len(db),
        "wall_together_s": runs["together"]["wall_s"], "wall_one_after_another_s": runs["one after another"]["wall_s"],
        "all_finished": all(c == 0 for r in runs.values() for c in r["exit_codes"]),
        "same_as_alone": same,
        "trials_per_study": db,
        "left_running_or_failed": sum(v.get("RUNNING", 0) + v.get("FAIL", 0) for v in db.values()),
        # every study ran exactly search.optuna_trials trials: none lost, none counted twice
        "every_study_has_its_trials": len(db) == 2 * args.jobs and all(n == OPTUNA_TRIALS for n in finished),
    }
    print(json.dumps(summary, indent=1))
    write("many_jobs", {**summary, "runs": runs}, args.quick)
    shutil.rmtree(root, ignore_errors=True)  # this script's own temporary workspace


if __name__ == "__main__":
    main()
