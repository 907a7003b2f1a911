"""``run(cfg)``: config in, one result JSON out.

Order matters for correctness: unknown config keys (even added with Hydra's ``+``) and
unwritable folders fail before anything loads; a stored result is returned only after it is
checked to be this job's (:func:`saeravel.results.check_record`); the SAE source is resolved
before the model so the model is loaded with the weight processing the SAE was trained on; the
SAE's width and hook are checked against the model and the layer before any compute.

:func:`main_guarded` is the command line's wrapper: bad input, a full disk and Ctrl-C end in one
line on stderr (exit 2, 2 and 130); in a sweep a failed job is recorded and the others go on,
and :class:`SweepSummary` (a Hydra callback, conf/config.yaml) ends the sweep with one line
naming the failed jobs and a non-zero exit code.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import json
import logging
import os
import random
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from saeravel import __version__
from saeravel.cache import check_path_names
from saeravel.checkpoint import CheckpointStore
from saeravel.errors import (
    UserError,
    instantiate,  # re-raises a constructor's UserError as is
    unknown_key,
)
from saeravel.evals.api import EvalContext, EvalOutput, EvalSpec, JobChoices, check_job
from saeravel.hooks import SITES, hook_site, site_hook
from saeravel.logger import build_logger
from saeravel.models import LoadedModel, resolve_device
from saeravel.results import (
    Reuse,
    atomic_write_json,
    build_record,
    code_mismatch,
    file_lock,
    git_commit,
    job_hash,
    load_stored,
    no_space_error,
    remove_stale_temps,
    saebench_path,
    saebench_record,
    served_record,
)
from saeravel.saes.base import SAE
from saeravel.saes.source import build_sae_source, check_known_width

log = logging.getLogger("saeravel")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


_PROBE_BYTES = 64 * 1024  # a disk without this much room fails the probe (nothing else written)


def _check_writable(folder: Path) -> None:
    """``folder`` exists (created if missing) and takes a write of :data:`_PROBE_BYTES`
    (written, synced and removed): an unwritable folder or a full disk (or quota) is a one-line
    :class:`UserError` naming the folder, before anything else is written there."""
    probe = folder / f".write_probe.{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as fh:
            fh.write(b"\0" * _PROBE_BYTES)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise no_space_error(folder) from None
        raise UserError(f"folder {folder} is not writable ({exc.strerror})") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def check_sae_fits(sae: SAE, model: LoadedModel, layer: int, site: str = "resid_post") -> None:
    """The SAE must read ``site`` of block ``layer`` (:func:`saeravel.hooks.hook_site`) of a
    model of its width."""
    if sae.d_in != model.d_model:
        raise UserError(
            f"SAE {sae.identity.family} has d_in={sae.d_in} but model {model.name} has "
            f"d_model={model.d_model}; pick an SAE trained on {model.name}"
        )
    got = hook_site(sae.hook_name, model.n_layers)
    if got != (layer, site):
        hint = (
            f"; it fits layer={got[0]} site={got[1]}"
            if got is not None and got[0] >= 0
            else f"; saeravel intervenes at blocks.L.hook_<site>, site one of {', '.join(SITES)}"
        )
        raise UserError(
            f"SAE {sae.identity.family} reads {sae.hook_name}, which is not the job's "
            f"layer={layer} site={site} ({site_hook(site, layer)}){hint}"
        )


def check_site(model: LoadedModel, layer: int, site: str) -> None:
    """Block ``layer`` of the loaded model must compute ``site``: an attention-only block
    has no MLP (``mlp_out``, ``resid_mid``), a block whose attention and MLP read the same
    residual (GPT-J, Pythia) no ``resid_mid``."""
    blocks = getattr(model.model, "blocks", None)
    if site in ("resid_post", "attn_out") or blocks is None:
        return
    cfg = blocks[layer].cfg  # a block may have its own (tiny-city-lm's attention-only readout)
    if cfg.attn_only:
        why, valid = "it is attention-only", "resid_post, attn_out"
    elif site == "resid_mid" and cfg.parallel_attn_mlp:
        why, valid = "its attention and MLP read the same residual", "resid_post, mlp_out, attn_out"
    else:
        return
    raise UserError(
        f"site={site} does not exist in block {layer} of {model.name} ({why}); valid there: {valid}"
    )


def check_known_keys(cfg: DictConfig) -> None:
    """Every key of a schema-typed node must be a field of its schema. Hydra's ``+`` adds any
    key, even to a typed node (``+eval.epoch=2`` would run the default 20 epochs): a one-line
    :class:`UserError` naming the key and its closest valid names. Free-form dict fields
    (``model.from_pretrained_kwargs``, ``sae.object``) take any key."""

    def walk(node: DictConfig, prefix: str) -> None:
        schema = OmegaConf.get_type(node)
        if dataclasses.is_dataclass(schema):
            valid = [f.name for f in dataclasses.fields(schema)]
            for key in node.keys():
                if str(key) not in valid:
                    raise unknown_key(f"{prefix}.{key}" if prefix else str(key), valid)
        for key in node.keys():
            child = node._get_node(key)
            if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
                walk(child, f"{prefix}.{key}" if prefix else str(key))

    walk(cfg, "")


def _resolve(cfg: DictConfig) -> dict[str, Any]:
    try:
        out = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as exc:
        key = getattr(exc, "full_key", None) or "a required key"
        if str(key).startswith("sae."):
            build_sae_source(cfg.sae)  # names the SAE's missing fields with what they should be
        raise UserError(f"{key} is required (set it on the command line: {key}=...)") from None
    assert isinstance(out, dict)
    return out


def _write_result(
    folder: Path, record: Mapping[str, Any], spec: EvalSpec | None, index_id: str | None = None
) -> Path:
    """Write ``record`` into ``folder`` (``result.json``, or ``<job hash>.json`` in the job-hash
    index when ``index_id`` is given) and its SAEBench translation (saebench_path: a folder
    named after the eval, a file named after the SAE). The translation is written first: a job
    killed between the two writes has no record, so its rerun computes (or serves) it and writes
    both; a record without its translation is repaired on a skip (:func:`_repair_saebench_copy`)."""
    name = f"{index_id}.json" if index_id else "result.json"
    flatten = spec.saebench_metrics() if spec is not None else None
    atomic_write_json(
        folder / saebench_path(record, index_id), saebench_record(record, flatten), strict=True
    )
    return atomic_write_json(folder / name, record, strict=True)


def _repair_saebench_copy(index: Path, record: Mapping[str, Any], spec: EvalSpec, jid: str) -> None:
    """Rewrite the index's SAEBench translation of ``record`` when it is missing or is not of
    this record (a kill between an older saeravel's two writes left the record alone)."""
    path = index / saebench_path(record, jid)
    try:
        ok = json.loads(path.read_text()).get("eval_id") == record["eval_id"]
    except (OSError, ValueError, AttributeError):
        ok = False
    if not ok:
        flatten = spec.saebench_metrics()
        atomic_write_json(path, saebench_record(record, flatten), strict=True)
        log.warning("SAEBench copy %s was missing or stale; rewritten from %s.json", path, jid)


def check_run_folder(out_dir: Path, jid: str) -> None:
    """A run folder holds one job: a ``result.json`` of another job (another job hash) in
    ``out_dir`` is a one-line :class:`UserError`, and nothing in the folder is touched."""
    path = out_dir / "result.json"
    if not path.is_file():
        return
    try:
        rec = json.loads(path.read_text())
        other = rec["saeravel"]["job_hash"]
    except (OSError, ValueError, KeyError, TypeError):
        other = None
    if other == jid:
        return
    what = f"the result of job {other}" if other else "a result.json that is not a saeravel result"
    raise UserError(
        f"run folder {out_dir} already holds {what}; this job is {jid}: give it its own "
        "hydra.run.dir (nothing was changed)"
    )


# The running job's checkpoint store, for the line printed on Ctrl-C.
_ACTIVE: dict[str, CheckpointStore] = {}


def run(cfg: DictConfig) -> dict[str, Any] | None:
    """Run one job; return its result record (or the existing one when skipped)."""
    logging.getLogger("saeravel").setLevel(cfg.log_level)
    start = time.time()
    check_known_keys(cfg)
    resolved = _resolve(cfg)
    check_path_names(resolved)  # names that become file names: no '..', '/', absolute paths
    # Every check that needs nothing from the model, before anything loads (and before the job
    # hash, which reads the eval's registration).
    spec = check_job(cfg, _job_choices(cfg))
    jid = job_hash(resolved)
    out_dir = Path(cfg.paths.output_dir)
    index = Path(cfg.paths.results_dir) / cfg.eval.name
    store = index / f"{jid}.json"
    checkpoint = CheckpointStore(store.with_suffix(".ckpt"))
    _ACTIVE["checkpoint"] = checkpoint
    check_run_folder(out_dir, jid)  # before anything is written into it
    uses_sae = spec.needs_sae(cfg.eval)
    job_logger = build_logger(cfg.get("logger"))  # a bad logger option fails here
    sae_name = cfg.sae.get("family", "?") if uses_sae else "none"
    log.info(
        "job %s: model=%s sae=%s layer=%s eval=%s%s -> %s",
        jid, cfg.model.name, sae_name, cfg.layer, cfg.eval.name,
        f" method={cfg.eval.method}" if "method" in cfg.eval else "", out_dir,
    )  # fmt: skip
    _check_writable(out_dir)
    _check_writable(index)
    # temps of writers killed earlier: the run folder, the index, this job's SAEBench copies
    # (saebench/<eval>/ in the run folder, <job hash>/ in the index) and its checkpoints
    sb_folders = (out_dir / "saebench" / str(cfg.eval.name), index / jid)
    for folder in (out_dir, index, *sb_folders, checkpoint.folder):
        if folder is not None:
            remove_stale_temps(folder)
    policy = str(cfg.get("reuse", Reuse.same_code))
    if not cfg.force and (done := _stored(store, jid, resolved, out_dir, spec, checkpoint, policy)):
        return _log_stored(job_logger, resolved, jid, out_dir, done)
    # One process at a time computes a job: an identical job started at the same moment (two
    # sweeps, a requeue) waits here, then returns the result the first one wrote. The lock is
    # the kernel's (flock), so a job killed with -9 releases it.
    busy = f"job {jid} is running in another process; waiting for it"
    with file_lock(
        Path(cfg.paths.results_dir) / ".locks" / cfg.eval.name / f"{jid}.lock", busy=busy
    ):
        if not cfg.force and (
            done := _stored(store, jid, resolved, out_dir, spec, checkpoint, policy, warn=True)
        ):
            return _log_stored(job_logger, resolved, jid, out_dir, done)
        return _compute(cfg, resolved, jid, spec, uses_sae, job_logger, checkpoint, start)


def _job_choices(cfg: DictConfig) -> JobChoices:
    """What an eval's ``validate`` may know beyond its own config (see :class:`JobChoices`)."""
    from hydra.core.hydra_config import HydraConfig

    groups = dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}
    return JobChoices(
        cfg.sae.get("family") if "sae" in cfg else None, groups, JobChoices.model_of(cfg)
    )


def _stored(
    store: Path,
    jid: str,
    resolved: Mapping[str, Any],
    out_dir: Path,
    spec: EvalSpec,
    checkpoint: CheckpointStore,
    policy: str = Reuse.same_code,
    warn: bool = False,
) -> dict[str, Any] | None:
    """This job's stored record if the ``reuse`` policy serves it (copied into this run's
    folder, naming the code that computed it and the code that served it), or None (with one
    warning saying why a stored record is not served when ``warn``). Under ``reuse=strict`` a
    stored record that is not served is a :class:`UserError` (nothing recomputed)."""
    done, why = load_stored(store, jid, resolved, policy)
    if done is not None:
        other = code_mismatch(done)
        log.info(
            "job %s already complete (%s); skipping (force=true reruns)%s", jid, store,
            f"; reuse=any_code serves it although {other}" if other else "",
        )  # fmt: skip
        _repair_saebench_copy(store.parent, done, spec, jid)
        _write_result(out_dir, served_record(done, policy, store), spec)  # the run folder too
        checkpoint.clear()  # left over if a job stopped between its result and this cleanup
        return done
    if why is not None and policy == Reuse.strict:
        raise UserError(
            f"stored result {store} is not served ({why}); reuse=strict does not recompute: "
            "move it away, or run with reuse=same_code to recompute it"
        )
    if why is not None and warn:
        log.warning("stored result %s is not served (%s); recomputing", store, why)
    return None


def _log_stored(
    job_logger: Any, resolved: Mapping[str, Any], jid: str, out_dir: Path, record: dict[str, Any]
) -> dict[str, Any]:
    """A skipped job's stored result, logged to the job's logger (``logger=wandb`` after a run
    without it logs the result instead of recomputing it; the logger is not in the job hash)."""
    job_logger.start(resolved, jid, out_dir)
    job_logger.log_result(record, out_dir / "result.json")
    job_logger.finish(ok=True)
    return record


def _compute(
    cfg: DictConfig,
    resolved: dict[str, Any],
    jid: str,
    spec: EvalSpec,
    uses_sae: bool,
    job_logger: Any,
    checkpoint: CheckpointStore,
    start: float,
) -> dict[str, Any]:
    """Load the model and SAE, run the eval, write the result (the job lock is held)."""
    out_dir = Path(cfg.paths.output_dir)
    index = Path(cfg.paths.results_dir) / cfg.eval.name
    job_logger.start(resolved, jid, out_dir)  # never raises: a logging failure is one warning
    checkpoint.claim({"job_hash": jid, "saeravel": __version__, "git_commit": git_commit()})
    if checkpoint.names():
        log.info("job %s has checkpoints in %s; continuing from them", jid, checkpoint.folder)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    n_layers = cfg.model.n_layers
    if not 0 <= cfg.layer < n_layers:
        raise UserError(
            f"layer={cfg.layer} is out of range for {cfg.model.name}: 0..{n_layers - 1}"
        )

    site = str(cfg.get("site") or "resid_post")  # configs without the key: the residual
    sae_site = cfg.sae.get("site") if uses_sae else None
    if sae_site is not None and str(sae_site) != site:
        raise UserError(
            f"sae.site={sae_site} differs from site={site}; set site={sae_site} (sae.site "
            "follows it)"
        )
    sae_source = build_sae_source(cfg.sae) if uses_sae else None
    sae_kwargs = sae_source.required_model_kwargs() if sae_source is not None else {}
    if sae_source is not None:  # a width known from the SAE's file, before the model loads
        check_known_width(sae_source, cfg.model.name, cfg.model.d_model)
    model = instantiate(cfg.model).load(sae_kwargs)
    if model.n_layers != n_layers:
        raise UserError(f"model {model.name} has {model.n_layers} layers, config says {n_layers}")
    check_site(model, cfg.layer, site)
    sae = None
    if sae_source is not None:
        sae = sae_source.load(model)
        if sae is not None:
            check_sae_fits(sae, model, cfg.layer, site)
            sae = sae.to(device)

    ctx = EvalContext(
        model=model,
        sae=sae,
        layer=cfg.layer,
        hook_name=site_hook(site, cfg.layer),
        device=device,
        seed=cfg.seed,
        cache_dir=Path(cfg.paths.cache_dir),
        output_dir=out_dir,
        checkpoint=checkpoint,
        log_metrics=job_logger.log_metrics,
    )
    # the eval gets its own copy: what it fills in while running (RAVEL's default attributes)
    # never changes the job's config, its hash or a later job built from the same config
    output: EvalOutput = spec.run(copy.deepcopy(cfg.eval), ctx)
    record = build_record(
        eval_name=spec.name,
        eval_type_id=output.saebench_type_id or spec.saebench_type_id,
        eval_cfg=copy.deepcopy(resolved["eval"]),  # the job's config, as hashed (not what the
        # eval filled in while running, e.g. RAVEL's default attributes: those are in its details)
        metrics=output.metrics,
        details=output.details,
        unstructured=output.unstructured,
        sae_identity=vars(sae.identity) if sae is not None else None,
        sae_cfg=sae.cfg_dict if sae is not None else None,
        model_name=model.name,
        model_info={"processing": model.processing, **model.info},
        layer=cfg.layer,
        hook_name=ctx.hook_name,
        resolved_config=resolved,
        job_id=jid,
        runtime_s=round(time.time() - start, 2),
    )
    policy = str(cfg.get("reuse", Reuse.same_code))
    path = _write_result(out_dir, served_record(record, policy, None), spec)
    _write_result(index, record, spec, index_id=jid)
    checkpoint.clear()  # the result is complete: nothing left to resume
    job_logger.log_result(record, path)
    job_logger.finish(ok=True)
    for line in output.summary:
        log.info(line)
    log.info("result written to %s (%.0f s)", path, time.time() - start)
    return record


def _progress(store: CheckpointStore | None) -> str:
    """Where the checkpoints of an interrupted job stand (" from step N of M (name)"), or ""."""
    if store is None:
        return ""
    try:
        names = [n for n in store.names() if n.startswith("train-")]
        for name in names:
            state = store.load(name)
            if isinstance(state, dict) and "step" in state:
                total = f" of {state['total']}" if "total" in state else ""
                return f" from step {state['step']}{total} ({name})"
    except Exception:  # noqa: BLE001 - a progress hint must never replace the real message
        return ""
    return ""


class JobFailure:
    """What :func:`main_guarded` returns for a failed job of a sweep. Creating one, also by
    unpickling the job's return value in the sweep's process (submitit launchers), records it
    for :class:`SweepSummary`."""

    def __init__(self, job: str, message: str, user_error: bool = True) -> None:
        self.job, self.message, self.user_error = job, message, user_error
        _FAILED[job] = self

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (JobFailure, (self.job, self.message, self.user_error))


_FAILED: dict[str, JobFailure] = {}


def _job_label() -> str:
    from hydra.core.hydra_config import HydraConfig

    try:
        job = HydraConfig.get().job
        return f"#{job.num} ({job.override_dirname or 'no overrides'})"
    except Exception:  # noqa: BLE001
        return "#?"


try:
    from hydra.experimental.callback import Callback as _Callback
except ImportError:  # pragma: no cover - hydra < 1.1
    _Callback = object  # type: ignore[assignment,misc]


def _folder_error(folder: Path) -> str | None:
    try:
        _check_writable(folder)
    except UserError as exc:
        return str(exc)
    return None


class SweepSummary(_Callback):
    """Hydra callback (``hydra.callbacks`` in conf/config.yaml). Before a run or a sweep: an
    unwritable run / sweep folder is one line and exit code 2 (Hydra would fail creating it
    with a traceback). After a multirun in which a job failed: one line on stderr naming the
    failed jobs and exit code 2 (1 if a failure was not bad input but a bug, whose traceback
    is in that job's log)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if (msg := _folder_error(Path(str(config.hydra.run.dir)))) is not None:
            print(f"error: {msg} (hydra.run.dir)", file=sys.stderr, flush=True)
            sys.exit(2)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _FAILED.clear()
        if (msg := _folder_error(Path(str(config.hydra.sweep.dir)))) is not None:
            print(f"error: {msg} (hydra.sweep.dir)", file=sys.stderr, flush=True)
            sys.exit(2)
        _record_dead_submitit_jobs()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not _FAILED:
            return
        failed = sorted(_FAILED.values(), key=lambda f: f.job)
        parts = "; ".join(f"{f.job}: {f.message}" for f in failed)
        print(
            f"error: {len(failed)} job(s) of the sweep failed: {parts}", file=sys.stderr, flush=True
        )
        sys.exit(2 if all(f.user_error for f in failed) else 1)


def _record_dead_submitit_jobs() -> None:
    """Make a submitit job (``hydra/launcher=local`` or ``slurm``) that died without a result
    (killed, out of memory, timed out) a :class:`JobFailure` of the sweep, like a job that
    failed, instead of submitit's ``UncompletedJobError`` ending the sweep with a traceback
    before :class:`SweepSummary` reports: the launcher reads each job's result through
    ``submitit.Job.results``, which is wrapped here for this process (once)."""
    try:
        from submitit.core import core, utils
    except ImportError:  # no submitit: no submitit launcher either
        return
    if getattr(core.Job.results, "_saeravel", False):
        return
    real = core.Job.results

    def results(self: Any) -> list[Any]:
        try:
            return real(self)
        except utils.UncompletedJobError:
            from hydra.core.utils import JobReturn, JobStatus

            label = f"submitit job {self.job_id}"
            with contextlib.suppress(Exception):  # the job's own arguments name it better
                args = self.submission().args
                overrides = sorted(str(o) for o in args[0] if not str(o).startswith("hydra"))
                label = f"#{args[2]} ({','.join(overrides) or 'no overrides'})"
            why = f"died without a result (killed, out of memory or out of time? log: {self.paths.stderr})"
            failure = JobFailure(label, why, user_error=False)
            ret = JobReturn()
            ret.status, ret.return_value = JobStatus.COMPLETED, failure
            return [ret]

    results._saeravel = True  # type: ignore[attr-defined]
    core.Job.results = results  # type: ignore[method-assign]


def main_guarded(cfg: DictConfig) -> dict[str, Any] | JobFailure | None:
    """``run`` for the command line. A :class:`UserError` (or a full disk) becomes one line on
    stderr and exit code 2; Ctrl-C one line and exit code 130; anything else is logged with the
    job's output folder before it propagates. In a sweep a failed job returns a
    :class:`JobFailure` instead of exiting, so the other jobs run, and :class:`SweepSummary`
    reports it at the end."""
    logging.raiseExceptions = False  # a full disk must not print a traceback per log line
    _ACTIVE.clear()
    try:
        with _ctrl_c_deadline():
            return run(cfg)
    except KeyboardInterrupt:
        print(_stopped_line(), file=sys.stderr, flush=True)
        sys.exit(130)
    except (UserError, OSError) as exc:
        if isinstance(exc, OSError):
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                return _crashed(cfg, exc)
            folder = Path(exc.filename).parent if exc.filename else Path(cfg.paths.output_dir)
            exc = no_space_error(folder)
        print(f"error: {exc}", file=sys.stderr, flush=True)
        if _is_multirun():  # one bad job must not stop the others of a sweep
            log.error("job failed: %s", exc)
            return JobFailure(_job_label(), str(exc))
        sys.exit(2)
    except Exception as exc:
        return _crashed(cfg, exc)


def _stopped_line() -> str:
    return f"stopped; rerun the same command to continue{_progress(_ACTIVE.get('checkpoint'))}"


CTRL_C_GRACE_S = 8.0  # after Ctrl-C, the process is gone within this (the promise is 10 s)


@contextlib.contextmanager
def _ctrl_c_deadline() -> Any:
    """Ctrl-C ends the process with exit code 130 within :data:`CTRL_C_GRACE_S` seconds,
    whatever it is doing. The first SIGINT raises KeyboardInterrupt as usual (the job unwinds,
    prints its line, temp files are removed) and starts a daemon timer; if the process still
    runs when it fires (stuck inside the job, e.g. a thread pool waiting for its workers, or
    at interpreter exit joining a non-daemon thread), the timer prints the line if it was not
    printed and ends the process with ``os._exit(130)``. A caller that goes on after
    :func:`main_guarded` returned (tests, a basic-launcher sweep) is left alone. Only in the
    main thread, and only where SIGINT has Python's default handler (not ignored)."""
    import signal
    import threading

    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    state = {"in_job": True}

    def expire() -> None:
        if state["in_job"]:  # still unwinding the job after the grace period
            with contextlib.suppress(Exception):
                print(_stopped_line(), file=sys.stderr, flush=True)
        elif threading.main_thread().is_alive():
            return  # the job ended and its caller goes on: not ours to stop
        with contextlib.suppress(Exception):
            logging.shutdown()
        os._exit(130)

    def on_sigint(signum: int, frame: Any) -> None:
        timer = threading.Timer(CTRL_C_GRACE_S, expire)
        timer.daemon = True
        timer.start()
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: as usual
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        state["in_job"] = False
        if signal.getsignal(signal.SIGINT) is on_sigint:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def _crashed(cfg: DictConfig, exc: Exception) -> JobFailure:
    log.exception("job failed (output folder %s)", cfg.paths.get("output_dir", "?"))
    if _is_multirun():
        return JobFailure(_job_label(), f"{type(exc).__name__}: {exc}", user_error=False)
    raise exc


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
