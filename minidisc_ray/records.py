"""The project's own record of finished work, so that nothing finished is computed twice.

Candidate evaluations (and exhaustive/sandwich trials) are written by the search driver as soon as their
result reaches it, one JSON file per evaluation under ``OUTPUT/evaluations/``, named by a key over
everything that determines the result: the teacher's weights, the tokenised data, the sparsity, the
recovery budget, the importance sample and the seed. A rerun, a resumed search or a second strategy in
``minidisc compare`` finds the record and reports it instead of training again. Records are plain JSON:
nothing in an output directory is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import math
import os
import platform
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy
import torch

from minidisc_ray.outputs import atomic_write_text


def digest(*parts: Any) -> str:
    """A stable hex key over JSON-serialisable parts (dataclasses become dicts)."""

    def plain(x: Any) -> Any:
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return dataclasses.asdict(x)
        return x

    blob = json.dumps([plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def tensor_fingerprint(state: dict[str, Any]) -> str:
    """sha256 over a state dict's names, dtypes, shapes and bytes (the identity of a set of weights)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:24]


# ----------------------------------------------------------------------------- integrity of records

KEY_ENV = "MINIDISC_RECORD_KEY"
KEY_FILE_ENV = "MINIDISC_RECORD_KEY_FILE"


def _key_file() -> Path:
    raw = os.environ.get(KEY_FILE_ENV)
    return Path(raw).expanduser() if raw else Path.home() / ".config" / "minidisc_ray" / "record.key"


_KEYS: dict[str, bytes] = {}


def record_key() -> bytes:
    """The secret that signs this user's records; it never lives in an output directory.

    ``$MINIDISC_RECORD_KEY`` (a Kubernetes secret, say) or the file ``$MINIDISC_RECORD_KEY_FILE`` (default
    ``~/.config/minidisc_ray/record.key``, made with 32 random bytes and mode 0600 on first use). Whoever can
    write an output directory (a shared cluster volume) but not read this key cannot forge a record: an
    edited or planted record fails :func:`verify` and is recomputed.
    """
    if os.environ.get(KEY_ENV):
        return os.environ[KEY_ENV].encode()
    path = _key_file()
    if str(path) not in _KEYS:
        try:
            key = path.read_bytes()
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            fresh = secrets.token_hex(32).encode()
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(fresh)
                key = fresh
            except FileExistsError:  # another process made it first
                key = path.read_bytes()
        if len(key) < 16:
            raise OSError(f"{path} holds no usable key (under 16 bytes); delete it to make a new one")
        _KEYS[str(path)] = key
    return _KEYS[str(path)]


def sign(payload: Any) -> str:
    """HMAC-SHA256 of a JSON-serialisable payload (canonical JSON) under :func:`record_key`."""
    blob = json.dumps(payload, sort_keys=True, default=float, separators=(",", ":")).encode()
    return hmac.new(record_key(), blob, hashlib.sha256).hexdigest()


def verify(payload: Any, mac: Any) -> bool:
    return isinstance(mac, str) and hmac.compare_digest(sign(payload), mac)


_warned: set[str] = set()


def warn_record(path: Path | str, why: str) -> None:
    """One warning per damaged record (it is then ignored and recomputed)."""
    if str(path) in _warned:
        return
    _warned.add(str(path))
    print(f"minidisc: warning: ignoring {path}: {why}; it will be recomputed", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- evaluation records

def _number(lo: float, hi: float, integer: bool = False) -> Callable[[Any], bool]:
    def ok(v: Any) -> bool:
        if integer:
            return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi
        return _finite(v) and lo <= v <= hi
    return ok


_BIG = float(2**62)


def _packed_rows(v: Any) -> bool:
    """``"<rows>:<hex>"`` with exactly the bytes ``rows`` bits take (stats.pack_rows)."""
    if not isinstance(v, str) or len(v) > 1 << 21:
        return False
    n, sep, hexed = v.partition(":")
    return (bool(sep) and n.isdigit() and 0 < int(n) and len(hexed) == 2 * -(-int(n) // 8)
            and all(c in "0123456789abcdef" for c in hexed))
# Every field an evaluation record may hold, with its type and range; a record with any other field, or a
# value outside these, is not ours (or was damaged) and is recomputed.
_METRIC = _number(-1e3, 1.0)  # accuracy, F1, correlations <= 1; lm_score is below 0 past chance perplexity
_COUNT = _number(0, _BIG, True)
_SECONDS = _number(0.0, 1e9)
EVALUATION_FIELDS: dict[str, Callable[[Any], bool]] = {
    "metric": _METRIC, "student_metric": _METRIC, "candidate_metric": _METRIC,
    # on the task's dev rows kept back from every choice (task.validation_fraction > 0)
    "held_out_metric": _METRIC, "student_held_out_metric": _METRIC,
    "assistant_metric": lambda v: v is None or _METRIC(v),
    "sparsity": _number(0.0, 1.0), "param_sparsity": _number(0.0, 1.0),
    "sparsities": lambda v: isinstance(v, list) and len(v) < 64 and all(_number(0.0, 1.0)(x) for x in v),
    "link_metrics": lambda v: isinstance(v, list) and len(v) < 64 and all(_METRIC(x) for x in v),
    # a stage's dev metric at each evaluation: [[step, metric], ...]
    "curve": lambda v: isinstance(v, list) and len(v) < 4096 and all(
        isinstance(x, list) and len(x) == 2 and _number(0, 2**40, True)(x[0]) and _METRIC(x[1]) for x in v),
    "student_curve": lambda v: EVALUATION_FIELDS["curve"](v),
    "arm_curve": lambda v: EVALUATION_FIELDS["curve"](v),
    "recovery_loss": _number(0.0, 1e9),
    "recovered_sha256": lambda v: isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v),
    "candidates": lambda v: isinstance(v, (str, list)) and len(v) < 1 << 20,
    "dev_correct": _packed_rows,  # each dev row's 0/1 correctness: stats.pack_rows
    "kind": lambda v: isinstance(v, str) and len(v) < 64, "seed": _number(0, 2**32, True),
    # the student-side score (minidisc_ray.student_score): a cosine, a ratio in [0, 1], a loss
    "student_alignment": _number(-1.0 - 1e-9, 1.0 + 1e-9), "student_stability": _number(0.0, 1.0 + 1e-9),
    "student_kd_loss": _number(0.0, 1e9),
    **{name: _COUNT for name in ("prunable", "params", "student_params", "candidate_params", "steps", "assistant_steps",
                                 "student_steps", "steps_run", "best_step")},
    **{name: _SECONDS for name in ("seconds", "cpu_seconds", "candidate_seconds", "candidate_cpu_seconds",
                                   "assistant_seconds", "assistant_cpu_seconds", "student_seconds",
                                   "student_cpu_seconds", "first_link_cpu_seconds", "eval_cpu_seconds",
                                   "student_link_cpu_seconds", "student_score_cpu_seconds")},
}


# fields renamed since records were first written (signed as written; read under the new name)
RENAMED_FIELDS = {"ta_metric": "assistant_metric", "ta_steps": "assistant_steps",
                  "ta_cpu_seconds": "assistant_cpu_seconds", "ta_seconds": "assistant_seconds"}


def _renamed(result: Any) -> Any:
    if not isinstance(result, dict) or not any(k in result for k in RENAMED_FIELDS):
        return result
    return {RENAMED_FIELDS.get(k, k): v for k, v in result.items()}


def check_evaluation(result: Any, fields: dict[str, Callable[[Any], bool]] | None = None) -> str | None:
    """Why ``result`` is not a valid evaluation record, or None when it is."""
    fields = EVALUATION_FIELDS if fields is None else fields
    if not isinstance(result, dict):
        return "the result is not an object"
    if "metric" not in result:
        return "it has no metric"
    for name, value in result.items():
        check = fields.get(name)
        if check is None:
            return f"unknown field {name!r}"
        if not check(value):
            return f"{name} = {str(value)[:40]!r} is out of range"
    return None


# what the record keys hold (minidisc_ray.keys): a record written under an older version is never found by a
# key of this one, so its computation runs again once; EvaluationStore says how many in one line
KEY_VERSION = 2
_OLDER_SAID: set[str] = set()  # evaluation directories whose older records were reported (once per process)


class EvaluationStore:
    """Finished evaluations as ``DIR/KEY.json``, each signed (:func:`sign`) and checked field by field on
    read; a missing, damaged, edited or planted record is ignored (one warning) and recomputed."""

    MAX_BYTES = 1 << 22

    def __init__(self, directory: str | Path, fields: dict[str, Callable[[Any], bool]] | None = None) -> None:
        self.directory = Path(directory)
        self.fields = fields
        self._say_older_records()

    def _say_older_records(self) -> None:
        """One line, once per directory and process, when the directory holds records of an older key version."""
        where = str(self.directory.resolve())
        if where in _OLDER_SAID or not self.directory.is_dir():
            return
        _OLDER_SAID.add(where)
        older = 0
        for p in self.directory.glob("*.json"):
            try:
                version = json.loads(p.read_text(encoding="utf-8")).get("key_version", 1)
            except (OSError, ValueError, AttributeError):
                continue  # a damaged record is reported when it is read
            older += int(version != KEY_VERSION)
        if older:
            print(f"minidisc: {older} record(s) in {self.directory} were written under record-key version <= "
                  f"{KEY_VERSION - 1} (now {KEY_VERSION}: see minidisc_ray.keys); they are not reused, and what "
                  "they recorded is computed again once", file=sys.stderr, flush=True)

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        p = self.path(key)
        try:
            if p.stat().st_size > self.MAX_BYTES:
                warn_record(p, f"over {self.MAX_BYTES >> 20} MiB")
                return None
            record = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            warn_record(p, f"unreadable ({type(exc).__name__})")
            return None
        if not isinstance(record, dict) or record.get("key") != key:
            warn_record(p, "not a record of this evaluation")
            return None
        result = record.get("result")
        why = check_evaluation(_renamed(result), self.fields)
        if why is not None:
            warn_record(p, why)
            return None
        if not verify({"key": key, "result": result}, record.get("mac")):
            warn_record(p, "its signature does not match (edited, or written under another record key)")
            return None
        return _renamed(result)

    def put(self, key: str, result: dict[str, Any]) -> None:
        result = json.loads(json.dumps(result, default=float))  # what a reader will see, signed as such
        mac = sign({"key": key, "result": result})
        record = {"key": key, "result": result, "mac": mac, "key_version": KEY_VERSION}
        atomic_write_text(self.path(key), json.dumps(record) + "\n")

    def __len__(self) -> int:
        return len(list(self.directory.glob("*.json"))) if self.directory.is_dir() else 0


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file; a line that is not one (a torn write, a planted line) is skipped
    with one warning."""
    out = []
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    bad = 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            e = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(e, dict):
            out.append(e)
        else:
            bad += 1
    if bad:
        warn_record(path, f"{bad} line(s) are not JSON objects (skipped)")
    return out


def machine() -> dict[str, Any]:
    """Where a result was measured: cores, memory, GPU, platform and the versions that matter."""
    info: dict[str, Any] = {"cpu_cores": os.cpu_count(), "platform": platform.platform(),
                            "python": sys.version.split()[0], "torch": torch.__version__, "numpy": numpy.__version__,
                            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                            "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages * size / 2**30, 1)
    except (ValueError, OSError):
        pass
    for mod in ("ray", "transformers", "optuna", "datasets"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    return info


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
