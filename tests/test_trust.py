"""Results nobody can fool (issue 23): a stored result is served only when it is provably this
job's and this code's, writes repair themselves, a config's ``_target_`` is bounded, names from
the config stay inside their folders, and the last faults (a full disk, Ctrl-C, a sweep job
that dies, malformed RAVEL files) end in one line.

Jobs run in-process through the pipeline's command-line wrapper (``main_guarded``) or through
``run.py``'s Hydra entry, on the planted model at small sizes (about 4 s a job)."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from saeravel import results
from saeravel.cache import CorruptEntry, check_name, inside, torch_load
from saeravel.config import register_configs
from saeravel.errors import UserError, check_code_target
from saeravel.pipeline import main_guarded, run
from saeravel.results import job_hash, remove_stale_temps, saebench_filename, saebench_path, seal

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SWEEP_APP = Path(__file__).resolve().parent / "sweep_app"
SMALL = ["model=planted-city-lm", "sae=planted", "eval.method=sae", "eval.epochs=1",
         "model.n_entities=40", "eval.max_pairs_per_split=20",
         "eval.attributes=[Country,Continent]", "device=cpu"]  # fmt: skip


def _compose(tmp: Path, *extra: str, out: str = "out") -> Any:
    register_configs()
    paths = [f"paths.cache_dir={tmp / 'cache'}", f"paths.output_dir={tmp / out}",
             f"paths.results_dir={tmp / 'results'}"]  # fmt: skip
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[*SMALL, *paths, *extra])


def _guarded(cfg: Any, capsys: pytest.CaptureFixture) -> tuple[int, list[str]]:
    """``main_guarded(cfg)`` as the command line runs it: (exit code, stderr's lines)."""
    capsys.readouterr()
    code = 0
    try:
        main_guarded(cfg)
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def _index(tmp: Path) -> Path:
    (stored,) = (tmp / "results" / "ravel").glob("????????????????.json")
    return stored


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ----------------------------------------------------------------------------- 1. stored results


def _edit(rec: dict[str, Any], how: str) -> dict[str, Any]:
    if how.startswith("score"):
        rec["eval_result_metrics"]["ravel"]["sae"]["Country"]["disentangle"] = 0.99
    elif how.startswith("eval_config"):
        rec["eval_config"]["epochs"] = 30
    elif how.startswith("metrics"):
        rec["eval_result_metrics"] = {"ravel": {}}
    elif how == "no_checksum":
        del rec["checksum"]
    elif how == "schema_sealed":
        rec["saeravel"]["schema_version"] = "1"
    return seal(rec) if how.endswith("_sealed") else rec


@pytest.mark.parametrize(
    ("how", "why"),
    [
        ("score", "checksum does not match its content"),
        ("eval_config", "checksum does not match its content"),
        ("eval_config_sealed", "eval_config differs from this job's (eval_config.epochs: 30 instead of 1)"),
        ("metrics", "its metrics are empty"),
        ("metrics_sealed", "its metrics are empty"),
        ("no_checksum", "it has no checksum"),
        ("schema_sealed", "it has result schema '1'"),
    ],
)  # fmt: skip
def test_an_edited_stored_result_is_recomputed_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str, why: str
) -> None:
    cfg = _compose(tmp_path)
    first = run(cfg)
    stored = _index(tmp_path)
    stored.write_text(json.dumps(_edit(json.loads(stored.read_text()), how)))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="saeravel"):
        again = run(cfg)
    assert again["eval_id"] != first["eval_id"]  # recomputed
    warned = _warnings(caplog)
    assert len(warned) == 1 and why in warned[0] and str(stored) in warned[0], warned
    healed = json.loads(stored.read_text())
    assert results.check_record(healed, first["saeravel"]["job_hash"]) is None
    assert healed["eval_result_metrics"] == first["eval_result_metrics"]  # 0.99 is gone


def test_reuse_strict_refuses_an_edited_result_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run(_compose(tmp_path))
    stored = _index(tmp_path)
    stored.write_text(json.dumps(_edit(json.loads(stored.read_text()), "score")))
    before = _files(tmp_path / "results")
    code, err = _guarded(_compose(tmp_path, "reuse=strict"), capsys)
    assert code == 2 and len(err) == 1, err
    assert "reuse=strict does not recompute" in err[0] and "checksum does not match" in err[0]
    assert _files(tmp_path / "results") == before  # nothing recomputed or overwritten


def test_a_result_of_other_code_is_recomputed_unless_reuse_any_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Dirty tree -> clean commit: recomputed with one warning naming both versions; with
    reuse=any_code it is served, and the run folder's copy names who computed and who served."""
    monkeypatch.setattr(results, "git_commit", lambda: "c0ffee+dirty.123456789abc")
    dirty = run(_compose(tmp_path))
    assert dirty["saeravel"]["git_commit"] == "c0ffee+dirty.123456789abc"
    monkeypatch.setattr(results, "git_commit", lambda: "c0ffee")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="saeravel"):
        clean = run(_compose(tmp_path))
    warned = _warnings(caplog)
    assert clean["eval_id"] != dirty["eval_id"] and len(warned) == 1, warned
    assert "computed by code c0ffee+dirty.123456789abc, this is c0ffee" in warned[0]
    # The clean result is served to the same code, and to other code only on purpose.
    monkeypatch.setattr(results, "git_commit", lambda: "beef")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="saeravel"):
        served = run(_compose(tmp_path, "reuse=any_code", out="out2"))
    assert served["eval_id"] == clean["eval_id"] and not _warnings(caplog)
    assert "reuse=any_code serves it although it was computed by code c0ffee" in caplog.text
    copy = json.loads((tmp_path / "out2" / "result.json").read_text())
    assert copy["saeravel"]["git_commit"] == "c0ffee"  # the code that computed it
    assert copy["saeravel"]["served"]["git_commit"] == "beef"  # the code that served it
    assert copy["saeravel"]["served"]["reuse"] == "any_code"
    assert copy["saeravel"]["served"]["from"] == str(_index(tmp_path))
    assert results.check_record(copy) is None  # sealed again after the served block
    fresh = json.loads((tmp_path / "out" / "result.json").read_text())["saeravel"]["served"]
    assert fresh["reuse"] == "same_code" and fresh["from"] == "computed by this run"


def test_reuse_is_not_part_of_the_job_identity(tmp_path: Path) -> None:
    hashes = {
        job_hash(OmegaConf.to_container(_compose(tmp_path, f"reuse={r}"), resolve=True))
        for r in ("same_code", "any_code", "strict")
    }
    assert len(hashes) == 1


# ----------------------------------------------------------------------------- 2. writes


def test_a_foreign_result_in_the_run_folder_is_refused_untouched(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run(_compose(tmp_path, "seed=0"))
    before = _files(tmp_path / "out")
    code, err = _guarded(_compose(tmp_path, "seed=1"), capsys)
    assert code == 2 and len(err) == 1, err
    assert f"run folder {tmp_path / 'out'} already holds the result of job" in err[0]
    assert "nothing was changed" in err[0]
    assert _files(tmp_path / "out") == before


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_killed_saebench_copy_write_is_repaired_on_the_rerun(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What a SIGKILL during the index's SAEBench-copy write leaves (the record, no copy, a
    temp file) is repaired by the rerun's skip: the copy is rewritten, the dead writer's temp
    file removed; a live writer's temp file is left alone."""
    cfg = _compose(tmp_path)
    first = run(cfg)
    stored = _index(tmp_path)
    copy = stored.parent / saebench_path(first, first["saeravel"]["job_hash"])
    good = json.loads(copy.read_text())
    copy.unlink()
    host = results._HOST
    dead = copy.parent / f".{copy.name}.{_dead_pid()}@{host}.x1y2.tmp"
    live = copy.parent / f".{copy.name}.{os.getpid()}@{host}.x3y4.tmp"
    old = stored.parent / f".{stored.name}.legacy.tmp"
    for tmp in (dead, live, old):
        tmp.write_text('{"half": ')
    os.utime(old, (time.time() - 2 * results.STALE_TEMP_S,) * 2)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="saeravel"):
        again = run(cfg)
    assert again["eval_id"] == first["eval_id"]  # served, not recomputed
    assert json.loads(copy.read_text()) == good
    warned = _warnings(caplog)
    assert len(warned) == 1 and "SAEBench copy" in warned[0], warned
    assert not dead.exists() and not old.exists() and live.exists()


def test_the_saebench_copy_is_written_before_the_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import saeravel.pipeline as pipeline

    order: list[str] = []
    real = pipeline.atomic_write_json

    def spy(path: Any, data: Any, **kw: Any) -> Path:
        order.append(Path(path).name)
        return real(path, data, **kw)

    monkeypatch.setattr(pipeline, "atomic_write_json", spy)
    rec = run(_compose(tmp_path))
    jid = rec["saeravel"]["job_hash"]
    copies = [i for i, name in enumerate(order) if name == saebench_filename(rec)]
    last = -1
    for pos in sorted(order.index(r) for r in (f"{jid}.json", "result.json")):
        assert any(last < i < pos for i in copies), order  # each record's copy comes first
        last = pos


def test_remove_stale_temps_keeps_live_writers(tmp_path: Path) -> None:
    host = results._HOST
    keep = [tmp_path / f".r.json.{os.getpid()}@{host}.a.tmp", tmp_path / "r.json",
            tmp_path / f".r.json.{_dead_pid()}@other-host.b.tmp", tmp_path / ".fresh.tmp"]  # fmt: skip
    gone = [tmp_path / f".r.json.{_dead_pid()}@{host}.c.tmp"]
    for p in keep + gone:
        p.write_text("x")
    assert sorted(remove_stale_temps(tmp_path)) == gone
    assert all(p.exists() for p in keep)
    # atomic_write's own temp names carry the pid and host
    assert results.temp_prefix(tmp_path / "r.json") == f".r.json.{os.getpid()}@{host}."


# ----------------------------------------------------------------------------- 3. configs are code


@pytest.mark.parametrize("target", ["shutil.copy", "builtins.open"])
def test_a_function_target_is_refused_before_it_is_called(
    tmp_path: Path, capsys: pytest.CaptureFixture, target: str
) -> None:
    src = tmp_path / "src.txt"
    src.write_text("payload")
    made = tmp_path / "must_not_appear.txt"
    args = (
        [f"+sae.object.src={src}", f"+sae.object.dst={made}"]
        if target == "shutil.copy"
        else [f"+sae.object.file={made}", "+sae.object.mode=w"]
    )
    cfg = _compose(tmp_path, "sae=custom", f"sae.object._target_={target}",
                   "sae.hook_name=blocks.0.hook_resid_post", "sae.d_in=64", *args)  # fmt: skip
    code, err = _guarded(cfg, capsys)
    assert code == 2 and len(err) == 1, err
    assert f"custom SAE target {target!r} is a builtin_function_or_method" in err[0] or (
        f"custom SAE target {target!r} is a function" in err[0]
    )
    assert "not a class" in err[0] and "sae.allow_factory=true" in err[0]
    assert not made.exists()
    assert not (tmp_path / "out" / "result.json").exists()


class _Codec:
    def encode(self, x: Any) -> Any:
        return x

    def decode(self, f: Any) -> Any:
        return f


def _factory() -> _Codec:
    return _Codec()


def test_check_code_target() -> None:
    check_code_target(_Codec, "m._Codec", {"d": 1})  # a class with encode and decode
    for obj, why in [(str, "no callable decode()"), (bytes, "no callable encode()"),
                     (_factory, "is a function, not a class"), (open, "not a class")]:  # fmt: skip
        with pytest.raises(UserError, match=why):
            check_code_target(obj, "x.y")
    with pytest.raises(UserError, match=r"nested _target_ 'shutil.copy'"):
        check_code_target(_Codec, "m._Codec", {"w": {"_target_": "shutil.copy", "src": "a"}})
    check_code_target(_factory, "m._factory", None, allow_factory=True)  # the explicit opt-in
    check_code_target(_Codec, "m._Codec", {"w": {"_target_": "x.y"}}, allow_factory=True)


class _Evil:
    """A pickle that would create ``marker`` when loaded without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (open, (str(self.marker), "w"))


def _loaders(tmp: Path) -> dict[str, Any]:
    from saeravel.checkpoint import CheckpointStore
    from saeravel.evals.ravel.methods import load_basis
    from saeravel.saes.formats import torch_load_state_dict as _torch_load

    store = CheckpointStore(tmp / "ckpt")
    return {
        "checkpoint": (tmp / "ckpt" / "evil.pt", lambda p: store.load("evil")),
        "cache": (tmp / "cache.pt", torch_load),
        "local_sae": (tmp / "sae.pt", _torch_load),
        "ravel_basis": (tmp / "basis.pt", lambda p: load_basis(str(p), 8)),
    }


@pytest.mark.parametrize("loader", ["checkpoint", "cache", "local_sae", "ravel_basis"])
def test_every_torch_file_loader_refuses_code_in_a_pickle(tmp_path: Path, loader: str) -> None:
    path, load = _loaders(tmp_path)[loader]
    path.parent.mkdir(parents=True, exist_ok=True)
    marker = tmp_path / "code_ran"
    torch.save({"w": _Evil(marker)}, path)
    with contextlib.suppress(UserError, CorruptEntry):
        assert load(path) is None  # the checkpoint store ignores it (with a warning)
    assert not marker.exists()


def test_every_torch_load_in_the_package_is_weights_only() -> None:
    import ast

    calls = 0
    for path in (ROOT / "src" / "saeravel").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
            ):
                calls += 1
                kw = {k.arg: k.value for k in node.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value
                assert ok, f"{path}:{node.lineno}: torch.load without weights_only=True"
    assert calls >= 4


# ----------------------------------------------------------------------------- 4. paths


@pytest.mark.parametrize("name", ["../x", "../../../escaped_model", "/tmp/abs_model", "a/b", ".."])
def test_a_model_name_that_is_a_path_is_refused_before_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture, name: str
) -> None:
    cfg = _compose(tmp_path / "root", f"model.name='{name}'")
    code, err = _guarded(cfg, capsys)
    assert code == 2 and len(err) == 1, err
    assert f"model.name={name!r} cannot name a file" in err[0]
    assert not (tmp_path / "root").exists()  # nothing written anywhere
    assert not Path("/tmp/abs_model").exists()


def test_inside_keeps_names_under_their_root(tmp_path: Path) -> None:
    assert inside(tmp_path, "ravel_filter", "m-1.json") == tmp_path / "ravel_filter" / "m-1.json"
    for parts in (("..", "x"), ("/etc/passwd",), ("a", "../../x"), ("",)):
        with pytest.raises(UserError, match="outside"):
            inside(tmp_path, *parts)
    assert check_name("gemma-2-2b", "model.name") == "gemma-2-2b"
    for bad in ("", ".hidden", "a\\b", "a\0b"):
        with pytest.raises(UserError):
            check_name(bad, "model.name")


# ----------------------------------------------------------------------------- 5. full disk


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 kB tmpfs, filled: every write into it fails with ENOSPC (needs root)."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:  # fmt: skip
        pytest.skip("cannot mount a tmpfs (not root)")
    try:
        fd = os.open(mnt / ".filler", os.O_WRONLY | os.O_CREAT)
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
        os.unlink(mnt / ".filler")  # the space stays taken while fd is open
        yield mnt
        os.close(fd)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _no_temp_files(folder: Path) -> None:
    assert not [p for p in folder.rglob("*.tmp")], list(folder.rglob("*.tmp"))


@pytest.mark.parametrize("kind", ["results", "cache", "output"])
def test_a_full_disk_is_one_line_exit_2(
    tmp_path: Path, full_disk: Path, capsys: pytest.CaptureFixture, kind: str
) -> None:
    where = {
        "results": "paths.results_dir",
        "cache": "paths.cache_dir",
        "output": "paths.output_dir",
    }
    cfg = _compose(tmp_path, f"{where[kind]}={full_disk / kind}")
    code, err = _guarded(cfg, capsys)
    assert code == 2 and len(err) == 1, err
    assert f"no space left on the device of {full_disk / kind}" in err[0]
    assert not list(tmp_path.rglob("result.json"))  # nothing half-written
    _no_temp_files(tmp_path)


def test_a_full_disk_under_the_checkpoints_is_one_line_exit_2(
    tmp_path: Path, full_disk: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = _compose(tmp_path, "eval.checkpoint_every_steps=1")
    jid = job_hash(OmegaConf.to_container(cfg, resolve=True))
    ckpt = tmp_path / "results" / "ravel" / f"{jid}.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.symlink_to(full_disk, target_is_directory=True)
    code, err = _guarded(cfg, capsys)
    assert code == 2 and len(err) == 1, err
    assert f"no space left on the device of {ckpt}" in err[0]
    assert not list(tmp_path.rglob("result.json"))
    _no_temp_files(tmp_path)


def _cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, args: list[str]) -> Any:
    """``python run.py *args`` in this process: (exit code, stderr's lines)."""
    import runpy

    monkeypatch.setattr(sys, "argv", [str(ROOT / "run.py"), *args])
    GlobalHydra.instance().clear()
    capsys.readouterr()
    code = 0
    try:
        runpy.run_path(str(ROOT / "run.py"), run_name="__main__")
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        GlobalHydra.instance().clear()
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_a_full_run_dir_is_one_line_before_hydra_writes(
    tmp_path: Path, full_disk: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``hydra.run.dir`` on a full disk: the callback's probe fails before Hydra saves
    ``.hydra/config.yaml`` (which would be Hydra's ENOSPC traceback)."""
    run_dir = full_disk / "run"
    code, err = _cli(monkeypatch, capsys, [*SMALL, f"hydra.run.dir={run_dir}",
                                           f"paths.cache_dir={tmp_path / 'cache'}",
                                           f"paths.results_dir={tmp_path / 'results'}"])  # fmt: skip
    assert code == 2 and len(err) == 1, err
    assert f"no space left on the device of {run_dir}" in err[0] and "hydra.run.dir" in err[0]
    assert not (run_dir / ".hydra").exists()


# ----------------------------------------------------------------------------- 5. Ctrl-C, sweeps

STUCK = """
import sys, threading, time
from concurrent.futures import ThreadPoolExecutor
import saeravel.pipeline as pipeline
from omegaconf import OmegaConf

def stuck_thread(cfg):
    threading.Thread(target=time.sleep, args=(120,)).start()  # non-daemon: joined at exit
    print("ready", flush=True)
    time.sleep(120)

def stuck_pool(cfg):
    with ThreadPoolExecutor(1) as pool:  # __exit__ waits for the worker
        pool.submit(time.sleep, 120)
        print("ready", flush=True)
        time.sleep(120)

pipeline.run = {"thread": stuck_thread, "pool": stuck_pool}[sys.argv[1]]
pipeline.main_guarded(OmegaConf.create({"paths": {"output_dir": "."}}))
"""


@pytest.mark.parametrize("where", ["thread", "pool"])
def test_ctrl_c_exits_130_within_10_s_even_when_something_waits(tmp_path: Path, where: str) -> None:
    script = tmp_path / "stuck.py"
    script.write_text(STUCK)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.Popen([sys.executable, str(script), where], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    assert proc.stdout.readline().strip() == "ready"
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    took = time.monotonic() - start
    assert proc.returncode == 130 and took < 10, (proc.returncode, took, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == ["stopped; rerun the same command to continue"], err


DIE = """
import os, signal
if os.environ.get("SAERAVEL_DIE_LAYER"):
    import saeravel.pipeline as pipeline
    real = pipeline.run

    def run(cfg):
        if str(cfg.layer) == os.environ["SAERAVEL_DIE_LAYER"]:
            os.kill(os.getpid(), signal.SIGKILL)  # dies without a result
        return real(cfg)

    pipeline.run = run
"""


@pytest.mark.slow
def test_a_local_sweep_whose_job_dies_ends_with_the_summary(tmp_path: Path) -> None:
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(DIE)
    env = dict(os.environ, SAERAVEL_RESULTS=str(tmp_path / "results"), TQDM_DISABLE="1",
               SAERAVEL_DIE_LAYER="1",
               PYTHONPATH=os.pathsep.join([str(tmp_path / "hook"), str(SWEEP_APP), str(ROOT / "src")]))  # fmt: skip
    cmd = [sys.executable, str(SWEEP_APP / "app.py"), "-m", f"hydra.searchpath=[file://{CONF}]",
           "hydra/launcher=local", "layer=0,1", "eval.work_s=0",
           f"hydra.sweep.dir={tmp_path / 'sweep'}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert (
        "Traceback" not in proc.stderr
        and "UncompletedJobError" not in proc.stderr.split("of the sweep failed")[0]
    )
    summary = [line for line in proc.stderr.splitlines() if "of the sweep failed" in line]
    assert len(summary) == 1, proc.stderr[-3000:]
    assert "1 job(s)" in summary[0] and "#1 (eval.work_s=0,layer=1)" in summary[0]
    assert "died without a result" in summary[0] and ".submitit" in summary[0]
    done = [json.loads(p.read_text())["saeravel"]["layer"]
            for p in (tmp_path / "sweep").rglob("result.json")]  # fmt: skip
    assert done == [0]


# ----------------------------------------------------------------------------- 5. RAVEL files


@pytest.mark.parametrize(
    ("key", "content", "why"),
    [
        ("templates", ["a %s"], "is not RAVEL's templates file"),
        ("entities", {"Paris": "France"}, "is not RAVEL's entities file"),
        ("entity_split", {"Paris": 1}, "is not RAVEL's entity_split file"),
        ("wikipedia", "{not json", "is not readable JSON"),
    ],
)
def test_a_wrongly_shaped_ravel_file_is_one_line(
    tmp_path: Path, key: str, content: Any, why: str
) -> None:
    from saeravel.evals.ravel.data import CITY_FILES, load_ravel_city

    good = {
        "entities": {"Paris": {"Country": "France"}},
        "templates": {"Country": ["%s is in"]},
        "template_split": {"%s is in": "train"},
        "entity_split": {"Paris": "train"},
        "wikipedia": {"%s is": {"split": "train", "entity": "Paris"}},
    }
    for k, name in CITY_FILES.items():
        data = content if k == key else good[k]
        (tmp_path / name).write_text(data if isinstance(data, str) else json.dumps(data))
    with pytest.raises(UserError) as info:
        load_ravel_city(tmp_path)
    assert why in str(info.value) and CITY_FILES[key] in str(info.value)
    assert "\n" not in str(info.value)


def test_errno_of_a_full_disk_is_what_the_fixture_gives(full_disk: Path) -> None:
    with pytest.raises(OSError) as info:
        (full_disk / "x").write_bytes(b"\0" * 8192)
    assert info.value.errno == errno.ENOSPC
