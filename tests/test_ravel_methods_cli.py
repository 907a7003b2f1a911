"""Bad input to the RAVEL featurizers on the command line: one line, exit code 2, no result
file, before any model loads (the model cache stays empty)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], tmp_path: Path):
    e = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1", SAERAVEL_CACHE=str(tmp_path / "cache"),
             SAERAVEL_RESULTS=str(tmp_path / "results"))  # fmt: skip
    return subprocess.run(
        [sys.executable, "run.py", f"hydra.run.dir={tmp_path / 'out'}", *args],
        cwd=ROOT, env=e, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def _one_line_error(proc, tmp_path: Path) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "result.json").exists()
    assert not (tmp_path / "cache" / "models").exists()  # nothing loaded, nothing trained
    return errors[0]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["sae=none", "eval.method=sae_probe"], "sae_probe, which need an SAE"),
        (["sae=none", "eval.method=fixed"], "fixed (SAE decoder directions"),
        (["sae=none", "eval.method=all"], "sae, sae_probe, fixed (SAE decoder directions"),
        (["sae=none", "eval.method=fixed", "eval.fixed.latents=[0,3]"], "need an SAE"),
        (["sae=none", "eval.method=fixed", "eval.fixed.basis_file=/nonexistent/basis.pt"],
         "eval.fixed.basis_file=/nonexistent/basis.pt does not exist"),
        (["eval.method=mdas", "eval.mdas.attributes=[Country]"],
         "needs at least two distinct attributes"),
        (["eval.method=mdas", "eval.mdas.attributes=[Country,Language]"],
         "must be among eval.attributes"),
        (["eval.method=pca", "eval.pca.mode=fixed", "eval.pca.k=0"], "eval.pca.k=0 must be >= 1"),
        (["eval.method=sae_probe", "eval.sae_probe.counts=[]"], "eval.sae_probe.counts=[]"),
        (["eval.method=boundless_das", "eval.boundless.init=1.5"], "eval.boundless.init=1.5"),
    ],
)  # fmt: skip
def test_bad_method_input_is_one_line_before_loading(tmp_path, args, expected):
    msg = _one_line_error(_run(args, tmp_path), tmp_path)
    assert expected in msg, msg


def test_basis_file_of_the_wrong_shape_is_one_line(tmp_path):
    """The width is known only once the model is there: the planted model (analytic, built in
    a second) with a basis of the wrong width."""
    path = tmp_path / "basis.pt"
    torch.save(torch.eye(5), path)
    small = ["model.n_entities=60", "model.n_country=10", "model.n_continent=4",
             "model.n_language=6", "model.id_dims=4", "model.d_model=48"]  # fmt: skip
    proc = _run(["model=planted-city-lm", *small, "sae=none", "eval.method=fixed",
                 f"eval.fixed.basis_file={path}"], tmp_path)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "holds (5, 5)" in errors[0] and "d_model=48" in errors[0], errors
    assert not (tmp_path / "out" / "result.json").exists()
