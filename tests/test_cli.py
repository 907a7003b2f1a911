"""The command line (``saeravel.cli.main``, what ``run.py`` calls): every bad input is one
``error:`` line, exit code 2, no traceback, no result file, nothing trained. The cases run
in-process (one table); one real ``python run.py`` subprocess checks the entry point itself."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from saeravel.config import Config

from helpers import ROOT


def _options(group: str) -> str:
    return ", ".join(sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml")))


def _unknown(group: str, value: str, hint: str | None = None) -> str:
    """The pre-check's whole line for an unknown option of a config group: the group's real
    options (no schema_* entry), with a "did you mean" only when one is close."""
    mean = f" (did you mean {hint!r}?)" if hint else ""
    return f"error: unknown {group} option {value!r}{mean}; valid: {_options(group)}"


def _unknown_key(key: str, hint: str) -> str:
    """The pre-check's whole line for a misspelt top-level key: the schema's fields, then hydra."""
    valid = [f.name for f in dataclasses.fields(Config)] + ["hydra"]
    return (f"error: unknown config key {key} (did you mean {hint}?); valid keys of the top "
            f"level: {', '.join(valid)}")  # fmt: skip


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
SMALL_PLANTED = ["model=planted-city-lm", "model.n_entities=60", "model.n_country=10",
                 "model.n_continent=4", "model.n_language=6", "model.id_dims=4",
                 "model.d_model=48"]  # fmt: skip

# (args, expected text of the one error line, early): ``early`` cases fail in the pre-check,
# before Hydra composes (no run folder at all); the others inside the job, before any model
# loads. ``{tmp}`` is the case's folder.
CASES = [
    # -------------------------------------------------- unknown options of a config group
    pytest.param(["sae=no_such"], _unknown("sae", "no_such"), True, id="group-sae"),
    pytest.param(["model=gpt3"], _unknown("model", "gpt3"), True, id="group-model"),
    pytest.param(["eval=rave"], _unknown("eval", "rave", "ravel"), True, id="group-eval"),
    pytest.param(["logger=wandbb"], _unknown("logger", "wandbb", "wandb"), True, id="group-logger"),
    pytest.param(["sae=schema_trained"], _unknown("sae", "schema_trained", "trained"), True,
                 id="group-schema-is-not-an-option"),
    pytest.param(["sae=opneai_v5_32k"], _unknown("sae", "opneai_v5_32k", "openai_v5_32k"), True,
                 id="group-typo"),
    pytest.param(["-m", "sae=jbloom,opneai_v5_32k", "layer=1"],
                 _unknown("sae", "opneai_v5_32k", "openai_v5_32k"), True, id="group-sweep-list"),
    # -------------------------------------------------- values and keys the schema rejects
    pytest.param(["eval.method=dsa"], "eval.method=dsa: Invalid value 'dsa', expected one of [sae,",
                 True, id="value-method"),
    pytest.param(["eval.protocol=ravl"], "eval.protocol=ravl: Invalid value 'ravl'", True,
                 id="value-protocol"),
    pytest.param(["eval.match=prefx"], "eval.match=prefx: Invalid value 'prefx'", True,
                 id="value-match"),
    pytest.param(["eval.optimizer=adm"], "eval.optimizer=adm: Invalid value 'adm'", True,
                 id="value-optimizer"),
    pytest.param(["eval.epochs=abc"],
                 "eval.epochs=abc: Value 'abc' of type 'str' could not be converted", True,
                 id="value-int"),
    # -------------------------------------------------- misspelt keys (no ``+``): a did-you-mean
    pytest.param(["eval.epoch=3"], "unknown config key eval.epoch (did you mean eval.epochs?); "
                 "valid keys of eval: name, version, recipe,", True, id="key-nested"),
    pytest.param(["modle=gpt2-small"], _unknown_key("modle", "model"), True, id="key-top"),
    pytest.param(["layr=3"], _unknown_key("layr", "layer"), True, id="key-top-layer"),
    pytest.param(["eval.mdas.atributes=[a]"], "error: unknown config key eval.mdas.atributes "
                 "(did you mean eval.mdas.attributes?); valid keys of eval.mdas: attributes", True,
                 id="key-deep"),
    pytest.param(["eval.nosuch.x=1"], "unknown config key eval.nosuch; valid keys of eval: name,",
                 True, id="key-missing-level"),  # the first segment that does not exist
    pytest.param(["-m", "eval.epoch=1,2"], "unknown config key eval.epoch (did you mean", True,
                 id="key-sweep"),
    pytest.param(["sae=custom", "sae.object.d_sae=4"], "error: unknown config key sae.object.d_sae;"
                 " valid keys of sae.object: _target_; add a new key with +sae.object.d_sae=...",
                 True, id="key-free-form"),
    pytest.param(["hydra.job.nme=x"], "unknown config key hydra.job.nme (did you mean "
                 "hydra.job.name", True, id="key-hydra"),
    pytest.param(["-m", "eval.method=das,dsa"], "eval.method=dsa: Invalid value 'dsa'", True,
                 id="value-sweep"),  # every value of a sweep is checked, not just the first
    pytest.param(["model=planted-city-lm", "model.basis=bogus"], "model.basis=bogus: Invalid value",
                 True, id="value-planted-basis"),
    # -------------------------------------------------- the job's own checks
    pytest.param(["layer=9"], "layer=9 is out of range for tiny-city-lm: 0..3", False, id="layer"),
    pytest.param(["+eval.epoch=2", "sae=none", "eval.method=das"],
                 "unknown config key eval.epoch (did you mean eval.epochs?)", False,
                 id="plus-key"),  # Hydra's own hint for a misspelt key must not run 20 epochs
    pytest.param(["model=gpt2-small", "eval.method=neurons"],
                 "'gpt2-small' (gpt2) is not in the local Hugging Face cache", False,
                 id="offline-hub-model"),
    pytest.param(["model=gpt2-small", "device=cuda"],
                 "device=cuda but no CUDA device is visible; valid: auto, cpu, cuda[:N], mps", False,
                 id="cuda-without-gpu", marks=NO_CUDA),
    pytest.param(["model=gpt2-small", "sae=trained", "sae.k=0"], "sae.k=0 must be a positive integer",
                 False, id="trained-k0"),  # before the (uncached) model is looked up
    pytest.param(["sae=pca", "sae.n_sequences=0"], "sae.n_sequences=0 must be a positive integer",
                 False, id="pca-n-sequences"),
    pytest.param(["eval=meta_structure", "eval.width_ratio=0"],
                 "eval.width_ratio=0.0 must be in (0, 1]", False, id="meta-structure-width"),
    pytest.param(["eval=meta_structure", "eval.dtype=float8"],
                 "eval.dtype=float8: Invalid value 'float8'", True, id="meta-structure-dtype"),
    pytest.param(["eval=sparse_probing_sae_probes", "eval.data_source=sae_probes",
                  "eval.data_dir=/nonexistent"],
                 "eval.data_dir=/nonexistent has no probing_datasets_MASTER.csv[.zst]: pip install "
                 "sae-probes", False, id="sae-probes-data-dir"),
    pytest.param(["eval=sparse_probing_sae_probes", "eval.reg_type=l3"],
                 "eval.reg_type=l3: Invalid value 'l3'", True, id="sae-probes-reg-type"),
    pytest.param(["eval=sparse_probing_sae_probes", "eval.ks=[0,1]"], "eval.ks has k=0", False,
                 id="sae-probes-k0"),
    pytest.param(["eval=mdl", "eval.k_values=[0,16]"], "eval.k_values has k=0; every k must be "
                 ">= 1 or null", False, id="mdl-k0"),
    pytest.param(["eval=mdl", "eval.num_bins_values=[]"], "eval.num_bins_values is empty", False,
                 id="mdl-no-bins"),
    pytest.param(["eval=mdl", "eval.k_values=[a]"], "eval.k_values=[a]: Value 'a' of type 'str' "
                 "could not be converted", True, id="mdl-k-type"),
    pytest.param(["model=gpt2-small", "model.hf_name=gtp2", "eval.method=neurons"],
                 "hf_name='gtp2' is not a transformer_lens model name", False, id="hf-name"),
    pytest.param(["model=planted-city-lm", "model.n_entities=6", "sae=none",
                  "eval.method=neurons", "eval.epochs=1"],
                 "planted world too small for the split: model.n_entities=6", False,
                 id="planted-too-few-entities"),
    # -------------------------------------------------- RAVEL featurizers
    pytest.param(["sae=none", "eval.method=sae_probe"], "sae_probe, which need an SAE", False,
                 id="ravel-sae-probe-no-sae"),
    pytest.param(["sae=none", "eval.method=fixed"], "fixed (SAE decoder directions", False,
                 id="ravel-fixed-no-sae"),
    pytest.param(["sae=none", "eval.method=all"], "sae, sae_probe, fixed (SAE decoder directions",
                 False, id="ravel-all-no-sae"),
    pytest.param(["sae=none", "eval.method=fixed", "eval.fixed.latents=[0,3]"], "need an SAE",
                 False, id="ravel-fixed-latents-no-sae"),
    pytest.param(["sae=none", "eval.method=fixed", "eval.fixed.basis_file=/nonexistent/basis.pt"],
                 "eval.fixed.basis_file=/nonexistent/basis.pt does not exist", False,
                 id="ravel-basis-file-missing"),
    pytest.param(["eval.protocol=saebench", "eval.entity_type=verb"],
                 "error: eval.protocol=saebench has no entity type verb (SAEBench's RAVEL defines "
                 "city and nobel_prize_winner); valid eval.entity_type: city, nobel_prize_winner",
                 True, id="ravel-saebench-entity-type"),
    pytest.param(["eval.protocol=saebench", "eval.attributes=[Country,Timezone]"],
                 "which SAEBench's RAVEL does not define for city (eval.protocol=saebench); "
                 "valid: Country, Continent, Language", True, id="ravel-saebench-attribute"),
    pytest.param(["eval.method=mdas", "eval.mdas.attributes=[Country]"],
                 "needs at least two distinct attributes", False, id="ravel-mdas-one-attribute"),
    pytest.param(["eval.method=mdas", "eval.mdas.attributes=[Country,Language]"],
                 "must be among eval.attributes", False, id="ravel-mdas-unknown-attribute"),
    pytest.param(["eval.method=pca", "eval.pca.mode=fixed", "eval.pca.k=0"],
                 "eval.pca.k=0 must be >= 1", False, id="ravel-pca-k0"),
    pytest.param(["eval.method=sae_probe", "eval.sae_probe.counts=[]"], "eval.sae_probe.counts=[]",
                 False, id="ravel-sae-probe-counts"),
    pytest.param(["eval.method=boundless_das", "eval.boundless.init=1.5"],
                 "eval.boundless.init=1.5", False, id="ravel-boundless-init"),
    pytest.param([*SMALL_PLANTED, "sae=none", "eval.method=fixed",
                  "eval.fixed.basis_file={tmp}/basis.pt"], "holds (5, 5)", False,
                 id="ravel-basis-file-shape"),  # known once the (analytic) model is built
    # -------------------------------------------------- sites and Gemma Scope (from sae_lens' directory)
    pytest.param(["site=mlp"], "error: site=mlp: Invalid value 'mlp', expected one of "
                 "[resid_post, resid_mid, mlp_out, attn_out]", True, id="site-value"),
    pytest.param(["sae.site=mlp_out"], "sae.site=mlp_out differs from site=resid_post; set "
                 "site=mlp_out (sae.site follows it)", False, id="site-sae-differs"),
    pytest.param(["sae=jbloom", "site=mlp_out", "layer=1"],
                 "family jbloom has no SAE at site=mlp_out; sites: resid_post", False,
                 id="site-family-lacks"),
    pytest.param(["model=planted-city-lm", "sae=planted", "site=attn_out"],
                 "family planted has SAEs on the residual stream only: site=attn_out", False,
                 id="site-planted-residual-only"),
    pytest.param([*SMALL_PLANTED, "sae=none", "eval.method=neurons", "site=mlp_out"],
                 "site=mlp_out does not exist in block 0 of planted-city-lm (it is "
                 "attention-only); valid there: resid_post, attn_out", False,
                 id="site-not-in-block"),  # known once the (analytic) model is built
    pytest.param(["sae=gemma_scope", "layer=5", "sae.width=32k"],
                 "sae.width=32k is not a Gemma Scope width at layer 5 (site=resid_post); "
                 "valid: 16k, 65k, 1m", False, id="gemma-scope-width"),
    pytest.param(["sae=gemma_scope", "layer=5", "sae.l0=40"],
                 "sae.l0=40 is not a Gemma Scope L0 at layer 5, width 16k (site=resid_post); "
                 "valid: canonical, 18, 34, 68, 143, 309", False, id="gemma-scope-l0"),
    pytest.param(["sae=gemma_scope", "layer=5", "site=mlp_out", "sae.l0=68"],
                 "sae.l0=68 is not a Gemma Scope L0 at layer 5, width 16k (site=mlp_out); "
                 "valid: canonical, 23, 48, 114, 269, 575", False, id="gemma-scope-mlp-l0"),
    pytest.param(["sae=gemma_scope", "site=attn_out"],
                 "sae=gemma_scope has no SAEs at site=attn_out: Gemma Scope's attention SAEs "
                 "(gemma-scope-2b-pt-att) read blocks.L.attn.hook_z", False,
                 id="gemma-scope-attn"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "expected", "early"), CASES)
def test_bad_input_is_one_line_exit_2(cli, tmp_path, args, expected, early):
    """Hydra's own message for a rejected value is 5 lines and exit 1; ours is one line, exit 2,
    before any model loads (``early``: before Hydra composes, so no run folder either)."""
    torch.save(torch.eye(5), tmp_path / "basis.pt")  # the wrong width for every model here
    line = cli(args).error_line()
    assert expected in line, line
    if expected.startswith("error: "):
        assert line == expected
    if early:
        assert not (tmp_path / "out").exists()


def test_unwritable_results_dir(cli, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")  # a folder under a regular file cannot exist, even for root
    line = cli([], SAERAVEL_RESULTS=str(blocker / "results")).error_line()
    assert "is not writable" in line and str(blocker) in line


@pytest.mark.parametrize(
    ("args", "which"),
    [
        (["hydra.run.dir={tmp}/file/out"], "hydra.run.dir"),
        (["-m", "hydra.sweep.dir={tmp}/file/sweep", "layer=0,1"], "hydra.sweep.dir"),
        (["paths.output_dir={tmp}/file/o"], "file/o"),
    ],
    ids=["run-dir", "sweep-dir", "output-dir"],
)
def test_unwritable_run_folder(cli, tmp_path, args, which):
    """A run, sweep or output folder under a regular file: one line naming it, before any job
    starts (a sweep's jobs never run)."""
    (tmp_path / "file").write_text("")
    line = cli(args).error_line()
    assert "is not writable" in line and str(tmp_path / "file") in line and which in line, line
    assert not (tmp_path / "results").exists()


def test_calls_in_one_process_are_independent(cli, tmp_path):
    """Hydra's global state is cleared and the root logger put back after every call: the
    second run's pre-check still runs, and no handler of the first job is left behind."""
    import logging

    handlers = logging.getLogger().handlers[:]
    assert "layer=9" in cli(["layer=9"]).error_line()
    assert logging.getLogger().handlers == handlers
    assert "unknown eval option 'rave'" in cli(["eval=rave"]).error_line()


def test_run_py_subprocess_smoke(tmp_path):
    """The real entry point: ``python run.py layer=9`` is one line, exit 2, no result."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1", SAERAVEL_CACHE=str(tmp_path / "cache"),
               SAERAVEL_RESULTS=str(tmp_path / "results"),
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "run.py", f"hydra.run.dir={tmp_path / 'out'}", "layer=9"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: layer=9 is out of range for tiny-city-lm: 0..3"], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "out" / "run.log").exists()  # Hydra's job log keeps run.py's name
    assert not (tmp_path / "out" / "result.json").exists()


@pytest.mark.slow
def test_default_job_end_to_end(tmp_path):
    """`python run.py` with no arguments: embedded model + trained SAE + RAVEL, all methods."""
    cache = Path(os.environ.get("SAERAVEL_CACHE", tmp_path / "cache"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1", SAERAVEL_CACHE=str(cache),
               SAERAVEL_RESULTS=str(tmp_path / "results"))  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "run.py", f"hydra.run.dir={tmp_path / 'out'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=3000,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((tmp_path / "out" / "result.json").read_text())
    info = rec["saeravel"]["model_info"]
    assert info["fact_accuracy"] >= 0.95
    layer = rec["saeravel"]["layer"]
    assert info["full_swap_cause"]["Country"][layer] >= 0.9
    assert info["full_swap_cause"]["Continent"][layer] >= 0.9
    m = rec["eval_result_metrics"]
    for attr in ("Country", "Continent"):
        assert m["baselines"]["none"][attr]["cause"] == 0.0
        assert m["baselines"]["swap"][attr]["cause"] >= 0.9
        assert set(m["ravel"]) >= {"sae", "neurons", "das"}
        # The default world's facts are separable (docs/ravel.md): DAS 0.85-0.94 over three
        # model seeds; on the nested real facts it was 0.59-0.63 on two of three.
        assert m["ravel"]["das"][attr]["disentangle"] >= 0.75
    assert "disentangle" in proc.stdout + proc.stderr  # the summary table is printed


TOY_SAE = """
import torch


class Toy:
    def __init__(self, d_in, d_sae, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(d_in, d_sae, generator=g) / d_in**0.5

    def encode(self, x):
        return torch.relu(x @ self.W)

    def decode(self, f):
        return f @ self.W.T
"""


def test_custom_sae_through_hydras_target(cli, tmp_path, monkeypatch):
    """sae=custom builds the user's object from its _target_ node (kwargs beside it) and the
    job runs with it; the result records the target and its arguments."""
    (tmp_path / "toy_sae.py").write_text(TOY_SAE)
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["model=planted-city-lm", "eval=core", "sae=custom", "sae.object._target_=toy_sae.Toy",
            "+sae.object.d_in=80", "+sae.object.d_sae=160", "sae.hook_name=blocks.0.hook_resid_post",
            "sae.d_in=80", "eval.n_eval_reconstruction_batches=1",
            "eval.n_eval_sparsity_variance_batches=1"]  # fmt: skip
    try:
        run = cli(args)
    finally:
        sys.modules.pop("toy_sae", None)
    assert run.code == 0, run.err[-2000:]
    rec = json.loads((tmp_path / "out" / "result.json").read_text())
    extra = rec["saeravel"]["sae_identity"]["extra"]
    assert extra == {"target": "toy_sae.Toy", "kwargs": {"d_in": 80, "d_sae": 160}}
    assert rec["eval_result_metrics"]["sparsity"]["l0"] > 0


def test_bounded_dirname_keeps_short_names_and_cuts_long_ones():
    from saeravel.cli import SUBDIR_MAX_BYTES, bounded_dirname

    short = "eval.method=das,layer=5"
    assert bounded_dirname(short) == short  # Hydra's own name, unchanged
    long = ",".join(f"eval.setting_{i}=value/{i}" for i in range(14))  # 14 overrides, 280+ bytes
    cut = bounded_dirname(long)
    assert len(cut.encode()) <= SUBDIR_MAX_BYTES and "/" not in cut
    assert cut.startswith("eval.setting_0=value_0,eval.setting_1=")  # readable: whole overrides
    assert cut.split("_etc_")[0].count("=") == cut.split("_etc_")[0].count(",") + 1
    assert cut == bounded_dirname(long)  # deterministic
    assert bounded_dirname(long.replace("13=value/13", "13=value/14")) != cut  # hash of it all
    multibyte = "eval.name=" + "é" * 200
    assert len(bounded_dirname(multibyte).encode()) <= SUBDIR_MAX_BYTES


def test_long_sweep_job_folders_are_bounded(cli, tmp_path):
    """A sweep of 15 overrides (Hydra's default folder name would be ~280 bytes, over the file
    system's limit): each job's folder is ``<num>_`` + the bounded name of its overrides."""
    import yaml

    from saeravel.cli import SUBDIR_MAX_BYTES, bounded_dirname

    long = ["eval.epochs=3", "eval.batch_size=7", "eval.lr=0.001", "eval.max_entities=50",
            "eval.max_pairs_per_split=100", "eval.confidence=0.9", "eval.report_top_latents=4",
            "seed=3", "eval.drop_same_label_pairs=false", "model.train_steps=10",
            "model.n_cities=50", "sae.k=8", "sae.steps=10", "sae.expansion=4"]  # fmt: skip
    run = cli(["-m", "hydra.sweep.dir={tmp}/sweep", "layer=8,9", *long])  # jobs fail fast
    assert run.code != 0 and "layer=8 is out of range" in run.err, run.err[-2000:]
    folders = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert [p.name[:2] for p in folders] == ["0_", "1_"]
    for num, folder in enumerate(folders):
        hydra_cfg = yaml.safe_load((folder / ".hydra" / "hydra.yaml").read_text())["hydra"]
        full = hydra_cfg["job"]["override_dirname"]
        assert len(full.encode()) > 255  # Hydra's own name would not fit
        assert folder.name == f"{num}_{bounded_dirname(full)}"
        assert len(folder.name.encode()) <= SUBDIR_MAX_BYTES + 2


HELP_EXAMPLES = [
    "python run.py eval=ravel sae=apollo_e2e layer=5",
    "python run.py -m sae=openai_v5_32k,jbloom,apollo_e2e layer=1,5,9 hydra/launcher=slurm",
    "python run.py eval=ravel eval.method=das model=pythia-70m",
]


def test_help_page_lists_groups_examples_and_docs(cli):
    """``python run.py --help`` is saeravel's page (conf/hydra/help/saeravel.yaml): what the tool
    does, every config group with its options as in conf/ (filled in by Hydra), the usage
    examples and where the docs are; nothing runs."""
    run = cli(["--help"])
    assert run.code == 0, run.err[-2000:]
    page = run.out
    assert "sparse autoencoders" in page and "Powered by Hydra" not in page
    for group in ("model", "sae", "eval", "experiment", "logger"):
        assert f"\n{group}: {', '.join(sorted(_options(group).split(', ')))}\n" in page, group
    for example in HELP_EXAMPLES:
        assert example in page
    for doc in ("README.md", "docs/ARCHITECTURE.md", "docs/extending.md"):
        assert doc in page and (ROOT / doc).is_file()


@pytest.mark.parametrize("example", HELP_EXAMPLES)
def test_help_examples_pass_the_pre_check(example):
    """Every command the help page shows composes and passes the eval's checks (every job of
    the sweep), so a user who copies it gets no error line."""
    from saeravel.config import unknown_option_error

    args = example.removeprefix("python run.py ").split()
    assert unknown_option_error(args, ROOT / "conf") is None
