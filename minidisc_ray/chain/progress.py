"""The driver's view of a running stage: one progress line (step, loss, rate, ETA) from the workers' event file."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

PROGRESS_EVERY_S = 5.0


class StageProgress:
    """Follows a running stage from the driver: reads the workers' events and prints a progress line
    (steps, loss, dev metric, seconds per step, ETA) to stderr; every evaluation gets a line, between
    evaluations at most one line per ``every_s`` (the line is rewritten in place on a terminal)."""

    def __init__(self, events_path: str | None, name: str, run_id: str | None, steps: int, metric: str,
                 every_s: float = 30.0) -> None:
        self.path, self.name, self.run_id, self.steps, self.metric = events_path, name, run_id, steps, metric
        self.every_s, self.tty = every_s, sys.stderr.isatty()
        self.offset, self.last_print = 0, 0.0
        self.first: tuple[float, int] | None = None
        self.last_metric: float | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._follow, daemon=True)

    def __enter__(self) -> StageProgress:
        if self.path:
            self.offset = Path(self.path).stat().st_size if Path(self.path).is_file() else 0
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=5)
            self.poll()  # what the workers wrote after the last poll (a short stage may finish within one)
        if self.tty and self.last_print:
            print(file=sys.stderr, flush=True)

    def _follow(self) -> None:
        while not self.stop.wait(1.0):
            self.poll()

    def poll(self) -> list[str]:
        """Read new events and print what they say; returns the lines printed (for tests)."""

        path = Path(self.path or "")
        if not path.is_file():
            return []
        with open(path) as fh:
            fh.seek(self.offset)
            chunk = fh.read()
        complete, _, _ = chunk.rpartition("\n")
        self.offset += len(complete.encode()) + (1 if complete else 0)
        printed = []
        for line in complete.splitlines():
            try:
                e = json.loads(line)
                if not isinstance(e, dict) or e.get("event") not in ("progress", "eval"):
                    continue
                step, when, loss = int(e["step"]), float(e["time"]), float(e["loss"])
                metric = float(e["metric"]) if e["event"] == "eval" else None
            except (ValueError, KeyError, TypeError):
                continue  # a torn or foreign line: progress is cosmetic, skip it
            if e.get("stage") != self.name or (self.run_id and e.get("run_id") != self.run_id):
                continue
            if self.first is None:
                self.first = (when, step)
            if metric is not None:
                self.last_metric = metric
            t0, s0 = self.first
            rate = (when - t0) / (step - s0) if step > s0 else None
            eta = f"ETA {duration(rate * (self.steps - step))}" if rate else "ETA -"
            dev = f" dev {self.metric} {self.last_metric:.4f}" if self.last_metric is not None else ""
            text = (f"[distill {self.name}] {step}/{self.steps} steps, loss {loss:.4f}{dev}"
                    f"{f', {rate:.2f} s/step' if rate else ''}, {eta}"
                    f"{' (early stop)' if e.get('early_stop') else ''}")
            now = time.time()
            if e["event"] == "eval" or now - self.last_print >= self.every_s or self.tty:
                end = "" if self.tty and e["event"] != "eval" else "\n"
                print(("\r" if self.tty else "") + text, end=end, file=sys.stderr, flush=True)
                self.last_print = now
                printed.append(text)
        return printed


def duration(seconds: float) -> str:
    m, s = divmod(int(max(0.0, seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"
