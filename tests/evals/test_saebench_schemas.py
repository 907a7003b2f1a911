"""Every eval's SAEBench copy against SAEBench 0.6.0's own JSON schemas, and the copies' layout.

The schemas ship in the ``sae-bench==0.6.0`` wheel (``sae_bench/evals/*/eval_output_schema_*.json``).
The wheel is fetched with ``pip download --no-deps`` once into ``$SAERAVEL_CACHE/sae-bench-wheel``
(else pytest's cache) and read as a zip: SAEBench is never installed (it pulls a CUDA torch). None
of its code runs here except the pydantic output classes of the one eval whose schema the wheel
does not ship (``sparse_probing_sae_probes``): its ``eval_output.py`` and ``eval_config.py`` (and
``base_eval_output.py``) are unpacked to a temporary folder and the schema generated from them
as SAEBench's ``generate_json_schemas.py`` does (pydantic's ``TypeAdapter``; ``sae_probes``, whose
``DATASETS`` only fills a default, is a stub). SAEBench 0.6.0 has no output class or schema for
``mdl``. Without network and without a cached wheel the schema tests skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir

# The planted model, its SAE and the fake judge of the autointerp tests.
from test_autointerp import KEY, KEY_ENV, FakeJudge, ctx_for, planted, small_cfg  # noqa: F401

from saeravel import saebench
from saeravel.evals.api import discover
from saeravel.pipeline import run
from saeravel.results import (
    build_record,
    saebench_filename,
    saebench_path,
    saebench_record,
    strict_json,
)

from helpers import ROOT

jsonschema = pytest.importorskip("jsonschema")

CONF = ROOT / "conf"
WHEEL = "sae_bench-0.6.0-py3-none-any.whl"


@pytest.fixture(scope="session")
def schemas(request: pytest.FixtureRequest) -> dict[str, dict]:
    """eval_type_id -> SAEBench 0.6.0's JSON schema of its result file."""
    env = os.environ.get("SAERAVEL_CACHE")
    cache = getattr(request.config, "cache", None)  # absent with -p no:cacheprovider
    if env:
        folder = Path(env) / "sae-bench-wheel"
    elif cache is not None:
        folder = cache.mkdir("sae-bench-wheel")
    else:
        folder = Path(tempfile.gettempdir()) / "saeravel-sae-bench-wheel"
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / WHEEL
    if not wheel.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "sae-bench==0.6.0"]
        done = subprocess.run(
            [*cmd, "-d", str(folder)], capture_output=True, text=True, timeout=600, check=False
        )
        if done.returncode != 0 or not wheel.exists():
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
            pytest.skip(f"could not download sae-bench==0.6.0 to read its schemas: {tail}")
    out: dict[str, dict] = {}
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            base = name.rsplit("/", 1)[-1]
            if name.startswith("sae_bench/evals/") and base.startswith("eval_output_schema_"):
                out[base.removeprefix("eval_output_schema_").removesuffix(".json")] = json.loads(
                    zf.read(name)
                )
    assert {"core", "ravel", "scr", "tpp", "absorption_first_letter"} <= set(out), sorted(out)
    with zipfile.ZipFile(wheel) as zf:
        for type_id, (package, cls) in GENERATED.items():
            out.setdefault(type_id, schema_from_pydantic(zf, package, cls))
    return out


# SAEBench 0.6.0's evals with neither a JSON schema nor an output class (mdl writes a list of
# settings under eval_results, not eval_result_metrics).
NO_SCHEMA = {"mdl"}
# eval_type_id -> (SAEBench eval package, output class) of the evals that ship no JSON schema.
GENERATED = {
    "sparse_probing_sae_probes": ("sparse_probing_sae_probes", "SparseProbingSaeProbesEvalOutput")
}


def schema_from_pydantic(zf: zipfile.ZipFile, package: str, cls: str) -> dict:
    """The JSON schema of SAEBench's output class ``cls`` in ``sae_bench/evals/<package>/``:
    its output and config modules (and the base module) unpacked to a temporary folder and
    imported there (``sae_probes`` a stub), then pydantic's ``TypeAdapter(...).json_schema()``;
    the modules are removed from ``sys.modules`` afterwards."""
    import types

    from pydantic import TypeAdapter

    files = ["sae_bench/evals/base_eval_output.py",
             *(f"sae_bench/evals/{package}/{f}.py" for f in ("eval_config", "eval_output"))]  # fmt: skip
    before = set(sys.modules)
    with tempfile.TemporaryDirectory() as tmp:
        for name in files:
            path = Path(tmp) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(zf.read(name))
        for folder in ("sae_bench", "sae_bench/evals", f"sae_bench/evals/{package}"):
            (Path(tmp) / folder / "__init__.py").touch()
        stub = types.ModuleType("sae_probes")
        stub.DATASETS = []  # type: ignore[attr-defined]
        sys.modules["sae_probes"] = stub
        sys.path.insert(0, tmp)
        try:
            module = __import__(f"sae_bench.evals.{package}.eval_output", fromlist=[cls])
            return TypeAdapter(getattr(module, cls)).json_schema()
        finally:
            sys.path.remove(tmp)
            for name in set(sys.modules) - before:
                del sys.modules[name]


def schema_errors(schemas: dict[str, dict], copy: dict) -> list[str]:
    """SAEBench's schema errors of a copy as the pipeline writes it (strict JSON, NaN as
    null), checked with its eval_type_id's schema (absorption's for saeravel's non-letter
    absorption task)."""
    data = json.loads(json.dumps(strict_json(copy), allow_nan=False, default=str))
    schema = schemas[saebench.base_type_id(data["eval_type_id"])]
    validator = jsonschema.Draft202012Validator(schema)
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message[:120]}"
        for e in validator.iter_errors(data)
    ]


def _record(eval_name: str, metrics: dict, details: Any = None, **kw: Any) -> dict:
    spec = discover()[eval_name]
    return build_record(
        eval_name=eval_name, eval_type_id=kw.pop("eval_type_id", spec.saebench_type_id),
        eval_cfg=kw.pop("eval_cfg", {"name": eval_name, "seed": 7}), metrics=metrics,
        details=details, unstructured=None, sae_identity={"family": "trained", "path": "/x"},
        sae_cfg={"activation": "topk", "d_sae": 4}, model_name="tiny-city-lm", model_info={},
        layer=1, hook_name="blocks.1.hook_resid_post", resolved_config={"seed": 3},
        job_id="abc", runtime_s=1.0,
    )  # fmt: skip


# ----------------------------------------------------------------------------- conventions


def test_core_writes_minus_one_where_result_json_writes_null(schemas: dict) -> None:
    """A dead latent: consistent_activation_heuristic is 0/0. result.json keeps NaN (written
    as null); the copy has SAEBench core's -1, and every required core metric the job did not
    compute (KL/CE with no reconstruction batches) is -1 too."""
    nan = float("nan")
    metrics = {
        "reconstruction_quality": {"explained_variance": 0.9, "explained_variance_legacy": 0.8,
                                   "mse": 1.0, "cossim": nan},
        "sparsity": {"l0": 2.0, "l1": 3.0},
        "token_stats": {"total_tokens_eval_reconstruction": 0,
                        "total_tokens_eval_sparsity_variance": 10},
    }  # fmt: skip
    row = {"index": 0, "feature_density": 0.0, "consistent_activation_heuristic": nan,
           "encoder_bias": 0.1, "encoder_norm": 1.0, "encoder_decoder_cosine_sim": 0.5,
           "max_decoder_cosine_sim": 0.2, "max_encoder_cosine_sim": 0.3}  # fmt: skip
    rec = _record(
        "core", metrics, [row], eval_cfg={"name": "core", "n_eval_reconstruction_batches": 0}
    )
    copy = saebench_record(rec)
    assert schema_errors(schemas, copy) == []
    assert copy["eval_result_details"][0]["consistent_activation_heuristic"] == -1
    assert copy["eval_result_metrics"]["reconstruction_quality"]["cossim"] == -1
    assert copy["eval_result_metrics"]["model_performance_preservation"]["ce_loss_score"] == -1
    assert copy["eval_config"]["compute_ce_loss"] is False
    assert rec["eval_result_details"][0]["consistent_activation_heuristic"] != -1  # ours: NaN
    # Without the conversion SAEBench's schema rejects the null (the bug this fixes).
    raw = dict(copy, eval_result_details=[dict(row, consistent_activation_heuristic=None)])
    assert any("consistent_activation_heuristic" in e for e in schema_errors(schemas, raw))


def test_ravel_details_are_a_list_and_method_metrics_are_kept(schemas: dict) -> None:
    nested = {"ravel": {"sae": {"Country": {"cause": 0.8, "isolation": 0.6, "disentangle": 0.7}},
                        "das": {"Country": {"cause": 1.0, "isolation": None, "disentangle": None}}}}  # fmt: skip
    rec = _record("ravel", nested, {"per_template": {"sae/Country": [1]}})
    copy = saebench_record(rec, discover()["ravel"].saebench_metrics())
    assert schema_errors(schemas, copy) == []
    assert copy["eval_result_details"] == []
    assert copy["eval_result_unstructured"]["details"] == {"per_template": {"sae/Country": [1]}}
    assert copy["eval_result_metrics"]["ravel_das"]["cause_score"] == 1.0  # per-method kept
    assert copy["eval_result_unstructured"]["saeravel_metrics"] == nested
    assert copy["eval_config"]["random_seed"] == 7 and copy["eval_config"]["model_name"]
    only_das = _record("ravel", {"ravel": {"das": nested["ravel"]["das"]}})
    flat = saebench_record(only_das, discover()["ravel"].saebench_metrics())
    assert flat["eval_result_metrics"]["ravel"]["isolation_score"] == -1  # undefined: -1
    assert schema_errors(schemas, flat) == []


def test_eval_config_has_saebenchs_fields_with_our_values(schemas: dict) -> None:
    ours = {"name": "tpp", "seed": 5, "context_length": 64, "n_values": [2, 5]}
    mean = {"tpp_threshold_2_total_metric": 0.1}
    copy = saebench_record(_record("tpp", {"tpp_metrics": mean}, eval_cfg=ours))
    cfg = copy["eval_config"]
    assert cfg["perform_scr"] is False  # SAEBench's default (True) would call this SCR
    assert cfg["random_seed"] == 5 and cfg["model_name"] == "tiny-city-lm"
    assert cfg[saebench.OURS_KEY] == ours
    assert schema_errors(schemas, copy) == []
    scr = saebench_record(_record("scr", {"scr_metrics": {}}, eval_cfg={"name": "scr"}))
    assert scr["eval_config"]["perform_scr"] is True
    assert scr["eval_config"]["random_seed"] == 3  # the job's seed when the eval has none


def test_sae_probes_copy_validates_with_its_per_dataset_records(schemas: dict) -> None:
    """sae-probes' schema (generated from SAEBench's pydantic classes): per-dataset records
    need a dataset_name and keep sae_metrics_by_k; undefined LLM metrics stay null."""
    by_k = {"1": {"test_accuracy": 0.8, "test_auc": 0.9, "test_f1": 0.8}}
    metrics = {
        "llm": {"llm_test_accuracy": None},
        "sae": {"sae_top_1_test_accuracy": 0.8, "sae_top_3_test_accuracy": 0.85},
    }
    rows = [{"dataset_name": "5_hist_fig_ismale", "sae_top_1_test_accuracy": 0.8,
             "sae_metrics_by_k": by_k}]  # fmt: skip
    copy = saebench_record(_record("sparse_probing_sae_probes", metrics, rows))
    assert schema_errors(schemas, copy) == []
    assert copy["eval_result_details"][0]["sae_metrics_by_k"] == by_k
    assert copy["eval_result_metrics"]["llm"]["llm_test_accuracy"] is None
    broken = dict(copy, eval_result_details=[{"sae_top_1_test_accuracy": 0.8}])
    assert any("dataset_name" in e for e in schema_errors(schemas, broken))


def test_meta_structure_copy_has_every_required_metric(schemas: dict) -> None:
    metrics = {"meta_structure": {"decoder_fraction_variance_explained": 0.4,
                                  "final_reconstruction_mse": 0.01}}  # fmt: skip
    rec = _record("meta_structure", metrics, eval_type_id="meta_structure_decoder_variance")
    copy = saebench_record(rec)
    assert copy["eval_type_id"] == "meta_structure_decoder_variance"
    assert copy["eval_result_metrics"]["meta_structure"]["train_time_seconds"] == -1  # absent
    assert schema_errors(schemas, copy) == []
    raw = dict(copy, eval_result_metrics=metrics)  # without SAEBench's -1 for the absent one
    assert any("train_time_seconds" in e for e in schema_errors(schemas, raw))


def test_non_letter_absorption_has_its_own_type_id(schemas: dict) -> None:
    assert saebench.absorption_type_id("first_letter") == "absorption_first_letter"
    assert saebench.absorption_type_id("continent") == "absorption_continent"
    mean = dict.fromkeys(saebench.REQUIRED_METRICS["absorption_first_letter"]["mean"], 0.5)
    rows = [{"continent": "Asia", "passed": True, "mean_absorption_fraction": 0.1}]
    rec = _record("absorption", {"mean": mean}, rows, eval_type_id="absorption_continent")
    copy = saebench_record(rec)
    assert copy["eval_type_id"] == "absorption_continent"
    assert copy["eval_result_details"] == [] and copy["eval_result_unstructured"]["details"] == rows
    assert schema_errors(schemas, copy) == []  # absorption's schema
    letter = [{"first_letter": "a", "passed": False, "num_split_features": 1}]
    rec = _record("absorption", {"mean": mean}, letter)
    got = saebench_record(rec)["eval_result_details"][0]
    assert got["first_letter"] == "a" and got["mean_absorption_fraction"] == -1
    assert schema_errors(schemas, saebench_record(rec)) == []


# ----------------------------------------------------------------------------- layout


def saebench_eval_of_path(path: str) -> str:
    """The eval SAEBench 0.6.0's ``get_eval_results`` reads a file as (sae_bench_utils/
    graphing_utils.py, ``get_eval_results``): the first of tpp, scr, absorption, autointerp,
    sparse_probing, unlearning, core that occurs anywhere in the path; else it raises."""
    for name in saebench.EVAL_PATH_ORDER:
        if name in path:
            return name
    raise ValueError("Please add the correct key for the eval results")


def saebench_reader(name: str) -> str | None:
    """The eval SAEBench's ``get_eval_results`` reads eval ``name``'s copy as: the first of its
    path names inside the eval's own name (``sparse_probing_sae_probes`` is read as
    ``sparse_probing``, as SAEBench's own files of that eval are), or None where it has no
    branch for the eval (ravel, mdl, meta_structure: it raises for those, its own files too)."""
    return next((n for n in saebench.EVAL_PATH_ORDER if n in name), None)


def saebench_key(path: str) -> str:
    """The SAE key of a file in ``get_eval_results`` / ``get_core_results`` (the same file):
    the file name without ``_eval_results.json``; the L0 plots join an eval with core on it."""
    return os.path.basename(path).replace("_eval_results.json", "")


def test_layout_follows_saebenchs_path_rule() -> None:
    """This checks the documented rule (reproduced above from the wheel's graphing_utils.py;
    SAEBench's code cannot be imported here): every eval's copy, in the job folder and in the
    index, is read as its own eval, and all copies of one SAE share the key core's has."""
    keys = set()
    for name, spec in sorted(discover().items()):
        if not spec.run.__module__.startswith("saeravel.evals."):
            continue
        rec = _record(name, {"x": {}})
        for folder, job in (
            ("outputs/runs/2026-12-07/18-22-17", None),
            (f"outputs/results/{name}", "0f3a9c"),
        ):
            path = f"{folder}/{saebench_path(rec, job)}"
            assert path.endswith(saebench_filename(rec))
            if saebench_reader(name) is not None:  # else SAEBench's readers have no branch
                assert saebench_eval_of_path(path) == saebench_reader(name), path
            keys.add(saebench_key(path))
    assert len(keys) == 1, keys  # one file name per SAE across evals and folders
    other = _record("core", {"x": {}})
    other["saeravel"]["sae_identity"] = {"family": "trained", "path": "/y"}
    assert saebench_filename(other) != saebench_filename(rec)  # another SAE, another key
    sl = dict(rec, sae_lens_release_id="gpt2-small-res-jb", sae_lens_id="blocks.6.hook_resid_pre")
    assert saebench_filename(sl) == "gpt2-small-res-jb_blocks.6.hook_resid_pre_eval_results.json"


# ----------------------------------------------------------------------------- real records

# Small settings per eval on the embedded default (model and SAE from the shared cache).
EVALS = {
    "ravel": ["eval.method=all", "eval.epochs=1", "eval.max_pairs_per_split=16",
              "eval.checkpoint_every_s=0"],
    "core": ["eval.n_eval_reconstruction_batches=1", "eval.n_eval_sparsity_variance_batches=1",
             "eval.batch_size_prompts=4"],
    "sparse_probing": ["eval.k_values=[1,2]", "eval.probe.c_grid=[1.0]"],
    "tpp": ["eval.n_values=[2,5]", "eval.probe.c_grid=[1.0]"],
    "scr": ["eval.n_values=[2,5]", "eval.probe.c_grid=[1.0]"],
    "absorption": ["eval.probe.c_grid=[1.0]", "eval.max_k_value=3"],
    "meta_structure": ["eval.train_steps=20", "eval.train_batch_size=64", "eval.autocast=false"],
    "sparse_probing_sae_probes": ["eval.ks=[1,2]"],
    "mdl": ["eval.n_batches=2", "eval.batch_size_prompts=4", "eval.num_bins_values=[4,8]"],
    "unlearning": ["eval.dataset_size=64", "eval.multipliers=[25]", "eval.n_features_list=[10]",
                   "eval.retain_thresholds=[0.01]"],
}  # fmt: skip


@pytest.fixture(scope="module")
def pipeline_copies(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``copies(name)``: eval ``name`` of EVALS run once through pipeline.run (its own job
    folder, one results folder shared by all evals): its SAEBench copies (job folder, index)."""
    root = tmp_path_factory.mktemp("saebench-copies")
    done: dict[str, list[Path]] = {}

    def copies(name: str) -> list[Path]:
        if name not in done:
            with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
                cfg = compose("config", overrides=[
                    f"eval={name}", *EVALS[name], "device=cpu",
                    f"paths.output_dir={root / 'job' / name}",
                    f"paths.results_dir={root / 'results'}",
                ])  # fmt: skip
            run(cfg)
            done[name] = [
                *saebench.find_results(root / "job" / name),
                *saebench.find_results(root / "results" / name),
            ]
        return done[name]

    return copies


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EVALS))
def test_every_evals_copy_validates_and_joins(name: str, pipeline_copies: Any, schemas: dict):
    """The real eval's copies (job folder and index) validate against SAEBench's schema (mdl:
    SAEBench has none), are read as their eval by SAEBench's path rule, and share core's file
    name (the L0 join)."""
    files = pipeline_copies(name)
    assert len(files) == 2, files
    core_keys = {saebench_key(str(p)) for p in pipeline_copies("core")}
    for path in files:
        copy = json.loads(path.read_text())
        if copy["eval_type_id"] in NO_SCHEMA:
            assert copy["eval_type_id"] not in schemas  # a schema in a later wheel: use it
        else:
            assert schema_errors(schemas, copy) == [], path
        assert copy["eval_type_id"] != "absorption_first_letter"  # embedded: continent task
        if saebench_reader(name) is not None:
            assert saebench_eval_of_path(str(path)) == saebench_reader(name)
        assert saebench_key(str(path)) in core_keys
        saebench.read_result(path)


def test_autointerp_copy_validates(
    schemas: dict,
    planted: Any,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """autointerp on the planted model with the fake judge of tests/test_autointerp.py (two
    dead latents, one latent the judge cannot explain)."""
    from saeravel.evals.autointerp import run as autointerp

    monkeypatch.setenv(KEY_ENV, KEY)
    with FakeJudge() as judge:
        out = autointerp(small_cfg(judge.url), ctx_for(planted, tmp_path))
    rec = build_record(
        eval_name="autointerp", eval_type_id="autointerp", eval_cfg={"name": "autointerp"},
        metrics=out.metrics, details=out.details, unstructured=out.unstructured,
        sae_identity={"family": "planted"}, sae_cfg={"activation": "relu", "d_sae": 6},
        model_name="tiny-planted", model_info={}, layer=0, hook_name="blocks.0.hook_resid_post",
        resolved_config={}, job_id="abc", runtime_s=1.0,
    )  # fmt: skip
    copy = saebench_record(rec)
    assert schema_errors(schemas, copy) == []
    assert copy["eval_result_details"]  # per-latent records, a list as SAEBench's
