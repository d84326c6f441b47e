"""Output directories: nothing minidisc-ray did not write is ever deleted or replaced.

Two kinds of directory are written:

* a *model directory* (``minidisc prune --output``, ``OUTPUT/teacher``, ``OUTPUT/student``...): ours
  when it holds ``minidisc.json``. It is written into a temporary sibling and renamed into place, so a
  reader never sees half a model; an existing model directory of ours is swapped out only after the
  new one is complete.
* a *run directory* (``--output`` of ``run``, ``search``, ``compare``, ``finetune``): ours when it holds
  ``minidisc-run.json`` (or, for directories written before that marker existed, one of our reports).

A non-empty directory that is not ours, a path that is a file, or a place that cannot be written are
refused with one line before any work starts.

One job per run directory: a job holds an OS lock on its run directory (``flock`` on the directory itself,
so taking it writes nothing) until it ends: from its first check when the directory exists, from its creation
(after the job's inputs are checked) when it does not. The OS releases it when the process dies, so a killed
job never leaves a stale lock. A second job on the same directory (``run``,
``search``, ``study``...) is refused in one line naming the holder's pid and host (``JOB_FILE``).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from minidisc_ray.errors import UserInputError

MODEL_RECORD = "minidisc.json"
RUN_MARKER = "minidisc-run.json"
_LEGACY_RUN_FILES = ("report.json", "search.json", "compare.json", "teacher/" + MODEL_RECORD)
MODEL_SUBDIRS = ("teacher", "assistant", "student", "direct_kd_student")


def _writable_ancestor(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` (itself included) when it is a writable directory."""
    p = path.absolute()
    while not p.exists():
        if p.parent == p:
            return None
        p = p.parent
    return p if p.is_dir() and os.access(p, os.W_OK | os.X_OK) else None


def _check_writable(path: Path, field: str) -> None:
    if path.exists() and not path.is_dir():
        raise UserInputError(field, str(path), "this is a file; give a directory path")
    for parent in path.absolute().parents:
        if parent.exists() and not parent.is_dir():
            raise UserInputError(field, str(path), f"{parent} is a file; give a directory path")
    if _writable_ancestor(path) is None:
        raise UserInputError(field, str(path), "this place cannot be written; choose a directory you can write to")


def refuse_overlap(out: str | os.PathLike[str], inputs: dict[str, str | os.PathLike[str] | None],
                   field: str = "--output") -> None:
    """Refuse an output that is, holds, or lies inside one of the command's inputs (one line, nothing written).

    ``inputs`` maps each input's field name to its path; hub names and absent paths overlap nothing.
    """
    o = Path(os.path.expanduser(str(out))).resolve()
    for name, raw in inputs.items():
        if not raw:
            continue
        i = Path(os.path.expanduser(str(raw)))
        if not i.exists():
            continue
        i = i.resolve()
        if o == i or o in i.parents or i in o.parents:
            how = "is" if o == i else ("holds" if o in i.parents else "lies inside")
            raise UserInputError(field, str(out), f"this {how} the input {name} ({raw}); writing it would replace "
                                 "the input: choose another directory (nothing was changed)")


def is_model_dir(path: Path) -> bool:
    """A model directory written by minidisc-ray."""
    return (path / MODEL_RECORD).is_file()


def _refuse_foreign(out: Path, path: str | os.PathLike[str], field: str, ours: bool, what: str) -> None:
    """Check ``out`` is a writable place and, when it is a non-empty directory, one of ours (``ours``)."""
    _check_writable(out, field)
    if out.is_dir() and any(out.iterdir()) and not ours:
        raise UserInputError(field, str(path), "the directory holds files minidisc-ray did not write; "
                             f"choose a new or empty {what} (nothing was changed)")


def check_model_output(path: str | os.PathLike[str], field: str = "--output") -> Path:
    """Refuse (one line) a model output path that is a file, unwritable, or a non-empty foreign directory."""
    out = Path(path)
    _refuse_foreign(out, path, field, is_model_dir(out), "directory")
    return out


def is_run_dir(path: Path) -> bool:
    """A run directory written by minidisc-ray."""
    return (path / RUN_MARKER).is_file() or any((path / name).is_file() for name in _LEGACY_RUN_FILES)


def check_run_output(path: str | os.PathLike[str], field: str = "--output") -> Path:
    """Check a run directory before any work: absent, empty or ours, writable, its model subdirs ours, and no
    other job at work in it (its lock is taken here when the directory exists, else by :func:`claim_run_dir`)."""
    out = Path(path)
    _refuse_foreign(out, path, field, is_run_dir(out), "output directory")
    for sub in MODEL_SUBDIRS:
        child = out / sub
        if child.exists():
            check_model_output(child, f"{field} ({sub}/)")
    if out.is_dir():
        lock_run_dir(out, field)
    return out


def claim_run_dir(path: str | os.PathLike[str]) -> Path:
    """Create (or re-use) a run directory after :func:`check_run_output`, lock it for this job, mark it as ours
    and record who holds it (``JOB_FILE``)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    lock_run_dir(out)
    marker = out / RUN_MARKER
    if not marker.is_file():
        atomic_write_text(marker, json.dumps({"created": time.time(), "by": "minidisc-ray"}) + "\n")
    atomic_write_text(out / JOB_FILE, json.dumps(_holder()) + "\n")
    clean_stale_temporaries(out)
    return out


JOB_FILE = "minidisc-job.json"  # the job that holds (or last held) the directory's lock: pid, host, command
_LOCKS: dict[str, int] = {}  # run directory (resolved) -> the open descriptor whose flock this process holds


def _holder() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "argv": sys.argv[:8]}


def lock_run_dir(path: str | os.PathLike[str], field: str = "--output") -> None:
    """Hold the job lock on the existing run directory ``path`` until :func:`unlock_run_dir` or the process ends
    (idempotent within a process). Another process holding it: one-line refusal naming its pid and host."""
    out = Path(path)
    key = str(out.resolve())
    if key in _LOCKS:
        return
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserInputError(field, str(path), f"another minidisc job ({_holder_line(out)}) is working in this "
                             "directory; wait for it to end, stop it, or choose another output directory "
                             "(nothing was changed)") from None
    except OSError as exc:  # a file system without flock (some FUSE and network mounts): no lock, said once
        os.close(fd)
        print(f"minidisc: warning: {out}: this file system does not lock ({exc.strerror}); a second job on this "
              "directory would not be refused", file=sys.stderr, flush=True)
        return
    _LOCKS[key] = fd


def unlock_run_dir(path: str | os.PathLike[str]) -> None:
    """Release the job lock this process holds on ``path`` (nothing if it holds none)."""
    fd = _LOCKS.pop(str(Path(path).resolve()), None)
    if fd is not None:
        with contextlib.suppress(OSError, ValueError):  # the holder record this job wrote, if it still names it
            if json.loads((Path(path) / JOB_FILE).read_text()).get("pid") == os.getpid():
                (Path(path) / JOB_FILE).unlink()
        os.close(fd)  # closing the descriptor releases the flock


@contextlib.contextmanager
def job_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """``with job_lock(out):`` the job's lock (taken by :func:`check_run_output` / :func:`claim_run_dir`) is
    released when the block ends, unless this process held it before the block, so an in-process caller can
    hand the directory on to another job."""
    held_before = str(Path(path).resolve()) in _LOCKS
    try:
        yield
    finally:
        if not held_before:
            unlock_run_dir(path)


F = TypeVar("F", bound=Callable[..., Any])


def one_job(fn: F) -> F:
    """Decorator of a job's entry point ``fn(cfg, output_dir, ...)``: the job lock it takes on ``output_dir`` is
    released when it returns or raises (:func:`job_lock`); a process that ends releases it anyway."""
    @functools.wraps(fn)
    def wrapper(cfg: Any, output_dir: str | os.PathLike[str], *args: Any, **kwargs: Any) -> Any:
        with job_lock(output_dir):
            return fn(cfg, output_dir, *args, **kwargs)
    return wrapper  # type: ignore[return-value]


def _holder_line(out: Path) -> str:
    """``pid N on host H since ...`` from the holder's ``JOB_FILE`` (written just after it took the lock)."""
    unknown = "its pid and host are not recorded yet: it is still checking its inputs"
    try:
        job = json.loads((out / JOB_FILE).read_text())
        pid, host = int(job["pid"]), str(job["host"])[:64]
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(job["since"])))
    except (OSError, ValueError, KeyError, TypeError):
        return unknown
    if host == socket.gethostname() and not _alive(pid):
        return unknown  # the record of an earlier job that has ended; the holder has not written its own yet
    return f"pid {pid} on host {host}, since {since}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def run_dir_id(path: str | os.PathLike[str]) -> str:
    """What tells this run directory from another at the same path (another volume, another pod): the creation
    stamp its marker holds; empty before the directory is claimed."""
    try:
        return str(json.loads((Path(path) / RUN_MARKER).read_text()).get("created", ""))
    except (OSError, ValueError, AttributeError):
        return ""


# What our interrupted writes leave: ``tempfile.mkstemp``/``mkdtemp`` with the prefixes below add exactly
# 8 characters; ``.json.tmp`` files are what run directories written before ``atomic_write_text`` left.
_OUR_TEMPORARIES = (".*.tmp-????????", ".*.old-????????", "*.json.tmp")


def clean_stale_temporaries(directory: Path) -> None:
    """Remove temporaries an interrupted write of ours left in a run directory of ours, and nothing else."""
    for child in [p for pattern in _OUR_TEMPORARIES for p in directory.glob(pattern)]:
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed into place (readers see old or new)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def new_temporary_sibling(out: Path) -> Path:
    """A fresh temporary directory next to ``out`` (same file system, so the final rename is atomic)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


@contextlib.contextmanager
def writing_model_dir(out: Path, field: str = "--output") -> Iterator[Path]:
    """Write a model directory atomically: yields a fresh temporary sibling of ``out``; when the block
    finishes it is swapped into place (:func:`swap_into_place`), when it raises it is removed and ``out``
    is left as it was. ``out`` must already have passed :func:`check_model_output`."""
    tmp = new_temporary_sibling(out)
    try:
        yield tmp
        swap_into_place(tmp, out, field)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # only the temporary directory made just above
        raise


def swap_into_place(tmp: Path, out: Path, field: str = "--output") -> None:
    """Move the complete directory ``tmp`` to ``out``; an old ``out`` must be ours or empty.

    The old directory is renamed aside first and deleted only after the new one is in place.
    """
    check_model_output(out, field)
    old: Path | None = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.replace(out, old / "previous")
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old / "previous", out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, default=float))
