"""The embedded default model: a small transformer_lens model trained here on city facts.

Why its first blocks are token-local: in a plain small transformer trained on these facts,
later positions copy the city's identity through attention already in block 0 and look the
facts up there, so swapping the residual at the city token changes nothing (measured 0% of
answers moved after every block in an earlier trial). Real LMs enrich the entity at its own
position first; we impose that by restricting the attention of blocks ``0..local_layers-1``
to the diagonal (a permanent hook on ``hook_attn_scores``). The residual after block
``local_layers-1`` at the city token then carries the city's facts, which
:func:`full_swap_cause` measures per layer. The restriction is part of the model's saved
config and is re-applied on load.

Why, by default, the blocks after those are attention-only (``readout_mlps=false``) and the
unembedding stays at its random initialisation (``freeze_unembed=true``): every fact here is
a function of the country, and a model free to shape everything from this one table learns a
compressed, nested code. Measured on the layer-1 residual of such a model (MLPs everywhere,
trained unembedding; held-out cities, equal-label pairs dropped): the Country information sits
in ~10 dimensions that also carry the continent, and swapping everything except the 5-dim
subspace spanned by the continent means moved the country answer in only 3% of pairs, so
no method could beat the 0.5 of doing nothing (DAS 0.43, neurons 0.39, SAE 0.44 over three
seeds). In a real LM the geometry of the answer tokens is set by the whole corpus, not by the
fact table, and facts looked up at the entity are read out by attention (Geva et al. 2023).
With both restrictions, on the first model trained, the same probe-subspace swap gives
disentangle 0.70 (Country) / 0.69 (Continent), and DAS 0.80 / 0.86, neurons 0.60 / 0.60;
with either one alone the probe swap stays at 0.45-0.47. How separable a given model is varies
with its training seed when the facts are nested, as the real ones are (continent and
language functions of the country): DAS 0.855 / 0.592 / 0.619 over three seeds. The default world
therefore draws every attribute but the country per city, apart from it, on its 48 most
populous countries (``model.independent_attributes``, ``model.n_countries``): 0.852 / 0.944 /
0.881 (docs/ravel.md, "Why the default world is not the real one"). Why the neuron and SAE
masks score lower than DAS here is measured, not assumed: under the paper's recipe the mask
training had not converged (loss still falling 7-10% per epoch, and a greedy bit-flip search
from the trained mask lowered its training CE and raised held-out disentangle by up to 0.07);
under the default recipe (``conf/eval/recipe/saeravel.yaml``) the loss flattens and the same
search gains at most ~0.015, so the gap between the masks and DAS is the methods' on this
model, not the optimiser's. Set both back to get the entangled model for comparison.

Training is bit-reproducible on one machine with the same thread count (two processes, any
``PYTHONHASHSEED``): it runs under :func:`saeravel.cache.deterministic_torch`, because the
multi-threaded CPU backward of the embedding lookup otherwise sums rows in a varying order.
Other machines or thread counts give other weights, which is why caches built on the model are
keyed by its weights' hash. The cache folder is validated on every load (checksums of
``model.pt`` and ``world.json`` in ``meta.json``, written last) and rebuilt when corrupt.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from saeravel.cache import (
    CorruptEntry,
    deterministic_torch,
    file_record,
    inside,
    load_or_build,
    read_json,
    torch_load,
    verify_files,
)
from saeravel.errors import UserError, choose
from saeravel.hooks import attn_scores, resid_post
from saeravel.models import LoadedModel, resolve_device
from saeravel.world import CityWorld, build_city_world

log = logging.getLogger(__name__)

SPECIALS = ["<pad>", "<bos>", "<unk>"]
# 4: deterministic training (saeravel.cache.deterministic_torch), checksums in meta.json
MODEL_FORMAT_VERSION = 4


# ----------------------------------------------------------------------------- tokenizer


def build_tokenizer(vocab_words: list[str]) -> Any:
    """A word-level fast tokenizer (split on whitespace only) with offsets, BOS and padding."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + sorted(set(vocab_words) - set(SPECIALS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<bos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="right",
        add_bos_token=True,  # transformer_lens then uses it as is (no hub round-trip)
        name_or_path="saeravel-tiny-city-lm",
    )


def world_vocabulary(world: CityWorld) -> list[str]:
    words: set[str] = set(world.entities)
    for attrs in world.entities.values():
        for v in attrs.values():
            words.update(v.split())
    for temps in world.templates.values():
        for t in temps:
            words.update(t.replace("%s", " ").split())
    words.add(".")
    return sorted(words)


# ----------------------------------------------------------------------------- model


def add_local_attention(model: Any, local_layers: int) -> None:
    """Make blocks ``0..local_layers-1`` attend only to their own position (permanent hooks)."""

    def diagonal_only(scores: torch.Tensor, hook: Any) -> torch.Tensor:
        q, k = scores.shape[-2], scores.shape[-1]
        qi = torch.arange(q, device=scores.device)[:, None] + (k - q)
        ki = torch.arange(k, device=scores.device)[None, :]
        return scores.masked_fill(qi != ki, float("-inf"))

    for layer in range(local_layers):
        model.add_hook(attn_scores(layer), diagonal_only, is_permanent=True)


def drop_readout_mlps(model: Any, local_layers: int) -> None:
    """Blocks ``local_layers..`` become attention-only: the facts are looked up by the MLPs of
    the token-local blocks at the city token and read out by attention, with no MLP after the
    lookup that could decode a compressed code (see the module docstring)."""
    for block in model.blocks[local_layers:]:
        block.cfg = copy.copy(block.cfg)
        block.cfg.attn_only = True
        del block.mlp, block.ln2
    model.setup()  # forget the removed hook points


def build_model(arch: dict[str, Any], tokenizer: Any, device: str = "cpu") -> Any:
    """An untrained HookedTransformer with the embedded architecture."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=arch["n_layers"],
        d_model=arch["d_model"],
        n_heads=arch["n_heads"],
        d_head=arch["d_model"] // arch["n_heads"],
        d_mlp=arch["d_mlp"],
        d_vocab=len(tokenizer),
        n_ctx=arch["n_ctx"],
        act_fn="gelu",
        normalization_type="LN",
        positional_embedding_type="standard",
        default_prepend_bos=True,
        seed=arch.get("seed", 0),
        device=device,
    )
    model = HookedTransformer(cfg, tokenizer=tokenizer, default_padding_side="right")
    if not arch.get("readout_mlps", True):
        drop_readout_mlps(model, arch["local_layers"])
    add_local_attention(model, arch["local_layers"])
    return model


# ----------------------------------------------------------------------------- data


def fact_sentence(world: CityWorld, city: str, attribute: str, template: str) -> str:
    return (template % city) + " " + world.entities[city][attribute] + " ."


def sample_sequence(
    world: CityWorld, attributes: list[str], n_facts: int, rng: random.Random
) -> str:
    cities = list(world.entities)
    parts = []
    for _ in range(n_facts):
        attr = rng.choice(attributes)
        parts.append(
            fact_sentence(world, rng.choice(cities), attr, rng.choice(world.templates[attr]))
        )
    return " ".join(parts)


def encode_batch(
    tokenizer: Any, texts: list[str], device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """BOS + tokens, right-padded; returns (tokens, attention mask)."""
    ids = [
        [tokenizer.bos_token_id] + tokenizer(t, add_special_tokens=False)["input_ids"]
        for t in texts
    ]
    width = max(map(len, ids))
    toks = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.bool)
    for i, row in enumerate(ids):
        toks[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = True
    return toks.to(device), mask.to(device)


@torch.no_grad()
def fact_accuracy(model: Any, world: CityWorld, attributes: list[str], device: str) -> float:
    """Next-token accuracy on the first token of every fact (every city, template, attribute)."""
    prompts, targets = [], []
    for city in world.entities:
        for attr in attributes:
            for t in world.templates[attr]:
                prompts.append(t % city)
                targets.append(
                    model.tokenizer.convert_tokens_to_ids(world.entities[city][attr].split()[0])
                )
    correct = 0
    for i in range(0, len(prompts), 256):
        toks, mask = encode_batch(model.tokenizer, prompts[i : i + 256], device)
        logits = model(toks)
        last = mask.sum(1) - 1
        pred = logits[torch.arange(len(toks)), last].argmax(-1).cpu()
        correct += (pred == torch.tensor(targets[i : i + 256])).sum().item()
    return correct / len(prompts)


@torch.no_grad()
def full_swap_cause(
    model: Any, world: CityWorld, attribute: str, layer: int, n_pairs: int = 200, seed: int = 0
) -> float:
    """Fraction of answers that move to the source city's value when the whole residual after
    block ``layer`` at the city token is swapped in from the source (same template)."""
    rng = random.Random(seed)
    cities = list(world.entities)
    pairs = []
    while len(pairs) < n_pairs:
        b, s = rng.sample(cities, 2)
        if world.entities[b][attribute] != world.entities[s][attribute]:
            pairs.append((b, s, rng.choice(world.templates[attribute])))
    device = next(model.parameters()).device
    hook = resid_post(layer)
    moved = 0
    for i in range(0, n_pairs, 100):
        chunk = pairs[i : i + 100]
        base = [t % b for b, _, t in chunk]
        src = [t % s for _, s, t in chunk]
        bt, bm = encode_batch(model.tokenizer, base, str(device))
        st, _ = encode_batch(model.tokenizer, src, str(device))
        pos = torch.tensor([1 + t.split().index("%s") for _, _, t in chunk], device=device)
        _, cache = model.run_with_cache(st, names_filter=hook)
        src_vec = cache[hook][torch.arange(len(chunk)), pos]

        def swap(resid: torch.Tensor, hook: Any, pos=pos, src_vec=src_vec) -> torch.Tensor:
            resid = resid.clone()
            resid[torch.arange(len(src_vec)), pos] = src_vec
            return resid

        logits = model.run_with_hooks(bt, fwd_hooks=[(hook, swap)])
        pred = logits[torch.arange(len(chunk)), bm.sum(1) - 1].argmax(-1).tolist()
        for (_, s, _), p in zip(chunk, pred, strict=True):
            want = model.tokenizer.convert_tokens_to_ids(world.entities[s][attribute].split()[0])
            moved += int(p == want)
    return moved / n_pairs


@deterministic_torch()  # bit-reproducible on one machine (same thread count)
def train_model(
    model: Any,
    world: CityWorld,
    attributes: list[str],
    steps: int,
    batch: int,
    n_facts: int,
    lr: float,
    seed: int,
    device: str,
    stop_at_accuracy: float | None = None,
    check_every: int = 100,
    freeze_unembed: bool = False,
) -> tuple[list[float], int]:
    """AdamW (warm-up, then constant) on chains of ``n_facts`` fact sentences (as long as a
    5-shot prompt), for at most ``steps`` steps; every ``check_every`` steps the fact accuracy
    is measured and training stops once it reaches ``stop_at_accuracy``. Memorising the facts
    is a sudden transition whose step varies with the seed, so a fixed budget with a decaying
    schedule either wastes time or stops short. With ``freeze_unembed`` the unembedding keeps
    its random initialisation (see the module docstring). Returns the loss curve and the
    steps taken. Bit-reproducible on one machine (same thread count): see
    :func:`saeravel.cache.deterministic_torch`."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    for p in model.unembed.parameters():
        p.requires_grad_(not freeze_unembed)
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01
    )
    warm = max(1, min(50, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    losses: list[float] = []
    city_ids = torch.tensor(
        model.tokenizer.convert_tokens_to_ids(list(world.entities)), device=device
    )
    value_words = sorted(
        {w for e in world.entities.values() for a in attributes for w in e[a].split()}
    )
    value_ids = torch.tensor(model.tokenizer.convert_tokens_to_ids(value_words), device=device)
    model.train()
    bar = tqdm(range(steps), desc="training tiny-city-lm", leave=False)
    for step in bar:
        texts = [sample_sequence(world, attributes, n_facts, rng) for _ in range(batch)]
        toks, mask = encode_batch(model.tokenizer, texts, device)
        logits = model(toks)
        logp = torch.log_softmax(logits[:, :-1], -1)
        tgt = toks[:, 1:]
        nll = -logp.gather(-1, tgt[..., None])[..., 0]
        # Cities are drawn at random, so predicting them is pure noise: leave them out. The
        # template words are learnt in a few steps; the facts (value words) carry the signal.
        m = (mask[:, 1:] & ~torch.isin(tgt, city_ids)).float()
        m = m * torch.where(torch.isin(tgt, value_ids), 1.0, 0.1)
        loss = (nll * m).sum() / m.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if stop_at_accuracy is not None and (step + 1) % check_every == 0:
            model.eval()
            acc = fact_accuracy(model, world, attributes, device)
            model.train()
            bar.set_postfix(fact_acc=f"{acc:.3f}")
            log.info("step %d: fact accuracy %.4f", step + 1, acc)
            if acc >= stop_at_accuracy:
                break
    model.eval()
    return losses, len(losses)


# ----------------------------------------------------------------------------- source


def check_embedded_config(**v: Any) -> None:
    """One-line :class:`UserError` for an embedded-model setting out of range (before any
    training starts)."""
    from saeravel.world import TEMPLATES

    for key in ("n_layers", "d_model", "n_heads", "d_mlp", "n_ctx", "n_cities", "train_steps",
                "train_batch", "facts_per_sequence", "batch_size"):  # fmt: skip
        if not isinstance(v[key], int) or v[key] < 1:
            raise UserError(f"model.{key}={v[key]} must be a positive integer")
    if v["d_model"] % v["n_heads"]:
        raise UserError(
            f"model.d_model={v['d_model']} must be a multiple of model.n_heads={v['n_heads']}"
        )
    if not 0 <= v["local_layers"] <= v["n_layers"]:
        raise UserError(
            f"model.local_layers={v['local_layers']} must be in 0..n_layers={v['n_layers']}"
        )
    if v["n_cities"] < 2:
        raise UserError(f"model.n_cities={v['n_cities']} must be at least 2")
    if not v["attributes"]:
        raise UserError(f"model.attributes is empty; valid: {', '.join(TEMPLATES)}")
    for attr in v["attributes"]:
        choose("model attribute", attr, list(TEMPLATES))
    if not v["lr"] > 0:
        raise UserError(f"model.lr={v['lr']} must be > 0")
    n_countries = v.get("n_countries")
    if n_countries is not None and (not isinstance(n_countries, int) or n_countries < 6):
        raise UserError(
            f"model.n_countries={n_countries} must be null (every country) or an integer >= 6 "
            "(an equal share per continent)"
        )
    for key in ("min_fact_accuracy", "stop_at_accuracy"):
        if not 0 <= v[key] <= 1:
            raise UserError(f"model.{key}={v[key]} must be in [0, 1]")


class EmbeddedModel:
    """Model source for ``model=tiny-city-lm``: loads from the cache or trains (~2 min)."""

    own_world = True  # the embedded city world: RAVEL data and SAE training text offline

    def __init__(
        self,
        name: str,
        n_layers: int,
        d_model: int,
        default_layer: int,
        n_heads: int,
        d_mlp: int,
        n_ctx: int,
        local_layers: int,
        n_cities: int,
        attributes: list[str],
        train_steps: int,
        train_batch: int,
        facts_per_sequence: int,
        lr: float,
        world_seed: int,
        train_seed: int,
        min_fact_accuracy: float,
        cache_dir: str,
        stop_at_accuracy: float = 0.98,
        readout_mlps: bool = True,
        freeze_unembed: bool = False,
        dtype: str = "float32",
        device: str = "auto",
        batch_size: int = 64,
        n_countries: int | None = None,
        independent_attributes: bool = False,
    ) -> None:
        check_embedded_config(
            n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_mlp=d_mlp, n_ctx=n_ctx,
            local_layers=local_layers, n_cities=n_cities, attributes=list(attributes),
            train_steps=train_steps, train_batch=train_batch,
            facts_per_sequence=facts_per_sequence, lr=lr, min_fact_accuracy=min_fact_accuracy,
            stop_at_accuracy=stop_at_accuracy, batch_size=batch_size, n_countries=n_countries,
        )  # fmt: skip
        self.name = name
        self.arch = {
            "n_layers": n_layers,
            "d_model": d_model,
            "n_heads": n_heads,
            "d_mlp": d_mlp,
            "n_ctx": n_ctx,
            "local_layers": local_layers,
            "readout_mlps": readout_mlps,
            "seed": train_seed,
        }
        self.train_cfg = {
            "n_cities": n_cities,
            "attributes": list(attributes),
            "steps": train_steps,
            "batch": train_batch,
            "n_facts": facts_per_sequence,
            "lr": lr,
            "world_seed": world_seed,
            "train_seed": train_seed,
            "stop_at_accuracy": stop_at_accuracy,
            "freeze_unembed": freeze_unembed,
        }
        if n_countries is not None:  # only when set: the default model's cache key is unchanged
            self.train_cfg["n_countries"] = n_countries
        if independent_attributes:  # likewise
            self.train_cfg["independent_attributes"] = True
        self.default_layer = default_layer
        self.min_fact_accuracy = min_fact_accuracy
        self.cache_dir = Path(cache_dir)
        self.device = resolve_device(device)

    def key(self) -> str:
        blob = json.dumps(
            {"v": MODEL_FORMAT_VERSION, "arch": self.arch, "train": self.train_cfg}, sort_keys=True
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def folder(self) -> Path:
        return inside(self.cache_dir, "models", f"{self.name}-{self.key()}")

    def offline_needs(self, ctx: Any) -> list[Any]:
        """Nothing to download; with ``ctx.train`` (``--train-embedded``) the trained model in
        its cache folder (``product`` is the loaded model, for the SAEs trained on it)."""
        from saeravel.offline import Need, Skip, once

        if not ctx.train:
            why = (
                "embedded: trained here on first use (~2 min on CPU) and cached, nothing to "
                "download (--train-embedded trains it now)"
            )
            return [Skip(f"model={self.name}", why)]
        dest = self.folder()

        def check() -> list[Path]:
            if not (dest / "meta.json").is_file():  # written last: marks it complete
                raise UserError(f"not trained yet ({dest})")
            return [dest]

        loaded = once(self.load)

        def fetch() -> list[Path]:
            loaded()  # trains it when it is not cached
            return [dest]

        return [
            Need(
                "train", f"model={self.name}", "", str(dest), check, fetch,
                label=f"model={self.name} (embedded)", product=loaded,
            )
        ]  # fmt: skip

    def load(self, sae_kwargs: dict[str, Any] | None = None) -> LoadedModel:
        """Load the cached model, training it first if it is not cached."""
        asked = {k: v for k, v in (sae_kwargs or {}).items() if v}  # False: "unprocessed", fine
        if asked:
            raise UserError(
                f"model {self.name} is trained here with no weight processing; an SAE asking for "
                f"{asked} was trained on another model"
            )
        folder = self.folder()
        return load_or_build(
            folder,
            lambda: self._load_cached(folder),
            lambda: self._train_and_save(folder),
            what=f"cached model {self.name}",
        )

    def _load_cached(self, folder: Path) -> LoadedModel:
        """The model in ``folder``, every file checked against the checksums in meta.json
        (written last); any problem raises :class:`~saeravel.cache.CorruptEntry`."""
        meta = read_json(
            folder / "meta.json",
            required=("arch", "train", "vocab", "files", "fact_accuracy", "full_swap_cause"),
        )
        verify_files(folder, meta["files"])
        if set(meta["files"]) != {"model.pt", "world.json"}:
            raise CorruptEntry(f"meta.json records {sorted(meta['files'])}")
        try:
            world = CityWorld.from_json(read_json(folder / "world.json", missing_ok=False))
            tokenizer = build_tokenizer(meta["vocab"])
            model = build_model(meta["arch"], tokenizer, self.device)
        except (TypeError, KeyError, ValueError) as exc:
            raise CorruptEntry(f"meta.json or world.json is malformed ({exc})") from None
        state = torch_load(folder / "model.pt", map_location=self.device)
        try:
            model.load_state_dict(state)
        except (RuntimeError, KeyError, TypeError) as exc:
            raise CorruptEntry(f"model.pt does not fit the recorded architecture: {exc}") from None
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        weights = meta["files"]["model.pt"]["sha256"][:12]
        info = {
            "embedded": True,
            # Caches built from this model (known-fact filters, trained SAEs) are keyed by its
            # config AND its weights, so a retrained model never meets a filter or SAE made
            # from other weights.
            "cache_folder_key": f"{self.key()}-{weights}",
            "weights_sha256": weights,
            "attributes": list(meta["train"]["attributes"]),  # the facts it was trained on
            "fact_accuracy": meta["fact_accuracy"],
            "full_swap_cause": meta["full_swap_cause"],
            "local_layers": meta["arch"]["local_layers"],
        }
        return LoadedModel(model=model, name=self.name, processing={}, world=world, info=info)

    def _train_and_save(self, folder: Path) -> None:
        from saeravel.results import atomic_torch_save, atomic_write_json

        t = self.train_cfg
        world = build_city_world(
            n_cities=t["n_cities"],
            seed=t["world_seed"],
            n_countries=t.get("n_countries"),
            independent=t.get("independent_attributes", False),
        )
        vocab = world_vocabulary(world)
        tokenizer = build_tokenizer(vocab)
        model = build_model(self.arch, tokenizer, self.device)
        log.info(
            "training %s (%d layers, d_model %d, %d cities, %d steps); cached in %s",
            self.name, self.arch["n_layers"], self.arch["d_model"], len(world.entities),
            t["steps"], folder,
        )  # fmt: skip
        losses, steps_taken = train_model(
            model, world, t["attributes"], t["steps"], t["batch"], t["n_facts"], t["lr"],
            t["train_seed"], self.device, stop_at_accuracy=t["stop_at_accuracy"],
            freeze_unembed=t["freeze_unembed"],
        )  # fmt: skip
        acc = fact_accuracy(model, world, t["attributes"], self.device)
        if acc < self.min_fact_accuracy:
            raise UserError(
                f"{self.name} reached only {acc:.3f} fact accuracy (< {self.min_fact_accuracy}); "
                "raise model.train_steps"
            )
        swap = {
            attr: [
                full_swap_cause(model, world, attr, layer) for layer in range(self.arch["n_layers"])
            ]
            for attr in ("Country", "Continent")
            if attr in t["attributes"]
        }
        log.info("fact accuracy %.4f; full-swap cause per layer %s", acc, swap)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / "world.json", world.to_json())
        atomic_torch_save(folder / "model.pt", model.state_dict())
        atomic_write_json(  # last: marks the entry complete and records its files' checksums
            folder / "meta.json",
            {
                "arch": self.arch,
                "train": t,
                "vocab": vocab,
                "fact_accuracy": acc,
                "full_swap_cause": swap,
                "final_loss": sum(losses[-20:]) / min(20, len(losses)),
                "steps_taken": steps_taken,
                "files": file_record(folder, ["model.pt", "world.json"]),
            },
        )
