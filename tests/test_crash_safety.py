"""A job killed with SIGKILL at any phase, then started again with the same command, ends with
one complete result equal to an uninterrupted run's; two identical jobs started at once on one
cache train once, both finish, and leave one result. Real ``python run.py`` subprocesses on
the planted world; the kill points are injected by tests/crash_app/sitecustomize.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model=planted-city-lm", "model.n_entities=120", "model.n_country=20",
         "model.n_language=10", "model.id_dims=6", "model.d_model=48",
         "eval.max_pairs_per_split=100", "eval.max_entities=null", "eval.epochs=3",
         "eval.checkpoint_every_s=0", "eval.checkpoint_every_steps=4", "device=cpu"]  # fmt: skip


def _job(tmp: Path, run_dir: str, extra: list[str], kill_at: str | None = None, **popen):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "tests" / "crash_app"), str(ROOT / "src"), env.get("PYTHONPATH", "")]
    )
    env.pop("SAERAVEL_KILL_AT", None)
    if kill_at:
        env["SAERAVEL_KILL_AT"] = kill_at
    args = [sys.executable, str(ROOT / "run.py"), *SMALL, *extra,
            f"paths.cache_dir={tmp / 'cache'}", f"paths.results_dir={tmp / 'results'}",
            f"hydra.run.dir={tmp / run_dir}"]  # fmt: skip
    return subprocess.Popen(
        args, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen
    )


def _finish(proc, timeout: int = 600) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _metrics(path: Path) -> dict:
    return json.loads(path.read_text())["eval_result_metrics"]


def _json_files_are_whole(tmp: Path) -> None:
    for path in tmp.rglob("*.json"):
        json.loads(path.read_text())  # raises on a half-written file


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("reference")
    code, _, err = _finish(_job(tmp, "run", ["sae=planted", "eval.method=neurons"]))
    assert code == 0, err[-2000:]
    return _metrics(tmp / "run" / "result.json")


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["loading", "training", "scoring", "writing"])
def test_kill_9_at_any_phase_then_rerun_gives_the_uninterrupted_result(tmp_path, reference, phase):
    extra = ["sae=planted", "eval.method=neurons"]
    code, _, err = _finish(_job(tmp_path, "run", extra, kill_at=phase))
    assert code == -signal.SIGKILL, (phase, code, err[-2000:])
    _json_files_are_whole(tmp_path)
    index = tmp_path / "results" / "ravel"
    assert not list(index.glob("*.json")), "a killed job left a result in the index"
    if phase == "training":
        assert list(index.glob("*.ckpt/train-*.pt")), "no checkpoint to continue from"

    code, _, err = _finish(_job(tmp_path, "run", extra))
    assert code == 0, err[-2000:]
    _json_files_are_whole(tmp_path)
    results = [p for p in index.glob("*.json") if not p.name.endswith("_eval_results.json")]
    assert len(results) == 1
    assert _metrics(results[0]) == reference
    assert _metrics(tmp_path / "run" / "result.json") == reference
    assert not list(index.glob("*.ckpt")), "a complete job's checkpoints must be deleted"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "trains"),
    [
        # the job lock: one computes the masks, the other waits and returns its result
        (["sae=planted", "eval.method=neurons"], "neurons/Country: training"),
        # the SAE cache's lock: one trains the SAE, the other waits and loads it
        (["sae=trained", "sae.steps=100", "eval.method=sae"], "training a topk SAE"),
    ],
    ids=["masks", "sae"],
)
def test_two_identical_jobs_at_once_train_once_and_leave_one_result(tmp_path, extra, trains):
    first = _job(tmp_path, "run_a", extra)
    second = _job(tmp_path, "run_b", extra)
    (code_a, _, err_a), (code_b, _, err_b) = _finish(first), _finish(second)
    assert code_a == 0 and code_b == 0, (err_a[-2000:], err_b[-2000:])
    logs = [(tmp_path / d / "run.log").read_text() for d in ("run_a", "run_b")]
    assert sum(trains in text for text in logs) == 1, f"{trains!r} in both jobs' logs"
    # the later one waited for the job's lock (or, started late, found the result written)
    waited = ("running in another process; waiting for it", "already complete")
    assert sum(any(w in text for w in waited) for text in logs) == 1
    index = tmp_path / "results" / "ravel"
    results = [p for p in index.glob("*.json") if not p.name.endswith("_eval_results.json")]
    assert len(results) == 1
    a, b = (_metrics(tmp_path / d / "result.json") for d in ("run_a", "run_b"))
    assert a == b == _metrics(results[0])
