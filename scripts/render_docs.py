"""Write the generated blocks of README.md and docs/*.md from the committed results and the package's modules.

    python scripts/render_docs.py            # rewrite every block in place
    python scripts/render_docs.py --check    # exit 1, naming every block that differs from what the files give

A block is everything between two marker comments::

    <!-- results:NAME begin -->
    ...
    <!-- results:NAME end -->

``results:*`` blocks are tables computed from ``benchmarks/results/*.json``; ``modules:table`` is the module table
of docs/architecture.md, from the first paragraph of each module's docstring under ``minidisc_ray/``. Figures in
these blocks are never typed by hand: change the results file (by rerunning its benchmark), then rerun this
script. Standard library only, so that it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PACKAGE = REPO / "minidisc_ray"
BLOCK = re.compile(r"(<!-- (\w+):([\w-]+) begin -->\n)(.*?)(<!-- \2:\3 end -->)", re.S)
STUDY_TASKS = ("sst2", "rte", "tweets", "tweets_x2")  # benchmarks/studies.py's STUDIES, in its order


def _load(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / name).read_text())


def _row(cells: list[str]) -> str:
    return "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"


def _table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join([_row(header), "|" + "---|" * len(header), *(_row(r) for r in rows)])


def _pct(x: float) -> str:
    return f"{x * 100:.2f}%"


def _iv(x: list[float] | None, scale: float = 100.0) -> str:
    return "-" if x is None else f"[{x[0] * scale:+.2f}, {x[1] * scale:+.2f}]"


def _picks(picks: list[float]) -> str:
    return ", ".join(f"{p:g}" for p in picks)


def _studies() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for task in STUDY_TASKS:
        path = RESULTS / f"study_{task}.json"
        if path.is_file():
            out.append((task, json.loads(path.read_text())))
    return out


def _strategy_name(d: dict[str, Any], name: str) -> str:
    if name in ("halving", "auto") and d.get("halving_replay") != "arms":  # recorded before the arm trials:
        return f"{name} (stage arms)"  # replayed on the chains' student curves
    return name


# ---------------------------------------------------------------------------------------------- the studies


def study_summary() -> str:
    """Per task: the study's main figures (what ``python benchmarks/studies.py --summary`` prints first)."""
    rows = []
    for task, d in _studies():
        best = next(c for c in d["candidates"] if c["sparsity"] == d["best_student_sparsity"])
        corr = d["correlation"]["paper"]
        bis, ex = d["strategies"]["paper"]["bisection"], d["strategies"]["paper"]["exhaustive"]
        dk = d["direct_kd"]["best_assistant_minus_direct"]
        lam = d["lambda_range_picking_best"]

        def rng(r: list[float] | None) -> str:
            return "none" if r is None else f"{r[0]:.2f}-{r[1]:.2f}"

        two = d.get("two_assistants")
        two_s = ("-" if not two else
                 f"{two['two_minus_one']['mean'] * 100:+.2f} ({len(two['chains'])} of {d['seeds']} seeds)")
        rows.append([task, _pct(d["teacher"]["metric"]),
                     f"{d['best_student_sparsity']:g} ({_pct(best['student_metric']['mean'])})",
                     f"{corr['spearman']:.2f} {_iv(corr['interval'], 1.0)}", _picks(bis["picks"]),
                     f"{bis['regret']['mean'] * 100:.2f} {_iv(bis['regret']['interval'])}",
                     f"{ex['regret']['mean'] * 100:.2f}", f"{bis['cost_vs_exhaustive']:.2f}",
                     f"{dk['mean'] * 100:+.2f} {_iv(dk['interval'])}",
                     f"{rng(lam['paper'])} / {rng(lam['retained'])}", two_s])
    return _table(["task", "teacher", "best TA (student)", "Spearman [95%]", "bisection picks",
                   "bisection regret, pt [95%]", "exhaustive regret, pt", "bisection cost / exhaustive",
                   "best TA - direct KD, pt [95%]", "lambda picking the best: paper / retained", "two TAs - one, pt"],
                  rows)


def study_strategies() -> str:
    """Every strategy of every study side by side (paper form): picks, held-out regret, cost, pick - direct KD."""
    rows = []
    for task, d in _studies():
        for name, st in d["strategies"]["paper"].items():
            md = st.get("minus_direct")
            cost = st["cost_vs_exhaustive"]
            rows.append([task, _strategy_name(d, name), _picks(st["picks"]),
                         f"{st['regret']['mean'] * 100:.2f} {_iv(st['regret']['interval'])}",
                         "-" if cost is None else f"{cost:.2f}",
                         "-" if not md else f"{md['mean'] * 100:+.2f} {_iv(md['interval'])}"])
    return _table(["task", "strategy", "picks", "regret, pt [95%]", "cost / exhaustive", "pick - direct KD, pt [95%]"],
                  rows)


def study_readme() -> str:
    """The README's one results table: per task, the lambda search, ``auto`` (the default) and exhaustive trial
    distillation, each figure as the study tables print it."""
    rows = []
    for task, d in _studies():
        paper = d["strategies"]["paper"]
        best = next(c for c in d["candidates"] if c["sparsity"] == d["best_student_sparsity"])
        bis, auto, ex = paper["bisection"], paper["auto"], paper["exhaustive"]
        dk = d["direct_kd"]["best_assistant_minus_direct"]
        rows.append([task, _pct(d["teacher"]["metric"]),
                     f"{d['best_student_sparsity']:g} ({_pct(best['student_metric']['mean'])})",
                     f"{bis['regret']['mean'] * 100:.2f} {_iv(bis['regret']['interval'])}",
                     f"{auto['regret']['mean'] * 100:.2f} {_iv(auto['regret']['interval'])}",
                     f"{ex['regret']['mean'] * 100:.2f}",
                     f"{bis['cost_vs_exhaustive']:.2f} / {auto['cost_vs_exhaustive']:.2f}",
                     f"{dk['mean'] * 100:+.2f} {_iv(dk['interval'])}",
                     f"{auto['minus_direct']['mean'] * 100:+.2f} {_iv(auto['minus_direct']['interval'])}"])
    return _table(["task", "teacher", "best TA (student)", "bisection regret, pt [95%]", "`auto` regret, pt [95%]",
                   "exhaustive regret, pt", "cost / exhaustive: bisection / `auto`", "best TA - direct KD, pt [95%]",
                   "`auto` - direct KD, pt [95%]"], rows)


# ------------------------------------------------------------------------------------------ end-to-end runs

END_TO_END = [  # results file -> how the README names its run
    ("run_sst2.json", "`search_spaces/sst2-minilm.yaml --set task.data=../shared/data/glue/SST-2`"),
    ("run_default.json", "`search_spaces/default.yaml --set search.strategy=bisection` (3-class tweets)"),
    ("run_default_auto.json", "`search_spaces/default.yaml` (`auto`, the default now; cores shared)"),
]


def end_to_end() -> str:
    """Single-seed ``minidisc run`` jobs; wall is the job's own ``report.seconds.total``."""
    rows = []
    for name, label in END_TO_END:
        r = _load(name)["report"]
        ta, st, dk = r["assistant"], r["student"], r["baseline_direct_kd"]
        rows.append([label, _pct(r["teacher"]["metric"]), f"{_pct(ta['metric'])} ({ta['sparsity']:g})",
                     _pct(st["metric"]), _pct(dk["metric"]), f"{r['seconds']['total']:.0f} s"])
    return _table(["config", "teacher", "TA (sparsity)", "student at 0.90", "direct KD at 0.90", "wall"], rows)


def smollm2() -> str:
    """The SmolLM2-135M run: teacher, TA, student and direct KD with parameters, lm_score and perplexity."""
    r = _load("run_smollm2.json")["report"]
    steps = {k: v["steps_run"] for k, v in r["distill"].items()}
    search = r["search"]
    labels = [
        ("teacher", "teacher (GGUF Q4_1, dequantised)"),
        ("assistant", f"TA (chosen by {search['strategy']}, {search['evaluations']} of {len(r['candidates'])} "
                      "candidates evaluated)"),
        ("student", f"student through the TA ({steps['teacher_to_assistant']} + "
                    f"{steps['assistant_to_student']} steps)"),
        ("baseline_direct_kd", f"direct KD, the same {steps['direct_kd']} steps"),
    ]
    rows = []
    for key, label in labels:
        m = r[key]
        sparsity = "0" if m["sparsity"] == 0 else f"{m['sparsity']:.2f}"
        rows.append([label, sparsity, f"{m['params'] / 1e6:.1f}M", f"{m['metric']:.4f}", f"{m['perplexity']:.1f}"])
    return _table(["model", "sparsity", "parameters", "dev lm_score", "perplexity"], rows)


# ---------------------------------------------------------------------------------------- the search benchmarks

EFFICIENCY_COLUMNS = [
    ("bisection", "bisection (1/round)"), ("bisection-2/round", "bisection (2/round)"), ("optuna-tpe", "Optuna TPE"),
    ("optuna-tpe-int", "Optuna TPE (int index)"), ("optuna-random", "Optuna random"), ("optuna-grid", "Optuna grid"),
    ("random", "random order"), ("grid", "grid in order"),
]


def _evals(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:g}"


def searcher_efficiency() -> str:
    """Evaluations until the exact argmax is first evaluated: median [range of block medians] / worst."""
    d = _load("searcher_efficiency.json")
    cells: dict[tuple[str, int], dict[str, str]] = {}
    for row in d["rows"]:
        med = row["median_evals_to_argmax"]
        cell = "-" if med is None or math.isinf(med) else _evals(med)
        blocks = row["median_evals_per_block_of_20"]
        if blocks and min(blocks) != max(blocks):
            cell += f" [{_evals(min(blocks))}-{_evals(max(blocks))}]"
        if row["found_exact"] < row["seeds"]:
            cell += f" ({row['found_exact']}/{row['seeds']} exact)"
        else:
            cell += f" / {_evals(row['worst_evals_to_argmax'])}"
        cells.setdefault((row["curve"], row["K"]), {})[row["strategy"]] = cell
    rows = [[curve, str(k), *(by.get(s, "-") for s, _ in EFFICIENCY_COLUMNS)] for (curve, k), by in cells.items()]
    return _table(["curve", "K", *(title for _, title in EFFICIENCY_COLUMNS)], rows)


def scheduling_sst2() -> str:
    """Scheduling cost and the student through each strategy's TA on SST-2."""
    rows = []
    for row in _load("scheduling_sst2.json")["rows"]:
        ta = "none" if row["chosen_ta"] is None else f"{row['chosen_ta']:.2f}"
        rows.append([row["strategy"], str(row["evaluations"]), f"{row['scheduling_cpu_s']:.0f}",
                     f"{row['scheduling_wall_s']:.0f}", ta, _pct(row["student_accuracy"]),
                     f"{row['regret'] * 100:.2f} pt"])
    return _table(["strategy", "candidate evaluations", "scheduling CPU-s", "scheduling wall s", "chosen TA",
                   "student dev accuracy", "regret"], rows)


# -------------------------------------------------------------------------------------- decoders and offline


def offline_teacher() -> str:
    """One student distilled online, online without the hidden-state term, and from offline top-k targets."""
    d = _load("offline_teacher.json")
    arms = d["arms"]
    labels = [
        ("online", "online MiniDisc loss (hidden states + full-vocabulary KL)"),
        ("online_logits", "online, KL half only (the hidden-state term dropped)"),
        ("offline_top_k", f"**offline top-{d['top_k']}** (Ray Data pass {d['offline_pass_seconds']:.0f} s; "
                          f"{d['stored_bytes'] / 1e6:.1f} MB of Parquet)"),
    ]
    rows = [[label, f"{arms[k]['lm_score']:.4f}", f"{arms[k]['seconds_per_step']:.2f}"] for k, label in labels]
    return _table(["loss", "student lm_score", "s/step"], rows)


MODEL_NAMES = {"minilm": "all-MiniLM-L6-v2 (SST-2)", "smollm2": "SmolLM2-135M (tweets, LM)"}


def memory_plan() -> str:
    """``minidisc plan``'s CPU arithmetic against the measured peak of a search trial and a chain stage."""
    by_model: dict[str, dict[str, Any]] = {}
    for row in _load("memory_plan.json")["rows"]:
        by_model.setdefault(row["model"], {})[row["role"]] = row
    rows = []
    for model, roles in by_model.items():
        first = next(iter(roles.values()))
        cells = [f"{MODEL_NAMES.get(model, model)}, {first['batch']} x {first['length']}"]
        for role in ("trial", "stage"):
            r = roles[role]
            cells.append(f"{r['plan_mb']['total']:,.0f} / {r['measured_mb_returns_freed']:,.0f} "
                         f"({r['plan_error'] * 100:+.1f}%)")
        rows.append(cells)
    return _table(["model, batch x tokens", "trial: plan / measured, MB", "stage: plan / measured, MB"], rows)


# ------------------------------------------------------------------------------------------ memory and speed

MEMORY_ROWS = [  # row of memory.json -> (label, what the training-state column adds)
    ("candidate trial (s = 0.5, Ray worker, teacher from the object store)", ""),
    ("chain stage (student s = 0.9, Ray Train worker)", " (+ best-weights copy)"),
]


def memory() -> str:
    """Worker memory growth of a candidate trial and a chain stage against the bytes they hold."""
    rows = []
    for (label, extra), r in zip(MEMORY_ROWS, _load("memory.json")["rows"], strict=True):
        rows.append([label, f"{r['teacher_mb'] + r['candidate_mb']:.0f} MB",
                     f"{r['weights_plus_training_state_mb']:.0f} MB{extra}",
                     f"{r['rss_growth_mb']:.0f} MB ({r['ratio_to_teacher_plus_candidate']:.1f}x / "
                     f"{r['ratio_to_weights_plus_training_state']:.1f}x)"])
    return _table(["", "teacher + candidate weights", "+ gradients and AdamW moments", "measured growth"], rows)


def speed() -> str:
    """The same distillation step bare, with Ray up, in a Ray Train worker; Ray's fixed costs."""
    d = _load("speed.json")
    bare = d["bare_samples_per_s"]
    rows = [
        ["distillation, bare loop (the engine's `Loop`, no Ray running)", f"{bare:.1f} samples/s"],
        ["the same loop with Ray's processes up but idle",
         f"{d['bare_samples_per_s_ray_up']:.1f} samples/s ({d['bare_samples_per_s_ray_up'] / bare:.2f})"],
        ["the same step in one Ray Train worker (optimiser steps only, first step excluded)",
         f"{d['ray_train_samples_per_s_in_loop']:.1f} samples/s ({d['ray_over_bare_ratio']:.2f} of bare, "
         f"{d['ray_over_bare_ray_up_ratio']:.2f} of bare with Ray up)"],
        ["Ray Train stage fixed cost (worker start, model and data from the object store, checkpoint)",
         f"{d['ray_train_fixed_cost_s']:.1f} s"],
        [f"Ray Tune trial overhead ({d['tune_trials']} trials, `reuse_actors`)",
         f"{d['tune_overhead_per_trial_s']:.2f} s per trial against {d['tune_compute_s'] / d['tune_trials']:.1f} s "
         "of compute"],
    ]
    return _table(["measure", "value"], rows)


def speed_latency() -> str:
    """Parameters and CPU forward latency by sparsity."""
    rows = [[f"{r['sparsity']:.2f}", f"{r['prunable']:,}", f"{r['params']:,}", f"{r['latency_ms_batch32']:.1f} ms"]
            for r in _load("speed.json")["cpu_latency"]]
    return _table(["sparsity", "prunable parameters", "all parameters", "CPU forward latency, batch 32"], rows)


def axes() -> str:
    """Per model, axis set and budget: the kept shape, its parameters, metric after recovery and CPU latency."""
    d = _load("axes.json")
    rows = []
    for name, res in d["models"].items():
        t = res["teacher"]
        rows.append([name, "teacher", "-", "-", f"{t['params']:,}", f"{t['metric']:.4f}", "-",
                     f"{t['latency_ms']:.1f} ms"])
        for r in res["candidates"]:
            met = "" if r["meets_budget"] else " (deepest cut; misses the budget)"
            rows.append([name, r["axes"], f"{r['budget']:.1f}", r["shape"] + met, f"{r['params']:,} "
                         f"({r['removed']:.2f} removed)", f"{r['metric_cut']:.4f}", f"{r['metric_recovered']:.4f}",
                         f"{r['latency_ms']:.1f} ms"])
    return _table(["model", "axes", "budget", "shape kept", "parameters", "metric cut", "after recovery",
                   "CPU latency, batch 1"], rows)


def axes_chains() -> str:
    """Per model and axis set: the student of the short chain teacher -> best at 0.5 -> student at 0.8."""
    d = _load("axes.json")
    rows = []
    for name, res in d["models"].items():
        for c in res["chains"]:
            met = "" if c["meets_budget"] else " (misses the budget)"
            rows.append([name, c["axes"], f"{c['assistant_metric']:.4f}", c["shape"] + met,
                         f"{c['params']:,} ({c['removed']:.2f} removed)", f"{c['student_metric']:.4f}",
                         f"{c['latency_ms']:.1f} ms"])
    return _table(["model", "axes", "assistant (0.5) after its stage", "student shape (0.8)", "student parameters",
                   "student metric", "student CPU latency"], rows)


def student_score() -> str:
    """Per committed study: each predictor's Spearman with the students and its argmax's held-out regret."""
    d = _load("student_score.json")
    rows = []
    for name, res in d["studies"].items():
        for pred, j in res["judged"].items():
            rows.append([name, pred, f"{j['spearman']:+.2f}", f"{100 * j['regret']['mean']:.2f}"])
    return _table(["study", "predictor", "Spearman with the student", "argmax regret (points, held out)"], rows)


def _held_out_regret(students: Any, picks: list[int]) -> float:
    """The study's regret in points: the pick made on seed i judged by the other seeds' mean students."""
    import numpy as np

    n, out = len(students), []
    for i, k in enumerate(picks):
        others = students[[j for j in range(n) if j != i]].mean(axis=0) if n > 1 else students.mean(axis=0)
        out.append(float(others.max() - others[k]))
    return 100 * float(np.mean(out))


def _rule_cells(students: Any, direct: Any, picks: list[int], cpu: float, exhaustive_cpu: float) -> list[str]:
    import numpy as np

    kept = np.array([students[i, k] for i, k in enumerate(picks)])
    return [f"{_held_out_regret(students, picks):.2f}", f"{cpu / exhaustive_cpu:.3f}",
            f"{100 * float((kept - direct).mean()):+.2f}"]


def cheap_rules() -> str:
    """Per committed study: exhaustive and auto as replayed, and the rule with no search (the chain through the
    candidate nearest above the student, alone and against direct KD), computed from the study's per-seed students
    and CPU: held-out regret, cost against exhaustive, the kept student minus direct KD, and the issue's target."""
    import numpy as np

    rows = []
    for task, d in _studies():
        paper, grid, cands = d["strategies"]["paper"], d["grid"], d["candidates"]
        na = grid.index(d["student_sparsity"])
        near = na - 1
        students = np.array([c["student_metric"]["per_seed"] for c in cands]).T  # seeds x candidates
        direct = np.array(d["direct_kd"]["per_seed"])
        exhaustive_cpu = paper["exhaustive"]["cpu_seconds"]
        target = 100 * paper["exhaustive"]["regret"]["mean"] + max(0.3, 100 / int(d["data"]["dev_rows"]))
        for name in ("exhaustive", "auto", "auto + direct KD"):
            r = paper[_strategy_name(d, name)] if name != "auto + direct KD" else paper[name]
            md = r.get("minus_direct")
            rows.append([task, name, f"{100 * r['regret']['mean']:.2f}", f"{r['cost_vs_exhaustive']:.3f}",
                         "-" if md is None else f"{100 * md['mean']:+.2f}", f"{target:.2f}"])
        chain = [c["chain_cpu_seconds"] for c in cands]
        alone = [near] * len(students)
        rows.append([task, "nearest assistant", *_rule_cells(students, direct, alone, chain[near], exhaustive_cpu),
                     f"{target:.2f}"])
        better = [near if students[i, near] >= direct[i] else na for i in range(len(students))]
        rows.append([task, "nearest assistant + direct KD",
                     *_rule_cells(students, direct, better, chain[near] + d["direct_kd"]["cpu_seconds"],
                                  exhaustive_cpu), f"{target:.2f}"])
    return _table(["study", "rule", "held-out regret (points)", "cost / exhaustive", "kept student - direct KD "
                   "(points)", "regret target (exhaustive + max(0.3, one dev row))"], rows)


def default_heldout() -> str:
    """The default job since selection reads a validation split: each model's validation and held-out dev metric,
    the pick, what the chain reused from the search, and the wall, beside the previous default run's."""
    rows = []
    for name, label in (("run_default_auto.json", "before (the dev rows selected and reported; cores shared)"),
                        ("run_default_heldout.json", "now (validation carved from train; dev held out)")):
        d = _load(name)
        r = d["report"]
        held = (r.get("splits") or {}).get("held_out") is not None

        def shown(m: dict[str, Any] | None, held: bool = held) -> str:
            if not m:
                return "-"
            return f"{_pct(m['metric'])} / {_pct(m['held_out_metric'])}" if held else _pct(m["metric"])

        ta = r.get("assistant")
        reused = sum(v.get("started_from", {}).get("steps", 0) for v in r["distill"].values())
        rows.append([label, shown(r["teacher"]), "no assistant" if not ta else f"{ta['sparsity']:g}",
                     shown(r["student"]), shown(r.get("baseline_direct_kd")), str(reused),
                     f"{d['wall_seconds']:.0f} s"])
    return _table(["default job (`minidisc run search_spaces/default.yaml`)", "teacher", "pick",
                   "student at 0.90", "direct KD at 0.90", "steps reused from the search", "wall"], rows)


# ----------------------------------------------------------------------------------------------- the modules


def _summary(doc: str | None) -> str:
    """A docstring's first paragraph on one line, reST roles and literals as Markdown code."""
    if not doc:
        return "(no module docstring)"
    text = " ".join(doc.strip().split("\n\n")[0].split())
    text = re.sub(r":(?:func|class|mod|meth|attr|data|obj):`~?([^`]+)`", r"`\1`", text)
    text = text.replace("``", "`").replace("|", "\\|")
    return text


def modules_table() -> str:
    """Every module of ``minidisc_ray/`` with the first paragraph of its docstring."""
    rows = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        try:
            doc = ast.get_docstring(ast.parse(path.read_text()))
        except SyntaxError:
            doc = "(does not parse)"
        shown = rel[: -len("__init__.py")] if path.name == "__init__.py" else rel
        rows.append([f"[`{shown}`](../{rel})", _summary(doc)])
    return _table(["module", "what it holds"], rows)


BLOCKS: dict[str, Callable[[], str]] = {
    "results:study_readme": study_readme,
    "results:study_summary": study_summary,
    "results:study_strategies": study_strategies,
    "results:end_to_end": end_to_end,
    "results:smollm2": smollm2,
    "results:searcher_efficiency": searcher_efficiency,
    "results:scheduling_sst2": scheduling_sst2,
    "results:offline_teacher": offline_teacher,
    "results:memory_plan": memory_plan,
    "results:memory": memory,
    "results:speed": speed,
    "results:speed_latency": speed_latency,
    "results:axes": axes,
    "results:axes_chains": axes_chains,
    "results:student_score": student_score,
    "results:cheap_rules": cheap_rules,
    "results:default_heldout": default_heldout,
    "modules:table": modules_table,
}


def documents() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def render(text: str, where: str, problems: list[str], cache: dict[str, str]) -> str:
    """``text`` with every block rewritten; what is wrong with a block (unknown name, no table) goes to
    ``problems``."""

    def one(m: re.Match[str]) -> str:
        name = f"{m.group(2)}:{m.group(3)}"
        if name not in BLOCKS:
            problems.append(f"{where}: unknown block {name} (known: {', '.join(BLOCKS)})")
            return m.group(0)
        if name not in cache:
            try:
                cache[name] = BLOCKS[name]()
            except (OSError, KeyError, ValueError, TypeError) as e:
                problems.append(f"{where}: block {name} cannot be built from the files: {type(e).__name__}: {e}")
                return m.group(0)
        return f"{m.group(1)}\n{cache[name]}\n\n{m.group(5)}"

    return BLOCK.sub(one, text)


def process(write: bool) -> tuple[list[str], list[str]]:
    """Every block of every document against what the files give: (problems, blocks that differ), each a line
    naming the document and the block. With ``write``, the documents are rewritten and the differing blocks are
    the ones rewritten."""
    problems: list[str] = []
    differ: list[str] = []
    cache: dict[str, str] = {}
    for doc in documents():
        where = doc.relative_to(REPO).as_posix()
        old = doc.read_text()
        new = render(old, where, problems, cache)
        if new == old:
            continue
        new_blocks = {f"{m.group(2)}:{m.group(3)}": m.group(4) for m in BLOCK.finditer(new)}
        changed = sorted({f"{m.group(2)}:{m.group(3)}" for m in BLOCK.finditer(old)
                          if new_blocks.get(f"{m.group(2)}:{m.group(3)}", m.group(4)) != m.group(4)})
        differ += [f"{where}: block {name} differs from what the files give" for name in changed]
        if write:
            doc.write_text(new)
            print(f"rewrote {where}: {', '.join(changed)}")
    return problems, differ


def run(check: bool) -> int:
    problems, differ = process(write=not check)
    for line in problems + (differ if check else []):
        print(line, file=sys.stderr)
    if check and differ:
        print("run `python scripts/render_docs.py` to rewrite them", file=sys.stderr)
    return 1 if problems or (check and differ) else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if any block differs")
    sys.exit(run(ap.parse_args().check))


if __name__ == "__main__":
    main()
