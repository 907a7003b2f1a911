"""The result record: one versioned JSON per job, written atomically.

Top-level keys follow SAEBench's result layout (``eval_type_id``, ``eval_config``,
``eval_id``, ``datetime_epoch_millis``, ``eval_result_metrics``, ``eval_result_details``,
``eval_result_unstructured``, ``sae_lens_id``, ``sae_lens_release_id``, ``sae_lens_version``,
``sae_cfg_dict``); the rest is saeravel's provenance. Result records are strict JSON: a NaN
(an undefined score) is written as ``null``, never as -1 and never as the ``NaN`` literal that
Python's json (and so SAEBench's own writer) emits and strict parsers reject. With every
``result.json`` the pipeline writes a translation in SAEBench's own layout, conventions and
file name (:func:`saebench_record`, :func:`saebench_path`; saeravel.saebench says how it
differs from the record).

A job's identity (:func:`job_hash`) is a hash of its resolved config without the paths listed in
:data:`NON_RESULT_PATHS` / :data:`NON_RESULT_EVAL_PATHS` (each with the reason it does not change
a result); every other key, including any added later, is part of it.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
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
from saeravel import saebench as sb
from saeravel.errors import UserError
from saeravel.schema import StrEnum

log = logging.getLogger(__name__)

LIBRARIES = ("torch", "transformer-lens", "sae-lens", "hydra-core", "omegaconf", "numpy")
# Dotted config paths that do not change a job's result, each with the reason; they are left
# out of the job's identity (a path names a key and everything under it). Every other key is
# hashed: a new config key changes results until it is listed here (tests/test_results.py walks
# every option of every config group and fails on a listed path that does not exist).
NON_RESULT_PATHS: dict[str, str] = {
    "device": "where the job runs (cpu/cuda), not what it computes",
    "force": "whether an existing result is recomputed",
    "reuse": "which stored results may be served instead of recomputing (the result is the same)",
    "log_level": "how much is logged",
    "logger": "which experiment logger (none, wandb) records the job, not what it computes",
    "paths": "where caches, results and this job's folder live",
    "model.device": "interpolates `device`",
    "model.batch_size": "inference batch size of the model (forward passes only)",
    "model.cache_dir": "where the embedded model is cached (its identity is its config)",
    "sae.cache_dir": "where trained or downloaded SAEs are cached",
    "sae.sae_lens_release": "where the same SAEs are catalogued (a hint and their Neuronpedia id)",
}
# Paths under ``eval`` that do not change the result of the eval called ``cfg.eval.name``
# (``batch_size`` is an inference batch in most evals but RAVEL's *training* batch: hashed there).
# Filled by each eval's registration (``saeravel.evals.api.register(non_result_paths=...)``).
NON_RESULT_EVAL_PATHS: dict[str, dict[str, str]] = {}
# Top-level keys a stored record must have, and their types (see :func:`check_record`).
REQUIRED_KEYS: dict[str, type | tuple[type, ...]] = {
    "eval_type_id": str,
    "eval_config": dict,
    "eval_id": str,
    "datetime_epoch_millis": int,
    "eval_result_metrics": dict,
    "saeravel": dict,
    "sae_cfg_dict": dict,
}


def non_result_paths(eval_name: str | None) -> dict[str, str]:
    """Every path left out of the identity of a job of eval ``eval_name``, with its reason."""
    if not NON_RESULT_EVAL_PATHS:  # a job hash without the evals' facts would be wrong
        raise RuntimeError("no eval is registered: call saeravel.evals.api.discover() first")
    out = dict(NON_RESULT_PATHS)
    for sub, why in NON_RESULT_EVAL_PATHS.get(str(eval_name), {}).items():
        out[f"eval.{sub}"] = why
    return out


def _drop(obj: Any, path: list[str]) -> None:
    for key in path[:-1]:
        if not isinstance(obj, dict) or key not in obj:
            return
        obj = obj[key]
    if isinstance(obj, dict):
        obj.pop(path[-1], None)


def result_config(resolved_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a resolved config that changes the job's result (a JSON-normalised copy
    without the paths of :func:`non_result_paths`)."""
    core = json.loads(json.dumps(dict(resolved_cfg), sort_keys=True, default=str))
    eval_name = (core.get("eval") or {}).get("name") if isinstance(core.get("eval"), dict) else None
    for path in non_result_paths(eval_name):
        _drop(core, path.split("."))
    return core


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries a result depends on."""
    out: dict[str, str | None] = {"saeravel": __version__}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


@functools.cache
def git_commit() -> str | None:
    """Commit of the code that ran (None outside a git checkout). Modified code is
    ``<sha>+dirty.<hash>``, the hash of ``git diff HEAD``, so two different uncommitted edits
    of one commit are two versions (checkpoints of one are not resumed by the other). Computed
    once per process: the code that runs is the code imported at the start."""
    return code_version(Path(__file__).resolve().parent)


def code_version(here: Path) -> str | None:
    """:func:`git_commit` of the checkout containing the folder ``here``."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        )
        if sha.returncode != 0:
            return None
        diff = subprocess.run(
            ["git", "diff", "HEAD", "--no-ext-diff", "--binary"],
            cwd=here,
            capture_output=True,
            timeout=30,
        )
        if diff.returncode != 0:
            return sha.stdout.strip() + "+dirty"
        if not diff.stdout.strip():
            return sha.stdout.strip()
        return sha.stdout.strip() + "+dirty." + hashlib.sha256(diff.stdout).hexdigest()[:12]
    except (OSError, subprocess.SubprocessError):
        return None


def job_hash(resolved_cfg: Mapping[str, Any]) -> str:
    """Identity of a job: a hash of its :func:`result_config`."""
    blob = json.dumps(result_config(resolved_cfg), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@contextmanager
def file_lock(path: str | os.PathLike, busy: str | None = None) -> Iterator[None]:
    """Hold an exclusive advisory lock (``fcntl.flock``) on ``path`` (created if missing).
    Jobs of a sweep that share a cache take it before building an entry (training the embedded
    model or an SAE), so one job builds it and the others wait and then load it, instead of
    several writing the same files at once. ``busy``: a line logged when another process holds
    the lock (then this one waits for it)."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | (fcntl.LOCK_NB if busy else 0))
        except BlockingIOError:
            log.info("%s (%s)", busy, path)
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


def _size(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.0f} kB"


def no_space_error(folder: Path, needed: int | None = None, at_least: bool = False) -> UserError:
    """The one-line error for a full disk (or quota) while writing into ``folder``: ``needed``
    bytes (``at_least``: the bytes written when the disk filled, a lower bound)."""
    parts = []
    if needed:
        parts.append(f"needs {'at least ' if at_least else ''}{_size(needed)}")
    try:
        parts.append(f"{_size(shutil.disk_usage(folder).free)} free")
    except OSError:
        pass
    detail = f" ({', '.join(parts)})" if parts else ""
    return UserError(
        f"no space left on the device of {folder}{detail}; free some space or point "
        "paths.results_dir / paths.cache_dir / hydra.run.dir elsewhere"
    )


_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"
# ``.<name>.<pid>@<host>.<random>.tmp``: the writer's pid and host, so a later run can tell a
# dead writer's temp file from a live one's.
_TEMP = re.compile(r"^\..+\.(\d+)@([A-Za-z0-9-]+)\.[^.]+\.tmp$")
STALE_TEMP_S = 3600  # a temp file this old is stale whoever wrote it (other host, old format)


def temp_prefix(path: Path) -> str:
    """Prefix of :func:`atomic_write`'s temp files for ``path``: hidden, with this process's
    pid and host (see :func:`remove_stale_temps`)."""
    return f".{path.name}.{os.getpid()}@{_HOST}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files of dead writers in ``folder`` (not recursive): those of
    :func:`atomic_write` whose pid on this host is gone, and any ``.*.tmp`` older than
    :data:`STALE_TEMP_S` (another host's, or an older saeravel's without a pid). A live
    writer's temp file is left alone. Returns what was removed."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        name = entry.name
        if not (name.startswith(".") and name.endswith(".tmp")) or not entry.is_file():
            continue
        m = _TEMP.match(name)
        try:
            old = now - entry.stat().st_mtime > STALE_TEMP_S
        except OSError:
            continue
        dead = m is not None and m.group(2) == _HOST and not _pid_alive(int(m.group(1)))
        if dead or old:
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    if removed:
        log.info("removed %d temp file(s) of interrupted writes in %s", len(removed), folder)
    return removed


def atomic_write(
    path: str | os.PathLike, write: Callable[[BinaryIO], Any], size: int | None = None
) -> Path:
    """Call ``write(fh)`` on a temp file in ``path``'s folder, then rename it to ``path``:
    readers see the old file or the complete new one, never half of it (also when the writer
    is interrupted, e.g. by the SystemExit of a SLURM requeue: the temp file is removed).
    The file gets the permissions of a newly created file (0666 minus the umask; mkstemp's
    own 0600 would hide shared results and caches from colleagues). A full disk or quota
    (ENOSPC, EDQUOT) is a one-line :class:`UserError` naming the folder and ``size``, the
    bytes needed, when the caller knows it."""
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        written = 0
        if tmp is not None:
            with contextlib.suppress(OSError):
                written = os.path.getsize(tmp)
            Path(tmp).unlink(missing_ok=True)
        if exc.errno in _NO_SPACE:
            raise no_space_error(path.parent, size or written, at_least=size is None) from None
        raise
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    return path


def strict_json(obj: Any) -> Any:
    """``obj`` with every NaN / infinity replaced by None (strict JSON has neither)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict_json(v) for v in obj]
    if hasattr(obj, "tolist") or hasattr(obj, "item") or isinstance(obj, Path):
        return strict_json(_json_default(obj))
    return obj


def atomic_write_json(path: str | os.PathLike, data: Any, *, strict: bool = False) -> Path:
    """Write JSON to ``path`` atomically (:func:`atomic_write`); ``strict`` writes NaN and
    infinities as null (result records), otherwise they stay Python's ``NaN`` literals."""
    if strict:
        text = json.dumps(strict_json(data), indent=2, allow_nan=False, default=_json_default)
    else:
        text = json.dumps(data, indent=2, sort_keys=False, default=_json_default)
    blob = text.encode()
    return atomic_write(path, lambda fh: fh.write(blob), size=len(blob))


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


def sae_architecture(sae_cfg: Mapping[str, Any] | None) -> str:
    """SAEBench's ``architecture`` name of an SAE from its cfg dict: the cfg's own (sae_lens,
    Apollo) if it names one, else from the activation (relu -> standard, topk, jumprelu), else
    ``custom``; ``none`` for a job without an SAE."""
    if not sae_cfg:
        return "none"
    if isinstance(sae_cfg.get("architecture"), str) and sae_cfg["architecture"]:
        return str(sae_cfg["architecture"])
    return {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu"}.get(
        str(sae_cfg.get("activation")), "custom"
    )


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
    eval_type_id: str | None = None,
) -> dict[str, Any]:
    """Assemble the versioned result record of one job. ``eval_type_id`` is SAEBench's id of
    the eval (e.g. ``absorption_first_letter``; default ``eval_name``); saeravel's own eval
    name is ``saeravel.eval_name``."""
    ident = dict(sae_identity or {})
    cfg_dict = dict(sae_cfg or {})
    cfg_dict.setdefault("architecture", sae_architecture(sae_cfg))
    cfg_dict.setdefault("d_sae", 0)
    record = {
        "eval_type_id": eval_type_id or eval_name,
        "eval_config": dict(eval_cfg),
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": dict(metrics),
        "eval_result_details": details,
        "eval_result_unstructured": unstructured,
        "sae_bench_commit_hash": f"saeravel-{__version__}",
        "sae_lens_id": ident.get("sae_id"),
        "sae_lens_release_id": ident.get("release"),
        "sae_lens_version": library_versions().get("sae-lens"),
        "sae_cfg_dict": cfg_dict,
        "saeravel": {
            "schema_version": RESULT_SCHEMA_VERSION,
            "job_hash": job_id,
            "complete": True,
            "eval_name": eval_name,
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
    return seal(record)


CHECKSUM_KEY = "checksum"


def record_checksum(rec: Mapping[str, Any]) -> str:
    """``sha256:<hex>`` of a record's content without its ``checksum`` key: the canonical
    strict JSON (sorted keys), so the value survives a write and a read back."""
    body = {k: v for k, v in rec.items() if k != CHECKSUM_KEY}
    plain = json.loads(json.dumps(strict_json(body), allow_nan=False, default=_json_default))
    blob = json.dumps(plain, sort_keys=True, allow_nan=False, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


def seal(rec: Mapping[str, Any]) -> dict[str, Any]:
    """``rec`` with its :func:`record_checksum` as the last key (written last in the file)."""
    body = {k: v for k, v in rec.items() if k != CHECKSUM_KEY}
    body[CHECKSUM_KEY] = record_checksum(body)
    return body


class Reuse(StrEnum):
    """The ``reuse`` option: which stored result of a job may be served instead of computing it.

    Every policy serves only a record that is whole (its checksum matches), of this job (job
    hash and result-relevant config, ``eval_config`` included), of this result schema, with
    metrics. ``same_code`` (default) also needs the code version that computed it (commit and
    uncommitted diff, :func:`git_commit`) to be the running one; otherwise the job is
    recomputed with one warning naming why. ``any_code`` serves a record of another code version
    on purpose (e.g. after a commit that changes no result), saying so in one line.
    ``strict``: as ``same_code``, but a stored record that fails a check is an error (one line,
    nothing recomputed or overwritten) instead of being recomputed."""

    same_code = "same_code"
    any_code = "any_code"
    strict = "strict"


def served_record(
    rec: Mapping[str, Any], policy: str, source: str | os.PathLike | None
) -> dict[str, Any]:
    """The copy of ``rec`` written into a run folder: ``saeravel.served`` names the code that
    served it, the reuse policy and where it came from (``source``: the stored record's path;
    None when this run computed it); ``saeravel.git_commit`` stays the code that computed it.
    Sealed again (:func:`seal`)."""
    out = json.loads(json.dumps(strict_json(dict(rec)), default=_json_default))
    out["saeravel"]["served"] = {
        "git_commit": git_commit(),
        "saeravel": __version__,
        "reuse": str(policy),
        "from": "computed by this run" if source is None else str(source),
        "datetime_epoch_millis": int(time.time() * 1000),
    }
    return seal(out)


def check_record(
    rec: Any, job_id: str | None = None, resolved_config: Mapping[str, Any] | None = None
) -> str | None:
    """Why ``rec`` is not a complete result of the job ``job_id`` with ``resolved_config``
    (None: it is). Checks the top-level keys and their types, non-empty metrics, the checksum
    (required when ``job_id`` is given, i.e. before a record is served; verified whenever
    present), the saeravel block (complete, schema version, job hash, config), and the
    result-relevant config (:func:`result_config`), in ``saeravel.config`` and in
    ``eval_config``. The code version is :func:`code_mismatch`'s check."""
    if not isinstance(rec, dict):
        return f"not a JSON object ({type(rec).__name__})"
    for key, kind in REQUIRED_KEYS.items():
        if key not in rec:
            return f"no {key!r}"
        if not isinstance(rec[key], kind) or isinstance(rec[key], bool):
            return (
                f"{key!r} is a {type(rec[key]).__name__}, not a {getattr(kind, '__name__', kind)}"
            )
    if not rec["eval_result_metrics"]:
        return "its metrics are empty"
    if not _has_value(rec["eval_result_metrics"]):
        return "its metrics are empty"
    if CHECKSUM_KEY not in rec:
        if job_id is not None:  # serving a record needs its checksum; reading one for a report not
            return "it has no checksum (written by an older saeravel, or by hand)"
    elif rec[CHECKSUM_KEY] != record_checksum(rec):
        return "its checksum does not match its content (edited or damaged after it was written)"
    meta = rec["saeravel"]
    if meta.get("complete") is not True:
        return "it is not marked complete"
    if meta.get("schema_version") != RESULT_SCHEMA_VERSION:
        return (
            f"it has result schema {meta.get('schema_version')!r}, this saeravel writes "
            f"{RESULT_SCHEMA_VERSION!r}"
        )
    if not isinstance(meta.get("config"), dict):
        return "it records no config"
    if job_id is not None and meta.get("job_hash") != job_id:
        return f"it is the result of job {meta.get('job_hash')!r}"
    if resolved_config is not None:
        want, got = result_config(resolved_config), result_config(meta["config"])
        if want != got:
            diff = _first_difference(want, got)
            return f"its config differs from this job's ({diff})"
        want_eval = want.get("eval")
        got_eval = result_config({"eval": rec["eval_config"]}).get("eval")
        if isinstance(want_eval, dict) and want_eval != got_eval:
            diff = _first_difference({"eval": want_eval}, {"eval": got_eval}, "")
            return f"its eval_config differs from this job's ({diff.replace('eval.', 'eval_config.', 1)})"
    return None


def _has_value(obj: Any) -> bool:
    """Whether a (nested) metrics block holds any value that is not an empty container."""
    if isinstance(obj, Mapping):
        return any(_has_value(v) for v in obj.values())
    if isinstance(obj, list):
        return any(_has_value(v) for v in obj)
    return True


def code_mismatch(rec: Mapping[str, Any]) -> str | None:
    """Why ``rec`` was not computed by the running code (None: it was): its recorded
    ``saeravel.git_commit`` (commit + hash of the uncommitted diff) against :func:`git_commit`."""
    meta = rec.get("saeravel") if isinstance(rec.get("saeravel"), Mapping) else {}
    got, want = meta.get("git_commit"), git_commit()
    if got == want:
        return None
    return f"it was computed by code {got or 'of unknown version'}, this is {want or 'unknown'}"


def _first_difference(want: Any, got: Any, prefix: str = "") -> str:
    if isinstance(want, dict) and isinstance(got, dict):
        for key in sorted(set(want) | set(got)):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in got:
                return f"{path} missing"
            if key not in want:
                return f"{path} not in this job"
            if want[key] != got[key]:
                return _first_difference(want[key], got[key], path)
    return f"{prefix or 'config'}: {got!r} instead of {want!r}"


def load_stored(
    path: str | os.PathLike,
    job_id: str,
    resolved_config: Mapping[str, Any],
    reuse: str = Reuse.same_code,
) -> tuple[dict[str, Any] | None, str | None]:
    """The stored record at ``path`` if the ``reuse`` policy (:class:`Reuse`) lets this job
    serve it: ``(record, None)``; else ``(None, why)``, with ``why`` None when there is no file
    at all."""
    try:
        with open(path) as fh:
            rec = json.load(fh)
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as exc:
        return None, f"unreadable ({type(exc).__name__}: {exc})"
    why = check_record(rec, job_id, resolved_config)
    if why is None and str(reuse) != Reuse.any_code:
        why = code_mismatch(rec)
    return (rec, None) if why is None else (None, why)


def load_complete(path: str | os.PathLike) -> dict[str, Any] | None:
    """The record at ``path`` if it is a complete saeravel result (any job), else None."""
    try:
        with open(path) as fh:
            rec = json.load(fh)
    except (OSError, ValueError):
        return None
    return rec if check_record(rec) is None else None


# ----------------------------------------------------------------------------- SAEBench files

SAEBENCH_SUFFIX = "_eval_results.json"


def _sae_key(rec: Mapping[str, Any]) -> tuple[str, str]:
    meta = rec.get("saeravel") if isinstance(rec.get("saeravel"), Mapping) else {}
    ident = dict(meta.get("sae_identity") or {})
    if rec.get("sae_lens_release_id") and rec.get("sae_lens_id"):
        return str(rec["sae_lens_release_id"]), str(rec["sae_lens_id"])
    ident.pop("neuronpedia_id", None)  # a link, not the SAE
    blob = json.dumps(ident, sort_keys=True, default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:8]
    where = f"{meta.get('model_name', 'model')}-layer{meta.get('layer')}"
    return f"saeravel-{ident.get('family') or 'none'}", f"{where}-{digest}"


def saebench_filename(rec: Mapping[str, Any]) -> str:
    """SAEBench's file name of a result, ``<release>_<sae_id>_eval_results.json`` with ``/``
    replaced by ``_`` (its ``get_results_filepath``): the SAE's name alone, the same in every
    eval, so SAEBench's plots join an eval with core by it. SAEs without a sae_lens release
    are ``saeravel-<family>_<model>-layer<L>-<hash of the SAE's identity>``."""
    release, sae_id = _sae_key(rec)
    return f"{release}_{sae_id}{SAEBENCH_SUFFIX}".replace("/", "_")


def saebench_path(rec: Mapping[str, Any], job_id: str | None = None) -> str:
    """Where the SAEBench copy of ``rec`` goes, relative to the folder of its record:
    ``saebench/<eval>/<file>`` beside a job's ``result.json``, ``<job hash>/<file>`` in the
    job-hash index (whose folder is ``<results_dir>/<eval>``). Either way the path names the
    eval as SAEBench's ``get_eval_results`` reads it (saeravel.saebench, Layout) and the file
    name is the SAE's (:func:`saebench_filename`)."""
    name = saebench_filename(rec)
    if job_id:
        return f"{job_id}/{name}"
    meta = rec.get("saeravel") if isinstance(rec.get("saeravel"), Mapping) else {}
    return f"saebench/{meta.get('eval_name') or rec['eval_type_id']}/{name}"


def saebench_record(
    rec: Mapping[str, Any], flatten: Callable[[dict], dict] | None = None
) -> dict[str, Any]:
    """``rec`` in SAEBench's layout and conventions (saeravel.saebench's module docstring):
    SAEBench's top-level fields only; ``eval_result_metrics`` through the eval's ``flatten``
    (e.g. RAVEL's nested block to SAEBench's flat ``ravel`` group; saeravel's detailed metrics
    then move to ``eval_result_unstructured.saeravel_metrics``) with -1 for undefined values;
    details as SAEBench's list (``[]`` if none; other details move to
    ``eval_result_unstructured.details``); ``eval_config`` with SAEBench's field names beside
    saeravel's; saeravel's provenance under ``eval_result_unstructured.saeravel``."""
    type_id = rec["eval_type_id"]
    meta = rec.get("saeravel") if isinstance(rec.get("saeravel"), Mapping) else {}
    metrics = dict(rec["eval_result_metrics"])
    unstructured: dict[str, Any] = {"saeravel": rec.get("saeravel")}
    if rec.get("eval_result_unstructured") is not None:
        unstructured["eval"] = rec["eval_result_unstructured"]
    if flatten is not None:
        unstructured["saeravel_metrics"] = metrics
        metrics = flatten(metrics)
    details, moved = sb.saebench_details(type_id, rec.get("eval_result_details"))
    if moved is not None:
        unstructured["details"] = moved
    config = meta.get("config") if isinstance(meta.get("config"), Mapping) else {}
    eval_config = sb.saebench_eval_config(
        type_id, rec["eval_config"], meta.get("model_name"), config.get("seed")
    )
    return {
        "eval_type_id": type_id,
        "eval_config": eval_config,
        "eval_id": rec["eval_id"],
        "datetime_epoch_millis": rec["datetime_epoch_millis"],
        "eval_result_metrics": sb.saebench_metrics(type_id, metrics),
        "eval_result_details": details,
        "eval_result_unstructured": unstructured,
        "sae_bench_commit_hash": rec.get("sae_bench_commit_hash") or f"saeravel-{__version__}",
        "sae_lens_id": rec.get("sae_lens_id"),
        "sae_lens_release_id": rec.get("sae_lens_release_id"),
        "sae_lens_version": rec.get("sae_lens_version"),
        "sae_cfg_dict": rec.get("sae_cfg_dict"),
    }
