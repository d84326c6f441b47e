"""The halving round's evidence lines (per rung: the winner, its margin, the dev set's noise; then how sure the pick
is), written into ``report.md`` and logged by the halving strategies."""

from __future__ import annotations

from typing import Any


def evidence_lines(h: dict[str, Any], metric: str) -> list[str]:
    """The report's lines: per rung, the winner, its margin and the dev set's noise."""
    lines = []
    for r in h["rungs"]:
        if r.get("margin") is None:
            lines.append(f"rung {r['rung']} ({r['student_steps']} student steps): {r['winner']} alone, "
                         f"{metric} {r['arms'][0]['metric']:.4f}")
            continue
        if r["noise"] is None:
            noise = "noise not estimated for this metric"
        else:
            side = "beyond" if r["beyond_noise"] else "within"
            paired = r.get("noise_kind") == "paired"
            how = f"paired: they disagree on {r['disagree']} of {r['rows']} rows that select; " if paired else ""
            noise = f"noise {100 * r['noise']:.1f} pt ({how}{side} it)"
        others = ", ".join(f"{a['arm']} {a['metric']:.4f}" for a in r["arms"])
        lines.append(f"rung {r['rung']} ({r['student_steps']} student steps): {r['winner']} won by "
                     f"{100 * r['margin']:.1f} pt over {r['runner_up']}, {noise}; {others}")
    verdict = _verdict(h)
    return lines + ([verdict] if verdict else [])


def _verdict(h: dict[str, Any]) -> str | None:
    """One line on how sure the pick is: the last rung where two arms were compared, its margin against noise."""
    contested = [r for r in h["rungs"] if r.get("margin") is not None and r.get("noise") is not None]
    if not contested:
        return None
    r = contested[-1]
    if r["beyond_noise"]:
        times = f"{r['margin'] / r['noise']:.1f} times" if r["noise"] > 0 else "more than"
        return (f"how sure: {r['winner']} led {r['runner_up']} at rung {r['rung']}, the last where two arms met, by "
                f"{times} the noise")
    return (f"how sure: not separated; at rung {r['rung']}, the last where two arms met, {r['winner']}'s lead over "
            f"{r['runner_up']} is within the dev set's noise, so on this dev set the pick is as likely one as the "
            "other; a longer round (search.halving_steps) or more dev rows would separate them")
