"""Fake model source and eval for the throwaway sweep app: the pipeline runs for real
(job hash, skip, result record), nothing is computed."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

from saeravel.evals.api import register
from saeravel.models import LoadedModel


class FakeModelSource:
    """A model source whose ``load`` returns a LoadedModel with only a shape."""

    def __init__(self, name: str, n_layers: int, d_model: int) -> None:
        self.name, self.n_layers, self.d_model = name, n_layers, d_model

    def load(self, sae_kwargs: dict[str, Any] | None = None) -> LoadedModel:
        cfg = SimpleNamespace(n_layers=self.n_layers, d_model=self.d_model, device="cpu")
        return LoadedModel(model=SimpleNamespace(cfg=cfg), name=self.name)


def _sleepy(cfg: Any, ctx: Any) -> Any:
    from saeravel.evals.api import EvalOutput

    time.sleep(cfg.slow_s if ctx.layer == cfg.slow_layer else cfg.work_s)
    scores = {
        a: {"cause": 0.1 * ctx.layer, "isolation": 0.9, "disentangle": (0.1 * ctx.layer + 0.9) / 2}
        for a in cfg.attributes
    }
    base = {a: {"cause": 0.0, "isolation": 1.0, "disentangle": 0.5} for a in cfg.attributes}
    return EvalOutput(metrics={"ravel": {cfg.method: scores, "baseline": base}})


def register_fake_eval() -> None:
    """Register eval ``sleepy`` (idempotent)."""
    register("sleepy", schema=dict, needs_sae=lambda cfg: False)(_sleepy)
