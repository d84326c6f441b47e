"""Does a job survive a lost node, and a killed driver, with the pick and the student it gives undisturbed?

    python benchmarks/chaos.py [--repeats 3] [--seed 0] [--quick]

A simulated Ray cluster (``ray.cluster_utils.Cluster``: a head with no CPUs for tasks and three worker nodes of
one CPU each) runs whole ``minidisc`` jobs as a user's driver would (``python -m minidisc_ray.cli`` with
``ray.address`` set to the cluster), on a tiny BERT teacher and a small made-up task. Faults, each
``--repeats`` times:

- ``node in search``: the worker node of a running lambda-search trial is removed (its raylet and every
  worker process on it die); Tune's ``FailureConfig`` runs the trial again on another node;
- ``node in halving``: the same, for a running arm of ``auto``'s halving round;
- ``node in stage``: the node of rank 0 of a chain stage on two FSDP workers (one per node) is removed; Ray
  Train starts the worker group again on the surviving nodes from the stage's last checkpoint;
- ``driver kill``: the driver gets SIGKILL at a random point of the job; the same command is run again.

After each node fault a fresh node joins (as a Kubernetes autoscaler would bring one), so the next fault finds
three. The simulated nodes share this machine's disk: a lost node loses its processes and memory, not its
files (checkpoints and records written by its workers survive), which a real node's local disk would not
give; the output directory is shared storage, as the cluster docs ask. Each faulted job must finish (exit 0)
with the undisturbed run's pick and student (metrics and weights). The table counts faults injected,
jobs that survived, what was redone (trials run again, stage steps trained twice) and results lost or
changed. Writes ``benchmarks/results/chaos.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
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

NODE = {"num_cpus": 1, "object_store_memory": 100 * 2**20}


def configs(root: Path, address: str, quick: bool) -> dict[str, Path]:
    """The job of each fault: a search long enough to be hit, a round of arms, a chain on 2 FSDP workers."""
    from tests.conftest import make_glue_dir, make_tokenizer, save_tiny_teacher

    tok = make_tokenizer(root / "tokenizer")
    teacher = save_tiny_teacher(root / "teacher", tok)
    data = make_glue_dir(root / "data", n_train=600, n_dev=120)
    steps = 200 if quick else 600
    base = {"seed": 1, "output_dir": str(root / "unused"),
            "task": {"data": str(data), "max_train_samples": 600, "max_dev_samples": 120, "max_length": 32},
            "teacher": {"model": str(teacher), "finetune": "never"},
            "pruning": {"grid": [0.5, 0.6, 0.7], "importance_samples": 64, "student_sparsity": 0.9},
            "recovery": {"steps": 600, "batch_size": 16},  # search trials of several seconds: a node can lose one
            "search": {"strategy": "grid", "max_concurrent_trials": 2},
            "distill": {"steps": steps, "batch_size": 16, "eval_every": 50, "num_workers": 2,
                        "cpus_per_worker": 1, "parallelism": "fsdp", "max_failures": 2},
            "ray": {"address": address}}
    jobs = {
        "search": {**base},  # the chain after the search also runs: every job here is a whole `minidisc run`
        "halving": {**base, "search": {"strategy": "auto", "max_concurrent_trials": 2},
                    "pruning": {**base["pruning"], "grid": [0.5, 0.6, 0.7, 0.8, 0.9]},
                    "recovery": {"steps": 20, "batch_size": 16}},
        "stage": {**base, "recovery": {"steps": 10, "batch_size": 16}},
    }
    paths = {}
    for name, cfg in jobs.items():
        paths[name] = root / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(cfg))
    return paths


def run_job(cfg: Path, out: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    with open(log, "w") as fh:
        return subprocess.Popen([sys.executable, "-m", "minidisc_ray.cli", "run", str(cfg), "--output", str(out)],
                                stdout=subprocess.DEVNULL, stderr=fh, start_new_session=True, env=env)


def result_of(out: Path) -> dict[str, Any]:
    report = json.loads((out / "report.json").read_text())
    weights = sorted((out / "student").glob("*.safetensors"))
    search = json.loads((out / "search.json").read_text())
    return {"pick": report["search"]["chosen_sparsity"],
            "metrics": [report["student"]["metric"], (report.get("baseline_direct_kd") or {}).get("metric")]
            + [a["metric"] for a in report.get("assistants") or []],
            "student_weights": hashlib.sha256(b"".join(p.read_bytes() for p in weights)).hexdigest()[:16],
            "_redone": {"trials_started_again": int(search.get("trials_started_again", 0)),
                        "stage_steps_redone": sum(int(v.get("steps_redone", 0)) for v in report["distill"].values()),
                        "stage_attempts": {k: v.get("attempts") for k, v in report["distill"].items()}}}


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    def kept(d: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in d.items() if not k.startswith("_") and k != "seconds"}

    return kept(a) == kept(b)


def events(path: Path) -> list[dict[str, Any]]:
    out = []
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def target_node(fault: str, out: Path) -> str | None:
    """The node id (12 hex digits) of a trial / arm / stage rank 0 running now (started, not yet finished)."""
    if fault == "stage":
        found = events(out / "train_events.jsonl")
        starts = [e for e in found if e.get("event") == "start" and e.get("node") and e.get("stage") == "assistant"]
        ended = any(e.get("stage") == "assistant" and e.get("event") == "memory" for e in found) or (
            out / "assistant").exists()
        return None if ended or not starts else str(starts[-1]["node"])
    found = events(out / "trial_events.jsonl")
    done = {e.get("trial_id") for e in found if e.get("event") in ("finish", "rung")}
    running = [e for e in found if e.get("event") == "start" and e.get("node") and e.get("trial_id") not in done
               and (("arm" in e) == (fault == "halving"))]
    return str(running[-1]["node"]) if running else None


def node_fault(cluster: Any, fault: str, cfg: Path, out: Path, log: Path, rng: random.Random) -> dict[str, Any]:
    proc = run_job(cfg, out, log)
    killed, t0 = None, time.monotonic()
    wait_more = rng.uniform(0.2, 1.0)  # into the trial or stage, once it has started
    while proc.poll() is None and killed is None:
        node_id = target_node(fault, out)
        if node_id is not None:
            time.sleep(wait_more)
            victims = [n for n in cluster.worker_nodes if n.node_id.startswith(node_id)]
            if victims and proc.poll() is None and target_node(fault, out) == node_id:  # still running there
                cluster.remove_node(victims[0], allow_graceful=False)
                killed = round(time.monotonic() - t0, 1)
                cluster.add_node(**NODE)  # a fresh node joins, as an autoscaler would bring one
        time.sleep(0.1)
    rc = proc.wait()
    return {"fault_at_s": killed, "exit": rc, "seconds": round(time.monotonic() - t0, 1), "reruns": 0,
            "tail": log.read_text(errors="replace").strip().splitlines()[-2:] if rc else []}


def driver_fault(cfg: Path, out: Path, log: Path, rng: random.Random, span: float) -> dict[str, Any]:
    proc = run_job(cfg, out, log)
    t0 = time.monotonic()
    after = rng.uniform(3.0, span * 0.9)
    while proc.poll() is None and time.monotonic() - t0 < after:
        time.sleep(0.1)
    hit = proc.poll() is None
    if hit:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and anything it started in its session
    proc.wait()
    rerun = run_job(cfg, out, log.with_suffix(".rerun.log"))
    rc = rerun.wait()
    return {"fault_at_s": round(after, 1) if hit else None, "exit": rc, "seconds": round(time.monotonic() - t0, 1),
            "reruns": 1, "tail": log.with_suffix(".rerun.log").read_text(errors="replace").strip().splitlines()[-2:]
            if rc else []}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="faults of each kind")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="shorter stages (a smoke run of the script)")
    ap.add_argument("--faults", default="search,halving,stage,driver")
    args = ap.parse_args()
    from ray.cluster_utils import Cluster

    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="minidisc-chaos-"))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 100 * 2**20})
    for _ in range(3):
        cluster.add_node(**NODE)
    cluster.wait_for_nodes()
    rows: list[dict[str, Any]] = []
    try:
        paths = configs(root, cluster.address, args.quick)
        references: dict[str, Any] = {}
        for name, cfg in paths.items():
            t = time.monotonic()
            proc = run_job(cfg, root / f"reference-{name}", root / f"reference-{name}.log")
            if proc.wait() != 0:
                raise SystemExit(f"chaos: the undisturbed {name} job failed; see {root / f'reference-{name}.log'}")
            references[name] = {"seconds": round(time.monotonic() - t, 1), **result_of(root / f"reference-{name}")}
            print(f"reference {name}: {json.dumps(references[name])}", flush=True)
        for fault in args.faults.split(","):
            for i in range(args.repeats):
                job = "search" if fault == "driver" else fault
                out, log = root / f"{fault}-{i}", root / f"{fault}-{i}.log"
                if fault == "driver":
                    row = driver_fault(paths[job], out, log, rng, references[job]["seconds"])
                else:
                    row = node_fault(cluster, fault, paths[job], out, log, rng)
                row = {"fault": "driver kill" if fault == "driver" else f"node in {fault}", "job": job, **row}
                if row["exit"] == 0:
                    got = result_of(out)
                    row["redone"] = got["_redone"]
                    row["same_as_undisturbed"] = same(got, references[job])
                    if not row["same_as_undisturbed"]:
                        row["result"], row["reference"] = got, references[job]
                else:
                    row["same_as_undisturbed"] = False
                rows.append(row)
                print(json.dumps(row), flush=True)
                shutil.rmtree(out, ignore_errors=True)  # this script's own temporary output
    finally:
        cluster.shutdown()
    table: dict[str, dict[str, Any]] = {}
    for r in rows:
        t = table.setdefault(r["fault"], {"injected": 0, "survived": 0, "trials_run_again": 0,
                                          "stage_steps_redone": 0, "driver_reruns": 0, "lost_or_changed": 0})
        t["injected"] += r["fault_at_s"] is not None
        t["survived"] += r["exit"] == 0
        t["trials_run_again"] += (r.get("redone") or {}).get("trials_started_again", 0)
        t["stage_steps_redone"] += (r.get("redone") or {}).get("stage_steps_redone", 0)
        t["driver_reruns"] += r["reruns"]
        t["lost_or_changed"] += not r["same_as_undisturbed"]
    print(json.dumps(table, indent=1))
    write("chaos", {"cluster": "ray.cluster_utils.Cluster: head (0 CPUs) + 3 worker nodes of 1 CPU, one disk",
                    "references": references, "table": table, "faults": rows}, args.quick)
    shutil.rmtree(root, ignore_errors=True)  # this script's own temporary workspace


if __name__ == "__main__":
    main()
