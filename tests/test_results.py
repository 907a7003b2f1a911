"""Job identity by config path, checked skips, code versions, unknown keys, file modes, a full
disk, and strict JSON (saeravel.results, saeravel.pipeline)."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from saeravel import results
from saeravel.errors import UserError
from saeravel.pipeline import check_known_keys, run
from saeravel.results import (
    atomic_write,
    atomic_write_json,
    check_record,
    code_version,
    job_hash,
    non_result_paths,
)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SWEEP_APP = Path(__file__).resolve().parent / "sweep_app"
GROUPS = ("model", "sae", "eval")
# Values a group option needs to compose (its ??? keys).
NEEDS = {
    ("sae", "sae_lens"): ["sae.release=gpt2-small-res-jb"],
    ("sae", "local"): ["sae.path=/nonexistent"],
    ("sae", "custom"): [
        "sae.object._target_=x.Y",
        "sae.hook_name=blocks.1.hook_resid_post",
        "sae.d_in=128",
    ],
}


def _compose(overrides: list[str], conf: Path = CONF, name: str = "config"):
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _every_option() -> list[dict[str, Any]]:
    """The resolved config of every option of every config group (the others at default)."""
    out = []
    for group in GROUPS:
        for opt in _options(group):
            cfg = _compose([f"{group}={opt}", "paths.output_dir=/x", *NEEDS.get((group, opt), [])])
            out.append(OmegaConf.to_container(cfg, resolve=True))
    return out


def _leaves(obj: Any, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    if isinstance(obj, dict) and obj:
        return [leaf for k, v in obj.items() for leaf in _leaves(v, (*prefix, str(k)))]
    return [(prefix, obj)]


def _other(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str):
        return value + "_other"
    if isinstance(value, list):
        return [*value, "other"]
    if isinstance(value, dict):
        return {"other": 1}
    return "other"  # None


def _set(cfg: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    new = json.loads(json.dumps(cfg))
    node = new
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return new


def _excluded(path: tuple[str, ...], eval_name: str) -> bool:
    return any(
        path[: len(p.split("."))] == tuple(p.split(".")) for p in non_result_paths(eval_name)
    )


def test_every_config_key_is_hashed_or_listed_with_a_reason() -> None:
    """Walk every key of every option of every group: changing it changes the job hash unless
    its path is listed (with a reason) as not changing a result; every listed path exists."""
    seen: set[str] = set()
    for cfg in _every_option():
        base = job_hash(cfg)
        name = cfg["eval"]["name"]
        for path, value in _leaves(cfg):
            changed = job_hash(_set(cfg, path, _other(value))) != base
            dotted = ".".join(path)
            assert changed != _excluded(path, name), (name, dotted)
            for listed in non_result_paths(name):
                if dotted == listed or dotted.startswith(listed + "."):
                    seen.add(f"{name}:{listed}" if listed.startswith("eval.") else listed)
    listed = set(results.NON_RESULT_PATHS) | {
        f"{e}:eval.{p}" for e, paths in results.NON_RESULT_EVAL_PATHS.items() for p in paths
    }
    assert listed - seen == set(), "listed paths that exist in no config"
    for why in [*results.NON_RESULT_PATHS.values()] + [
        w for paths in results.NON_RESULT_EVAL_PATHS.values() for w in paths.values()
    ]:
        assert isinstance(why, str) and len(why) > 10  # a reason, not a placeholder


def _hash(overrides: list[str]) -> str:
    cfg = _compose(["paths.output_dir=/x", *overrides])
    return job_hash(OmegaConf.to_container(cfg, resolve=True))


def test_training_batch_sizes_change_the_hash_inference_ones_do_not() -> None:
    base = _hash([])
    assert _hash(["eval.batch_size=32"]) != base  # RAVEL's training batch
    assert _hash(["sae.batch_size=128"]) != base  # the SAE's training batch
    assert _hash(["model.batch_size=7"]) == base  # inference
    assert _hash(["device=cpu"]) == _hash(["device=cuda"]) == base
    absorption = _hash(["eval=absorption"])
    assert _hash(["eval=absorption", "eval.batch_size=5"]) == absorption  # inference there
    assert absorption != base


# ----------------------------------------------------------------------------- checked skips


def _record(**over: Any) -> dict[str, Any]:
    rec = results.build_record(
        eval_name="ravel", eval_cfg={"name": "ravel", "epochs": 2}, metrics={"ravel": {"x": 1.0}},
        details=None, unstructured=None, sae_identity=None, sae_cfg=None, model_name="m",
        model_info={}, layer=0, hook_name="blocks.0.hook_resid_post",
        resolved_config={"eval": {"name": "ravel", "epochs": 2}, "seed": 0}, job_id="abc",
        runtime_s=1.0,
    )  # fmt: skip
    rec.update(over)
    return rec


def test_check_record_names_what_is_wrong() -> None:
    cfg = {"eval": {"name": "ravel", "epochs": 2}, "seed": 0}
    assert check_record(_record(), "abc", cfg) is None
    assert "metrics are empty" in check_record(_record(eval_result_metrics={}), "abc", cfg)
    assert "no 'eval_type_id'" in check_record({"saeravel": {"complete": True}}, "abc")
    assert "'saeravel' is a str" in check_record(_record(saeravel="yes"), "abc", cfg)
    assert "job 'abc'" in check_record(_record(), "def", cfg)
    other = {"eval": {"name": "ravel", "epochs": 3}, "seed": 0}
    assert "eval.epochs: 2 instead of 3" in check_record(_record(), "abc", other)
    # A difference in a path that does not change results is not a difference.
    assert check_record(_record(), "abc", {**cfg, "device": "cuda"}) is None
    assert "not a JSON object" in check_record([1, 2], "abc")


@pytest.fixture
def sweep_app(monkeypatch: pytest.MonkeyPatch):
    """The sweep app's fake model and eval (tests/sweep_app): the real pipeline, no compute."""
    monkeypatch.syspath_prepend(str(SWEEP_APP))
    from sweep_parts import register_fake_eval

    register_fake_eval()

    def make(tmp: Path, *extra: str):
        return _compose(
            [f"paths.output_dir={tmp / 'job'}", f"paths.results_dir={tmp / 'results'}",
             "eval.work_s=0", *extra],
            SWEEP_APP, "sweep_app",
        )  # fmt: skip

    return make


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize(
    "tamper",
    ["no_metrics", "stub", "string_meta", "other_job", "other_config", "torn", "incomplete"],
)
def test_a_stored_result_is_returned_only_when_it_is_this_jobs(
    tmp_path: Path, sweep_app: Any, caplog: pytest.LogCaptureFixture, tamper: str
) -> None:
    cfg = sweep_app(tmp_path)
    first = run(cfg)
    (stored,) = (tmp_path / "results" / "sleepy").glob("????????????????.json")
    with caplog.at_level(logging.INFO, logger="saeravel"):
        assert run(cfg)["eval_id"] == first["eval_id"]  # a good record is skipped to
    assert "already complete" in caplog.text and not _warnings(caplog)
    rec = json.loads(stored.read_text())
    if tamper == "no_metrics":
        del rec["eval_result_metrics"]
    elif tamper == "stub":
        rec = {"saeravel": {"complete": True}}
    elif tamper == "string_meta":
        rec["saeravel"] = "complete"
    elif tamper == "other_job":
        rec = run(sweep_app(tmp_path / "other", "layer=2"))
    elif tamper == "other_config":
        rec["saeravel"]["config"]["eval"]["work_s"] = 5.0
    elif tamper == "incomplete":
        rec["saeravel"]["complete"] = False
    text = json.dumps(rec)[:50] if tamper == "torn" else json.dumps(rec)
    stored.write_text(text)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="saeravel"):
        again = run(cfg)
    assert again["eval_id"] != first["eval_id"]  # recomputed
    warned = _warnings(caplog)
    assert len(warned) == 1 and "recomputing" in warned[0] and str(stored) in warned[0], warned
    assert check_record(json.loads(stored.read_text())) is None  # healed


def test_code_version_hashes_the_uncommitted_diff(tmp_path: Path) -> None:
    git = ["git", "-C", str(tmp_path), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "a.py").write_text("lr = 1\n")
    subprocess.run([*git, "add", "a.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    clean = code_version(tmp_path)
    assert clean is not None and "+" not in clean and len(clean) == 40
    (tmp_path / "a.py").write_text("lr = 10\n")
    one = code_version(tmp_path)
    (tmp_path / "a.py").write_text("lr = 0.1\n")
    two = code_version(tmp_path)
    assert one.startswith(clean + "+dirty.") and two.startswith(clean + "+dirty.")
    assert one != two  # two different edits are two versions
    (tmp_path / "a.py").write_text("lr = 10\n")
    assert code_version(tmp_path) == one
    assert code_version(tmp_path / "..") is None or code_version(tmp_path / "..") != one


# ----------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    ("override", "want"),
    [
        ("+eval.epoch=2", "unknown config key eval.epoch (did you mean eval.epochs?)"),
        ("+eval.mask.tmperature=1", "unknown config key eval.mask.tmperature"),
        ("+model.n_layer=3", "did you mean model.n_layers"),
        ("+sae.kk=3", "unknown config key sae.kk"),
        ("+sede=1", "unknown config key sede (did you mean seed?)"),
    ],
)
def test_unknown_keys_are_rejected_even_with_plus(override: str, want: str) -> None:
    cfg = _compose(["paths.output_dir=/x", override])
    with pytest.raises(
        UserError, match=want.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")
    ):
        check_known_keys(cfg)


def test_free_form_dicts_take_any_key() -> None:
    cfg = _compose(["paths.output_dir=/x", "model=gpt2-small",
                    "+model.from_pretrained_kwargs.center_writing_weights=false"])  # fmt: skip
    check_known_keys(cfg)
    check_known_keys(_compose(["paths.output_dir=/x"]))


# ----------------------------------------------------------------------------- files


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_files_get_the_umasks_permissions(tmp_path: Path, umask: int, mode: int) -> None:
    old = os.umask(umask)
    try:
        path = atomic_write_json(tmp_path / "r.json", {"a": 1})
        torch_path = results.atomic_torch_save(tmp_path / "w.pt", {"x": 1})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode
    assert torch_path.stat().st_mode & 0o777 == mode


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path: Path, code: int) -> None:
    def fill(fh: Any) -> None:
        fh.write(b"x" * 5000)
        raise OSError(code, os.strerror(code))

    (tmp_path / "r.json").write_text("old")
    with pytest.raises(UserError) as info:
        atomic_write(tmp_path / "r.json", fill)
    msg = str(info.value)
    assert "\n" not in msg and f"no space left on the device of {tmp_path}" in msg
    assert "needs at least 5 kB" in msg and "free" in msg
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temp file
    assert (tmp_path / "r.json").read_text() == "old"
    with pytest.raises(UserError, match=r"needs 1.2 MB"):
        atomic_write(tmp_path / "r.json", fill, size=1_200_000)


def test_result_records_are_strict_json(tmp_path: Path) -> None:
    rec = {"a": float("nan"), "b": [float("inf"), 1.5], "c": {"d": float("-inf")}}
    path = atomic_write_json(tmp_path / "r.json", rec, strict=True)

    def reject(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")

    data = json.loads(path.read_text(), parse_constant=reject)
    assert data == {"a": None, "b": [None, 1.5], "c": {"d": None}}
    json.dumps(data, allow_nan=False)
    # Caches keep Python's NaN (their readers compare floats).
    assert "NaN" in atomic_write_json(tmp_path / "c.json", {"a": float("nan")}).read_text()


# ----------------------------------------------------------------------------- command line


def _app(args: list[str], tmp: Path, **kw: Any) -> subprocess.Popen:
    env = dict(os.environ, SAERAVEL_RESULTS=str(tmp / "results"), TQDM_DISABLE="1",
               PYTHONPATH=os.pathsep.join([str(SWEEP_APP), str(ROOT / "src")]))  # fmt: skip
    env.pop("HYDRA_FULL_ERROR", None)
    flags = [a for a in args if a.startswith("-")]
    args = [a for a in args if not a.startswith("-")]
    cmd = [sys.executable, str(SWEEP_APP / "app.py"), *flags, f"hydra.searchpath=[file://{CONF}]"]
    cmd += args
    return subprocess.Popen(
        cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw
    )


def test_ctrl_c_is_one_line_and_exit_130(tmp_path: Path) -> None:
    import signal
    import time

    # A shell starts background jobs with SIGINT ignored, and Python then keeps ignoring it:
    # give the job the default disposition, as a terminal's Ctrl-C finds it.
    proc = _app([f"hydra.run.dir={tmp_path / 'out'}", "eval.work_s=60"], tmp_path,
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.monotonic() + 60
    log = tmp_path / "out" / "app.log"
    while time.monotonic() < deadline and not (log.exists() and "job " in log.read_text()):
        time.sleep(0.2)
    time.sleep(2.0)  # into the eval's work (a loaded machine is slow to get there)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == ["stopped; rerun the same command to continue"], err
    assert "Traceback" not in out + err


@pytest.mark.parametrize("launcher", ["basic", "local"])
def test_a_sweep_with_a_failed_job_exits_non_zero_naming_it(tmp_path: Path, launcher: str) -> None:
    """Layer 9 of the fake 4-layer model is bad input: the other jobs still finish, the sweep
    ends with one summary line naming the failed job, exit code 2."""
    extra = ["hydra/launcher=local"] if launcher == "local" else []
    proc = _app(["-m", "layer=0,9,1", "eval.work_s=0", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                 *extra], tmp_path)  # fmt: skip
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 2, err[-2000:]
    summary = [line for line in err.splitlines() if "of the sweep failed" in line]
    assert len(summary) == 1, err
    assert "1 job(s)" in summary[0] and "layer=9" in summary[0] and "out of range" in summary[0]
    assert "Traceback" not in out + err
    done = sorted(
        json.loads(p.read_text())["saeravel"]["layer"]
        for p in (tmp_path / "sweep").rglob("result.json")
    )
    assert done == [0, 1]
    # A sweep whose jobs all succeed exits 0.
    ok = _app(["-m", "layer=0,1", "eval.work_s=0", f"hydra.sweep.dir={tmp_path / 'ok'}", *extra],
              tmp_path)  # fmt: skip
    out, err = ok.communicate(timeout=240)
    assert ok.returncode == 0, err[-2000:]


def test_main_guarded_turns_a_full_disk_into_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """ENOSPC anywhere in a job (here: a write outside atomic_write) is one line, exit 2."""
    import saeravel.pipeline as pipeline

    def full(cfg: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "x.pt"))

    monkeypatch.setattr(pipeline, "run", full)
    cfg = OmegaConf.create({"paths": {"output_dir": str(tmp_path)}})
    with pytest.raises(SystemExit) as info:
        pipeline.main_guarded(cfg)
    assert info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(err) == 1 and f"no space left on the device of {tmp_path / 'run'}" in err[0]


def test_ctrl_c_line_names_the_checkpoint_step(tmp_path: Path) -> None:
    from saeravel.checkpoint import CheckpointStore
    from saeravel.pipeline import _progress

    store = CheckpointStore(tmp_path / "job.ckpt")
    assert _progress(store) == "" and _progress(None) == ""
    store.save("scored-neurons-Country", {"cause": 0.5})
    store.save("train-neurons-Continent", {"step": 30, "total": 120})
    assert _progress(store) == " from step 30 of 120 (train-neurons-Continent)"
