"""The featurizer registry (saeravel.evals.ravel.methods): one entry per schema name, each
declaring its basis, selection and needs; the checks that read it; discovery of the package."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from saeravel.errors import UserError
from saeravel.evals.api import JobChoices, discover
from saeravel.evals.ravel.config import RavelEvalConfig, RavelMethod, chosen_methods
from saeravel.evals.ravel.main import run, validate
from saeravel.evals.ravel.methods import (
    BASES,
    FEATURIZERS,
    SELECTIONS,
    TRAINED,
    TrainedFeaturizer,
    needs_sae,
)


def _cfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(RavelEvalConfig()), kw)


def test_registry_is_the_schema_list_in_order():
    assert list(FEATURIZERS) == [m.value for m in RavelMethod if m is not RavelMethod.all]
    assert chosen_methods(_cfg(method="all")) == list(FEATURIZERS)
    for name, f in FEATURIZERS.items():
        assert f.name == name and f.basis in BASES and set(f.selections) <= set(SELECTIONS)
        assert f.trained == isinstance(f, TrainedFeaturizer)
    assert TRAINED == ("sae", "neurons", "das", "pca", "boundless_das", "mdas")
    assert {n: f.basis for n, f in FEATURIZERS.items()} == {
        "sae": "sae", "neurons": "identity", "das": "rotation", "pca": "pca",
        "boundless_das": "rotation", "mdas": "rotation", "sae_probe": "sae", "fixed": "given",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("kw", "needs"),
    [
        ({"method": "neurons"}, False),
        ({"method": "sae"}, True),
        ({"method": "sae_probe"}, True),
        ({"method": "fixed"}, True),
        ({"method": "fixed", "fixed": {"basis_file": "b.pt"}}, False),
        ({"method": "all"}, True),
    ],
)
def test_needs_sae_follows_each_featurizer(kw, needs):
    assert needs_sae(_cfg(**kw)) is needs


def test_job_choices_reach_validate():
    """The SAE family and the recipe file come from the pipeline (JobChoices), not Hydra's
    globals: without them nothing is refused, with them the one-line errors."""
    cfg = _cfg(method="all", recipe="paper")
    validate(cfg)  # nothing known of the job: no check of the SAE or the recipe file
    with pytest.raises(UserError, match="only relabels the result") as err:
        validate(cfg, JobChoices("jbloom", {"eval/recipe": "saeravel"}))
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="runs sae, sae_probe, fixed .SAE decoder directions"):
        validate(_cfg(method="all"), JobChoices("none"))
    validate(_cfg(method="neurons"), JobChoices("none", {"eval/recipe": "saeravel"}))


def test_discover_finds_the_package_eval():
    spec = discover()["ravel"]
    assert spec.run is run and spec.schema is RavelEvalConfig and spec.validate is validate
