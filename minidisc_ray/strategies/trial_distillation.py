"""The strategies that choose on the student's dev metric after short trial distillation
(:mod:`minidisc_ray.search.halving`): ``halving`` (every assistant below the student and "no assistant" as
arms, a Ray Tune ASHA/HyperBand scheduler), ``optuna-kd`` (Optuna TPE with a Hyperband or
successive-halving pruner over the same arms) and ``auto`` (the lambda search, then a halving round among
its shortlist and "no assistant")."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from minidisc_ray.logs import log
from minidisc_ray.records import EvaluationStore
from minidisc_ray.strategies.base import Machinery, ReplaySettings, Strategy, register


def _arms(cfg: Any) -> list[float]:
    s_student = cfg.pruning.student_sparsity
    return sorted({s for s in cfg.pruning.grid if s < s_student} | {s_student})


def replay_halving(rec: Any, arms: list[int], settings: ReplaySettings) -> dict[str, Any] | None:
    """Successive halving replayed on one study seed's recorded student curves (``rec.curves``): the arms are
    the candidates ``arms`` (grid indices; ``settings.no_assistant`` is "no assistant", direct KD for twice the
    stage's steps); the rungs are the student stage's evaluation steps; at each rung the best
    ``1/reduction`` of the arms (by the best dev metric so far: the weights a stopped run keeps) go on; the
    best at the last rung is the pick. An assistant arm pays its teacher -> assistant stage in full and its
    student stage up to the rung where it stops; "no assistant" pays its run up to the stage's steps plus the
    rung (the same total steps); CPU is taken as proportional to steps within a stage.

    None when the records hold no curves (a study recorded before curves were kept)."""
    if rec.curves is None or rec.student_cpu is None or not arms or settings.stage_steps < 1:
        return None
    steps = settings.stage_steps
    rungs = sorted({int(x[0]) for i in arms if i != settings.no_assistant for x in rec.curves[i] if x[0] <= steps})
    if not rungs:
        rungs = [steps]

    def best_by(i: int, rung: int) -> float:
        offset = steps if i == settings.no_assistant else 0  # direct KD: the first `steps` stand for the first link
        seen = [m for s, m in rec.curves[i] if s <= offset + rung]
        return max(seen) if seen else float("-inf")

    def spent(i: int, rung: int) -> float:
        if i == settings.no_assistant:
            return float(rec.chain_cpu[i]) * (steps + rung) / (2 * steps)
        return float(rec.chain_cpu[i] - rec.student_cpu[i]) + float(rec.student_cpu[i]) * rung / steps

    alive = list(arms)
    stopped_at = {}
    final = {i: best_by(i, steps) for i in arms}  # where each arm would have ended, run to the end
    best = max(arms, key=lambda i: (final[i], -i))
    best_reached = rungs[-1]
    for k, rung in enumerate(rungs):
        ranked = sorted(alive, key=lambda i: (best_by(i, rung), -i), reverse=True)
        if k == len(rungs) - 1:
            alive = ranked[:1]
            for i in ranked:
                stopped_at[i] = rung
            break
        keep = max(1, -(-len(ranked) // settings.reduction))
        for i in ranked[keep:]:
            stopped_at[i] = rung
        if best in ranked[keep:]:
            best_reached = rung
        alive = ranked[:keep]
    cpu = sum(spent(i, stopped_at[i]) for i in arms)
    return {"pick": alive[0], "evaluated": len(arms), "cpu": cpu, "rungs": rungs, "best": best,
            "best_to_last_rung": best_reached == rungs[-1], "crossings": crossings(arms, rungs[0], best_by, final)}


def replay_successive(rec: Any, arms: list[int], settings: ReplaySettings, free: set[int]) -> dict[str, Any] | None:
    """Synchronous successive halving (``search.halving_scheduler: successive``) replayed on one study seed's
    recorded halving arms (``rec.arm_curves``: what :class:`~minidisc_ray.search.arms.ArmRun` trains,
    evaluated at every rung): at each rung of ``settings.rungs`` every arm still in trains from its start to
    the rung, the best ``1 / reduction`` go on, and the round ends when one arm is left or at the last rung;
    the chain then trains the pick in full (its recorded chain: ``rec.chain_cpu``). An arm pays its first
    link once (it keeps it for its later rungs), or never where the lambda search kept it (``free``: the grid
    indices it evaluated), its student link up to each rung (CPU proportional to steps) and one evaluation
    per rung. The pick is judged, like every strategy's, by the student of its full chain.

    None when the records hold no halving arms (a study recorded before they were kept)."""
    if rec.arm_curves is None or not arms or not settings.rungs:
        return None
    rungs = list(settings.rungs)
    top = rungs[-1]

    def at(i: int, rung: int) -> float:
        return float(next(m for s, m in rec.arm_curves[i] if int(s) == rung))

    kept = set(free)

    def spent(i: int, rung: int) -> float:
        first = 0.0 if i in kept else float(rec.arm_first_cpu[i])
        kept.add(i)  # an arm keeps the first link it trained: its later rungs load it
        return first + float(rec.arm_link_cpu[i]) * rung / top + float(rec.arm_eval_cpu[i])

    alive = list(arms)
    cpu = 0.0
    for k, rung in enumerate(rungs):
        cpu += sum(spent(i, rung) for i in alive)
        ranked = sorted(alive, key=lambda i: (at(i, rung), i), reverse=True)
        alive = ranked[:1] if k == len(rungs) - 1 else ranked[:max(1, -(-len(ranked) // settings.reduction))]
        if len(alive) == 1:
            break
    pick = alive[0]
    final = {i: float(rec.student[i]) for i in arms}  # what each arm's full chain gives
    best = max(arms, key=lambda i: (final[i], i))
    return {"pick": pick, "evaluated": len(arms), "cpu": cpu + float(rec.chain_cpu[pick]), "rungs": rungs,
            "rung_reached": rung, "best": best, "best_to_last_rung": pick == best,
            "crossings": crossings(arms, rungs[0], lambda i, r: at(i, r), final)}


def crossings(arms: list[int], first_rung: int, best_by: Callable[[int, int], float],
              final: dict[int, float]) -> dict[str, int]:
    """Pairs of arms whose order at the first rung is the reverse of their order at the end of the stage
    (the weakness of any early stop: the arm ahead early is not the arm ahead at the end)."""
    pairs = [(i, j) for n, i in enumerate(arms) for j in arms[n + 1:]]
    crossed = sum(1 for i, j in pairs
                  if (best_by(i, first_rung) - best_by(j, first_rung)) * (final[i] - final[j]) < 0)
    return {"pairs": len(pairs), "crossed": crossed}


def recovered_candidates(payload: Any, output_dir: Path, arms: list[float]) -> dict[float, tuple[str, str]]:
    """arm -> (file, SHA-256) of each arm's recovered candidate the lambda search kept (``OUTPUT/recovered``),
    the digest from the candidate's signed evaluation record; arms without one train their first link."""
    store = EvaluationStore(output_dir / "evaluations")
    out = {}
    for arm in arms:
        rec = store.get(payload.evaluation_key("candidate", arm))
        path = payload.recovered_path(arm)
        if rec is not None and rec.get("recovered_sha256") and path is not None:
            out[float(arm)] = (path, str(rec["recovered_sha256"]))
    return out


class _TrialDistillation(Strategy):
    """Chooses on the student's dev metric after trial distillation, and runs itself (not one Tune grid)."""

    tune_experiment = False
    objective = "student_metric"
    offline_teacher = False  # arms distil from the online teacher
    sharded_trials = False  # an arm holds the teacher whole in one process
    multi_worker_trials = False
    needs_tradeoff = False  # chosen on the student's metric


@register
class Halving(_TrialDistillation):
    name = "halving"
    stage_arms = True

    def run(self, prep: Any, payload: Any, output_dir: Path, run_id: str,
            run_named: Callable[[str], dict[str, Any]], kit: Machinery) -> dict[str, Any]:
        return kit.run_halving(prep, payload, output_dir, _arms(prep.cfg), self.name, run_id)

    def replay(self, rec: Any, curve: list[float], settings: ReplaySettings) -> dict[str, Any] | None:
        """Every candidate (the student's own sparsity as "no assistant") as an arm: successive halving on the
        recorded halving arms (:func:`replay_successive`), or, for a study recorded without them, on the
        chains' student curves (:func:`replay_halving`)."""
        arms = list(range(len(curve)))
        return replay_successive(rec, arms, settings, set()) or replay_halving(rec, arms, settings)


@register
class OptunaKD(_TrialDistillation):
    name = "optuna-kd"
    uses_optuna_study = True
    replayable = False  # its TPE proposals depend on the live study

    def run(self, prep: Any, payload: Any, output_dir: Path, run_id: str,
            run_named: Callable[[str], dict[str, Any]], kit: Machinery) -> dict[str, Any]:
        return kit.run_optuna_kd(prep, payload, output_dir, _arms(prep.cfg))


@register
class Auto(_TrialDistillation):
    name = "auto"
    stage_arms = True
    offline_teacher = True  # its lambda search alone: the round is skipped (see run)
    sharded_trials = True
    needs_tradeoff = True  # the lambda search shortlists by the tradeoff

    def run(self, prep: Any, payload: Any, output_dir: Path, run_id: str,
            run_named: Callable[[str], dict[str, Any]], kit: Machinery) -> dict[str, Any]:
        cfg = prep.cfg
        s_student = cfg.pruning.student_sparsity
        whole = cfg.teacher.holds_whole_in_trials(cfg.search.trial_workers)
        if whole:  # the candidate trials keep their recovered weights: the halving arms start from them
            payload.keep_recovered_in(output_dir)
        lam = run_named("bisection")
        if not whole:  # the halving round's arms would load the teacher whole (one process each)
            why = ("teacher.placement: offline" if cfg.teacher.placement == "offline" else
                   "teacher.placement: sharded over search.trial_workers")
            log(f"[search] auto: {why}, so the halving round (whose arms distil from the whole teacher in one "
                "process) is skipped: the lambda search's pick stands")
            return {**lam, "strategy": self.name, "lambda_pick": lam["chosen_sparsity"], "halving_skipped": why}
        picks = kit.shortlist(lam, s_student, cfg.search.shortlist)
        arms = [*picks, s_student]
        log(f"[search] auto: the lambda search picked {lam['chosen_sparsity']}; its shortlist {picks} and no "
            "assistant go to a halving round on the student's dev metric")
        summary = kit.run_halving(prep, payload, output_dir, arms, self.name, run_id,
                              recovered=recovered_candidates(payload, output_dir, arms))
        summary.update(candidates=lam["candidates"], lambda_pick=lam["chosen_sparsity"],
                       evaluations=lam["evaluations"] + summary["evaluations"],
                       reused=lam["reused"] + summary["reused"],
                       seconds=round(lam["seconds"] + summary["seconds"], 2),
                       cpu_seconds=round(lam["cpu_seconds"] + summary["cpu_seconds"], 2),
                       cpu_seconds_spent=round(lam["cpu_seconds_spent"] + summary["cpu_seconds_spent"], 2),
                       nodes=lam["nodes"],
                       trials_started_again=lam.get("trials_started_again", 0) + summary.get("trials_started_again", 0),
                       lambda_search={k: lam.get(k) for k in ("evaluations", "seconds", "cpu_seconds",
                                                              "chosen_sparsity", "experiment_path",
                                                              "trials_started_again")})
        return summary

    def replay(self, rec: Any, curve: list[float], settings: ReplaySettings) -> dict[str, Any] | None:
        """The bisection's evaluations (replayed), then halving among its ``shortlist`` best evaluated
        candidates below the student and "no assistant"; its cost is both."""
        order, _ = settings.bisection(curve)
        below = [i for i in sorted(set(order)) if i != settings.no_assistant]
        picks = sorted(below, key=lambda i: (curve[i], i), reverse=True)[:settings.shortlist]
        arms = sorted(picks + ([settings.no_assistant] if settings.no_assistant is not None else []))
        # its arms start from the candidates the lambda search recovered (kept, not trained again)
        halving = replay_successive(rec, arms, settings, set(order)) or replay_halving(rec, arms, settings)
        if halving is None:
            return None
        search_cpu = float(sum(rec.eval_cpu[i] for i in set(order)))  # the lambda search's evaluations
        return {**halving, "evaluated": len(set(order)), "cpu": search_cpu + halving["cpu"], "arms": arms,
                "search_cpu": search_cpu}
