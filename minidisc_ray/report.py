"""Every report minidisc-ray writes: the run's (``report.{json,md}``, ``tradeoff.png``,
``metric_vs_params.png``), the comparison's (``compare.*``), the study's (``study.*``), the model card, and
the halving evidence lines, with one plotting helper (:func:`figure`) that benchmarks use too.

Sparsity labels: ``sparsity`` in a row is the *unit* sparsity (fraction of attention heads and FFN neurons
removed, what the grid and the CLI name); ``param_sparsity`` is the *parameter* sparsity (fraction of the
teacher's prunable parameters removed, what the tradeoff scores).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from minidisc_ray.metrics import perplexity_of_score
from minidisc_ray.outputs import atomic_write_text, write_json
from minidisc_ray.stats import dev_noise

UNIT_SPARSITY = "unit sparsity (heads and FFN neurons removed)"
PARAM_SPARSITY = "parameter sparsity (prunable parameters removed)"


@contextmanager
def figure(path: Path, ncols: int = 1, size: tuple[float, float] = (6.5, 4.0), dpi: int = 120,
           sharey: bool = False) -> Iterator[Any]:
    """``with figure(path, 2) as (fig, (a, b)):`` draw; the figure is laid out, saved and closed on exit
    (headless: the Agg backend)."""
    import matplotlib  # deferred: plotting only, a second of start-up for every process that imports reports

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=size, sharey=sharey)
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)


def label(ax: Any, xlabel: str, ylabel: str, title: str, legend_size: float | None = None) -> None:
    """Axis labels, title, a light grid and the legend: every plot's finish."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(**({"fontsize": legend_size} if legend_size else {}))


# --- model card ---

def model_card(role: str, record: dict[str, Any], command: str) -> str:
    p = record["params"]
    lines = [f"# minidisc-ray {role}", "",
             f"Made by minidisc-ray (MiniDisc, arXiv 2205.14570) with: `{command}`", "",
             "| | value |", "|---|---|",
             f"| teacher | {record['teacher']} |",
             f"| assistant it learnt from | {record.get('assistant') or 'none'} |",
             f"| {UNIT_SPARSITY} | {record['sparsity']:.3f} |",
             f"| {PARAM_SPARSITY} | {record['param_sparsity']:.3f} |",
             f"| parameters | {p['total']:,} total, {p['prunable']:,} prunable (transformer layers) |",
             f"| dev {record['metric_name']} | {record['metric']:.4f} |",
             f"| task data | {record['task']['source']} |", "",
             "Load it with minidisc-ray (transformers cannot rebuild pruned shapes by itself):", "",
             "```python", "from minidisc_ray import load_model_dir",
             "model, tokenizer, record, _ = load_model_dir(PATH)", "```", "",
             "Or export it to files that run without minidisc-ray (each checked against this model's logits):", "",
             "```bash", "minidisc export PATH --format onnx --output PATH-onnx    # onnxruntime",
             "minidisc export PATH --format torch --output PATH-pt2    # torch.export.load(...).module()",
             "minidisc export PATH --format hf --output PATH-hf       # from_pretrained; uniform layouts only",
             "```", ""]
    return "\n".join(lines)


# --- minidisc run ---

def run_report(prep: Any, search: dict[str, Any], lambda_range: list[float] | None,
               later_searches: list[dict[str, Any]], assistants: list[dict[str, Any]], student: dict[str, Any],
               baseline: dict[str, Any] | None, distill: dict[str, Any], run_id: str, seconds: dict[str, float],
               command: str) -> dict[str, Any]:
    """The content of ``report.json``: every model of the chain, the search that chose the assistant(s), the
    stages and their seconds (perplexity beside the score for language modelling)."""
    cfg = prep.cfg
    kept = ("sparsity", "param_sparsity", "params", "prunable", "metric", "tradeoff", "seconds", "node", "order",
            "reused")
    report: dict[str, Any] = {
        "teacher": {"sparsity": 0.0, "param_sparsity": 0.0, "params": prep.total, "prunable": prep.prunable,
                    "metric": prep.teacher_metrics["metric"], "path": prep.teacher_dir},
        "assistant": assistants[0] if assistants else None, "assistants": assistants, "student": student,
        "metric_name": prep.task.metric,
        "candidates": [{k: c.get(k) for k in kept} for c in search["candidates"] if not c.get("failed")],
        "search": {"strategy": search["strategy"], "evaluations": search["evaluations"],
                   "reused": search["reused"], "seconds": search["seconds"], "cpu_seconds": search["cpu_seconds"],
                   "chosen_sparsity": search["chosen_sparsity"], "lam": cfg.pruning.lam,
                   "tradeoff_form": cfg.pruning.tradeoff, "nodes": search["nodes"],
                   "lambda_range_of_pick": lambda_range, "lambda_pick": search.get("lambda_pick"),
                   "halving": search.get("halving"),
                   "assistant_searches": [{"grid": x["grid"], "chosen_sparsity": x["chosen_sparsity"],
                                           "evaluations": x["evaluations"], "seconds": x["seconds"]}
                                          for x in later_searches]},
        "distill": distill, "baseline_direct_kd": baseline, "run_id": run_id,
        "seconds": {**seconds, **{name: v["seconds"] for name, v in distill.items()}},
        "data": prep.task.describe(), "command": command, "config": cfg.to_dict(),
    }
    if prep.task.is_lm:
        vocab = int(getattr(prep.teacher.config, "vocab_size"))  # noqa: B009 - typed as Module attribute
        for entry in (report["teacher"], *assistants, student, baseline):
            if entry:
                entry["perplexity"] = perplexity_of_score(entry["metric"], vocab)
    return report


def keep_line(r: dict[str, Any]) -> str | None:
    """Which of the two students a run exports to keep: the TA path's or the direct-KD baseline's (trained by
    default beside it), the better on dev, with the dev set's noise bound for the difference."""
    base, student = r.get("baseline_direct_kd"), r["student"]
    if not base or not assistants_of(r):
        return None
    path_wins = student["metric"] >= base["metric"]
    gap = abs(student["metric"] - base["metric"])
    rows = (r.get("data") or {}).get("dev_rows")
    noise = dev_noise(r["metric_name"], max(student["metric"], base["metric"]), rows) if rows else None
    scale = 100.0 if r["metric_name"] != "lm_score" else 1.0
    unit = " pt" if scale == 100.0 else ""
    side = "beyond" if noise is not None and gap > noise else "within"
    sure = "" if noise is None else f"; the gap is {side} the dev set's noise bound of {noise * scale:.1f}{unit}"
    tail = " Both are the same size; `minidisc study` measures which path wins on held-out seeds."
    if gap == 0:
        return (f"Which student to keep: either; `student/` (the assistant path) and `direct_kd_student/` (direct "
                f"KD, no assistant) score the same on dev.{tail}")
    return (f"Which student to keep: **{'student/' if path_wins else 'direct_kd_student/'}** "
            f"({'the assistant path' if path_wins else 'direct KD, no assistant'}), {gap * scale:.2f}{unit} "
            f"above the other on dev{sure}.{tail}")


def assistants_of(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Every assistant of a report, in chain order (reports from before ``assistants`` hold one)."""
    return list(r.get("assistants") or ([r["assistant"]] if r.get("assistant") else []))


def run_markdown(r: dict[str, Any]) -> str:
    name = r["metric_name"]
    tas = assistants_of(r)
    rows = [("teacher", r["teacher"]),
            *[(f"assistant{f' {k}' if len(tas) > 1 else ''}", a) for k, a in enumerate(tas, 1)],
            (f"student (via {len(tas)} assistant{'s' if len(tas) > 1 else ''})" if tas else
             "student (no assistant: direct KD at the assistant path's total steps)", r["student"]),
            ("student, direct KD (no assistant)", r["baseline_direct_kd"])]
    lines = ["# minidisc-ray report", "", f"Command: `{r['command']}`", "",
             f"| model | unit sparsity | parameter sparsity | parameters | dev {name} |", "|---|---|---|---|---|"]
    for role, m in rows:
        if m:
            param_s = "-" if m.get("param_sparsity") is None else f"{m['param_sparsity']:.3f}"
            lines.append(f"| {role} | {m['sparsity']:.2f} | {param_s} | {m['params']:,} | {m['metric']:.4f} |")
    keep = keep_line(r)
    if keep:
        lines += ["", keep]
    s = r["search"]
    rng = s.get("lambda_range_of_pick")
    stable = ("" if "lambda_range_of_pick" not in s else
              " No lambda makes it the argmax of the evaluated candidates alone." if rng is None else
              f" It stays the argmax of the evaluated candidates for lambda in [{rng[0]:.3f}, {rng[1]:.3f}]; "
              "`minidisc study` measures whether the argmax gives the best student on this task.")
    lines += ["", f"Assistant search: {s['strategy']}, {s['evaluations']} candidate evaluations in "
              f"{s['seconds']:.0f} s "
              f"(lambda {s['lam']}), chosen assistant at unit sparsity {s['chosen_sparsity']}.{stable}", ""]
    if s.get("halving"):
        h = s["halving"]
        lam_pick = f" The lambda search alone picked {s['lambda_pick']}." if s.get("lambda_pick") is not None else ""
        top = h["rungs"][-1]["student_steps"] if h["rungs"] else 0
        loaded = h.get("first_links_loaded") or []
        kept = (f" {len(loaded)} of the arms started from the candidate the lambda search had recovered (its first "
                "link loaded, not trained again)." if loaded else "")
        lines += [f"Trial distillation ({h['scheduler']}, reduction {h['reduction']}) among "
                  f"{len(h['arms'])} arms, each student distilled for up to {top} "
                  f"steps after {h['first_link_steps']} first-link steps; dev noise is one standard error of the "
                  f"winner's lead over the runner-up on the {h['dev_rows']} dev rows (paired: from the rows where "
                  "their predictions differ; otherwise the bound for two independent models)."
                  f"{kept}{lam_pick}", "",
                  *[f"- {line}" for line in evidence_lines(h, name)], ""]
    lines += [
              "| candidate unit sparsity | parameter sparsity | parameters | dev metric after recovery "
              "| lambda-tradeoff |",
              "|---|---|---|---|---|"]
    for c in sorted(r["candidates"], key=lambda c: c["sparsity"]):
        param_s = "-" if c.get("param_sparsity") is None else f"{c['param_sparsity']:.3f}"
        lines.append(f"| {c['sparsity']:.2f} | {param_s} | {c['params']:,} | {c['metric']:.4f} | {c['tradeoff']:.4f} |")
    lines += ["", "| stage | seconds | steps | best step | attempts (this run) |", "|---|---|---|---|---|"]
    for k, v in r["distill"].items():
        attempts = "0 (reused from an earlier run)" if v.get("reused") else v["attempts"]
        lines.append(f"| {k} | {v['seconds']:.0f} | {v['steps_run']} | {v['best_step']} | {attempts} |")
    lines += ["", f"Total {r['seconds']['total']:.0f} s.", "", "![tradeoff](tradeoff.png)",
              "![metric vs parameters](metric_vs_params.png)", ""]
    return "\n".join(lines)


def plot_run(r: dict[str, Any], out: Path) -> None:
    """``tradeoff.png`` (the candidates' lambda-tradeoff, the pick circled) and ``metric_vs_params.png``."""
    cands = sorted(r["candidates"], key=lambda c: c["sparsity"])
    chosen = r["search"]["chosen_sparsity"]
    with figure(out / "tradeoff.png") as (_, ax):
        ax.plot([c["sparsity"] for c in cands], [c["tradeoff"] for c in cands], "o-", label="candidates (evaluated)")
        for c in cands:
            if c["sparsity"] == chosen:
                ax.scatter([chosen], [c["tradeoff"]], s=200, facecolors="none", edgecolors="red", linewidths=2,
                           label=f"chosen assistant (s={chosen})")
        label(ax, UNIT_SPARSITY, f"{r['metric_name']} + {r['search']['lam']} x parameter sparsity",
              "Lambda-tradeoff of assistant candidates")
    with figure(out / "metric_vs_params.png") as (_, ax):
        ax.scatter([c["params"] / 1e6 for c in cands], [c["metric"] for c in cands], c="grey", label="candidates")
        tas = assistants_of(r)
        marks = [("teacher", r["teacher"], "black", "o"),
                 *[(f"assistant {k}" if len(tas) > 1 else "assistant", a, "red", "*") for k, a in enumerate(tas, 1)],
                 ("student", r["student"], "blue", "*"), ("direct KD", r.get("baseline_direct_kd"), "orange", "*")]
        for name, m, color, marker in marks:
            if m:
                ax.scatter([m["params"] / 1e6], [m["metric"]], s=90, c=color, label=name, marker=marker)
        label(ax, "parameters (millions)", f"dev {r['metric_name']}", "Dev metric against size")


def evidence_lines(h: dict[str, Any], metric: str) -> list[str]:
    """The report's lines: per rung, the winner, its margin and the dev set's noise."""
    lines = []
    for r in h["rungs"]:
        if r.get("margin") is None:
            lines.append(f"rung {r['rung']} ({r['student_steps']} student steps): {r['winner']} alone, "
                         f"{metric} {r['arms'][0]['metric']:.4f}")
            continue
        if r["noise"] is None:
            noise = "noise not estimated for this metric"
        else:
            side = "beyond" if r["beyond_noise"] else "within"
            paired = r.get("noise_kind") == "paired"
            how = f"paired: they disagree on {r['disagree']} of {r['rows']} dev rows; " if paired else ""
            noise = f"noise {100 * r['noise']:.1f} pt ({how}{side} it)"
        others = ", ".join(f"{a['arm']} {a['metric']:.4f}" for a in r["arms"])
        lines.append(f"rung {r['rung']} ({r['student_steps']} student steps): {r['winner']} won by "
                     f"{100 * r['margin']:.1f} pt over {r['runner_up']}, {noise}; {others}")
    verdict = _verdict(h)
    return lines + ([verdict] if verdict else [])


def _verdict(h: dict[str, Any]) -> str | None:
    """One line on how sure the pick is: the last rung where two arms were compared, its margin against noise."""
    contested = [r for r in h["rungs"] if r.get("margin") is not None and r.get("noise") is not None]
    if not contested:
        return None
    r = contested[-1]
    if r["beyond_noise"]:
        times = f"{r['margin'] / r['noise']:.1f} times" if r["noise"] > 0 else "more than"
        return (f"how sure: {r['winner']} led {r['runner_up']} at rung {r['rung']}, the last where two arms met, by "
                f"{times} the noise")
    return (f"how sure: not separated; at rung {r['rung']}, the last where two arms met, {r['winner']}'s lead over "
            f"{r['runner_up']} is within the dev set's noise, so on this dev set the pick is as likely one as the "
            "other; a longer round (search.halving_steps) or more dev rows would separate them")


# --- minidisc compare ---

def compare_markdown(data: dict[str, Any]) -> str:
    lines = ["| strategy | chosen assistant (unit sparsity) | evaluations | evaluations to reach the grid's pick "
             "| CPU s (cost) "
             "| reused from the record | wall s here |", "|---|---|---|---|---|---|---|"]
    for name, r in data["strategies"].items():
        lines.append(f"| {name} | {r['chosen_sparsity']} | {r['evaluations']} | {r.get('evaluations_to_truth')} | "
                     f"{r['cpu_seconds']:.1f} | {r.get('reused', 0)} | {r['seconds']:.1f} |")
    return f"# Strategy comparison (lambda = {data['lam']})\n\n" + "\n".join(lines) + "\n"


def plot_compare(data: dict[str, Any], path: Path) -> None:
    """Lambda-tradeoff against unit sparsity for every strategy, each strategy's pick circled."""
    markers = "osD^vP*X"
    with figure(path, size=(7, 4.2)) as (_, ax):
        for k, (name, r) in enumerate(data["strategies"].items()):
            pts = sorted((c["sparsity"], c["tradeoff"]) for c in r["candidates"]
                         if not c.get("failed") and c.get("tradeoff") is not None)
            if not pts:
                continue
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker=markers[k % len(markers)], linestyle="-" if name == "grid" else ":",
                    alpha=0.8, label=f"{name} ({r['evaluations']} eval.)")
            if r["chosen_sparsity"] is not None and r.get("chosen") and r["chosen"].get("tradeoff") is not None:
                ax.scatter([r["chosen_sparsity"]], [r["chosen"]["tradeoff"]], s=180, facecolors="none",
                           edgecolors=f"C{k}", linewidths=2)
        label(ax, f"assistant {UNIT_SPARSITY}", f"metric + {data['lam']} x parameter sparsity",
              "Lambda-tradeoff of assistant candidates; circles: each strategy's pick", legend_size=8)


# --- minidisc study ---

def _iv(x: list[float] | None, fmt: str = "{:+.2f}", scale: float = 1.0) -> str:
    return "-" if x is None else "[" + ", ".join(fmt.format(v * scale) for v in x) + "]"


def _row_scale(d: dict[str, Any], pct: float) -> str:
    """For accuracy: how many points one dev row is, so that a regret reads as rows gained or lost."""
    rows = (d.get("data") or {}).get("dev_rows")
    if d["metric_name"] != "accuracy" or not rows:
        return ""
    held_out = max(1, d["seeds"] - 1)
    return (f" On {rows:,} dev rows one row is {pct / rows:.2f} points of accuracy, and a regret (a mean over "
            f"{held_out} held-out seed{'s' if held_out > 1 else ''}) moves in steps of {pct / rows / held_out:.2f}: "
            "differences of a row or two are within the dev set's resolution.")


def _walls(d: dict[str, Any]) -> str:
    """The study's times: this invocation's wall, and what its trials took wherever they ran (earlier runs too)."""
    if "trial_seconds" not in d:  # written before the trials' own times were summed
        return f"Wall {d['seconds']:.0f} s; trials used {d['trial_cpu_seconds']:.0f} CPU-s."
    earlier = d.get("trials_recorded_before", 0)
    return (f"Wall {d['seconds']:.0f} s for this invocation ({earlier} of its {d['trials']} trials read from the "
            f"records of earlier ones); the trials' own times, earlier invocations' included, sum to "
            f"{d['trial_seconds']:.0f} s wall and {d['trial_cpu_seconds']:.0f} CPU-s.")


def partial_stage_lines(d: dict[str, Any]) -> list[str]:
    """study.md's lines on what auto would cost with arms that run part of the chain's own stages."""
    lines = []
    for ps in d.get("partial_stage_arms") or []:
        lo, hi = ps["cost_vs_exhaustive"]
        lines.append(f"- priced, not replayed: auto with arms that run {ps['assistant_fraction']:.2f} of the chain's "
                     f"teacher -> assistant stage (the winner's chain resuming it) and a student probe of "
                     f"{ps['student_fraction']:.2f} of the student stage would cost {lo:.2f}-{hi:.2f} of exhaustive "
                     f"before any evaluation (its lambda search alone {ps['lambda_search_vs_exhaustive']:.2f})")
    return lines


def study_markdown(d: dict[str, Any]) -> str:
    pct = 100.0 if d["metric_name"] != "lm_score" else 1.0
    unit = " points" if pct == 100.0 else ""
    b = d["budget"]
    lines = ["# minidisc study", "", f"Command: `{d['command']}`", "",
             f"Teacher dev {d['metric_name']} {d['teacher']['metric']:.4f} (majority class {d['chance_metric']:.4f}); "
             f"student at sparsity {d['student_sparsity']}; {d['seeds']} seed(s). Budgets: candidate recovery "
             f"{b['recovery_steps']} steps; teacher -> TA and TA -> student {b['stage_steps']} steps each; direct KD "
             f"{b['direct_kd_steps']} steps (the TA path's total); batch {b['batch_size']}.", "",
             f"| assistant unit sparsity | candidate {d['metric_name']} (search) | tradeoff (lam {d['lam']}) "
             "| assistant after its stage "
             f"| student through it (mean +- sd) | chain CPU-s |", "|---|---|---|---|---|---|"]
    for c in d["candidates"]:
        ta = "- (no TA)" if c["assistant_metric"] is None else f"{c['assistant_metric']:.4f}"
        cm = c["candidate_metric"]
        lines.append(f"| {c['sparsity']:.2f} | {cm['mean']:.4f} +- {cm['sd']:.4f} "
                     f"| {c['tradeoff']['mean']:.4f} +- {c['tradeoff']['sd']:.4f} | {ta} "
                     f"| {c['student_metric']['mean']:.4f} +- {c['student_metric']['sd']:.4f} "
                     f"| {c['chain_cpu_seconds']:.0f} |")
    dk = d.get("direct_kd")
    if dk:
        pick = dk.get("bisection_pick_minus_direct")
        lines += ["", f"Direct KD (teacher -> student, {b['direct_kd_steps']} steps, {dk['cpu_seconds']:.0f} CPU-s): "
                  f"{dk['mean']:.4f} +- {dk['sd']:.4f}. "
                  f"Best TA path minus direct KD: {dk['best_assistant_minus_direct']['mean'] * pct:+.2f}{unit} "
                  f"(95% interval {_iv(dk['best_assistant_minus_direct']['interval'], scale=pct)})"
                  + (f"; the bisection's pick minus direct KD: {pick['mean'] * pct:+.2f}{unit} "
                     f"({_iv(pick['interval'], scale=pct)})." if pick else ".")]
    two = d.get("two_assistants")
    if two:
        diff = two["two_minus_one"]
        chains = "; ".join(f"seed {c['seed']}: {' -> '.join(f'{x:g}' for x in c['sparsities'])} -> student "
                           f"{c['student']:.4f}" for c in two["chains"])
        lines += ["", f"Two assistants (teacher -> TA 1 -> TA 2 -> student, three links of "
                  f"{round(2 * b['stage_steps'] / 3)} steps: the same total): {chains}. Two minus one assistant "
                  f"(the same TA 1 and seed): {diff['mean'] * pct:+.2f}{unit} "
                  f"(95% interval {_iv(diff['interval'], scale=pct)}); seeds without room for a second: "
                  f"{two['seeds_without_room']}."]
    lines += ["", f"Best student through TA sparsity **{d['best_student_sparsity']}** (mean over seeds).", ""]
    for form, title in (("paper", "paper: metric + lam x parameter sparsity"),
                        ("retained", "retained: (metric - chance) / (teacher - chance) + lam x parameter sparsity")):
        corr = d["correlation"][form]
        rng = d["lambda_range_picking_best"][form]
        lines += [f"## Tradeoff form {title}", "",
                  f"Spearman(tradeoff, student) over candidates: {corr['spearman']:.2f} "
                  f"(bootstrap 95% interval {_iv(corr['interval'])}). "
                  f"Lambda that would pick the best TA: "
                  f"{'none' if rng is None else f'[{rng[0]:.3f}, {rng[1]:.3f}]'}.", "",
                  f"| strategy | picks per seed | picked the best | regret (held-out seeds){unit} | 95% interval "
                  f"| pick minus direct KD{unit} [95%] | evaluations | CPU-s | cost vs exhaustive |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, s in d["strategies"].get(form, {}).items():
            md = s.get("minus_direct")
            vs_direct = "-" if not md else f"{md['mean'] * pct:+.2f} {_iv(md['interval'], scale=pct)}"
            lines.append(f"| {name} | {', '.join(f'{p:g}' for p in s['picks'])} | {s['picked_best']}/{d['seeds']} "
                         f"| {s['regret']['mean'] * pct:.2f} | {_iv(s['regret']['interval'], '{:.2f}', pct)} "
                         f"| {vs_direct} | {s['evaluations']:.1f} | {s['cpu_seconds']:.0f} | "
                         f"{'-' if s['cost_vs_exhaustive'] is None else format(s['cost_vs_exhaustive'], '.2f')} |")
        lines.append("")
    if d.get("halving_replay") == "arms":
        lines += ["halving and auto are replayed on the recorded halving arms (per seed and candidate, what an arm of "
                  "the real round trains: the recovered candidate, the student cut from it and distilled, evaluated "
                  "at every rung) by synchronous successive halving: at each rung the arms still in train from their "
                  "start, the best 1/reduction go on, the round ends when one arm is left; then the chain through the "
                  "pick, whose student judges it. Their CPU-s: each arm's first link once (kept for its later "
                  "rungs; never for auto's arms the lambda search recovered), its student link up to each rung it "
                  "trained to, one evaluation per rung, and the pick's chain. The rows \"(stage arms)\" replay "
                  "the same rounds as if each arm's first link were the chain's whole teacher -> assistant stage "
                  "(on the chains' student curves, rungs at the stage's evaluation steps): what arms of that "
                  "fidelity would choose, at what cost; minidisc run does not run them.", ""]
    else:
        lines += ["halving and auto are replayed from the recorded student curves: the arms are the candidates (auto: "
                  "the lambda search's shortlist) and \"no assistant\" (the student's own sparsity: direct KD at the "
                  "assistant path's total steps), the rungs are the student stage's evaluation steps, the best "
                  "1/reduction of the arms go on at each rung; their CPU-s count each arm's steps up to the rung it "
                  "stopped at.", ""]
    if "auto + direct KD" in d["strategies"].get("paper", {}):
        lines.append("- auto + direct KD: auto, then whichever of its chain's student and the direct-KD baseline "
                     "(which minidisc run trains beside the chain by default, distill.baseline_direct_kd) scores "
                     "higher on dev: what keeping student/ or direct_kd_student/ gives; its CPU-s add the "
                     "baseline's run where auto picked an assistant")
    lines += partial_stage_lines(d)
    for name, s in d["strategies"].get("paper", {}).items():
        if s.get("halving_round"):
            hr = s["halving_round"]
            if d.get("halving_replay") == "arms":
                lines.append(f"- {name}: picked the arm whose chain gives the seed's best student on "
                             f"{hr['best_arm_to_last_rung']} of {hr['seeds']} seeds; {hr['crossed']} of "
                             f"{hr['pairs']} arm pairs cross (ordered one way by the arms at the first rung, the "
                             "other by their chains' students)")
            else:
                lines.append(f"- {name}: the seed's best arm reached the last rung on {hr['best_arm_to_last_rung']} "
                             f"of {hr['seeds']} seeds; {hr['crossed']} of {hr['pairs']} arm pairs cross (ordered one "
                             "way at the first rung, the other at the end of the stage)")
    lines += ["", "Regret: the best candidate's mean student metric minus that of the pick, both over the seeds the "
              "pick was not made on; intervals are percentile bootstraps over seeds "
              f"({d['bootstrap_replicates']} replicates). CPU-s: a strategy's candidate evaluations plus the chain "
              "through its pick; exhaustive distils through every candidate."
              + _row_scale(d, pct), "",
              _walls(d), "",
              "![study](study.png)", ""]
    return "\n".join(lines)


def plot_study(d: dict[str, Any], path: Path) -> None:
    """Left: tradeoff per candidate; right: student metric per candidate (mean +- sd), direct KD, picks."""
    xs = [c["sparsity"] for c in d["candidates"]]
    with figure(path, 2, size=(11, 4.2)) as (_, (a, b)):
        a.errorbar(xs, [c["tradeoff"]["mean"] for c in d["candidates"]],
                   [c["tradeoff"]["sd"] for c in d["candidates"]], marker="o", capsize=3,
                   label=f"paper (lam {d['lam']})")
        a.errorbar(xs, [c["tradeoff_retained"]["mean"] for c in d["candidates"]],
                   [c["tradeoff_retained"]["sd"] for c in d["candidates"]], marker="s", capsize=3, label="retained")
        label(a, f"assistant {UNIT_SPARSITY}", "lambda-tradeoff (search budget)", "What the search ranks",
              legend_size=8)
        b.errorbar(xs, [c["student_metric"]["mean"] for c in d["candidates"]],
                   [c["student_metric"]["sd"] for c in d["candidates"]], marker="o", capsize=3, color="C2",
                   label="student through the assistant")
        if d.get("direct_kd"):
            b.axhline(d["direct_kd"]["mean"], color="C3", linestyle="--", label="direct KD, same compute")
        for k, (name, st) in enumerate(d["strategies"].get("paper", {}).items()):
            for p in set(st["picks"]):
                y = next(c["student_metric"]["mean"] for c in d["candidates"] if c["sparsity"] == p)
                b.scatter([p], [y], s=90 + 50 * k, facecolors="none", edgecolors=f"C{k + 4}", linewidths=1.5,
                          label=name if p == st["picks"][0] else None)
        label(b, f"assistant {UNIT_SPARSITY}", f"student dev {d['metric_name']}",
              f"What it gives ({d['seeds']} seed(s)); circles: picks", legend_size=7)


# --- writers: the files of each command, all at once ---

def write_run(report: dict[str, Any], out: Path) -> None:
    """``report.json``, ``report.md``, ``tradeoff.png`` and ``metric_vs_params.png``."""
    write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", run_markdown(report))
    plot_run(report, out)


def write_compare(data: dict[str, Any], out: Path) -> None:
    """``compare.json``, ``compare.md`` and ``compare.png``."""
    write_json(out / "compare.json", data)
    atomic_write_text(out / "compare.md", compare_markdown(data))
    plot_compare(data, out / "compare.png")


def write_study(data: dict[str, Any], out: Path) -> None:
    """``study.json``, ``study.md`` and ``study.png``."""
    write_json(out / "study.json", data)
    atomic_write_text(out / "study.md", study_markdown(data))
    plot_study(data, out / "study.png")
