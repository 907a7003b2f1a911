"""Per-job checkpoints, so a preempted or timed-out job continues instead of restarting.

A job's checkpoints live in ``<results_dir>/<eval>/<job hash>.ckpt/``, beside the job's
result in the job-hash index: a SLURM requeue (submitit runs the same job again) and a rerun
of the sweep from a fresh submitit folder both find them. The pipeline deletes the folder once
the job's result is written.

An eval keeps any number of named entries in the store (a training state, a finished score);
each is one ``<name>.pt`` file written with :func:`torch.save` to a temporary file and renamed
into place, so a reader sees the previous checkpoint or the new one, never half of one. Entries
are read back with ``weights_only=True``: tensors, numbers, strings and containers of them.

The folder also records its owner (``owner.json``: the job hash and the code version that
wrote it, see :meth:`CheckpointStore.claim`); checkpoints of another owner, e.g. written
before a ``git pull``, are deleted rather than continued from.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from saeravel.results import atomic_torch_save, atomic_write_json

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9_.=-]+$")


def entry_name(*parts: str) -> str:
    """A store entry name from ``parts`` ("train", "neurons", "Country" -> train-neurons-Country),
    with characters unsafe in a file name replaced by ``_``."""
    return "-".join(re.sub(r"[^A-Za-z0-9_.=]", "_", str(p)) for p in parts)


class CheckpointStore:
    """Named checkpoint entries of one job in ``folder``; ``folder=None`` is a store that
    saves nothing and finds nothing (checkpointing disabled)."""

    OWNER_FILE = "owner.json"

    def __init__(self, folder: str | os.PathLike | None) -> None:
        self.folder = Path(folder) if folder is not None else None
        self._owner: dict[str, Any] | None = None

    @classmethod
    def disabled(cls) -> CheckpointStore:
        """The no-op store."""
        return cls(None)

    @property
    def enabled(self) -> bool:
        return self.folder is not None

    def claim(self, owner: dict[str, Any]) -> None:
        """Make ``owner`` (JSON-able: the job and the code running it) the folder's owner.
        Checkpoints another owner wrote, or that name none, are deleted with a warning; the
        owner is written with the first entry."""
        self._owner = dict(owner)
        if self.folder is None or not self.folder.is_dir():
            return
        try:
            found = json.loads((self.folder / self.OWNER_FILE).read_text())
        except (OSError, ValueError):
            found = None
        if found != self._owner:
            log.warning(
                "deleting checkpoints in %s: written by %s, this job is %s",
                self.folder, found or "an unknown job", self._owner,
            )  # fmt: skip
            self.clear()

    def _path(self, name: str) -> Path:
        if not _NAME.match(name):
            raise ValueError(f"checkpoint name {name!r} must match {_NAME.pattern}")
        assert self.folder is not None
        return self.folder / f"{name}.pt"

    def load(self, name: str) -> Any | None:
        """The entry ``name``, or None when there is none (or it cannot be read: logged)."""
        if self.folder is None:
            return None
        path = self._path(name)
        if not path.exists():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a foreign or damaged file must not stop the job
            log.warning("ignoring unreadable checkpoint %s (%s)", path, exc)
            return None

    def save(self, name: str, state: Any) -> None:
        """Write entry ``name`` atomically (temp file in the same folder, then a rename)."""
        if self.folder is None:
            return
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        owner_file = self.folder / self.OWNER_FILE
        if self._owner is not None and not owner_file.exists():
            atomic_write_json(owner_file, self._owner)
        atomic_torch_save(path, state)
        log.debug("checkpoint %s written", path)

    def remove(self, name: str) -> None:
        """Delete entry ``name`` if it exists."""
        if self.folder is not None:
            self._path(name).unlink(missing_ok=True)

    def names(self) -> list[str]:
        """Names of the stored entries."""
        if self.folder is None or not self.folder.is_dir():
            return []
        return sorted(p.stem for p in self.folder.glob("*.pt"))

    def clear(self) -> None:
        """Delete the whole folder (the job's result is written; nothing left to resume)."""
        if self.folder is not None and self.folder.exists():
            shutil.rmtree(self.folder, ignore_errors=True)
            log.debug("checkpoint folder %s deleted", self.folder)

    def timer(self, every_s: float, every_steps: int = 0) -> SaveTimer:
        """A :class:`SaveTimer` for this store (never due when the store is disabled)."""
        if not self.enabled:
            return SaveTimer(0.0, 0)
        return SaveTimer(every_s, every_steps)


class SaveTimer:
    """Says when a training loop should save: every ``every_steps`` steps and/or every
    ``every_s`` seconds since the last save (0 turns either off; both 0: never)."""

    def __init__(self, every_s: float, every_steps: int = 0) -> None:
        if every_s < 0 or every_steps < 0:
            raise ValueError(
                f"checkpoint intervals must be >= 0 (got {every_s} s, {every_steps} steps)"
            )
        self.every_s = float(every_s)
        self.every_steps = int(every_steps)
        self._last = time.monotonic()

    @property
    def active(self) -> bool:
        return self.every_s > 0 or self.every_steps > 0

    def due(self, step: int) -> bool:
        """Whether to save after ``step`` completed steps; restarts the clock when it says yes."""
        by_steps = self.every_steps > 0 and step % self.every_steps == 0
        by_time = self.every_s > 0 and time.monotonic() - self._last >= self.every_s
        if by_steps or by_time:
            self._last = time.monotonic()
            return True
        return False


def rng_state() -> dict[str, Any]:
    """torch's global RNG state (CPU, and CUDA when in use), to put in a checkpoint."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
