"""The command line as a function: ``main(argv) -> exit code``.

``run.py`` calls it with ``sys.argv[1:]``; the tests call it in-process with a list, so a
one-line error is checked without starting a Python process per case. The order is the
command line's: the pre-check of group options, keys (a misspelt ``eval.epoch`` gets a
"did you mean" and its level's keys) and schema values
(:func:`saeravel.config.unknown_option_error`, before Hydra composes), then Hydra's own
``hydra.main`` (run, ``-m`` sweeps, ``--cfg``, ``--help``), whose task is
:func:`saeravel.pipeline.main_guarded`.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from omegaconf import DictConfig

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
"""The repository's ``conf/`` folder (the package runs from its source tree)."""

SUBDIR_MAX_BYTES = 120
"""A sweep job's folder name longer than this (Hydra's ``job.override_dirname``) is cut."""
DIRNAME_RESOLVER = "saeravel.dirname"
"""The OmegaConf resolver ``conf/config.yaml``'s ``hydra.sweep.subdir`` calls."""


def bounded_dirname(override_dirname: str, max_bytes: int = SUBDIR_MAX_BYTES) -> str:
    """``override_dirname`` (Hydra's ``k=v,k=v`` of a sweep job) as a folder name of at most
    ``max_bytes`` bytes: itself when short enough, else its first whole overrides, ``_etc_``
    and 10 hex digits of its SHA-256 (a long sweep's folders stay distinct and below the
    file system's 255-byte limit: 14 overrides reached 261 and raised ``File name too long``).
    A ``/`` of a value cut this way becomes ``_`` (no nested folders)."""
    raw = override_dirname.encode()
    if len(raw) <= max_bytes:
        return override_dirname
    digest = hashlib.sha256(raw).hexdigest()[:10]
    tail = f"_etc_{digest}"
    head = raw[: max(max_bytes - len(tail), 0)].decode(errors="ignore")
    if "," in head[len(head) // 2 :]:  # end at a whole override when one ends late enough
        head = head[: head.rindex(",")]
    return head.replace("/", "_") + tail


def register_resolvers() -> None:
    """Register saeravel's OmegaConf resolvers (idempotent): ``saeravel.dirname`` =
    :func:`bounded_dirname`. Called when this module is imported, so a launcher's worker that
    unpickles :func:`_task` has it before Hydra names the job's folder."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver(DIRNAME_RESOLVER):
        OmegaConf.register_new_resolver(DIRNAME_RESOLVER, bounded_dirname)


register_resolvers()


def main(argv: Sequence[str] | None = None, conf_dir: str | Path = CONF_DIR) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``) and return its exit code:
    0 done, 2 bad input (one ``error:`` line on stderr), 130 stopped, 1 Hydra's own failure.

    Process-wide state a job changes is put back afterwards (``sys.argv``, the root logger's
    handlers and level, ``logging.raiseExceptions``, Hydra's global state), so it can be called
    again in the same process."""
    import hydra
    from hydra.core.global_hydra import GlobalHydra

    from saeravel.config import register_configs, unknown_option_error

    args = list(sys.argv[1:] if argv is None else argv)
    conf = str(Path(conf_dir).resolve())
    register_configs()
    GlobalHydra.instance().clear()  # a caller's leftover initialize() must not skip the checks
    if (message := unknown_option_error(args, conf)) is not None:
        print(f"error: {message}", file=sys.stderr, flush=True)
        return 2

    job = hydra.main(version_base="1.3", config_path=conf, config_name="config")(_task)
    root = logging.getLogger()
    saved = (sys.argv, root.handlers[:], root.level, logging.raiseExceptions)
    sys.argv = [sys.argv[0] if sys.argv else "run.py", *args]
    try:
        job()
    except SystemExit as exc:
        return _exit_code(exc.code)
    finally:
        sys.argv, handlers, level, logging.raiseExceptions = saved
        for handler in root.handlers:
            if handler not in handlers:  # Hydra's job logging: console and the job's log file
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
        GlobalHydra.instance().clear()
    return 0


def _task(cfg: DictConfig) -> object:
    """Hydra's task, one job: :func:`saeravel.pipeline.main_guarded` (module level, so a
    launcher that pickles it, submitit's, pickles a reference)."""
    from saeravel.pipeline import main_guarded

    return main_guarded(cfg)


def _exit_code(code: object) -> int:
    """``SystemExit.code`` as a process's exit status (None is 0, a message is 1)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1
