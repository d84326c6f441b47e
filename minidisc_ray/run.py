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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from minidisc_ray.candidates import SearchPayload, prune_student
from minidisc_ray.chain.runner import ChainRunner, ShardCut, StageOutcome
from minidisc_ray.config import Config
from minidisc_ray.families import unit_counts
from minidisc_ray.logs import log
from minidisc_ray.modelio.fingerprint import load_recovered
from minidisc_ray.outputs import check_run_output, one_job, write_json
from minidisc_ray.pipeline import Prepared, prepare
from minidisc_ray.pruning import prune_model
from minidisc_ray.ray_env import storage_root
from minidisc_ray.report import run_report, write_run
from minidisc_ray.schedule import Link, plan_schedule
from minidisc_ray.search.driver import resources_check, run_strategy, search_below, search_payload
from minidisc_ray.strategies.trial_distillation import recovered_candidates
from minidisc_ray.tracking import Tracker
from minidisc_ray.tradeoff import lambda_range_of_pick


@one_job
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


@dataclass
class AssistantPath:
    """The assistants distilled so far (teacher -> TA -> TA 2 ...) and the model the next link distils from."""

    source: nn.Module  # the last assistant, or the teacher before the first
    source_key: str
    source_fp: str | None  # the source's weights' fingerprint, where known (the teacher's)
    assistants: list[dict[str, Any]] = field(default_factory=list)  # their lines in report.json
    later_searches: list[dict[str, Any]] = field(default_factory=list)  # the searches for assistants 2, 3, ...

    @property
    def last_dir(self) -> str | None:
        """The last assistant's model directory (None before the first)."""
        return self.assistants[-1]["path"] if self.assistants else None


@dataclass
class _Chain:
    """What every link of the job needs: the prepared job, the search's payload, the stage runner, and each
    finished stage's info (``distill``, by stage name, in the order they ran)."""

    prep: Prepared
    payload: SearchPayload
    runner: ChainRunner
    out: Path
    run_id: str
    distill: dict[str, Any] = field(default_factory=dict)

    def cut_from_teacher(self, unit_sparsity: float) -> nn.Module | ShardCut:
        """A link's starting model cut from the teacher by its importance at ``unit_sparsity``."""
        plan = self.payload.plan_for(unit_sparsity)
        prep = self.prep
        if prep.teacher_on_meta:  # teacher.placement: sharded: the stage's workers cut it from the teacher's files
            return ShardCut(str(Path(prep.teacher_dir).resolve()), plan,
                            prune_model(prep.teacher, plan, share_unpruned=True), prep.teacher_fp)
        return prune_model(prep.teacher, plan)

    def start_from_recovered(self, init: nn.Module | ShardCut, sparsity: float) -> dict[str, Any] | None:
        """Load into ``init`` (the first assistant, cut from the teacher) the recovered candidate the search kept for
        ``sparsity`` (its file and the SHA-256 its evaluation record signed), so that the stage goes on from the
        round's work; what was reused (the recovery's steps, in the stage's batches, are left out of the stage), or
        None where the search kept none (the stage starts from the fresh cut, for all its steps)."""
        if isinstance(init, ShardCut):
            return None
        entry = recovered_candidates(self.payload, self.out, [sparsity]).get(float(sparsity))
        if not load_recovered(init, entry):
            return None
        rec, dc = self.prep.cfg.recovery, self.prep.cfg.distill
        steps = round(rec.steps * rec.batch_size / dc.batch_size)  # the rows the recovery already trained on
        assert entry is not None
        log(f"[chain] {sparsity:.2f}: starts from the search's recovered candidate ({rec.steps} recovery "
            f"steps at batch {rec.batch_size}), so its stage runs {steps} steps fewer")
        return {"recovered_candidate": entry[0], "sha256": entry[1], "recovery_steps": rec.steps, "steps": steps}

    def stage_from_recovered(self, link: Link, init: nn.Module | ShardCut, sparsity: float,
                             role: str) -> StageOutcome:
        """A link from the teacher whose model starts, where the search kept one, from the recovered candidate at
        ``sparsity`` (:meth:`start_from_recovered`), for the link's steps less the recovery's."""
        reused = self.start_from_recovered(init, sparsity)
        if reused:
            link = dataclasses.replace(link, steps=max(1, link.steps - reused["steps"]))
        outcome = self.stage(link, self.prep.teacher, self.payload.context_key, init, role, None,
                             self.payload.teacher_fp)
        if reused:
            outcome.info["started_from"] = reused
        return outcome

    def stage(self, link: Link, source: nn.Module, source_key: str, init: nn.Module | ShardCut, role: str,
              assistant: str | None, source_fp: str | None) -> StageOutcome:
        """Run (or reuse) one link and record its info under the link's stage name."""
        outcome = self.runner.stage(link, source, source_key, init, role, assistant, source_fp)
        self.distill[link.stage] = outcome.info
        return outcome


def _recipe(prep: Prepared, out: Path, run_id: str, command: str, crash_at_step: int | None, tracker: Tracker,
            prepare_seconds: float, t_start: float) -> dict[str, Any]:
    cfg = prep.cfg

    # 1. search the first assistant among candidates pruned from the teacher
    payload = search_payload(prep, str((out / "trial_events.jsonl").resolve()), out)
    if cfg.teacher.holds_whole_in_trials(cfg.search.trial_workers):  # every strategy's candidate trials keep their
        payload.keep_recovered_in(out)  # recovered weights: the chain's links from the teacher go on from them
    search = run_strategy(prep, payload, out, cfg.search.strategy, run_id)
    write_json(out / "search.json", {**search, "config": cfg.to_dict()})
    chain = _Chain(prep, payload, ChainRunner(prep, out, command, run_id, storage_root(cfg, out, "train"),
                                              crash_at_step), out, run_id)

    # 2. the teacher -> assistant link(s); pruning.assistants > 1 searches again below the last assistant
    path = _distil_assistants(chain, search["chosen_sparsity"])

    # 3. the student: from the last assistant, or (no assistant) from the teacher for the path's total steps
    plan = plan_schedule([a["sparsity"] for a in path.assistants], cfg.pruning.student_sparsity, cfg.distill.steps,
                         cfg.pruning.assistants, baseline=cfg.distill.baseline_direct_kd)
    student = _distil_student(chain, path, plan.path[-1], plan.direct)

    # 4. the direct-KD baseline: teacher -> student at the steps the assistant path ran (or one stage's)
    baseline = _distil_baseline(chain, plan.baseline) if plan.baseline is not None else None

    # 5. report
    seconds = {"prepare": round(prepare_seconds, 1), "total": round(time.perf_counter() - t_start, 1)}
    report = run_report(prep, search, lambda_range_of_pick(search, payload.tradeoff), path.later_searches,
                        path.assistants, student, baseline, chain.distill, run_id, seconds, command)
    for stage_name, info in chain.distill.items():
        tracker.stage(stage_name, info)
    write_run(report, out)
    tracker.finish(report, out / "student")
    ta = path.assistants[0]["metric"] if path.assistants else None
    log(f"[run] done in {seconds['total']:.0f}s: teacher {report['teacher']['metric']:.4f}, assistant {ta}, "
        f"student {student['metric']:.4f}{', direct KD ' + format(baseline['metric'], '.4f') if baseline else ''}; "
        f"report in {out / 'report.md'}")
    return report


def _distil_assistants(chain: _Chain, chosen: float | None) -> AssistantPath:
    """The assistant(s): the searched one cut from the teacher and distilled from it, then (``pruning.assistants``
    > 1) each next one searched below the last and distilled from it, until a search finds none."""
    prep = chain.prep
    cfg = prep.cfg
    s_student = cfg.pruning.student_sparsity
    path = AssistantPath(prep.teacher, chain.payload.context_key, chain.payload.teacher_fp)
    if chosen is None or not chosen < s_student:
        return path
    init = chain.cut_from_teacher(chosen)
    for k in range(1, cfg.pruning.assistants + 1):
        if k > 1:
            found = search_below(prep, chain.out, chain.run_id, path.source, path.source_key,
                                 path.assistants[-1]["sparsity"], k, unit_counts(prep.teacher), path.last_dir)
            if found is None:
                break
            path.later_searches.append(found[0])
            init = found[1]
        s_k = chosen if k == 1 else path.later_searches[-1]["chosen_sparsity"]
        link = plan_schedule([a["sparsity"] for a in path.assistants] + [s_k], s_student, cfg.distill.steps).path[k - 1]
        if k == 1:  # from the teacher, and from the search's recovered candidate where it kept one
            outcome = chain.stage_from_recovered(link, init, chosen, "assistant")
        else:
            outcome = chain.stage(link, path.source, path.source_key, init, f"assistant {k}", path.last_dir,
                                  path.source_fp)
        path.source, path.source_key = outcome.model, outcome.key
        path.assistants.append(outcome.summary)
        path.source_fp = None
    return path


def _distil_student(chain: _Chain, path: AssistantPath, link: Link, direct: bool) -> dict[str, Any]:
    """The student, cut from the last assistant by its own importance and distilled from it; with no assistant
    (``direct``) cut from the teacher and distilled from it. Returns its line in ``report.json``."""
    prep = chain.prep
    cfg = prep.cfg
    s_student = cfg.pruning.student_sparsity
    init: nn.Module | ShardCut
    if direct:
        log(f"[chain] no assistant: the student is distilled from the teacher directly for {link.steps} steps, "
            "the planned assistant path's total (direct KD)")
        init = chain.cut_from_teacher(s_student)
        return chain.stage_from_recovered(link, init, s_student, "student").summary
    p = cfg.pruning
    init = prune_student(path.source, prep.train, prep.tokenizer, s_student, unit_counts(prep.teacher),
                         p.importance_samples, p.batch_size, cfg.seed, p.importance, p.layout,
                         chain.payload.shape_spec)
    return chain.stage(link, path.source, path.source_key, init, "student", path.last_dir, path.source_fp).summary


def _distil_baseline(chain: _Chain, link: Link) -> dict[str, Any]:
    """The direct-KD baseline: teacher -> student for as many steps as the assistant path ran together
    (``distill.direct_kd_budget: matched``) or as one stage; returns its line in ``report.json``."""
    cfg = chain.prep.cfg
    # a stage that started from the search's recovered candidate counts the recovery's steps it left out
    path_steps = [v["steps_run"] + v.get("started_from", {}).get("steps", 0) for v in chain.distill.values()]
    matched = cfg.distill.direct_kd_budget == "matched"
    steps = sum(path_steps) if matched else cfg.distill.steps
    baseline = chain.stage_from_recovered(dataclasses.replace(link, steps=steps),
                                          chain.cut_from_teacher(cfg.pruning.student_sparsity),
                                          cfg.pruning.student_sparsity, "direct-KD student").summary
    baseline["note"] = (f"teacher -> student without an assistant for {steps} steps: as many as the assistant "
                        f"path's {len(path_steps)} stages together ({' + '.join(map(str, path_steps))})"
                        if matched else
                        f"teacher -> student without an assistant for {steps} steps, as the student stage "
                        f"alone; the assistant path trained {sum(path_steps)} steps in all "
                        "(distill.direct_kd_budget: stage)")
    return baseline
