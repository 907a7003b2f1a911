"""Task text and data below the evals, and the one seam between the embedded city world
and the hub.

:func:`data_source` makes the choice once per eval from the model: ``auto`` is the embedded
world when the model has one (``LoadedModel.world``: ``model=tiny-city-lm``,
``model=planted-city-lm``), else the eval's hub source (``hf``, ``first_letter``, ``ravel``);
``embedded`` without a world is a one-line error. Below it are the two kinds of data every
eval draws from:

* hub data: plain text of a Hugging Face dataset (:func:`dataset_texts`), packed into rows
  (:func:`pack_token_batches`, sae_lens' ``concat_and_batch_sequences``), and SAEBench's
  probing datasets (:func:`load_hf_task_texts`);
* the embedded world: fact sequences (:func:`embedded_texts`, :func:`fact_texts`) as token
  rows (:func:`world_token_batches`), the world's entity split (:func:`entity_splits`) and
  the activation at the city token of every template (:func:`entity_features`).
"""

from __future__ import annotations

import itertools
import logging
import random
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from saeravel.activations import hook_activations, model_space_latents, pooled_text_features
from saeravel.errors import UserError, choose

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
EMBEDDED = "embedded"


# ----------------------------------------------------------------------------- the seam


def resolve_source(value: str, has_world: bool, other: str = "hf") -> str:
    """``auto`` -> ``embedded`` when the model has a world, else ``other``; any other value
    unchanged (unchecked: :func:`data_source` checks)."""
    if value == "auto":
        return EMBEDDED if has_world else other
    return value


def data_source(value: str, model: Any, *, key: str = "eval.data_source", other: str = "hf") -> str:
    """The data an eval reads for ``model``: ``embedded`` or ``other`` (``value`` is ``auto``,
    ``embedded`` or ``other``; a one-line error for a typo or a missing world)."""
    choose(key, value, ("auto", EMBEDDED, other))
    has_world = getattr(model, "world", None) is not None
    source = resolve_source(value, has_world, other)
    if source == EMBEDDED and not has_world:
        raise UserError(
            f"{key}=embedded needs the embedded model (model=tiny-city-lm); "
            f"{model.name} has no city world: use {key}={other}"
        )
    return source


# ----------------------------------------------------------------------------- hub text


def dataset_error(what: str, exc: BaseException, hint: str) -> UserError:
    """One line for a dataset that could not be loaded: what, the library's first line, and
    ``hint`` (how to get it into the cache or what to use instead)."""
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return UserError(f"{what} could not be loaded ({type(exc).__name__}: {first}); {hint}")


def _dataset_error(dataset: str, split: str, exc: BaseException) -> UserError:
    return dataset_error(
        f"dataset {dataset!r} (split {split!r})",
        exc,
        "if it is not in the local Hugging Face datasets cache and the hub cannot be "
        "reached: on a machine with a network run this eval once with eval.streaming=false "
        "(downloads the split into ~/.cache/huggingface/datasets), then set "
        "HF_DATASETS_OFFLINE=1; or save some rows as JSON lines and use eval.dataset=json "
        "eval.data_files=/path/to/text.jsonl; or use eval.text_source=embedded with "
        "model=tiny-city-lm",
    )


_LOAD_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, ConnectionError)


def dataset_texts(
    dataset: str,
    *,
    dataset_config: str | None = None,
    data_files: str | None = None,
    split: str = "train",
    text_column: str = "text",
    streaming: bool = True,
    shuffle_buffer: int = 1,
    seed: int = 42,
) -> Iterator[str]:
    """Texts of a Hugging Face dataset, optionally shuffled; a one-line error when it cannot
    be loaded (offline, not cached, missing file, unknown name)."""
    import datasets

    try:
        ds = datasets.load_dataset(
            dataset, dataset_config, data_files=data_files, split=split, streaming=streaming
        )
        if shuffle_buffer > 0:
            ds = (
                ds.shuffle(seed=seed, buffer_size=shuffle_buffer)
                if streaming
                else ds.shuffle(seed=seed)
            )
        rows = iter(ds)
        first = next(rows)
    except StopIteration:
        raise UserError(f"dataset {dataset!r} (split {split!r}) is empty") from None
    except _LOAD_ERRORS as exc:
        raise _dataset_error(dataset, split, exc) from exc
    if text_column not in first:
        raise UserError(
            f"dataset {dataset!r} has no column {text_column!r}; valid: {', '.join(first)} "
            "(set eval.text_column)"
        )
    yield first[text_column]
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except _LOAD_ERRORS as exc:
            raise _dataset_error(dataset, split, exc) from exc
        yield row[text_column]


def pack_token_batches(
    texts: Iterable[str],
    tokenizer: Any,
    *,
    context_size: int,
    batch_size: int,
    prepend_bos: bool = True,
) -> Iterator[torch.Tensor]:
    """Concatenate tokenised texts, each followed by a separator (BOS, else EOS), and cut the
    stream into rows of ``context_size`` tokens, each starting with BOS when ``prepend_bos``;
    whole batches of ``batch_size`` rows only.

    The stream is cut by sae_lens' ``concat_and_batch_sequences`` (with no begin or separator
    token of its own: a plain cut); the BOS head is added here because sae_lens'
    ``begin_batch_token_id`` is left out when a row starts with a separator that is BOS
    (GPT-2's BOS is its EOS), which would shift every later row by one token."""
    from sae_lens.tokenization_and_batching import concat_and_batch_sequences

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    head = torch.tensor([bos] if prepend_bos and bos is not None else [], dtype=torch.long)
    sep = bos if bos is not None else eos
    body = context_size - len(head)
    if body < 1:
        raise UserError(f"context_size={context_size} leaves no room for text")

    def sequences() -> Iterator[torch.Tensor]:
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids = [*ids, sep] if sep is not None else ids
            if ids:
                yield torch.tensor(ids, dtype=torch.long)

    batch: list[torch.Tensor] = []
    for row in concat_and_batch_sequences(sequences(), body):
        batch.append(torch.cat([head, row]))
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []


def token_batches(cfg: Any, lm: Any, n_batches: int) -> Iterator[torch.Tensor]:
    """Token batches of plain text for ``lm`` (``cfg`` a :class:`TextSourceConfig` with
    ``batch_size_prompts``, ``prepend_bos`` and ``facts_per_sequence``): embedded fact
    sequences, or a Hugging Face dataset packed into rows."""
    tokenizer = lm.tokenizer
    if tokenizer is None:
        raise UserError(f"model {lm.name} has no tokenizer; eval=core needs one to make text")
    n_ctx = lm.model.cfg.n_ctx
    if data_source(cfg.text_source, lm, key="eval.text_source") == EMBEDDED:
        texts = embedded_texts(
            lm.world, n_batches * cfg.batch_size_prompts, cfg.facts_per_sequence, cfg.seed
        )
        return world_token_batches(
            tokenizer, texts, cfg.batch_size_prompts, min(cfg.context_size, n_ctx)
        )
    if cfg.context_size > n_ctx:
        raise UserError(f"eval.context_size={cfg.context_size} exceeds {lm.name}'s n_ctx={n_ctx}")
    texts = dataset_texts(
        cfg.dataset,
        dataset_config=cfg.dataset_config,
        data_files=cfg.data_files,
        split=cfg.split,
        text_column=cfg.text_column,
        streaming=cfg.streaming,
        shuffle_buffer=cfg.shuffle_buffer,
        seed=cfg.seed,
    )
    return pack_token_batches(
        texts,
        tokenizer,
        context_size=cfg.context_size,
        batch_size=cfg.batch_size_prompts,
        prepend_bos=cfg.prepend_bos,
    )


# ----------------------------------------------------------------------------- embedded text


def embedded_texts(world: Any, n: int, facts_per_sequence: int, seed: int) -> list[str]:
    """``n`` fact sequences of the city world (1..``facts_per_sequence`` facts each)."""
    from saeravel.tiny_lm import sample_sequence

    rng = random.Random(seed)
    attributes = list(world.templates)
    return [sample_sequence(world, attributes, facts_per_sequence, rng) for _ in range(n)]


def fact_texts(
    world: Any,
    cities: Sequence[str],
    attributes: Sequence[str],
    n: int,
    facts_per_sequence: int,
    seed: int,
) -> list[str]:
    """``n`` sequences of ``facts_per_sequence`` fact sentences about ``cities``."""
    from saeravel.tiny_lm import fact_sentence

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = []
        for _ in range(facts_per_sequence):
            attr = rng.choice(list(attributes))
            city = rng.choice(list(cities))
            parts.append(fact_sentence(world, city, attr, rng.choice(world.templates[attr])))
        out.append(" ".join(parts))
    return out


def world_token_batches(
    tokenizer: Any, texts: Sequence[str], batch_size: int, width: int
) -> Iterator[torch.Tensor]:
    """BOS + tokens of ``texts`` (the embedded model's word tokenizer), right-padded, cut to
    ``width`` positions, ``batch_size`` texts a batch."""
    from saeravel.tiny_lm import encode_batch

    for i in range(0, len(texts), batch_size):
        toks, _ = encode_batch(tokenizer, list(texts[i : i + batch_size]), "cpu")
        yield toks[:, :width]


# ----------------------------------------------------------------------------- the world's entities


def entity_splits(world: Any) -> dict[str, str]:
    """Entity -> split (train/val/test) of the world's own entity split."""
    return {e: s for e, s in world.entity_split.items() if s in SPLITS}


def world_entities(world: Any) -> dict[str, dict[str, str]]:
    """The world's entities and their attributes, without the few-shot cities."""
    few = set(world.few_shot_cities)
    return {e: a for e, a in world.entities.items() if e not in few}


@torch.no_grad()
def entity_features(
    model: Any,
    sae: Any,
    hook_name: str,
    world: Any,
    entities: Sequence[str],
    batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Residual and SAE latents at the city token of every template of the world; returns
    (resid [n, d], latents [n, d_sae], entity of each row)."""
    from saeravel.tiny_lm import encode_batch

    prompts = [(e, t) for e in entities for temps in world.templates.values() for t in temps]
    resid, lat = [], []
    device = model.cfg.device
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        toks, _ = encode_batch(model.tokenizer, [t % e for e, t in chunk], str(device))
        pos = torch.tensor([1 + t.split().index("%s") for _, t in chunk], device=toks.device)
        x = hook_activations(model, hook_name, toks)[
            torch.arange(len(chunk), device=toks.device), pos
        ]
        resid.append(x.float().cpu())
        lat.append(sae.encode(x).float().cpu())
    return torch.cat(resid).numpy(), torch.cat(lat).numpy(), [e for e, _ in prompts]


# ----------------------------------------------------------------------------- hub probing data


@dataclass(frozen=True)
class HFTaskSpec:
    """How to read one of SAEBench's probing datasets."""

    path: str
    text: str
    label: str
    classes: tuple[str, ...]
    balance: str | None = None  # a second column balanced within each class
    test_split: str = "test"


HF_TASKS: dict[str, HFTaskSpec] = {
    "LabHC/bias_in_bios_class_set1": HFTaskSpec(
        "LabHC/bias_in_bios", "hard_text", "profession", ("0", "1", "2", "6", "9"), "gender"
    ),
    "LabHC/bias_in_bios_class_set2": HFTaskSpec(
        "LabHC/bias_in_bios", "hard_text", "profession", ("11", "13", "14", "18", "19"), "gender"
    ),
    "LabHC/bias_in_bios_class_set3": HFTaskSpec(
        "LabHC/bias_in_bios", "hard_text", "profession", ("20", "21", "22", "25", "26"), "gender"
    ),
    "canrager/amazon_reviews_mcauley_1and5": HFTaskSpec(
        "canrager/amazon_reviews_mcauley_1and5",
        "text",
        "category",
        ("1", "2", "3", "5", "6"),
        "rating",
    ),
    "canrager/amazon_reviews_mcauley_1and5_sentiment": HFTaskSpec(
        "canrager/amazon_reviews_mcauley_1and5", "text", "rating", ("1.0", "5.0")
    ),
    "fancyzhx/ag_news": HFTaskSpec("fancyzhx/ag_news", "text", "label", ("0", "1", "2", "3")),
}


# Europarl: one configuration per language pair; the text of ``lang`` is read from it.
EUROPARL_PAIRS = {"en": "en-fr", "fr": "fr-it", "de": "de-en", "es": "es-fr", "nl": "nl-pt"}


HF_TASK_NAMES = (*HF_TASKS, "Helsinki-NLP/europarl")


def _hf_error(name: str, exc: BaseException, eval_name: str = "sparse_probing") -> UserError:
    return dataset_error(
        f"probing dataset {name!r}",
        exc,
        "if it is not in the local Hugging Face datasets cache and the hub cannot be reached: "
        f"on a machine with a network run eval={eval_name} once to cache it, then set "
        "HF_DATASETS_OFFLINE=1; or use the embedded tasks (eval.data_source=embedded with "
        "model=tiny-city-lm)",
    )


def _take_per_class(
    rows: Any, spec: HFTaskSpec, n_per_class: int, skip: dict[str, set[int]] | None = None
) -> dict[str, list[tuple[int, str]]]:
    """Up to ``n_per_class`` (row index, text) per class, balanced over ``spec.balance``."""
    wanted = set(spec.classes)
    per_group = n_per_class // 2 if spec.balance else n_per_class
    counts: dict[tuple[str, str], int] = {}
    out: dict[str, list[tuple[int, str]]] = {c: [] for c in spec.classes}
    for i, row in enumerate(rows):
        label = str(row[spec.label])
        if label not in wanted or (skip and i in skip.get(label, set())):
            continue
        group = (label, str(row[spec.balance]) if spec.balance else "")
        if counts.get(group, 0) >= per_group:
            continue
        counts[group] = counts.get(group, 0) + 1
        out[label].append((i, row[spec.text]))
        if all(
            len(v) >= 2 * per_group if spec.balance else len(v) >= per_group for v in out.values()
        ):
            break
    return out


def load_hf_task_texts(
    name: str, n_train: int, n_val: int, n_test: int, seed: int, eval_name: str = "sparse_probing"
) -> dict[str, dict[str, list[str]]]:
    """``{split: {class: texts}}`` of one SAEBench probing dataset (val is carved from the
    training split, disjoint from train); ``eval_name`` only words the offline error."""
    import datasets

    choose("probing dataset", name, HF_TASK_NAMES)
    per = {s: max(1, n // 2) for s, n in zip(SPLITS, (n_train, n_val, n_test), strict=True)}
    try:
        if name == "Helsinki-NLP/europarl":
            return _load_europarl(per, seed)
        spec = HF_TASKS[name]
        train_rows = datasets.load_dataset(spec.path, split="train").shuffle(seed=seed)
        test_rows = datasets.load_dataset(spec.path, split=spec.test_split).shuffle(seed=seed)
    except (OSError, ValueError, ConnectionError) as exc:
        raise _hf_error(name, exc, eval_name) from exc
    train = _take_per_class(train_rows, spec, per["train"])
    used = {c: {i for i, _ in v} for c, v in train.items()}
    val = _take_per_class(train_rows, spec, per["val"], skip=used)
    test = _take_per_class(test_rows, spec, per["test"])
    return {
        split: {c: [t for _, t in rows] for c, rows in data.items()}
        for split, data in zip(SPLITS, (train, val, test), strict=True)
    }


def _load_europarl(per: dict[str, int], seed: int) -> dict[str, dict[str, list[str]]]:
    import datasets

    out: dict[str, dict[str, list[str]]] = {s: {} for s in SPLITS}
    total = sum(per.values())
    for lang, pair in EUROPARL_PAIRS.items():
        rows = datasets.load_dataset("Helsinki-NLP/europarl", pair, split="train", streaming=True)
        texts = []
        for row in rows:
            texts.append(row["translation"][lang])
            if len(texts) >= total:
                break
        random.Random(seed).shuffle(texts)
        start = 0
        for split in SPLITS:
            out[split][lang] = texts[start : start + per[split]]
            start += per[split]
    return out


# ----------------------------------------------------------------------------- classification tasks


@dataclass
class ProbeTask:
    """Features of one task: per split, residual features, SAE features and class labels."""

    name: str
    classes: list[str]
    resid: dict[str, np.ndarray]
    latents: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]


def embedded_tasks(
    model: Any,
    sae: Any,
    hook_name: str,
    world: Any,
    attributes: Sequence[str],
    max_classes: int,
    min_train_entities: int,
    batch_size: int = 64,
) -> list[ProbeTask]:
    """One task per attribute: the most frequent values with at least ``min_train_entities``
    training entities and at least one validation and one test entity."""
    split_of = entity_splits(world)
    entities = sorted(split_of)
    resid, lat, row_entity = entity_features(model, sae, hook_name, world, entities, batch_size)
    row_split = np.array([split_of[e] for e in row_entity])
    tasks = []
    for attr in attributes:
        choose("attribute", attr, sorted(next(iter(world.entities.values()))))
        counts: dict[str, dict[str, int]] = {}
        for e in entities:
            value = world.entities[e][attr]
            counts.setdefault(value, dict.fromkeys(SPLITS, 0))[split_of[e]] += 1
        eligible = [
            v
            for v, c in counts.items()
            if c["train"] >= min_train_entities and c["val"] >= 1 and c["test"] >= 1
        ]
        eligible.sort(key=lambda v: (-counts[v]["train"], v))
        classes = eligible[:max_classes]
        if len(classes) < 1:
            log.warning("attribute %s has no class with enough entities; skipped", attr)
            continue
        labels = np.array([world.entities[e][attr] for e in row_entity])
        tasks.append(
            ProbeTask(
                name=attr,
                classes=classes,
                resid={s: resid[row_split == s] for s in SPLITS},
                latents={s: lat[row_split == s] for s in SPLITS},
                labels={s: labels[row_split == s] for s in SPLITS},
            )
        )
    return tasks


def hf_task(model: Any, sae: Any, hook_name: str, name: str, req: TaskRequest) -> ProbeTask:
    """Mean-pooled features of one SAEBench probing dataset: ``req.sizes`` train, val and
    test texts, the first ``req.hub_max_classes`` classes with data in every split
    (``req.model_space``: see :func:`~saeravel.activations.pooled_text_features`)."""
    data = load_hf_task_texts(name, *req.sizes, req.seed, eval_name=req.eval_name)
    classes = [c for c in data["train"] if all(data[s].get(c) for s in SPLITS)]
    classes = classes[: req.hub_max_classes]
    resid, lat, labels = {}, {}, {}
    for split in SPLITS:
        texts = [t for c in classes for t in data[split][c]]
        labels[split] = np.array([c for c in classes for _ in data[split][c]])
        resid[split], lat[split] = pooled_text_features(
            model, sae, hook_name, texts, req.context_length, req.batch_size, req.model_space
        )
    return ProbeTask(name, classes, resid, lat, labels)


@dataclass(frozen=True)
class TaskRequest:
    """The classification tasks an eval asks for, in either world: ``attributes`` (embedded:
    one task per city attribute, its ``max_classes`` most frequent values with
    ``min_train_entities`` training cities) or ``dataset_names`` (hub: one task per SAEBench
    probing dataset, ``sizes`` train/val/test texts, the first ``hub_max_classes`` classes)."""

    attributes: Sequence[str]
    dataset_names: Sequence[str]
    max_classes: int
    min_train_entities: int
    sizes: tuple[int, int, int]
    context_length: int
    batch_size: int
    seed: int
    hub_max_classes: int | None = None
    model_space: bool = False  # latents times the input's layer-norm std (see activations)
    eval_name: str = "sparse_probing"


def classification_tasks(
    source: str, lm: Any, sae: Any, hook_name: str, req: TaskRequest
) -> list[ProbeTask]:
    """The tasks of ``req`` from the embedded world (``source == "embedded"``) or the hub."""
    from tqdm.auto import tqdm

    if source == EMBEDDED:
        tasks = embedded_tasks(
            lm.model, sae, hook_name, lm.world, req.attributes, req.max_classes,
            req.min_train_entities, req.batch_size,
        )  # fmt: skip
        if req.model_space:
            for t in tasks:
                t.latents = {s: model_space_latents(sae, t.resid[s], t.latents[s]) for s in SPLITS}
        return tasks
    for name in req.dataset_names:
        choose("probing dataset", name, HF_TASK_NAMES)
    return [
        hf_task(lm.model, sae, hook_name, name, req)
        for name in tqdm(req.dataset_names, desc="probing datasets", leave=False)
    ]


# ----------------------------------------------------------------------------- paired concepts


@dataclass(frozen=True)
class PairRequest:
    """The two-concept data an eval asks for (SCR): ``attributes`` (embedded: the city
    attributes of column1 and column2, cities split per cell by ``split_fractions``) or
    ``sizes`` (hub: train/val/test texts per pair, a quarter per cell)."""

    attributes: tuple[str, str]
    split_fractions: Sequence[float]
    sizes: tuple[int, int, int]
    context_length: int
    batch_size: int
    seed: int


Pair = tuple[str, str, str, str]


def paired_cells(
    source: str,
    lm: Any,
    sae: Any,
    hook: str,
    plan: Sequence[tuple[str, Sequence[Pair]]],
    req: PairRequest,
) -> Iterator[tuple[str, Pair, CellData]]:
    """``(dataset, pair, rows)`` for every pair of ``plan`` (``[(dataset, pairs)]``), from the
    embedded world (one dataset; the rows of all its pairs computed once) or the hub (texts
    read once per dataset, features per pair: rows x d_sae stays bounded)."""
    if source == EMBEDDED:
        [(name, pairs)] = plan
        data = embedded_cell_data(lm, sae, hook, pairs, req)
        for pair in pairs:
            yield name, pair, data
        return
    n_train, n_val, n_test = (n // 4 for n in req.sizes)
    for name, pairs in plan:
        cells = sorted({c for p in pairs for c in cells_of(p)})
        texts = load_paired_texts(name, cells, n_train, n_val, n_test, req.seed)
        for pair in pairs:
            sub = {s: {c: texts[s][c] for c in cells_of(pair)} for s in SPLITS}
            yield name, pair, hf_cell_data(lm.model, sae, hook, sub, req)


# LabHC/bias_in_bios: ``profession`` (ClassLabel, alphabetical) and ``gender`` (0 male, 1 female).
BIOS_PROFESSIONS = (
    "accountant", "architect", "attorney", "chiropractor", "comedian", "composer", "dentist",
    "dietitian", "dj", "filmmaker", "interior_designer", "journalist", "model", "nurse",
    "painter", "paralegal", "pastor", "personal_trainer", "photographer", "physician", "poet",
    "professor", "psychologist", "rapper", "software_engineer", "surgeon", "teacher",
    "yoga_teacher",
)  # fmt: skip


# canrager/amazon_reviews_mcauley_1and5 categories (SAEBench's integer codes); a row matches
# a category by its name or by its code.
AMAZON_CATEGORIES = (
    "All_Beauty", "Toys_and_Games", "Cell_Phones_and_Accessories", "Industrial_and_Scientific",
    "Gift_Cards", "Musical_Instruments", "Electronics", "Handmade_Products",
    "Arts_Crafts_and_Sewing", "Baby_Products", "Health_and_Household", "Office_Products",
    "Digital_Music", "Grocery_and_Gourmet_Food", "Sports_and_Outdoors", "Home_and_Kitchen",
    "Subscription_Boxes", "Tools_and_Home_Improvement", "Pet_Supplies", "Video_Games",
    "Kindle_Store", "Clothing_Shoes_and_Jewelry", "Patio_Lawn_and_Garden", "Unknown", "Books",
    "Automotive", "CDs_and_Vinyl", "Beauty_and_Personal_Care", "Amazon_Fashion",
    "Magazine_Subscriptions", "Software", "Health_and_Personal_Care", "Appliances",
    "Movies_and_TV",
)  # fmt: skip


@dataclass(frozen=True)
class PairedDatasetSpec:
    """A Hugging Face dataset with two label columns; ``codes*`` map value names to stored codes."""

    path: str
    text: str
    column1: str
    column2: str
    codes1: dict[str, str]
    codes2: dict[str, str]
    test_split: str = "test"


def _codes(names: Sequence[str]) -> dict[str, str]:
    return {name: str(i) for i, name in enumerate(names)}


_BIOS = PairedDatasetSpec("LabHC/bias_in_bios", "hard_text", "profession", "gender",
                          _codes(BIOS_PROFESSIONS), {"male": "0", "female": "1"})  # fmt: skip
_AMAZON = PairedDatasetSpec("canrager/amazon_reviews_mcauley_1and5", "text", "category", "rating",
                            _codes(AMAZON_CATEGORIES), {"1.0": "1.0", "5.0": "5.0"})  # fmt: skip
PAIRED_DATASETS: dict[str, PairedDatasetSpec] = {
    "LabHC/bias_in_bios_class_set1": _BIOS,
    "LabHC/bias_in_bios_class_set2": _BIOS,
    "LabHC/bias_in_bios_class_set3": _BIOS,
    "canrager/amazon_reviews_mcauley_1and5": _AMAZON,
}


@dataclass
class CellData:
    """Rows of one data source, per split: activations, model-space latents, both labels."""

    x: dict[str, np.ndarray]
    a: dict[str, np.ndarray]
    v1: dict[str, np.ndarray]
    v2: dict[str, np.ndarray]


def _norm(value: Any) -> str:
    """Numbers compare by value (``5``, ``5.0`` and ``"5.0"`` are equal), the rest as text."""
    try:
        return f"{float(value):g}"
    except (TypeError, ValueError):
        return str(value)


def _collect(
    rows: Any, spec: PairedDatasetSpec, keys: dict[tuple[str, str], tuple[str, str]], n: int
) -> dict[tuple[str, str], list[str]]:
    out: dict[tuple[str, str], list[str]] = {cell: [] for cell in set(keys.values())}
    full = 0
    for row in rows:
        cell = keys.get((_norm(row[spec.column1]), _norm(row[spec.column2])))
        if cell is None or len(out[cell]) >= n:
            continue
        out[cell].append(row[spec.text])
        full += len(out[cell]) == n
        if full == len(out):
            break
    return out


def load_paired_texts(
    name: str, cells: Sequence[tuple[str, str]], n_train: int, n_val: int, n_test: int, seed: int
) -> dict[str, dict[tuple[str, str], list[str]]]:
    """``{split: {(value1, value2): texts}}``: up to ``n_*`` texts per cell; val is carved
    from the training split, disjoint from train."""
    import datasets

    choose("SCR dataset", name, PAIRED_DATASETS)
    spec = PAIRED_DATASETS[name]
    try:
        cols = [spec.text, spec.column1, spec.column2]
        train_rows = datasets.load_dataset(spec.path, split="train").select_columns(cols)
        test_rows = datasets.load_dataset(spec.path, split=spec.test_split).select_columns(cols)
    except (OSError, ValueError, ConnectionError) as exc:
        raise dataset_error(
            f"dataset {spec.path!r} (for {name!r})",
            exc,
            "if it is not in the local Hugging Face datasets cache and the hub cannot be "
            "reached: on a machine with a network run eval=scr once to cache it, then set "
            "HF_DATASETS_OFFLINE=1; or use eval.data_source=embedded with model=tiny-city-lm",
        ) from exc
    keys = {}
    for v1, v2 in cells:
        for k1 in {_norm(v1), _norm(spec.codes1[v1])}:
            for k2 in {_norm(v2), _norm(spec.codes2[v2])}:
                keys[(k1, k2)] = (v1, v2)
    trainval = _collect(train_rows.shuffle(seed=seed), spec, keys, n_train + n_val)
    test = _collect(test_rows.shuffle(seed=seed), spec, keys, n_test)
    for cell, texts in {**trainval, **test}.items():
        if not texts:
            raise UserError(f"dataset {spec.path!r} has no row with {spec.column1}, "
                            f"{spec.column2} = {cell}")  # fmt: skip
    return {
        "train": {c: t[:n_train] for c, t in trainval.items()},
        "val": {c: t[n_train:] for c, t in trainval.items()},
        "test": test,
    }


def hf_cell_data(
    model: Any,
    sae: Any,
    hook: str,
    texts: dict[str, dict[tuple[str, str], list[str]]],
    req: PairRequest,
) -> CellData:
    """Mean-pooled activations and model-space latents of every text."""
    data = CellData({}, {}, {}, {})
    for split in SPLITS:
        cells = list(texts[split])
        flat = [t for c in cells for t in texts[split][c]]
        data.x[split], data.a[split] = pooled_text_features(
            model, sae, hook, flat, req.context_length, req.batch_size, model_space=True
        )
        data.v1[split] = np.array([c[0] for c in cells for _ in texts[split][c]])
        data.v2[split] = np.array([c[1] for c in cells for _ in texts[split][c]])
    return data


def choose_embedded_pairs(
    world: Any, attr1: str, attr2: str, min_cell: int, max_pairs: int
) -> list[tuple[str, str, str, str]]:
    """Up to ``max_pairs`` ``(a1, a2, b1, b2)`` whose four cells all have ``min_cell`` cities,
    the largest smallest cell first; ``(a1, b1)`` and ``(a2, b2)`` are the biased cells, the
    orientation whose smaller biased cell is larger."""
    counts = Counter((e[attr1], e[attr2]) for e in world_entities(world).values())
    vals1 = sorted({k[0] for k in counts})
    vals2 = sorted({k[1] for k in counts})
    candidates = []
    for a1, a2 in itertools.combinations(vals1, 2):
        for b1, b2 in itertools.combinations(vals2, 2):
            cells = [counts[(a1, b1)], counts[(a2, b2)], counts[(a1, b2)], counts[(a2, b1)]]
            if min(cells) < min_cell:
                continue
            if min(cells[2:]) > min(cells[:2]):
                b1, b2 = b2, b1
                cells = cells[2:] + cells[:2]
            candidates.append(((-min(cells), -min(cells[:2])), (a1, a2, b1, b2)))
    candidates.sort()
    return [pair for _, pair in candidates[:max_pairs]]


def split_cells(
    world: Any,
    attr1: str,
    attr2: str,
    cells: Sequence[tuple[str, str]],
    fractions: Sequence[float],
    seed: int,
) -> dict[str, str]:
    """Entity -> split, stratified within each cell (>= 1 city per split)."""
    ents = world_entities(world)
    out = {}
    for cell in sorted(set(cells)):
        names = sorted(e for e, a in ents.items() if (a[attr1], a[attr2]) == cell)
        random.Random(f"{seed}-{cell}").shuffle(names)
        n = len(names)
        n_val = max(1, round(fractions[1] * n))
        n_test = max(1, round(fractions[2] * n))
        n_train = n - n_val - n_test
        for i, e in enumerate(names):
            out[e] = "train" if i < n_train else ("val" if i < n_train + n_val else "test")
    return out


def embedded_cell_data(
    lm: Any, sae: Any, hook: str, pairs: Sequence[tuple[str, str, str, str]], req: PairRequest
) -> CellData:
    """City-token activations of every city in the cells of ``pairs``, in every template."""
    attr1, attr2 = req.attributes
    cells = [c for p in pairs for c in cells_of(p)]
    split = split_cells(lm.world, attr1, attr2, cells, req.split_fractions, req.seed)
    cities = sorted(split)
    resid, lat, row_entity = entity_features(lm.model, sae, hook, lm.world, cities, req.batch_size)
    a = model_space_latents(sae, resid, lat)
    row_split = np.array([split[e] for e in row_entity])
    v1 = np.array([lm.world.entities[e][attr1] for e in row_entity])
    v2 = np.array([lm.world.entities[e][attr2] for e in row_entity])
    return CellData(
        {s: resid[row_split == s] for s in SPLITS},
        {s: a[row_split == s] for s in SPLITS},
        {s: v1[row_split == s] for s in SPLITS},
        {s: v2[row_split == s] for s in SPLITS},
    )


def cells_of(pair: Sequence[str]) -> list[tuple[str, str]]:
    """The four (value1, value2) cells of ``(a1, a2, b1, b2)``."""
    return [(pair[i], pair[j]) for i in (0, 1) for j in (2, 3)]
