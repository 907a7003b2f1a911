"""The SAE source contract, and building a source from ``cfg.sae``.

What ``conf/sae/*.yaml`` instantiates (its schema's ``_target_``, one module per source under
:mod:`saeravel.saes`) is an :class:`SAESource`. The pipeline uses it in this order, so that
every problem of the SAE is one line before any model loads:

1. the constructor, with the schema's fields as keyword arguments: cheap checks (values, a
   layer the family lacks, an unknown id); no download and no file read, so that
   ``python -m saeravel.prefetch`` can build a source whose files are not here yet;
2. :meth:`SAESource.required_model_kwargs`, *before the model loads*: the weight processing
   the SAE was trained on (``{}`` = transformer_lens' defaults), after the source's own
   checks (a file's problems, a missing key, a custom object's probe);
3. :meth:`SAESource.known_d_in`, optional: the input width when already known then, checked
   against ``model.d_model`` before the model loads (None: unknown until :meth:`load`);
4. :meth:`SAESource.load`: the SAE in the one interface (:class:`~saeravel.saes.base.SAE`),
   or None for ``sae=none``.

:meth:`SAESource.offline_needs` is asked by ``python -m saeravel.prefetch`` only: what the job
needs from the network (``saeravel.offline.Need``) or why nothing (``Skip``).

sae_lens and wandb are imported lazily by the sources: importing sae_lens takes seconds, and
Hydra imports the source's module for every job that names it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from saeravel.errors import UserError
from saeravel.saes.util import first_line

if TYPE_CHECKING:
    from saeravel.models import LoadedModel
    from saeravel.saes.base import SAE


class SAESource(Protocol):
    """What every ``sae=`` option builds (see the module docstring for the order of calls).
    Sources subclass it to inherit the default :meth:`known_d_in`."""

    family: str  # recorded in every result
    layer: int  # the block whose ``site`` it reads
    site: str  # where in block ``layer`` it reads (``saeravel.hooks.SITES``; resid_post: the
    # residual after the block)

    def required_model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments the model must be loaded with (called before it loads), after
        the source's own checks as one-line :class:`~saeravel.errors.UserError` s."""
        ...

    def load(self, model: LoadedModel) -> SAE | None:
        """The SAE in the common interface (None: no SAE)."""
        ...

    def offline_needs(self, ctx: Any) -> list[Any]:
        """For ``python -m saeravel.prefetch``: the ``Need`` s to fetch, or a ``Skip`` saying
        why there is nothing."""
        ...

    def known_d_in(self) -> int | None:
        """The SAE's input width if known before the model loads (after
        :meth:`required_model_kwargs`), else None (the default)."""
        return None


class ModelOnlySource(SAESource):
    """A source built from the model alone (nothing to fetch, no model kwargs): ``sae=none``
    and ``sae=identity``. Subclasses set ``nothing_to_fetch`` (the prefetch line) and
    :meth:`load`."""

    nothing_to_fetch = "nothing to fetch"

    def __init__(self, family: str, layer: int = 0, site: str = "resid_post") -> None:
        from saeravel.saes.util import site_name

        self.family = family
        self.layer = int(layer)
        self.site = site_name(site)

    def required_model_kwargs(self) -> dict[str, Any]:
        """{}: the model as loaded (transformer_lens' defaults)."""
        return {}

    def offline_needs(self, ctx: Any) -> list[Any]:
        """A ``Skip``: nothing to fetch."""
        from saeravel.offline import Skip

        return [Skip(f"sae={self.family}", self.nothing_to_fetch)]


_FIELD_HINTS = {
    "path": "a saved sae_lens folder or an OpenAI sparse_autoencoder .pt file",
    "_target_": "the import path of a class or factory, e.g. sae.object._target_=mypkg.saes.MySAE",
    "hook_name": "the hook it reads, e.g. blocks.5.hook_resid_post",
    "d_in": "its input width, the model's d_model",
    "release": "an sae_lens release name or regex",
}


def _missing_keys(node: Any, prefix: str = "") -> list[str]:
    """The ``???`` keys under ``node``, as paths relative to it (``object._target_``)."""
    from omegaconf import DictConfig, OmegaConf

    out = []
    for key in node.keys():
        if OmegaConf.is_missing(node, key):
            out.append(f"{prefix}{key}")
        elif isinstance(value := node[key], DictConfig):
            out += _missing_keys(value, f"{prefix}{key}.")
    return out


def build_sae_source(cfg: Any) -> SAESource:
    """``saeravel.errors.instantiate(cfg.sae)`` with one-line errors: a required field not given
    (``???``) is named by its path with what it should be, a source constructor's
    :class:`UserError` is itself (``instantiate`` unwraps it), any other failure one line."""
    from hydra.errors import InstantiationException
    from omegaconf import OmegaConf

    from saeravel.errors import instantiate

    missing = sorted(_missing_keys(cfg))
    if missing:
        family = cfg.get("family", "?") if not OmegaConf.is_missing(cfg, "family") else "?"
        needs = "; ".join(
            f"sae.{k} ({_FIELD_HINTS.get(k.rsplit('.', 1)[-1], 'required')})" for k in missing
        )
        raise UserError(f"SAE {family} needs {needs}")
    try:
        return instantiate(cfg)
    except InstantiationException as exc:
        raise UserError(
            f"SAE {cfg.get('family', '?')}: {first_line(exc.__cause__ or exc, limit=300)}"
        ) from exc


def check_known_width(source: SAESource, model_name: str, d_model: int) -> None:
    """Before the model loads: an SAE whose input width is already known (a local file's
    header, a custom SAE's ``d_in``) must match the configured ``model.d_model``."""
    d_in = source.known_d_in()
    if d_in is not None and d_model and int(d_in) != int(d_model):
        where = f" ({source.path})" if getattr(source, "path", None) else ""
        raise UserError(
            f"SAE {source.family}{where} has d_in={d_in} but model {model_name} has "
            f"d_model={d_model}; pick an SAE trained on {model_name}"
        )
