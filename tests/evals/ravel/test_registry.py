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
        "rlap": "probe",
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


def _imports(path) -> set[str]:
    """The saeravel modules ``path`` imports (``from package import module`` included)."""
    import ast
    from pathlib import Path

    import saeravel

    root = Path(saeravel.__file__).parent.parent

    def is_module(name: str) -> bool:
        rel = root.joinpath(*name.split("."))
        return rel.with_suffix(".py").is_file() or (rel / "__init__.py").is_file()

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names} & {
                m for m in (f"{node.module}.{a.name}" for a in node.names) if is_module(m)
            }
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m.startswith("saeravel.")}


def test_the_ravel_package_imports_downward_only():
    """Its modules import only those listed before them in the module map (no cycle), no other
    eval, and nothing below the evals imports it (planted.py, a model, included)."""
    from pathlib import Path

    import saeravel

    src = Path(saeravel.__file__).parent
    order = ["verdict", "prompts", "data", "intervene", "decode", "featurizers", "subspace", "config", "pairs", "train",
             "score", "methods", "main"]  # fmt: skip
    assert {p.stem for p in (src / "evals" / "ravel").glob("*.py")} == {*order, "__init__"}
    for i, name in enumerate(order):
        deps = _imports(src / "evals" / "ravel" / f"{name}.py")
        evals = {d for d in deps if d.startswith("saeravel.evals.")}
        inside = {d.split(".")[3] for d in evals if d.startswith("saeravel.evals.ravel.")}
        assert evals <= {"saeravel.evals.api", *(f"saeravel.evals.ravel.{m}" for m in order)}
        assert inside & {m for m in order if m not in order[:i]} == set(), (name, inside)
    above = {"pipeline.py", "config.py", "prefetch.py", "report.py", "cli.py"}  # entry points
    for path in src.glob("*.py"):
        if path.name not in above:
            assert not any(d.startswith("saeravel.evals") for d in _imports(path)), path.name
