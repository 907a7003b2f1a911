"""An SAE family made for one model selects it (the promised commands work as typed), the user's
model choice still wins, and `--cfg job --resolve` prints the config."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[2]
CONF = str(ROOT / "conf")


@pytest.mark.parametrize(
    "family", ["apollo_e2e", "apollo_e2e_ds", "jbloom", "openai_v5_32k", "openai_v5_128k"]
)
def test_gpt2_families_select_gpt2_small(family):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=[f"sae={family}", "layer=5", "paths.output_dir=x"])
        assert cfg.model.name == "gpt2-small" and cfg.sae.family == family
        mine = compose(
            "config", overrides=[f"sae={family}", "model=pythia-70m", "paths.output_dir=x"]
        )
        assert mine.model.name == "pythia-70m"  # named on the command line: the user's choice


def test_embedded_default_unchanged():
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        assert compose("config", overrides=["paths.output_dir=x"]).model.name == "tiny-city-lm"


def test_cfg_job_resolve_prints_the_config(cli):
    run = cli(["--cfg", "job", "--resolve", "eval=ravel", "sae=apollo_e2e", "layer=5"])
    assert run.code == 0, run.err[-2000:]
    assert "name: gpt2-small" in run.out and "Traceback" not in run.err
