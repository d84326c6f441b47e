"""The plan's host memory: what each process of a chain stage holds in host RAM, as the chain's code holds it now.

GPU memory is :mod:`minidisc_ray.plan_memory`'s. This is the other half: the driver process and each stage
worker's host, itemised per stage and per teacher placement, from the models' shapes alone (fp32 = 4 bytes per
parameter). What it counts follows the code paths, not an ideal:

* the **driver** holds the teacher whole in fp32 (replicated, offline; shapes only when sharded), cuts each link's
  starting model (from a sharded teacher the stage's workers cut it), reads every finished stage's best weights
  back whole and rebuilds the model from them to evaluate, fingerprint and save it
  (:func:`minidisc_ray.stages.export_stage`: two copies), keeps the assistant whole as the student's teacher,
  and measures the student's importance on the whole assistant before cutting the student from it
  (:func:`minidisc_ray.candidates.prune_student`; gradients with respect to the masks only, so its activations,
  not counted, are the pass's cost);
* a stage's **rank 0** gathers the trained model's best weights whole on its host at every improvement
  (``full_state_dict`` with CPU offload) and once more at the stop (the last weights, for the record);
* every **rank** reads a replicated teacher from its node's object store (fp32, mapped), a sharded one a tensor
  at a time, an offline one's targets from disk; and stages its checkpoint shard (weights and AdamW moments).

So under ``teacher.placement: sharded`` the teacher never passes through one host, but the assistant and the
student still do. The figures are that cost, named, so a layout can be checked against its hosts before it runs.
"""

from __future__ import annotations

from typing import Any

GIB = float(1 << 30)
FP32 = 4.0
ADAMW = 16.0  # fp32 weights, gradients and two moments per trained parameter (what a rank's checkpoint stages)


def _gib(items: dict[str, float]) -> dict[str, float]:
    out = {k: round(v / GIB, 2) for k, v in items.items() if v > 0}
    out["total"] = round(sum(items.values()) / GIB, 2)
    return out


def stage_host(name: str, trained: int, frozen: int, teacher: int, assistant: int, student: int, workers: int,
               placement: str, largest_tensor: int) -> dict[str, Any]:
    """Host bytes of one stage under ``placement``: the driver at its peak (when the finished stage is exported),
    rank 0 and each other rank. Sizes are parameter counts."""
    from_teacher = name in ("teacher_to_assistant", "direct_kd")
    driver = {
        "teacher (fp32, whole)": FP32 * teacher if placement != "sharded" else 0.0,
        # the path keeps the assistant after its own stage, for the student's link and until the job ends
        "assistant kept as the student's teacher (fp32)": FP32 * assistant if not from_teacher or name == "direct_kd"
        else 0.0,
        # a link from a sharded teacher is cut from its files by the stage's workers (the driver holds its shapes)
        "stage's starting model, cut on the driver (fp32)":
            0.0 if from_teacher and placement == "sharded" else FP32 * trained,
        "stage's best weights read back whole (fp32)": FP32 * trained,
        "stage model rebuilt from them to evaluate and save (fp32)": FP32 * trained,
    }
    teacher_on_rank = {"replicated": FP32 * frozen, "sharded": FP32 * largest_tensor, "offline": 0.0}[placement]
    label = {"replicated": "frozen teacher from the object store (fp32, mapped)",
             "sharded": "frozen teacher read a tensor at a time (fp32)", "offline": "-"}[placement]
    every_rank = {label: teacher_on_rank, "checkpoint staging (its shard of weights and AdamW state)":
                  ADAMW * trained / max(1, workers)}
    rank0 = {**every_rank, "best weights gathered whole (fp32)": FP32 * trained,
             "last weights gathered whole at the stop (fp32)": FP32 * trained}
    out: dict[str, Any] = {"workers": workers, "driver": _gib(driver), "rank0": _gib(rank0),
                           "other_ranks": _gib(every_rank) if workers > 1 else None}
    if placement == "offline":  # every rank reads the whole targets file of the training rows
        out["not_counted"] = ("each rank's copy of the offline targets: training rows x length x (top_k x 8 + 4) "
                              "bytes (the plan does not know the rows)")
    return out


def host_memory(links: list[tuple[str, int, int]], teacher: int, assistant: int, student: int,
                workers: dict[str, dict[str, int]], largest_tensor: int, head_gib: float | None = None,
                worker_gib: float | None = None) -> dict[str, Any]:
    """Per placement (``workers``: placement -> stage -> its workers) and stage (``links``: name, trained and
    frozen parameters), the host memory of the driver, rank 0 and the other ranks; with ``head_gib`` and
    ``worker_gib`` (host RAM of the driver's node and of a worker node), whether each fits."""
    out: dict[str, Any] = {}
    for placement, per_stage in workers.items():
        stages = {name: stage_host(name, trained, frozen, teacher, assistant, student, per_stage[name], placement,
                                   largest_tensor) for name, trained, frozen in links}
        peak_driver = max(s["driver"]["total"] for s in stages.values())
        peak_rank = max(s["rank0"]["total"] for s in stages.values())
        entry: dict[str, Any] = {"stages": stages, "driver_peak_gib": peak_driver, "rank0_peak_gib": peak_rank}
        if head_gib is not None:
            entry["driver_fits_head"] = peak_driver <= head_gib
        if worker_gib is not None:
            entry["rank0_fits_worker"] = peak_rank <= worker_gib
        out[placement] = entry
    out["head_gib"], out["worker_gib"] = head_gib, worker_gib
    out["note"] = ("host RAM per process as the chain's code holds it (minidisc_ray.plan_host): the driver reads "
                   "each stage's model back whole and cuts the student from the whole assistant, rank 0 gathers "
                   "the best weights whole; under teacher.placement: sharded only the teacher stays off one host")
    return out


def render_host(host: dict[str, Any], placement: str) -> list[str]:
    """The host block of the plan's text for ``placement``: per stage, driver, rank 0 and other ranks, and the
    largest item of the driver's peak."""
    entry = host.get(placement)
    if not entry:
        return []
    lines = [f"host memory per process under teacher.placement: {placement} (GiB; as the chain holds it now):"]
    for name, s in entry["stages"].items():
        other = "-" if s["other_ranks"] is None else f"{s['other_ranks']['total']:.1f}"
        lines.append(f"  {name:>22}: driver {s['driver']['total']:.1f}, rank 0 {s['rank0']['total']:.1f}, "
                     f"other ranks {other} ({s['workers']} worker(s))")
    worst = max(entry["stages"].values(), key=lambda s: s["driver"]["total"])
    top = max(((k, v) for k, v in worst["driver"].items() if k != "total"), key=lambda kv: kv[1], default=None)
    if top:
        lines.append(f"  the driver's peak {entry['driver_peak_gib']:.1f} GiB; its largest item: {top[0]} {top[1]:.1f}")
    for key, what, limit in (("driver_fits_head", "the driver", host.get("head_gib")),
                             ("rank0_fits_worker", "rank 0", host.get("worker_gib"))):
        if key in entry:
            lines.append(f"  {what} {'fits' if entry[key] else 'does NOT fit'} {limit:g} GiB of host memory")
    return lines
