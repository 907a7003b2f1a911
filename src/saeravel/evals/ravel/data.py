"""RAVEL data: the five files of each entity type of Huang et al. (2024), read into a
:class:`CityWorld` (the world container of any entity type).

Online, ``data.tgz`` of the public RAVEL repository is downloaded once into the cache (every
type's files are extracted); ``data_dir`` points at a folder that already holds the files
(tests use a local copy). ``ATTRIBUTES_BY_TYPE`` names each type's attributes (the table
:data:`saeravel.world.RAVEL_SCHEMAS`, written once from the files and tested against them),
so a wrong attribute is refused before anything loads.

What the loader changes in RAVEL's files: a template listed twice is kept once; an attribute
with templates but no labels (occupation's "Gender Bias") is not an attribute; an entity with
an empty value for a labelled attribute (two Nobel laureates) is left out.

Matching (``prompts.rule_for`` and ``prompts.label_ids``), always on token ids: RAVEL's own
repository scores an intervention by the generated token ids against the label's token ids
over the tokens generated (``compute_metrics`` in ``src/utils/metric_utils.py``: every
non-pad label token among the last ``n`` must equal the prediction; labels are the model's
own outputs cut to ``max_new_tokens``, 3 in its demo), with no attribute-specific rule in the
public code. saeravel follows that for the attributes where a first token says nothing:
year-valued attributes (Birth Year, Award Year) and free-text attributes (Definition,
Pronunciation) are matched with ``prefix`` (generation and label agree over their common
length, ``eval.match_tokens`` generated) whatever ``eval.match`` says. Differences from RAVEL:
the label is the data's value, not the model's own output (so a model phrasing a definition
otherwise fails the knowledge filter, where RAVEL would keep its phrasing as the label), and a
free-text label repeats no word the prompt already ends with (``The definition of "%s" is
to`` + "to leave ..." is scored on "leave ...", ``... pronounced as /`` + "/.../" on ".../").
Every other attribute (all of city's) keeps ``eval.match``.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
import urllib.request
from pathlib import Path
from typing import Any

from saeravel.errors import UserError
from saeravel.world import ENTITY_TYPES, RAVEL_SCHEMAS, CityWorld

log = logging.getLogger(__name__)

RAVEL_URL = "https://github.com/explanare/ravel/raw/main/data.tgz"
ATTRIBUTES_BY_TYPE: dict[str, tuple[str, ...]] = {t: tuple(a) for t, a in RAVEL_SCHEMAS.items()}
# Year-valued and free-text attributes: matched with ``prefix`` (see the module docstring).
YEAR_ATTRIBUTES = ("Award Year", "Birth Year")
FREE_TEXT_ATTRIBUTES = ("Definition", "Pronunciation")


def type_files(entity_type: str = "city") -> dict[str, str]:
    """The five file names of one RAVEL entity type, by role."""
    if entity_type not in RAVEL_SCHEMAS:
        raise UserError(
            f"unknown RAVEL entity type {entity_type!r}; valid: {', '.join(ENTITY_TYPES)}"
        )
    return {
        "entities": f"ravel_{entity_type}_entity_attributes.json",
        "templates": f"ravel_{entity_type}_attribute_to_prompts.json",
        "template_split": f"ravel_{entity_type}_prompt_to_split.json",
        "entity_split": f"ravel_{entity_type}_entity_to_split.json",
        "wikipedia": f"wikipedia_{entity_type}_entity_prompts.json",
    }


CITY_FILES = type_files("city")
ALL_FILES = [f for t in ENTITY_TYPES for f in type_files(t).values()]


def default_attributes(entity_type: str) -> list[str]:
    """``eval.attributes``' default on RAVEL's data: the type's first two attributes."""
    return list(ATTRIBUTES_BY_TYPE[entity_type][:2])


def check_attributes(entity_type: str, attributes: list[str] | None, key: str) -> None:
    """Every name in ``attributes`` is an attribute of ``entity_type`` (one line otherwise)."""
    valid = ATTRIBUTES_BY_TYPE[entity_type]
    bad = [a for a in attributes or [] if a not in valid]
    if bad:
        raise UserError(
            f"{key} has {bad}, not attributes of RAVEL's {entity_type}; valid: {', '.join(valid)}"
        )


# The JSON shape of each city file: a mapping whose values are of this type.
_VALUE_TYPES: dict[str, type] = {
    "entities": dict,  # entity -> {attribute: value}
    "templates": list,  # attribute -> [template with %s]
    "template_split": str,  # template -> split
    "entity_split": str,  # entity -> split
    "wikipedia": dict,  # prompt -> {"entity", "split"}
}


def _read(folder: Path, key: str, entity_type: str = "city") -> dict:
    """One file of the type, checked to be a non-empty JSON mapping of the expected values."""
    path = folder / type_files(entity_type)[key]
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"RAVEL data file {path} is not readable JSON ({exc})") from None
    want = _VALUE_TYPES[key]
    if not isinstance(data, dict) or not data or not isinstance(next(iter(data.values())), want):
        raise UserError(
            f"RAVEL data file {path} is not RAVEL's {key} file (want a non-empty JSON object "
            f"whose values are {want.__name__}s)"
        )
    return data


def check_folder(folder: str | Path, entity_type: str = "city") -> None:
    """``folder`` holds RAVEL's five files of ``entity_type``, each the JSON shape RAVEL
    writes (one-line :class:`UserError` otherwise; cheap: no model, no download)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"RAVEL data folder {folder} does not exist or is not a folder")
    files = type_files(entity_type)
    missing = [f for f in files.values() if not (folder / f).is_file()]
    if missing:
        raise UserError(f"RAVEL data folder {folder} lacks {', '.join(missing)}")
    for key in files:
        _read(folder, key, entity_type)


def check_city_folder(folder: str | Path) -> None:
    """:func:`check_folder` for cities."""
    check_folder(folder, "city")


def check_data_dir(cfg: Any) -> None:
    """``eval.data_dir`` of the RAVEL eval, before anything loads: a folder of RAVEL's files
    of ``eval.entity_type``, and not given with ``eval.data_source=embedded`` (which would not
    read it)."""
    if cfg.data_dir is None:
        return
    if str(cfg.data_source) == "embedded":
        raise UserError(
            f"eval.data_dir={cfg.data_dir} is not read with eval.data_source=embedded; set "
            "eval.data_source=ravel (or auto) to evaluate on RAVEL's files"
        )
    check_folder(cfg.data_dir, str(getattr(cfg, "entity_type", "city")))


def reads_ravel(cfg: Any) -> bool:
    """Whether the job's data is certainly RAVEL's files, known before any model loads:
    ``eval.data_source=ravel``, an ``eval.data_dir``, or an entity type other than city
    (which only RAVEL's data has)."""
    return (
        str(cfg.data_source) == "ravel"
        or cfg.data_dir is not None
        or str(getattr(cfg, "entity_type", "city")) != "city"
    )


def check_entity_type(cfg: Any) -> None:
    """``eval.entity_type`` with ``eval.attributes``, ``eval.isolation_attributes``,
    ``eval.mdas.attributes`` and ``eval.protocol``, before anything loads, when the data is
    RAVEL's (:func:`reads_ravel`): each attribute is one of the type's, and the saeravel
    protocol (a 5-shot prompt) exists only for cities' Country and Continent."""
    if not reads_ravel(cfg):
        return
    et = str(cfg.entity_type)
    check_attributes(et, cfg.attributes, "eval.attributes")
    check_attributes(et, cfg.isolation_attributes, "eval.isolation_attributes")
    check_attributes(et, cfg.mdas.attributes, "eval.mdas.attributes")
    if str(cfg.protocol) == "saeravel" and et != "city":
        raise UserError(
            f"eval.protocol=saeravel has no 5-shot prompt for RAVEL's {et} (only city's Country "
            "and Continent); use eval.protocol=ravel (RAVEL's own templates)"
        )


def load_ravel(folder: str | Path, entity_type: str = "city") -> CityWorld:
    """Read RAVEL's files of ``entity_type`` from ``folder`` (a clear error names any missing
    or wrongly shaped file); attributes in the type's order (see the module docstring for
    what is left out)."""
    folder = Path(folder).expanduser()
    files = type_files(entity_type)
    missing = [f for f in files.values() if not (folder / f).exists()]
    if missing:
        raise UserError(f"RAVEL data folder {folder} lacks {', '.join(missing)}")

    def read(key: str) -> dict:
        return _read(folder, key, entity_type)

    raw = read("templates")
    entities = read("entities")
    labelled = [a for a in raw if any(v.get(a) for v in entities.values())]
    # RAVEL stores a few duplicated templates; keep each once, in order.
    templates = {a: list(dict.fromkeys(raw[a])) for a in labelled}
    entities = {
        e: {a: v[a] for a in labelled}
        for e, v in entities.items()
        if all(isinstance(v.get(a), str) and v.get(a) for a in labelled)
    }
    return CityWorld(
        entities=entities,
        templates=templates,
        template_split=read("template_split"),
        entity_split=read("entity_split"),
        wikipedia_prompts=read("wikipedia"),
    )


def load_ravel_city(folder: str | Path) -> CityWorld:
    """:func:`load_ravel` for cities."""
    return load_ravel(folder, "city")


def download_ravel(cache_dir: str | Path, url: str = RAVEL_URL, entity_type: str = "city") -> Path:
    """Unpack every entity type's files of RAVEL into ``cache_dir/ravel``, downloading the
    archive once when a file of ``entity_type`` is missing (e.g. a cache filled when only the
    city files were extracted, asked for verbs); return the folder."""
    dest = Path(cache_dir) / "ravel"
    if all((dest / f).exists() for f in type_files(entity_type).values()):
        return dest
    log.info("downloading RAVEL data from %s", url)
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:  # noqa: S310 (fixed https URL)
            blob = resp.read()
    except OSError as exc:
        raise UserError(
            f"RAVEL data is not cached in {dest} and {url} cannot be reached ({exc}); "
            "download data.tgz there by hand or set eval.data_dir to a folder with RAVEL's files"
        ) from exc
    dest.mkdir(parents=True, exist_ok=True)
    wanted = set(ALL_FILES)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if member.isfile() and name in wanted:
                data = tar.extractfile(member)
                if data is not None:
                    tmp = dest / (name + ".tmp")
                    tmp.write_bytes(data.read())
                    tmp.replace(dest / name)
    return dest


def offline_need(cache_dir: str | Path, entity_type: str = "city") -> Any:
    """RAVEL's files of ``entity_type`` in ``cache_dir/ravel`` as an
    :class:`saeravel.offline.Need`: ``check`` looks in the cache only, ``fetch`` is
    :func:`download_ravel` (which extracts every type)."""
    from saeravel.offline import Need

    dest = Path(cache_dir) / "ravel"
    files = type_files(entity_type)

    def check() -> list[Path]:
        missing = [f for f in files.values() if not (dest / f).is_file()]
        if missing:
            n = f"{len(missing)} of {len(files)}"
            raise UserError(f"not in the cache ({dest} lacks {n} {entity_type} files)")
        return [dest]

    url = RAVEL_URL
    return Need(
        "ravel", f"{entity_type} data", url, str(dest), check,
        lambda: [download_ravel(cache_dir, url=url, entity_type=entity_type)], hosts=(url,),
    )  # fmt: skip


def eval_offline_needs(cfg: Any, ctx: Any) -> list[Any]:
    """Prefetch's answer for ``eval=ravel`` (the eval's registered ``offline_needs``): the
    files of ``eval.entity_type`` (:func:`offline_need`), or why none are fetched (``eval.data_dir`` given, or a model
    with its own world)."""
    from saeravel.offline import Skip
    from saeravel.taskdata import resolve_source

    if cfg.data_dir:
        return [Skip("RAVEL data", f"read from eval.data_dir={cfg.data_dir}")]
    if resolve_source(cfg.data_source, ctx.model.own_world, other="ravel") == "ravel":
        return [offline_need(ctx.cache_dir, str(getattr(cfg, "entity_type", "city")))]
    return [Skip("RAVEL data", f"not needed: eval=ravel on {ctx.model.name} uses its own world")]
