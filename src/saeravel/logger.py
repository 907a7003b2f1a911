"""Experiment loggers: the ``logger`` config group (``conf/logger/``).

``logger=none`` (the default) logs nothing. ``logger=wandb`` makes one Weights & Biases run per
job, offline unless asked otherwise, in the job's output folder (``<output_dir>/wandb/``, beside
``result.json``). A run is named and tagged from the job's eval, method, model, layer and SAE
(:func:`run_identity`); its group is the experiment's name and, under a multirun, the sweep's
(:func:`run_group`). While the job runs, an eval sends live values through
``EvalContext.log_metrics`` (RAVEL: each training step's loss and temperature, as
``train/<method>/<attribute>/loss`` over ``train_step``); at the end the run gets each method's
per-epoch curve, the final metrics as the run summary, a ``scores`` Table, and an artifact
holding result.json and the job's saved masks and rotations (``ravel_*.pt``). A job whose
result is already stored is not recomputed: its run logs the stored result. The logger is not
part of the job's identity (``logger`` in saeravel.results.NON_RESULT_PATHS). Credentials and
host are the installed client's (saeravel.wandb_auth). A logging failure is one warning line;
it never fails a job.

The pipeline uses ``logger.start(resolved_cfg, job_hash, output_dir)``,
``logger.log_metrics(values, step)``, ``logger.log_result(record, result_path)``,
``logger.finish(ok)`` (or :func:`logged_job`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from saeravel.errors import UserError, choose
from saeravel.wandb_auth import has_wandb_credentials, wandb_host

__all__ = ["JobLogger", "NoLogger", "WandbLogger", "build_logger", "has_wandb_credentials",
           "logged_job", "wandb_host"]  # fmt: skip

log = logging.getLogger(__name__)

WANDB_MODES = ("online", "offline", "disabled")
# Files of a job's folder logged in the result artifact beside result.json: RAVEL's saved
# masks and rotations (eval.save_artifacts).
ARTIFACT_GLOBS = ("ravel_*.pt",)
TRAIN_STEP = "train_step"  # the x axis of the live training series (train/<method>/<attr>/...)


class JobLogger:
    """A job's experiment logger. The base class logs nothing (``logger=none``)."""

    def start(self, resolved_cfg: Mapping[str, Any], job_hash: str, output_dir: Path) -> None:
        """Open the job's run, recording its resolved config."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log live values during the job (e.g. a training step's loss and temperature)."""

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


def _hydra_runtime() -> tuple[str | None, str | None]:
    """(experiment, sweep) of the Hydra run this process is in: the ``experiment`` option
    chosen (None without one) and, under a multirun, the sweep's name (the last two parts of
    the job folder's parent, ``<date>/<time>`` by default)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return None, None
        hc = HydraConfig.get()
        experiment = hc.runtime.choices.get("experiment")
        experiment = None if experiment in (None, "null", "None") else str(experiment)
        if hc.mode != RunMode.MULTIRUN:
            return experiment, None
        return experiment, "/".join(Path(hc.sweep.dir).parts[-2:])
    except Exception:  # noqa: BLE001 (no Hydra runtime: a plain run)
        return None, None


def run_group(output_dir: Path) -> str | None:
    """The wandb group of a job: the experiment's name and, under a multirun, the sweep's
    (``paper_grid 2026-01-02/03-04-05``, ``sweep 2026-01-02/03-04-05``); None for a plain
    run of no experiment. Jobs of one sweep (not hydra.sweep.dir's ``${now:}``, which a
    launcher of other processes re-resolves: the job folder's parent) share it."""
    experiment, sweep = _hydra_runtime()
    if sweep is not None:
        sweep = "/".join(Path(output_dir).resolve().parent.parts[-2:])
    parts = [experiment or ("sweep" if sweep else None), sweep]
    text = " ".join(p for p in parts if p)
    return text[-128:] or None  # wandb caps group names at 128 characters


def run_identity(resolved_cfg: Mapping[str, Any]) -> tuple[str, list[str]]:
    """(run name, tags) from the job's model, SAE, layer, method and eval:
    ``ravel das tiny-city-lm L3 trained`` and ``model:tiny-city-lm``, ``sae:trained``,
    ``layer:3``, ``method:das``, ``eval:ravel`` (each tag at most 64 characters, wandb's cap)."""
    ev = resolved_cfg.get("eval") or {}
    model = (resolved_cfg.get("model") or {}).get("name")
    sae = resolved_cfg.get("sae") or {}
    family = sae.get("family") if isinstance(sae, Mapping) else None
    release = sae.get("release") if isinstance(sae, Mapping) else None
    layer = resolved_cfg.get("layer")
    method = ev.get("method") if isinstance(ev, Mapping) else None
    eval_name = ev.get("name") if isinstance(ev, Mapping) else None
    sae_label = str(release or family) if (release or family) else None
    parts = [eval_name, method, model, None if layer is None else f"L{layer}", sae_label]
    name = " ".join(str(p) for p in parts if p not in (None, ""))
    tags = [f"{k}:{v}"[:64] for k, v in (("model", model), ("sae", family), ("layer", layer),
            ("method", method), ("eval", eval_name)) if v not in (None, "")]  # fmt: skip
    return name or "job", tags


def scores_table(record: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """(columns, rows) of a result's scores for a wandb Table: RAVEL's (method, attribute,
    cause, isolation, disentangle, and the 95% interval of disentangle) when the record has
    them, else one (metric, value) row per numeric metric."""
    metrics = record.get("eval_result_metrics") or {}
    group = metrics.get("ravel") if isinstance(metrics, Mapping) else None
    if isinstance(group, Mapping):
        cols = ["method", "attribute", "cause", "isolation", "disentangle",
                "disentangle_lo", "disentangle_hi"]  # fmt: skip
        rows = []
        for method, by_attr in group.items():
            for attr, sc in (by_attr or {}).items() if isinstance(by_attr, Mapping) else ():
                if not isinstance(sc, Mapping):
                    continue
                ci = (sc.get("ci95") or {}).get("disentangle") or [None, None]
                rows.append([str(method), str(attr), sc.get("cause"), sc.get("isolation"),
                             sc.get("disentangle"), ci[0], ci[1]])  # fmt: skip
        return cols, rows
    flat = flatten(metrics)
    rows = [[k, float(v)] for k, v in flat.items()
            if isinstance(v, int | float) and not isinstance(v, bool)]  # fmt: skip
    return ["metric", "value"], rows


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
        self.output_dir: Path | None = None
        self._run: Any = None
        self._live_failed = False

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
            ("scores table", lambda: self._log_table(record)),
            ("result artifact", lambda: self._log_artifact(record, Path(result_path))),
        ):
            try:
                step()
            except Exception as exc:  # noqa: BLE001
                self._warn(what, exc)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log live values as ``train/<key>`` over ``train_step`` (``step``, the caller's own
        counter, e.g. RAVEL's optimiser step of one method); a failure is one warning, after
        which live values are dropped."""
        if self._run is None or self._live_failed:
            return
        try:
            row = {f"train/{k}": float(v) for k, v in metrics.items()}
            if step is not None:
                row[TRAIN_STEP] = int(step)
            self._run.log(row)
        except Exception as exc:  # noqa: BLE001
            self._live_failed = True
            self._warn("live metrics; dropping the rest", exc)

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
                "logger=wandb: online mode but no wandb API key for %s (WANDB_API_KEY, or the "
                "netrc entry `wandb login` writes); logging offline instead: run `wandb login` "
                "to log in, or set "
                "WANDB_MODE=offline to go offline without this warning",
                wandb_host(),
            )
            return "offline"
        return mode

    def _start(self, resolved_cfg: dict[str, Any], job_hash: str, output_dir: Path) -> None:
        import wandb

        auto_name, auto_tags = run_identity(resolved_cfg)
        run_dir = Path(self.dir) if self.dir else output_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        eval_name = (resolved_cfg.get("eval") or {}).get("name")
        kwargs: dict[str, Any] = dict(
            project=self.project,
            entity=self.entity,
            group=self.group or run_group(output_dir),
            name=self.name or auto_name,
            tags=[*auto_tags, *[t for t in self.tags if t not in auto_tags]],
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
        self.output_dir = output_dir
        self._run.define_metric(TRAIN_STEP)
        self._run.define_metric("train/*", step_metric=TRAIN_STEP)

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

    def _log_table(self, record: Mapping[str, Any]) -> None:
        import wandb

        cols, rows = scores_table(record)
        if rows:
            self._run.log({"scores": wandb.Table(columns=cols, data=rows)})

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
        folder = Path(result_path).parent
        for pattern in ARTIFACT_GLOBS:  # RAVEL's masks and rotations (eval.save_artifacts)
            for extra in sorted(folder.glob(pattern)):
                try:
                    artifact.add_file(str(extra), name=extra.name, policy="immutable")
                except TypeError:
                    artifact.add_file(str(extra), name=extra.name)
        self._run.log_artifact(artifact)

    def _warn(self, what: str, exc: BaseException) -> None:
        log.warning("wandb logging failed (%s): %s; the job is unaffected", what, _one_line(exc))
