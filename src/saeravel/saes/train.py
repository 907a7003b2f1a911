"""Training an SAE on a model's activations (for ``sae=trained``, :mod:`saeravel.saes.trained`).

On the embedded model the training text is the city world's fact chains over the attributes
the model was trained on (``model.attributes``; the world's other templates, e.g. Timezone,
are text it never learned) and a fraction (``entity_weight``) of every batch is taken at city
tokens, the site RAVEL intervenes on;
on a pretrained model it is text from a Hugging Face dataset (needs the dataset cached).
"""

from __future__ import annotations

import logging
import random

import torch
from tqdm.auto import tqdm

from saeravel.cache import deterministic_torch
from saeravel.errors import UserError
from saeravel.models import LoadedModel
from saeravel.saes.base import SAE

log = logging.getLogger(__name__)


@torch.no_grad()
def embedded_activations(
    model: LoadedModel, hook: str, n_sequences: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations at ``hook`` at every real token and at city tokens of the embedded
    model's text."""
    from saeravel.tiny_lm import encode_batch

    world = model.world
    cities = set(world.entities)
    all_acts, ent_acts = [], []
    device = next(model.model.parameters()).device
    corpus = embedded_texts(model, n_sequences, seed)
    for i in range(0, n_sequences, 128):
        texts = corpus[i : i + 128]
        toks, mask = encode_batch(model.tokenizer, texts, str(device))
        _, cache = model.model.run_with_cache(toks, names_filter=hook)
        acts = cache[hook]
        mask[:, 0] = False  # BOS is not text
        all_acts.append(acts[mask].cpu())
        words = [["<bos>"] + t.split() for t in texts]
        ent = torch.zeros_like(mask)
        for r, ws in enumerate(words):
            for c, w in enumerate(ws):
                if w in cities:
                    ent[r, c] = True
        ent_acts.append(acts[ent].cpu())
    return torch.cat(all_acts), torch.cat(ent_acts)


def embedded_texts(model: LoadedModel, n_sequences: int, seed: int) -> list[str]:
    """``n_sequences`` chains of 6 fact sentences of the embedded world, over the attributes
    the model was trained on (``info["attributes"]``; all of the world's when unrecorded)."""
    from saeravel.tiny_lm import sample_sequence

    world = model.world
    attrs = [a for a in model.info.get("attributes") or world.templates if a in world.templates]
    rng = random.Random(seed)
    return [sample_sequence(world, attrs, 6, rng) for _ in range(n_sequences)]


@torch.no_grad()
def hf_activations(model: LoadedModel, hook: str, n_tokens: int, dataset: str) -> torch.Tensor:
    """Activations at ``hook`` on text from a Hugging Face dataset (context 128, BOS
    excluded)."""
    try:
        from datasets import load_dataset

        ds = load_dataset(dataset, split="train", streaming=True)
    except Exception as exc:  # datasets raises many types when offline
        raise UserError(
            f"dataset {dataset!r} for SAE training is not available offline ({type(exc).__name__}); "
            "download it on a machine with a network first"
        ) from exc
    out, total = [], 0
    for row in ds:
        toks = model.model.to_tokens(row["text"])[:, :128]
        _, cache = model.model.run_with_cache(toks, names_filter=hook)
        acts = cache[hook][0, 1:].cpu()
        out.append(acts)
        total += len(acts)
        if total >= n_tokens:
            break
    return torch.cat(out)[:n_tokens]


@deterministic_torch()  # bit-reproducible on one machine (same thread count)
def train_sae(
    acts: torch.Tensor,
    ent_acts: torch.Tensor | None,
    *,
    d_sae: int,
    architecture: str,
    k: int,
    l1_coefficient: float,
    steps: int,
    batch_size: int,
    lr: float,
    entity_weight: float,
    seed: int,
) -> dict[str, torch.Tensor]:
    """Adam on normalised MSE (+ L1 for relu), unit-norm decoder rows; returns the weights."""
    gen = torch.Generator().manual_seed(seed)
    d_in = acts.shape[1]
    W_dec = torch.randn(d_sae, d_in, generator=gen)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    params = {
        "W_enc": torch.nn.Parameter(W_dec.T.clone()),
        "b_enc": torch.nn.Parameter(torch.zeros(d_sae)),
        "W_dec": torch.nn.Parameter(W_dec),
        "b_dec": torch.nn.Parameter(acts.mean(0).clone()),
    }
    opt = torch.optim.Adam(params.values(), lr=lr)
    scale = (acts - acts.mean(0)).pow(2).sum(-1).mean()
    n_ent = int(batch_size * entity_weight) if ent_acts is not None and len(ent_acts) else 0
    for step in tqdm(range(steps), desc="training SAE", leave=False):
        idx = torch.randint(len(acts), (batch_size - n_ent,), generator=gen)
        x = acts[idx]
        if n_ent:
            x = torch.cat([x, ent_acts[torch.randint(len(ent_acts), (n_ent,), generator=gen)]])
        pre = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
        if architecture == "topk":
            vals, ind = pre.topk(k, dim=-1)
            f = torch.zeros_like(pre).scatter(-1, ind, torch.relu(vals))
        else:
            f = torch.relu(pre)
        x_hat = f @ params["W_dec"] + params["b_dec"]
        loss = (x - x_hat).pow(2).sum(-1).mean() / scale
        if architecture == "relu":
            frac = min(1.0, (step + 1) / (0.05 * steps))  # L1 warm-up
            loss = (
                loss
                + frac * l1_coefficient * (f * params["W_dec"].norm(dim=1)).sum(-1).mean() / d_in
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            params["W_dec"] /= params["W_dec"].norm(dim=1, keepdim=True)
    return {name: p.detach() for name, p in params.items()}


def explained_variance(sae: SAE, x: torch.Tensor) -> float:
    """1 - E||x - x_hat||^2 / E||x - E x||^2."""
    with torch.no_grad():
        err = (x - sae.reconstruct(x)).pow(2).sum(-1).mean()
        var = (x - x.mean(0)).pow(2).sum(-1).mean()
    return float(1 - err / var)
