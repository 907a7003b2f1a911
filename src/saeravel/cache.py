"""Cache entries that heal: validated on every load, rebuilt under a file lock when corrupt.

A cache entry is a folder (or a single file) under ``paths.cache_dir`` that some builder
writes once (training the embedded model, an SAE, a knowledge filter) and every later job
reads. Readers never trust an entry: a ``load`` function checks it (files present, sizes
and sha256 recorded at build time, JSON shape, tensor shapes) and raises
:class:`CorruptEntry` on any problem; :func:`load_or_build` then moves the entry aside,
logs one line and builds it again, under the same lock that makes concurrent jobs build it
once. Builders write their marker file last (a ``meta.json`` holding :func:`file_record` of
the other files), so a build killed half-way is simply not there yet (:class:`MissingEntry`).

Typical use::

    def load() -> Thing:
        meta = read_json(folder / "meta.json", required=("files",), missing_ok=False)
        verify_files(folder, meta["files"])
        return make_thing(torch_load(folder / "weights.pt"), meta)

    def build() -> None:
        ...write weights.pt...
        atomic_write_json(folder / "meta.json", {"files": file_record(folder, ["weights.pt"])})

    thing = load_or_build(folder, load, build, what="trained SAE")
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


# A name from a config that becomes part of a file name (model.name, sae.family, ...).
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
# Config values that name files or folders under paths.cache_dir / paths.results_dir.
PATH_NAMES = ("model.name", "sae.family", "eval.name")


def check_name(value: Any, what: str) -> str:
    """``value`` as a safe file-name part: letters, digits and ``. _ - +``, not starting with
    a dot (so no ``..``, no separators, no absolute path); a one-line :class:`UserError`
    naming ``what`` (the config key) otherwise."""
    from saeravel.errors import UserError

    text = str(value)
    if not _SAFE_NAME.match(text) or len(text) > 200:
        raise UserError(
            f"{what}={text!r} cannot name a file: it becomes part of cache and result file names, "
            "so use letters, digits and . _ - + (not starting with a dot; no '/', '..' or "
            "absolute paths)"
        )
    return text


def check_path_names(resolved: Mapping[str, Any]) -> None:
    """Every config value that becomes part of a file name (:data:`PATH_NAMES`, and the keys
    and values of ``sae.run_ids``) passes :func:`check_name`: checked on the config, before
    anything loads or is written."""
    for dotted in PATH_NAMES:
        node: Any = resolved
        for key in dotted.split("."):
            node = node.get(key) if isinstance(node, Mapping) else None
        if node is not None:
            check_name(node, dotted)
    sae = resolved.get("sae")
    run_ids = sae.get("run_ids") if isinstance(sae, Mapping) else None
    if isinstance(run_ids, Mapping):
        for layer, run_id in run_ids.items():
            check_name(run_id, f"sae.run_ids.{layer}")


def inside(root: str | os.PathLike, *parts: str) -> Path:
    """``root/parts...``, refused (one-line :class:`UserError`) unless it resolves inside
    ``root``: the last guard of a file name built from config values."""
    from saeravel.errors import UserError

    base = Path(root).resolve()
    path = Path(root).joinpath(*parts)
    if not path.resolve().is_relative_to(base) or path.resolve() == base:
        raise UserError(f"{'/'.join(parts)!r} would be written outside {root}; refused")
    return path


class CorruptEntry(Exception):
    """A cache entry exists but cannot be used; the message says why (one line)."""


class MissingEntry(CorruptEntry):
    """A cache entry is not (completely) built yet: build it, nothing to report."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_record(folder: str | os.PathLike, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"bytes": size, "sha256": hex}}`` of files in ``folder``, to store in the
    entry's marker file (written last) and check with :func:`verify_files` on load."""
    folder = Path(folder)
    return {
        n: {"bytes": (folder / n).stat().st_size, "sha256": sha256_file(folder / n)} for n in names
    }


def verify_files(folder: str | os.PathLike, record: Any) -> None:
    """Raise :class:`CorruptEntry` unless every file of ``record`` (:func:`file_record`) is in
    ``folder`` with the recorded size and sha256."""
    folder = Path(folder)
    if not isinstance(record, Mapping) or not record:
        raise CorruptEntry("no file checksums recorded")
    for name, want in record.items():
        path = folder / name
        if not isinstance(want, Mapping) or not {"bytes", "sha256"} <= set(want):
            raise CorruptEntry(f"malformed checksum record for {name}")
        if not path.is_file():
            raise CorruptEntry(f"{name} is missing")
        size = path.stat().st_size
        if size != want["bytes"]:
            raise CorruptEntry(f"{name} has {size} bytes, expected {want['bytes']}")
        if sha256_file(path) != want["sha256"]:
            raise CorruptEntry(f"{name} does not match its recorded sha256")


def read_json(
    path: str | os.PathLike,
    *,
    expect: type = dict,
    required: Iterable[str] = (),
    missing_ok: bool = True,
) -> Any:
    """Parse a JSON file of type ``expect`` holding the ``required`` keys (for a dict).

    A missing file raises :class:`MissingEntry` (``missing_ok``, e.g. the marker of an entry
    not built yet) or :class:`CorruptEntry`; unreadable, truncated or wrongly shaped content
    raises :class:`CorruptEntry`.
    """
    path = Path(path)
    if not path.is_file():
        raise (MissingEntry if missing_ok else CorruptEntry)(f"{path.name} is missing")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CorruptEntry(f"{path.name} is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(data, expect):
        raise CorruptEntry(
            f"{path.name} holds a {type(data).__name__}, expected a {expect.__name__}"
        )
    if isinstance(data, dict):
        missing = [k for k in required if k not in data]
        if missing:
            raise CorruptEntry(f"{path.name} lacks {', '.join(missing)}")
    return data


def torch_load(path: str | os.PathLike, map_location: Any = "cpu", expect: type = dict) -> Any:
    """``torch.load(weights_only=True)`` of a file that must hold an ``expect``; any failure
    (truncated, zero bytes, not a torch file, other type) raises :class:`CorruptEntry`."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CorruptEntry(f"{path.name} is missing")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, ...
        raise CorruptEntry(f"{path.name} is unreadable ({type(exc).__name__})") from None
    if not isinstance(obj, expect):
        raise CorruptEntry(f"{path.name} holds a {type(obj).__name__}, not a {expect.__name__}")
    return obj


def quarantine(entry: str | os.PathLike) -> Path | None:
    """Move a corrupt entry (file or folder) to ``<name>.corrupt`` beside it, replacing an
    older quarantined copy, so it can be inspected but is never read again. Returns the new
    path (None if there was nothing to move)."""
    entry = Path(entry)
    if not entry.exists() and not entry.is_symlink():
        return None
    dest = entry.with_name(entry.name + ".corrupt")
    if dest.is_dir() and not dest.is_symlink():
        shutil.rmtree(dest)
    elif dest.exists() or dest.is_symlink():
        dest.unlink()
    os.replace(entry, dest)
    return dest


def load_or_build(
    entry: str | os.PathLike,
    load: Callable[[], T],
    build: Callable[[], None],
    *,
    what: str = "cache entry",
    lock: str | os.PathLike | None = None,
) -> T:
    """Return ``load()``; build the entry first if it is missing or corrupt.

    ``load`` validates the entry and raises :class:`MissingEntry` / :class:`CorruptEntry`;
    ``build`` writes it (marker last). Building happens under an exclusive file lock
    (``lock``, default ``<entry>.lock`` beside it), after a second ``load`` attempt, so of
    several jobs meeting the same missing or corrupt entry one builds and the others load its
    result. A corrupt entry is moved aside (:func:`quarantine`) with one warning line.
    """
    from saeravel.results import file_lock

    entry = Path(entry)
    try:
        return load()
    except CorruptEntry:
        pass  # reported below, under the lock, by whichever job repairs it
    lock = Path(lock) if lock is not None else entry.with_name(entry.name + ".lock")
    with file_lock(lock):
        try:
            return load()  # built or repaired by another job while we waited
        except MissingEntry:
            pass
        except CorruptEntry as exc:
            moved = quarantine(entry)
            log.warning("%s %s is corrupt (%s); moved to %s, rebuilding", what, entry, exc, moved)
        build()
        try:
            return load()
        except CorruptEntry as exc:
            raise RuntimeError(f"{what} {entry} was just built but does not load: {exc}") from exc


@contextmanager
def deterministic_torch() -> Iterator[None]:
    """Run a cache build with ``torch.use_deterministic_algorithms(True)`` (restored after).

    On CPU, the backward of an embedding lookup (``W_E[tokens]``, an ``index_put_`` with
    accumulation) adds rows from several threads in whatever order they finish, so two runs
    of the same training differ in the last bits after the first step and drift apart; the
    deterministic variant sorts the indices first. ``warn_only``: ops without a deterministic
    implementation warn instead of failing. On CUDA, cuBLAS also needs
    ``CUBLAS_WORKSPACE_CONFIG`` (set here if unset; effective before cuBLAS first runs).
    """
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)
