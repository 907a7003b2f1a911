"""The command line: one-line errors, exit code 2, no result file; and the default job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], tmp_path: Path, env: dict | None = None, timeout: int = 300):
    e = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1", SAERAVEL_CACHE=str(tmp_path / "cache"),
             SAERAVEL_RESULTS=str(tmp_path / "results"))  # fmt: skip
    e.update(env or {})
    return subprocess.run(
        [sys.executable, "run.py", f"hydra.run.dir={tmp_path / 'out'}", *args],
        cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def _one_line_error(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return errors[0]


def test_layer_out_of_range(tmp_path):
    msg = _one_line_error(_run(["layer=9"], tmp_path))
    assert "layer=9 is out of range for tiny-city-lm: 0..3" in msg
    assert not (tmp_path / "out" / "result.json").exists()


def test_offline_hub_model_fails_fast_and_clearly(tmp_path):
    msg = _one_line_error(_run(["model=gpt2-small", "eval.method=neurons"], tmp_path))
    assert "'gpt2-small'" in msg and "not in the local Hugging Face cache" in msg


def test_unwritable_results_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")  # a folder under a regular file cannot exist, even for root
    proc = _run([], tmp_path, env={"SAERAVEL_RESULTS": str(blocker / "results")})
    msg = _one_line_error(proc)
    assert "is not writable" in msg and str(blocker) in msg
    assert not (tmp_path / "out" / "result.json").exists()


def test_unknown_key_added_with_plus_is_one_line(tmp_path):
    """Hydra's own hint for a misspelt key is `+eval.epoch=2`; it must not run 20 epochs."""
    msg = _one_line_error(_run(["+eval.epoch=2", "sae=none", "eval.method=das"], tmp_path))
    assert "unknown config key eval.epoch (did you mean eval.epochs?)" in msg
    assert not (tmp_path / "out" / "result.json").exists()


def test_unknown_group_option_lists_valid_choices(tmp_path):
    proc = _run(["sae=opneai_v5_32k"], tmp_path)
    assert proc.returncode != 0
    assert "openai_v5_32k" in proc.stderr  # the available options are listed
    assert not (tmp_path / "out" / "result.json").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["eval.method=dsa"], "eval.method=dsa: Invalid value 'dsa', expected one of [sae,"),
        (["eval.protocol=ravl"], "eval.protocol=ravl: Invalid value 'ravl'"),
        (["eval.match=prefx"], "eval.match=prefx: Invalid value 'prefx'"),
        (["eval.optimizer=adm"], "eval.optimizer=adm: Invalid value 'adm'"),
        (["eval.epochs=abc"], "eval.epochs=abc: Value 'abc' of type 'str' could not be converted"),
        (["eval.epoch=3"], "Key 'epoch' not in 'RavelEvalConfig'"),
        # every value of a sweep is checked, not just the first
        (["-m", "eval.method=das,dsa"], "eval.method=dsa: Invalid value 'dsa'"),
    ],
    ids=["method", "protocol", "match", "optimizer", "int", "key", "sweep"],
)
def test_bad_value_is_one_line_before_anything_loads(tmp_path, args, expected):
    """Hydra's own message for a value the schema rejects is 5 lines and exit 1; ours is one
    line, exit 2, before any model loads (no run folder, no log)."""
    msg = _one_line_error(_run(args, tmp_path))
    assert expected in msg, msg
    assert not (tmp_path / "out").exists()


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "args,group,hint",
    [
        (["sae=no_such"], "sae", None),
        (["model=gpt3"], "model", None),
        (["eval=rave"], "eval", "ravel"),
        (["logger=wandbb"], "logger", "wandb"),
        (["sae=schema_trained"], "sae", "trained"),  # a schema is not an option
        (["-m", "sae=jbloom,opneai_v5_32k", "layer=1"], "sae", "openai_v5_32k"),  # a sweep's list
    ],
)
def test_unknown_group_option_is_one_line_with_the_real_options(tmp_path, args, group, hint):
    proc = _run(args, tmp_path, timeout=60)
    msg = _one_line_error(proc)
    assert len(proc.stderr.strip().splitlines()) == 1
    value = next(a for a in args if a.startswith(f"{group}=")).split("=")[1].split(",")[-1]
    assert msg.startswith(f"error: unknown {group} option {value!r}")
    assert ("did you mean" in msg) == (hint is not None)
    if hint:
        assert f"(did you mean {hint!r}?)" in msg
    assert msg.endswith("valid: " + ", ".join(_options(group)))
    assert "schema" not in msg.split("; valid: ")[1] and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_default_job_end_to_end(tmp_path):
    """`python run.py` with no arguments: embedded model + trained SAE + RAVEL, all methods."""
    cache = Path(os.environ.get("SAERAVEL_CACHE", tmp_path / "cache"))
    proc = _run([], tmp_path, env={"SAERAVEL_CACHE": str(cache)}, timeout=3000)
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


def test_custom_sae_through_hydras_target(tmp_path):
    """sae=custom builds the user's object from its _target_ node (kwargs beside it) and the
    job runs with it; the result records the target and its arguments."""
    (tmp_path / "toy_sae.py").write_text(TOY_SAE)
    args = ["model=planted-city-lm", "eval=core", "sae=custom", "sae.object._target_=toy_sae.Toy",
            "+sae.object.d_in=80", "+sae.object.d_sae=160", "sae.hook_name=blocks.0.hook_resid_post",
            "sae.d_in=80", "eval.n_eval_reconstruction_batches=1",
            "eval.n_eval_sparsity_variance_batches=1"]  # fmt: skip
    path = os.pathsep.join([str(ROOT / "src"), str(tmp_path)])
    proc = _run(args, tmp_path, env={"PYTHONPATH": path}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rec = json.loads((tmp_path / "out" / "result.json").read_text())
    extra = rec["saeravel"]["sae_identity"]["extra"]
    assert extra == {"target": "toy_sae.Toy", "kwargs": {"d_in": 80, "d_sae": 160}}
    assert rec["eval_result_metrics"]["sparsity"]["l0"] > 0
