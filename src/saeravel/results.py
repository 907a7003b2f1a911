"""The result record: one versioned JSON per job, written atomically.

Top-level keys follow SAEBench's result layout (``eval_type_id``, ``eval_config``,
``eval_id``, ``datetime_epoch_millis``, ``eval_result_metrics``, ``eval_result_details``,
``eval_result_unstructured``, ``sae_lens_id``, ``sae_lens_release_id``, ``sae_lens_version``,
``sae_cfg_dict``) so its readers load ours; the rest is saeravel's provenance. NaN is
written as NaN (Python's json), never as -1.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, BinaryIO

from saeravel import RESULT_SCHEMA_VERSION, __version__

log = logging.getLogger(__name__)

LIBRARIES = ("torch", "transformer-lens", "sae-lens", "hydra-core", "omegaconf", "numpy")
# Config keys that do not change a job's result, left out of its identity hash.
NON_RESULT_KEYS = frozenset(
    {"device", "cache_dir", "batch_size", "save_artifacts", "log_level", "force", "paths"}
    | {"checkpoint_every_s", "checkpoint_every_steps"}
)


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries a result depends on."""
    out: dict[str, str | None] = {"saeravel": __version__}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    """Commit of the code that ran (None outside a git checkout), '+dirty' if modified."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        )
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _strip(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _strip(v) for k, v in obj.items() if k not in NON_RESULT_KEYS}
    if isinstance(obj, list | tuple):
        return [_strip(v) for v in obj]
    return obj


def job_hash(resolved_cfg: Mapping[str, Any]) -> str:
    """Identity of a job: a hash of the config fields that change its result."""
    core = {k: resolved_cfg.get(k) for k in ("model", "sae", "eval", "layer", "seed")}
    blob = json.dumps(_strip(core), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive advisory lock (``fcntl.flock``) on ``path`` (created if missing).
    Jobs of a sweep that share a cache take it before building an entry (training the embedded
    model or an SAE), so one job builds it and the others wait and then load it, instead of
    several writing the same files at once."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Call ``write(fh)`` on a temp file in ``path``'s folder, then rename it to ``path``:
    readers see the old file or the complete new one, never half of it (also when the writer
    is interrupted, e.g. by the SystemExit of a SLURM requeue: the temp file is removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write JSON to ``path`` atomically (:func:`atomic_write`)."""
    text = json.dumps(data, indent=2, sort_keys=False, default=_json_default)
    return atomic_write(path, lambda fh: fh.write(text.encode()))


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> Path:
    """``torch.save`` to ``path`` atomically (:func:`atomic_write`)."""
    import torch

    return atomic_write(path, lambda fh: torch.save(obj, fh))


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def build_record(
    *,
    eval_name: str,
    eval_cfg: Mapping[str, Any],
    metrics: Mapping[str, Any],
    details: Any,
    unstructured: Any,
    sae_identity: Mapping[str, Any] | None,
    sae_cfg: Mapping[str, Any] | None,
    model_name: str,
    model_info: Mapping[str, Any],
    layer: int,
    hook_name: str,
    resolved_config: Mapping[str, Any],
    job_id: str,
    runtime_s: float,
) -> dict[str, Any]:
    """Assemble the versioned result record of one job."""
    ident = dict(sae_identity or {})
    return {
        "eval_type_id": eval_name,
        "eval_config": dict(eval_cfg),
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": dict(metrics),
        "eval_result_details": details,
        "eval_result_unstructured": unstructured,
        "sae_bench_commit_hash": None,
        "sae_lens_id": ident.get("sae_id"),
        "sae_lens_release_id": ident.get("release"),
        "sae_lens_version": library_versions().get("sae-lens"),
        "sae_cfg_dict": dict(sae_cfg or {}),
        "saeravel": {
            "schema_version": RESULT_SCHEMA_VERSION,
            "job_hash": job_id,
            "complete": True,
            "model_name": model_name,
            "model_info": dict(model_info),
            "layer": layer,
            "hook_name": hook_name,
            "sae_identity": ident,
            "library_versions": library_versions(),
            "git_commit": git_commit(),
            "runtime_s": runtime_s,
            "config": dict(resolved_config),
        },
    }


def load_complete(path: str | os.PathLike) -> dict[str, Any] | None:
    """The record at ``path`` if it is a complete saeravel result, else None."""
    try:
        with open(path) as fh:
            rec = json.load(fh)
    except (OSError, ValueError):
        return None
    if isinstance(rec, dict) and rec.get("saeravel", {}).get("complete") is True:
        return rec
    return None
