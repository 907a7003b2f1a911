"""Helpers shared by several test files (``from helpers import ...``; tests/ is on sys.path
through its conftest.py). Fixtures live in conftest.py; plain functions and constants here."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from saeravel.evals.api import EvalContext
from saeravel.models import LoadedModel
from saeravel.saes.base import SAE, SAEIdentity

ROOT = Path(__file__).resolve().parents[1]
# RAVEL's data files of every entity type: ../shared/ravel from the project's root
# (RAVEL_SHARED: elsewhere, e.g. from a git worktree); tests needing them skip without them.
RAVEL_SHARED = Path(os.environ.get("RAVEL_SHARED", ROOT.parent / "shared" / "ravel"))
needs_shared = pytest.mark.skipif(not RAVEL_SHARED.exists(), reason="../shared/ravel not present")
D = 64
HOOK0 = "blocks.0.hook_resid_post"
ARCH = {"n_layers": 2, "d_model": D, "n_heads": 4, "d_mlp": 128, "n_ctx": 96, "local_layers": 1}
"""The tiny test model's architecture (2 layers, d_model 64) for ``tiny_lm.build_model``."""

SMALL_CITY = [
    "model.n_layers=3", "model.d_model=64", "model.n_heads=4", "model.d_mlp=256",
    "model.local_layers=2", "model.n_cities=40", "model.attributes=[Country,Continent]",
    "model.train_steps=250", "model.train_batch=32", "model.lr=3e-3", "model.default_layer=1",
    "sae.steps=300", "sae.expansion=4", "sae.k=8", "sae.n_sequences=300",
    "eval.epochs=3", "eval.max_pairs_per_split=80", "eval.max_entities=null",
]  # fmt: skip
"""Overrides of the default job for a 3-layer, d_model 64 model over 40 cities that learns
Country and Continent in ~200 steps (with a small trained SAE and a short RAVEL eval)."""


def identity_sae(
    *, d_sae: int = 2 * D, hook: str = HOOK0, normalize: str = "none", d: int = D
) -> SAE:
    """Latents relu(x), relu(-x) (the first ``d_sae`` of them; of the normalised input for a
    layer-norm SAE) with the decoder [I; -I]: exact reconstruction at ``d_sae = 2 d``."""
    eye = torch.eye(d)
    return SAE(
        torch.cat([eye, -eye], 1)[:, :d_sae], torch.zeros(d_sae),
        torch.cat([eye, -eye], 0)[:d_sae], torch.zeros(d), hook_name=hook,
        identity=SAEIdentity("t"), normalize=normalize,
    )  # fmt: skip


def decode_budget(
    model: Any, layer: int, prompts: list[Any], sets: int, n_tokens: int, bases: int,
    site: str = "resid_post",
) -> float:  # fmt: skip
    """The ``mem_gb`` at which a ``CachedDecoder`` pass holds ``bases`` of ``prompts`` times
    ``sets`` vector sets (so every group is decoded in passes of ``bases``)."""
    from saeravel.evals.ravel.decode import CachedDecoder

    dec = CachedDecoder(model, layer, 1.0, site=site)
    need = max(dec.pass_bytes(bases, sets, p.entity_start, len(p.tokens), n_tokens)
               for p in prompts)  # fmt: skip
    return (need + 0.5) / 1e9


def planted_ravel_job(
    tmp_path: Path, name: str, *overrides: str, method: str = "sae_probe", device: str = "cpu"
) -> dict[str, Any]:
    """The metrics of a small planted-world RAVEL job (by default ``eval.method=sae_probe``:
    its selection, scores and the references) in ``tmp_path / name``."""
    from hydra import compose, initialize_config_dir

    from saeravel.pipeline import run

    out = tmp_path / name
    small = ["model=planted-city-lm", "model.basis=rotated", "sae=planted", f"device={device}",
             "model.n_entities=60", "model.n_country=10", "model.n_continent=4",
             "model.n_language=6", "model.id_dims=6", "model.d_model=48",
             "eval.max_pairs_per_split=60", "eval.max_entities=null", "eval.checkpoint_every_s=0",
             "eval.bootstrap=50", "eval.match=prefix", f"eval.method={method}"]  # fmt: skip
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[
            *small, *overrides, f"paths.cache_dir={out / 'cache'}",
            f"paths.output_dir={out / 'out'}", f"paths.results_dir={out / 'results'}",
        ])  # fmt: skip
    return run(cfg)["eval_result_metrics"]


def fast_and_naive_jobs(tmp_path: Path, device: str = "cpu") -> tuple[dict, dict]:
    """The metrics of one small planted job (every method) with ``eval.fast=true`` and
    ``false`` (the full-forward reference)."""
    fast, naive = (
        planted_ravel_job(
            tmp_path,
            str(f),
            "eval.epochs=2",
            "eval.mask.refine_pairs=16",
            f"eval.fast={f}",
            method="all",
            device=device,
        )  # fmt: skip
        for f in (True, False)
    )
    return fast, naive


def cell_world(cells: dict[tuple[str, str], int]) -> Any:
    """A city world with ``n`` cities per (continent, language) cell (one template per
    attribute, so 4 rows per city); splits cycle train, train, val, test, train, test."""
    from saeravel.world import TEMPLATES, CityWorld

    fixed = {"Timezone": "Tz", "Latitude": "0", "Longitude": "0"}
    entities, entity_split = {}, {}
    for (cont, lang), n in cells.items():
        for i in range(n):
            name = f"{cont.lower()}{lang.lower()}city{i}"
            entities[name] = {
                "Continent": cont,
                "Country": cont + "land",
                "Language": lang,
                **fixed,
            }
            entity_split[name] = ("train", "train", "val", "test", "train", "test")[i % 6]
    templates = {a: t[:1] for a, t in TEMPLATES.items()}
    return CityWorld(entities=entities, templates=templates, entity_split=entity_split)


def ctx_for(lm: LoadedModel, sae: SAE | None, tmp_path: Path, hook: str = HOOK0) -> EvalContext:
    """An eval's context on CPU at layer 0, seed 0, writing under ``tmp_path``."""
    return EvalContext(lm, sae, 0, hook, "cpu", 0, tmp_path, tmp_path)


@dataclass
class CliRun:
    """What ``saeravel.cli.main`` did: its exit code and what it wrote."""

    code: int
    out: str
    err: str
    folder: Path
    """The case's folder: ``out/`` (hydra.run.dir), ``cache/``, ``results/``."""

    def error_line(self) -> str:
        """The one ``error:`` line of a bad-input run (exit code 2, no traceback, nothing
        else on stderr, no result file, nothing trained)."""
        assert self.code == 2, (self.code, self.err[-2000:])
        errors = [ln for ln in self.err.splitlines() if ln.startswith("error: ")]
        assert len(errors) == 1, self.err[-2000:]
        assert self.err.strip().splitlines() == errors, self.err[-2000:]
        assert "Traceback" not in self.err + self.out
        assert not (self.folder / "out" / "result.json").exists()
        assert not (self.folder / "cache" / "models").exists()
        return errors[0]


def run_cli(args: list[str], folder: Path) -> CliRun:
    """``python run.py *args hydra.run.dir=<folder>/out`` in this process (the caller sets
    $SAERAVEL_CACHE / $SAERAVEL_RESULTS, see conftest's ``cli`` fixture). The run folder goes
    last (argparse takes no override after a flag such as ``-m`` otherwise) and only where
    ``args`` set none."""
    from saeravel.cli import main

    if not any(a.startswith("hydra.run.dir=") for a in args):
        args = [*args, f"hydra.run.dir={folder / 'out'}"]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return CliRun(code, out.getvalue(), err.getvalue(), folder)


# ----------------------------------------------------------------------------- hub cache


def _commit(files: dict[str, bytes]) -> str:
    """A 40-hex commit id derived from the files (stable across runs)."""
    h = hashlib.sha1()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return h.hexdigest()


def write_hub_repo(cache: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """Put ``files`` into ``cache`` as huggingface_hub stores a downloaded model repo."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = _commit(files)
    snapshot = repo / "snapshots" / commit
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot
