"""``minidisc run``: fine-tune the teacher if needed -> search the TA -> Ray Train chain -> report.

The output directory receives ``teacher/`` (when fine-tuned), ``assistant/`` (when a TA is used),
``student/`` (and ``direct_kd_student/``), ``search.json``, ``report.json``, ``report.md``,
``tradeoff.png`` and ``metric_vs_params.png``.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from pathlib import Path
from typing import Any

from minidisc_ray.candidates import prune_student
from minidisc_ray.chain import run_stage
from minidisc_ray.config import Config, DistillConfig
from minidisc_ray.families import count_params, get_adaptor
from minidisc_ray.metrics import perplexity_of_score
from minidisc_ray.modelio import load_model_dir, model_blob, model_from_blob, read_record, save_model_dir
from minidisc_ray.outputs import atomic_write_text, check_run_output
from minidisc_ray.pipeline import Prepared, log, prepare, task_record
from minidisc_ray.pruning import PruningPlan, plan_for_sparsity, prune_model
from minidisc_ray.ray_env import shared_ref
from minidisc_ray.records import digest, sign, tensor_fingerprint, verify, warn_record
from minidisc_ray.schedule import plan_schedule
from minidisc_ray.search.driver import resources_check, run_strategy, search_payload, storage_root, write_json
from minidisc_ray.tracking import Tracker
from minidisc_ray.training import evaluate


def _units(model: Any) -> tuple[int, int]:
    adaptor = get_adaptor(model)
    layers = adaptor.layers(model)
    return sum(adaptor.num_heads(x) for x in layers), sum(adaptor.num_neurons(x) for x in layers)


def _shape_plan(model: Any, sparsity: float) -> PruningPlan:
    adaptor = get_adaptor(model)
    layers = adaptor.layers(model)
    return PruningPlan.prefix([adaptor.num_heads(x) for x in layers], [adaptor.num_neurons(x) for x in layers],
                              sparsity)


def _card(role: str, record: dict[str, Any], command: str) -> str:
    p = record["params"]
    lines = [f"# minidisc-ray {role}", "",
             f"Made by minidisc-ray (MiniDisc, arXiv 2205.14570) with: `{command}`", "",
             "| | value |", "|---|---|",
             f"| teacher | {record['teacher']} |",
             f"| teacher assistant | {record.get('assistant') or 'none'} |",
             f"| sparsity (prunable parameters removed) | {record['sparsity']:.3f} |",
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


def _export(prep: Prepared, model: Any, out: Path, role: str, sparsity: float, command: str,
            assistant: str | None, stage: dict[str, Any]) -> dict[str, Any]:
    """Save ``model`` as a model directory, reload it and evaluate the reloaded copy on dev.

    The record keeps the stage's key and summary, so a later run with the same inputs reuses the
    directory instead of distilling again.
    """
    prunable, total = count_params(model)
    record: dict[str, Any] = {"role": role, "teacher": prep.teacher_dir, "assistant": assistant,
                              "sparsity": sparsity, "actual_sparsity": 1 - prunable / prep.prunable,
                              "params": {"prunable": prunable, "total": total},
                              "task": task_record(prep.task, prep.cfg.task),
                              "metric_name": prep.task.metric, "metric": float("nan"), "command": command,
                              "stage": stage}
    metrics = evaluate(model, prep.dev_loader(), prep.task.metric)
    record.update(metric=metrics["metric"], metrics=metrics, weights=tensor_fingerprint(model.state_dict()))
    record["mac"] = sign(_signed_part(record))
    save_model_dir(model, prep.tokenizer, out, plan=_shape_plan(model, sparsity), record=record,
                   card=_card(role, record, command), field=f"--output ({out.name}/)")
    return _exported(record, out)


def _exported(record: dict[str, Any], out: Path) -> dict[str, Any]:
    return {"sparsity": record["sparsity"], "actual_sparsity": record["actual_sparsity"],
            "params": record["params"]["total"], "prunable": record["params"]["prunable"],
            "metric": record["metric"], "path": str(out)}


_SIGNED = ("stage", "metric", "params", "sparsity", "actual_sparsity", "weights")


def _signed_part(record: dict[str, Any]) -> dict[str, Any]:
    """What a stage's record vouches for (as JSON will read it back): its key and summary, metric, sizes and
    the fingerprint of the weights beside it."""
    return json.loads(json.dumps({k: record.get(k) for k in _SIGNED}, default=str))


def _finished_stage(out: Path, key: str) -> tuple[Any, dict[str, Any], dict[str, Any]] | None:
    """(model, export summary, stage info) of a stage a previous run finished with the same key.

    The record must carry a valid signature (:func:`records.sign`) over its summary and the weights'
    fingerprint, and the weights must match it; anything else is ignored with one warning and distilled again.
    """
    record = read_record(out, f"--output ({out.name}/)") if out.is_dir() else {}
    stage = record.get("stage")
    if not isinstance(stage, dict) or stage.get("key") != key:
        return None
    if not verify(_signed_part(record), record.get("mac")):
        warn_record(out / "minidisc.json", "its signature does not match (edited, or written under another key)")
        return None
    model, *_ = load_model_dir(str(out), field=f"--output ({out.name}/)")
    if tensor_fingerprint(model.state_dict()) != record.get("weights"):
        warn_record(out / "model.safetensors", "the weights are not the ones the record vouches for")
        return None
    info = {k: v for k, v in stage.items() if k != "key"}
    info["reused"] = True
    return model, _exported(record, out), info


def _student_init(prep: Prepared, source: Any, sparsity: float, base_units: tuple[int, int]) -> Any:
    p = prep.cfg.pruning
    return prune_student(source, prep.train, prep.tokenizer, sparsity, base_units, p.importance_samples,
                         p.batch_size, prep.cfg.seed, p.importance, p.layout)


def _next_assistant(prep: Prepared, out: Path, run_id: str, source: Any, source_key: str, after: float, k: int,
                    teacher_units: tuple[int, int]) -> tuple[dict[str, Any], Any] | None:
    """``pruning.assistants`` > 1: search the k-th assistant between the last one (``source``, at sparsity
    ``after``) and the student, with ``source`` as the teacher of the search (its importance, its
    distillation), sparsities still relative to the original teacher. Returns (search summary, the chosen
    candidate's initialisation), or None when no grid point lies between or the student's own sparsity wins."""
    cfg = prep.cfg
    s_student = cfg.pruning.student_sparsity
    # the grid's points below the student (and the student's own, if the grid has it: "no further assistant")
    grid = sorted(s for s in cfg.pruning.grid if after < s <= s_student)
    if not any(s < s_student for s in grid):
        log(f"[chain] assistant {k}: no grid point between {after} and the student's {s_student}; the chain "
            f"keeps {k - 1} assistant(s)")
        return None
    sub_cfg = dataclasses.replace(cfg, pruning=dataclasses.replace(cfg.pruning, grid=tuple(grid)))
    sub_prep = dataclasses.replace(prep, cfg=sub_cfg, teacher=source)
    log(f"[search] assistant {k}: candidates {grid} pruned from assistant {k - 1} (s={after})")
    payload = dataclasses.replace(search_payload(sub_prep, str((out / "trial_events.jsonl").resolve())),
                                  teacher_units=teacher_units, base_units=teacher_units)
    summary = run_strategy(sub_prep, payload, out, cfg.search.strategy, run_id)
    summary["searched_below"] = {"assistant": k - 1, "sparsity": after, "key": source_key}
    write_json(out / f"search-assistant-{k}.json", {**summary, "config": sub_cfg.to_dict()})
    s_k = summary["chosen_sparsity"]
    if s_k is None or s_k >= s_student:
        log(f"[chain] assistant {k}: the search prefers none (chosen {s_k}); the chain keeps {k - 1} assistant(s)")
        return None
    init = prune_model(source, plan_for_sparsity(payload.importance, s_k, base_units=teacher_units,
                                                 layout=payload.layout))
    return summary, init


class _Chain:
    """The stages of one ``minidisc run``: each reused when finished, resumed when interrupted."""

    def __init__(self, prep: Prepared, out: Path, command: str, run_id: str, crash_at: int | None) -> None:
        self.prep, self.out, self.command, self.run_id, self.crash_at = prep, out, command, run_id, crash_at
        self.events = str((out / "train_events.jsonl").resolve())
        self.storage = storage_root(prep.cfg, out, "train")

    def key(self, name: str, teacher_key: str, student: Any, dc: DistillConfig) -> str:
        cfg = self.prep.cfg
        return digest(name, teacher_key, tensor_fingerprint(student.state_dict()), self.prep.data_key,
                      dc.what_it_computes(), cfg.seed)

    def stage(self, name: str, dirname: str, teacher: Any, teacher_key: str, init: Any, role: str, sparsity: float,
              assistant: str | None, teacher_fp: str | None = None,
              dc: DistillConfig | None = None) -> tuple[Any, dict[str, Any], dict[str, Any], str]:
        """Distil ``init`` from ``teacher`` (or reuse a finished export); returns model, export, info, key.

        ``teacher_fp`` (the weights' fingerprint, when the caller already has it) names the teacher's
        object-store copy, so a teacher the search already put there is not put again.
        """
        dc = dc or self.prep.cfg.distill
        key = self.key(name, teacher_key, init, dc)
        target = self.out / dirname
        done = _finished_stage(target, key)
        if done is not None:
            log(f"[chain] {name}: finished by an earlier run with the same inputs; reusing {target}")
            return (*done, key)
        cfg = self.prep.cfg
        prep = self.prep
        teacher_fp = teacher_fp or tensor_fingerprint(teacher.state_dict())
        train_ref = shared_ref("train", prep.data_key, lambda: prep.train.with_format(None).data.table)
        dev_ref = shared_ref("dev", prep.data_key, lambda: prep.dev.with_format(None).data.table)
        res = run_stage(name, shared_ref("teacher", teacher_fp, lambda: model_blob(teacher)), model_blob(init),
                        prep.tokenizer, train_ref, dev_ref,
                        prep.task.metric, prep.task.is_regression, dc, cfg.seed, self.storage,
                        crash_at_step=self.crash_at, events_path=self.events, run_name=f"distill-{name}-{key[:16]}",
                        run_id=self.run_id)
        self.crash_at = None
        blob = model_blob(init)
        blob["state"] = res.best_state
        trained = model_from_blob(blob)
        info = {"seconds": round(res.seconds, 1), "steps_run": res.steps_run, "best_step": res.best_step,
                "best_metric": res.best_metric, "attempts": res.attempts, "history": res.history}
        exported = _export(self.prep, trained, target, role, sparsity, self.command, assistant, {**info, "key": key})
        return trained, exported, info, key


def run_job(cfg: Config, output_dir: str | Path, command: str = "", crash_at_step: int | None = None) -> dict[str, Any]:
    """The whole job; returns the content of ``report.json``.

    Rerun on the same output directory after a kill, it reuses the fine-tuned teacher, every recorded
    candidate evaluation and every finished stage, and resumes an interrupted stage from its last
    checkpoint.
    """
    t_start = time.perf_counter()
    out = check_run_output(output_dir)
    run_id = uuid.uuid4().hex[:12]
    t0 = time.perf_counter()
    prep = prepare(cfg, out, on_inputs_checked=resources_check(cfg, [cfg.search.strategy], chain=True))
    prepare_seconds = time.perf_counter() - t0

    tracker = Tracker(cfg, out, run_id, command)
    try:
        report = _run(cfg, prep, out, run_id, command, crash_at_step, tracker, prepare_seconds, t_start)
    except BaseException:
        tracker.failed()
        raise
    return report


def _run(cfg: Config, prep: Prepared, out: Path, run_id: str, command: str, crash_at_step: int | None,
         tracker: Tracker, prepare_seconds: float, t_start: float) -> dict[str, Any]:
    teacher_units = _units(prep.teacher)
    payload = search_payload(prep, str((out / "trial_events.jsonl").resolve()))
    search = run_strategy(prep, payload, out, cfg.search.strategy, run_id)
    write_json(out / "search.json", {**search, "config": cfg.to_dict()})
    s_student = cfg.pruning.student_sparsity
    ta_s = search["chosen_sparsity"]
    use_ta = ta_s is not None and ta_s < s_student

    chain = _Chain(prep, out, command, run_id, crash_at_step)
    teacher_key = payload.context_key
    distill: dict[str, Any] = {}
    assistants: list[dict[str, Any]] = []
    searches = [search]
    if use_ta:
        ta_init = prune_model(prep.teacher, plan_for_sparsity(payload.importance, ta_s, layout=payload.layout))
        ta, first, distill["teacher_to_assistant"], ta_key = chain.stage(
            "assistant", "assistant", prep.teacher, teacher_key, ta_init, "teacher assistant", ta_s, None,
            payload.teacher_fp)
        assistants.append(first)
        source, source_name, source_key, source_fp = ta, "assistant", ta_key, None
        for k in range(2, cfg.pruning.assistants + 1):  # pruning.assistants: search again below the last one
            found = _next_assistant(prep, out, run_id, source, source_key, assistants[-1]["sparsity"], k,
                                    teacher_units)
            if found is None:
                break
            sub, init = found
            searches.append(sub)
            name = f"assistant-{k}"
            nxt, exported, info, nxt_key = chain.stage(
                name, f"assistant_{k}", source, source_key, init, f"teacher assistant {k}", sub["chosen_sparsity"],
                assistants[-1]["path"])
            distill[f"{source_name}_to_{name}"] = info
            assistants.append(exported)
            source, source_name, source_key, source_fp = nxt, name, nxt_key, None
    else:
        source, source_name, source_key, source_fp = prep.teacher, "teacher", teacher_key, payload.teacher_fp
    assistant = assistants[0] if assistants else None
    plan = plan_schedule([a["sparsity"] for a in assistants], s_student, cfg.distill.steps, cfg.pruning.assistants,
                         baseline=cfg.distill.baseline_direct_kd)
    link = plan.path[-1]
    if plan.direct:  # "no assistant" is direct KD at the TA path's total steps (schedule.py), not one stage's
        log(f"[chain] no teacher assistant: the student is distilled from the teacher directly for {link.steps} "
            "steps, the planned TA path's total (direct KD)")
        student_init = prune_model(prep.teacher, plan_for_sparsity(payload.importance, s_student,
                                                                   layout=payload.layout))
    else:
        student_init = _student_init(prep, source, s_student, teacher_units)
    _, student_out, distill[link.stage], _ = chain.stage(
        "student", link.directory, source, source_key, student_init, "student", s_student,
        assistants[-1]["path"] if assistants else None, source_fp,
        dc=dataclasses.replace(cfg.distill, steps=link.steps))

    baseline = None
    if plan.baseline is not None:
        direct_init = prune_model(prep.teacher, plan_for_sparsity(payload.importance, s_student,
                                                                  layout=payload.layout))
        path_steps = [v["steps_run"] for v in distill.values()]
        total = sum(path_steps)
        if cfg.distill.direct_kd_budget == "matched":  # the TA path's optimiser steps, all its stages together
            dc_direct = dataclasses.replace(cfg.distill, steps=total)
            note = (f"teacher -> student without a TA for {total} steps: as many as the TA path's "
                    f"{len(path_steps)} stages together ({' + '.join(map(str, path_steps))})")
        else:
            dc_direct = cfg.distill
            note = (f"teacher -> student without a TA for {cfg.distill.steps} steps, as the student stage alone; "
                    f"the TA path trained {total} steps in all (distill.direct_kd_budget: stage)")
        _, baseline, distill["direct_kd"], _ = chain.stage(
            "direct-kd", "direct_kd_student", prep.teacher, teacher_key, direct_init, "direct-KD student",
            s_student, None, payload.teacher_fp, dc=dc_direct)
        baseline["note"] = note

    report: dict[str, Any] = {
        "teacher": {"sparsity": 0.0, "params": prep.total, "prunable": prep.prunable,
                    "metric": prep.teacher_metrics["metric"], "path": prep.teacher_dir},
        "assistant": assistant, "assistants": assistants, "student": student_out, "metric_name": prep.task.metric,
        "candidates": [{k: c.get(k) for k in ("sparsity", "actual_sparsity", "params", "prunable", "metric",
                                               "tradeoff", "seconds", "node", "order", "reused")}
                       for c in search["candidates"] if not c.get("failed")],
        "search": {"strategy": search["strategy"], "evaluations": search["evaluations"],
                   "reused": search["reused"], "seconds": search["seconds"], "cpu_seconds": search["cpu_seconds"],
                   "chosen_sparsity": ta_s, "lam": cfg.pruning.lam, "tradeoff_form": cfg.pruning.tradeoff,
                   "nodes": search["nodes"], "lambda_range_of_pick": _lambda_range_of_pick(search, payload),
                   "lambda_pick": search.get("lambda_pick"), "halving": search.get("halving"),
                   "assistant_searches": [{"grid": x["grid"], "chosen_sparsity": x["chosen_sparsity"],
                                           "evaluations": x["evaluations"], "seconds": x["seconds"]}
                                          for x in searches[1:]]},
        "distill": distill, "baseline_direct_kd": baseline, "run_id": run_id,
        "seconds": {"prepare": round(prepare_seconds, 1), "total": round(time.perf_counter() - t_start, 1)},
        "data": prep.task.describe(), "command": command, "config": cfg.to_dict(),
    }
    for stage_name, v in distill.items():
        report["seconds"][stage_name] = v["seconds"]
        tracker.stage(stage_name, v)
    if prep.task.is_lm:  # perplexity beside the score
        vocab = int(getattr(prep.teacher.config, "vocab_size"))  # noqa: B009 - typed as Module attribute
        for entry in (report["teacher"], *assistants, student_out, baseline):
            if entry:
                entry["perplexity"] = perplexity_of_score(entry["metric"], vocab)
    write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", report_markdown(report))
    plot_report(report, out)
    tracker.finish(report, out / "student")
    log(f"[run] done in {report['seconds']['total']:.0f}s: teacher {report['teacher']['metric']:.4f}, "
        f"TA {assistant['metric'] if assistant else None}, student {student_out['metric']:.4f}"
        f"{', direct KD ' + format(baseline['metric'], '.4f') if baseline else ''}; report in {out / 'report.md'}")
    return report


def _lambda_range_of_pick(search: dict[str, Any], payload: Any) -> list[float] | None:
    """The lambdas for which the chosen TA stays the argmax of the evaluated candidates (how much the pick
    hangs on ``pruning.lam``; ``minidisc study`` tells whether the argmax is the best TA)."""
    from minidisc_ray.tradeoff import lambda_range

    scorer = payload.tradeoff
    evaluated = sorted((c for c in search["candidates"] if not c.get("failed") and c.get("metric") is not None),
                       key=lambda c: c["sparsity"])
    chosen = [i for i, c in enumerate(evaluated) if c["sparsity"] == search["chosen_sparsity"]]
    if not chosen or len(evaluated) < 2:
        return None
    return lambda_range([scorer.scaled(c["metric"]) for c in evaluated],
                        [c.get("actual_sparsity", c["sparsity"]) for c in evaluated], chosen[-1])


def _assistants_of(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Every assistant of a report, in chain order (reports from before ``assistants`` hold one)."""
    return list(r.get("assistants") or ([r["assistant"]] if r.get("assistant") else []))


def report_markdown(r: dict[str, Any]) -> str:
    name = r["metric_name"]
    tas = _assistants_of(r)
    rows = [("teacher", r["teacher"]),
            *[(f"teacher assistant{f' {k}' if len(tas) > 1 else ''}", a) for k, a in enumerate(tas, 1)],
            (f"student (via {len(tas)} TA{'s' if len(tas) > 1 else ''})" if tas else
             "student (no TA: direct KD at the TA path's total steps)", r["student"]),
            ("student, direct KD (no TA)", r["baseline_direct_kd"])]
    lines = ["# minidisc-ray report", "", f"Command: `{r['command']}`", "",
             f"| model | sparsity | parameters | dev {name} |", "|---|---|---|---|"]
    for label, m in rows:
        if m:
            lines.append(f"| {label} | {m['sparsity']:.2f} | {m['params']:,} | {m['metric']:.4f} |")
    s = r["search"]
    rng = s.get("lambda_range_of_pick")
    stable = ("" if "lambda_range_of_pick" not in s else
              " No lambda makes it the argmax of the evaluated candidates alone." if rng is None else
              f" It stays the argmax of the evaluated candidates for lambda in [{rng[0]:.3f}, {rng[1]:.3f}]; "
              "`minidisc study` measures whether the argmax gives the best student on this task.")
    lines += ["", f"TA search: {s['strategy']}, {s['evaluations']} candidate evaluations in {s['seconds']:.0f} s "
              f"(lambda {s['lam']}), chosen sparsity {s['chosen_sparsity']}.{stable}", ""]
    if s.get("halving"):
        from minidisc_ray.search.halving import evidence_lines

        h = s["halving"]
        lam_pick = f" The lambda search alone picked {s['lambda_pick']}." if s.get("lambda_pick") is not None else ""
        top = h["rungs"][-1]["student_steps"] if h["rungs"] else 0
        lines += [f"Trial distillation ({h['scheduler']}, reduction {h['reduction']}) among "
                  f"{len(h['arms'])} arms, each student distilled for up to {top} "
                  f"steps after {h['first_link_steps']} first-link steps; dev noise is the standard error of the "
                  f"difference of two models on {h['dev_rows']} dev rows.{lam_pick}", "",
                  *[f"- {line}" for line in evidence_lines(h, name)], ""]
    lines += [
              "| candidate sparsity | parameters | dev metric after recovery | lambda-tradeoff |", "|---|---|---|---|"]
    for c in sorted(r["candidates"], key=lambda c: c["sparsity"]):
        lines.append(f"| {c['sparsity']:.2f} | {c['params']:,} | {c['metric']:.4f} | {c['tradeoff']:.4f} |")
    lines += ["", "| stage | seconds | steps | best step | attempts (this run) |", "|---|---|---|---|---|"]
    for k, v in r["distill"].items():
        attempts = "0 (reused from an earlier run)" if v.get("reused") else v["attempts"]
        lines.append(f"| {k} | {v['seconds']:.0f} | {v['steps_run']} | {v['best_step']} | {attempts} |")
    lines += ["", f"Total {r['seconds']['total']:.0f} s.", "", "![tradeoff](tradeoff.png)",
              "![metric vs parameters](metric_vs_params.png)", ""]
    return "\n".join(lines)


def plot_report(r: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cands = sorted(r["candidates"], key=lambda c: c["sparsity"])
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot([c["sparsity"] for c in cands], [c["tradeoff"] for c in cands], "o-", label="candidates (evaluated)")
    chosen = r["search"]["chosen_sparsity"]
    for c in cands:
        if c["sparsity"] == chosen:
            ax.scatter([chosen], [c["tradeoff"]], s=200, facecolors="none", edgecolors="red", linewidths=2,
                       label=f"chosen TA (s={chosen})")
    ax.set_xlabel("sparsity")
    ax.set_ylabel(f"{r['metric_name']} + {r['search']['lam']} x sparsity")
    ax.set_title("Lambda-tradeoff of TA candidates")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "tradeoff.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.scatter([c["params"] / 1e6 for c in cands], [c["metric"] for c in cands], c="grey", label="candidates")
    tas = _assistants_of(r)
    marks = [("teacher", r["teacher"], "black", "o"),
             *[(f"TA {k}" if len(tas) > 1 else "TA", a, "red", "*") for k, a in enumerate(tas, 1)],
             ("student", r["student"], "blue", "*"), ("direct KD", r.get("baseline_direct_kd"), "orange", "*")]
    for label, m, color, marker in marks:
        if m:
            ax.scatter([m["params"] / 1e6], [m["metric"]], s=90, c=color, label=label, marker=marker)
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel(f"dev {r['metric_name']}")
    ax.set_title("Dev metric against size")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "metric_vs_params.png", dpi=120)
    plt.close(fig)
