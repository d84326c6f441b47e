"""Resident memory of this process: now, and the peak over a block (a sampling thread, Linux /proc)."""

from __future__ import annotations

import os
import threading
import time
from types import TracebackType

import torch


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size (``VmRSS``, shared object-store pages a process touched included), 0 if unknown."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakRSS:
    """``with PeakRSS() as probe: ...`` then ``probe.start``, ``probe.peak`` and ``probe.delta`` in bytes."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def delta(self) -> int:
        return self.peak - self.start


def enabled() -> bool:
    """Whether ``MINIDISC_MEMORY_PROBE=1`` asks the stages to record their peak memory."""
    return os.environ.get("MINIDISC_MEMORY_PROBE", "") == "1"


def warm_up_torch() -> None:
    """Run torch's one-time initialisation (kernels, thread pools, autograd engine, allocator) on a small
    transformer-shaped step, so a probe started afterwards sees the work's memory, not the runtime's."""
    x = torch.randn(2048, 384, requires_grad=True)
    layer = torch.nn.Sequential(torch.nn.LayerNorm(384), torch.nn.Linear(384, 1536), torch.nn.GELU(),
                                torch.nn.Linear(1536, 384))
    opt = torch.optim.AdamW(layer.parameters())
    scores = torch.softmax(x.view(32, 64, 384) @ x.view(32, 64, 384).transpose(1, 2), dim=-1)
    (layer(x).sum() + scores.sum()).backward()
    opt.step()
