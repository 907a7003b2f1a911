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


_SHAPES: dict[str, tuple[str, Any]] = {
    "entities": ("an object of entity -> {attribute: value}", lambda v: isinstance(v, dict)),
    "templates": (
        "an object of attribute -> [prompt with %s, ...]",
        lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v),
    ),
    "template_split": ("an object of prompt -> split name", lambda v: isinstance(v, str)),
    "entity_split": ("an object of entity -> split name", lambda v: isinstance(v, str)),
    "wikipedia": ("an object of prompt -> {split, entity}", lambda v: isinstance(v, dict)),
}


def load_ravel_city(folder: str | Path) -> CityWorld:
    """Read RAVEL's city files from ``folder`` (a clear error names any missing file)."""
    folder = Path(folder)
    missing = [f for f in CITY_FILES.values() if not (folder / f).exists()]
    if missing:
        raise UserError(f"RAVEL data folder {folder} lacks {', '.join(missing)}")

    def read(key: str) -> dict:
        path = folder / CITY_FILES[key]
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise UserError(f"RAVEL data file {path} is not readable JSON ({exc})") from None
        want, ok = _SHAPES[key]
        if not isinstance(data, dict) or not data or not all(ok(v) for v in data.values()):
            raise UserError(f"RAVEL data file {path} is not {want} (RAVEL's city file layout)")
        return data

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
