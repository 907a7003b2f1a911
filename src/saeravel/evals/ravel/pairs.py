"""The RAVEL eval's data: the world (embedded or RAVEL's city files), the knowledge filter,
base/source pairs per attribute and split, the residual vectors of every prompt
(:class:`VectorBank`) and their SAE latents (:class:`LatentBank`, encoded once per prompt),
what featurizers fit on (:class:`FitData`), and :class:`RavelJob`, the one object holding all
of a job's shared state that training, scoring and the featurizers take.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from saeravel.cache import inside
from saeravel.checkpoint import CheckpointStore
from saeravel.errors import UserError
from saeravel.evals.ravel.data import download_ravel, load_ravel
from saeravel.evals.ravel.decode import CachedDecoder, naive_generate
from saeravel.evals.ravel.featurizers import feature_scale, principal_components
from saeravel.evals.ravel.intervene import SuffixRunner, job_site, resid_at
from saeravel.evals.ravel.prompts import (
    PAPER_FEW_SHOT_CITIES,
    Pair,
    Prompt,
    answer_ids,
    bos_id,
    few_shot_templates,
    label_prefix,
    make_pairs,
    matches,
    matches_any,
    rule_for,
    split_entities,
    tokenize_prompt,
)
from saeravel.results import atomic_write_json
from saeravel.taskdata import data_source
from saeravel.world import CityWorld

log = logging.getLogger(__name__)

FILTER_FORMAT = 2  # knowledge-filter cache entries: {"format", "key", "n", "known"}


def load_world(cfg: Any, ctx: Any) -> CityWorld:
    """The embedded world, or RAVEL's files of ``eval.entity_type`` (``data_dir``, else
    downloaded)."""
    if data_source(cfg.data_source, ctx.model, other="ravel") == "embedded":
        if cfg.data_dir is not None:
            raise UserError(
                f"eval.data_dir={cfg.data_dir} is not read: model {ctx.model.name} brings its own "
                "world; set eval.data_source=ravel to evaluate on RAVEL's files instead"
            )
        return ctx.model.world
    et = str(cfg.entity_type)
    folder = cfg.data_dir or download_ravel(ctx.cache_dir, entity_type=et)
    return load_ravel(folder, et)


def resolve_attributes(cfg: Any, world: CityWorld) -> None:
    """``eval.attributes: null`` becomes the world's first two attributes (RAVEL's type order:
    city's Country, Continent; a model's own world: its template order), set on the running
    ``cfg`` (the record keeps the job's config as hashed; the attributes used are in
    ``details.data.attributes``)."""
    if cfg.attributes is None:
        cfg.attributes = list(world.templates)[:2]


def generate(
    model: Any, prompts: list[Prompt], n_tokens: int, mem_gb: float, layer: int | None = None,
    vectors: torch.Tensor | None = None, batch_size: int = 64, fast: bool = True,
) -> list[list[int]]:  # fmt: skip
    """Greedy continuation (token ids) of ``n_tokens`` per prompt, optionally with ``vectors``
    patched in after block ``layer`` at each prompt's entity token: through key/value caches
    (:class:`CachedDecoder`, passes within ``mem_gb``, ``eval.decode_mem_gb``), or with
    ``fast=False`` by one full forward per token (the reference :func:`naive_generate`)."""
    if not fast:
        return naive_generate(model, prompts, n_tokens, layer, vectors, batch_size)
    split = model.cfg.n_layers - 1 if layer is None else layer
    return CachedDecoder(model, split, mem_gb).generate(prompts, n_tokens, [vectors])[0]


def label_for(world: CityWorld, p: Prompt) -> str:
    return world.entities[p.entity][p.attribute]


def prompt_answer_ids(model: Any, world: CityWorld, p: Prompt, protocol: str) -> list[list[int]]:
    """Every answer accepted for ``p`` (its label's ids; protocol saebench: its alternatives'
    too, :func:`~.prompts.saebench_answers`)."""
    text = p.template.replace("%s", p.entity)
    return answer_ids(model.tokenizer, text, label_for(world, p), p.attribute, protocol)


def known_filter(cfg: Any, ctx: Any, world: CityWorld, prompts: list[Prompt]) -> list[bool]:
    """Whether the model answers each prompt correctly (greedy, ``cfg.match`` on token ids;
    protocol saebench: any of SAEBench's accepted answers), cached per model identity, data,
    templates, rule and accepted answers. A cache entry that does not parse, or whose key or
    length does not fit, is logged in one line and rebuilt."""
    model = ctx.model
    protocol = str(cfg.protocol)
    parts = {
        "model": model.name,
        "mk": model.info.get("cache_folder_key") or model.processing,
        "dtype": str(model.model.cfg.dtype),
        "prompts": [[p.template, p.entity] for p in prompts],
        "labels": [label_for(world, p) for p in prompts],
        "match": str(cfg.match),
        "n": cfg.match_tokens,
    }
    if protocol == "saebench":  # other accepted answers: another filter
        parts["answers"] = "saebench"
    key_src = json.dumps(parts, sort_keys=True, default=str)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    path = inside(ctx.cache_dir, "ravel_filter", f"{model.name}-{key}.json")
    if path.exists():
        try:
            entry = json.loads(path.read_text())
            known = entry["known"]
            if (
                entry.get("format") != FILTER_FORMAT
                or entry.get("key") != key
                or not isinstance(known, list)
                or len(known) != len(prompts)
                or not all(isinstance(k, bool) for k in known)
            ):
                raise ValueError("does not fit this job's prompts")
            return known
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("knowledge-filter cache %s is corrupt (%s); rebuilding it", path, exc)
    log.info(
        "knowledge filter: %d prompts, %d generated tokens each", len(prompts), cfg.match_tokens
    )
    gens = generate(model.model, prompts, cfg.match_tokens, cfg.decode_mem_gb, fast=cfg.fast)
    known = [
        matches_any(g, prompt_answer_ids(model.model, world, p, protocol),
                    rule_for(p.attribute, cfg.match))
        for g, p in zip(gens, prompts, strict=True)
    ]  # fmt: skip
    atomic_write_json(path, {"format": FILTER_FORMAT, "key": key, "n": len(known), "known": known})
    return known


def _check_in_data(attrs: list[str], world: CityWorld) -> None:
    missing = [a for a in attrs if a not in world.templates]
    if missing:
        raise UserError(
            f"eval.attributes has {missing} not in the data; valid: {', '.join(sorted(world.templates))}"
        )


def _stats(
    cfg: Any, attrs: list[str], prompts: list[Prompt], kept: list[Prompt], entities: list[str],
    ent_in: dict[str, Any], pairs: dict[str, dict[str, list[Pair]]], heldout: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """The data statistics of a job's pairs; a one-line error when an attribute has no train
    or test pair of a kind."""
    stats = {
        "attributes": list(attrs),
        "n_prompts": len(prompts),
        "n_known_prompts": len(kept),
        "n_entities_known": len(entities),
        "entities_per_split": {s: len(v) for s, v in ent_in.items()},
        "pairs": {a: {s: {k: sum(p.kind == k for p in v) for k in ("cause", "isolation")} for s, v in d.items()}
                  for a, d in pairs.items()},  # fmt: skip
        "isolation_heldout": {k: v for k, v in heldout.items() if k != "pairs"},
        "split_by": cfg.split_by,
        "split_note": "entity split: no test entity trains the mask" if cfg.split_by == "entity"
        else "LEAKY pair split (the paper's): test entities also appear in training pairs",
    }  # fmt: skip
    for a in attrs:
        for s in ("train", "test"):
            for k in ("cause", "isolation"):
                if stats["pairs"][a][s][k] == 0:
                    raise UserError(
                        f"no {s} {k} pairs for attribute {a}: too few known entities ({len(entities)})"
                    )
    return stats


def top_entities(kept: list[Prompt], order: list[str], n: int) -> list[str]:
    """SAEBench's entity selection: the ``n`` entities with the most known prompts, ties in
    the data's order ``order`` (SAEBench sorts its entities, in order of appearance, by their
    count of correct prompts with Python's stable sort)."""
    count: dict[str, int] = {}
    for p in kept:
        count[p.entity] = count.get(p.entity, 0) + 1
    rank = {e: i for i, e in enumerate(order)}
    return sorted(count, key=lambda e: (-count[e], rank[e]))[:n]


class SAEBenchPairs:
    """SAEBench's pairs (``intervention.get_prompt_pairs``, v0.6.0) over known prompts: for
    attribute A intervened, ``n`` base prompts of A drawn without replacement (all of them when
    fewer), each with a source drawn uniformly among the prompts of A (any template, any
    entity) whose label differs (target: the source's label); isolation pairs the same way for
    every other attribute B (base and source ask B; target: the base's label), pooled,
    shuffled and cut to the number of cause pairs. ``drop_same``: a label whose accepted
    answers agree with the other's under prefix matching ("United States" and "United States
    Virgin Islands") counts as the same (SAEBench compares the strings only)."""

    def __init__(self, world: CityWorld, tokenizer: Any, drop_same: bool) -> None:
        self.world, self.tokenizer, self.drop_same = world, tokenizer, drop_same
        self._ids: dict[tuple[str, str, str], list[list[int]]] = {}
        self._same: dict[tuple[str, str, str, str], bool] = {}

    def answers(self, text: str, label: str, attribute: str) -> list[list[int]]:
        key = (label_prefix(text), label, attribute)  # ids depend on the text's last character
        if key not in self._ids:
            self._ids[key] = answer_ids(self.tokenizer, text, label, attribute, "saebench")
        return self._ids[key]

    def same(self, text: str, attribute: str, a: str, b: str) -> bool:
        if a == b:
            return True
        if not self.drop_same:
            return False
        key = (label_prefix(text), attribute, a, b)
        if key not in self._same:
            ids_a, ids_b = self.answers(text, a, attribute), self.answers(text, b, attribute)
            self._same[key] = any(matches(x, y, "prefix") for x in ids_a for y in ids_b)
        return self._same[key]

    def _draw(
        self, prompts: list[Prompt], attribute: str, n: int, rng: random.Random
    ) -> list[tuple[Prompt, Prompt]]:
        pool = [p for p in prompts if p.attribute == attribute]
        bases = rng.sample(pool, n) if len(pool) > n else list(pool)
        by_label: dict[str, list[Prompt]] = {}
        for p in pool:
            by_label.setdefault(label_for(self.world, p), []).append(p)
        out, sources = [], {}
        for b in bases:
            lab, text = label_for(self.world, b), b.template.replace("%s", b.entity)
            key = (label_prefix(text), lab)
            if key not in sources:
                sources[key] = [q for other, qs in by_label.items()
                                if not self.same(text, attribute, lab, other) for q in qs]  # fmt: skip
            if sources[key]:  # SAEBench raises instead; a base no source differs from is left out
                out.append((b, rng.choice(sources[key])))
        return out

    def _pair(self, b: Prompt, src: Prompt, intervened: str, kind: str) -> Pair:
        text = b.template.replace("%s", b.entity)
        target = label_for(self.world, src if kind == "cause" else b)
        ids = self.answers(text, target, b.attribute)
        return Pair(b, src, intervened, kind, target, ids[0][0], list(ids[0]),
                    {"same_label": False}, [list(x) for x in ids[1:]])  # fmt: skip

    def pairs(
        self, prompts: list[Prompt], attrs: list[str], a: str, n: int, rng: random.Random
    ) -> list[Pair]:
        """Cause pairs of ``a`` and as many isolation pairs from the other ``attrs``."""
        cause = [self._pair(b, s, a, "cause") for b, s in self._draw(prompts, a, n, rng)]
        iso = [x for b in attrs if b != a for x in self._draw(prompts, b, n, rng)]
        rng.shuffle(iso)
        return cause + [self._pair(b, s, a, "isolation") for b, s in iso[: len(cause)]]


def build_saebench_pairs(
    cfg: Any, ctx: Any, world: CityWorld
) -> tuple[dict[str, dict[str, list[Pair]]], dict[str, Any]]:
    """``eval.protocol=saebench``: SAEBench's entity and prompt selection (every template of
    the attributes for every entity, the knowledge filter on ``eval.match_tokens`` generated
    tokens with SAEBench's accepted answers, then the ``eval.saebench.top_entities`` entities
    with the most known prompts) and its pairs (:class:`SAEBenchPairs`,
    ``eval.saebench.pairs_per_attribute`` cause pairs per attribute), split by entity (a random
    split by ``eval.split_fractions``: SAEBench ignores RAVEL's) or, with ``split_by=pair``,
    SAEBench's own split of the pooled pairs."""
    model = ctx.model.model
    attrs = list(cfg.attributes)
    _check_in_data(attrs, world)
    rng = random.Random(ctx.seed)
    bos = bos_id(model)
    entities = list(world.entities)  # the data's order: SAEBench's ties
    if cfg.max_entities and len(entities) > cfg.max_entities:
        drawn = set(rng.sample(entities, cfg.max_entities))
        entities = [e for e in entities if e in drawn]
    prompts = [
        tokenize_prompt(model.tokenizer, t, e, a, bos)
        for e in entities
        for a in attrs
        for t in world.templates[a]
    ]
    known = known_filter(cfg, ctx, world, prompts)
    kept = [p for p, k in zip(prompts, known, strict=True) if k]
    if not kept:
        raise UserError(
            f"model {ctx.model.name} answers none of the {len(prompts)} RAVEL prompts correctly "
            f"(match={cfg.match}); nothing to evaluate"
        )
    n_known = len({p.entity for p in kept})
    chosen = top_entities(kept, entities, cfg.saebench.top_entities)
    keep = set(chosen)
    kept = [p for p in kept if p.entity in keep]
    maker = SAEBenchPairs(world, model.tokenizer, cfg.drop_same_label_pairs)
    n = cfg.saebench.pairs_per_attribute
    fr = dict(zip(("train", "val", "test"), cfg.split_fractions, strict=True))
    pairs: dict[str, dict[str, list[Pair]]] = {}
    if cfg.split_by == "entity":
        split = split_entities(sorted(keep), world, list(cfg.split_fractions), ctx.seed, own=False)
        ent_in = {s: {e for e in keep if split[e] == s} for s in fr}
        for a in attrs:
            pairs[a] = {
                s: maker.pairs([p for p in kept if p.entity in ent_in[s]], attrs, a,
                               round(n * fr[s]), rng) if fr[s] > 0 else []
                for s in fr
            }  # fmt: skip
    else:  # SAEBench's split: the pooled cause and isolation pairs, shuffled, cut by fraction
        ent_in = {"train": keep, "val": set(), "test": keep}
        for a in attrs:
            pool = maker.pairs(kept, attrs, a, n, rng)
            rng.shuffle(pool)
            n_tr = int(len(pool) * fr["train"] / (fr["train"] + fr["test"]))
            pairs[a] = {"train": pool[:n_tr], "val": [], "test": pool[n_tr:]}
    heldout = heldout_pairs(cfg, ctx, world, attrs, entities, set(ent_in["test"]),
                            lambda p, s: True)  # fmt: skip
    if any(pairs[a]["val"] for a in attrs):
        held_val = heldout_pairs(cfg, ctx, world, attrs, entities, set(ent_in["val"]),
                                 lambda p, s: True, "val")  # fmt: skip
        for a in attrs:
            if pairs[a]["val"]:
                pairs[a]["val"] += held_val["pairs"][a]
    for a in attrs:
        pairs[a]["test"] += heldout["pairs"][a]
    stats = _stats(cfg, attrs, prompts, kept, sorted(keep), ent_in, pairs, heldout)
    stats["saebench"] = {"entities_known": n_known, "entities_kept": len(chosen),
                         "pairs_per_attribute": n}  # fmt: skip
    return pairs, stats


def build_pairs(
    cfg: Any, ctx: Any, world: CityWorld
) -> tuple[dict[str, dict[str, list[Pair]]], dict[str, Any]]:
    """Pairs per attribute intervened and split (train/test), plus data statistics
    (``eval.protocol=saebench``: :func:`build_saebench_pairs`)."""
    if cfg.protocol == "saebench":
        return build_saebench_pairs(cfg, ctx, world)
    model = ctx.model.model
    attrs = list(cfg.attributes)
    _check_in_data(attrs, world)
    rng = random.Random(ctx.seed)
    bos = bos_id(model)
    shots = set(world.few_shot_cities)
    if (
        cfg.protocol == "saeravel"
        and not world.few_shot_cities
        and not getattr(world, "few_shot_prompts", None)
    ):
        shots |= set(PAPER_FEW_SHOT_CITIES)  # the paper's prompt: its shots leave the pool
    entities = sorted(e for e in world.entities if e not in shots)
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
    known_keys = {(p.template, p.entity) for p in kept}
    kept_entities = sorted({p.entity for p in kept})
    by_entity: dict[str, list[Prompt]] = {}
    for p in kept:
        by_entity.setdefault(p.entity, []).append(p)
    # Sources: any known prompt of the entity (ravel protocol: other contexts too).
    if cfg.split_by == "entity":
        split = split_entities(kept_entities, world, list(cfg.split_fractions), ctx.seed)
        ent_in = {s: [e for e in kept_entities if split[e] == s] for s in ("train", "test")}
        val_entities = [e for e in kept_entities if split[e] == "val"]
    else:
        ent_in = {"train": kept_entities, "test": kept_entities}
        val_entities = []

    def template_ok(p: Prompt, s: str) -> bool:
        if cfg.protocol != "ravel" or not world.template_split:
            return True
        want = "train" if s == "train" else "test"
        return world.template_split.get(p.template, want) == want

    pairs: dict[str, dict[str, list[Pair]]] = {}

    def split_pairs(a: str, s: str, ents: set[str], rng: random.Random) -> list[Pair]:
        bases = [p for p in kept if p.entity in ents and template_ok(p, s)]
        cause_b = [p for p in bases if p.attribute == a]
        iso_b = [p for p in bases if p.attribute != a]
        srcs = {e: [q for q in by_entity[e] if template_ok(q, s)] for e in ents}
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
                        rng, cfg.drop_same_label_pairs, sorted(ents), cfg.match, known_keys,
                    )  # fmt: skip
        else:
            ps = make_pairs(cause_b, srcs, world, a, model.tokenizer, cfg.max_pairs_per_split, rng,
                            cfg.drop_same_label_pairs, sorted(ents), cfg.match, known_keys)  # fmt: skip
            ps += make_pairs(iso_b, srcs, world, a, model.tokenizer, cfg.max_pairs_per_split, rng,
                             cfg.drop_same_label_pairs, sorted(ents), cfg.match, known_keys)  # fmt: skip
        return ps

    for a in attrs:
        pairs[a] = {s: split_pairs(a, s, set(ent_in[s]), rng) for s in ("train", "test")}
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
    # Validation pairs (selection among fitted variants, e.g. sae_probe's count) from the
    # validation entities, drawn from their own RNG so train and test are as without them.
    val_rng = random.Random(f"{ctx.seed}-val")
    for a in attrs:
        ps = []
        if cfg.split_by == "entity" and len(val_entities) >= 2:
            ps = split_pairs(a, "val", set(val_entities), val_rng)
        pairs[a]["val"] = ps
    heldout = heldout_pairs(cfg, ctx, world, attrs, entities, set(ent_in["test"]), template_ok)
    if any(pairs[a]["val"] for a in attrs):  # selection on validation sees held-out leaks too
        held_val = heldout_pairs(cfg, ctx, world, attrs, entities, set(val_entities), template_ok,
                                 "val")  # fmt: skip
        for a in attrs:
            if pairs[a]["val"]:
                pairs[a]["val"] += held_val["pairs"][a]
    for a in attrs:
        pairs[a]["test"] += heldout["pairs"][a]
    stats = _stats(cfg, attrs, prompts, kept, kept_entities, ent_in, pairs, heldout)
    return pairs, stats


def heldout_attributes(cfg: Any, world: CityWorld) -> list[str]:
    """The attributes scored for isolation only: ``eval.isolation_attributes``, or (null) every
    attribute of the data that ``eval.attributes`` does not train on."""
    trained = list(cfg.attributes)
    if cfg.isolation_attributes is None:
        return [a for a in world.templates if a not in trained]
    missing = [a for a in cfg.isolation_attributes if a not in world.templates]
    if missing:
        raise UserError(
            f"eval.isolation_attributes has {missing} not in the data; "
            f"valid: {', '.join(a for a in sorted(world.templates) if a not in trained)}"
        )
    return list(cfg.isolation_attributes)


def heldout_pairs(
    cfg: Any, ctx: Any, world: CityWorld, attrs: list[str], entities: list[str],
    test_entities: set[str], template_ok: Any, split: str = "test",
) -> dict[str, Any]:  # fmt: skip
    """Held-out isolation pairs: for each intervened attribute, test pairs whose base asks an
    attribute no method trains on (kind ``heldout``; target: the base's own value), from the
    test entities' prompts the model answers correctly (its own knowledge filter), drawn from
    their own RNG so every other pair is as without them. Under the saeravel protocol the
    source shares the base's template (as for trained attributes). An attribute with no
    prompt template for the protocol, or that the model knows for no test entity, is skipped
    and named. ``split="val"``: the same for the validation entities (what selections on
    validation, e.g. ``sae_probe``'s count, are scored on)."""
    model = ctx.model.model
    out: dict[str, Any] = {"attributes": [], "skipped": {}, "pairs": {a: [] for a in attrs}}
    held = heldout_attributes(cfg, world)
    if not held or not test_entities:
        return out
    templates: dict[str, list[str]] = {}
    for h in held:
        if cfg.protocol == "saeravel":
            try:
                templates[h] = list(few_shot_templates(world, [h]).values())
            except UserError as e:
                out["skipped"][h] = str(e)
        else:
            templates[h] = list(world.templates[h])
    bos = bos_id(model)
    ents = [e for e in entities if e in test_entities]
    prompts = [
        tokenize_prompt(model.tokenizer, t, e, h, bos)
        for e in ents
        for h in templates
        for t in templates[h]
        if template_ok(Prompt(t, e, h, [], 0, 0), split)
    ]
    known = known_filter(cfg, ctx, world, prompts) if prompts else []
    kept = [p for p, k in zip(prompts, known, strict=True) if k]
    by_entity: dict[str, list[Prompt]] = {}
    for p in prompts:  # sources: any of the entity's prompts (isolation needs no known source)
        by_entity.setdefault(p.entity, []).append(p)
    rng = random.Random(f"{ctx.seed}-heldout" + ("" if split == "test" else f"-{split}"))
    usable = [h for h in templates if any(p.attribute == h for p in kept)]
    for h in templates:
        if h not in usable:
            out["skipped"][h] = "the model answers it for no test entity (knowledge filter)"
    out["attributes"] = usable
    per_attr = max(1, cfg.max_pairs_per_split // max(1, len(usable)))
    for a in attrs:
        for h in usable:
            bases = [p for p in kept if p.attribute == h]
            srcs = {e: [q for q in qs if q.attribute == h] for e, qs in by_entity.items()}
            ps = make_pairs(bases, srcs, world, a, model.tokenizer, per_attr, rng,
                            cfg.drop_same_label_pairs, sorted(ents), cfg.match, None)  # fmt: skip
            out["pairs"][a] += [replace(q, kind="heldout") for q in ps]
    out["n_pairs"] = {a: len(v) for a, v in out["pairs"].items()}
    return out


@dataclass
class FitData:
    """What a featurizer may be fit on before training: the residual vectors of every
    training-split prompt (base or source, any attribute) and, per attribute, their values."""

    vectors: torch.Tensor
    prompts: list[Prompt]
    pca: dict[bool, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def components(self, standardize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(components, variance) of the training vectors, fit once per ``standardize``."""
        if standardize not in self.pca:
            self.pca[standardize] = principal_components(self.vectors.float().cpu(), standardize)
        return self.pca[standardize]

    def scale(self) -> torch.Tensor:
        """The per-dim std of the training vectors (what standardised PCA divides by)."""
        return feature_scale(self.vectors.float().cpu())


class VectorBank:
    """The vectors at ``site`` of block ``layer`` (by default the residual after it) at each
    prompt's entity token, computed once, in float32 (what the methods train in; a patch
    casts back to the model's dtype)."""

    def __init__(
        self, model: Any, layer: int, prompts: list[Prompt], batch_size: int,
        site: str = "resid_post",
    ) -> None:  # fmt: skip
        uniq = list({id(p): p for p in prompts}.values())
        acts = resid_at(model, uniq, layer, batch_size, site=site)
        self.vec = {id(p): r[p.entity_pos].float() for p, r in zip(uniq, acts, strict=True)}

    def __call__(self, prompts: list[Prompt]) -> torch.Tensor:
        return torch.stack([self.vec[id(p)] for p in prompts])


class LatentBank:
    """The frozen SAE's latents and normalisation statistics of each prompt's vector in
    ``bank``, encoded once per prompt (on first use, in batches of ``batch_size``) and kept
    sparse (the nonzero latents' indices and values), so a training step of an SAE mask reads
    them instead of re-encoding its bases and sources (``Intervention.forward_latents``), and
    ``sae_probe``'s probe reads the training prompts' as one sparse tensor (:meth:`sparse`).
    Densified per call: the latents equal the encoder's output exactly. Keyed by prompt
    identity, as :class:`VectorBank`; the prompt is kept so a reused id is another prompt."""

    def __init__(self, sae: Any, bank: Any, batch_size: int = 256) -> None:
        self.sae, self.bank, self.batch_size = sae, bank, batch_size
        self._codes: dict[int, tuple[Prompt, torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _encode(self, prompts: list[Prompt]) -> None:
        todo = list(
            {id(p): p for p in prompts if self._codes.get(id(p), (None,))[0] is not p}.values()
        )
        for i in range(0, len(todo), self.batch_size):
            chunk = todo[i : i + self.batch_size]
            with torch.no_grad():
                z, (mu, std) = self.sae.normalize(self.bank(chunk))
                f = self.sae.encode_normalized(z)
            for k, p in enumerate(chunk):
                idx = torch.nonzero(f[k]).flatten()
                self._codes[id(p)] = (p, idx, f[k, idx].clone(), torch.cat([mu[k], std[k]]))

    def sparse(self, prompts: list[Prompt]) -> torch.Tensor:
        """Latents of ``prompts``' vectors as a sparse COO tensor [n, d_sae] on the CPU
        (float32; ``sae_probe``'s probe reads them so, never dense)."""
        self._encode(prompts)
        codes = [self._codes[id(p)] for p in prompts]
        rows = torch.cat([torch.full_like(c[1], k) for k, c in enumerate(codes)])
        cols = torch.cat([c[1] for c in codes])
        vals = torch.cat([c[2] for c in codes]).float()
        return torch.sparse_coo_tensor(
            torch.stack([rows, cols]).cpu(),
            vals.cpu(),
            (len(prompts), self.sae.d_sae),
            check_invariants=True,
        ).coalesce()

    def __call__(
        self, prompts: list[Prompt]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Latents [n, d_sae] and (mean [n, 1], std [n, 1]) of ``prompts``' vectors."""
        self._encode(prompts)
        codes = [self._codes[id(p)] for p in prompts]
        stats = torch.stack([c[3] for c in codes])
        f = torch.zeros(len(prompts), self.sae.d_sae, dtype=stats.dtype, device=stats.device)
        rows = torch.cat([torch.full_like(c[1], k) for k, c in enumerate(codes)])
        f[rows, torch.cat([c[1] for c in codes])] = torch.cat([c[2] for c in codes])
        return f, (stats[:, :1], stats[:, 1:])


@dataclass
class RavelJob:
    """A RAVEL job's shared state: its config and context, the world, the pairs per attribute
    and split, the vector bank, the fast forward (``runner``, None with ``eval.fast=false``),
    the SAE latents of each prompt (``latents``, None without an SAE), the decoder (None with
    ``eval.fast=false``), the checkpoint store, what featurizers fit on, and ``shared``: what
    one featurizer leaves for another within the job (the joint MDAS fit, ``sae_probe``'s
    latents per attribute)."""

    cfg: Any
    ctx: Any
    world: CityWorld | None = None
    pairs: dict[str, dict[str, list[Pair]]] = field(default_factory=dict)
    bank: VectorBank | None = None
    runner: SuffixRunner | None = None
    latents: LatentBank | None = None
    decoder: CachedDecoder | None = None
    store: Any = field(default_factory=CheckpointStore.disabled)
    fit: FitData | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, cfg: Any, ctx: Any, store: Any) -> RavelJob:
        """Load the world, build the pairs, compute the vector bank and (``eval.fast``) the
        suffix runner's and decoder's caches."""
        world = load_world(cfg, ctx)
        resolve_attributes(cfg, world)
        pairs, stats = build_pairs(cfg, ctx, world)
        model = ctx.model.model
        stats["prompt_bos"] = bos_id(model) is not None
        if ctx.sae is not None and "prepend_bos" in (ctx.sae.cfg_dict or {}):
            stats["sae_prepend_bos"] = ctx.sae.cfg_dict["prepend_bos"]
        log.info("pairs: %s", {a: {s: len(v) for s, v in d.items()} for a, d in pairs.items()})
        return cls.from_pairs(cfg, ctx, world, pairs, stats, store)

    @classmethod
    def from_pairs(
        cls, cfg: Any, ctx: Any, world: Any, pairs: dict[str, dict[str, list[Pair]]],
        stats: dict[str, Any], store: Any,
    ) -> RavelJob:  # fmt: skip
        """The job over built ``pairs``: the vector bank, (``eval.fast``) the suffix runner's
        and decoder's caches, the fit data and the SAE latents (``scripts/bench_ravel.py``
        builds its synthetic jobs here)."""
        model = ctx.model.model
        all_prompts = [q.base for d in pairs.values() for ps in d.values() for q in ps]
        all_prompts += [q.source for d in pairs.values() for ps in d.values() for q in ps]
        site = job_site(ctx)
        bank = VectorBank(model, ctx.layer, all_prompts, 64, site=site)
        runner, decoder = None, None
        if cfg.fast:
            runner = SuffixRunner(model, ctx.layer, site=site)
            runner.prepare([q.base for d in pairs.values() for ps in d.values() for q in ps])
            decoder = CachedDecoder(model, ctx.layer, cfg.decode_mem_gb, site=site)
        train_prompts = list(
            {
                id(p): p for d in pairs.values() for q in d["train"] for p in (q.base, q.source)
            }.values()
        )
        fit = FitData(bank(train_prompts), train_prompts)  # pca and sae_probe fit on these only
        latents = LatentBank(ctx.sae, bank) if ctx.sae is not None else None
        return cls(cfg, ctx, world, pairs, bank, runner, latents, decoder, store, fit, stats)
