"""``python -m saeravel.prefetch [overrides]``: download what a sweep needs before going offline.

Compute nodes often have no network. Run this on a login node with the overrides of the sweep
(comma lists, ``experiment=...`` and its ``hydra.sweeper.params``, exactly as for
``python run.py -m``); it expands them into jobs, de-duplicates what the jobs need and fetches
each thing once:

- models (transformer_lens names mapped to their Hugging Face repo; config, tokenizer and
  weight files only) into the Hugging Face cache,
- sae_lens SAEs (their files in the release's Hugging Face repo) into the same cache,
- Apollo's wandb runs into ``paths.cache_dir/apollo/<run>`` (needs ``WANDB_API_KEY``),
- RAVEL's city files into ``paths.cache_dir/ravel`` (``eval=ravel`` on a pretrained model).

The embedded model and ``sae=trained`` are trained on first use, not downloaded
(``--train-embedded`` trains the embedded ones now). Jobs then run with ``HF_HUB_OFFLINE=1``.
Items already in the cache are not downloaded again. With ``--check`` (implied by
``HF_HUB_OFFLINE=1``) nothing is downloaded: the cache is checked and what is missing is listed.

What a job needs is its sources' answer: prefetch composes each job with ``hydra.compose``
(the sweep expanded with Hydra's public override parser, as its basic sweeper does), builds the
job's model source and, if the eval loads one, its SAE source, and asks each
``offline_needs(ctx)`` (:mod:`saeravel.offline`: a ``Need`` to check or fetch, or a ``Skip``
saying why nothing is needed); it knows no source class by name.

A comma list of experiments is expanded one experiment at a time, each with its own swept
values (as ``launchers/paper_grid.sh`` runs them), so
``experiment=paper_grid,paper_grid_baselines,paper_grid_apollo`` covers the paper's grid.
Exit code: 0 when everything is available, 1 when something could not be fetched (one
``error:`` line each), 2 for bad arguments or a job that cannot run (e.g. a layer an SAE family
lacks; the rest is still fetched).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import stat
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from saeravel.errors import UserError
from saeravel.hub import hub_offline
from saeravel.offline import (  # noqa: F401 (part of this module's interface)
    Need,
    OfflineContext,
    Skip,
    hub_offline_mode,
    model_folder_missing,
    select_model_files,
)

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
PROBE_TIMEOUT_S = 10.0


# ----------------------------------------------------------------------------- helpers


def one_line(exc: BaseException) -> str:
    """An exception as one short line (library errors are often multi-line)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if not isinstance(exc, UserError):
        text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= 400 else text[:397] + "..."


def disk_size(paths: Iterable[Path]) -> int:
    """Bytes on disk of the files under ``paths`` (files or folders), each file counted once.

    Symlinks are followed (the Hugging Face cache links snapshot files to blobs), so a blob
    reached twice counts once; dangling links count nothing.
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    for root in paths:
        root = Path(root)
        files = root.rglob("*") if root.is_dir() else [root]
        for f in files:
            try:
                st = f.stat()
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def human_size(n: int) -> str:
    """``n`` bytes in decimal units: ``0 B``, ``1.5 kB``, ``548.1 MB``, ``5.23 GB``."""
    if n < 1000:
        return f"{n} B"
    for unit, scale in (("kB", 1e3), ("MB", 1e6)):
        if n < scale * 1000:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1e9:.2f} GB"


class Reachability:
    """Probes each host once (a HEAD request, honouring proxy variables) before downloading, so
    a node without network fails at once instead of in the libraries' retry loops."""

    def __init__(self, timeout: float = PROBE_TIMEOUT_S) -> None:
        self.timeout = timeout
        self._seen: dict[str, str | None] = {}

    def require(self, url: str) -> None:
        """Raise a :class:`UserError` if the host of ``url`` does not answer."""
        parts = urllib.parse.urlsplit(url)
        base = f"{parts.scheme}://{parts.netloc}"
        if base not in self._seen:
            self._seen[base] = _probe(base, self.timeout)
        if (err := self._seen[base]) is not None:
            raise UserError(f"{base} cannot be reached ({err}); prefetch needs network")


def _probe(url: str, timeout: float) -> str | None:
    """None if ``url`` answers (any HTTP status), else why not."""
    try:
        urllib.request.urlopen(  # noqa: S310 (the hub / wandb / RAVEL endpoints)
            urllib.request.Request(url, method="HEAD"), timeout=timeout
        ).close()
    except urllib.error.HTTPError:
        return None  # the server answered
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return " ".join(str(getattr(exc, "reason", exc)).split())
    return None


# ----------------------------------------------------------------------------- plan


@dataclass
class Job:
    """One job of the sweep: its overrides and composed config."""

    overrides: list[str]
    cfg: DictConfig


@dataclass
class Plan:
    """What the jobs need (each need once), what needs nothing and why, and planning errors."""

    n_jobs: int = 0
    sweeps: list[list[str]] = field(default_factory=list)
    items: dict[tuple[str, ...], Need] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def add(self, need: Need) -> Need:
        """``need``, or the equal one already planned; counts the job."""
        need = self.items.setdefault(need.key, need)
        need.jobs += 1
        return need

    def take(self, answers: Iterable[Need | Skip]) -> list[Need]:
        """A source's answer: its needs planned (as :meth:`add`), its skips noted."""
        needs = []
        for answer in answers:
            if isinstance(answer, Skip):
                self.skip(answer.what, answer.why)
            else:
                needs.append(self.add(answer))
        return needs

    def ordered(self) -> list[Need]:
        """The needs grouped by kind (models, SAEs, Apollo runs, data, training), stable."""
        order = ["model", "sae_lens", "apollo", "ravel", "train"]
        return sorted(
            self.items.values(),
            key=lambda i: order.index(i.kind) if i.kind in order else len(order),
        )

    def skip(self, what: str, why: str) -> None:
        self.skipped.setdefault(what, why)

    def error(self, message: str) -> None:
        if message not in self.errors:
            self.errors.append(message)


def sweeps_of(overrides: Sequence[str], parser: Any) -> list[list[str]]:
    """The sweeps to expand: one, or one per experiment of a comma list of experiments."""
    lines = list(overrides)
    for i, o in enumerate(parser.parse_overrides(lines)):
        if o.key_or_group == "experiment" and o.is_sweep_override():
            key = o.get_key_element()
            return [[*lines[:i], f"{key}={v}", *lines[i + 1 :]] for v in o.sweep_string_iterator()]
    return [lines]


def expand_sweep(overrides: Sequence[Any]) -> list[list[str]]:
    """The jobs of parsed ``overrides`` as Hydra's basic sweeper expands them: each override
    is one key (a key given twice keeps its first place and its last values), a sweep
    (``a,b``, ``range(...)``, ``choice(...)``) its values; the jobs are the product."""
    per_key: dict[str, list[str]] = {}
    for o in overrides:
        key = o.get_key_element()
        if o.is_sweep_override():
            if not o.is_discrete_sweep():
                raise UserError(f"{o.input_line}: Hydra's basic sweeper expands no interval sweeps")
            per_key[key] = [f"{key}={v}" for v in o.sweep_string_iterator()]
        else:
            per_key[key] = [f"{key}={o.get_value_element_as_str()}"]
    return [list(job) for job in itertools.product(*per_key.values())]


def compose_jobs(
    overrides: Sequence[str], conf_dir: Path = CONF_DIR
) -> tuple[list[list[str]], list[Job]]:
    """The sweeps and the jobs of ``python run.py -m <overrides>``, composed with
    ``hydra.compose``.

    As Hydra's basic sweeper: the experiment's ``hydra.sweeper.params`` first, then the
    command line (a key given on both keeps the command line's values), product of the lists.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from saeravel.config import register_configs

    if not (conf_dir / "config.yaml").is_file():
        raise UserError(f"no config.yaml in {conf_dir}; pass --config-dir <repo>/conf")
    register_configs()
    jobs: list[Job] = []
    parser = OverridesParser.create()
    with initialize_config_dir(config_dir=str(conf_dir.resolve()), version_base="1.3"):
        sweeps = sweeps_of(overrides, parser)
        for sweep in sweeps:
            fixed = [
                o.input_line for o in parser.parse_overrides(sweep) if not o.is_sweep_override()
            ]
            base = compose("config", overrides=fixed, return_hydra_config=True)
            params = [f"{k}={v}" for k, v in (base.hydra.sweeper.get("params") or {}).items()]
            for job in expand_sweep(parser.parse_overrides([*params, *sweep])):
                jobs.append(Job(job, compose("config", overrides=job)))
    return sweeps, jobs


def plan_jobs(jobs: Sequence[Job], train_embedded: bool = False) -> Plan:
    """What ``jobs`` need, each need once (nothing is downloaded or loaded)."""
    plan = Plan(n_jobs=len(jobs))
    for job in jobs:
        try:
            _plan_job(job.cfg, plan, train_embedded)
        except Exception as exc:  # UserError, or an SAE config that cannot be instantiated
            plan.error(f"job {' '.join(job.overrides) or '(defaults)'}: {one_line(exc)}")
    return plan


def _plan_job(cfg: DictConfig, plan: Plan, train_embedded: bool) -> None:
    """Ask the job's model source, then its SAE source (if the eval loads one), what they
    need offline; then the RAVEL data ``eval=ravel`` reads."""
    from saeravel.errors import instantiate
    from saeravel.evals.api import get_eval
    from saeravel.saes.source import build_sae_source

    cache_dir = Path(cfg.paths.cache_dir).expanduser()
    model = instantiate(cfg.model, device="cpu")  # where it would run does not matter here
    ctx = OfflineContext(cache_dir, train=train_embedded, model=model)
    ctx.model_needs = plan.take(model.offline_needs(ctx))

    spec = get_eval(cfg.eval.name)
    family = cfg.sae.get("family", "?")
    if spec.needs_sae(cfg.eval):
        plan.take(build_sae_source(cfg.sae).offline_needs(ctx))
    elif family != "none":
        method = cfg.eval.get("method")
        jobs = f"eval={spec.name}" + (f" eval.method={method}" if method else "")
        plan.skip(f"sae={family} ({jobs} jobs)", "not loaded: these jobs use no SAE")

    if (answers := spec.offline_needs_of(cfg.eval, ctx)) is not None:
        plan.take(answers)  # the eval's own data (its registration's ``offline_needs``)
    elif not model.own_world:
        plan.skip(
            f"eval={spec.name} data",
            f"the Hugging Face datasets eval={spec.name} reads on {model.name} are not "
            "prefetched (download them with `datasets` here, then HF_DATASETS_OFFLINE=1)",
        )


# ----------------------------------------------------------------------------- run


@dataclass
class Outcome:
    """What happened to one item: ``fetched``, ``cached``, ``failed`` or ``planned`` (dry run)."""

    item: Need
    status: str
    size: int | None = None
    error: str = ""


def run_items(
    items: Iterable[Need],
    *,
    dry_run: bool = False,
    check_only: bool = False,
    verify: bool = False,
    reach: Reachability | None = None,
) -> list[Outcome]:
    """Fetch (or check, or only describe) each item; never raises for one item's failure."""
    reach = reach or Reachability()
    outcomes = []
    for item in items:
        if dry_run:
            size = None
            with contextlib.suppress(Exception):  # a cache entry that vanished: not cached
                if item.cached():
                    size = disk_size(item.check())
            outcomes.append(Outcome(item, "planned" if size is None else "cached", size))
            continue
        try:
            try:
                paths, status = item.check(), "cached"
            except Exception:
                if check_only:
                    raise
                if item.source:
                    log.info("fetching %s from %s", item.label, item.source)
                else:
                    log.info("training %s (cached for the jobs)", item.label)
                for host in item.hosts:  # fail at once on a node without network
                    reach.require(host)
                paths, status = item.fetch(), "fetched"
            if verify:
                item.verify()
            outcomes.append(Outcome(item, status, disk_size(paths)))
        except Exception as exc:  # one line per failed item; the others still run
            log.debug("%s failed", item.label, exc_info=True)
            outcomes.append(Outcome(item, "failed", error=one_line(exc)))
    return outcomes


def format_report(
    plan: Plan, outcomes: Sequence[Outcome], *, dry_run: bool, check_only: bool
) -> list[str]:
    """The report's lines: items (status, source, destination, size), skips, totals."""
    mode = "dry run" if dry_run else "check only, no downloads" if check_only else "fetch"
    if check_only and not dry_run and hub_offline():
        mode += " (HF_HUB_OFFLINE=1)"
    lines = [
        f"prefetch ({mode}): {plan.n_jobs} job(s) in {len(plan.sweeps)} sweep(s) need "
        f"{len(plan.items)} item(s)"
    ]
    for sweep in plan.sweeps:
        lines.append(f"  sweep: {' '.join(sweep) or '(defaults)'}")
    verb = {"planned": "would fetch", "cached": "cached", "fetched": "fetched", "failed": "FAILED"}
    train_verb = {**verb, "planned": "would train", "fetched": "trained"}
    for o in outcomes:
        item = o.item
        size = f"  {human_size(o.size)}" if o.size is not None else ""
        jobs = f"{item.jobs} job" + ("s" if item.jobs != 1 else "")
        what = (train_verb if item.kind == "train" else verb)[o.status]
        source = f"  from {item.source}" if item.source else ""
        lines.append(f"  {what:<11} {item.label}{source} -> {item.dest}  [{jobs}]{size}")
    if plan.skipped:
        lines.append("skipped:")
        lines += [f"  {what}: {why}" for what, why in plan.skipped.items()]
    total = sum(o.size or 0 for o in outcomes)
    counts = {s: sum(o.status == s for o in outcomes) for s in verb}
    summary = ", ".join(f"{n} {verb[s]}" for s, n in counts.items() if n)
    lines.append(f"total: {summary or 'nothing to fetch'}; {human_size(total)} on disk")
    if not dry_run and not counts["failed"] and not plan.errors and plan.items:
        note = " (prefetch does not cover what is listed under skipped)" if plan.skipped else ""
        lines.append(f"all items available: run the jobs with HF_HUB_OFFLINE=1{note}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m saeravel.prefetch [--dry-run] [--check] [...] [overrides...]``."""
    parser = argparse.ArgumentParser(
        prog="python -m saeravel.prefetch",
        description="Download once what the jobs of a sweep need (models, SAEs, Apollo runs, "
        "RAVEL data), so they can run on nodes without network (HF_HUB_OFFLINE=1).",
        epilog="e.g. python -m saeravel.prefetch experiment=paper_grid,paper_grid_baselines,"
        "paper_grid_apollo  |  python -m saeravel.prefetch sae=openai_v5_32k,jbloom layer=0,1,2 "
        "model=gpt2-small",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for run.py -m")
    parser.add_argument("--dry-run", action="store_true", help="list what would be fetched")
    parser.add_argument(
        "--check",
        action="store_true",
        help="download nothing, report what is missing from the caches (implied by HF_HUB_OFFLINE=1)",
    )
    parser.add_argument(
        "--train-embedded",
        action="store_true",
        help="train and cache the embedded model and sae=trained on it now",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="then load each model and sae_lens SAE offline, as a job would (needs their RAM)",
    )
    parser.add_argument("--config-dir", type=Path, default=CONF_DIR, help="the conf/ folder")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-m", "--multirun", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    check_only = args.check or hub_offline()
    try:
        sweeps, jobs = compose_jobs(args.overrides, args.config_dir)
        plan = plan_jobs(jobs, train_embedded=args.train_embedded)
    except Exception as exc:  # a bad override or config: one line, exit 2 (as run.py)
        log.debug("planning failed", exc_info=True)
        message = one_line(exc).split(" Config search path:")[0]  # Hydra appends its search path
        print(f"error: {message}", file=sys.stderr, flush=True)
        return 2
    plan.sweeps = sweeps
    outcomes = run_items(
        plan.ordered(), dry_run=args.dry_run, check_only=check_only, verify=args.verify
    )
    for line in format_report(plan, outcomes, dry_run=args.dry_run, check_only=check_only):
        print(line, flush=True)
    failures = plan.errors + [f"{o.item.label}: {o.error}" for o in outcomes if o.error]
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr, flush=True)
    return 2 if plan.errors else 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
