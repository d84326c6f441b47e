"""Starting or joining Ray, checking resources up front, and running Ray's blocking calls interruptibly.

``ray.address`` (or ``RAY_ADDRESS``) joins a cluster; otherwise Ray starts embedded in this process,
bound to the loopback interface (see :func:`ensure_ray`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import ray
import ray._private.ray_constants as ray_constants
from ray import tune
from ray.tune.experiment import Trial

from minidisc_ray.config import Config, RayConfig
from minidisc_ray.errors import UserInputError
from minidisc_ray.interrupts import interrupted, starting_ray, verbose

T = TypeVar("T")

# Measured on Ray 2.60 (see README): these cut seconds per report and per start without changing results.
RAY_ENV_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "TUNE_GLOBAL_CHECKPOINT_S": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    # Ctrl-C belongs to minidisc: Tune would otherwise swallow it and end the experiment "successfully".
    "TUNE_DISABLE_SIGINT_HANDLER": "1",
}
_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _probe(address: str, timeout: float = 3.0) -> None:
    """One TCP connection to a ``HOST:PORT`` or ``ray://HOST:PORT`` address; one line when it fails."""
    if address == "auto":
        return
    rest = address[len("ray://"):] if address.startswith("ray://") else address
    host, _, port = rest.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return
    except (OSError, ValueError) as exc:
        raise UserInputError("ray.address", address, f"nothing answers there ({type(exc).__name__}: {exc}); start "
                             "the cluster (ray start --head) or fix the address, or leave ray.address unset for "
                             "a local Ray") from None


def ensure_ray(cfg: RayConfig) -> dict[str, Any]:
    """Connect to the configured cluster or start Ray in this process; returns how it was reached.

    A local Ray listens on 127.0.0.1 only (see :func:`_loopback_node`); a cluster address stays the
    user's choice.
    """
    for key, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if not verbose():
        # Tune logs a failed trial as ERROR with Ray's whole traceback; the drivers print one line of their
        # own instead (trial_failure_line), and --verbose shows Tune's
        logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
    if ray.is_initialized():
        return {"address": "existing", "embedded": False}
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {k: os.environ[k] for k in RAY_ENV_DEFAULTS}}
    if address:
        _probe(address)
        try:
            with starting_ray():  # ray.init puts its own SIGTERM handler in place: ours again after it
                ray.init(address=address, runtime_env=env, log_to_driver=verbose(),
                         logging_level=logging.INFO if verbose() else logging.ERROR)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise UserInputError("ray.address", address, f"could not join the cluster ({first}); check the "
                                 "address and the cluster's auth mode/token") from None
        return {"address": address, "embedded": False}
    # address "local": a Ray of the job's own, even where `ray start` left one running on this machine (which
    # ray.init would otherwise join, refusing num_cpus with a traceback); ray.address joins one on purpose
    kwargs: dict[str, Any] = {"address": "local", "include_dashboard": False, "runtime_env": env,
                              "log_to_driver": verbose(), "logging_level": logging.INFO if verbose() else logging.ERROR}
    if cfg.num_cpus is not None:
        kwargs["num_cpus"] = cfg.num_cpus
    if os.environ.get("MINIDISC_OBJECT_STORE_MB"):
        kwargs["object_store_memory"] = int(os.environ["MINIDISC_OBJECT_STORE_MB"]) * 2**20
    with _loopback_node(), starting_ray():  # ray.init puts its own SIGTERM handler in place: ours again after it
        ray.init(**kwargs)
    return {"address": None, "embedded": True}


@contextlib.contextmanager
def _loopback_node() -> Iterator[None]:
    """Start a local Ray whose node address is 127.0.0.1, so its servers listen on loopback only.

    On Linux Ray resolves "localhost" to the machine's routable address and its servers then listen on
    every interface; with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (what Ray does on laptops) the node
    address is the loopback one and the GCS, raylet, workers and agents bind 127.0.0.1 (measured with
    ``ss -ltnp`` on Ray 2.60). A single-machine Ray needs nothing more; clusters are joined by address.
    """
    saved_env = os.environ.get(_CLUSTER_ENV)
    saved = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_CLUSTER_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
        if saved_env is None:
            os.environ.pop(_CLUSTER_ENV, None)
        else:
            os.environ[_CLUSTER_ENV] = saved_env


def check_resources(cfg: Config, strategies: list[str] | None = None, chain: bool = False) -> dict[str, float]:
    """Refuse, before any work, resource requests the cluster can never satisfy (they would hang)."""
    total = ray.cluster_resources()
    cpus, gpus = float(total.get("CPU", 0.0)), float(total.get("GPU", 0.0))
    se, dc = cfg.search, cfg.distill
    if strategies is None or strategies:
        if se.trial_cpus > cpus:
            raise UserInputError("search.trial_cpus", se.trial_cpus, f"the cluster has {cpus:g} CPUs; ask for at "
                                 f"most {cpus:g} (or add nodes, or raise ray.num_cpus)")
        if se.trial_gpus > gpus:
            raise UserInputError("search.trial_gpus", se.trial_gpus, f"the cluster has {gpus:g} GPUs; set "
                                 "search.trial_gpus=0 or run on GPU nodes")
    if chain:
        if dc.use_gpu and dc.num_workers > gpus:
            raise UserInputError("distill.use_gpu", True, f"{dc.num_workers} GPU worker(s) need as many GPUs and the "
                                 f"cluster has {gpus:g}; set distill.use_gpu=false or run on GPU nodes")
        need = dc.num_workers * (1.0 if dc.use_gpu else dc.cpus_per_worker)
        if need > cpus:
            raise UserInputError("distill.cpus_per_worker", dc.cpus_per_worker, f"{dc.num_workers} worker(s) x "
                                 f"{dc.cpus_per_worker:g} CPUs exceed the cluster's {cpus:g} CPUs; lower "
                                 "distill.num_workers or distill.cpus_per_worker")
    return {"CPU": cpus, "GPU": gpus}


def trial_failure_line(trial: Trial, retried: bool) -> str:
    """One line for a failed Tune trial (a worker killed, out of memory, an exception in the trainable)."""
    error = getattr(trial, "error_file", None) or ""
    cfg = getattr(trial, "config", {}) or {}
    what = f"s={cfg['sparsity']}" if isinstance(cfg, dict) and "sparsity" in cfg else \
        str(getattr(trial, "trial_id", ""))
    fate = "Tune retries it" if retried else "no retries left"
    where = f"; details: {error}" if error else ""
    return f"[search] trial {what} failed (its worker died or raised); {fate}{where} (--verbose shows Ray's output)"


def interrupt_stopper() -> tune.Stopper:
    """A Tune ``Stopper`` that ends the whole experiment once the job is interrupted (Tune checks it every
    step of its loop, ~0.1 s): the Tune call returns on its own before Ray shuts down, so the shutdown does
    not pull Ray's core out from under a running experiment (which can end the process with exit code 1)."""
    class _Interrupted(tune.Stopper):  # Tune pickles it with the experiment: no lock inside, only a lookup
        def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
            return interrupted()

        def stop_all(self) -> bool:
            return interrupted()

    return _Interrupted()


_SHARED: dict[tuple[str, str], Any] = {}


def shared_ref(kind: str, key: str, build: Callable[[], Any]) -> Any:
    """An ``ObjectRef`` to ``build()``, put into the object store once per Ray session and ``key``.

    The teacher, its data and each stage's teacher are put once per job however many strategies,
    trials or stages read them (numpy arrays inside are read without copying on every node).
    """
    session = f"{ray.get_runtime_context().get_session_name()}:{ray.get_runtime_context().get_job_id()}"
    cache_key = (f"{session}/{kind}", key)
    for stale in [k for k in _SHARED if not k[0].startswith(f"{session}/")]:
        del _SHARED[stale]  # references of an earlier Ray session are dead
    if cache_key not in _SHARED:
        _SHARED[cache_key] = ray.put(build())
    return _SHARED[cache_key]


def resolved(payload: T) -> T:
    """``payload`` (a dataclass) with every Ray ``ObjectRef`` among its fields replaced by the object behind it,
    nested payloads included: what a trial or actor calls first, so that the Ray-free modules
    (``candidates``, ``study``) only ever see plain objects. Numpy arrays come back zero-copy."""
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(payload):  # type: ignore[arg-type]
        value = getattr(payload, f.name)
        if isinstance(value, ray.ObjectRef):
            changes[f.name] = ray.get(value)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            inner = resolved(value)
            if inner is not value:
                changes[f.name] = inner
    return dataclasses.replace(payload, **changes) if changes else payload  # type: ignore[type-var]


def storage_root(cfg: Config, output_dir: Path, sub: str) -> str:
    """Where Ray keeps experiment files: ``ray.storage_path`` (absolute path or URI) or ``OUTPUT/SUB``."""
    if cfg.ray.storage_path:
        sp = cfg.ray.storage_path
        return sp if "://" in sp else str(Path(sp).expanduser().resolve())
    return str((output_dir / sub).resolve())
