"""SIGTERM ends a job like Ctrl-C in the phases that run in the driver after Ray has started (where Ray's core
had put its own handler: SIGABRT, exit 134, C++ lines): exit 143, the one line, and the rerun resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from .test_search_ray import tiny_config

pytestmark = [pytest.mark.ray]


def _terminate_when(proc: subprocess.Popen[bytes], log: Path, marker: str, timeout: float = 240) -> str:
    deadline = time.time() + timeout
    while marker not in log.read_text():
        assert proc.poll() is None, f"the job ended before {marker!r}: {log.read_text()[-2000:]}"
        assert time.time() < deadline, f"no {marker!r} in {timeout} s"
        time.sleep(0.2)
    time.sleep(1.0)  # well inside the phase
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    return log.read_text()


def test_sigterm_during_the_teachers_fine_tune_ends_like_ctrl_c(tmp_path: Path, teacher_dir: Path,
                                                               sst2_dir: Path) -> None:
    out = tmp_path / "run"
    cfg = tiny_config(teacher_dir, out, sst2_dir, finetune={"max_steps": 100000, "eval_every": 100000, "batch_size": 8},
                      ray={"num_cpus": 1})
    cfg["teacher"]["finetune"] = "always"
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err_fh:
        proc = subprocess.Popen([sys.executable, "-m", "minidisc_ray.cli", "search", str(cfg_path)],
                                stdout=subprocess.DEVNULL, stderr=err_fh, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            err = _terminate_when(proc, log, "[finetune]")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("minidisc: terminated (SIGTERM); rerun the same command"), \
        err[-2000:]
    for crash in ("SIGTERM received", "SIGABRT", "*** ", "logging.cc", "Traceback"):
        assert crash not in err, (crash, err[-2000:])
    assert not (out / "teacher").exists(), "an interrupted fine-tune leaves no teacher behind"
