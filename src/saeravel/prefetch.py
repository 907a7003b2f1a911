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
import json
import logging
import os
import re
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
from saeravel.hub import hub_offline, hub_offline_mode
from saeravel.taskdata import resolve_source

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
TL_MODEL = "saeravel.models.TransformerLensModel"
EMBEDDED_MODEL = "saeravel.tiny_lm.EmbeddedModel"
PLANTED_MODEL = "saeravel.planted.PlantedModel"
PROBE_TIMEOUT_S = 10.0
WANDB_DEFAULT_URL = "https://api.wandb.ai"
# top-level files of a model repo that transformers reads besides the weights
_MODEL_SMALL_FILES = (".json", ".txt", ".model", ".tiktoken", ".jinja", ".py")
_TOKENIZER_FILES = {"tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model"}


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


def _hub_endpoint() -> str:
    import huggingface_hub.constants as hub_constants

    return hub_constants.ENDPOINT


def _hub_cache() -> Path:
    import huggingface_hub.constants as hub_constants

    return Path(hub_constants.HF_HUB_CACHE)


def _repo_cache(repo: str) -> Path:
    return _hub_cache() / f"models--{repo.replace('/', '--')}"


# ----------------------------------------------------------------------------- items


class Item:
    """One thing to fetch. ``check`` looks in the cache only (no network) and returns the
    files, or raises a :class:`UserError` saying what is missing; ``fetch`` downloads."""

    kind = ""

    def __init__(self, name: str, source: str, dest: str) -> None:
        self.name = name
        self.source = source
        self.dest = dest
        self.jobs = 0

    @property
    def key(self) -> tuple[str, ...]:
        return (self.kind, self.name, self.dest)

    @property
    def label(self) -> str:
        return f"{self.kind} {self.name}"

    def check(self) -> list[Path]:
        raise NotImplementedError

    def fetch(self, reach: Reachability) -> list[Path]:
        raise NotImplementedError

    def cached(self) -> bool:
        """Whether it is in the cache (no network)."""
        try:
            self.check()
        except Exception:  # a missing or unreadable cache entry both mean "fetch it"
            return False
        return True

    def verify(self) -> None:
        """Load it offline as a job would (``--verify``); a no-op where ``check`` suffices."""


def select_model_files(files: Iterable[str]) -> list[str]:
    """The files of a model repo ``HookedTransformer.from_pretrained`` needs: top-level
    config and tokenizer files and one set of weights (safetensors, else PyTorch ``.bin``)."""
    top = sorted(f for f in files if "/" not in f)
    small = [f for f in top if f.endswith(_MODEL_SMALL_FILES)]
    weights = [f for f in top if f.endswith(".safetensors")]
    weights = weights or [f for f in top if re.fullmatch(r"pytorch_model.*\.bin", f)]
    weights = weights or [f for f in top if f.endswith((".pth", ".pt", ".bin"))]
    return small + weights


def model_folder_missing(folder: Path) -> str | None:
    """What a cached model snapshot lacks (config, complete weights, tokenizer), or None."""
    names = {p.name for p in folder.iterdir() if p.exists()} if folder.is_dir() else set()
    if "config.json" not in names:
        return "config.json"
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if index in names:
            shards = set(json.loads((folder / index).read_text())["weight_map"].values())
            if missing := sorted(shards - names):
                return ", ".join(missing)
            break
    else:
        if not any(
            n.endswith(".safetensors") or re.fullmatch(r"pytorch_model.*\.bin", n) for n in names
        ):
            return "weights (*.safetensors or pytorch_model.bin)"
    if not names & _TOKENIZER_FILES:
        return "tokenizer files"
    return None


class ModelItem(Item):
    """A transformer_lens model's Hugging Face repo (files selected by :func:`select_model_files`)."""

    kind = "model"

    def __init__(self, model_cfg: DictConfig) -> None:
        from transformer_lens.loading_from_pretrained import get_official_model_name

        try:
            repo = get_official_model_name(model_cfg.hf_name)
        except ValueError:
            raise UserError(
                f"model {model_cfg.name}: transformer_lens knows no model {model_cfg.hf_name!r}"
            ) from None
        super().__init__(repo, f"{_hub_endpoint()}/{repo}", str(_hub_cache()))
        self.model_cfg = model_cfg

    @property
    def key(self) -> tuple[str, ...]:
        return (self.kind, self.name)

    @property
    def label(self) -> str:
        return f"model {self.name} (model={self.model_cfg.name})"

    def check(self) -> list[Path]:
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(self.name, local_files_only=True))
        except Exception:  # LocalEntryNotFoundError, or a broken cache entry
            raise UserError(f"not in the Hugging Face cache ({_hub_cache()})") from None
        if (missing := model_folder_missing(folder)) is not None:
            raise UserError(f"incomplete in the Hugging Face cache ({folder}): no {missing}")
        return [folder]

    def fetch(self, reach: Reachability) -> list[Path]:
        from huggingface_hub import HfApi, snapshot_download

        reach.require(_hub_endpoint())
        wanted = select_model_files(HfApi().list_repo_files(self.name))
        folder = Path(snapshot_download(self.name, allow_patterns=wanted))
        return [folder / f for f in wanted]

    def verify(self) -> None:
        from hydra.utils import instantiate

        with hub_offline_mode():
            instantiate(self.model_cfg, device="cpu").load({})


class SaeLensItem(Item):
    """An SAE of sae_lens' pretrained directory: its files in the release's Hugging Face repo."""

    kind = "sae_lens"

    def __init__(self, release: str, sae_id: str) -> None:
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

        directory = get_pretrained_saes_directory()
        if release not in directory or sae_id not in directory[release].saes_map:
            raise UserError(f"sae_lens has no SAE {sae_id!r} in release {release!r}")
        lookup = directory[release]
        self.release, self.sae_id = release, sae_id
        self.repo, self.path = lookup.repo_id, lookup.saes_map[sae_id]
        # sae_lens' own layout (cfg.json + weights in a folder) is downloaded file by file;
        # other layouts are loaded once through sae_lens, which caches what it reads
        self.native = lookup.conversion_func in (None, "sae_lens")
        where = f"{self.path}/" if self.native else f"{self.path} (via sae_lens)"
        super().__init__(
            f"{release} {sae_id}", f"{_hub_endpoint()}/{self.repo} {where}", str(_hub_cache())
        )

    def _files(self) -> tuple[list[str], str]:
        from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME

        needed = [f"{self.path}/{SAE_CFG_FILENAME}", f"{self.path}/{SAE_WEIGHTS_FILENAME}"]
        return needed, f"{self.path}/{SPARSITY_FILENAME}"

    def _load(self) -> None:
        from saeravel.saes.loaders import load_pretrained_sae_lens

        load_pretrained_sae_lens(self.release, self.sae_id)

    def check(self) -> list[Path]:
        from huggingface_hub import try_to_load_from_cache

        if not self.native:
            with hub_offline_mode():
                self._load()
            return [_repo_cache(self.repo)]
        needed, optional = self._files()
        paths = []
        for filename in [*needed, optional]:
            got = try_to_load_from_cache(self.repo, filename)
            if isinstance(got, str):
                paths.append(Path(got))
            elif filename != optional:
                raise UserError(f"{filename} of {self.repo} is not in the Hugging Face cache")
        return paths

    def fetch(self, reach: Reachability) -> list[Path]:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        reach.require(_hub_endpoint())
        if not self.native:
            self._load()
            return [_repo_cache(self.repo)]
        needed, optional = self._files()
        paths = [Path(hf_hub_download(self.repo, f)) for f in needed]
        try:
            paths.append(Path(hf_hub_download(self.repo, optional)))
        except EntryNotFoundError:
            pass  # not every SAE has a sparsity file; sae_lens does without it
        return paths

    def verify(self) -> None:
        with hub_offline_mode():
            self._load()


class ApolloItem(Item):
    """An Apollo e2e SAE's wandb run (latest checkpoint and config), via ApolloWandbSource."""

    kind = "apollo"

    def __init__(self, source: Any) -> None:
        self.loader = source
        run_path = f"{source.project}/{source.run_id()}"
        super().__init__(run_path, f"wandb {run_path}", str(source.run_dir()))

    def check(self) -> list[Path]:
        ckpt = self.loader._cached(self.loader.run_dir())
        if ckpt is None:
            hint = "" if os.environ.get("WANDB_API_KEY") else "; fetching it needs WANDB_API_KEY"
            raise UserError(f"not in the cache ({self.dest}){hint}")
        return [ckpt.parent]

    def fetch(self, reach: Reachability) -> list[Path]:
        if os.environ.get("WANDB_API_KEY"):  # without it, fetch fails at once with the route
            reach.require(os.environ.get("WANDB_BASE_URL") or WANDB_DEFAULT_URL)
        return [self.loader.fetch().parent]


class RavelItem(Item):
    """RAVEL's city files (``download_ravel``) in ``paths.cache_dir/ravel``."""

    kind = "ravel"

    def __init__(self, cache_dir: Path) -> None:
        from saeravel.ravel import data

        self.cache_dir = cache_dir
        super().__init__("city data", data.RAVEL_URL, str(cache_dir / "ravel"))

    def check(self) -> list[Path]:
        from saeravel.ravel.data import CITY_FILES

        dest = Path(self.dest)
        missing = [f for f in CITY_FILES.values() if not (dest / f).is_file()]
        if missing:
            n = f"{len(missing)} of {len(CITY_FILES)}"
            raise UserError(f"not in the cache ({dest} lacks {n} city files)")
        return [dest]

    def fetch(self, reach: Reachability) -> list[Path]:
        from saeravel.ravel import data

        reach.require(data.RAVEL_URL)
        return [data.download_ravel(self.cache_dir, url=data.RAVEL_URL)]


class EmbeddedModelItem(Item):
    """``--train-embedded``: the embedded model, trained and cached here (no download)."""

    kind = "train"

    def __init__(self, source: Any) -> None:
        self.loader = source
        self._loaded: Any = None
        super().__init__(f"model={source.name}", "", str(source.folder()))

    def check(self) -> list[Path]:
        if not (Path(self.dest) / "meta.json").is_file():  # written last: marks it complete
            raise UserError(f"not trained yet ({self.dest})")
        return [Path(self.dest)]

    @property
    def label(self) -> str:
        return f"{self.name} (embedded)"

    def loaded(self) -> Any:
        """The model, trained first if it is not cached (once per run)."""
        if self._loaded is None:
            self._loaded = self.loader.load()
        return self._loaded

    def fetch(self, reach: Reachability) -> list[Path]:
        self.loaded()
        return [Path(self.dest)]


class TrainedSaeItem(Item):
    """``--train-embedded``: ``sae=trained`` on the embedded model at one layer."""

    kind = "train"

    def __init__(self, source: Any, model_item: EmbeddedModelItem) -> None:
        self.loader = source
        self.model_item = model_item
        name = f"sae=trained on {model_item.loader.name} layer {source.layer}"
        super().__init__(name, "", str(Path(source.cache_dir) / "saes"))
        self._key = json.dumps([model_item.dest, source.layer, source.hparams], sort_keys=True)

    @property
    def key(self) -> tuple[str, ...]:
        return (self.kind, self._key)

    @property
    def label(self) -> str:
        return self.name

    def check(self) -> list[Path]:
        self.model_item.check()
        folder = self.loader._folder(self.model_item.loaded())
        if not (folder / "meta.json").is_file():  # written last: marks it complete
            raise UserError(f"not trained yet ({folder})")
        return [folder]

    def fetch(self, reach: Reachability) -> list[Path]:
        model = self.model_item.loaded()
        self.loader.load(model)
        return [self.loader._folder(model)]


# ----------------------------------------------------------------------------- plan


@dataclass
class Job:
    """One job of the sweep: its overrides and composed config."""

    overrides: list[str]
    cfg: DictConfig


@dataclass
class Plan:
    """What the jobs need (each item once), what needs nothing and why, and planning errors."""

    n_jobs: int = 0
    sweeps: list[list[str]] = field(default_factory=list)
    items: dict[tuple[str, ...], Item] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def add(self, item: Item) -> Item:
        """``item``, or the equal one already planned; counts the job."""
        item = self.items.setdefault(item.key, item)
        item.jobs += 1
        return item

    def ordered(self) -> list[Item]:
        """The items grouped by kind (models, SAEs, Apollo runs, data, training), stable."""
        order = ["model", "sae_lens", "apollo", "ravel", "train"]
        return sorted(self.items.values(), key=lambda i: order.index(i.kind))

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


def compose_jobs(
    overrides: Sequence[str], conf_dir: Path = CONF_DIR
) -> tuple[list[list[str]], list[Job]]:
    """The sweeps and the jobs of ``python run.py -m <overrides>``, composed.

    As Hydra's basic sweeper: the experiment's ``hydra.sweeper.params`` first, then the
    command line (a key given on both keeps the command line's values), product of the lists.
    """
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from saeravel.config import register_configs

    if not (conf_dir / "config.yaml").is_file():
        raise UserError(f"no config.yaml in {conf_dir}; pass --config-dir <repo>/conf")
    register_configs()
    jobs: list[Job] = []
    with initialize_config_dir(config_dir=str(conf_dir.resolve()), version_base="1.3"):
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
        sweeps = sweeps_of(overrides, parser)
        for sweep in sweeps:
            fixed = [
                o.input_line for o in parser.parse_overrides(sweep) if not o.is_sweep_override()
            ]
            base = compose("config", overrides=fixed, return_hydra_config=True)
            params = [f"{k}={v}" for k, v in (base.hydra.sweeper.get("params") or {}).items()]
            batches = BasicSweeper.split_arguments(parser.parse_overrides([*params, *sweep]), None)
            for job in (list(j) for batch in batches for j in batch):
                jobs.append(Job(job, compose("config", overrides=job)))
    return sweeps, jobs


def plan_jobs(jobs: Sequence[Job], train_embedded: bool = False) -> Plan:
    """What ``jobs`` need, each item once (nothing is downloaded or loaded)."""
    plan = Plan(n_jobs=len(jobs))
    for job in jobs:
        try:
            _plan_job(job.cfg, plan, train_embedded)
        except Exception as exc:  # UserError, or an SAE config that cannot be instantiated
            plan.error(f"job {' '.join(job.overrides) or '(defaults)'}: {one_line(exc)}")
    return plan


def _plan_job(cfg: DictConfig, plan: Plan, train_embedded: bool) -> None:
    from hydra.utils import instantiate

    from saeravel.evals.api import get_eval

    model_name = cfg.model.name
    target = cfg.model._target_
    embedded = target in (EMBEDDED_MODEL, PLANTED_MODEL)  # both carry their own world
    model_item: Item | None = None
    if target == TL_MODEL:
        if Path(cfg.model.hf_name).expanduser().exists():
            plan.skip(f"model={model_name}", f"a local folder ({cfg.model.hf_name})")
        else:
            model_item = plan.add(ModelItem(cfg.model))
    elif target == PLANTED_MODEL:
        plan.skip(
            f"model={model_name}", "planted: built analytically at run time, nothing to fetch"
        )
    elif embedded:
        if train_embedded:
            model_item = plan.add(EmbeddedModelItem(instantiate(cfg.model)))
        else:
            plan.skip(
                f"model={model_name}",
                "embedded: trained here on first use (~2 min on CPU) and cached, nothing to "
                "download (--train-embedded trains it now)",
            )
    else:
        plan.skip(f"model={model_name}", f"{target} is not a source prefetch knows")

    spec = get_eval(cfg.eval.name)
    family = cfg.sae.get("family", "?")
    if spec.needs_sae(cfg.eval):
        _plan_sae(cfg, plan, model_item, train_embedded)
    elif family != "none":
        method = cfg.eval.get("method")
        jobs = f"eval={spec.name}" + (f" eval.method={method}" if method else "")
        plan.skip(f"sae={family} ({jobs} jobs)", "not loaded: these jobs use no SAE")

    cache_dir = Path(cfg.paths.cache_dir).expanduser()
    if spec.name == "ravel":
        if cfg.eval.data_dir:
            plan.skip("RAVEL data", f"read from eval.data_dir={cfg.eval.data_dir}")
        elif resolve_source(cfg.eval.data_source, embedded, other="ravel") == "ravel":
            plan.add(RavelItem(cache_dir))
        else:
            plan.skip("RAVEL data", f"not needed: eval=ravel on {model_name} uses its own world")
    elif not embedded:
        plan.skip(
            f"eval={spec.name} data",
            f"the Hugging Face datasets eval={spec.name} reads on {model_name} are not "
            "prefetched (download them with `datasets` here, then HF_DATASETS_OFFLINE=1)",
        )


def _plan_sae(cfg: DictConfig, plan: Plan, model_item: Item | None, train_embedded: bool) -> None:
    from saeravel.planted import PlantedSAESource
    from saeravel.saes.loaders import (
        ApolloWandbSource,
        CustomSource,
        LocalSource,
        NoSource,
        SaeLensSource,
        build_sae_source,
    )
    from saeravel.saes.train import TrainedSource

    source = build_sae_source(cfg.sae)  # a source's UserError unwrapped from Hydra's
    family = source.family
    if isinstance(source, SaeLensSource):
        plan.add(SaeLensItem(*source.resolve()))
    elif isinstance(source, ApolloWandbSource):
        plan.add(ApolloItem(source))
    elif isinstance(source, PlantedSAESource):
        plan.skip(f"sae={family}", "built from the planted world at run time, nothing to fetch")
    elif isinstance(source, TrainedSource) and cfg.model._target_ == PLANTED_MODEL:
        plan.skip(
            f"sae={family} on {cfg.model.name}",
            "trained here on the planted world's fact sentences on first use, nothing to download",
        )
    elif isinstance(source, TrainedSource):
        if cfg.model._target_ != EMBEDDED_MODEL:
            plan.skip(
                f"sae={family} on {cfg.model.name}",
                f"trained at run time on text streamed from {source.hparams['dataset']}: the job "
                "needs network (or train it where there is network); not prefetchable",
            )
        elif isinstance(model_item, EmbeddedModelItem):
            plan.add(TrainedSaeItem(source, model_item))
        else:
            plan.skip(
                f"sae={family} on {cfg.model.name}",
                "trained here on first use and cached, nothing to download "
                "(--train-embedded trains it now)",
            )
    elif isinstance(source, NoSource):
        plan.skip(f"sae={family}", "no SAE")
    elif isinstance(source, LocalSource):
        where = "" if source.path.exists() else " (it does not exist here)"
        plan.skip(f"sae={family}", f"read from disk at run time: {source.path}{where}")
    elif isinstance(source, CustomSource):
        plan.skip(f"sae={family}", f"built by user code ({source.target}), nothing to download")
    else:
        plan.skip(f"sae={family}", f"{type(source).__name__} is not a source prefetch knows")


# ----------------------------------------------------------------------------- run


@dataclass
class Outcome:
    """What happened to one item: ``fetched``, ``cached``, ``failed`` or ``planned`` (dry run)."""

    item: Item
    status: str
    size: int | None = None
    error: str = ""


def run_items(
    items: Iterable[Item],
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
                paths, status = item.fetch(reach), "fetched"
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
