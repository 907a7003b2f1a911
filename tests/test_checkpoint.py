"""Checkpoints (saeravel.checkpoint) and RAVEL mask training that continues after an
interruption with the same parameters, scores and curves as an uninterrupted run."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir

import saeravel.checkpoint as checkpoint_mod
import saeravel.evals.ravel.train as ravel_mod
from saeravel.checkpoint import CheckpointStore, SaveTimer, entry_name, rng_state, set_rng_state
from saeravel.errors import UserError
from saeravel.pipeline import run

from helpers import SMALL_CITY

CONF = str(Path(__file__).resolve().parents[1] / "conf")
TEMPERATURE = ravel_mod.temperature  # the real one, whatever a test has patched in

# ----------------------------------------------------------------------------- the store


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_store_round_trip_names_remove_and_clear(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "job.ckpt")
    assert store.enabled and store.names() == [] and store.load("x") is None
    assert not (tmp_path / "job.ckpt").exists()  # created by the first save only
    state = {"w": torch.arange(4.0), "rng": (3, (1, 2), None), "loss": [0.5, math.nan], "n": 7}
    store.save("train-neurons-Country", state)
    store.save("scored-neurons-Country", {"cause": 0.25})
    got = store.load("train-neurons-Country")
    assert torch.equal(got["w"], state["w"]) and got["rng"] == (3, (1, 2), None)
    assert got["loss"][0] == 0.5 and math.isnan(got["loss"][1]) and got["n"] == 7
    store.save("scored-neurons-Country", {"cause": 0.75})  # overwrite
    assert store.load("scored-neurons-Country") == {"cause": 0.75}
    assert store.names() == ["scored-neurons-Country", "train-neurons-Country"]
    assert _files(tmp_path / "job.ckpt") == [
        "scored-neurons-Country.pt",
        "train-neurons-Country.pt",
    ]  # no temp file left behind
    store.remove("train-neurons-Country")
    store.remove("never-written")
    assert store.names() == ["scored-neurons-Country"]
    store.clear()
    assert not (tmp_path / "job.ckpt").exists() and store.names() == []
    store.clear()  # twice is harmless


def test_disabled_store_keeps_nothing(tmp_path: Path) -> None:
    store = CheckpointStore.disabled()
    assert not store.enabled
    store.save("a", {"x": 1})
    assert store.load("a") is None and store.names() == []
    store.remove("a")
    store.clear()
    assert not store.timer(1.0, 1).active and not store.timer(1.0, 1).due(1)


def test_interrupted_write_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A requeue (SystemExit) arriving while a checkpoint is written leaves the old one whole."""
    store = CheckpointStore(tmp_path)
    store.save("train", {"step": 3})

    def torn_save(obj: Any, fh: Any) -> None:
        fh.write(b"PK\x03\x04 half a checkpoint")
        raise SystemExit(-1)

    monkeypatch.setattr(checkpoint_mod.torch, "save", torn_save)
    with pytest.raises(SystemExit):
        store.save("train", {"step": 6})
    monkeypatch.undo()
    assert store.load("train") == {"step": 3}
    assert _files(tmp_path) == ["train.pt"]


def test_checkpoints_of_another_owner_are_deleted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "job.ckpt"
    me = {"job_hash": "abc", "saeravel": "0.1.0", "git_commit": "1111"}
    store = CheckpointStore(folder)
    store.claim(me)
    assert not folder.exists()  # nothing written before the first entry
    store.save("train", {"step": 3})
    assert json.loads((folder / "owner.json").read_text()) == me
    requeued = CheckpointStore(folder)  # the same job, same code: continues
    requeued.claim(dict(me))
    assert requeued.load("train") == {"step": 3} and requeued.names() == ["train"]
    with caplog.at_level(logging.WARNING, logger="saeravel.checkpoint"):
        CheckpointStore(folder).claim({**me, "git_commit": "2222"})  # after a git pull
    assert not folder.exists() and "deleting checkpoints" in caplog.text
    CheckpointStore(folder).save("train", {"step": 3})  # unclaimed: no owner file
    CheckpointStore(folder).claim(me)
    assert not folder.exists()


def test_unreadable_checkpoint_is_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "train.pt").write_bytes(b"not a checkpoint")
    with caplog.at_level(logging.WARNING, logger="saeravel.checkpoint"):
        assert CheckpointStore(tmp_path).load("train") is None
    assert "ignoring unreadable checkpoint" in caplog.text and "train.pt" in caplog.text


def test_entry_names_are_file_names() -> None:
    assert entry_name("train", "neurons", "Country") == "train-neurons-Country"
    assert entry_name("scored", "das", "Time zone/UTC") == "scored-das-Time_zone_UTC"
    with pytest.raises(ValueError, match="checkpoint name '../x'"):
        CheckpointStore("/nonexistent").load("../x")


def test_save_timer_by_steps_and_by_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(checkpoint_mod.time, "monotonic", lambda: now[0])
    by_steps = SaveTimer(0, 3)
    assert [s for s in range(1, 10) if by_steps.due(s)] == [3, 6, 9]
    by_time = SaveTimer(60.0)
    assert not by_time.due(1)
    now[0] += 59.0
    assert not by_time.due(2)
    now[0] += 1.0
    assert by_time.due(3)  # 60 s since the start
    assert not by_time.due(4)  # the clock restarted at the save
    now[0] += 60.0
    assert by_time.due(5)
    assert not SaveTimer(0, 0).active and not SaveTimer(0, 0).due(10)
    with pytest.raises(ValueError, match="must be >= 0"):
        SaveTimer(-1.0)


def test_torch_rng_state_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    store = CheckpointStore(tmp_path)
    store.save("rng", rng_state())
    want = torch.rand(5)
    torch.manual_seed(2)
    set_rng_state(store.load("rng"))
    assert torch.equal(torch.rand(5), want)


# ----------------------------------------------------------------------------- RAVEL resume


class Preempted(BaseException):
    """Stands in for the SystemExit with which submitit leaves a job it requeues."""


def _cfg(tmp: Path, cache: Path, results: Path, extra: list[str]):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(
            config_name="config",
            overrides=[
                *SMALL_CITY,
                f"paths.cache_dir={cache}",
                f"paths.output_dir={tmp}",
                f"paths.results_dir={results}",
                "log_level=INFO",
                *extra,
            ],
        )


class StepSpy:
    """Wraps ravel's ``temperature`` (called once per training step of a masked method):
    records (step, total) of every step and raises :class:`Preempted` before step
    number ``stop_at`` (counted over the whole job) when given."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, stop_at: int | None = None) -> None:
        self.calls: list[tuple[int, int]] = []
        self.stop_at = stop_at

        def spy(step: int, total: int, *args: Any) -> float:
            if self.stop_at is not None and len(self.calls) == self.stop_at:
                raise Preempted
            self.calls.append((step, total))
            return TEMPERATURE(step, total, *args)

        monkeypatch.setattr(ravel_mod, "temperature", spy)


def _artifacts(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: torch.load(p, weights_only=True) for p in sorted(folder.glob("ravel_*_*.pt"))}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["neurons", "das"])
def test_interrupted_training_continues_to_the_same_result(
    method: str,
    tmp_path: Path,
    cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """neurons: interrupted mid-epoch while training the second attribute (the first one's
    score comes from the checkpoint); das: interrupted just after an epoch boundary of the
    first attribute, with the checkpoint at the boundary."""
    extra = [f"eval.method={method}", "eval.checkpoint_every_s=0"]
    # 1. Uninterrupted: the reference, and the steps per attribute.
    spy = StepSpy(monkeypatch)
    ref = run(
        _cfg(tmp_path / "ref", cache, tmp_path / "r-ref", [*extra, "eval.checkpoint_every_steps=3"])
    )
    total = spy.calls[0][1]
    steps_per_epoch = total // ref["eval_config"]["epochs"]
    assert len(spy.calls) == 2 * total and steps_per_epoch > 3
    if method == "neurons":  # Country done; Continent stopped mid-epoch 2, saved every 3 steps
        every, attr = 3, "Continent"
        stop_at = total + steps_per_epoch + 2
        resume_at = (steps_per_epoch + 2) // every * every
    else:  # Country stopped 2 steps into epoch 2, saved at the end of epoch 1
        every, attr = steps_per_epoch, "Country"
        stop_at, resume_at = steps_per_epoch + 2, steps_per_epoch
    extra.append(f"eval.checkpoint_every_steps={every}")
    results = tmp_path / "results"
    cfg = _cfg(tmp_path / "job", cache, results, extra)

    # 2. Interrupted after `stop_at` steps: no result, a checkpoint to continue from.
    spy = StepSpy(monkeypatch, stop_at=stop_at)
    with pytest.raises(Preempted):
        run(cfg)
    assert len(spy.calls) == stop_at
    (ckpt,) = results.glob("ravel/*.ckpt")
    want = [f"train-{method}-{attr}"] + (["scored-neurons-Country"] if method == "neurons" else [])
    assert CheckpointStore(ckpt).names() == sorted(want)
    assert not list(results.glob("ravel/*.json"))
    assert not (tmp_path / "job" / "result.json").exists()

    # 3. Run again: it continues from the checkpoint's step and redoes only what follows.
    spy = StepSpy(monkeypatch)
    with caplog.at_level(logging.INFO):
        rec = run(cfg)
    resumed = f"{method}/{attr}: resuming from checkpoint at step {resume_at} of {total}"
    assert resumed in caplog.text
    first_steps = [s for s, _ in spy.calls]
    if method == "neurons":
        assert "neurons/Country: trained and scored before the interruption" in caplog.text
        assert first_steps == list(range(resume_at, total))  # Continent only, from the checkpoint
    else:
        assert first_steps == list(range(resume_at, total)) + list(range(total))
    assert not ckpt.exists()  # the result is written: the checkpoint folder is gone

    # 4. The same parameters, scores and training curves as the uninterrupted run.
    assert rec["eval_result_metrics"] == ref["eval_result_metrics"]
    details, ref_details = rec["eval_result_details"], ref["eval_result_details"]
    assert details["training_curves"] == ref_details["training_curves"]
    assert details["per_template"] == ref_details["per_template"]
    attrs = ("Continent", "Country")
    got, want_art = _artifacts(tmp_path / "job"), _artifacts(tmp_path / "ref")
    trained = [f"ravel_{method}_{a}.pt" for a in attrs]
    assert sorted(got) == sorted(want_art)
    assert trained == sorted(n for n in got if not n.endswith("_refined.pt"))
    for name, state in want_art.items():
        assert state.keys() == got[name].keys()
        for key, tensor in state.items():
            assert torch.equal(got[name][key], tensor), (name, key)


@pytest.mark.slow
def test_checkpoints_off_and_bad_intervals(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both intervals 0: nothing is written, an interrupted job starts over; a negative
    interval is a one-line error."""
    results = tmp_path / "results"
    off = ["eval.method=neurons", "eval.checkpoint_every_s=0", "eval.checkpoint_every_steps=0"]
    StepSpy(monkeypatch, stop_at=5)
    with pytest.raises(Preempted):
        run(_cfg(tmp_path / "job", cache, results, off))
    assert not list(results.glob("ravel/*"))
    spy = StepSpy(monkeypatch)
    run(_cfg(tmp_path / "job", cache, results, off))
    assert spy.calls[0][0] == 0  # started over
    # the result (and its SAEBench-named copy), no checkpoint folder
    entries = list(results.glob("ravel/*"))  # the record and its SAEBench copy's folder only
    assert {p.suffix for p in entries if p.is_file()} == {".json"}
    assert not [p for p in entries if p.suffix == ".ckpt"]
    assert not list(results.glob("ravel/*.ckpt"))
    with pytest.raises(UserError, match=r"eval.checkpoint_every_s=-1.0 .* must be >= 0"):
        run(_cfg(tmp_path / "bad", cache, results, ["eval.method=neurons", "eval.checkpoint_every_s=-1", "force=true"]))  # fmt: skip
