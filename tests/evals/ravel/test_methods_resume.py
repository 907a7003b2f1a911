"""The newer trained featurizers continue after an interruption to the same result as an
uninterrupted job: ``mdas`` (one joint training for both attributes, then per-attribute
scoring) and ``boundless_das`` (two optimizer groups: rotation and boundary). On the planted
world (analytic model, no training of the model itself)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir

import saeravel.evals.ravel.train as ravel_mod
from saeravel.checkpoint import CheckpointStore
from saeravel.pipeline import run

from helpers import ROOT

CONF = str(ROOT / "conf")
SMALL = ["model=planted-city-lm", "model.basis=rotated", "sae=none", "device=cpu",
         "model.n_entities=120", "model.n_country=20", "model.n_continent=6",
         "model.n_language=10", "model.id_dims=6", "model.d_model=48",
         "eval.max_pairs_per_split=100", "eval.max_entities=null", "eval.epochs=3",
         "eval.checkpoint_every_s=0", "eval.mask.refine=false"]  # fmt: skip
TEMPERATURE = ravel_mod.temperature


class Preempted(Exception):
    pass


class StepSpy:
    """Counts training steps (ravel's ``temperature`` is called once per step) and raises
    :class:`Preempted` before step ``stop_at`` of the job when given."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, stop_at: int | None = None) -> None:
        self.calls: list[tuple[int, int]] = []

        def spy(step: int, total: int, *args: Any) -> float:
            if stop_at is not None and len(self.calls) == stop_at:
                raise Preempted
            self.calls.append((step, total))
            return TEMPERATURE(step, total, *args)

        monkeypatch.setattr(ravel_mod, "temperature", spy)


def _cfg(tmp: Path, extra: list[str]):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=[
            *SMALL, f"paths.cache_dir={tmp / 'cache'}", f"paths.output_dir={tmp / 'out'}",
            f"paths.results_dir={tmp / 'results'}", *extra,
        ])  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mdas", "boundless_das"])
def test_interrupted_training_continues_to_the_same_result(
    method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    spy = StepSpy(monkeypatch)
    ref = run(_cfg(tmp_path / "ref", [f"eval.method={method}", "eval.checkpoint_every_steps=5"]))
    total = spy.calls[0][1]
    steps_per_epoch = total // 3
    # mdas trains once (both attributes' pairs); boundless_das once per attribute
    assert len(spy.calls) == (total if method == "mdas" else 2 * total)
    extra = [f"eval.method={method}", f"eval.checkpoint_every_steps={steps_per_epoch}"]
    cfg = _cfg(tmp_path / "job", extra)
    spy = StepSpy(monkeypatch, stop_at=steps_per_epoch + 2)
    with pytest.raises(Preempted):
        run(cfg)
    (ckpt,) = (tmp_path / "job" / "results").glob("ravel/*.ckpt")
    name = "train-mdas-joint" if method == "mdas" else "train-boundless_das-Country"
    assert CheckpointStore(ckpt).names() == [name]
    spy = StepSpy(monkeypatch)
    with caplog.at_level(logging.INFO):
        rec = run(cfg)
    assert [s for s, _ in spy.calls][:2] == [steps_per_epoch, steps_per_epoch + 1]
    desc = "mdas/joint" if method == "mdas" else "boundless_das/Country"
    assert f"{desc}: resuming from checkpoint at step {steps_per_epoch} of {total}" in caplog.text
    assert rec["eval_result_metrics"] == ref["eval_result_metrics"]
    assert (
        rec["eval_result_details"]["training_curves"]
        == ref["eval_result_details"]["training_curves"]
    )
    m = rec["eval_result_metrics"]["ravel"][method]
    assert set(m) == {"Country", "Continent"} and all(
        r["training"]["epochs"] == 3 for r in m.values()
    )
