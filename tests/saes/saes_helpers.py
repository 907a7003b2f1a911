"""Shared by the SAE source tests: tiny sae_lens SAEs and file writers.

No network: sae_lens SAEs are built in-process, OpenAI and Apollo files are written to
``tmp_path`` in their real formats.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sae_lens
import torch
from omegaconf import OmegaConf
from sae_lens.saes.sae import SAEMetadata

from saeravel.saes.base import SAE, SAEIdentity
from saeravel.saes.custom import CustomSource

ROOT = Path(__file__).resolve().parents[2]
CONF_SAE = ROOT / "conf" / "sae"
D_IN, D_SAE, K = 64, 128, 8
HOOK = "blocks.3.hook_resid_post"
ATOL = 1e-5
IDENT = SAEIdentity(family="test")


def make_sae_lens(arch: str, *, seed: int = 0, meta: dict[str, Any] | None = None, **cfg: Any):
    """An sae_lens inference SAE with random weights (and thresholds of both signs)."""
    classes = {
        "standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig),
        "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig),
        "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig),
    }
    sae_cls, cfg_cls = classes[arch]
    if arch == "topk":
        cfg.setdefault("k", K)
    metadata = SAEMetadata(hook_name=HOOK, **(meta or {}))
    sae = sae_cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, metadata=metadata, **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D_IN, D_SAE, generator=g) / D_IN**0.5)
        sae.b_enc.copy_(0.3 * torch.randn(D_SAE, generator=g))
        sae.W_dec.copy_(torch.randn(D_SAE, D_IN, generator=g) * 0.5)
        sae.b_dec.copy_(0.2 * torch.randn(D_IN, generator=g))
        if arch == "jumprelu":
            sae.threshold.copy_(torch.rand(D_SAE, generator=g) * 1.5 - 0.5)
    return sae


def inputs(n: int = 32, seed: int = 1, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=g) * scale + shift


def assert_matches_sae_lens(ours: SAE, theirs: Any, x: torch.Tensor) -> torch.Tensor:
    """Latents and reconstruction equal sae_lens' own encode/decode; returns the latents."""
    with torch.no_grad():
        f_ref = theirs.encode(x)
        x_ref = theirs.decode(f_ref)  # decode right after encode: sae_lens keeps LN stats
        f = ours.encode(x)
        x_hat = ours.reconstruct(x)
    torch.testing.assert_close(f, f_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(x_hat, x_ref, atol=ATOL, rtol=0)
    active = (f != 0).float().sum(-1)
    assert 0 < active.mean() < D_SAE  # a sparse, non-trivial code: the test can fail
    return f


def sae_yamls() -> dict[str, Any]:
    return {p.stem: OmegaConf.load(p) for p in sorted(CONF_SAE.glob("*.yaml"))}


def openai_state_dict(activation: str, seed: int = 0, flat: bool = False) -> dict[str, Any]:
    """The keys and value types of OpenAI's ``Autoencoder.state_dict()``."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, Any] = {
        "pre_bias": 0.1 * torch.randn(D_IN, generator=g),
        "encoder.weight": torch.randn(D_SAE, D_IN, generator=g) / D_IN**0.5,
        "latent_bias": 0.1 * torch.randn(D_SAE, generator=g),
        "decoder.weight": torch.randn(D_IN, D_SAE, generator=g) * 3.0,
        "stats_last_nonzero": torch.zeros(D_SAE, dtype=torch.long),
        "latents_activation_frequency": torch.ones(D_SAE),
        "latents_mean_square": torch.zeros(D_SAE),
        "activation": activation,
    }
    if activation == "TopK":
        if flat:
            sd["activation_state_dict.k"] = K
            sd["activation_state_dict.postact_fn"] = "ReLU"
        else:
            sd["activation_state_dict"] = {"k": K, "postact_fn": "ReLU"}
    else:
        sd["activation_state_dict"] = {}
    return sd


BAD_TOY = """
import torch


class Boom:
    def __init__(self, **kwargs):
        raise ValueError("boom: no weights at /nowhere")

    def encode(self, x):
        return x

    def decode(self, f):
        return f


class Square:
    def __init__(self, d_in=128):
        self.W = torch.ones(d_in, 2 * d_in)

    def encode(self, x):
        return torch.relu(x @ self.W)

    def decode(self, f):
        return f @ self.W.T


class WrongWidth(Square):
    def decode(self, f):
        return (f @ self.W.T)[..., :3]


class NoDecode:
    def encode(self, x):
        return x
"""


def saved_sae_lens(folder: Path, **cfg: Any) -> Path:
    make_sae_lens("standard", **cfg).save_model(folder)
    return folder


def custom(target: str, d_in: int = 128, kwargs: dict[str, Any] | None = None) -> CustomSource:
    node = {"_target_": target, **(kwargs or {})}
    return CustomSource("custom", 1, node, "blocks.1.hook_resid_post", d_in)
