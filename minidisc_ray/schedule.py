"""The links of a job, planned once: teacher -> assistant(s) -> student, and direct KD at the same steps.

Every place that distils through assistants (``minidisc run`` on Ray Train, a ``minidisc study`` trial and
an exhaustive-strategy candidate, both in process) executes the :class:`Schedule` that :func:`plan_schedule`
returns, so they cannot drift apart. The rule they share:

* the TA path trains ``stage_steps`` per link (``distill.steps`` for the chain, the recovery budget for the
  exhaustive strategy), or a fixed ``total`` split evenly over its links (the study's several-assistant arm);
* **"no assistant" is direct KD at the TA path's total steps**: when the assistant list is empty the one
  link teacher -> student gets ``(planned_assistants + 1) * stage_steps``, the steps the planned TA path
  would have trained, never one stage's worth;
* the direct-KD baseline (teacher -> student) is planned at the path's total; it is left out when the path
  itself is direct KD (it would be the same run).

Sparsities here are *unit* sparsities (the fraction of prunable heads and neurons removed, relative to the
teacher), the grid's and the CLI's meaning. Pure data: no torch, no Ray.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Link", "Schedule", "plan_schedule", "path_total_steps", "run_in_process"]


@dataclass(frozen=True)
class Link:
    """One distillation: the model ``name`` (cut at ``unit_sparsity``) learns from ``source`` for ``steps``.

    ``cut_from`` says where its initialisation comes from: ``"teacher"`` (pruned from the teacher by the
    teacher's importance, as the search's candidates are) or ``"source"`` (pruned from the model it learns
    from, by that model's own importance, as ``minidisc run`` cuts a student from its TA).
    """

    name: str
    source: str
    unit_sparsity: float
    steps: int
    cut_from: str

    @property
    def stage(self) -> str:
        """The link's name in reports: ``teacher_to_assistant``, ``assistant_to_student``, ``direct_kd``."""
        return "direct_kd" if self.name == "direct_kd" else f"{self.source}_to_{self.name}"

    @property
    def directory(self) -> str:
        """The model directory a chain writes for it: the link's name (``assistant``, ``assistant_2``,
        ``student``), ``direct_kd_student`` for the baseline."""
        return "direct_kd_student" if self.name == "direct_kd" else self.name


@dataclass(frozen=True)
class Schedule:
    """The TA path (``path``, teacher first) and the direct-KD baseline at the path's total steps."""

    path: tuple[Link, ...]
    baseline: Link | None

    @property
    def assistants(self) -> list[float]:
        return [link.unit_sparsity for link in self.path[:-1]]

    @property
    def total_steps(self) -> int:
        return sum(link.steps for link in self.path)

    @property
    def direct(self) -> bool:
        """The path is direct KD itself (no assistant)."""
        return len(self.path) == 1

    def links(self) -> list[Link]:
        return [*self.path, *([self.baseline] if self.baseline is not None else [])]


def path_total_steps(stage_steps: int, planned_assistants: int = 1) -> int:
    """Steps of the planned TA path: one ``stage_steps`` per link, ``planned_assistants + 1`` links."""
    return (planned_assistants + 1) * stage_steps


def _assistant_name(k: int) -> str:
    return "assistant" if k == 1 else f"assistant_{k}"


def plan_schedule(assistants: Sequence[float], student_sparsity: float, stage_steps: int,
                  planned_assistants: int = 1, total: int | None = None, baseline: bool = True) -> Schedule:
    """The links of a job.

    Args:
        assistants: unit sparsities of the chosen assistants, teacher side first (empty: no assistant).
        student_sparsity: the student's unit sparsity.
        stage_steps: steps per link of the TA path.
        planned_assistants: how many assistants the job plans (``pruning.assistants``); "no assistant"
            trains the steps that path would have trained.
        total: split this many steps evenly over the path's links instead (the last link takes the
            remainder), e.g. a two-assistant chain compared with one assistant at the same total.
        baseline: plan the direct-KD baseline (teacher -> student at the path's total steps).

    Example:
        >>> s = plan_schedule([0.6], 0.9, 100)
        >>> [(x.stage, x.steps) for x in s.links()]
        [('teacher_to_assistant', 100), ('assistant_to_student', 100), ('direct_kd', 200)]
        >>> [(x.stage, x.steps) for x in plan_schedule([], 0.9, 100).links()]
        [('teacher_to_student', 200)]
    """
    chain = [float(s) for s in assistants]
    if any(not 0.0 <= s < student_sparsity for s in chain) or chain != sorted(set(chain)):
        raise ValueError(f"assistants {chain} must be increasing unit sparsities below the student's "
                         f"{student_sparsity}")
    if stage_steps < 1 or planned_assistants < 0:
        raise ValueError(f"stage_steps {stage_steps} must be >= 1 and planned_assistants {planned_assistants} >= 0")
    n_links = len(chain) + 1
    if not chain:
        steps = [total if total is not None else path_total_steps(stage_steps, planned_assistants)]
    elif total is not None:
        share = max(1, round(total / n_links))
        steps = [share] * (n_links - 1) + [max(1, total - share * (n_links - 1))]
    else:
        steps = [stage_steps] * n_links
    names = [_assistant_name(k) for k in range(1, n_links)] + ["student"]
    sources = ["teacher", *names[:-1]]
    sparsities = [*chain, float(student_sparsity)]
    path = tuple(Link(name, source, s, n, "teacher" if source == "teacher" else "source")
                 for name, source, s, n in zip(names, sources, sparsities, steps, strict=True))
    base = None
    if baseline and chain:
        base = Link("direct_kd", "teacher", float(student_sparsity), sum(steps), "teacher")
    return Schedule(path, base)


def run_in_process(schedule: Schedule, teacher: Any, cut: Callable[[Link, Any], Any],
                   train: Callable[[Link, Any, Any], dict[str, Any]], with_baseline: bool = True) -> dict[str, Any]:
    """Execute ``schedule`` in this process (a study trial, an exhaustive candidate).

    ``cut(link, source_model)`` gives the link's initialisation (pruned from the teacher or from its
    source, as ``link.cut_from`` says); ``train(link, student, source_model)`` distils it and returns a
    dict with at least ``metric``. Returns ``{link.stage: result}`` in schedule order; each model is dropped
    once the next link no longer needs it.
    """
    results: dict[str, Any] = {}
    models: dict[str, Any] = {"teacher": teacher}
    for link in schedule.path:
        source = models[link.source]
        student = cut(link, source)
        results[link.stage] = train(link, student, source)
        models[link.name] = student
        if link.source != "teacher":
            del models[link.source]
    if with_baseline and schedule.baseline is not None:
        link = schedule.baseline
        student = cut(link, teacher)
        results[link.stage] = train(link, student, teacher)
    return results
