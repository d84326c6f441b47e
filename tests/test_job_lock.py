"""One job per output directory: an OS lock (flock on the directory) held for the job's life; a second job is
refused in one line naming the holder's pid and host, exit 2, nothing written; a killed holder leaves no stale
lock."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from minidisc_ray.errors import UserInputError
from minidisc_ray.outputs import check_run_output, claim_run_dir, job_lock, unlock_run_dir

from .conftest import REPO, snapshot

HOLD = ("import sys, time; from minidisc_ray.outputs import claim_run_dir; claim_run_dir(sys.argv[1]); "
        "print('held', flush=True); time.sleep(120)")


def _holder(run: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_job_on_a_locked_directory_is_refused_naming_the_holder(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = _holder(run)
    try:
        before = snapshot(run)
        with pytest.raises(UserInputError) as err:
            check_run_output(run)
        line = str(err.value)
        assert f"pid {proc.pid} on host {socket.gethostname()}" in line, line
        assert "--output" in line
        assert "\n" not in line
        with pytest.raises(UserInputError, match=f"pid {proc.pid}"):
            claim_run_dir(run)
        assert snapshot(run) == before, "the refused job wrote into the directory"
    finally:
        proc.kill()
        proc.wait()
    # SIGKILL: no chance to clean up, and still no stale lock
    out = check_run_output(run)
    claim_run_dir(out)
    unlock_run_dir(out)


def test_the_cli_refuses_a_locked_output_with_exit_2_and_one_line(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = _holder(run)
    try:
        before = snapshot(run)
        for command in ("run", "search", "study"):
            cli = subprocess.run([sys.executable, "-m", "minidisc_ray.cli", command,
                                  str(REPO / "search_spaces" / "default.yaml"), "--output", str(run)],
                                 capture_output=True, text=True, timeout=300,
                                 env={**os.environ, "MINIDISC_CACHE": str(tmp_path / "cache")})
            assert cli.returncode == 2, (command, cli.stderr[-2000:])
            lines = [x for x in cli.stderr.splitlines() if x.strip()]
            assert len(lines) == 1, (command, cli.stderr[-2000:])
            assert f"pid {proc.pid}" in lines[0], lines[0]
            assert "Traceback" not in cli.stderr
        assert snapshot(run) == before, "a refused job wrote into the directory"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait()


def test_a_refusal_never_names_a_job_that_has_ended(tmp_path: Path) -> None:
    """The holder record of an earlier, finished job is not taken for the holder's: a job that has locked but not
    yet claimed the directory is reported as not recorded yet."""
    run = tmp_path / "run"
    claim_run_dir(run)
    unlock_run_dir(run)
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run / "minidisc-job.json").write_text(json.dumps({"pid": int(ended.stdout), "host": socket.gethostname(),
                                                       "since": 0}))
    lock_only = ("import sys, time; from minidisc_ray.outputs import lock_run_dir; lock_run_dir(sys.argv[1]); "
                 "print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", lock_only, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(UserInputError) as err:
            check_run_output(run)
        assert "not recorded yet" in str(err.value), str(err.value)
        assert f"pid {ended.stdout.strip()}" not in str(err.value)
    finally:
        proc.kill()
        proc.wait()


def test_the_lock_is_reentrant_in_one_process_and_released_by_job_lock(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with job_lock(run):
        claim_run_dir(run)
        check_run_output(run)  # the same job checking again: not a second job
        claim_run_dir(run)
    proc = _holder(run)  # released: another process takes it
    proc.kill()
    proc.wait()
