"""What a job needs on disk to run without network, as its sources say it.

Every model and SAE source has ``offline_needs(ctx) -> list[Need | Skip]``: a :class:`Need` is
one thing to have in a cache (its ``check`` looks in the cache only and returns the files or
raises a :class:`UserError` saying what is missing; its ``fetch`` downloads or builds it), a
:class:`Skip` says why nothing is needed. ``python -m saeravel.prefetch`` plans a sweep's jobs,
asks each job's sources and fetches each need once. The Hugging Face helpers shared by the
sources' needs live here too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saeravel.errors import UserError
from saeravel.hub import gated_message
from saeravel.hub import hub_offline_mode as hub_offline_mode  # the one offline block

# top-level files of a model repo that transformers reads besides the weights
_MODEL_SMALL_FILES = (".json", ".txt", ".model", ".tiktoken", ".jinja", ".py")
_TOKENIZER_FILES = {"tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model"}


def _nothing() -> None:
    return None


@dataclass(eq=False)
class Need:
    """One thing a job needs in a cache. ``source`` is where it comes from ("" = built here),
    ``dest`` where it goes; ``hosts`` are probed before ``fetch`` (a node without network fails
    at once); equal ``key``s are one need (counted in ``jobs``); ``product`` builds what the
    need makes (a trained model) once, for needs that depend on it."""

    kind: str
    name: str
    source: str
    dest: str
    check: Callable[[], list[Path]]
    fetch: Callable[[], list[Path]]
    verify: Callable[[], None] = _nothing
    hosts: tuple[str, ...] = ()
    label: str = ""
    key: tuple[str, ...] = ()
    product: Callable[[], Any] | None = None
    jobs: int = 0

    def __post_init__(self) -> None:
        self.label = self.label or f"{self.kind} {self.name}"
        self.key = self.key or (self.kind, self.name, self.dest)

    def cached(self) -> bool:
        """Whether it is in the cache (no network)."""
        try:
            self.check()
        except Exception:  # a missing or unreadable cache entry both mean "fetch it"
            return False
        return True


@dataclass(frozen=True)
class Skip:
    """Nothing to fetch for ``what``, because ``why``."""

    what: str
    why: str


@dataclass
class OfflineContext:
    """What a source is asked with: the cache folder, whether to train what is trained here
    (``--train-embedded``), the job's model source and the needs it returned."""

    cache_dir: Path
    train: bool = False
    model: Any = None
    model_needs: list[Need] = field(default_factory=list)


def once(build: Callable[[], Any]) -> Callable[[], Any]:
    """``build``, called at most once (its result kept)."""
    done: list[Any] = []

    def call() -> Any:
        if not done:
            done.append(build())
        return done[0]

    return call


# ----------------------------------------------------------------------------- Hugging Face


def hub_endpoint() -> str:
    """The Hugging Face hub's URL (``HF_ENDPOINT``)."""
    import huggingface_hub.constants as hub_constants

    return hub_constants.ENDPOINT


def hub_cache() -> Path:
    """The Hugging Face hub cache folder."""
    import huggingface_hub.constants as hub_constants

    return Path(hub_constants.HF_HUB_CACHE)


def repo_cache(repo: str) -> Path:
    """A model repo's folder in the hub cache."""
    return hub_cache() / f"models--{repo.replace('/', '--')}"


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


def hub_model_need(repo: str, label: str, verify: Callable[[], None] = _nothing) -> Need:
    """A model repo's files in the hub cache (:func:`select_model_files`)."""

    def check() -> list[Path]:
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(repo, local_files_only=True))
        except Exception:  # LocalEntryNotFoundError, or a broken cache entry
            raise UserError(f"not in the Hugging Face cache ({hub_cache()})") from None
        if (missing := model_folder_missing(folder)) is not None:
            raise UserError(f"incomplete in the Hugging Face cache ({folder}): no {missing}")
        return [folder]

    def fetch() -> list[Path]:
        from huggingface_hub import HfApi, snapshot_download

        try:
            wanted = select_model_files(HfApi().list_repo_files(repo))
            folder = Path(snapshot_download(repo, allow_patterns=wanted))
        except OSError as exc:  # the hub's HTTP errors are OSErrors
            if (gated := gated_message(exc, repo)) is not None:
                raise UserError(gated) from exc
            raise
        return [folder / f for f in wanted]

    endpoint = hub_endpoint()
    return Need(
        "model", repo, f"{endpoint}/{repo}", str(hub_cache()), check, fetch, verify,
        hosts=(endpoint,), label=label, key=("model", repo),
    )  # fmt: skip
