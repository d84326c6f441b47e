"""``minidisc run``'s report: the content of ``report.json`` (:func:`run_report`), ``report.md`` (the chain's models,
which student to keep, the search and its halving evidence, the candidates, the stages) and its two figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from minidisc_ray.metrics import perplexity_of_score
from minidisc_ray.outputs import atomic_write_text, write_json
from minidisc_ray.pipeline import Prepared
from minidisc_ray.report.evidence import evidence_lines
from minidisc_ray.report.figures import UNIT_SPARSITY, figure, label
from minidisc_ray.stats import dev_noise


def run_report(prep: Prepared, search: dict[str, Any], lambda_range: list[float] | None,
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
                    "metric": prep.teacher_metrics["metric"], "path": prep.teacher_dir,
                    **({"held_out_metric": prep.teacher_held_out["metric"]} if prep.teacher_held_out else {})},
        "assistant": assistants[0] if assistants else None, "assistants": assistants, "student": student,
        "metric_name": prep.task.metric,
        "candidates": [{**{k: c.get(k) for k in kept}, **({"shape": c["shape"]} if "shape" in c else {})}
                       for c in search["candidates"] if not c.get("failed")],
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
        "splits": {"select": len(prep.dev), "held_out": len(prep.held_out) if prep.held_out is not None else None,
                   "train": len(prep.train), "validation_fraction": cfg.task.validation_fraction, "seed": cfg.seed},
    }
    if prep.task.is_lm:
        vocab = int(getattr(prep.teacher.config, "vocab_size"))  # noqa: B009 - typed as Module attribute
        for entry in (report["teacher"], *assistants, student, baseline):
            if entry:
                entry["perplexity"] = perplexity_of_score(entry["metric"], vocab)
    return report


def keep_line(r: dict[str, Any]) -> str | None:
    """Which of the two students a run exports to keep: the TA path's or the direct-KD baseline's (trained by
    default beside it), the better on the rows that select, with their noise bound for the difference."""
    base, student = r.get("baseline_direct_kd"), r["student"]
    if not base or not assistants_of(r):
        return None
    path_wins = student["metric"] >= base["metric"]
    gap = abs(student["metric"] - base["metric"])
    sp = r.get("splits") or {}
    held = sp.get("held_out") is not None  # the choice reads the validation rows; the dev rows only report
    rows = sp.get("select") if held else (r.get("data") or {}).get("dev_rows")
    on = "validation" if held else "dev"
    noise = dev_noise(r["metric_name"], max(student["metric"], base["metric"]), rows) if rows else None
    scale = 100.0 if r["metric_name"] != "lm_score" else 1.0
    unit = " pt" if scale == 100.0 else ""
    side = "beyond" if noise is not None and gap > noise else "within"
    sure = "" if noise is None else f"; the gap is {side} the {on} set's noise bound of {noise * scale:.1f}{unit}"
    tail = " Both are the same size; `minidisc study` measures which path wins on held-out seeds."
    if gap == 0:
        return (f"Which student to keep: either; `student/` (the assistant path) and `direct_kd_student/` (direct "
                f"KD, no assistant) score the same on {on}.{tail}")
    return (f"Which student to keep: **{'student/' if path_wins else 'direct_kd_student/'}** "
            f"({'the assistant path' if path_wins else 'direct KD, no assistant'}), {gap * scale:.2f}{unit} "
            f"above the other on {on}{sure}.{tail}")


def assistants_of(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Every assistant of a report, in chain order (reports from before ``assistants`` hold one)."""
    return list(r.get("assistants") or ([r["assistant"]] if r.get("assistant") else []))


def run_markdown(r: dict[str, Any]) -> str:
    """``report.md``: the chain's models, which student to keep, the search, the candidates and the stages."""
    name = r["metric_name"]
    tas = assistants_of(r)
    rows = [("teacher", r["teacher"]),
            *[(f"assistant{f' {k}' if len(tas) > 1 else ''}", a) for k, a in enumerate(tas, 1)],
            (f"student (via {len(tas)} assistant{'s' if len(tas) > 1 else ''})" if tas else
             "student (no assistant: direct KD at the assistant path's total steps)", r["student"]),
            ("student, direct KD (no assistant)", r["baseline_direct_kd"])]
    sp = r.get("splits") or {}
    held = sp.get("held_out") is not None
    lines = ["# minidisc-ray report", "", f"Command: `{r['command']}`", ""]
    if held:
        lines += [f"Every choice (the assistant, early stopping, the best weights, which student to keep) read "
                  f"{sp['select']:,} validation rows carved from the training rows (seed {sp['seed']}); the "
                  f"{sp['held_out']:,} dev rows were kept back and report the models.", ""]
    else:
        lines += ["The dev rows chose the assistant, stopped early and kept the best weights, and report them too "
                  "(task.validation_fraction: 0): the figures below are the selection's own, optimistic.", ""]
    head = f"| model | unit sparsity | parameter sparsity | parameters | {'validation' if held else 'dev'} {name} |"
    lines += [head + (f" held-out dev {name} |" if held else ""), "|---|---|---|---|---|" + ("---|" if held else "")]
    for role, m in rows:
        if m:
            param_s = "-" if m.get("param_sparsity") is None else f"{m['param_sparsity']:.3f}"
            shown = m.get("held_out_metric")
            tail = (f" {shown:.4f} |" if shown is not None else " not measured |") if held else ""
            lines.append(f"| {role} | {m['sparsity']:.2f} | {param_s} | {m['params']:,} | {m['metric']:.4f} |{tail}")
    keep = keep_line(r)
    if keep:
        lines += ["", keep]
    lines += _search_lines(r["search"], name)
    shaped = any("shape" in c for c in r["candidates"])  # pruning.axes with hidden or depth: each budget's shape
    lines += [("| budget (of the teacher's cost) | shape (layers, hidden, heads or KV groups, FFN) "
               if shaped else "| candidate unit sparsity ")
              + f"| parameter sparsity | parameters | {'validation' if held else 'dev'} metric after recovery "
              "| lambda-tradeoff |",
              "|---|---|---|---|---|" + ("---|" if shaped else "")]
    for c in sorted(r["candidates"], key=lambda c: c["sparsity"]):
        param_s = "-" if c.get("param_sparsity") is None else f"{c['param_sparsity']:.3f}"
        a = c.get("shape")
        shape = (f" {a['layers']}, {a['hidden']}, {a['units']}, {a['ffn']} |" if a else " - |") if shaped else ""
        lines.append(f"| {c['sparsity']:.2f} |{shape} {param_s} | {c['params']:,} | {c['metric']:.4f} | "
                     f"{c['tradeoff']:.4f} |")
    lines += ["", "| stage | seconds | steps | best step | attempts (this run) | steps trained again (at least) |",
              "|---|---|---|---|---|---|"]
    for k, v in r["distill"].items():
        attempts = "0 (reused from an earlier run)" if v.get("reused") else v["attempts"]
        lines.append(f"| {k} | {v['seconds']:.0f} | {v['steps_run']} | {v['best_step']} | {attempts} | "
                     f"{v.get('steps_redone', 0)} |")
    reused = {k: v["started_from"] for k, v in r["distill"].items() if v.get("started_from")}
    if reused:
        lines += [""] + [f"The {k} started from the candidate the search recovered ({u['recovery_steps']} recovery "
                         f"steps, SHA-256 {u['sha256'][:12]}) rather than a fresh cut: its stage ran {u['steps']} "
                         "steps fewer." for k, u in reused.items()]
        lines.append(f"Reused from the search: {sum(u['steps'] for u in reused.values())} training steps in all.")
    lines += ["", f"Total {r['seconds']['total']:.0f} s.", "", "![tradeoff](tradeoff.png)",
              "![metric vs parameters](metric_vs_params.png)", ""]
    return "\n".join(lines)


def _search_lines(s: dict[str, Any], metric: str) -> list[str]:
    """report.md's paragraph on the assistant search (and whether its pick is stable in lambda), then the halving
    round's, with its evidence lines, when there was one."""
    rng = s.get("lambda_range_of_pick")
    stable = ("" if "lambda_range_of_pick" not in s else
              " No lambda makes it the argmax of the evaluated candidates alone." if rng is None else
              f" It stays the argmax of the evaluated candidates for lambda in [{rng[0]:.3f}, {rng[1]:.3f}]; "
              "`minidisc study` measures whether the argmax gives the best student on this task.")
    lines = ["", f"Assistant search: {s['strategy']}, {s['evaluations']} candidate evaluations in "
             f"{s['seconds']:.0f} s "
             f"(lambda {s['lam']}), chosen assistant at unit sparsity {s['chosen_sparsity']}.{stable}", ""]
    if s.get("halving"):
        lines += _halving_lines(s, metric)
    return lines


def _halving_lines(s: dict[str, Any], metric: str) -> list[str]:
    """report.md's paragraph on the halving round (``s["halving"]``) and its evidence lines."""
    h = s["halving"]
    lam_pick = f" The lambda search alone picked {s['lambda_pick']}." if s.get("lambda_pick") is not None else ""
    top = h["rungs"][-1]["student_steps"] if h["rungs"] else 0
    loaded = h.get("first_links_loaded") or []
    kept = (f" {len(loaded)} of the arms started from the candidate the lambda search had recovered (its first "
            "link loaded, not trained again)." if loaded else "")
    return [f"Trial distillation ({h['scheduler']}, reduction {h['reduction']}) among "
            f"{len(h['arms'])} arms, each student distilled for up to {top} "
            f"steps after {h['first_link_steps']} first-link steps; dev noise is one standard error of the "
            f"winner's lead over the runner-up on the {h['dev_rows']} rows that select (paired: from the rows where "
            "their predictions differ; otherwise the bound for two independent models)."
            f"{kept}{lam_pick}", "",
            *[f"- {line}" for line in evidence_lines(h, metric)], ""]


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


def write_run(report: dict[str, Any], out: Path) -> None:
    """``report.json``, ``report.md``, ``tradeoff.png`` and ``metric_vs_params.png``."""
    write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", run_markdown(report))
    plot_run(report, out)
