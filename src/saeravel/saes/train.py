"""``sae=trained``: an SAE trained here on the chosen model's activations, cached on disk.

On the embedded model the training text is the city world's fact chains and a fraction
(``entity_weight``) of every batch is taken at city tokens, the site RAVEL intervenes on;
on a pretrained model it is text from a Hugging Face dataset (needs the dataset cached).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from saeravel.errors import UserError, choose
from saeravel.models import LoadedModel
from saeravel.results import atomic_torch_save, atomic_write_json
from saeravel.saes.base import SAE, SAEIdentity, resid_post_hook

log = logging.getLogger(__name__)
FORMAT_VERSION = 2


@torch.no_grad()
def embedded_activations(
    model: LoadedModel, layer: int, n_sequences: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations at every real token and at city tokens of the embedded model's text."""
    from saeravel.tiny_lm import encode_batch, sample_sequence

    world = model.world
    rng = random.Random(seed)
    attrs = list(world.templates)
    hook = resid_post_hook(layer)
    cities = set(world.entities)
    all_acts, ent_acts = [], []
    device = next(model.model.parameters()).device
    for i in range(0, n_sequences, 128):
        texts = [sample_sequence(world, attrs, 6, rng) for _ in range(min(128, n_sequences - i))]
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


@torch.no_grad()
def hf_activations(model: LoadedModel, layer: int, n_tokens: int, dataset: str) -> torch.Tensor:
    """Activations on text from a Hugging Face dataset (context 128, BOS excluded)."""
    try:
        from datasets import load_dataset

        ds = load_dataset(dataset, split="train", streaming=True)
    except Exception as exc:  # datasets raises many types when offline
        raise UserError(
            f"dataset {dataset!r} for SAE training is not available offline ({type(exc).__name__}); "
            "download it on a machine with a network first"
        ) from exc
    hook = resid_post_hook(layer)
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


class TrainedSource:
    """SAE source that trains (or loads from the cache) an SAE on the model at ``layer``."""

    def __init__(
        self,
        family: str,
        layer: int,
        architecture: str = "topk",
        k: int = 16,
        expansion: int = 8,
        l1_coefficient: float = 5.0,
        steps: int = 3000,
        batch_size: int = 256,
        lr: float = 1e-3,
        positions: str = "all",
        entity_weight: float = 0.5,
        seed: int = 0,
        cache_dir: str = ".cache",
        n_sequences: int = 3000,
        dataset: str = "Skylion007/openwebtext",
    ) -> None:
        choose("SAE architecture", architecture, ["topk", "relu"])
        choose("SAE positions", positions, ["all"])
        self.family = family
        self.layer = layer
        self.hparams = {
            "architecture": architecture,
            "k": k,
            "expansion": expansion,
            "l1_coefficient": l1_coefficient,
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "positions": positions,
            "entity_weight": entity_weight,
            "seed": seed,
            "n_sequences": n_sequences,
            "dataset": dataset,
        }
        self.cache_dir = Path(cache_dir)

    def required_model_kwargs(self) -> dict[str, Any]:
        """Trained on the model as loaded: no requirement."""
        return {}

    def _folder(self, model: LoadedModel) -> Path:
        model_key = model.info.get("cache_folder_key") or json.dumps(
            model.processing, sort_keys=True
        )
        blob = json.dumps(
            {
                "v": FORMAT_VERSION,
                "model": model.name,
                "mk": model_key,
                "layer": self.layer,
                **self.hparams,
            },
            sort_keys=True,
        )
        key = hashlib.sha256(blob.encode()).hexdigest()[:12]
        return self.cache_dir / "saes" / f"{model.name}-L{self.layer}-{key}"

    def load(self, model: LoadedModel) -> SAE:
        """Load from the cache, or train and cache."""
        folder = self._folder(model)
        hook = resid_post_hook(self.layer)
        if not (folder / "sae.pt").exists():
            from saeravel.results import file_lock

            with file_lock(folder.parent / f"{folder.name}.lock"):  # one trainer per cache
                if not (folder / "sae.pt").exists():
                    self._train(model, folder)
        meta = json.loads((folder / "meta.json").read_text())
        w = torch.load(folder / "sae.pt", map_location="cpu")
        ident = SAEIdentity(
            family=self.family, path=str(folder), extra={"trained": meta["metrics"]}
        )
        sae = SAE(
            w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"],
            activation=self.hparams["architecture"], k=self.hparams["k"],
            apply_b_dec_to_input=True, hook_name=hook, identity=ident,
            cfg_dict={"training": self.hparams, "train_metrics": meta["metrics"]},
        )  # fmt: skip
        return sae

    def _train(self, model: LoadedModel, folder: Path) -> None:
        h = self.hparams
        if model.world is not None:
            acts, ent = embedded_activations(model, self.layer, h["n_sequences"], h["seed"])
        else:
            acts = hf_activations(model, self.layer, h["n_sequences"] * 64, h["dataset"])
            ent = None
        d_sae = h["expansion"] * acts.shape[1]
        log.info(
            "training a %s SAE (d_sae %d) on %d activations at layer %d",
            h["architecture"],
            d_sae,
            len(acts),
            self.layer,
        )
        w = train_sae(
            acts, ent, d_sae=d_sae, architecture=h["architecture"], k=h["k"],
            l1_coefficient=h["l1_coefficient"], steps=h["steps"], batch_size=h["batch_size"],
            lr=h["lr"], entity_weight=h["entity_weight"], seed=h["seed"],
        )  # fmt: skip
        sae = SAE(
            w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], activation=h["architecture"],
            k=h["k"], hook_name=resid_post_hook(self.layer), identity=SAEIdentity(self.family),
        )  # fmt: skip
        with torch.no_grad():
            l0 = float((sae.encode(acts) > 0).float().sum(-1).mean())
            alive = float((sae.encode(acts[:20000]) > 0).any(0).float().mean())
        metrics = {
            "explained_variance": explained_variance(sae, acts),
            "explained_variance_entity": explained_variance(sae, ent)
            if ent is not None and len(ent)
            else None,
            "l0": l0,
            "frac_alive": alive,
            "n_train_activations": len(acts),
        }
        log.info("trained SAE: %s", metrics)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / "meta.json", {"hparams": h, "metrics": metrics})
        atomic_torch_save(folder / "sae.pt", w)  # last: marks it complete
