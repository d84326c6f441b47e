"""Ctrl-C and SIGTERM end a job the same way, in every phase: one line, exit 130 or 143, and a rerun resumes.

SIGTERM (Kubernetes, ``ray job stop``, ``kill``) raises :class:`Terminated`, a ``KeyboardInterrupt``, in the main
thread; Ray's blocking calls run in a helper thread (:func:`interruptible`) so the main thread can take it. This
module needs nothing but the standard library: the CLI installs the handler before anything heavy is imported.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


VERBOSE_ENV = "MINIDISC_VERBOSE"


def verbose() -> bool:
    """``--verbose`` (or ``MINIDISC_VERBOSE=1``): Ray's and Tune's own output reaches the terminal.

    Without it the terminal shows minidisc's progress lines only: worker and controller logs (Ray Train's
    internal ``PlacementGroupCleaner`` lines, for example) stay in Ray's log files, Tune prints no status
    tables, and errors still arrive as minidisc's one-line messages.
    """
    return os.environ.get(VERBOSE_ENV, "") in ("1", "true", "yes")


class Terminated(KeyboardInterrupt):
    """SIGTERM (Kubernetes, ``ray job stop``, ``kill``): ends the job the way Ctrl-C does."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def handle_sigterm() -> None:
    """Make SIGTERM raise :class:`Terminated` in the main thread (unless it is ignored, as ``nohup`` may
    leave it). Called at start-up and again after Ray starts, whose driver installs a handler of its own
    that ends the process from inside Ray's core (SIGABRT and C++ stack lines)."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:
        signal.signal(signal.SIGTERM, _on_sigterm)


# Ray's core installs a C++ failure-signal handler in every process it connects, the driver too: on SIGTERM it
# prints "*** SIGTERM received" and stack lines before the job's own handler runs. Ray reads this variable when
# it is imported; the CLI sets it for its own process only (workers keep their crash reports).
_NO_CORE_HANDLER = "RAY_DISABLE_FAILURE_SIGNAL_HANDLER"
_SET_HERE: list[str] = []


def driver_without_core_signal_handler() -> None:
    """Before Ray is imported: the driver's core installs no signal handler of its own (unless the user chose)."""
    if _NO_CORE_HANDLER not in os.environ and "ray" not in sys.modules:
        os.environ[_NO_CORE_HANDLER] = "1"
        _SET_HERE.append(_NO_CORE_HANDLER)


@contextlib.contextmanager
def starting_ray() -> Iterator[None]:
    """Around ``ray.init``: the Ray processes it starts do not inherit
    :func:`driver_without_core_signal_handler`'s setting, and a SIGTERM while it runs (when Ray's own handler,
    ``sys.exit(15)``, is in place) ends the job as :class:`Terminated`; afterwards SIGTERM is the job's again."""
    for name in _SET_HERE:
        os.environ.pop(name, None)
    try:
        yield
    except SystemExit as exc:
        if exc.code == signal.SIGTERM:
            raise Terminated() from None
        raise
    finally:
        handle_sigterm()


_STOP = threading.Event()  # set when Ctrl-C or SIGTERM ends the job: Tune experiments stop at their next step
_STILL_RUNNING: list[threading.Thread] = []  # helper threads of Ray calls that have not returned


def interrupted() -> bool:
    """Whether Ctrl-C or SIGTERM has ended the job (while a Ray call runs in :func:`interruptible`)."""
    return _STOP.is_set()


def interruptible(fn: Callable[..., T], *args: Any, stoppable: bool = False, **kwargs: Any) -> T:
    """Run a blocking Ray call (``Tuner.fit``, ``TorchTrainer.fit``) in a helper thread.

    Tune and Train install SIGINT handlers of their own when called from the main thread (Tune then ends
    the experiment as if it had finished, Train aborts the run and returns); from a helper thread they
    do not, so Ctrl-C reaches the main thread as ``KeyboardInterrupt`` and the CLI ends the job.
    Without ``--verbose``, what Ray prints to stdout meanwhile (Tune's experiment box and its "View detailed
    results" lines, printed whatever the verbosity) is dropped: stdout carries the command's JSON result.
    ``stoppable``: the call is a Tune experiment run with :func:`interrupt_stopper`; on Ctrl-C or SIGTERM it
    is told to stop and given up to 20 s to return before the interrupt goes on (what it returns is dropped).
    A call that has not returned by then (a ``TorchTrainer.fit`` at once) is left running: the CLI must not
    shut Ray down under it (:func:`ray_call_running`).
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            box["error"] = exc

    handle_sigterm()
    with contextlib.ExitStack() as quiet:
        if not verbose():
            quiet.enter_context(contextlib.redirect_stdout(quiet.enter_context(open(os.devnull, "w"))))
        thread = threading.Thread(target=target, name="minidisc-ray-call", daemon=True)
        _STOP.clear()
        _STILL_RUNNING.append(thread)  # before it starts: a second signal during the wait below cannot skip it
        thread.start()
        try:
            while thread.is_alive():
                thread.join(0.2)
        except KeyboardInterrupt:
            _STOP.set()
            deadline = time.monotonic() + (20.0 if stoppable else 0.0)
            while thread.is_alive() and time.monotonic() < deadline:
                thread.join(0.2)
            raise
        finally:
            if not thread.is_alive():
                _STILL_RUNNING.remove(thread)
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


def ray_call_running() -> bool:
    """Whether a Ray call interrupted by Ctrl-C or SIGTERM still runs in its helper thread.

    Then ``ray.shutdown()`` is unsafe: the moment that thread touches Ray again, Ray's core ends the whole
    process with exit 1 ("The core worker has already been shutdown"), before the CLI's one line. The
    process must end with :func:`exit_now` instead; Ray's own fate-sharing (kernel on Linux, a reaper
    process elsewhere) stops a Ray this process started, and the cluster ends a joined Ray's job.
    """
    return any(thread.is_alive() for thread in _STILL_RUNNING)


def exit_now(code: int) -> None:
    """End the process at once with ``code`` (nothing else runs: no atexit hook touches Ray again)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def shutdown_quietly() -> None:
    """Stop a Ray this process started or joined (Ctrl-C: trials and workers end with it)."""
    ray = sys.modules.get("ray")
    if ray is None:  # Ray was never imported, so this process started or joined none
        return
    try:
        import ray._private.auto_init_hook as auto_init  # deferred: Ray is loaded already (checked above)

        auto_init.enable_auto_connect = False  # a Ray call still running in a helper thread must not start a new Ray
        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # noqa: BLE001 - best effort on the way out
        pass
