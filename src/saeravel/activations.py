"""Activation collection below the evals: an SAE's hook, counted (non-special) tokens, SAE
latents at a hook, and pooled text features.

Used by every eval and by the RAVEL interventions; it imports no eval. Hook names are built
and parsed in :mod:`saeravel.hooks`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from saeravel.errors import UserError
from saeravel.hooks import stop_layer

if TYPE_CHECKING:
    from saeravel.saes.base import SAE

SPECIAL_TOKEN_ATTRS = ("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id")


# ----------------------------------------------------------------------------- hooks


def sae_hook(sae: Any, default: str) -> str:
    """The SAE's own hook name (equal to the job's ``default`` up to resid_post/resid_pre
    naming), or ``default`` when the SAE names none."""
    return getattr(sae, "hook_name", None) or default


# ----------------------------------------------------------------------------- tokens


def special_token_ids(tokenizer: Any) -> list[int]:
    """The structural special-token ids of ``tokenizer`` (BOS, EOS, pad, sep)."""
    if tokenizer is None:
        return []
    ids = {getattr(tokenizer, attr, None) for attr in SPECIAL_TOKEN_ATTRS}
    return sorted(i for i in ids if i is not None)


def counted_mask(tokens: torch.Tensor, special_ids: Sequence[int]) -> torch.Tensor:
    """Boolean mask [batch, pos]: True where the token is not special."""
    mask = torch.ones_like(tokens, dtype=torch.bool)
    for tok in special_ids:
        mask &= tokens != tok
    return mask


# ----------------------------------------------------------------------------- activations


@torch.no_grad()
def hook_activations(model: Any, hook_name: str, tokens: torch.Tensor) -> torch.Tensor:
    """The activation at ``hook_name`` for ``tokens`` [batch, pos] (only the blocks needed)."""
    _, cache = model.run_with_cache(
        tokens, names_filter=[hook_name], stop_at_layer=stop_layer(hook_name)
    )
    return cache[hook_name]


def sae_dtype(sae: SAE, fallback: torch.dtype) -> torch.dtype:
    """The dtype of the SAE's parameters (``fallback`` for a parameterless SAE)."""
    param = next(iter(sae.parameters()), None)
    return param.dtype if param is not None else fallback


def encode_latents(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """``sae.encode(x)`` in the SAE's dtype."""
    return sae.encode(x.to(sae_dtype(sae, x.dtype)))


def latents_and_reconstruction(sae: SAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sae.encode(x), sae.reconstruct(x))`` with one encoder pass; ``x_hat`` is in model
    space (layer-norm SAEs are de-normalised with ``x``'s own statistics)."""
    xs = x.to(sae_dtype(sae, x.dtype))
    xn, stats = sae.normalize(xs)
    f = sae.encode_normalized(xn)
    x_hat = sae.denormalize(sae.decode_normalized(f), stats)
    return f, x_hat


@torch.no_grad()
def latent_firing_counts(
    model: Any,
    sae: SAE,
    hook_name: str,
    batches: Iterable[torch.Tensor],
    special_ids: Sequence[int] = (),
    *,
    desc: str = "latent frequencies",
    total: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Per latent, the number of counted tokens on which it is active (``> 0``), and the
    number of counted tokens."""
    counts = torch.zeros(sae.d_sae, dtype=torch.float64)
    n_tokens = 0
    device = model.cfg.device
    for tokens in tqdm(batches, desc=desc, total=total, unit="batch", leave=False):
        tokens = tokens.to(device)
        mask = counted_mask(tokens, special_ids)
        f = encode_latents(sae, hook_activations(model, hook_name, tokens))
        counts += ((f > 0) & mask[..., None]).sum((0, 1)).double().cpu()
        n_tokens += int(mask.sum())
    return counts, n_tokens


@torch.no_grad()
def pooled_text_features(
    model: Any,
    sae: SAE,
    hook_name: str,
    texts: Sequence[str],
    context_length: int,
    batch_size: int,
    model_space: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean over non-special tokens of the residual and of the per-token SAE latents.

    ``model_space=True`` multiplies each token's latents by its layer-norm std before pooling
    (a no-op for SAEs without input normalisation), so that ``latents @ W_dec`` is the pooled
    model-space contribution of the latents."""
    tok = model.tokenizer
    special = special_token_ids(tok)
    resid, lat = [], []
    for i in range(0, len(texts), batch_size):
        enc = tok(
            list(texts[i : i + batch_size]),
            padding="max_length",
            truncation=True,
            max_length=context_length,
            return_tensors="pt",
        )
        toks = enc["input_ids"].to(model.cfg.device)
        mask = counted_mask(toks, special)
        x = hook_activations(model, hook_name, toks)
        w = mask[..., None].float()
        n = w.sum(1).clamp_min(1.0)
        resid.append(((x.float() * w).sum(1) / n).cpu())
        f = sae.encode(x).float()
        if model_space:
            f = f * sae.normalize(x)[1][1].float()
        lat.append(((f * w).sum(1) / n).cpu())
    return torch.cat(resid).numpy(), torch.cat(lat).numpy()


# ----------------------------------------------------------------------------- decoder space


def require_decoder(sae: SAE | None, eval_name: str) -> np.ndarray:
    """``W_dec`` [d_sae, d_in] as float64, or a one-line error."""
    if sae is None:
        raise UserError(f"eval={eval_name} needs an SAE; choose one with sae=... (not sae=none)")
    w_dec = getattr(sae, "W_dec", None)
    if not isinstance(w_dec, torch.Tensor):
        raise UserError(
            f"eval={eval_name} needs an SAE with a decoder matrix W_dec; "
            f"{type(sae).__name__} ({sae.identity.family}) has none"
        )
    return w_dec.detach().float().cpu().numpy().astype(np.float64)


@torch.no_grad()
def model_space_latents(sae: SAE, resid: np.ndarray, latents: np.ndarray) -> np.ndarray:
    """Latents times the input's layer-norm std: the coefficients ``a`` with
    ``reconstruct(x) = a @ W_dec + (b_dec * std + mu)``."""
    std = sae.normalize(torch.as_tensor(resid, dtype=torch.float32))[1][1]
    return latents * std.numpy()
