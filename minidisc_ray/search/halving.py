"""Multi-fidelity assistant selection on the real objective: the student's dev metric after trial distillation.

``search.strategy: halving`` runs one Ray Tune trial per *arm*: every candidate assistant below the student
(or a shortlist of them) and "no assistant". An arm distils its path the way the chain will
(:mod:`minidisc_ray.schedule`): the assistant is cut from the teacher and distilled from it for the recovery
budget (the search's own view of a candidate), the student is cut from the assistant by the assistant's
importance and distilled from it; "no assistant" is direct KD from the teacher for the same total steps.
The student link is trained in rungs (``search.halving_min_fraction`` of ``search.halving_steps``, times
``search.halving_reduction`` per rung) and the student's dev metric is reported at each rung, as Minitron
distils its top candidates briefly before choosing. ``search.halving_scheduler``: ``successive`` (default;
synchronous successive halving, one Tune experiment per rung over the arms still in, each trained from its
start to the rung, until one arm is left), or one Tune experiment under Tune's ``AsyncHyperBandScheduler``
(``asha``) or ``HyperBandScheduler`` (``hyperband``).

``search.strategy: auto`` (the default of ``minidisc run``) first runs the lambda search as the paper does
(bisection, cheap), keeping each candidate's recovered weights, then this halving round among its
``search.shortlist`` best candidates and "no assistant", each arm starting from the kept candidate.

Every finished rung is recorded (``OUTPUT/evaluations``) and reported from the record on a rerun; an arm
whose next rung is not recorded trains again from its start (a trial keeps no model checkpoint).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

from minidisc_ray.candidates import SearchPayload, prune_student
from minidisc_ray.modelio import load_recovered, save_recovered
from minidisc_ray.ray_env import resolved
from minidisc_ray.records import digest
from minidisc_ray.report import evidence_lines
from minidisc_ray.stats import dev_noise, pack_rows, paired_noise, unpack_rows

NONE_ARM = "none"


@dataclass
class HalvingPayload:
    """What every halving trial shares: the search's payload and the trial budget."""

    search: SearchPayload
    rungs: list[int]  # student-link steps at which the student is evaluated and reported
    lr: float
    batch_size: int
    importance_samples: int
    importance_batch: int
    # arm -> (path, SHA-256) of the lambda search's recovered candidate, its first link (auto; see ArmRun)
    recovered: dict[float, tuple[str, str]] = field(default_factory=dict)

    def rung_key(self, arm: float, rung: int) -> str:
        s = self.search
        return digest("halving", s.context_key, arm, s.student_sparsity, self.rungs[rung], s.recovery, self.lr,
                      self.batch_size, self.importance_samples, self.importance_batch, s.importance_method, s.layout)


def rungs_for(steps: int, min_fraction: float, reduction: int) -> list[int]:
    """Student-link steps of each rung, geometric down from ``steps`` by ``reduction`` while at least
    ``steps * min_fraction``: e.g. 120 steps, a ninth, 3 -> [13, 40, 120]."""
    out = [steps]
    r = steps / reduction
    while r >= steps * min_fraction - 1e-9 and round(r) >= 1 and round(r) < out[0]:
        out.insert(0, round(r))
        r /= reduction
    return out


class ArmRun:
    """One arm's trial distillation in this process (plain torch): built on the first :meth:`advance`,
    then trained rung by rung. Used by the Tune trainables (``halving``, ``auto``), the Optuna actor
    (``optuna-kd``) and ``minidisc study``'s arm trials.

    The first link is the search's own view of the candidate (pruned from the teacher, recovered for
    ``recovery.steps``): when the lambda search kept that candidate's recovered weights
    (``HalvingPayload.recovered``, checked against the SHA-256 in its signed evaluation record) they are
    loaded instead of trained again. The student link draws its randomness from a seed of its own, so it
    trains the same whether the first link was trained here or loaded."""

    def __init__(self, hp: HalvingPayload, arm: float) -> None:
        self.hp, self.arm = hp, float(arm)
        self.loop: Any = None
        self.first_link = "trained"
        self.first_cpu_seconds = 0.0
        self.eval_cpu_seconds = 0.0  # spent evaluating the student (minidisc study separates it from training)
        self.kept: tuple[str, str] | None = None  # (file, SHA-256) of the first link this arm trained and kept
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def _build(self) -> None:
        import torch

        from minidisc_ray.data import infinite, make_loader
        from minidisc_ray.engine import Loop, LoopSpec
        from minidisc_ray.pruning import plan_for_sparsity, prune_model
        from minidisc_ray.schedule import plan_schedule
        from minidisc_ray.search.trial import _device
        from minidisc_ray.training import distill, kd_loss_fn

        hp, p = self.hp, self.hp.search
        device = _device()
        torch.manual_seed(p.seed)
        rec_cfg = p.recovery
        plan = plan_schedule([self.arm] if self.arm < p.student_sparsity else [], p.student_sparsity, hp.rungs[-1])
        teacher = p.teacher().to(device)
        train, dev = p.dataset("train"), p.dataset("dev")
        self.dev_loader = make_loader(dev, p.tokenizer, 64)
        first = prune_model(teacher, plan_for_sparsity(p.importance, plan.path[0].unit_sparsity, layout=p.layout))
        # the first link for the recovery budget: the assistant (as the search scores it), or, with no
        # assistant, the student's first steps from the teacher, so that every arm trains the same total steps
        if load_recovered(first, hp.recovered.get(self.arm)):
            self.first_link = "reused"
        else:
            data = infinite(make_loader(train, p.tokenizer, rec_cfg.batch_size, shuffle=True, seed=p.seed))
            distill(first, teacher, data, rec_cfg.steps, rec_cfg.lr, rec_cfg.temperature, p.regression,
                    rec_cfg.hard_label_weight)
            path = p.recovered_path(self.arm)
            if path is not None:  # kept: the arm's later rungs load it
                self.kept = (path, save_recovered(first, path))
        self.first_cpu_seconds = time.process_time() - self.c0
        torch.manual_seed(p.seed + 1)  # the student link: the same draws after a trained or a loaded first link
        if plan.direct:
            student, source = first, teacher
        else:
            del teacher
            source = first.eval()
            student = prune_student(first, train, p.tokenizer, p.student_sparsity, p.teacher_units,
                                    hp.importance_samples, hp.importance_batch, p.seed, p.importance_method, p.layout)
        self.student = student
        self.data = infinite(make_loader(train, p.tokenizer, hp.batch_size, shuffle=True, seed=p.seed + 1))
        self.loop = Loop(student, LoopSpec(steps=hp.rungs[-1], lr=hp.lr, warmup_ratio=0.1),
                         kd_loss_fn(source, rec_cfg.temperature, p.regression, rec_cfg.hard_label_weight))
        student.train()

    def advance(self, rung: int, evaluate_it: bool = True) -> dict[str, Any] | None:
        """Train the student up to rung ``rung`` (0-based) and return its result (None without evaluation)."""
        from minidisc_ray.engine import evaluate_rows

        if self.loop is None:
            self._build()
        steps = self.hp.rungs[rung]
        while self.loop.state.step < steps:
            self.loop.step(self.data)
        if not evaluate_it:
            return None
        c0 = time.process_time()
        scores, correct = evaluate_rows(self.student, self.dev_loader, self.hp.search.metric)
        metric = float(scores["metric"])
        self.eval_cpu_seconds += time.process_time() - c0
        self.student.train()
        return {"student_metric": metric, **({"dev_correct": pack_rows(correct)} if correct is not None else {}),
                "steps": self.hp.search.recovery.steps + steps, "student_steps": steps,
                "seconds": time.perf_counter() - self.t0, "cpu_seconds": time.process_time() - self.c0,
                "first_link_cpu_seconds": self.first_cpu_seconds, "first_link": self.first_link,
                **({"recovered_sha256": self.kept[1]} if self.kept else {})}

    def recorded_rung(self, rung: int) -> dict[str, Any] | None:
        """Rung ``rung`` (0-based) as an earlier run recorded it, or None."""
        rec = self.hp.search.finished.get(self.hp.rung_key(self.arm, rung))
        if rec is None:
            return None
        kept: dict[str, Any] = {k: rec[k] for k in ("steps", "student_steps", "seconds", "cpu_seconds", "dev_correct")
                                if k in rec}
        return {"student_metric": rec["metric"], **kept}

    def recorded(self) -> list[dict[str, Any]]:
        """The arm's first rungs as recorded by an earlier run (in order, up to the first missing one)."""
        out = []
        for i in range(len(self.hp.rungs)):
            rec = self.recorded_rung(i)
            if rec is None:
                break
            out.append(rec)
        return out


def halving_trial(config: dict[str, Any], payload: HalvingPayload) -> None:
    """Ray Tune function trainable of one arm: reports ``student_metric`` at every rung (recorded rungs from
    the record); the scheduler decides whether it goes on."""
    from ray import tune

    from minidisc_ray.search.trial import _event, _node, _threads

    _threads()
    run = ArmRun(resolved(payload), float(config["arm"]))
    base = {"arm": run.arm, "sparsity": run.arm, "node": _node()}
    recorded = run.recorded()
    for i, rec in enumerate(recorded):  # recorded rungs first: the scheduler may stop the arm on them
        tune.report({**base, **rec, "rung": i + 1, "reused": True, "finished_at": time.time()})
    if recorded and len(recorded) < len(payload.rungs):
        run.advance(len(recorded) - 1, evaluate_it=False)  # the recorded rungs: trained through, not evaluated
    for i in range(len(recorded), len(payload.rungs)):
        result = run.advance(i)
        if result is None:
            continue
        _event(payload.search, event="rung", arm=run.arm, rung=i + 1, metric=result["student_metric"])
        tune.report({**base, **result, "rung": i + 1, "eval_key": payload.rung_key(run.arm, i),
                     "finished_at": time.time()})


def rung_trial(config: dict[str, Any], payload: HalvingPayload) -> None:
    """Ray Tune function trainable of successive halving (``search.halving_scheduler: successive``): one arm
    trained from its start to one rung (``config["rung"]``, 0-based), evaluated and reported once; a
    recorded rung is reported from the record."""
    from ray import tune

    from minidisc_ray.search.trial import _event, _node, _threads

    _threads()
    run = ArmRun(resolved(payload), float(config["arm"]))
    i = int(config["rung"])
    base = {"arm": run.arm, "sparsity": run.arm, "node": _node(), "rung": i + 1}
    rec = run.recorded_rung(i)
    if rec is not None:
        tune.report({**base, **rec, "reused": True, "finished_at": time.time()})
        return
    result = run.advance(i)
    assert result is not None
    _event(payload.search, event="rung", arm=run.arm, rung=i + 1, metric=result["student_metric"],
           first_link=result["first_link"])
    tune.report({**base, **result, "eval_key": payload.rung_key(run.arm, i), "finished_at": time.time()})


def scheduler_for(kind: str, rungs: list[int], reduction: int) -> Any:
    """The Tune scheduler over rungs (``training_iteration`` counts rungs) of ``asha`` and ``hyperband``."""
    from ray.tune.schedulers import AsyncHyperBandScheduler, HyperBandScheduler

    if kind == "hyperband":
        return HyperBandScheduler(time_attr="training_iteration", max_t=len(rungs), reduction_factor=reduction)
    return AsyncHyperBandScheduler(time_attr="training_iteration", max_t=len(rungs), grace_period=1,
                                   reduction_factor=reduction, brackets=1)


def summarise(rows: list[dict[str, Any]], rungs: list[int], metric: str, dev_rows: int,
              student_sparsity: float) -> dict[str, Any]:
    """Which arm won each rung and by how much, against the dev set's noise; the pick is the best arm at
    the highest rung any arm reached. The noise is the paired standard error of the winner's and the
    runner-up's difference where both rows carry their per-row correctness (``dev_correct``: accuracy),
    ``noise_kind: paired``; otherwise :func:`dev_noise`'s bound for two independent models (``unpaired``)."""
    by_rung: list[dict[str, Any]] = []
    for i, steps in enumerate(rungs, 1):
        at = sorted(((r["arm"], r["student_metric"]) for r in rows if r.get("rung") == i),
                    key=lambda x: (-x[1], -x[0]))
        correct = {r["arm"]: r["dev_correct"] for r in rows if r.get("rung") == i and r.get("dev_correct")}
        if not at:
            continue
        entry: dict[str, Any] = {"rung": i, "student_steps": steps, "arms": [{"arm": _arm_name(a, student_sparsity),
                                                                               "sparsity": a, "metric": m}
                                                                              for a, m in at]}
        if len(at) > 1:
            margin = at[0][1] - at[1][1]
            first, second = correct.get(at[0][0]), correct.get(at[1][0])
            pair = (unpack_rows(first), unpack_rows(second)) if first and second else None
            noise: float | None
            if pair is not None and len(pair[0]) == len(pair[1]) > 1:
                noise, disagree = paired_noise(*pair)
                entry.update(noise_kind="paired", disagree=disagree, rows=len(pair[0]))
            else:
                noise = dev_noise(metric, at[0][1], dev_rows)
                entry.update(noise_kind="unpaired")
            entry.update(winner=_arm_name(at[0][0], student_sparsity), runner_up=_arm_name(at[1][0], student_sparsity),
                         margin=margin, noise=noise,
                         beyond_noise=None if noise is None else bool(margin > noise))
        else:
            entry.update(winner=_arm_name(at[0][0], student_sparsity), margin=None, noise=None, beyond_noise=None)
        by_rung.append(entry)
    pick = by_rung[-1]["arms"][0] if by_rung else None
    return {"rungs": by_rung, "chosen_sparsity": pick["sparsity"] if pick else None,
            "chosen_metric": pick["metric"] if pick else None}


def _arm_name(arm: float, student_sparsity: float) -> str:
    return "no assistant" if arm >= student_sparsity else f"assistant {arm:g}"


def make_payload(search: SearchPayload, cfg: Any) -> HalvingPayload:
    se = cfg.search
    steps = se.halving_steps or cfg.distill.steps
    return HalvingPayload(replace(search), rungs_for(steps, se.halving_min_fraction, se.halving_reduction),
                          lr=cfg.distill.lr, batch_size=cfg.distill.batch_size,
                          importance_samples=min(cfg.pruning.importance_samples, 256),
                          importance_batch=cfg.pruning.batch_size)


def _with_records(payload: SearchPayload, cfg: Any, output_dir: Any,
                  arms: list[float]) -> tuple[HalvingPayload, Any]:
    """The trial payload for ``arms`` with every rung ``OUTPUT/evaluations`` already holds, and that store."""
    from minidisc_ray.records import EvaluationStore

    hp = make_payload(payload, cfg)
    store = EvaluationStore(output_dir / "evaluations")
    hp.search.finished = {k: r for a in arms for i in range(len(hp.rungs))
                          if (r := store.get(k := hp.rung_key(a, i))) is not None}
    return hp, store


def _record_rung(store: Any, key: str, arm: float, result: dict[str, Any]) -> None:
    """Record one finished rung (the fields :meth:`ArmRun.recorded` reads back)."""
    fields = ("steps", "student_steps", "seconds", "cpu_seconds", "dev_correct")
    kept: dict[str, Any] = {k: result[k] for k in fields if k in result}
    store.put(key, {"metric": result["student_metric"], "sparsity": arm, **kept})


def _summary(prep: Any, strategy: str, h: dict[str, Any], evaluations: int, reused: int, failed: int,
             seconds: float, cpu_seconds: float, cpu_seconds_spent: float, experiment_path: str) -> dict[str, Any]:
    """The search summary (``search.json``) of a trial-distillation strategy, shaped like the lambda ones'."""
    import ray

    cfg = prep.cfg
    return {
        "strategy": strategy, "lam": cfg.pruning.lam, "tradeoff_form": cfg.pruning.tradeoff,
        "grid": sorted(cfg.pruning.grid), "student_sparsity": cfg.pruning.student_sparsity,
        "metric_name": prep.task.metric,
        "teacher": {"sparsity": 0.0, "params": prep.total, "prunable": prep.prunable,
                    "metric": prep.teacher_metrics["metric"], "path": prep.teacher_dir},
        "candidates": [], "chosen_sparsity": h["chosen_sparsity"], "chosen": None, "halving": h,
        "evaluations": evaluations, "reused": reused, "failed": failed, "candidates_scored": 0,
        "seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 2),
        "cpu_seconds_spent": round(cpu_seconds_spent, 2), "nodes": [], "experiment_path": experiment_path,
        "resources": {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")},
    }


def run_halving(prep: Any, payload: SearchPayload, output_dir: Any, arms: list[float], strategy: str = "halving",
                run_id: str = "", recovered: dict[float, tuple[str, str]] | None = None) -> dict[str, Any]:
    """Trial distillation of ``arms`` (unit sparsities; the student's own = no assistant) stopped early by the
    configured scheduler; returns the search summary (``search.json``) with a ``halving`` section.

    ``successive`` (synchronous successive halving): one Tune experiment per rung over the arms still in;
    each trains from its start to the rung (the first link loaded where ``recovered`` holds it) and the
    best ``1 / reduction`` go on; the round ends as soon as one arm is left (the chain then trains it in
    full). ``asha`` / ``hyperband``: one Tune experiment over every arm with that Tune scheduler, each
    trial training rung after rung."""
    from ray import tune

    from minidisc_ray.logs import log
    from minidisc_ray.ray_env import interrupt_stopper, interruptible, storage_root, trial_failure_line, verbose

    cfg = prep.cfg
    se = cfg.search
    if payload.recovered_dir is None and se.halving_scheduler == "successive":  # an arm keeps the first link
        payload.keep_recovered_in(output_dir)  # it trains, for its later rungs (each rung is a trial of its own)
    hp, store = _with_records(payload, cfg, output_dir, arms)
    hp.recovered = dict(recovered or {})
    s_student = cfg.pruning.student_sparsity
    names = ", ".join(_arm_name(a, s_student) for a in arms)
    loaded = sum(1 for a in arms if a in hp.recovered)
    log(f"[halving] {len(arms)} arms ({names}); student link rungs {hp.rungs} steps after "
        f"{payload.recovery.steps} first-link steps"
        + (f" ({loaded} first link(s) kept by the lambda search)" if loaded else "")
        + f"; {se.halving_scheduler} with reduction {se.halving_reduction}"
        + (f"; {len(hp.search.finished)} rung(s) recorded by an earlier run" if hp.search.finished else ""))

    class Record(tune.Callback):
        def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any],
                            **info: Any) -> None:
            if "student_metric" not in result:
                return
            first = " (first link loaded)" if result.get("first_link") == "reused" else ""
            log(f"[halving] {_arm_name(result['arm'], s_student)} rung {result['rung']}/{len(hp.rungs)} "
                f"({result['student_steps']} student steps): student {result['student_metric']:.4f}"
                f"{' (recorded)' if result.get('reused') else first}")
            if not result.get("reused") and result.get("eval_key"):
                _record_rung(store, result["eval_key"], result["sparsity"], result)

        def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            log(trial_failure_line(trial, retried=True))

        def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            log(trial_failure_line(trial, retried=False))

    storage = storage_root(cfg, output_dir, "tune")
    name = f"search-{strategy}-{time.strftime('%Y%m%d-%H%M%S')}"
    resources = {"cpu": se.trial_cpus, "gpu": se.trial_gpus}

    def fit(trainable: Any, space: dict[str, Any], scheduler: Any,
            exp: str) -> list[tuple[float, list[dict[str, Any]]]]:
        """One Tune experiment; (arm, its reported results) per trial, an empty list for a failed one."""
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(trainable, payload=hp), resources), param_space=space,
            tune_config=tune.TuneConfig(scheduler=scheduler, metric="student_metric", mode="max",
                                        max_concurrent_trials=se.max_concurrent_trials, reuse_actors=False),
            run_config=tune.RunConfig(name=exp, storage_path=storage, stop=interrupt_stopper(), callbacks=[Record()],
                                      verbose=1 if verbose() else 0, failure_config=tune.FailureConfig(max_failures=1)))
        out = []
        for res in list(interruptible(tuner.fit, stoppable=True)):  # type: ignore[call-overload]
            df = res.metrics_dataframe
            ok = res.error is None and df is not None and not df.empty and "student_metric" in df
            out.append((float((res.config or {}).get("arm", float("nan"))), df.to_dict("records") if ok else []))
        return out

    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    trials: dict[float, dict[str, Any]] = {}
    failed = 0

    def take(arm: float, hist: list[dict[str, Any]]) -> None:
        nonlocal failed
        if not hist:
            failed += 1
            trials.setdefault(arm, {"arm": arm, "failed": True})
            return
        rows.extend({k: h.get(k) for k in ("arm", "rung", "student_metric", "student_steps", "steps", "dev_correct")}
                    for h in hist)
        t = trials.setdefault(arm, {"arm": arm, "cpu_seconds": 0.0, "cpu_seconds_spent": 0.0, "reused": True})
        t.pop("failed", None)
        last = hist[-1]  # its cpu_seconds: the trial's whole process time (cumulative over its rungs)
        t.update(rungs_reached=int(last["rung"]), metric=last["student_metric"])
        t["cpu_seconds"] += float(last.get("cpu_seconds") or 0.0)
        t["cpu_seconds_spent"] += 0.0 if last.get("reused") else float(last.get("cpu_seconds") or 0.0)
        t["reused"] = t["reused"] and bool(last.get("reused"))
        if last.get("first_link"):  # how its first round got its first link (later rounds load their own)
            t.setdefault("first_link", last["first_link"])
        kept = hp.search.recovered_path(arm) if last.get("recovered_sha256") else None
        if kept is not None:  # the arm kept its first link: its later rungs load it
            hp.recovered[arm] = (kept, last["recovered_sha256"])

    if se.halving_scheduler == "successive":
        alive = list(arms)
        for i in range(len(hp.rungs)):
            got: dict[float, float] = {}
            for arm, hist in fit(rung_trial, {"arm": tune.grid_search(alive), "rung": i}, None, f"{name}-rung{i + 1}"):
                take(arm, hist)
                if hist:
                    got[arm] = float(hist[-1]["student_metric"])
            ranked = sorted(got, key=lambda a: (-got[a], -a))
            if not ranked or i == len(hp.rungs) - 1:
                break
            alive = ranked[:max(1, -(-len(ranked) // se.halving_reduction))]
            if len(alive) == 1:
                log(f"[halving] one arm left after rung {i + 1} ({_arm_name(alive[0], s_student)}): no further rung; "
                    "the chain trains it in full")
                break
    else:
        for arm, hist in fit(halving_trial, {"arm": tune.grid_search([float(a) for a in arms])},
                             scheduler_for(se.halving_scheduler, hp.rungs, se.halving_reduction), name):
            take(arm, hist)
    wall = time.perf_counter() - t0
    ok = [t for t in trials.values() if not t.get("failed")]
    if not ok:
        from minidisc_ray.errors import JobFailed

        raise JobFailed(f"search: every one of the {len(trials)} halving trial(s) failed, so no teacher assistant "
                        f"can be chosen; see {storage}/{name}*")
    dev_rows = len(prep.dev)
    h = summarise(rows, hp.rungs, prep.task.metric, dev_rows, s_student)
    h.update(arms=[float(a) for a in arms], trials=list(trials.values()), scheduler=se.halving_scheduler,
             reduction=se.halving_reduction, first_link_steps=payload.recovery.steps, dev_rows=dev_rows,
             first_links_loaded=sorted(a for a in arms if trials.get(a, {}).get("first_link") == "reused"))
    for line in evidence_lines(h, prep.task.metric):
        log(f"[halving] {line}")
    chosen = h["chosen_sparsity"]
    log(f"[halving] pick: {_arm_name(chosen, s_student) if chosen is not None else None} in {wall:.0f}s")
    return _summary(prep, strategy, h, evaluations=len(rows), reused=sum(1 for t in ok if t["reused"]),
                    failed=failed, seconds=wall, cpu_seconds=sum(t["cpu_seconds"] for t in ok),
                    cpu_seconds_spent=sum(t["cpu_seconds_spent"] for t in ok),
                    experiment_path=f"{storage}/{name}")


def shortlist(search: dict[str, Any], student_sparsity: float, k: int) -> list[float]:
    """The ``k`` best lambda-tradeoff candidates a search evaluated below the student (best first)."""
    ok = [c for c in search["candidates"] if not c.get("failed") and c.get("tradeoff") is not None
          and c["sparsity"] < student_sparsity]
    ok.sort(key=lambda c: (-c["tradeoff"], -c["sparsity"]))
    return sorted({float(c["sparsity"]) for c in ok[:k]})


class _ArmActor:
    """An :class:`ArmRun` in a Ray actor: keeps the arm's student between the rungs Optuna asks for."""

    def __init__(self, hp: HalvingPayload, arm: float) -> None:
        from minidisc_ray.search.trial import _threads

        _threads()
        self.run = ArmRun(resolved(hp), arm)

    def advance(self, rung: int, evaluate_it: bool = True) -> dict[str, Any] | None:
        return self.run.advance(rung, evaluate_it)


def run_optuna_kd(prep: Any, payload: SearchPayload, output_dir: Any, arms: list[float],
                  strategy: str = "optuna-kd") -> dict[str, Any]:
    """Optuna on the real objective: TPE over the arms, the student's dev metric reported per rung with
    ``trial.report`` and cut by Optuna's pruner (``search.optuna_pruner``: ``HyperbandPruner`` or
    ``SuccessiveHalvingPruner``), in the persistent RDB study (``search.optuna_storage``, default
    ``OUTPUT/optuna.db``). Each trial's arm runs in a Ray actor on the cluster; ``search.max_concurrent_trials``
    trials at a time. Rungs are recorded and reused exactly as ``halving``'s (same keys)."""
    import logging

    import optuna
    import ray

    from minidisc_ray.logs import log

    cfg = prep.cfg
    se = cfg.search
    hp, store = _with_records(payload, cfg, output_dir, arms)
    s_student = cfg.pruning.student_sparsity
    logging.getLogger("optuna").setLevel(logging.WARNING)
    url = se.optuna_storage or f"sqlite:///{(output_dir / 'optuna.db').resolve()}"
    storage = optuna.storages.RDBStorage(url)
    seed = se.optuna_seed if se.optuna_seed is not None else cfg.seed
    name = "minidisc-kd-" + digest(payload.context_key, arms, hp.rungs, se.optuna_pruner, se.halving_reduction, seed,
                                   hp.lr, hp.batch_size, payload.recovery)[:16]
    if se.optuna_pruner == "successive-halving":
        pruner: optuna.pruners.BasePruner = optuna.pruners.SuccessiveHalvingPruner(
            min_resource=hp.rungs[0], reduction_factor=se.halving_reduction)
    else:
        pruner = optuna.pruners.HyperbandPruner(min_resource=hp.rungs[0], max_resource=hp.rungs[-1],
                                                reduction_factor=se.halving_reduction)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(3, len(arms)))
    study = optuna.create_study(study_name=name, storage=storage, load_if_exists=True, direction="maximize",
                                sampler=sampler, pruner=pruner)
    done = 0
    for t in study.get_trials(deepcopy=False):
        if t.state == optuna.trial.TrialState.RUNNING:  # a killed search's trial
            storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        elif t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED):
            done += 1
    todo = max(0, se.optuna_trials - done)
    log(f"[optuna-kd] study {name}: {done} trial(s) done, {todo} to run over {len(arms)} arms; rungs {hp.rungs} "
        f"student steps; {se.optuna_pruner} pruner")
    actor_cls: Any = ray.remote(num_cpus=se.trial_cpus, num_gpus=se.trial_gpus)(_ArmActor)
    rows: list[dict[str, Any]] = []
    trained_cpu = [0.0]

    def objective(trial: optuna.Trial) -> float:
        arm = float(trial.suggest_categorical("arm", list(arms)))
        run = ArmRun(hp, arm)
        recorded = run.recorded()
        actor: Any = None
        result: dict[str, Any] = {}
        try:
            for i in range(len(hp.rungs)):
                if i < len(recorded):
                    result = recorded[i]
                else:
                    if actor is None:
                        actor = actor_cls.remote(hp, arm)
                        if i > 0:
                            ray.get(actor.advance.remote(i - 1, False))
                    result = ray.get(actor.advance.remote(i))
                    trained_cpu[0] += float(result.get("cpu_seconds", 0.0))
                    _record_rung(store, hp.rung_key(arm, i), arm, result)
                rows.append({"arm": arm, "rung": i + 1, "student_metric": result["student_metric"],
                             "student_steps": hp.rungs[i], "trial": trial.number,
                             "dev_correct": result.get("dev_correct")})
                log(f"[optuna-kd] trial {trial.number} {_arm_name(arm, s_student)} rung {i + 1}/{len(hp.rungs)}: "
                    f"student {result['student_metric']:.4f}{' (recorded)' if i < len(recorded) else ''}")
                trial.report(result["student_metric"], hp.rungs[i])
                if trial.should_prune():
                    raise optuna.TrialPruned()
            return float(result["student_metric"])
        finally:
            if actor is not None:
                ray.kill(actor)

    t0 = time.perf_counter()
    if todo:
        study.optimize(objective, n_trials=todo, n_jobs=max(1, se.max_concurrent_trials), catch=())
    wall = time.perf_counter() - t0
    dev_rows = len(prep.dev)
    all_rows = rows or [{"arm": t.params["arm"], "rung": len(t.intermediate_values),
                         "student_metric": list(t.intermediate_values.values())[-1],
                         "student_steps": list(t.intermediate_values)[-1], "trial": t.number}
                        for t in study.get_trials(deepcopy=False) if t.intermediate_values]
    h = summarise(all_rows, hp.rungs, prep.task.metric, dev_rows, s_student)
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    h.update(arms=[float(a) for a in arms], scheduler=f"optuna {se.optuna_pruner}", reduction=se.halving_reduction,
             first_link_steps=payload.recovery.steps, dev_rows=dev_rows, study=name,
             trials={s: states.count(s) for s in sorted(set(states))})
    for line in evidence_lines(h, prep.task.metric):
        log(f"[optuna-kd] {line}")
    return _summary(prep, strategy, h, evaluations=todo, reused=0, failed=states.count("FAIL"), seconds=wall,
                    cpu_seconds=trained_cpu[0], cpu_seconds_spent=trained_cpu[0], experiment_path=url)
