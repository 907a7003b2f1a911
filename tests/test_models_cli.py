"""Bad model / trained-SAE settings through the real entrypoint: one line, exit 2, no
traceback, before anything loads (a hub model that is not cached is never reached)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _error_line(args: list[str], tmp_path: Path) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1",
               SAERAVEL_CACHE=str(tmp_path / "cache"), SAERAVEL_RESULTS=str(tmp_path / "res"),
               PYTHONPATH=str(ROOT / "src"))  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "run.py", f"hydra.run.dir={tmp_path / 'out'}", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert not (tmp_path / "out" / "result.json").exists()
    assert not (tmp_path / "cache" / "models").exists()  # nothing was trained
    return errors[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu(tmp_path):
    msg = _error_line(["model=gpt2-small", "device=cuda"], tmp_path)
    assert "device=cuda but no CUDA device is visible; valid: auto, cpu, cuda[:N], mps" in msg


def test_trained_sae_k_zero_before_the_model_is_looked_up(tmp_path):
    msg = _error_line(["model=gpt2-small", "sae=trained", "sae.k=0"], tmp_path)
    assert "sae.k=0 must be a positive integer" in msg


def test_unknown_hf_name(tmp_path):
    msg = _error_line(["model=gpt2-small", "model.hf_name=gtp2", "eval.method=neurons"], tmp_path)
    assert "hf_name='gtp2' is not a transformer_lens model name" in msg
