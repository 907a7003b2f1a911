"""``sae=custom``: any object with ``encode``/``decode``, built by Hydra's ``_target_``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from saeravel.errors import UserError, check_code_target
from saeravel.models import LoadedModel
from saeravel.saes.base import SAE, CustomSAE, SAEIdentity
from saeravel.saes.source import SAESource
from saeravel.saes.util import first_line, jsonable, plain, site_name


def import_object(path: str) -> Any:
    """The object at dotted ``path`` (``pkg.module.Class``), or a one-line :class:`UserError`
    naming the part that is missing (Hydra's ``get_object`` logs several lines instead)."""
    import importlib

    parts = path.split(".")
    if not all(p.isidentifier() for p in parts):
        raise UserError(f"custom SAE target {path!r} is not a dotted import path")
    module, error = None, None
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and not name.startswith(exc.name):
                error = exc  # the module exists but itself imports something missing
                break
            continue
        except Exception as exc:  # the user's module raised on import
            error = exc
            break
        obj = module
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                raise UserError(
                    f"custom SAE target {path!r} cannot be imported: {name} has no {attr!r}"
                )
            obj = getattr(obj, attr)
        return obj
    if error is not None:
        raise UserError(
            f"custom SAE target {path!r} cannot be imported ({first_line(error)})"
        ) from None
    raise UserError(f"custom SAE target {path!r} cannot be imported: no module named {parts[0]!r}")


class CustomSource(SAESource):
    """Any object with ``encode``/``decode``, built by Hydra's own ``_target_`` from the
    ``sae.object`` node (``sae.object._target_=mypkg.saes.MySAE +sae.object.d_sae=4096``; nested
    ``_target_``s, ``_args_`` and ``_partial_`` work as anywhere in Hydra) and wrapped in
    :class:`CustomSAE`.

    The target is imported in the constructor; the object is built and probed with a zero
    input of width ``d_in`` by :meth:`required_model_kwargs`, i.e. before the model loads.
    (``sae=custom``'s schema sets ``_recursive_: false``, so Hydra hands the node to this source
    instead of building the user's object before these checks.)
    """

    def __init__(
        self,
        family: str,
        layer: int,
        object: Mapping[str, Any] | None = None,  # noqa: A002 (the config key)
        hook_name: str = "",
        d_in: int = 0,
        allow_factory: bool = False,  # see saeravel.errors.check_code_target
        site: str = "resid_post",
    ) -> None:
        self.family = family
        self.layer = int(layer)
        self.site = site_name(site)  # hook_name must be this site (checked once loaded)
        self.object = dict(plain(object) or {})
        self.target = str(self.object.get("_target_") or "").strip()
        self.kwargs = {k: v for k, v in self.object.items() if k != "_target_"}
        self.hook_name = hook_name
        self.d_in = int(d_in)
        if not self.target:
            raise UserError(
                "sae=custom needs sae.object._target_, the import path of a class or factory "
                "(e.g. sae.object._target_=mypkg.saes.MySAE)"
            )
        self.object["_target_"] = self.target
        if self.d_in < 1:
            raise UserError(f"sae.d_in={self.d_in}: the custom SAE's input width must be >= 1")
        check_code_target(import_object(self.target), self.target, self.kwargs, allow_factory)
        self._sae: CustomSAE | None = None

    def _build(self) -> CustomSAE:
        from hydra.errors import InstantiationException

        from saeravel.errors import instantiate

        if self._sae is not None:
            return self._sae
        try:
            obj = instantiate(self.object)
        except InstantiationException as exc:  # the user's constructor raised
            raise UserError(
                f"custom SAE {self.target}(**{self.kwargs}) raised "
                f"{first_line(exc.__cause__ or exc)}"
            ) from None
        for name in ("encode", "decode"):
            if not callable(getattr(obj, name, None)):
                raise UserError(
                    f"custom SAE {self.target} built a {type(obj).__name__}, which has no "
                    f"callable {name}(); it needs encode(x) -> latents and decode(latents) -> x"
                )
        with torch.no_grad():
            try:
                f = obj.encode(torch.zeros(1, self.d_in))
                x_hat = obj.decode(f)
            except Exception as exc:
                raise UserError(
                    f"custom SAE {self.target}: encode/decode of a zero input of width "
                    f"sae.d_in={self.d_in} failed ({first_line(exc)}); is d_in its input width?"
                ) from None
        for name, out in (("encode", f), ("decode", x_hat)):
            if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1:
                got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise UserError(
                    f"custom SAE {self.target}: {name} of a [1, {self.d_in}] input returned "
                    f"{got}, expected a [1, width] tensor"
                )
        if x_hat.shape[-1] != self.d_in:
            raise UserError(
                f"custom SAE {self.target}: decode returns width {x_hat.shape[-1]} but "
                f"sae.d_in={self.d_in}"
            )
        identity = SAEIdentity(
            family=self.family, extra={"target": self.target, "kwargs": jsonable(self.kwargs)}
        )
        self._sae = CustomSAE(obj, d_in=self.d_in, hook_name=self.hook_name, identity=identity)
        return self._sae

    def offline_needs(self, ctx: Any) -> list[Any]:
        """Nothing to fetch: user code builds it."""
        from saeravel.offline import Skip

        why = f"built by user code ({self.target}), nothing to download"
        return [Skip(f"sae={self.family}", why)]

    def known_d_in(self) -> int:
        """``sae.d_in`` (probed against the object by :meth:`required_model_kwargs`)."""
        return self.d_in

    def required_model_kwargs(self) -> dict[str, Any]:
        """{}: nothing is known about a custom SAE's training (TL defaults). Builds and
        probes the object first, so its errors come before the model loads."""
        self._build()
        return {}

    def load(self, model: LoadedModel) -> SAE:
        """Build the user's object (once) and adapt it."""
        sae = self._build()
        self._sae = None
        return sae
