"""``minidisc run``, the recipe: prepare -> search the assistant -> plan the links -> run them -> report.

The output directory receives ``teacher/`` (when fine-tuned), ``assistant/`` (and ``assistant_2/``...)
when an assistant is used, ``student/`` and ``direct_kd_student/``, ``search.json``, ``report.json``,
``report.md``, ``tradeoff.png`` and ``metric_vs_params.png``. The parts live elsewhere: the search in
:mod:`minidisc_ray.search`, the links in :mod:`minidisc_ray.schedule`, the stages on Ray Train in
:class:`minidisc_ray.chain.runner.ChainRunner`, the reports in :mod:`minidisc_ray.report`.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from pathlib import Path
from typing import Any

from minidisc_ray.candidates import prune_student
from minidisc_ray.chain.runner import ChainRunner, ShardCut
from minidisc_ray.config import Config
from minidisc_ray.families import unit_counts
from minidisc_ray.logs import log
from minidisc_ray.outputs import check_run_output, write_json
from minidisc_ray.pipeline import Prepared, prepare
from minidisc_ray.pruning import plan_for_sparsity, prune_model
from minidisc_ray.ray_env import storage_root
from minidisc_ray.report import run_report, write_run
from minidisc_ray.schedule import plan_schedule
from minidisc_ray.search.driver import resources_check, run_strategy, search_below, search_payload
from minidisc_ray.tracking import Tracker
from minidisc_ray.tradeoff import lambda_range_of_pick


def run_job(cfg: Config, output_dir: str | Path, command: str = "", crash_at_step: int | None = None) -> dict[str, Any]:
    """The whole job; returns the content of ``report.json``.

    Rerun on the same output directory after a kill, it reuses the fine-tuned teacher, every recorded
    candidate evaluation and every finished stage, and resumes an interrupted stage from its last
    checkpoint.
    """
    t_start = time.perf_counter()
    out = check_run_output(output_dir)
    run_id = uuid.uuid4().hex[:12]
    prep = prepare(cfg, out, on_inputs_checked=resources_check(cfg, [cfg.search.strategy], chain=True))
    prepare_seconds = time.perf_counter() - t_start
    tracker = Tracker(cfg, out, run_id, command)
    try:
        return _recipe(prep, out, run_id, command, crash_at_step, tracker, prepare_seconds, t_start)
    except BaseException:
        tracker.failed()
        raise


def _recipe(prep: Prepared, out: Path, run_id: str, command: str, crash_at_step: int | None, tracker: Tracker,
            prepare_seconds: float, t_start: float) -> dict[str, Any]:
    cfg = prep.cfg
    s_student = cfg.pruning.student_sparsity

    # 1. search the first assistant among candidates pruned from the teacher
    payload = search_payload(prep, str((out / "trial_events.jsonl").resolve()), out)
    search = run_strategy(prep, payload, out, cfg.search.strategy, run_id)
    write_json(out / "search.json", {**search, "config": cfg.to_dict()})
    chosen = search["chosen_sparsity"]

    def cut_from_teacher(unit_sparsity: float) -> Any:
        plan = plan_for_sparsity(payload.importance, unit_sparsity, layout=payload.layout)
        if prep.teacher_on_meta:  # teacher.placement: sharded: the stage's workers cut it from the teacher's files
            return ShardCut(str(Path(prep.teacher_dir).resolve()), plan,
                            prune_model(prep.teacher, plan, share_unpruned=True), prep.teacher_fp)
        return prune_model(prep.teacher, plan)

    # 2. the teacher -> assistant link(s); pruning.assistants > 1 searches again below the last assistant
    chain = ChainRunner(prep, out, command, run_id, storage_root(cfg, out, "train"), crash_at_step)
    distill: dict[str, Any] = {}
    assistants: list[dict[str, Any]] = []
    later_searches: list[dict[str, Any]] = []
    source, source_key = prep.teacher, payload.context_key
    source_fp: str | None = payload.teacher_fp
    if chosen is not None and chosen < s_student:
        init = cut_from_teacher(chosen)
        for k in range(1, cfg.pruning.assistants + 1):
            if k > 1:
                found = search_below(prep, out, run_id, source, source_key, assistants[-1]["sparsity"], k,
                                     unit_counts(prep.teacher), assistants[-1]["path"])
                if found is None:
                    break
                later_searches.append(found[0])
                init = found[1]
            s_k = chosen if k == 1 else later_searches[-1]["chosen_sparsity"]
            link = plan_schedule([a["sparsity"] for a in assistants] + [s_k], s_student, cfg.distill.steps).path[k - 1]
            source, summary, distill[link.stage], source_key = chain.stage(
                link, source, source_key, init, "assistant" if k == 1 else f"assistant {k}",
                assistants[-1]["path"] if assistants else None, source_fp)
            assistants.append(summary)
            source_fp = None

    # 3. the student: from the last assistant, or (no assistant) from the teacher for the path's total steps
    plan = plan_schedule([a["sparsity"] for a in assistants], s_student, cfg.distill.steps, cfg.pruning.assistants,
                         baseline=cfg.distill.baseline_direct_kd)
    link = plan.path[-1]
    if plan.direct:
        log(f"[chain] no assistant: the student is distilled from the teacher directly for {link.steps} steps, "
            "the planned assistant path's total (direct KD)")
        student_init = cut_from_teacher(s_student)
    else:
        p = cfg.pruning
        student_init = prune_student(source, prep.train, prep.tokenizer, s_student, unit_counts(prep.teacher),
                                     p.importance_samples, p.batch_size, cfg.seed, p.importance, p.layout)
    _, student, distill[link.stage], _ = chain.stage(link, source, source_key, student_init, "student",
                                                     assistants[-1]["path"] if assistants else None, source_fp)

    # 4. the direct-KD baseline: teacher -> student at the steps the assistant path ran (or one stage's)
    baseline = None
    if plan.baseline is not None:
        path_steps = [v["steps_run"] for v in distill.values()]
        matched = cfg.distill.direct_kd_budget == "matched"
        steps = sum(path_steps) if matched else cfg.distill.steps
        _, baseline, distill["direct_kd"], _ = chain.stage(
            dataclasses.replace(plan.baseline, steps=steps), prep.teacher, payload.context_key,
            cut_from_teacher(s_student), "direct-KD student", None, payload.teacher_fp)
        baseline["note"] = (f"teacher -> student without an assistant for {steps} steps: as many as the assistant "
                            f"path's {len(path_steps)} stages together ({' + '.join(map(str, path_steps))})"
                            if matched else
                            f"teacher -> student without an assistant for {steps} steps, as the student stage "
                            f"alone; the assistant path trained {sum(path_steps)} steps in all "
                            "(distill.direct_kd_budget: stage)")

    # 5. report
    seconds = {"prepare": round(prepare_seconds, 1), "total": round(time.perf_counter() - t_start, 1)}
    report = run_report(prep, search, lambda_range_of_pick(search, payload.tradeoff), later_searches, assistants,
                        student, baseline, distill, run_id, seconds, command)
    for stage_name, info in distill.items():
        tracker.stage(stage_name, info)
    write_run(report, out)
    tracker.finish(report, out / "student")
    ta = assistants[0]["metric"] if assistants else None
    log(f"[run] done in {seconds['total']:.0f}s: teacher {report['teacher']['metric']:.4f}, assistant {ta}, "
        f"student {student['metric']:.4f}{', direct KD ' + format(baseline['metric'], '.4f') if baseline else ''}; "
        f"report in {out / 'report.md'}")
    return report
