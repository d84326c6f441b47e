"""Run a script as the lent GPU machine would: without ``ray``, ``datasets``, ``optuna`` or ``pandas``.

That machine has Python, torch, transformers and pyarrow only. Here those packages are installed, so a script
that imports one of them by mistake would pass here and fail there. This runner hides them first: ``import ray``
raises ``ModuleNotFoundError`` (as where it is not installed), and ``importlib.util.find_spec`` and
``importlib.metadata`` answer as if it were absent (so transformers' own checks see what they would see there).
Then it runs the script as ``__main__`` with the arguments given::

    python benchmarks/gpu_env.py benchmarks/gpu_study.py --dry-run
    python benchmarks/gpu_env.py benchmarks/gpu.py --dry-run
"""

from __future__ import annotations

import importlib.abc
import importlib.metadata
import importlib.util
import runpy
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

ABSENT = ("ray", "datasets", "optuna", "pandas")


def _absent(name: str) -> bool:
    return name.split(".")[0] in ABSENT


class _Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> Any:
        if _absent(fullname):
            raise ModuleNotFoundError(f"No module named {fullname!r} (hidden: the GPU machine lacks it)",
                                      name=fullname)
        return None


def hide() -> None:
    """Hide :data:`ABSENT` from this interpreter (none may be imported yet)."""
    loaded = sorted(m for m in sys.modules if _absent(m))
    if loaded:
        raise RuntimeError(f"already imported, too late to hide: {loaded}")
    sys.meta_path.insert(0, _Hide())
    find_spec, version, distribution = (importlib.util.find_spec, importlib.metadata.version,
                                        importlib.metadata.distribution)

    def find_spec_hidden(name: str, package: str | None = None) -> Any:
        return None if _absent(name) else find_spec(name, package)

    def version_hidden(name: str) -> str:
        if _absent(name):
            raise importlib.metadata.PackageNotFoundError(name)
        return version(name)

    def distribution_hidden(name: str) -> Any:
        if _absent(name):
            raise importlib.metadata.PackageNotFoundError(name)
        return distribution(name)

    importlib.util.find_spec = find_spec_hidden  # type: ignore[assignment]
    importlib.metadata.version = version_hidden  # type: ignore[assignment]
    importlib.metadata.distribution = distribution_hidden  # type: ignore[assignment]


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python benchmarks/gpu_env.py SCRIPT [ARGS...]")
    hide()
    script, *rest = sys.argv[1:]
    sys.argv = [script, *rest]
    runpy.run_path(script, run_name="__main__")
    hidden_loaded = sorted(m for m in sys.modules if _absent(m))
    if hidden_loaded:  # cannot happen through import; a C extension could still register one
        sys.exit(f"gpu_env: {hidden_loaded} got loaded")


if __name__ == "__main__":
    main()
