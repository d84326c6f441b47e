"""``minidisc submit`` and ``minidisc jobs``: the job on any Ray cluster through the Ray Jobs API.

The job's runtime environment is a small staging directory (the ``minidisc_ray`` package, the shipped
``search_spaces`` and the user's config as ``job_config.yaml``), so nothing large or ignored travels.
Dependencies come from the cluster's image (see ``cluster/Dockerfile``) or, with ``--pip``, from
the runtime environment. Needs the Jobs SDK: ``pip install "minidisc-ray[cluster]"``.

Token authentication: when the cluster runs with ``RAY_AUTH_MODE=token``, pass the cluster's token
with ``--token-file`` (or ``RAY_AUTH_TOKEN``); it is sent as an ``Authorization: Bearer`` header.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import tomllib

from minidisc_ray.config import load_config
from minidisc_ray.errors import UserInputError

EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3}
PACKAGE_DIR = Path(__file__).resolve().parent


def _client(address: str, token: str | None) -> Any:
    try:
        from ray.job_submission import JobSubmissionClient  # deferred: ray[default], optional (an install hint)
    except ImportError:
        raise UserInputError("--address", address,
                             'the Jobs SDK needs ray[default]: pip install "minidisc-ray[cluster]"') from None
    headers = {"Authorization": f"Bearer {token}"} if token else None
    warn_plain_http(address, token)
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as exc:  # noqa: BLE001 - connection, auth and URL problems all surface here
        raise _explain(exc, address, token) from None


AGENT_WAIT_S = 90.0


def warn_plain_http(address: str, token: str | None) -> bool:
    """Warn (stderr) when a token would travel unencrypted to another machine; True when it warned."""
    url = urlparse(address if "://" in address else f"http://{address}")
    host = (url.hostname or "").lower()
    loopback = host in ("localhost", "::1") or host.startswith("127.")
    if token and url.scheme == "http" and not loopback:
        print(f"minidisc: warning: sending the cluster token over plain http to {host}; anyone on the path can read "
              "it. Use https://, an SSH tunnel or kubectl port-forward (then --address http://127.0.0.1:8265)",
              file=sys.stderr, flush=True)
        return True
    return False


def _explain(exc: Exception, address: str, token: str | None) -> UserInputError:
    text = str(exc)
    if type(exc).__name__ == "AuthenticationError" or "401" in text or "403" in text or "nauthorized" in text:
        if token:
            return UserInputError("--token-file", "(token given)", "the cluster rejected the token; copy it from "
                                  "the head node (ray get-auth-token) or its RAY_AUTH_TOKEN")
        return UserInputError("--token-file", None, "the cluster requires a token; pass --token-file PATH or set "
                              "RAY_AUTH_TOKEN (ray get-auth-token on the head node prints it)")
    if "No available agent" in text:
        return UserInputError("--address", address, f"the dashboard answers but the head has had no job agent for "
                              f"{AGENT_WAIT_S:.0f}s; see the head's logs/dashboard_agent.log (a port taken by "
                              "another Ray on the node is a common cause) and retry")
    first = text.strip().splitlines()[0][:200] if text.strip() else type(exc).__name__
    return UserInputError("--address", address, f"cannot reach the Ray dashboard ({first}); check the URL, "
                          "e.g. http://HEAD:8265, and that the dashboard port is forwarded")


def read_token(token_file: str | None) -> str | None:
    if token_file:
        path = Path(token_file).expanduser()
        if not path.is_file():
            raise UserInputError("--token-file", token_file, "no such file; ray get-auth-token prints the token")
        try:
            return path.read_text(encoding="utf-8").strip() or None
        except UnicodeDecodeError:
            raise UserInputError("--token-file", token_file, "the file is not UTF-8 text; write the token "
                                 "as ray get-auth-token prints it") from None
    return os.environ.get("RAY_AUTH_TOKEN") or None


def stage_working_dir(config_path: str) -> Path:
    """A temporary directory holding what the job needs: the package, the shipped configs, the config."""
    stage = Path(tempfile.mkdtemp(prefix="minidisc-job-"))
    shutil.copytree(PACKAGE_DIR, stage / "minidisc_ray", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shipped = PACKAGE_DIR.parent / "search_spaces"
    if shipped.is_dir():
        shutil.copytree(shipped, stage / "search_spaces")
    shutil.copy(config_path, stage / "job_config.yaml")
    return stage


async def _tail(client: Any, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def follow(client: Any, job_id: str) -> int:
    """Stream a job's logs until it ends; return the exit code that mirrors its final status."""
    try:
        asyncio.run(_tail(client, job_id))
    except Exception:  # noqa: BLE001 - log streaming is best effort; the status below is authoritative
        pass
    while True:
        try:
            info = client.get_job_info(job_id)
        except Exception as exc:  # noqa: BLE001 - 404 (job gone, head restarted) or the connection lost
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise UserInputError("JOB_ID", job_id, f"lost track of the job ({first}); check it with minidisc jobs "
                                 f"status {job_id} --address ADDRESS") from None
        status = str(getattr(info.status, "value", info.status))
        if status in EXIT_CODES:
            break
        time.sleep(1.0)
    code = getattr(info, "driver_exit_code", None)
    print(f"minidisc: job {job_id} {status}", file=sys.stderr, flush=True)
    if status == "FAILED" and isinstance(code, int) and code > 0:
        return code
    return EXIT_CODES[status]


def submit(config_path: str, address: str, command: str = "run", overrides: list[str] | None = None,
           output: str | None = None, token_file: str | None = None, wait: bool = True, pip: bool = False,
           job_id: str | None = None, trust_remote_code: bool = False) -> int:
    """Submit ``minidisc COMMAND job_config.yaml`` to the cluster at ``address``."""
    if command not in ("run", "search", "compare", "finetune", "validate"):
        raise UserInputError("--command", command, "use run, search, compare, finetune or validate")
    cfg = load_config(config_path, overrides)  # fail fast on a malformed config, before anything is sent
    token = read_token(token_file)
    client = _client(address, token)
    stage = stage_working_dir(config_path)
    parts = ["python", "-m", "minidisc_ray.cli", command, "job_config.yaml"]
    for item in overrides or []:
        parts += ["--set", item]
    if command != "validate":
        parts += ["--output", output or cfg.output_dir]
    if trust_remote_code:
        parts.append("--trust-remote-code")
    elif cfg.teacher.trust_remote_code:
        raise UserInputError("teacher.trust_remote_code", True, "the model's own code would run on the cluster; "
                             "confirm with --trust-remote-code, or set it to false")
    env: dict[str, Any] = {"working_dir": str(stage), "env_vars": {"PYTHONUNBUFFERED": "1"}}
    if pip:
        deps = tomllib.loads((PACKAGE_DIR.parent / "pyproject.toml").read_text())["project"]["dependencies"]
        env["pip"] = deps
    try:
        submitted = _submit_with_retry(client, entrypoint=" ".join(_quote(p) for p in parts), runtime_env=env,
                                       submission_id=job_id,
                                       metadata={"tool": "minidisc-ray", "config": config_path})
    except Exception as exc:  # noqa: BLE001
        raise _explain(exc, address, token) from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    print(f"minidisc: submitted {submitted} to {address}: {' '.join(parts)}", file=sys.stderr, flush=True)
    if not wait:
        print(submitted)
        return 0
    return follow(client, submitted)


def _submit_with_retry(client: Any, **kwargs: Any) -> str:
    """``client.submit_job``, retried while the head has no job agent yet (a cluster that just started
    answers "No available agent to submit job" until its dashboard agent registers)."""
    deadline = time.monotonic() + AGENT_WAIT_S
    delay = 2.0
    while True:
        try:
            return str(client.submit_job(**kwargs))
        except Exception as exc:  # noqa: BLE001 - only the agent-not-ready answer is retried
            if "No available agent" not in str(exc) or time.monotonic() + delay > deadline:
                raise
            print(f"minidisc: the cluster has no job agent ready yet; retrying in {delay:.0f}s", file=sys.stderr,
                  flush=True)
            time.sleep(delay)
            delay = min(delay * 2, 15.0)


def _quote(part: str) -> str:
    return shlex.quote(part)


def jobs(action: str, job_id: str, address: str, token_file: str | None = None) -> int:
    """``minidisc jobs status|logs|stop JOB_ID``."""
    token = read_token(token_file)
    client = _client(address, token)
    try:
        if action == "status":
            info = client.get_job_info(job_id)
            status = str(getattr(info.status, "value", info.status))
            print(status)
            return EXIT_CODES.get(status, 0) if status in EXIT_CODES else 0
        if action == "logs":
            print(client.get_job_logs(job_id), end="")
            return 0
        if action == "stop":
            client.stop_job(job_id)
            print(f"stop requested for {job_id}")
            return 0
    except RuntimeError as exc:
        raise UserInputError("JOB_ID", job_id, f"the cluster does not know this job ({str(exc)[:120]})") from None
    except Exception as exc:  # noqa: BLE001
        raise _explain(exc, address, token) from None
    raise UserInputError("ACTION", action, "use status, logs or stop")
