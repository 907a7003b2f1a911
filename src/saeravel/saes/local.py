"""``sae=local``: an SAE on disk, a saved sae_lens folder or an OpenAI state dict file."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from saeravel.errors import UserError, choose
from saeravel.models import LoadedModel
from saeravel.saes.base import SAE, SAEIdentity
from saeravel.saes.formats import (
    KWARGS_WARNING,
    check_openai_state_dict,
    check_sae_lens_folder,
    from_openai_state_dict,
    from_sae_lens,
    sae_lens_model_kwargs,
    torch_load_state_dict,
)
from saeravel.saes.source import SAESource
from saeravel.saes.util import first_line, site_name

log = logging.getLogger(__name__)


class LocalSource(SAESource):
    """An SAE on disk: a saved sae_lens directory or an OpenAI ``sparse_autoencoder`` file.

    ``format=auto``: a directory is read as sae_lens (``cfg.json`` +
    ``sae_weights.safetensors``, as written by ``save_model``), a file as an OpenAI state dict.
    OpenAI files do not record their hook, so ``hook_name`` is required for them.

    The file's own problems (missing, unreadable, truncated, wrong keys or shapes) are
    checked first (:meth:`check`, the first step of :meth:`required_model_kwargs`, which the
    pipeline calls before the model loads), before the weight processing the SAE needs and
    long before any model/SAE compatibility check.
    """

    FORMATS = ("auto", "sae_lens", "openai")

    def __init__(
        self,
        family: str,
        layer: int,
        path: str,
        format: str = "auto",
        hook_name: str | None = None,
        site: str = "resid_post",
    ) -> None:
        choose("local SAE format", format, self.FORMATS)
        self.family = family
        self.layer = int(layer)
        self.site = site_name(site)  # the file's hook must be this site (checked once loaded)
        if not str(path or "").strip():
            raise UserError("sae.path is empty; give a saved sae_lens folder or an OpenAI .pt")
        self.path = Path(path).expanduser()
        self.format = format
        self.hook_name = hook_name
        self._sae: Any = None
        self._state_dict: Any = None
        self._checked = False
        self._d_in: int | None = None

    def resolved_format(self) -> str:
        if not self.path.exists():
            raise UserError(f"local SAE path {self.path} does not exist")
        if self.format != "auto":
            return self.format
        return "sae_lens" if self.path.is_dir() else "openai"

    def check(self) -> None:
        """The file's own problems, as one-line :class:`UserError` s (reads OpenAI files and
        sae_lens headers once; the weights are kept for :meth:`load`). The first step of
        :meth:`required_model_kwargs` and :meth:`load`; not run by the constructor, so that
        ``python -m saeravel.prefetch`` can list a job whose file is not on this machine."""
        if self._checked:
            return
        fmt = self.resolved_format()
        if fmt == "sae_lens":
            if not self.path.is_dir():
                hint = (
                    f"; give its folder, {self.path.parent}"
                    if self.path.name in ("cfg.json", "sae_weights.safetensors")
                    else ""
                )
                raise UserError(
                    f"{self.path} is a file; a saved sae_lens SAE is a folder holding cfg.json "
                    f"and sae_weights.safetensors{hint}"
                )
            self._d_in = int(check_sae_lens_folder(self.path)["d_in"])
            self._checked = True
            return
        if self.path.is_dir():
            raise UserError(
                f"{self.path} is a folder; format=openai needs an OpenAI sparse_autoencoder .pt "
                "file (a saved sae_lens SAE is read with format=sae_lens or auto)"
            )
        if self.path.suffix == ".safetensors" or self.path.name == "cfg.json":
            raise UserError(
                f"{self.path} looks like part of a saved sae_lens SAE; set sae.path to its "
                f"folder {self.path.parent}"
            )
        state_dict = torch_load_state_dict(self.path)
        check_openai_state_dict(self.path, state_dict)
        if not self.hook_name:
            raise UserError(
                f"{self.path}: OpenAI SAE files do not record their hook; set sae.hook_name "
                "(e.g. sae.hook_name=blocks.5.hook_resid_post)"
            )
        self._state_dict = state_dict
        self._d_in = int(state_dict["encoder.weight"].shape[1])
        self._checked = True

    def offline_needs(self, ctx: Any) -> list[Any]:
        """Nothing to fetch: it is read from disk at run time."""
        from saeravel.offline import Skip

        where = "" if self.path.exists() else " (it does not exist here)"
        return [Skip(f"sae={self.family}", f"read from disk at run time: {self.path}{where}")]

    def known_d_in(self) -> int | None:
        """The SAE's input width from its file (after :meth:`check`), else None."""
        return self._d_in

    def _sae_lens(self) -> Any:
        if self._sae is None:
            from sae_lens import SAE as SaeLensSAE

            log.info("loading sae_lens SAE from %s", self.path)
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=KWARGS_WARNING)
                    self._sae = SaeLensSAE.load_from_disk(self.path, device="cpu")
            except Exception as exc:  # anything the header checks above did not catch
                raise UserError(
                    f"sae_lens cannot load the SAE in {self.path} ({first_line(exc)})"
                ) from None
        return self._sae

    def required_model_kwargs(self) -> dict[str, Any]:
        """sae_lens: the saved ``model_from_pretrained_kwargs``. OpenAI: no centring of the
        writing weights (OpenAI's README loads GPT-2 with ``center_writing_weights=False``).
        The file's own problems are reported first (:meth:`check`)."""
        self.check()
        if self.resolved_format() == "sae_lens":
            return sae_lens_model_kwargs(self._sae_lens())
        return {"center_writing_weights": False}

    def load(self, model: LoadedModel) -> SAE:
        """The SAE in the common interface."""
        self.check()
        fmt = self.resolved_format()
        identity = SAEIdentity(
            family=self.family, path=str(self.path), extra={"format": fmt, "layer": self.layer}
        )
        if fmt == "sae_lens":
            sae_lens_sae = self._sae_lens()
            saved_hook = sae_lens_sae.cfg.metadata.hook_name
            if self.hook_name and saved_hook and self.hook_name != saved_hook:
                raise UserError(
                    f"{self.path} was trained on {saved_hook} but sae.hook_name={self.hook_name}"
                )
            if self.hook_name and not saved_hook:
                sae_lens_sae.cfg.metadata.hook_name = self.hook_name
            sae = from_sae_lens(sae_lens_sae, identity)
            self._sae = None
            return sae
        state_dict = (
            self._state_dict if self._state_dict is not None else torch_load_state_dict(self.path)
        )
        check_openai_state_dict(self.path, state_dict)
        self._state_dict, self._checked = None, False
        assert self.hook_name  # checked in check()
        return from_openai_state_dict(state_dict, self.hook_name, identity)
