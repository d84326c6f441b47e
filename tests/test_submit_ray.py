"""``minidisc submit`` against a real Ray head started on 127.0.0.1 with its dashboard on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import make_tokenizer, save_tiny_teacher
from .servers import free_ports, start_ray_head, stop_ray_head
from .test_search_ray import tiny_config

pytestmark = [pytest.mark.ray]
pytest.importorskip("ray.dashboard.modules.job.sdk")
pytest.importorskip("aiohttp", reason="the Jobs API needs ray[default]")


def _client_env() -> dict[str, str]:
    """Clients get no token through the environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    return env


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A head with Ray's token authentication on."""
    tmp = tmp_path_factory.mktemp("rayhead")
    token = "minidisc-test-" + os.urandom(8).hex()
    token_file = tmp / "token"
    token_file.write_text(token + "\n")
    head_env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"}
    address = start_ray_head(tmp, head_env)
    yield address, _client_env(), str(token_file)
    stop_ray_head(tmp)


def _submit(cfg_path: Path, address: str, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "minidisc_ray.cli", "submit", str(cfg_path), "--address", address,
                           *extra], capture_output=True, text=True, env=env, timeout=400)


def test_missing_or_wrong_token_is_a_one_line_error(head, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    address, env, _ = head
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("# Run: x\nseed: 1\n")
    missing = _submit(cfg_path, address, env, "--command", "validate")
    assert missing.returncode == 2
    assert "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines()[-1].startswith("minidisc: error: --token-file: got None; the cluster "
                                                              "requires a token")
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token")
    rejected = _submit(cfg_path, address, env, "--command", "validate", "--token-file", str(wrong))
    assert rejected.returncode == 2
    assert "the cluster rejected the token" in rejected.stderr.strip().splitlines()[-1]


def test_submit_search_succeeds_and_writes_artifacts(head, tmp_path: Path, sst2_dir: Path) -> None:  # type: ignore[no-untyped-def]
    address, env, token_file = head
    teacher = save_tiny_teacher(tmp_path / "teacher", make_tokenizer(tmp_path / "tok"), seed=2)
    out = tmp_path / "artifacts"
    cfg = tiny_config(teacher, out, sst2_dir, search={"max_concurrent_trials": 2})
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text("# Run: minidisc submit job.yaml\n" + yaml.safe_dump(cfg))
    proc = _submit(cfg_path, address, env, "--command", "search", "--output", str(out), "--token-file", token_file)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert "SUCCEEDED" in proc.stderr
    assert "[search] bisection" in proc.stdout, "the job's log is streamed"
    summary = json.loads((out / "search.json").read_text())
    assert summary["chosen_sparsity"] in cfg["pruning"]["grid"]
    job_id = proc.stderr.split("submitted ")[1].split()[0]
    status = subprocess.run([sys.executable, "-m", "minidisc_ray.cli", "jobs", "status", job_id, "--address",
                             address, "--token-file", token_file], capture_output=True, text=True, env=env, timeout=60)
    assert status.returncode == 0
    assert status.stdout.strip() == "SUCCEEDED"


def test_failing_job_exit_code_and_one_line_error(head, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    address, env, token_file = head
    cfg = tiny_config(tmp_path / "no-teacher", tmp_path / "out", Path("/nonexistent/data.csv"))
    cfg_path = tmp_path / "bad.yaml"
    cfg_path.write_text("# Run: minidisc submit bad.yaml\n" + yaml.safe_dump(cfg))
    proc = _submit(cfg_path, address, env, "--command", "search", "--token-file", token_file)
    assert proc.returncode != 0
    errors = [line for line in proc.stdout.splitlines() if line.startswith("minidisc: error:")]
    assert errors == ["minidisc: error: task.data: got '/nonexistent/data.csv'; no such file or directory; "
                      "check the path"]
    assert "FAILED" in proc.stderr


def test_submit_without_authentication(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path,
                                       sst2_dir: Path) -> None:
    """A cluster with token authentication off: submit and jobs work with no token at all."""
    tmp = tmp_path_factory.mktemp("rh")  # short: Ray's AF_UNIX socket paths must stay under 108 bytes
    head_env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    head_env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    try:
        address = start_ray_head(tmp, head_env)
        teacher = save_tiny_teacher(tmp_path / "teacher", make_tokenizer(tmp_path / "tok"), seed=2)
        cfg_path = tmp_path / "job.yaml"
        cfg = tiny_config(teacher, tmp_path / "o", sst2_dir)
        cfg_path.write_text("# Run: minidisc submit job.yaml\n" + yaml.safe_dump(cfg))
        proc = _submit(cfg_path, address, _client_env(), "--command", "validate")
        assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
        assert "SUCCEEDED" in proc.stderr
        job_id = proc.stderr.split("submitted ")[1].split()[0]
        status = subprocess.run([sys.executable, "-m", "minidisc_ray.cli", "jobs", "status", job_id, "--address",
                                 address], capture_output=True, text=True, env=_client_env(), timeout=60)
        assert status.returncode == 0
        assert status.stdout.strip() == "SUCCEEDED"
    finally:
        stop_ray_head(tmp)


def test_unreachable_cluster_is_a_one_line_error(tmp_path: Path) -> None:
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("# Run: x\nseed: 1\n")
    proc = subprocess.run([sys.executable, "-m", "minidisc_ray.cli", "submit", str(cfg_path), "--address",
                           f"http://127.0.0.1:{free_ports(1)[0]}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("minidisc: error: --address")
    assert "Traceback" not in proc.stderr


def test_following_a_job_the_cluster_does_not_know_is_one_line(head) -> None:  # type: ignore[no-untyped-def]
    from minidisc_ray.errors import UserInputError
    from minidisc_ray.jobs import _client, follow, read_token

    address, _, token_file = head
    with pytest.raises(UserInputError, match="JOB_ID: got 'no-such-job'; lost track of the job"):
        follow(_client(address, read_token(token_file)), "no-such-job")
