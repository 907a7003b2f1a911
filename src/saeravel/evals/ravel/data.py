"""RAVEL city data: the five files of Huang et al. (2024), read into a :class:`CityWorld`.

Online, ``data.tgz`` of the public RAVEL repository is downloaded once into the cache;
``data_dir`` points at a folder that already holds the files (tests use a local copy).
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
from saeravel.world import CityWorld

log = logging.getLogger(__name__)

RAVEL_URL = "https://github.com/explanare/ravel/raw/main/data.tgz"
CITY_FILES = {
    "entities": "ravel_city_entity_attributes.json",
    "templates": "ravel_city_attribute_to_prompts.json",
    "template_split": "ravel_city_prompt_to_split.json",
    "entity_split": "ravel_city_entity_to_split.json",
    "wikipedia": "wikipedia_city_entity_prompts.json",
}


# The JSON shape of each city file: a mapping whose values are of this type.
_VALUE_TYPES: dict[str, type] = {
    "entities": dict,  # entity -> {attribute: value}
    "templates": list,  # attribute -> [template with %s]
    "template_split": str,  # template -> split
    "entity_split": str,  # entity -> split
    "wikipedia": dict,  # prompt -> {"entity", "split"}
}


def _read(folder: Path, key: str) -> dict:
    """One city file, checked to be a non-empty JSON mapping of the expected values."""
    path = folder / CITY_FILES[key]
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


def check_city_folder(folder: str | Path) -> None:
    """``folder`` holds RAVEL's five city files, each the JSON shape RAVEL writes (one-line
    :class:`UserError` otherwise; cheap: no model, no download)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"RAVEL data folder {folder} does not exist or is not a folder")
    missing = [f for f in CITY_FILES.values() if not (folder / f).is_file()]
    if missing:
        raise UserError(f"RAVEL data folder {folder} lacks {', '.join(missing)}")
    for key in CITY_FILES:
        _read(folder, key)


def check_data_dir(cfg: Any) -> None:
    """``eval.data_dir`` of the RAVEL eval, before anything loads: a folder of RAVEL's city
    files, and not given with ``eval.data_source=embedded`` (which would not read it)."""
    if cfg.data_dir is None:
        return
    if str(cfg.data_source) == "embedded":
        raise UserError(
            f"eval.data_dir={cfg.data_dir} is not read with eval.data_source=embedded; set "
            "eval.data_source=ravel (or auto) to evaluate on RAVEL's files"
        )
    check_city_folder(cfg.data_dir)


def load_ravel_city(folder: str | Path) -> CityWorld:
    """Read RAVEL's city files from ``folder`` (a clear error names any missing or wrongly
    shaped file)."""
    folder = Path(folder).expanduser()
    missing = [f for f in CITY_FILES.values() if not (folder / f).exists()]
    if missing:
        raise UserError(f"RAVEL data folder {folder} lacks {', '.join(missing)}")

    def read(key: str) -> dict:
        return _read(folder, key)

    templates = read("templates")
    # RAVEL stores a few duplicated templates; keep each once, in order.
    templates = {a: list(dict.fromkeys(ts)) for a, ts in templates.items()}
    return CityWorld(
        entities=read("entities"),
        templates=templates,
        template_split=read("template_split"),
        entity_split=read("entity_split"),
        wikipedia_prompts=read("wikipedia"),
    )


def download_ravel(cache_dir: str | Path, url: str = RAVEL_URL) -> Path:
    """Download and unpack RAVEL's city files into ``cache_dir/ravel`` once; return it."""
    dest = Path(cache_dir) / "ravel"
    if all((dest / f).exists() for f in CITY_FILES.values()):
        return dest
    log.info("downloading RAVEL data from %s", url)
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:  # noqa: S310 (fixed https URL)
            blob = resp.read()
    except OSError as exc:
        raise UserError(
            f"RAVEL data is not cached in {dest} and {url} cannot be reached ({exc}); "
            "download data.tgz there by hand or set eval.data_dir to a folder with the city files"
        ) from exc
    dest.mkdir(parents=True, exist_ok=True)
    wanted = set(CITY_FILES.values())
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


def offline_need(cache_dir: str | Path) -> Any:
    """RAVEL's city files in ``cache_dir/ravel`` as an :class:`saeravel.offline.Need`: ``check``
    looks in the cache only, ``fetch`` is :func:`download_ravel`."""
    from saeravel.offline import Need

    dest = Path(cache_dir) / "ravel"

    def check() -> list[Path]:
        missing = [f for f in CITY_FILES.values() if not (dest / f).is_file()]
        if missing:
            n = f"{len(missing)} of {len(CITY_FILES)}"
            raise UserError(f"not in the cache ({dest} lacks {n} city files)")
        return [dest]

    url = RAVEL_URL
    return Need(
        "ravel", "city data", url, str(dest), check,
        lambda: [download_ravel(cache_dir, url=url)], hosts=(url,),
    )  # fmt: skip


def eval_offline_needs(cfg: Any, ctx: Any) -> list[Any]:
    """Prefetch's answer for ``eval=ravel`` (the eval's registered ``offline_needs``): the city
    files of :func:`offline_need`, or why none are fetched (``eval.data_dir`` given, or a model
    with its own world)."""
    from saeravel.offline import Skip
    from saeravel.taskdata import resolve_source

    if cfg.data_dir:
        return [Skip("RAVEL data", f"read from eval.data_dir={cfg.data_dir}")]
    if resolve_source(cfg.data_source, ctx.model.own_world, other="ravel") == "ravel":
        return [offline_need(ctx.cache_dir)]
    return [Skip("RAVEL data", f"not needed: eval=ravel on {ctx.model.name} uses its own world")]
