"""The plan as text for a terminal: the candidates, which teacher placements fit, and the recommended placement's
layout of every trial and stage with its memory itemised (``minidisc plan`` prints it to stderr)."""

from __future__ import annotations

from typing import Any

from minidisc_ray.plan_host import render_host


def render(plan: dict[str, Any]) -> str:
    """The plan as a few lines of text for a terminal: the candidates, which placements fit, and the
    recommended one's layout of every trial and stage with its memory itemised."""
    lines = [f"{plan['source']}: {plan['model_type']} ({plan['kind']}), teacher {plan['teacher_params'] / 1e9:.3f}B "
             f"parameters; length {plan['sequence_length']}, {plan['nodes']} node(s) x {plan['gpus_per_node']} x "
             f"{plan['gpu_gib']:g} GiB GPUs",
             f"{'sparsity':>8} {'role':>9} {'params':>14} {'GFLOP/tok':>10} {'CPU ms':>8} {'1-GPU trial GiB':>16}"]
    for r in plan["candidates"]:
        ms = f"{r['cpu_latency_ms']:.1f}" if "cpu_latency_ms" in r else "-"
        flag = "" if r.get("trial_fits_one_gpu", True) else " (!)"
        trial = f"{r['trial_gib']:.1f}{flag}" if "trial_gib" in r else "-"
        lines.append(f"{r['sparsity']:>8.2f} {r['role']:>9} {r['params']:>14,} {r['gflops_per_token']:>10.3f} "
                     f"{ms:>8} {trial:>16}")
    for name, entry in plan["placements"].items():
        worst = max(list(entry["trials"].values()) + list(entry["stages"].values()), key=lambda x: x["gib_per_gpu"])
        lines.append(f"teacher {name:>10}: {'fits' if entry['fits_all'] else 'does not fit'} (largest: "
                     f"{worst['gib_per_gpu']:.1f} GiB per GPU; trials on up to {entry['trial_gpus']} GPU(s))")
    chosen = plan["placement"]
    if chosen is None:
        lines.append(f"nothing fits {plan['gpus']} GPUs under any placement: more nodes (--nodes) or a sparser grid")
        lines.append(f"planned in {plan['seconds']} s")
        return "\n".join(lines)
    entry = plan["placements"][chosen]
    lines.append(f"recommended: teacher.placement: {chosen}"
                 + (f", search.trial_workers: {entry['trial_gpus']}" if entry["trial_gpus"] > 1 else ""))
    for who in ("teacher", "assistant"):
        if f"{who}_pass" in entry:
            tp = entry[f"{who}_pass"]
            lines.append(f"  offline {who} pass: {tp['replicas']} replica(s) of {tp['gpus_per_replica']} GPU(s) "
                         f"({tp['gib_per_replica']} GiB each); top-{tp['top_k']} targets take "
                         f"{tp['stored_gib_per_million_tokens']} GiB per million tokens")
    items = [(f"trial {s}", t) for s, t in entry["trials"].items()] + list(entry["stages"].items())
    for name, fit in items:
        mem = ", ".join(f"{k} {v:.1f}" for k, v in fit["memory_gib"].items() if k != "total" and v >= 0.05)
        lines.append(f"  {name:>22}: {fit['layout']}: {fit['gib_per_gpu']:.1f} GiB per GPU ({mem})")
    cpu_trial = max((r["trial_cpu_gib"] for r in plan["candidates"] if "trial_cpu_gib" in r), default=0.0)
    cpu_stage = max((x["cpu_gib"] for x in plan["chain"].values()), default=0.0)
    lines.append(f"on CPU workers (fp32, one process each): trials up to {cpu_trial:.1f} GiB, chain stages up to "
                 f"{cpu_stage:.1f} GiB of host memory")
    if "driver" in plan:
        d = plan["driver"]
        lines.append(f"driver (host memory): the teacher in fp32 {d['teacher_gib'][chosen]:.1f} GiB, its object-store "
                     f"copy {d['object_store_gib'][chosen]:.1f} GiB; OUTPUT/recovered (auto) up to "
                     f"{d['recovered_gib'][chosen]:.1f} GiB")
    lines += render_host(plan.get("host") or {}, chosen)
    lines.append(f"planned in {plan['seconds']} s")
    return "\n".join(lines)
