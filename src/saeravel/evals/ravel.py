"""``eval=ravel``: RAVEL interchange interventions scored by cause, isolation, disentangle.

For each attribute A intervened and each method, a mask (or rotation) is trained on the
training split so that patching the base's entity representation with the source's makes
the model answer A with the source's value (cause pairs) while answering every other
attribute with the base's own value (isolation pairs); it is scored on the held-out split:
cause = accuracy against the source's label on A's prompts, isolation = accuracy against
the base's label on the other attributes' prompts, disentangle = their mean.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from saeravel.config import RavelEvalConfig
from saeravel.errors import UserError, choose
from saeravel.evals import register
from saeravel.ravel.data import download_ravel, load_ravel_city
from saeravel.ravel.intervene import (
    DAS,
    FixedIntervention,
    Intervention,
    NeuronMask,
    SAEMask,
    SuffixRunner,
    batches_by_prefix,
    naive_logits,
    resid_at,
    temperature,
)
from saeravel.ravel.prompts import (
    Pair,
    Prompt,
    bos_id,
    few_shot_templates,
    make_pairs,
    matches,
    pad,
    split_entities,
    tokenize_prompt,
)
from saeravel.results import atomic_torch_save, atomic_write_json
from saeravel.world import CityWorld

log = logging.getLogger(__name__)

METHODS = ("sae", "neurons", "das")
PROTOCOLS = ("saeravel", "ravel")
MATCH_RULES = ("first_word", "prefix")


def _methods(cfg: Any) -> list[str]:
    return list(METHODS) if cfg.method == "all" else [cfg.method]


def validate(cfg: Any) -> None:
    """One-line errors for names that do not exist."""
    choose("eval.protocol", cfg.protocol, PROTOCOLS)
    choose("eval.method", cfg.method, (*METHODS, "all"))
    choose("eval.split_by", cfg.split_by, ("entity", "pair"))
    choose("eval.match", cfg.match, MATCH_RULES)
    choose("eval.mask.eval", cfg.mask.eval, ("hard", "soft"))
    choose("eval.mask.schedule", cfg.mask.schedule, ("linear", "log"))
    choose("eval.das.mode", cfg.das.mode, ("mask", "fixed"))
    choose("eval.data_source", cfg.data_source, ("auto", "embedded", "ravel"))
    choose("eval.optimizer", cfg.optimizer, ("adam", "adamw", "sgd"))
    if len(cfg.attributes) < 2:
        raise UserError(
            "eval.attributes needs at least two attributes (one intervened, one isolated)"
        )


def load_world(cfg: Any, ctx: Any) -> CityWorld:
    """The embedded world, or RAVEL's city files (``data_dir``, else downloaded)."""
    if cfg.data_source == "embedded" or (cfg.data_source == "auto" and ctx.model.world is not None):
        if ctx.model.world is None:
            raise UserError(
                f"model {ctx.model.name} has no embedded world; use eval.data_source=ravel"
            )
        return ctx.model.world
    folder = cfg.data_dir or download_ravel(ctx.cache_dir)
    return load_ravel_city(folder)


# ----------------------------------------------------------------------------- generation


@torch.no_grad()
def generate(
    model: Any, prompts: list[Prompt], n_tokens: int, layer: int | None = None, vectors: torch.Tensor | None = None,
    batch_size: int = 64,
) -> list[str]:  # fmt: skip
    """Greedy continuation of ``n_tokens`` per prompt, optionally with ``vectors`` patched in
    after block ``layer`` at each prompt's entity token."""
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        vec = vectors[i : i + batch_size] if vectors is not None else None
        cur = [
            Prompt(p.template, p.entity, p.attribute, list(p.tokens), p.entity_start, p.entity_pos)
            for p in chunk
        ]
        new: list[list[int]] = [[] for _ in chunk]
        for _ in range(n_tokens):
            if vec is None:
                toks, last = pad(cur, model.tokenizer.pad_token_id or 0, model.cfg.device)
                logits = model(toks)[torch.arange(len(cur)), last]
            else:
                logits = naive_logits(model, cur, vec, layer)
            nxt = logits.argmax(-1).tolist()
            for j, t in enumerate(nxt):
                cur[j].tokens.append(t)
                new[j].append(t)
        out.extend(model.tokenizer.decode(ids) for ids in new)
    return out


def label_for(world: CityWorld, p: Prompt) -> str:
    return world.entities[p.entity][p.attribute]


def known_filter(cfg: Any, ctx: Any, world: CityWorld, prompts: list[Prompt]) -> list[bool]:
    """Whether the model answers each prompt correctly (greedy, ``cfg.match``), cached per
    model, data and templates."""
    model = ctx.model
    key_src = json.dumps(
        {
            "model": model.name,
            "mk": model.info.get("cache_folder_key") or model.processing,
            "prompts": [[p.template, p.entity] for p in prompts],
            "labels": [label_for(world, p) for p in prompts],
            "match": cfg.match,
            "n": cfg.match_tokens,
        },
        sort_keys=True,
        default=str,
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    path = Path(ctx.cache_dir) / "ravel_filter" / f"{model.name}-{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    gens = generate(model.model, prompts, cfg.match_tokens)
    known = [matches(g, label_for(world, p), cfg.match) for g, p in zip(gens, prompts, strict=True)]
    atomic_write_json(path, known)
    return known


# ----------------------------------------------------------------------------- data assembly


def build_pairs(
    cfg: Any, ctx: Any, world: CityWorld
) -> tuple[dict[str, dict[str, list[Pair]]], dict[str, Any]]:
    """Pairs per attribute intervened and split (train/test), plus data statistics."""
    model = ctx.model.model
    attrs = list(cfg.attributes)
    missing = [a for a in attrs if a not in world.templates]
    if missing:
        raise UserError(
            f"eval.attributes has {missing} not in the data; valid: {', '.join(sorted(world.templates))}"
        )
    rng = random.Random(ctx.seed)
    bos = bos_id(model)
    entities = sorted(e for e in world.entities if e not in set(world.few_shot_cities))
    if cfg.max_entities and len(entities) > cfg.max_entities:
        entities = sorted(rng.sample(entities, cfg.max_entities))
    if cfg.protocol == "saeravel":
        templates = {a: [t] for a, t in few_shot_templates(world, attrs).items()}
    else:
        templates = {a: list(world.templates[a]) for a in attrs}
    prompts = [
        tokenize_prompt(model.tokenizer, t, e, a, bos)
        for e in entities
        for a in attrs
        for t in templates[a]
    ]
    known = known_filter(cfg, ctx, world, prompts)
    kept = [p for p, k in zip(prompts, known, strict=True) if k]
    if cfg.protocol == "saeravel":  # cities the model answers for every attribute
        n_known: dict[str, int] = {}
        for p in kept:
            n_known[p.entity] = n_known.get(p.entity, 0) + 1
        good = {e for e, n in n_known.items() if n == len(attrs)}
        kept = [p for p in kept if p.entity in good]
    if not kept:
        raise UserError(
            f"model {ctx.model.name} answers none of the {len(prompts)} RAVEL prompts correctly "
            f"(match={cfg.match}); nothing to evaluate"
        )
    kept_entities = sorted({p.entity for p in kept})
    by_entity: dict[str, list[Prompt]] = {}
    for p in kept:
        by_entity.setdefault(p.entity, []).append(p)
    # Sources: any known prompt of the entity (ravel protocol: other contexts too).
    if cfg.split_by == "entity":
        split = split_entities(kept_entities, world, list(cfg.split_fractions), ctx.seed)
        ent_in = {s: [e for e in kept_entities if split[e] == s] for s in ("train", "test")}
    else:
        ent_in = {"train": kept_entities, "test": kept_entities}

    def template_ok(p: Prompt, s: str) -> bool:
        if cfg.protocol != "ravel" or not world.template_split:
            return True
        want = "train" if s == "train" else "test"
        return world.template_split.get(p.template, want) == want

    pairs: dict[str, dict[str, list[Pair]]] = {}
    for a in attrs:
        pairs[a] = {}
        for s in ("train", "test"):
            ents = set(ent_in[s])
            bases = [p for p in kept if p.entity in ents and template_ok(p, s)]
            cause_b = [p for p in bases if p.attribute == a]
            iso_b = [p for p in bases if p.attribute != a]
            srcs = {e: by_entity[e] for e in ents}
            if cfg.protocol == "saeravel":  # source shares the base's template
                ps = []
                for kind_bases in (cause_b, iso_b):
                    for tmpl_attr in {p.attribute for p in kind_bases}:
                        same = {
                            e: [q for q in qs if q.attribute == tmpl_attr] for e, qs in srcs.items()
                        }
                        ps += make_pairs(
                            [p for p in kind_bases if p.attribute == tmpl_attr], same, world, a,
                            model.tokenizer, cfg.max_pairs_per_split // max(1, len({p.attribute for p in kind_bases})),
                            rng, cfg.drop_same_label_pairs, sorted(ents), cfg.match,
                        )  # fmt: skip
            else:
                ps = make_pairs(cause_b, srcs, world, a, model.tokenizer, cfg.max_pairs_per_split, rng,
                                cfg.drop_same_label_pairs, sorted(ents), cfg.match)  # fmt: skip
                ps += make_pairs(iso_b, srcs, world, a, model.tokenizer, cfg.max_pairs_per_split, rng,
                                 cfg.drop_same_label_pairs, sorted(ents), cfg.match)  # fmt: skip
            pairs[a][s] = ps
    if cfg.split_by == "pair":  # the paper's leaky split: one pool, split by pair
        for a in attrs:
            pool = pairs[a]["train"]
            rng.shuffle(pool)
            n_tr = int(
                len(pool)
                * cfg.split_fractions[0]
                / (cfg.split_fractions[0] + cfg.split_fractions[2])
            )
            pairs[a] = {"train": pool[:n_tr], "test": pool[n_tr:]}
    stats = {
        "n_prompts": len(prompts),
        "n_known_prompts": len(kept),
        "n_entities_known": len(kept_entities),
        "entities_per_split": {s: len(v) for s, v in ent_in.items()},
        "pairs": {a: {s: {k: sum(p.kind == k for p in v) for k in ("cause", "isolation")} for s, v in d.items()}
                  for a, d in pairs.items()},  # fmt: skip
        "split_by": cfg.split_by,
        "split_note": "entity split: no test entity trains the mask" if cfg.split_by == "entity"
        else "LEAKY pair split (the paper's): test entities also appear in training pairs",
    }  # fmt: skip
    for a in attrs:
        for s in ("train", "test"):
            for k in ("cause", "isolation"):
                if stats["pairs"][a][s][k] == 0:
                    raise UserError(
                        f"no {s} {k} pairs for attribute {a}: too few known entities ({len(kept_entities)})"
                    )
    return pairs, stats


# ----------------------------------------------------------------------------- train & score


def make_method(name: str, cfg: Any, ctx: Any) -> Intervention:
    d = ctx.model.d_model
    if name == "neurons":
        return NeuronMask(d, cfg.mask.init)
    if name == "das":
        return DAS(d, cfg.das.mode, cfg.das.k, cfg.mask.init)
    if ctx.sae is None:
        raise UserError(
            "eval.method=sae needs an SAE; choose sae=<family> (sae=none has no latents)"
        )
    return SAEMask(ctx.sae, cfg.mask.init, cfg.add_error)


class VectorBank:
    """Residual vectors after ``layer`` at each prompt's entity token, computed once."""

    def __init__(self, model: Any, layer: int, prompts: list[Prompt], batch_size: int) -> None:
        uniq = list({id(p): p for p in prompts}.values())
        self.vec = {
            id(p): r[p.entity_pos]
            for p, r in zip(uniq, resid_at(model, uniq, layer, batch_size), strict=True)
        }

    def __call__(self, prompts: list[Prompt]) -> torch.Tensor:
        return torch.stack([self.vec[id(p)] for p in prompts])


def train_method(
    method: Intervention, pairs: list[Pair], bank: VectorBank, runner: SuffixRunner | None, cfg: Any, ctx: Any,
    desc: str, ckpt_name: str | None = None,
) -> list[float]:  # fmt: skip
    """Train the method's parameters (the model stays frozen); returns per-epoch losses.

    With ``ckpt_name``, the training state (parameters, optimizer, step, the batch-order RNG
    at the start of the epoch, torch's RNG) goes to ``ctx.checkpoint`` every
    ``cfg.checkpoint_every_s`` seconds / ``cfg.checkpoint_every_steps`` steps, and a saved state
    is continued from: the result equals that of an uninterrupted run."""
    from saeravel.checkpoint import rng_state, set_rng_state

    params = [p for p in method.parameters() if p.requires_grad]
    if not params:
        return []
    opt_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[
        cfg.optimizer
    ]
    opt = opt_cls(params, lr=cfg.lr)
    rng = random.Random(ctx.seed)
    steps_per_epoch = len(
        batches_by_prefix(pairs, lambda q: q.base.prefix, cfg.batch_size, random.Random(0))
    )
    total = cfg.epochs * steps_per_epoch
    step, curve = 0, []
    model = ctx.model.model
    store, timer = None, None
    if ckpt_name is not None:
        store = ctx.checkpoint
        timer = store.timer(cfg.checkpoint_every_s, cfg.checkpoint_every_steps)
    own = method.own_state()
    first_epoch, skip, resumed_loss = 0, 0, 0.0
    saved = store.load(ckpt_name) if store is not None else None
    if saved is not None and not (
        isinstance(saved, dict)
        and (saved.get("total"), saved.get("n_pairs")) == (total, len(pairs))
        and {k: tuple(v.shape) for k, v in saved.get("method", {}).items()}
        == {k: tuple(v.shape) for k, v in own.items()}
    ):
        log.warning("%s: checkpoint %s is of another training run; starting over", desc, ckpt_name)
        saved = None
    if saved is not None:
        method.load_state_dict(saved["method"], strict=False)  # all but the frozen SAE (checked)
        opt.load_state_dict(saved["optimizer"])
        rng.setstate(saved["epoch_rng"])
        set_rng_state(saved["torch_rng"])
        step, curve = saved["step"], list(saved["curve"])
        first_epoch, skip, resumed_loss = saved["epoch"], saved["batch"], saved["epoch_loss"]
        log.info("%s: resuming from checkpoint at step %d of %d", desc, step, total)
    bar = tqdm(total=total, initial=step, desc=desc, leave=False)
    for epoch in range(first_epoch, cfg.epochs):
        epoch_rng = rng.getstate()  # this epoch's batch order is drawn from here
        epoch_loss = resumed_loss if epoch == first_epoch else 0.0
        batches = batches_by_prefix(pairs, lambda q: q.base.prefix, cfg.batch_size, rng)
        for i, batch in enumerate(batches):
            if epoch == first_epoch and i < skip:
                continue  # done before the checkpoint
            if method.mask is not None:
                method.mask.temperature = temperature(
                    step, total, cfg.mask.t_start, cfg.mask.t_end, cfg.mask.schedule
                )
            b = bank([q.base for q in batch])
            s = bank([q.source for q in batch])
            v = method(b, s)
            bases = [q.base for q in batch]
            logits = (
                runner.logits(bases, v)
                if runner is not None
                else naive_logits(model, bases, v, ctx.layer)
            )
            target = torch.tensor([q.target_token for q in batch], device=logits.device)
            loss = F.cross_entropy(logits.float(), target)
            if cfg.mask.l1 > 0:
                loss = loss + cfg.mask.l1 * method.penalty()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            epoch_loss += loss.item() * len(batch)
            step += 1
            bar.update()
            if timer is not None and timer.due(step):
                store.save(ckpt_name, {
                    "total": total, "n_pairs": len(pairs), "step": step, "epoch": epoch, "batch": i + 1,
                    "epoch_loss": epoch_loss, "curve": curve, "epoch_rng": epoch_rng, "torch_rng": rng_state(),
                    "method": method.own_state(),
                    "optimizer": opt.state_dict(),
                })  # fmt: skip
        curve.append(epoch_loss / max(1, len(pairs)))
    bar.close()
    return curve


@torch.no_grad()
def score(
    method: Intervention, pairs: list[Pair], bank: VectorBank, cfg: Any, ctx: Any, world: CityWorld
) -> dict[str, Any]:
    """Cause, isolation and disentangle on ``pairs`` under both matching rules, plus
    first-token accuracy and per-template accuracy."""
    if method.mask is not None:
        method.mask.hard = cfg.mask.eval == "hard"
    model = ctx.model.model
    vecs = torch.cat(
        [method(bank([q.base for q in pairs[i : i + 256]]), bank([q.source for q in pairs[i : i + 256]]))
         for i in range(0, len(pairs), 256)]
    )  # fmt: skip
    gens = generate(model, [q.base for q in pairs], cfg.match_tokens, ctx.layer, vecs)
    out: dict[str, Any] = {}
    per_template: dict[str, list[int]] = {}
    for rule in MATCH_RULES:
        ok = [matches(g, q.target, rule) for g, q in zip(gens, pairs, strict=True)]
        cause = [o for o, q in zip(ok, pairs, strict=True) if q.kind == "cause"]
        iso = [o for o, q in zip(ok, pairs, strict=True) if q.kind == "isolation"]
        c = sum(cause) / len(cause) if cause else float("nan")
        i = sum(iso) / len(iso) if iso else float("nan")
        out[rule] = {"cause": c, "isolation": i, "disentangle": (c + i) / 2}
        if rule == cfg.match:
            for o, q in zip(ok, pairs, strict=True):
                per_template.setdefault(f"{q.kind}|{q.base.template}", []).append(int(o))
    out.update(out[cfg.match])
    out["per_template"] = {t: sum(v) / len(v) for t, v in per_template.items()}
    out["n_cause"] = sum(q.kind == "cause" for q in pairs)
    out["n_isolation"] = sum(q.kind == "isolation" for q in pairs)
    if method.mask is not None:
        out["mask_kept"] = method.mask.kept()
        out["mask_size"] = method.mask.param.numel()
        method.mask.hard = False
    return out


def _summary_row(name: str, attr: str, r: dict[str, Any]) -> str:
    return f"{name:<10} {attr:<10} cause {r['cause']:.3f}  isolation {r['isolation']:.3f}  disentangle {r['disentangle']:.3f}"


@register("ravel", schema=RavelEvalConfig, needs_sae=lambda cfg: cfg.method in ("sae", "all"), saebench="saeravel.saebench:ravel_metrics")  # noqa: E501
def run(cfg: Any, ctx: Any) -> Any:
    """Train and score every method for every attribute intervened. With checkpoints on
    (``eval.checkpoint_every_s`` / ``eval.checkpoint_every_steps``), each finished (method,
    attribute) is kept in ``ctx.checkpoint`` and taken from there when the job runs again."""
    from saeravel.checkpoint import CheckpointStore, entry_name
    from saeravel.pipeline import EvalOutput

    validate(cfg)
    if cfg.checkpoint_every_s < 0 or cfg.checkpoint_every_steps < 0:
        raise UserError(
            f"eval.checkpoint_every_s={cfg.checkpoint_every_s} and eval.checkpoint_every_steps="
            f"{cfg.checkpoint_every_steps} must be >= 0 (0 turns each off)"
        )
    store = getattr(ctx, "checkpoint", None) or CheckpointStore.disabled()
    if cfg.checkpoint_every_s == 0 and cfg.checkpoint_every_steps == 0:
        store = CheckpointStore.disabled()
    torch.manual_seed(ctx.seed)
    world = load_world(cfg, ctx)
    pairs, stats = build_pairs(cfg, ctx, world)
    model = ctx.model.model
    all_prompts = [q.base for d in pairs.values() for ps in d.values() for q in ps]
    all_prompts += [q.source for d in pairs.values() for ps in d.values() for q in ps]
    bank = VectorBank(model, ctx.layer, all_prompts, 64)
    runner = None
    if cfg.fast:
        runner = SuffixRunner(model, ctx.layer)
        runner.prepare([q.base for d in pairs.values() for q in d["train"]])

    metrics: dict[str, Any] = {"ravel": {}, "baselines": {}}
    details: dict[str, Any] = {"data": stats, "training_curves": {}, "per_template": {}}
    summary = [
        f"RAVEL ({cfg.protocol} protocol, {stats['split_note']}), layer {ctx.layer}, match={cfg.match}"
    ]
    baselines = ["none", "swap"] + (["sae_recon", "sae_swap"] if ctx.sae is not None else [])
    for attr in cfg.attributes:
        test = pairs[attr]["test"]
        for b in baselines:
            r = score(FixedIntervention(b, ctx.sae), test, bank, cfg, ctx, world)
            details["per_template"][f"{b}/{attr}"] = r.pop("per_template")
            metrics["baselines"].setdefault(b, {})[attr] = r
            summary.append(_summary_row(b, attr, r))
        for name in _methods(cfg):
            done = store.load(entry_name("scored", name, attr))
            if done is None:
                torch.manual_seed(ctx.seed)
                method = make_method(name, cfg, ctx).to(ctx.device)
                train_name = entry_name("train", name, attr) if store.enabled else None
                curve = train_method(
                    method, pairs[attr]["train"], bank, runner, cfg, ctx, f"{name}/{attr}", train_name,
                )  # fmt: skip
                r = score(method, test, bank, cfg, ctx, world)
                state = method.own_state()
                done = {"score": r, "curve": curve, "state": state}
                store.save(entry_name("scored", name, attr), done)
                if train_name is not None:
                    store.remove(train_name)
            else:
                log.info("%s/%s: trained and scored before the interruption", name, attr)
            r, curve, state = dict(done["score"]), list(done["curve"]), done["state"]
            details["per_template"][f"{name}/{attr}"] = r.pop("per_template")
            details["training_curves"][f"{name}/{attr}"] = curve
            metrics["ravel"].setdefault(name, {})[attr] = r
            summary.append(_summary_row(name, attr, r))
            if cfg.save_artifacts:
                atomic_torch_save(ctx.output_dir / f"ravel_{name}_{attr}.pt", state)
    metrics["ravel"]["baseline"] = metrics["baselines"]["none"]
    return EvalOutput(metrics=metrics, details=details, summary=summary)
