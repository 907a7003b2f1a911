"""``sae=apollo_e2e`` / ``apollo_e2e_ds``: Apollo Research e2e SAEs from their wandb runs.

Neuronpedia hosts these families; their ids are in sae_lens' catalogue, not in the wandb runs.
The SAE's ``neuronpedia_id`` is the catalogue's id for the SAE of ``sae.sae_lens_release`` (the
same family, data in ``conf/sae/apollo_e2e*.yaml``) that reads the same hook; which wandb run
Neuronpedia's copy came from is not recorded anywhere this code can read, so the match is by
family and hook (the run ids are those of the SAE-RAVEL paper)."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from saeravel.errors import UserError
from saeravel.models import LoadedModel
from saeravel.saes.base import SAE, SAEIdentity
from saeravel.saes.formats import from_apollo_state_dict
from saeravel.saes.source import SAESource
from saeravel.saes.util import few, first_line, layer_map, missing_layer, residual_only
from saeravel.wandb_auth import has_wandb_credentials, wandb_host

log = logging.getLogger(__name__)

_CHECKPOINT_RE = re.compile(r"samples_(\d+)\.pt")


def _checkpoint_step(name: str) -> int | None:
    m = _CHECKPOINT_RE.fullmatch(Path(name).name)
    return int(m.group(1)) if m else None


class ApolloWandbSource(SAESource):
    """Apollo Research e2e SAEs, downloaded from their public wandb runs (once, then cached).

    Files go to ``cache_dir/apollo/<run_id>/``: ``final_config.yaml`` and the latest
    checkpoint ``samples_<N>.pt``. Apollo trained on ``HookedTransformer.from_pretrained``
    activations with transformer_lens' default weight processing, so
    :meth:`required_model_kwargs` is ``{}`` (TL defaults).
    """

    MARKER = "saeravel_download.json"

    def __init__(
        self,
        family: str,
        layer: int,
        project: str = "sparsify/gpt2",
        run_ids: Mapping[int, str] | None = None,
        hooks: Mapping[int, str] | None = None,
        cache_dir: str = ".cache",
        sae_lens_release: str | None = None,
        site: str = "resid_post",
    ) -> None:
        self.family = family
        self.layer = int(layer)
        self.site = residual_only(family, site)
        self.project = project
        self.run_ids = layer_map(run_ids)
        self.hooks = layer_map(hooks)
        self.cache_dir = Path(cache_dir)
        self.sae_lens_release = sae_lens_release
        self.run_id()  # a layer without a run: before anything else

    def required_model_kwargs(self) -> dict[str, Any]:
        """{}: transformer_lens' default processing, as in Apollo's training. Checks first
        (before the model loads) that the run is cached or WANDB_API_KEY is set. Not in the
        constructor: ``python -m saeravel.prefetch`` builds sources to list what is missing."""
        if self._cached(self.run_dir()) is None:
            self._check_key()
        return {}

    def _check_key(self) -> None:
        if has_wandb_credentials():
            return
        route = self.no_key_route()
        alt = (
            f"; set it, or use the same SAEs through sae_lens without a key: {route}"
            if route
            else ""
        )
        raise UserError(
            f"{self.family}: the SAE is read from wandb run {self.project}/{self.run_id()}, "
            f"which needs WANDB_API_KEY (or `wandb login`) even for public runs{alt}"
        )

    def no_key_route(self) -> str | None:
        """The overrides that load the same SAEs through sae_lens (``sae.sae_lens_release``),
        with the model its catalogue entry names, as ``sae=apollo_e2e`` selects it: ``sae=sae_lens
        sae.release=gpt2-small-res_sle-ajt model=gpt2-small``; None without a release."""
        if not self.sae_lens_release:
            return None
        from saeravel.saes.sae_lens import release_model

        model = release_model(self.sae_lens_release)
        return f"sae=sae_lens sae.release={self.sae_lens_release}" + (
            f" model={model}" if model else ""
        )

    def run_id(self) -> str:
        if self.layer not in self.run_ids:
            raise missing_layer(self.family, self.layer, self.run_ids)
        return self.run_ids[self.layer]

    def run_dir(self) -> Path:
        return self.cache_dir / "apollo" / self.run_id()

    def _cached(self, run_dir: Path) -> Path | None:
        marker = run_dir / self.MARKER
        if not marker.is_file():
            return None
        try:
            ckpt = run_dir / str(json.loads(marker.read_text())["checkpoint"])
        except (ValueError, KeyError, TypeError, OSError):
            log.warning("unreadable download marker %s; downloading again", marker)
            return None
        return ckpt if ckpt.is_file() else None

    def cached_checkpoint(self) -> Path | None:
        """The run's latest checkpoint if it is in the cache (no network), else None."""
        return self._cached(self.run_dir())

    def offline_needs(self, ctx: Any) -> list[Any]:
        """The run's config and latest checkpoint in ``cache_dir/apollo/<run>`` (fetching
        needs WANDB_API_KEY; with it, the wandb host is probed first)."""
        from saeravel.offline import Need

        run_path = f"{self.project}/{self.run_id()}"
        dest = self.run_dir()

        def check() -> list[Path]:
            ckpt = self.cached_checkpoint()
            if ckpt is None:
                hint = "" if has_wandb_credentials() else "; fetching it needs WANDB_API_KEY"
                raise UserError(f"not in the cache ({dest}){hint}")
            return [ckpt.parent]

        hosts = ()
        if has_wandb_credentials():  # without a key, fetch fails at once with the route
            hosts = (wandb_host(),)  # the host the installed client talks to
        return [
            Need(
                "apollo", run_path, f"wandb {run_path}", str(dest), check,
                lambda: [self.fetch().parent], hosts=hosts,
            )
        ]  # fmt: skip

    def fetch(self) -> Path:
        """Path of the latest checkpoint, downloading the run's files on first use."""
        run_dir = self.run_dir()
        cached = self._cached(run_dir)
        if cached is not None:
            return cached
        run_path = f"{self.project}/{self.run_id()}"
        self._check_key()
        import wandb
        import wandb.errors

        log.info("downloading Apollo SAE %s to %s", run_path, run_dir)
        try:
            run = wandb.Api().run(run_path)
            files = list(run.files())
            config = [f for f in files if Path(f.name).name == "final_config.yaml"]
            ckpts = [f for f in files if _checkpoint_step(f.name) is not None]
            if not ckpts:
                raise UserError(f"wandb run {run_path} has no samples_<N>.pt checkpoint")
            latest = max(ckpts, key=lambda f: _checkpoint_step(f.name))
            run_dir.mkdir(parents=True, exist_ok=True)
            for f in config[:1] + [latest]:
                stale = run_dir / f.name
                if stale.exists():  # left by an interrupted download (no marker)
                    stale.unlink()
                handle = f.download(root=str(run_dir), replace=False)
                if handle is not None and hasattr(handle, "close"):
                    handle.close()
        except (wandb.errors.Error, OSError, ValueError) as exc:
            raise UserError(f"could not download wandb run {run_path}: {exc}") from exc
        (run_dir / self.MARKER).write_text(
            json.dumps(
                {"project": self.project, "run_id": self.run_id(), "checkpoint": latest.name}
            )
        )
        return run_dir / latest.name

    def load(self, model: LoadedModel) -> SAE:
        """The SAE for this layer from the latest checkpoint of its run."""
        ckpt = self.fetch()
        try:
            state_dict = torch.load(ckpt, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for truncated / foreign files
            raise UserError(
                f"cannot read Apollo checkpoint {ckpt} ({first_line(exc)}); delete "
                f"{ckpt.parent} to download it again"
            ) from exc
        if not isinstance(state_dict, Mapping):
            raise UserError(f"Apollo checkpoint {ckpt} holds a {type(state_dict).__name__}")
        hook_name = self.hooks.get(self.layer)
        if hook_name is None:
            prefixes = sorted({k.split(".")[0] for k in state_dict})
            if len(prefixes) != 1:
                raise UserError(
                    f"{self.family}: no hook given for layer {self.layer} and the checkpoint "
                    f"holds several SAEs ({few(prefixes)}); set sae.hooks.{self.layer}"
                )
            hook_name = prefixes[0].replace("-", ".")
        extra: dict[str, Any] = {"layer": self.layer, "checkpoint": ckpt.name}
        neuronpedia_id = None
        if self.sae_lens_release:
            from saeravel.saes.sae_lens import hook_neuronpedia_id

            neuronpedia_id = hook_neuronpedia_id(self.sae_lens_release, hook_name)
            extra["sae_lens_release"] = self.sae_lens_release  # where the Neuronpedia id is from
        config_path = ckpt.parent / "final_config.yaml"
        if config_path.is_file():
            import yaml

            config = yaml.safe_load(config_path.read_text()) or {}
            extra["tlens_model_name"] = config.get("tlens_model_name")
        identity = SAEIdentity(
            family=self.family,
            release=self.project,
            sae_id=self.run_id(),
            path=str(ckpt),
            extra=extra,
            neuronpedia_id=neuronpedia_id,
        )
        return from_apollo_state_dict(state_dict, hook_name, identity)
