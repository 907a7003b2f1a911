"""Every eval is checked before anything loads: a bad value of each eval, an SAE-less job of
an eval that needs an SAE, a missing API key and a missing or malformed data folder end in one
line from ``pipeline.run`` (the SAE source and the model are never built) and from ``run.py``'s
check before Hydra (``config.unknown_option_error``, each value of a sweep). In-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from saeravel import pipeline
from saeravel.config import unknown_option_error
from saeravel.errors import UserError
from saeravel.evals.api import check_job, discover
from saeravel.evals.ravel.data import CITY_FILES, check_city_folder

from helpers import ROOT

CONF = Path(__file__).resolve().parents[1] / "conf"


def _bad_city_folder(root: Path) -> Path:
    """RAVEL's five city files, the templates file a list instead of a mapping."""
    folder = root / "ravel_bad"
    folder.mkdir()
    for key, name in CITY_FILES.items():
        data: object = {"Paris": {"Country": "France"}} if key == "entities" else {"x": "train"}
        if key == "templates":
            data = ["%s is in"]
        (folder / name).write_text(json.dumps(data))
    return folder


# (eval and overrides, the start of the one line); the key is set unless a case says otherwise.
CASES = {
    "core": (["eval=core", "eval.n_eval_reconstruction_batches=0",
              "eval.n_eval_sparsity_variance_batches=0"],
             "eval.n_eval_reconstruction_batches and eval.n_eval_sparsity_variance_batches"),
    "core_text_source": (["eval=core", "eval.text_source=hff"],
                         "unknown eval.text_source 'hff' (did you mean 'hf'?)"),
    "core_no_sae": (["eval=core", "sae=none"],
                    "eval=core needs an SAE; choose one with sae=... (not sae=none)"),
    "sparse_probing": (["eval=sparse_probing", "eval.probe.max_iter=0"],
                       "eval.probe.max_iter must be >= 1 (got 0)"),
    "sparse_probing_no_sae": (["eval=sparse_probing", "sae=none"], "eval=sparse_probing needs"),
    "absorption": (["eval=absorption", "eval.word_split_fractions=[0.5,0.5]"],
                   "eval.word_split_fractions must be 3 positive numbers"),
    "scr": (["eval=scr", "eval.n_values=[0]"], "eval.n_values has 0, but every N must be >= 1"),
    "tpp": (["eval=tpp", "eval.max_classes=1"], "eval.max_classes must be >= 2"),
    "autointerp": (["eval=autointerp", "eval.n_latents=0"], "eval.n_latents must be >= 1 (got 0)"),
    "autointerp_judge": (["eval=autointerp", "eval.judge.token_limit_param=max_tok"],
                         "eval.judge.token_limit_param='max_tok'; valid: max_tokens"),
    "unlearning": (["eval=unlearning", "eval.batch_size=0"], "eval.batch_size must be >= 1 (got 0)"),
    "unlearning_corpus": (["eval=unlearning", "eval.forget_corpus_path=/no/such/file.jsonl"],
                          "eval.forget_corpus_path=/no/such/file.jsonl does not exist"),
    "mdl": (["eval=mdl", "eval.mse_epsilon_threshold=0"],
            "eval.mse_epsilon_threshold=0.0 must be > 0"),
    "meta_structure": (["eval=meta_structure", "eval.train_steps=0"],
                       "eval.train_steps must be >= 1 (got 0)"),
    "meta_structure_no_sae": (["eval=meta_structure", "sae=none"], "eval=meta_structure needs"),
    "sparse_probing_sae_probes": (["eval=sparse_probing_sae_probes", "eval.max_seq_len=0"],
                                  "eval.max_seq_len must be >= 1 (got 0)"),
    "sparse_probing_sae_probes_data": (["eval=sparse_probing_sae_probes",
                                        "eval.data_source=sae_probes", "eval.data_dir=/no/such"],
                                       "eval=sparse_probing_sae_probes with eval.data_source="
                                       "sae_probes reads the sae-probes datasets, but eval.data_dir"),
    "ravel": (["eval=ravel", "eval.epochs=0"], "eval.epochs=0 must be an integer >= 1"),
    "ravel_refine_budget": (["eval=ravel", "eval.mask.refine_budget=-1"],
                            "eval.mask.refine_budget=-1 must be an integer >= 0"),
    "ravel_decode_mem_gb": (["eval=ravel", "eval.decode_mem_gb=0"],
                            "eval.decode_mem_gb=0.0 must be a finite number of GB > 0"),
    "ravel_decode_mem_gb_row": (["eval=ravel", "model=gpt2-small", "eval.decode_mem_gb=0.0001"],
                                "eval.decode_mem_gb=0.0001 is too small for one decoding row of "
                                "model gpt2-small: at least 0.0002949 GB"),
    "ravel_data_dir": (["eval=ravel", "eval.data_dir=/no/such/folder"],
                       "RAVEL data folder /no/such/folder does not exist"),
    "ravel_embedded_data_dir": (["eval=ravel", "eval.data_source=embedded", "eval.data_dir=/x"],
                                "eval.data_dir=/x is not read with eval.data_source=embedded"),
}  # fmt: skip


def _compose(overrides: list[str], tmp_path: Path):
    paths = [f"paths.output_dir={tmp_path}/out", f"paths.results_dir={tmp_path}/results",
             f"paths.cache_dir={tmp_path}/cache"]  # fmt: skip
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[*paths, *overrides])


@pytest.fixture
def nothing_loads(monkeypatch):
    """The pipeline's SAE source and model builders fail the test if called; a judge key."""

    def never(*args, **kwargs):
        raise AssertionError("an SAE source or a model was built before the checks")

    monkeypatch.setattr(pipeline, "build_sae_source", never)
    monkeypatch.setattr(pipeline, "instantiate", never)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_value_fails_before_anything_loads(case, tmp_path, nothing_loads):
    overrides, message = CASES[case]
    cfg = _compose(overrides, tmp_path)
    with pytest.raises(UserError) as err:
        pipeline.run(cfg)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "cache").exists()  # no cache entry was started either


def _project_evals() -> dict:
    """The project's evals (each has a conf/eval/<name>.yaml); a test elsewhere may register a
    toy eval in this process's registry."""
    confs = {p.stem for p in (ROOT / "conf" / "eval").glob("*.yaml")}
    return {n: s for n, s in discover().items() if n in confs}


def test_every_eval_has_a_case():
    named = {overrides[0].removeprefix("eval=") for overrides, _ in CASES.values()}
    assert named == set(_project_evals())


def test_missing_api_key_fails_before_anything_loads(tmp_path, nothing_loads, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    cfg = _compose(["eval=autointerp"], tmp_path)
    with pytest.raises(UserError, match="set the environment variable OPENAI_API_KEY"):
        pipeline.run(cfg)
    monkeypatch.setenv("MY_JUDGE_KEY", "  ")  # blank is unset; the variable is the one named
    cfg = _compose(["eval=autointerp", "eval.judge.api_key_env=MY_JUDGE_KEY"], tmp_path)
    with pytest.raises(UserError, match="environment variable MY_JUDGE_KEY"):
        pipeline.run(cfg)


def test_malformed_ravel_folder_fails_before_anything_loads(tmp_path, nothing_loads):
    folder = _bad_city_folder(tmp_path)
    cfg = _compose(["eval=ravel", f"eval.data_dir={folder}"], tmp_path)
    with pytest.raises(UserError, match="ravel_city_attribute_to_prompts.json is not RAVEL's"):
        pipeline.run(cfg)


def test_city_folder_shape_check(tmp_path):
    check_city_folder(_good_city_folder(tmp_path))  # passes
    (tmp_path / "good" / CITY_FILES["entity_split"]).write_text("{not json")
    with pytest.raises(UserError, match="is not readable JSON"):
        check_city_folder(tmp_path / "good")
    (tmp_path / "good" / CITY_FILES["wikipedia"]).unlink()
    with pytest.raises(UserError, match="lacks wikipedia_city_entity_prompts.json"):
        check_city_folder(tmp_path / "good")


def _good_city_folder(root: Path) -> Path:
    folder = root / "good"
    folder.mkdir()
    data = {
        "entities": {"Paris": {"Country": "France"}},
        "templates": {"Country": ["%s is in"]},
        "template_split": {"%s is in": "train"},
        "entity_split": {"Paris": "train"},
        "wikipedia": {"In %s": {"entity": "Paris", "split": "train"}},
    }
    for key, name in CITY_FILES.items():
        (folder / name).write_text(json.dumps(data[key]))
    return folder


def test_good_jobs_pass_the_checks(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    for name in _project_evals():
        spec = check_job(_compose([f"eval={name}"], tmp_path))
        assert spec.name == name
    folder = _good_city_folder(tmp_path)
    check_job(_compose(["eval=ravel", f"eval.data_dir={folder}"], tmp_path))
    check_job(_compose(["eval=ravel", "sae=none", "eval.method=das"], tmp_path))


def test_schema_checks_itself_through_to_object(tmp_path):
    """The dataclass's ``__post_init__`` runs when OmegaConf builds it, sub-configs included."""
    cfg = _compose(["eval=tpp", "eval.probe.c_grid=[0.0]"], tmp_path)
    with pytest.raises(UserError, match=r"eval.probe.c_grid has 0.0; every C must be > 0"):
        OmegaConf.to_object(cfg.eval)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval=core", "sae=none"], "eval=core needs an SAE"),
        (["eval=unlearning", "eval.batch_size=0"], "eval.batch_size must be >= 1"),
        (["-m", "eval=sparse_probing", "eval.probe.max_iter=5,0"], "eval.probe.max_iter must"),
        (["-m", "eval=tpp,core", "sae=none"], "eval=tpp needs an SAE"),
        (
            ["eval=ravel", "model=gpt2-small", "eval.decode_mem_gb=0.0001"],
            "eval.decode_mem_gb=0.0001 is too small for one decoding row",
        ),
    ],
)
def test_run_py_check_reaches_the_eval_checks(argv, message, monkeypatch):
    """``run.py`` checks the composed job (each value of a sweep) before Hydra runs it."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    got = unknown_option_error(argv, CONF)
    assert got is not None and got.startswith(message)


def test_run_py_check_passes_good_sweeps(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert unknown_option_error(["-m", "eval=core,tpp", "eval.seed=1,2"], CONF) is None


def test_main_guarded_prints_one_line_and_exits_2(tmp_path, nothing_loads, capsys):
    cfg = _compose(["eval=sparse_probing", "eval.probe.max_iter=0"], tmp_path)
    with pytest.raises(SystemExit) as exit_:
        pipeline.main_guarded(cfg)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: eval.probe.max_iter must be >= 1 (got 0)"]


def test_each_registration_carries_what_the_layers_around_it_need():
    """The job hash's non-result paths and SAEBench's rules come from each eval's registration
    (no table lists the evals by name); the report's headline and plotted columns too."""
    import dataclasses

    from saeravel import results, saebench
    from saeravel.report import eval_facts

    for name, spec in _project_evals().items():
        assert results.NON_RESULT_EVAL_PATHS[name] == dict(spec.non_result_paths)
        assert saebench.REQUIRED_METRICS[spec.saebench_type_id] == dict(spec.saebench_required)
        assert spec.saebench_required, f"{name} states no SAEBench rules"
        assert saebench.HEADLINE_CATEGORY.get(spec.saebench_type_id) == spec.saebench_headline
        fields = {f.name for f in dataclasses.fields(spec.schema)}
        assert {p.split(".")[0] for p in spec.non_result_paths} <= fields
        assert all(c in spec.headline_metrics for c, _ in spec.plotted)
        assert eval_facts(name) is spec
    assert eval_facts("no_such_eval") is None
