"""Prompts with located entities, knowledge filtering, and base/source pairs.

Correctness notes (each differs from at least one reference implementation):
- The intervention site is the *last token of the entity*, found from the tokenizer's
  character offsets per prompt, so multi-token entities and prompts of different lengths
  are handled; prompts are right-padded, so padding never shifts a position.
- Pairs whose base and source labels are equal are dropped (they cannot show a transfer
  and inflate both scores).
- The default split is by entity: no test city ever trains the mask. ``split_by=pair``
  reproduces the paper's leaky split and is labelled as such in the results.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch

from saeravel.errors import UserError
from saeravel.world import CityWorld, few_shot_prompt

# The saeravel protocol's prompts on real models (Chaudhary & Geiger 2024, 5-shot).
PAPER_FEW_SHOT = {
    "Country": (
        "Toronto is a city in the country of Canada. Beijing is a city in the country of China. "
        "Miami is a city in the country of United States. Santiago is a city in the country of "
        "Chile. London is a city in the country of England. %s is a city in the country of"
    ),
    "Continent": (
        "Toronto is a city in the continent of North America. Beijing is a city in the continent "
        "of Asia. Miami is a city in the continent of North America. Santiago is a city in the "
        "continent of South America. London is a city in the continent of Europe. %s is a city "
        "in the continent of"
    ),
}


# The paper's five shot cities: on real RAVEL data they leave the entity pool (a query must not
# be one of its own shots; London's shot says "England" while its label is "United Kingdom").
PAPER_FEW_SHOT_CITIES = ("Toronto", "Beijing", "Miami", "Santiago", "London")


@dataclass
class Prompt:
    """A template filled with an entity, tokenised, with the entity's token span located."""

    template: str
    entity: str
    attribute: str
    tokens: list[int]
    entity_start: int
    entity_pos: int

    @property
    def prefix(self) -> tuple[int, ...]:
        """Tokens before the entity (shared by every entity in this template)."""
        return tuple(self.tokens[: self.entity_start])


@dataclass
class Pair:
    """Base and source prompts; the model should answer ``target`` after the intervention."""

    base: Prompt
    source: Prompt
    intervened: str
    kind: str  # "cause" or "isolation"
    target: str
    target_token: int
    target_tokens: list[int] = field(default_factory=list)  # the label's ids in context
    meta: dict[str, Any] = field(default_factory=dict)
    # other accepted answers' ids in context (protocol saebench: :func:`saebench_answers`)
    alt_tokens: list[list[int]] = field(default_factory=list)

    def answers(self) -> list[list[int]]:
        """Every accepted answer's token ids: the target's, then the alternatives'."""
        return [self.target_tokens, *self.alt_tokens]


def label_prefix(prompt_text: str) -> str:
    """Labels follow the prompt after a space, unless it ends in whitespace or a quote."""
    return "" if prompt_text[-1:].isspace() or prompt_text.endswith('"') else " "


def tokenize_prompt(
    tokenizer: Any, template: str, entity: str, attribute: str, bos: int | None
) -> Prompt:
    """Tokenise ``template % entity`` and locate the entity's first and last tokens."""
    if template.count("%s") != 1:
        raise UserError(f"template {template!r} must contain exactly one %s")
    text = template.replace("%s", entity)
    start_char = template.index("%s")
    end_char = start_char + len(entity)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    inside = [i for i, (s, e) in enumerate(offsets) if s < end_char and e > start_char]
    if not inside:
        raise ValueError(f"entity {entity!r} has no token in {text!r}")
    shift = 0 if bos is None else 1
    tokens = ([bos] if bos is not None else []) + list(ids)
    return Prompt(template, entity, attribute, tokens, inside[0] + shift, inside[-1] + shift)


def bos_id(model: Any) -> int | None:
    return model.tokenizer.bos_token_id if model.cfg.default_prepend_bos else None


def pad(prompts: list[Prompt], pad_id: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token tensor and the index of each prompt's last token."""
    width = max(len(p.tokens) for p in prompts)
    toks = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        toks[i, : len(p.tokens)] = torch.tensor(p.tokens)
    last = torch.tensor([len(p.tokens) - 1 for p in prompts])
    return toks.to(device), last.to(device)


MATCH_RULES = ("first_token", "prefix")
# Attributes whose first token says nothing (years, free text: every Definition starts "to"):
# always matched with ``prefix``, RAVEL's rule (see ``data``'s docstring). Names only, so this
# module needs nothing from ``data``.
PREFIX_ONLY = ("Award Year", "Birth Year", "Definition", "Pronunciation")
FREE_TEXT = ("Definition", "Pronunciation")


def rule_for(attribute: str, rule: str) -> str:
    """The matching rule a prompt asking ``attribute`` is scored with: ``rule``
    (``eval.match``), or ``prefix`` for the year-valued and free-text attributes."""
    return "prefix" if attribute in PREFIX_ONLY else rule


def _trim_overlap(prompt_text: str, label: str) -> str:
    """A free-text label without the words the prompt already ends with: ``... is to`` +
    "to leave" -> "leave", ``... as /`` + "/x/" -> "x/" (the label when nothing overlaps)."""
    tail = prompt_text.rstrip().rstrip('"').rstrip()
    if tail.endswith("/") and label.startswith("/"):
        return label[1:]
    words = label.split(" ", 1)
    if len(words) == 2 and tail.split()[-1:] == [words[0]]:
        return words[1]
    return label


def label_ids(
    tokenizer: Any, prompt_text: str, label: str, attribute: str | None = None
) -> list[int]:
    """The label's token ids as the model would produce them after ``prompt_text`` (BPE: with
    the leading space, so " Canada" is one token, not "Canada"); a free-text ``attribute``'s
    label drops the words the prompt already ends with (:func:`_trim_overlap`)."""
    if attribute in FREE_TEXT:
        label = _trim_overlap(prompt_text, label)
        pre = "" if prompt_text[-1:] in ('"', "/") or prompt_text[-1:].isspace() else " "
        return list(tokenizer(pre + label, add_special_tokens=False)["input_ids"])
    return list(tokenizer(label_prefix(prompt_text) + label, add_special_tokens=False)["input_ids"])


def matches(generated: list[int], label: list[int], rule: str) -> bool:
    """Compare token ids, never decoded text (a BPE model's " Canada." decodes as one word):
    ``first_token``: the first generated token is the label's first token (the paper: " North"
    matches "North America"); ``prefix``: generation and label agree on their common length
    (RAVEL: the label is a prefix of the generation, or the generation of the label when the
    label is longer than the tokens generated). Token ids, not characters, so "Niger" never
    matches "Nigeria" unless the tokenizer says so."""
    if not generated or not label:
        return False
    if rule == "first_token":
        return generated[0] == label[0]
    if rule == "prefix":
        n = min(len(generated), len(label))
        return list(generated[:n]) == list(label[:n])
    raise UserError(f"unknown match rule {rule!r}; valid: {', '.join(MATCH_RULES)}")


def matches_any(generated: list[int], answers: list[list[int]], rule: str) -> bool:
    """:func:`matches` against any of several accepted answers (token ids each)."""
    return any(matches(generated, a, rule) for a in answers)


def saebench_answers(label: str, attribute: str) -> list[str]:
    """The answers ``eval.protocol=saebench`` accepts for ``label`` (the label first): the
    alternatives SAEBench's RAVEL accepts (``validation.evaluate_completion``, v0.6.0), kept as
    choices but matched as token-id prefixes like the label: "the <label>" for a label naming
    the United States or the United Kingdom, "England" for the United Kingdom (SAEBench accepts
    England for the United States too, which is wrong), "Korea" for South Korea, "America" and
    "NA" for North America, "Chinese" for Mandarin, and each language of a Language label that
    lists several (SAEBench: only when the prompt says "language", and anywhere in the
    generation)."""
    out = [label]
    if "United States" in label or "United Kingdom" in label:
        out.append(f"the {label}")
    if label == "United Kingdom":
        out.append("England")
    if "South Korea" in label:
        out.append("Korea")
    if "North America" in label:
        out += ["America", "NA"]
    if "Mandarin" in label:
        out.append("Chinese")
    if attribute == "Language" and "," in label:
        out += [part.strip() for part in label.split(",") if part.strip()]
    return list(dict.fromkeys(out))


def answer_ids(
    tokenizer: Any, prompt_text: str, label: str, attribute: str, protocol: str
) -> list[list[int]]:
    """Every accepted answer's token ids after ``prompt_text``: the label's
    (:func:`label_ids`), and under ``protocol=saebench`` its alternatives' too."""
    labels = saebench_answers(label, attribute) if protocol == "saebench" else [label]
    return [label_ids(tokenizer, prompt_text, a, attribute) for a in labels]


def few_shot_templates(world: CityWorld, attributes: list[str]) -> dict[str, str]:
    """One 5-shot template per attribute: the world's own, or the paper's on real RAVEL data."""
    out = {}
    for a in attributes:
        if a in getattr(world, "few_shot_prompts", {}):
            out[a] = world.few_shot_prompts[a]
        elif world.few_shot_cities:
            out[a] = few_shot_prompt(world, a)
        elif a in PAPER_FEW_SHOT:
            out[a] = PAPER_FEW_SHOT[a]
        else:
            raise UserError(
                f"protocol saeravel has no 5-shot prompt for {a!r} (valid: Country, Continent); "
                "use eval.protocol=ravel (RAVEL's own templates)"
            )
    return out


def split_entities(
    entities: list[str], world: CityWorld, fractions: list[float], seed: int, own: bool = True
) -> dict[str, str]:
    """Entity -> train/val/test: the data's own split when it covers them (and ``own``), else
    random by ``fractions``."""
    if own and world.entity_split and all(e in world.entity_split for e in entities):
        return {e: world.entity_split[e] for e in entities}
    rng = random.Random(seed)
    order = sorted(entities)
    rng.shuffle(order)
    n_tr = int(fractions[0] * len(order))
    n_va = int(fractions[1] * len(order))
    split = {e: "train" for e in order[:n_tr]}
    split.update({e: "val" for e in order[n_tr : n_tr + n_va]})
    split.update({e: "test" for e in order[n_tr + n_va :]})
    return split


def make_pairs(
    bases: list[Prompt],
    sources_by_entity: dict[str, list[Prompt]],
    world: CityWorld,
    intervened: str,
    tokenizer: Any,
    max_pairs: int,
    rng: random.Random,
    drop_same: bool,
    allowed_sources: list[str],
    rule: str | None = None,
    known: set[tuple[str, str]] | None = None,
) -> list[Pair]:
    """Cause pairs (base queries ``intervened``: target = source's value) and isolation pairs
    (base queries another attribute: target = base's value), sources from ``allowed_sources``,
    each (base, source) at most once.

    With ``drop_same``, a pair is dropped when its two labels are equal or would be scored as
    equal under the matching ``rule`` (first_token: "United States" vs "United Kingdom"), since
    such a pair cannot show a transfer. With ``known`` (the (template, entity) prompts the model
    answers correctly), a cause pair needs the model to know the source entity's answer in the
    base's template (RAVEL's rule), so its target is reachable."""
    pairs: list[Pair] = []
    if not bases or not allowed_sources:
        return pairs
    seen: set[tuple[int, int]] = set()
    ids: dict[tuple[str, str], list[int]] = {}

    def lab_ids(template: str, entity: str, label: str, attribute: str) -> list[int]:
        key = (template.replace("%s", entity), label)
        if key not in ids:
            ids[key] = label_ids(tokenizer, key[0], label, attribute)
        return ids[key]

    attempts = 0
    while len(pairs) < max_pairs and attempts < 20 * max_pairs:
        attempts += 1
        b = rng.choice(bases)
        s_ent = rng.choice(allowed_sources)
        if s_ent == b.entity or not sources_by_entity.get(s_ent):
            continue
        src = rng.choice(sources_by_entity[s_ent])
        if (id(b), id(src)) in seen:
            continue
        q = b.attribute
        kind = "cause" if q == intervened else "isolation"
        if kind == "cause" and known is not None and (b.template, s_ent) not in known:
            continue
        lab_b, lab_s = world.entities[b.entity][q], world.entities[s_ent][q]
        ids_b = lab_ids(b.template, b.entity, lab_b, q)
        ids_s = lab_ids(b.template, b.entity, lab_s, q)
        same = lab_b == lab_s or (rule is not None and matches(ids_b, ids_s, rule_for(q, rule)))
        if drop_same and same:
            continue
        seen.add((id(b), id(src)))
        target = lab_s if kind == "cause" else lab_b
        tids = ids_s if kind == "cause" else ids_b
        pairs.append(
            Pair(b, src, intervened, kind, target, tids[0], list(tids), {"same_label": same})
        )
    return pairs
