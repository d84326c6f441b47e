"""SIGTERM ends a job like Ctrl-C in the phases that run in the driver after Ray has started (where Ray's core
had put its own handler: SIGABRT, exit 134, C++ lines): exit 143, the one line, and the rerun resumes."""

from __future__ import annotations

import json
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


def _run_and_terminate(cmd: list[str], log: Path, marker: str, crash_lines: tuple[str, ...]) -> str:
    """Start ``cmd`` in its own session, SIGTERM it once ``marker`` is in its stderr, and check it ended like
    Ctrl-C: exit 143, the one line last, and none of ``crash_lines``. Returns its stderr."""
    with open(log, "w") as err_fh:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err_fh, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            err = _terminate_when(proc, log, marker)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("minidisc: terminated (SIGTERM); rerun the same command"), \
        err[-2000:]
    for crash in crash_lines:
        assert crash not in err, (crash, err[-2000:])
    return err


def test_sigterm_during_the_teachers_fine_tune_ends_like_ctrl_c(tmp_path: Path, teacher_dir: Path,
                                                               sst2_dir: Path) -> None:
    out = tmp_path / "run"
    cfg = tiny_config(teacher_dir, out, sst2_dir, finetune={"max_steps": 100000, "eval_every": 100000, "batch_size": 8},
                      ray={"num_cpus": 1})
    cfg["teacher"]["finetune"] = "always"
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    _run_and_terminate([sys.executable, "-m", "minidisc_ray.cli", "search", str(cfg_path)], tmp_path / "stderr.txt",
                       "[finetune]", ("SIGTERM received", "SIGABRT", "*** ", "logging.cc", "Traceback"))
    assert not (out / "teacher").exists(), "an interrupted fine-tune leaves no teacher behind"


@pytest.mark.slow
def test_sigterm_while_ray_train_runs_a_stage_ends_like_ctrl_c_and_the_rerun_resumes_it(
        tmp_path: Path, teacher_dir: Path, sst2_dir: Path) -> None:
    """``TorchTrainer.fit`` cannot be told to stop: the job must not shut Ray down under it (Ray's core would end
    the process with exit 1, "The core worker has already been shutdown"), but end at once with the one line."""
    out = tmp_path / "run"
    cfg = tiny_config(teacher_dir, out, sst2_dir, pruning={"grid": [0.5, 0.7], "student_sparsity": 0.9},
                      distill={"steps": 600, "batch_size": 8, "eval_every": 50, "patience": 100,
                               "baseline_direct_kd": False},
                      ray={"num_cpus": 2})
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "minidisc_ray.cli", "run", str(cfg_path)]
    _run_and_terminate(cmd, tmp_path / "stderr.txt", "[distill assistant] 50/",
                       ("SIGTERM received", "SIGABRT", "*** ", "logging.cc", "Traceback", "core worker"))
    assert not (out / "assistant").exists(), "an interrupted stage exports nothing"
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    stages = [json.loads(line) for line in (out / "train_events.jsonl").read_text().splitlines()]
    starts = [e for e in stages if e["event"] == "start" and e["stage"] == "assistant"]
    assert len(starts) == 2 and starts[1]["resumed"] and starts[1]["start_step"] >= 50, starts
    ta = json.loads((out / "report.json").read_text())["distill"]["teacher_to_assistant"]
    # all its steps, less those the search's recovered candidate it started from had trained
    assert ta["steps_run"] + ta.get("started_from", {}).get("steps", 0) == 600


def test_sigterm_while_ray_starts_ends_as_terminated_and_the_handler_is_the_jobs_again() -> None:
    """``ray.init`` puts Ray's own SIGTERM handler (``sys.exit(15)``) in place for its duration: a SIGTERM then
    must still end the job as :class:`Terminated` (exit 143 and the one line), not as exit 15."""
    from minidisc_ray.interrupts import Terminated, _on_sigterm, starting_ray

    def rays_handler(signum: int, frame: object) -> None:  # what ray.init installs (ray/_private/worker.py)
        sys.exit(signum)

    before = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(Terminated):
            with starting_ray():
                signal.signal(signal.SIGTERM, rays_handler)
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)  # the handler runs at the next bytecode boundary
        assert signal.getsignal(signal.SIGTERM) is _on_sigterm
        with pytest.raises(SystemExit):  # another exit code is not a SIGTERM: it goes on as it was
            with starting_ray():
                sys.exit(3)
    finally:
        signal.signal(signal.SIGTERM, before)
