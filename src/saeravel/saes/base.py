"""One SAE interface for every family.

Every loader returns an :class:`SAE` (or a :class:`CustomSAE` wrapping a user object).
The maths is explicit here instead of delegated to each library, because the RAVEL
intervention mixes latents of *two* inputs: layer-normalising SAEs (OpenAI v5) must then
normalise each input with its own statistics and decode with the base's. sae_lens keeps
those statistics as hidden state of the last ``encode`` call, which would silently use the
source's statistics for the base; here they are passed explicitly (:meth:`SAE.normalize`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

LN_EPS = 1e-5
ACTIVATIONS = ("relu", "topk", "jumprelu", "linear")


@dataclass
class SAEIdentity:
    """Where an SAE came from; recorded in every result."""

    family: str
    release: str | None = None
    sae_id: str | None = None
    path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # Neuronpedia's id of the SAE (sae_lens records one for most pretrained SAEs), for
    # looking its latents up on neuronpedia.org; None when unknown.
    neuronpedia_id: str | None = None


class SAE(nn.Module):
    """A dictionary ``x ≈ W_dec f(x) + b_dec`` with an explicit activation.

    Shapes: ``W_enc`` [d_in, d_sae], ``W_dec`` [d_sae, d_in]. ``activation`` is ``relu``,
    ``topk`` (top ``k`` pre-activations, then ReLU), ``jumprelu`` (``threshold``) or
    ``linear`` (the pre-activations themselves, signed: SAEBench's identity and PCA baselines).
    ``normalize="layer_norm"`` standardises each input vector, ``(x - mu) / (std + 1e-5)``
    with the unbiased std, before encoding and undoes it after decoding with ``* std + mu``
    (no eps: OpenAI's ``sparse_autoencoder`` and sae_lens both do this). ``apply_b_dec_to_input``
    subtracts ``b_dec`` before the encoder (OpenAI, sae_lens standard), Apollo's does not.
    """

    def __init__(
        self,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        W_dec: torch.Tensor,
        b_dec: torch.Tensor,
        *,
        activation: str = "relu",
        k: int | None = None,
        threshold: torch.Tensor | None = None,
        apply_b_dec_to_input: bool = True,
        normalize: str = "none",
        hook_name: str,
        identity: SAEIdentity,
        cfg_dict: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            valid = ", ".join(ACTIVATIONS)
            raise ValueError(f"unknown SAE activation {activation!r}; valid: {valid}")
        if activation == "topk" and not k:
            raise ValueError("a topk SAE needs k")
        if normalize not in ("none", "layer_norm"):
            raise ValueError(f"unknown normalize {normalize!r}; valid: none, layer_norm")
        d_in, d_sae = W_enc.shape
        if W_dec.shape != (d_sae, d_in):
            raise ValueError(f"W_dec has shape {tuple(W_dec.shape)}, expected {(d_sae, d_in)}")
        self.W_enc = nn.Parameter(W_enc.detach().clone(), requires_grad=False)
        self.b_enc = nn.Parameter(b_enc.detach().clone(), requires_grad=False)
        self.W_dec = nn.Parameter(W_dec.detach().clone(), requires_grad=False)
        self.b_dec = nn.Parameter(b_dec.detach().clone(), requires_grad=False)
        thr = threshold if threshold is not None else torch.zeros(d_sae)
        self.register_buffer("threshold", thr.detach().clone())
        self.activation = activation
        self.k = k
        self.apply_b_dec_to_input = apply_b_dec_to_input
        self.normalize_mode = normalize
        self.hook_name = hook_name
        self.identity = identity
        self.cfg_dict = dict(cfg_dict or {})
        self.cfg_dict.update(
            d_in=d_in,
            d_sae=d_sae,
            activation=activation,
            k=k,
            normalize_activations=normalize,
            apply_b_dec_to_input=apply_b_dec_to_input,
            hook_name=hook_name,
        )
        self.model_from_pretrained_kwargs: dict[str, Any] = {}

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    # -- normalisation, explicit so that two inputs can be mixed ---------------------------
    def normalize(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Return the SAE-space input and the (mean, std) needed to map back.

        The eps guards the division only; :meth:`denormalize` multiplies by the bare std,
        as OpenAI's ``sparse_autoencoder`` and sae_lens do.
        """
        if self.normalize_mode == "none":
            zero = x.new_zeros(x.shape[:-1] + (1,))
            return x, (zero, zero + 1.0)
        mu = x.mean(dim=-1, keepdim=True)
        centred = x - mu
        std = centred.std(dim=-1, keepdim=True)
        return centred / (std + LN_EPS), (mu, std)

    @staticmethod
    def denormalize(x: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        mu, std = stats
        return x * std + mu

    # -- the dictionary, in normalised space -----------------------------------------------
    def encode_normalized(self, x: torch.Tensor) -> torch.Tensor:
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        pre = x @ self.W_enc + self.b_enc
        if self.activation == "relu":
            return torch.relu(pre)
        if self.activation == "jumprelu":
            return pre * (pre > self.threshold)
        if self.activation == "linear":
            return pre
        vals, idx = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))

    def decode_normalized(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    # -- the usual interface: activations in, activations out ------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents of model activations ``x`` [..., d_in]."""
        return self.encode_normalized(self.normalize(x)[0])

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Reconstruction from latents, in normalised space for layer-norm SAEs (use
        :meth:`reconstruct` or ``denormalize`` for model-space output)."""
        return self.decode_normalized(f)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Model-space reconstruction of ``x``."""
        xn, stats = self.normalize(x)
        return self.denormalize(self.decode_normalized(self.encode_normalized(xn)), stats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reconstruct(x)


class CustomSAE(SAE):
    """Adapter for a user object with ``encode``/``decode`` (no normalisation of its own)."""

    def __init__(self, obj: Any, *, d_in: int, hook_name: str, identity: SAEIdentity) -> None:
        nn.Module.__init__(self)
        for name in ("encode", "decode"):
            if not callable(getattr(obj, name, None)):
                raise TypeError(f"custom SAE {type(obj).__name__} has no callable {name}()")
        self.obj = obj
        self.hook_name = hook_name
        self.identity = identity
        self.normalize_mode = "none"
        self._d_in = d_in
        with torch.no_grad():
            self._d_sae = int(obj.encode(torch.zeros(1, d_in)).shape[-1])
        self.cfg_dict = {"d_in": d_in, "d_sae": self._d_sae, "hook_name": hook_name}
        self.model_from_pretrained_kwargs = {}

    @property
    def d_in(self) -> int:
        return self._d_in

    @property
    def d_sae(self) -> int:
        return self._d_sae

    def encode_normalized(self, x: torch.Tensor) -> torch.Tensor:
        return self.obj.encode(x)

    def decode_normalized(self, f: torch.Tensor) -> torch.Tensor:
        return self.obj.decode(f)
