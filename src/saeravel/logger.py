"""Experiment loggers: the ``logger`` config group (``conf/logger/``).

``logger=none`` (the default) logs nothing. ``logger=wandb`` makes one Weights & Biases run per
job, offline unless asked otherwise, in the job's output folder (``<output_dir>/wandb/``, beside
``result.json``): the resolved config, each method's training curve, the final metrics as the
run summary, and the result file as an artifact. Under a Hydra multirun the runs of one sweep
share a wandb group. A logging failure is one warning line; it never fails a job.

The pipeline uses the API ``logger.start(resolved_cfg, job_hash, output_dir)``,
``logger.log_result(record, result_path)``, ``logger.finish(ok)`` (or :func:`logged_job`).
"""

from __future__ import annotations

import logging
import netrc
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from saeravel.errors import UserError, choose

log = logging.getLogger(__name__)

WANDB_MODES = ("online", "offline", "disabled")
DEFAULT_WANDB_HOST = "https://api.wandb.ai"


class JobLogger:
    """A job's experiment logger. The base class logs nothing (``logger=none``)."""

    def start(self, resolved_cfg: Mapping[str, Any], job_hash: str, output_dir: Path) -> None:
        """Open the job's run, recording its resolved config."""

    def log_result(self, record: Mapping[str, Any], result_path: Path) -> None:
        """Record a finished job's result (curves, metrics, the result file)."""

    def finish(self, ok: bool) -> None:
        """Close the run; ``ok=False`` marks it failed."""


class NoLogger(JobLogger):
    """``logger=none``: every call is a no-op."""


def build_logger(node: Any) -> JobLogger:
    """The logger a ``logger`` config node describes (``None`` = no logger). Bad options raise
    :class:`~saeravel.errors.UserError` here, before any model loads."""
    if node is None:
        return NoLogger()
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, _convert_="all")
    except InstantiationException as exc:  # Hydra wraps the constructor's UserError
        if isinstance(exc.__cause__, UserError):
            raise exc.__cause__ from None
        raise


@contextmanager
def logged_job(
    node: Any, resolved_cfg: Mapping[str, Any], job_hash: str, output_dir: Path
) -> Iterator[JobLogger]:
    """``with logged_job(cfg.logger, resolved, jid, out_dir) as logger:`` start a run, yield the
    logger (call ``logger.log_result`` inside), and finish the run, failed if the block raised."""
    logger = build_logger(node)
    logger.start(resolved_cfg, job_hash, output_dir)
    ok = False
    try:
        yield logger
        ok = True
    finally:
        logger.finish(ok)


def has_wandb_credentials() -> bool:
    """Whether wandb could log in without a prompt: ``WANDB_API_KEY``,
    ``WANDB_IDENTITY_TOKEN_FILE``, or a netrc entry for the wandb host (``WANDB_BASE_URL``)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or DEFAULT_WANDB_HOST).netloc
    candidates = [os.environ["NETRC"]] if os.environ.get("NETRC") else ["~/.netrc", "~/_netrc"]
    for name in candidates:
        path = Path(name).expanduser()
        if not path.is_file():
            continue
        try:
            entry = netrc.netrc(str(path)).authenticators(host)
        except (netrc.NetrcParseError, OSError):
            return False
        return bool(entry and entry[2])
    return False


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts to ``{"a/b/c": leaf}``; ``None`` leaves are dropped, lists kept whole."""
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}/"))
        return out
    if tree is None:
        return {}
    return {prefix.rstrip("/"): tree}


def _sweep_names(output_dir: Path) -> tuple[str | None, str | None]:
    """(group, run name) under a Hydra multirun: the sweep's folder (the job folder's parent,
    relative to the working directory when inside it) and the job's folder name."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
            return None, None
    except Exception:  # noqa: BLE001 (no Hydra runtime: a plain run)
        return None, None
    # not hydra.sweep.dir: a launcher that runs jobs in other processes re-resolves its ${now:}
    sweep = output_dir.resolve().parent
    try:
        sweep = sweep.relative_to(Path.cwd())
    except ValueError:
        pass
    return str(sweep)[-128:], output_dir.name  # wandb caps group names at 128 characters


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


class WandbLogger(JobLogger):
    """``logger=wandb``: one wandb run per job (see the module docstring)."""

    # the logger whose run this process has open (Hydra's basic launcher runs a sweep's jobs
    # one after another in one process)
    _active: WandbLogger | None = None

    def __init__(
        self,
        project: str = "saeravel",
        entity: str | None = None,
        group: str | None = None,
        name: str | None = None,
        tags: list[str] | tuple[str, ...] = (),
        notes: str | None = None,
        job_type: str | None = None,
        mode: str | None = None,
        dir: str | None = None,  # noqa: A002 (wandb.init's name)
        log_artifact: bool = True,
    ) -> None:
        if mode is not None:
            choose("logger.mode", str(mode), WANDB_MODES)
        self.project = project
        self.entity = entity
        self.group = group
        self.name = name
        self.tags = [str(t) for t in tags]
        self.notes = notes
        self.job_type = job_type
        self.mode = None if mode is None else str(mode)
        self.dir = dir
        self.log_artifact = log_artifact
        self.job_hash: str | None = None
        self._run: Any = None

    # -------------------------------------------------------------------- public API

    def start(self, resolved_cfg: Mapping[str, Any], job_hash: str, output_dir: Path) -> None:
        """Open the wandb run for this job (never raises: a failure is one warning)."""
        if WandbLogger._active is not None:  # a previous job of this process did not finish
            WandbLogger._active.finish(ok=False)
        self.job_hash = job_hash
        try:
            self._start(dict(resolved_cfg), job_hash, Path(output_dir))
        except Exception as exc:  # noqa: BLE001 (logging must never fail the job)
            self._warn("start", exc)
            self._run = None

    def log_result(self, record: Mapping[str, Any], result_path: Path) -> None:
        """Log training curves, metrics (summary) and the result file (artifact)."""
        if self._run is None:
            return
        for what, step in (
            ("training curves", lambda: self._log_curves(record)),
            ("metrics", lambda: self._log_metrics(record)),
            ("result artifact", lambda: self._log_artifact(record, Path(result_path))),
        ):
            try:
                step()
            except Exception as exc:  # noqa: BLE001
                self._warn(what, exc)

    def finish(self, ok: bool) -> None:
        """Close the run (exit code 0, or 1 when ``ok`` is false) and flush it to disk."""
        run, self._run = self._run, None
        if WandbLogger._active is self:
            WandbLogger._active = None
        if run is None:
            return
        try:
            import wandb

            run.finish(exit_code=0 if ok else 1)
            # wandb's service writes the run file behind finish(); stopping it flushes the file,
            # so the offline run is complete on disk when the job ends (the next job's
            # wandb.init starts a new service)
            wandb.teardown()
        except (Exception, SystemExit) as exc:  # noqa: BLE001 (teardown exits on a service error)
            self._warn("finish", exc)

    # -------------------------------------------------------------------- internals

    def resolved_mode(self) -> str:
        """``logger.mode``, else ``WANDB_MODE``, else offline; online without credentials is
        logged offline, with one warning saying how to log in."""
        mode = self.mode or os.environ.get("WANDB_MODE") or "offline"
        if mode == "online" and not has_wandb_credentials():
            log.warning(
                "logger=wandb: online mode but no wandb API key (WANDB_API_KEY or ~/.netrc); "
                "logging offline instead: run `wandb login` to log in, or set "
                "WANDB_MODE=offline to go offline without this warning"
            )
            return "offline"
        return mode

    def _start(self, resolved_cfg: dict[str, Any], job_hash: str, output_dir: Path) -> None:
        import wandb

        sweep_group, sweep_name = _sweep_names(output_dir)
        run_dir = Path(self.dir) if self.dir else output_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        eval_name = (resolved_cfg.get("eval") or {}).get("name")
        kwargs: dict[str, Any] = dict(
            project=self.project,
            entity=self.entity,
            group=self.group or sweep_group,
            name=self.name or sweep_name,
            tags=self.tags or None,
            notes=self.notes,
            job_type=self.job_type or eval_name,
            dir=str(run_dir),
            config={**resolved_cfg, "job_hash": job_hash},
        )
        mode = self.resolved_mode()
        try:
            self._run = wandb.init(mode=mode, **kwargs)
        except Exception as exc:
            if mode != "online":
                raise
            self._warn("online start; logging offline instead", exc)
            self._run = wandb.init(mode="offline", **kwargs)
        WandbLogger._active = self

    def _log_curves(self, record: Mapping[str, Any]) -> None:
        """Each ``training_curves["<method>/<attribute>"]`` as the series
        ``train_loss/<method>/<attribute>`` over ``epoch`` (1-based), plus one line chart per
        attribute with a line per method."""
        details = record.get("eval_result_details")
        curves = details.get("training_curves") if isinstance(details, Mapping) else None
        if not curves:
            return
        import wandb

        curves = {str(k): [float(v) for v in c] for k, c in curves.items() if c}
        run = self._run
        run.define_metric("epoch")
        run.define_metric("train_loss/*", step_metric="epoch")
        for i in range(max(map(len, curves.values()), default=0)):
            row = {f"train_loss/{k}": c[i] for k, c in curves.items() if i < len(c)}
            run.log({"epoch": i + 1, **row})
        by_attr: dict[str, dict[str, list[float]]] = {}
        for key, curve in curves.items():
            method, _, attr = key.rpartition("/")
            by_attr.setdefault(attr, {})[method or key] = curve
        for attr, per_method in by_attr.items():
            chart = wandb.plot.line_series(
                xs=[list(range(1, len(c) + 1)) for c in per_method.values()],
                ys=list(per_method.values()),
                keys=list(per_method),
                title=f"training loss: {attr}",
                xname="epoch",
            )
            run.log({f"train_loss_chart/{attr}": chart})

    def _log_metrics(self, record: Mapping[str, Any]) -> None:
        """``eval_result_metrics`` flattened (``ravel/sae/Country/cause``) into the summary."""
        summary = flatten(record.get("eval_result_metrics") or {})
        runtime = (record.get("saeravel") or {}).get("runtime_s")
        if runtime is not None:
            summary["runtime_s"] = runtime
        self._run.summary.update(summary)

    def _log_artifact(self, record: Mapping[str, Any], result_path: Path) -> None:
        if not self.log_artifact:
            return
        import wandb

        eval_name = str(record.get("eval_type_id") or "result")
        name = re.sub(r"[^A-Za-z0-9_.-]", "-", f"{eval_name}-{self.job_hash}")
        artifact = wandb.Artifact(
            name, type="result", metadata={"job_hash": self.job_hash, "eval": eval_name}
        )
        try:  # immutable: referenced in place (it sits beside the run), not copied to staging
            artifact.add_file(str(result_path), name="result.json", policy="immutable")
        except TypeError:  # wandb before the policy argument
            artifact.add_file(str(result_path), name="result.json")
        self._run.log_artifact(artifact)

    def _warn(self, what: str, exc: BaseException) -> None:
        log.warning("wandb logging failed (%s): %s; the job is unaffected", what, _one_line(exc))
