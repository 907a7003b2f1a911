"""Test-only fault injection: when ``SAERAVEL_KILL_AT`` names a phase, the process sends
itself SIGKILL at that point of a real ``python run.py`` job (put this folder on PYTHONPATH;
Python imports ``sitecustomize`` at start-up). Phases: ``loading`` (the model has just
loaded), ``training`` (a mask's second training checkpoint has just been written),
``scoring`` (the second decoding pass of the scoring starts), ``writing`` (the results index's temporary file
is written, not yet renamed)."""

from __future__ import annotations

import os
import signal

PHASE = os.environ.get("SAERAVEL_KILL_AT")


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _install(phase: str) -> None:
    import types

    if phase == "loading":
        from saeravel import planted

        load = planted.PlantedModel.load

        def load_then_die(self, *args, **kwargs):
            load(self, *args, **kwargs)
            _die()

        planted.PlantedModel.load = load_then_die
    elif phase == "training":
        from saeravel import checkpoint

        save, seen = checkpoint.CheckpointStore.save, []

        def save_then_die(self, name, state):
            save(self, name, state)
            if name.startswith("train-"):
                seen.append(name)
                if len(seen) == 2:
                    _die()

        checkpoint.CheckpointStore.save = save_then_die
    elif phase == "scoring":
        from saeravel.evals.ravel import score as ravel

        generations, calls = ravel.generations, []

        def die_on_second(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:  # the references are decoded; the first method's scoring starts
                _die()
            return generations(*args, **kwargs)

        ravel.generations = die_on_second
    elif phase == "writing":
        from saeravel import results

        real = os

        class _Os(types.ModuleType):
            def __getattr__(self, name):
                return getattr(real, name)

            @staticmethod
            def replace(src, dst):
                if os.sep + "results" + os.sep in str(dst) and str(dst).endswith(".json"):
                    _die()
                real.replace(src, dst)

        results.os = _Os("os")
    else:
        raise SystemExit(f"SAERAVEL_KILL_AT={phase}: unknown phase")


if PHASE:
    _install(PHASE)
