"""``minidisc study``'s report: ``study.{json,md,png}`` (per candidate the tradeoff and the student through it,
direct KD, two assistants, then per tradeoff form each strategy's picks, regret and cost, and how halving and auto
were replayed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from minidisc_ray.outputs import atomic_write_text, write_json
from minidisc_ray.report.figures import UNIT_SPARSITY, figure, label

# the two tradeoff forms study.md has a section for, with the section's title
FORM_TITLES = (("paper", "paper: metric + lam x parameter sparsity"),
               ("retained", "retained: (metric - chance) / (teacher - chance) + lam x parameter sparsity"))


def _iv(x: list[float] | None, fmt: str = "{:+.2f}", scale: float = 1.0) -> str:
    return "-" if x is None else "[" + ", ".join(fmt.format(v * scale) for v in x) + "]"


def _scale(d: dict[str, Any]) -> tuple[float, str]:
    """How differences of the study's metric are written: in points of accuracy (x 100) or as they are (lm_score)."""
    pct = 100.0 if d["metric_name"] != "lm_score" else 1.0
    return pct, " points" if pct == 100.0 else ""


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


def _candidate_table(d: dict[str, Any]) -> list[str]:
    """study.md's opening: the command, the teacher and the budgets, then one row per candidate assistant."""
    b = d["budget"]
    lines = ["# minidisc study", "", f"Command: `{d['command']}`", "",
             f"Teacher dev {d['metric_name']} {d['teacher']['metric']:.4f} (majority class {d['chance_metric']:.4f}); "
             f"student at sparsity {d['student_sparsity']}; {d['seeds']} seed(s). Budgets: candidate recovery "
             f"{b['recovery_steps']} steps; teacher -> TA and TA -> student {b['stage_steps']} steps each; direct KD "
             f"{b['direct_kd_steps']} steps (the TA path's total); batch {b['batch_size']}.", "",
             "Picks, early stopping and best weights read a validation split carved from the training rows; the "
             "students below, and every regret, are judged on the task's dev rows, which no choice saw."
             if d.get("judged_on") == "held-out dev" else
             "Picks, early stopping and best weights read the dev rows, and the students are judged on the same rows "
             "(recorded with task.validation_fraction: 0, or before it existed): the figures flatter the picks.", "",
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
    return lines


def _direct_kd_lines(d: dict[str, Any], pct: float, unit: str) -> list[str]:
    """Direct KD at the TA path's total steps, and the best TA path and the bisection's pick against it."""
    dk = d.get("direct_kd")
    if not dk:
        return []
    pick = dk.get("bisection_pick_minus_direct")
    return ["", f"Direct KD (teacher -> student, {d['budget']['direct_kd_steps']} steps, {dk['cpu_seconds']:.0f} "
            f"CPU-s): {dk['mean']:.4f} +- {dk['sd']:.4f}. "
            f"Best TA path minus direct KD: {dk['best_assistant_minus_direct']['mean'] * pct:+.2f}{unit} "
            f"(95% interval {_iv(dk['best_assistant_minus_direct']['interval'], scale=pct)})"
            + (f"; the bisection's pick minus direct KD: {pick['mean'] * pct:+.2f}{unit} "
               f"({_iv(pick['interval'], scale=pct)})." if pick else ".")]


def _student_side_lines(d: dict[str, Any], pct: float, unit: str) -> list[str]:
    """The student-side score against the lambda-tradeoff as predictors of the student (studies since it)."""
    side = d.get("student_side")
    if not side:
        return []
    lines = ["", "Predictors of the student (the student-side score of each recovered candidate: "
             "`minidisc_ray/student_score.py`):", "",
             "| predictor | Spearman with the student (95% interval) | argmax regret, held out (95% interval) |",
             "|---|---|---|"]
    for name, p in side["predictors"].items():
        lines.append(f"| {name} | {p['spearman']:+.2f} {_iv(p['interval'])} | {p['regret']['mean'] * pct:.2f}{unit} "
                     f"{_iv(p['regret']['interval'], '{:.2f}', pct)} |")
    return lines


def _two_assistant_lines(d: dict[str, Any], pct: float, unit: str) -> list[str]:
    """The two-assistant chains per seed and two minus one assistant (``--assistants 2``)."""
    two = d.get("two_assistants")
    if not two:
        return []
    diff = two["two_minus_one"]
    chains = "; ".join(f"seed {c['seed']}: {' -> '.join(f'{x:g}' for x in c['sparsities'])} -> student "
                       f"{c['student']:.4f}" for c in two["chains"])
    return ["", f"Two assistants (teacher -> TA 1 -> TA 2 -> student, three links of "
            f"{round(2 * d['budget']['stage_steps'] / 3)} steps: the same total): {chains}. Two minus one assistant "
            f"(the same TA 1 and seed): {diff['mean'] * pct:+.2f}{unit} "
            f"(95% interval {_iv(diff['interval'], scale=pct)}); seeds without room for a second: "
            f"{two['seeds_without_room']}."]


def _form_section(d: dict[str, Any], form: str, title: str, pct: float, unit: str) -> list[str]:
    """One tradeoff form's section: its correlation with the students, the lambda range that picks the best TA,
    and one row per strategy (picks, regret, against direct KD, cost)."""
    corr = d["correlation"][form]
    rng = d["lambda_range_picking_best"][form]
    lines = [f"## Tradeoff form {title}", "",
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
    return lines


def _halving_replay_lines(d: dict[str, Any]) -> list[str]:
    """How halving and auto were replayed (on the recorded arms, or on the chains' student curves)."""
    if d.get("halving_replay") == "arms":
        return ["halving and auto are replayed on the recorded halving arms (per seed and candidate, what an arm of "
                "the real round trains: the recovered candidate, the student cut from it and distilled, evaluated "
                "at every rung) by synchronous successive halving: at each rung the arms still in train from their "
                "start, the best 1/reduction go on, the round ends when one arm is left; then the chain through the "
                "pick, whose student judges it. Their CPU-s: each arm's first link once (kept for its later "
                "rungs; never for auto's arms the lambda search recovered), its student link up to each rung it "
                "trained to, one evaluation per rung, and the pick's chain. The rows \"(stage arms)\" replay "
                "the same rounds as if each arm's first link were the chain's whole teacher -> assistant stage "
                "(on the chains' student curves, rungs at the stage's evaluation steps): what arms of that "
                "fidelity would choose, at what cost; minidisc run does not run them.", ""]
    return ["halving and auto are replayed from the recorded student curves: the arms are the candidates (auto: "
            "the lambda search's shortlist) and \"no assistant\" (the student's own sparsity: direct KD at the "
            "assistant path's total steps), the rungs are the student stage's evaluation steps, the best "
            "1/reduction of the arms go on at each rung; their CPU-s count each arm's steps up to the rung it "
            "stopped at.", ""]


def _halving_round_lines(d: dict[str, Any]) -> list[str]:
    """Per halving round replayed (paper form): did the seed's best arm survive, and how many arm pairs cross."""
    lines = []
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
    return lines


def _auto_checked_lines(d: dict[str, Any]) -> list[str]:
    """The line on the ``auto + direct KD`` row, when the study has one."""
    if "auto + direct KD" not in d["strategies"].get("paper", {}):
        return []
    return ["- auto + direct KD: auto, then whichever of its chain's student and the direct-KD baseline "
            "(which minidisc run trains beside the chain by default, distill.baseline_direct_kd) scores "
            "higher on the rows that select: what keeping student/ or direct_kd_student/ gives; its CPU-s add the "
            "baseline's run where auto picked an assistant"] + (
        ["- nearest assistant + direct KD: no search; the chain through the candidate nearest above the student (a "
         "size prior) and the direct-KD baseline, the better on the rows that select; its CPU-s are those two runs"]
        if "nearest assistant + direct KD" in d["strategies"].get("paper", {}) else [])


def _closing_lines(d: dict[str, Any], pct: float) -> list[str]:
    """What regret, the intervals and CPU-s mean; the study's times; the figure."""
    return ["", "Regret: the best candidate's mean student metric minus that of the pick, both over the seeds the "
            "pick was not made on; intervals are percentile bootstraps over seeds "
            f"({d['bootstrap_replicates']} replicates). CPU-s: a strategy's candidate evaluations plus the chain "
            "through its pick; exhaustive distils through every candidate."
            + _row_scale(d, pct), "",
            _walls(d), "",
            "![study](study.png)", ""]


def study_markdown(d: dict[str, Any]) -> str:
    """``study.md``, from the content of ``study.json``."""
    pct, unit = _scale(d)
    lines = [*_candidate_table(d), *_direct_kd_lines(d, pct, unit), *_student_side_lines(d, pct, unit),
             *_two_assistant_lines(d, pct, unit),
             "", f"Best student through TA sparsity **{d['best_student_sparsity']}** (mean over seeds).", ""]
    for form, title in FORM_TITLES:
        lines += _form_section(d, form, title, pct, unit)
    lines += [*_halving_replay_lines(d), *_auto_checked_lines(d), *partial_stage_lines(d), *_halving_round_lines(d),
              *_closing_lines(d, pct)]
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


def write_study(data: dict[str, Any], out: Path) -> None:
    """``study.json``, ``study.md`` and ``study.png``."""
    write_json(out / "study.json", data)
    atomic_write_text(out / "study.md", study_markdown(data))
    plot_study(data, out / "study.png")
