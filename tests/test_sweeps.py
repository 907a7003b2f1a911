"""Sweeps at scale: launcher and experiment configs, the report, resume, and a real SLURM sweep.

The SLURM test runs only when a cluster answers ``sinfo`` (``scripts/slurm_local.sh start``).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from saeravel import report
from saeravel.checkpoint import CheckpointStore
from saeravel.config import register_configs
from saeravel.results import atomic_write_json, build_record, job_hash, load_complete, seal

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
SWEEP_APP = Path(__file__).resolve().parent / "sweep_app"

# ----------------------------------------------------------------------------- helpers


def _compose_all(
    overrides: list[list[str]], conf_dir: Path = CONF, hydra_cfg: bool = False
) -> list[DictConfig]:
    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        return [compose("config", overrides=o, return_hydra_config=hydra_cfg) for o in overrides]


def _compose(overrides: list[str], conf_dir: Path = CONF, hydra_cfg: bool = False) -> DictConfig:
    return _compose_all([overrides], conf_dir, hydra_cfg)[0]


def _expand(experiment: str, command_line: tuple[str, ...] = ()) -> list[list[str]]:
    """The job overrides of ``python run.py -m experiment=<experiment> <command_line>``, as
    Hydra's BasicSweeper computes them (config params first, the command line after them)."""
    cfg = _compose([f"experiment={experiment}"], hydra_cfg=True)
    params = [f"{k}={v}" for k, v in (cfg.hydra.sweeper.params or {}).items()]
    parsed = OverridesParser.create().parse_overrides([*params, *command_line])
    batches = BasicSweeper.split_arguments(parsed, None)
    return [list(job) for batch in batches for job in batch]


def _ravel_record(
    *, model: str, family: str | None, layer: int, scores: dict[str, dict[str, float]], millis: int
) -> dict[str, Any]:
    """A record with the layout eval=ravel writes (built by saeravel.results.build_record)."""
    attrs = sorted({a for by_attr in scores.values() for a in by_attr})
    base = {a: {"cause": 0.0, "isolation": 1.0, "disentangle": 0.5} for a in attrs}
    metrics = {
        "ravel": {
            m: {
                a: {"cause": c, "isolation": 1 - c / 2, "disentangle": (c + 1 - c / 2) / 2}
                for a, c in s.items()
            }
            for m, s in scores.items()
        }
        | {"baseline": base},
        "baselines": {"none": base},
    }
    rec = build_record(
        eval_name="ravel",
        eval_cfg={"name": "ravel", "version": "1.0"},
        metrics=metrics,
        details=None,
        unstructured=None,
        sae_identity={"family": family} if family else None,
        sae_cfg=None,
        model_name=model,
        model_info={},
        layer=layer,
        hook_name=f"blocks.{layer}.hook_resid_post",
        resolved_config={},
        job_id=f"hash{layer}{family}",
        runtime_s=1.0,
    )
    rec["datetime_epoch_millis"] = millis
    return seal(rec)  # its checksum covers the edit


@pytest.fixture(scope="module")
def results_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sweep-like folder: ravel results at layers 0 and 1, a newer rerun of one job, a copy of a
    record in the job-hash index, a core result, a corrupt file and two foreign JSON files."""
    root = tmp_path_factory.mktemp("sweep")
    t = 1_700_000_000_000
    for layer in (0, 1):
        rec = _ravel_record(
            model="tiny-city-lm",
            family="trained",
            layer=layer,
            scores={
                m: {"Country": 0.2 + 0.1 * layer, "Continent": 0.4}
                for m in ("sae", "das", "neurons")
            },
            millis=t + layer,
        )
        atomic_write_json(root / f"{layer}_layer={layer}" / "result.json", rec)
    # The same record in the job-hash index: counted once, not a duplicate.
    (root / "results" / "ravel").mkdir(parents=True)
    shutil.copy(root / "1_layer=1" / "result.json", root / "results" / "ravel" / "hash1.json")
    # A rerun of layer 0's sae job, newer and with another cause: it replaces the old rows.
    newer = _ravel_record(
        model="tiny-city-lm",
        family="trained",
        layer=0,
        scores={"sae": {"Country": 0.9}},
        millis=t + 100,
    )
    atomic_write_json(root / "rerun" / "result.json", newer)
    # An older rerun of layer 1's das job: it loses against the original.
    older = _ravel_record(
        model="tiny-city-lm",
        family="trained",
        layer=1,
        scores={"das": {"Country": 0.0}},
        millis=t - 100,
    )
    atomic_write_json(root / "old" / "result.json", older)
    core = build_record(
        eval_name="core",
        eval_cfg={"name": "core"},
        metrics={"reconstruction_quality": {"explained_variance": 0.8}, "sparsity": {"l0": 16.0}},
        details=None,
        unstructured=None,
        sae_identity={"family": "trained"},
        sae_cfg=None,
        model_name="tiny-city-lm",
        model_info={},
        layer=1,
        hook_name="blocks.1.hook_resid_post",
        resolved_config={},
        job_id="corehash",
        runtime_s=1.0,
    )
    atomic_write_json(root / "core" / "result.json", core)
    (root / "broken").mkdir()
    (root / "broken" / "result.json").write_text('{"eval_type_id": "ravel", "eval_result_')
    (root / "world.json").write_text(json.dumps({"cities": ["Paris"]}))
    (root / "list.json").write_text("[1, 2, 3]")
    return root


# ----------------------------------------------------------------------------- report


def test_report_collects_ravel_results_and_skips_foreign_files(
    results_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="saeravel.report"):
        rep = report.build_report(results_folder, tmp_path / "out")
    skipped = {p.relative_to(results_folder).as_posix() for p, _ in rep.skipped}
    assert skipped == {"broken/result.json"}  # a broken result is named in a warning ...
    for name in skipped:
        assert any(name in r.getMessage() for r in caplog.records), name
    for name in ("world.json", "list.json"):  # ... JSON that is no result is ignored quietly
        assert not any(name in r.getMessage() for r in caplog.records), name

    ravel, spread, core = rep.tables
    assert spread.name == "ravel_over_seeds" and all(r["n_seeds"] >= 1 for r in spread.rows)
    assert ravel.name == "ravel" and core.name == "core"
    # 2 layers x 3 methods x 2 attributes; the copy in the index adds nothing.
    assert len(ravel.rows) == 12
    assert all(set(report.RAVEL_COLUMNS) <= set(r) for r in ravel.rows)
    rows = {(r["layer"], r["method"], r["attribute"]): r for r in ravel.rows}
    assert rows[(0, "sae", "Country")]["cause"] == pytest.approx(0.9)  # the newer rerun
    assert rows[(0, "sae", "Country")]["file"].endswith("rerun/result.json")
    assert rows[(1, "das", "Country")]["cause"] == pytest.approx(0.3)  # the older rerun lost
    assert rows[(1, "das", "Country")]["baseline"] == pytest.approx(0.5)
    assert {r["sae"] for r in ravel.rows} == {"trained"}
    assert len(ravel.notes) == 2 and all("duplicate" in n and "dropped" in n for n in ravel.notes)
    assert any("rerun/result.json (newer)" in n for n in ravel.notes)
    assert any("duplicate" in r.getMessage() for r in caplog.records)

    assert len(core.rows) == 1
    assert core.rows[0]["reconstruction_quality.explained_variance"] == pytest.approx(0.8)
    assert "sparsity.l0" in core.columns

    out = tmp_path / "out"
    header = (out / "ravel.csv").read_text().splitlines()[0].split(",")
    assert header[: len(report.RAVEL_COLUMNS)] == list(report.RAVEL_COLUMNS)
    assert len((out / "ravel.csv").read_text().splitlines()) == 13
    assert (out / "core.csv").exists()
    for name in ("ravel_vs_layer.png", "cause_vs_isolation.png", "core_vs_l0.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, name
    md = (out / "report.md").read_text()
    assert md == rep.markdown
    assert "### ravel: tiny-city-lm (12 rows)" in md  # one table per model, named above it
    assert "| sae | layer | method | attribute | disentangle | cause | isolation | baseline |" in md
    assert "| trained | 0 | sae | Country | 0.725 | 0.900 | 0.550 | 0.500 |" in md


def test_report_cli(results_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert report.main([str(results_folder), "--out", str(tmp_path / "r")]) == 0
    printed = capsys.readouterr().out
    assert "## ravel (12 rows)" in printed and "wrote " in printed
    assert (tmp_path / "r" / "ravel.csv").exists()
    assert report.main([str(tmp_path / "missing")]) == 2


def test_report_of_a_folder_without_results(tmp_path: Path) -> None:
    from saeravel.errors import UserError

    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(UserError, match="no saeravel results under") as err:
        report.build_report(tmp_path)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "report" / "report.md").exists()


# ----------------------------------------------------------------------------- launcher configs


@pytest.mark.parametrize(
    ("launcher", "target"), [("slurm", "SlurmLauncher"), ("local", "LocalLauncher")]
)
def test_launcher_configs_compose(launcher: str, target: str) -> None:
    cfg = _compose([f"hydra/launcher={launcher}", "experiment=embedded_grid"], hydra_cfg=True)
    lc = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    assert lc["_target_"].endswith(target)
    assert lc["submitit_folder"] == "${hydra.sweep.dir}/.submitit/%j"
    assert lc["timeout_min"] > 0
    if launcher == "slurm":
        assert lc["gpus_per_node"] is None and lc["partition"] is None
        assert lc["setup"] == [] and lc["array_parallelism"] >= 1


def test_site_override_from_conf_local(tmp_path: Path) -> None:
    """A git-ignored conf/local/site.yaml, selected with local=site, sets cluster fields."""
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf, ignore=shutil.ignore_patterns("local"))
    (conf / "local").mkdir()
    shutil.copy(REPO / "launchers" / "site.example.yaml", conf / "local" / "site.yaml")
    cfg = _compose(["hydra/launcher=slurm", "local=site"], conf_dir=conf, hydra_cfg=True)
    assert cfg.hydra.launcher.partition == "cpu"
    assert cfg.hydra.launcher.setup == ["source ~/venvs/saeravel/bin/activate"]
    assert cfg.hydra.launcher.timeout_min == 120
    # The command line still wins over the site file.
    cfg = _compose(
        ["hydra/launcher=slurm", "local=site", "hydra.launcher.partition=gpu"],
        conf_dir=conf,
        hydra_cfg=True,
    )
    assert cfg.hydra.launcher.partition == "gpu"


# ----------------------------------------------------------------------------- experiment grids


def _jobs(experiment: str) -> list[tuple[str, str, int, str]]:
    """(model, SAE family, layer, method) of every job of a multirun of ``experiment``; the
    first and the last job are composed in full (composing all 54 takes half a minute)."""
    jobs = _expand(experiment)
    ends = _compose_all([[f"experiment={experiment}", *jobs[i]] for i in (0, -1)])
    out = []
    for i, ov in enumerate(jobs):
        kv = dict(o.split("=", 1) for o in ov)
        family = kv.get("sae", ends[0].sae.family)  # not swept: from the experiment
        out.append((ends[0].model.name, family, int(kv["layer"]), kv["eval.method"]))
        if i in (0, len(jobs) - 1):
            c = ends[0 if i == 0 else 1]
            assert out[-1] == (c.model.name, c.sae.family, c.layer, c.eval.method)
    return out


def test_embedded_grid_expands_to_six_jobs() -> None:
    jobs = _jobs("embedded_grid")
    assert sorted(jobs) == sorted(
        ("tiny-city-lm", "trained", layer, m) for m in ("das", "neurons", "sae") for layer in (0, 1)
    )
    # A swept key given on the command line replaces the experiment's values.
    assert len(_expand("embedded_grid", ("layer=1",))) == 3
    assert len(_expand("embedded_grid", ("eval.method=das", "layer=0,1,2,3"))) == 4
    cfg = _compose(["experiment=embedded_grid"])
    assert list(cfg.eval.attributes) == ["Country", "Continent"] and cfg.eval.protocol == "saeravel"


def test_paper_grid_is_the_papers_grid() -> None:
    parts = {"paper_grid": 24, "paper_grid_baselines": 24, "paper_grid_apollo": 6}
    jobs = []
    for experiment, n in parts.items():
        part = _jobs(experiment)
        assert len(part) == n, experiment
        jobs += part
    want = [("gpt2-small", "none", layer, m) for m in ("das", "neurons") for layer in range(12)]
    want += [
        ("gpt2-small", f, layer, "sae") for f in ("openai_v5_32k", "jbloom") for layer in range(12)
    ]
    want += [
        ("gpt2-small", f, layer, "sae")
        for f in ("apollo_e2e", "apollo_e2e_ds")
        for layer in (1, 5, 9)
    ]
    assert sorted(jobs) == sorted(want)
    for experiment in parts:
        cfg = _compose([f"experiment={experiment}"])
        assert (
            list(cfg.eval.attributes) == ["Country", "Continent"]
            and cfg.eval.protocol == "saeravel"
        )


# ----------------------------------------------------------------------------- resume semantics


def _hashes(variants: list[list[str]]) -> list[str]:
    """Job hashes of the embedded grid's (layer 0, das) job with each variant of overrides."""
    base = [
        "experiment=embedded_grid",
        "paths.output_dir=/tmp/unused",
        "layer=0",
        "eval.method=das",
    ]
    cfgs = _compose_all([[*base, *v] for v in variants])
    return [job_hash(OmegaConf.to_container(c, resolve=True)) for c in cfgs]


def test_job_hash_ignores_device_paths_and_logging_but_not_the_job() -> None:
    same = [
        ["device=cpu"],
        ["device=cuda"],
        ["paths.cache_dir=/elsewhere", "paths.results_dir=/r", "paths.output_dir=/o"],
        ["log_level=DEBUG", "force=true"],
        ["model.batch_size=3", "eval.save_artifacts=false"],
        ["eval.checkpoint_every_s=0", "eval.checkpoint_every_steps=5"],
    ]
    different = [
        ["layer=1"],
        ["eval.method=neurons"],
        ["seed=1"],
        ["eval.epochs=3"],
        ["model.n_cities=50"],
        ["eval.batch_size=4"],  # RAVEL's training batch
        ["sae.batch_size=64"],  # the SAE's training batch
    ]
    base, *rest = _hashes([[], *same, *different])
    assert rest[: len(same)] == [base] * len(same)
    assert base not in rest[len(same) :] and len(set(rest[len(same) :])) == len(different)


def test_load_complete_accepts_only_complete_records(tmp_path: Path) -> None:
    rec = _ravel_record(model="m", family="f", layer=0, scores={"sae": {"Country": 0.5}}, millis=1)
    good = atomic_write_json(tmp_path / "good.json", rec)
    assert load_complete(good) == json.loads(good.read_text())
    assert list(tmp_path.iterdir()) == [good]  # no temp file left behind
    rec["saeravel"]["complete"] = False
    assert load_complete(atomic_write_json(tmp_path / "partial.json", rec)) is None
    (tmp_path / "torn.json").write_text(good.read_text()[:100])
    assert load_complete(tmp_path / "torn.json") is None
    assert load_complete(tmp_path / "missing.json") is None


def test_pipeline_skips_a_job_whose_result_exists(tmp_path: Path) -> None:
    """pipeline.run returns the stored record before loading anything, whatever the device."""
    from saeravel.pipeline import run

    overrides = [
        "experiment=embedded_grid",
        "layer=0",
        "eval.method=das",
        f"paths.output_dir={tmp_path / 'job'}",
        f"paths.results_dir={tmp_path / 'results'}",
        f"paths.cache_dir={tmp_path / 'no-cache'}",
    ]
    cfg = _compose(overrides)
    rec = _ravel_record(
        model="tiny-city-lm", family=None, layer=0, scores={"das": {"Country": 1.0}}, millis=5
    )
    resolved = OmegaConf.to_container(cfg, resolve=True)
    jid = job_hash(resolved)
    rec["saeravel"]["job_hash"], rec["saeravel"]["config"] = jid, resolved  # this job's record
    rec["eval_config"] = resolved["eval"]
    rec = seal(rec)
    atomic_write_json(tmp_path / "results" / "ravel" / f"{jid}.json", rec)
    assert (
        run(_compose([*overrides, "device=cpu", "log_level=WARNING"]))["eval_id"] == rec["eval_id"]
    )
    assert not (tmp_path / "no-cache").exists()
    # The skipped job's own folder still gets the (stored) result, so a sweep folder is complete.
    assert json.loads((tmp_path / "job" / "result.json").read_text())["eval_id"] == rec["eval_id"]


# ----------------------------------------------------------------------------- SLURM

SLURM_DIR = Path(os.environ.get("SAERAVEL_SLURM_DIR", "/tmp/saeravel-slurm"))
SLURM_CONF = SLURM_DIR / "etc" / "slurm.conf"


def _slurm_env() -> dict[str, str]:
    """The environment with SLURM_CONF pointing at scripts/slurm_local.sh's cluster when no
    other cluster is configured."""
    env = dict(os.environ)
    if "SLURM_CONF" not in env and not Path("/etc/slurm/slurm.conf").exists():
        if SLURM_CONF.exists():
            env["SLURM_CONF"] = str(SLURM_CONF)
    return env


@functools.cache
def _slurm_up() -> bool:
    """Whether a SLURM controller answers with a usable node (asked once per session)."""
    if shutil.which("sinfo") is None:
        return False
    env = _slurm_env()
    conf = Path(env.get("SLURM_CONF", "/etc/slurm/slurm.conf"))
    if conf.exists() and conf.resolve() == SLURM_CONF.resolve():
        # The local cluster: no controller process means down (sinfo would retry for ~10 s).
        pid_file = SLURM_DIR / "run" / "slurmctld.pid"
        pid = pid_file.read_text().strip() if pid_file.exists() else ""
        if not pid.isdigit() or not Path(f"/proc/{pid}").exists():
            return False
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=15
        )
    except (OSError, subprocess.SubprocessError):
        return False
    states = out.stdout.split()
    return out.returncode == 0 and any(s.startswith(("idle", "mix", "alloc")) for s in states)


needs_slurm = pytest.mark.skipif(
    "not _slurm_up()", reason="no SLURM cluster (scripts/slurm_local.sh start)"
)


# The sweep the SLURM test launches: the real pipeline.run with a fake model and eval (see
# tests/sweep_app), three jobs (layers 0, 1, 2); job 2 sleeps longest and is cancelled mid-run.
# For the real model and eval=ravel instead, swap this one line (each job then takes minutes):
#   SWEEP = [sys.executable, str(REPO / "run.py"), "-m", "layer=0,1,2", "eval.method=das", ...]
SWEEP = [sys.executable, str(SWEEP_APP / "app.py"), "-m", f"hydra.searchpath=[file://{CONF}]", "layer=0,1,2"]  # fmt: skip
SLOW_JOB = 2


def _states(array_id: str, env: dict[str, str]) -> dict[str, str]:
    out = subprocess.run(
        ["sacct", "-n", "-P", "-X", "-j", array_id, "-o", "JobID,State"],
        env=env, capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    states = {}
    for line in out.stdout.splitlines():
        job, _, state = line.partition("|")
        if "_" in job and "[" not in job:
            states[job.split("_")[1]] = state.split()[0] if state else ""
    return states


def _results(sweep: Path) -> dict[int, dict[str, Any]]:
    recs = (json.loads(p.read_text()) for p in sweep.rglob("result.json"))
    return {r["saeravel"]["layer"]: r for r in recs}


def _stop(proc: subprocess.Popen, array_id: str | None, env: dict[str, str], log: Any) -> None:
    """End a test's sweep however it went: the submitting process, its jobs, its log."""
    if proc.poll() is None:
        proc.kill()
    if array_id is not None:
        subprocess.run(["scancel", array_id], env=env, timeout=20)
    log.close()


def _wait(cond: Any, timeout: float, what: str, proc: subprocess.Popen | None = None) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if value := cond():
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the sweep exited ({proc.returncode}) while waiting for {what}")
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.mark.slurm
@needs_slurm
def test_slurm_sweep_cancel_and_resume(tmp_path: Path) -> None:
    env = _slurm_env() | {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(SWEEP_APP), os.environ.get("PYTHONPATH")])),
        "SAERAVEL_RESULTS": str(tmp_path / "results"),
        "HYDRA_FULL_ERROR": "1",
    }
    sweep = tmp_path / "sweep"

    def command(submitit: Path) -> list[str]:
        return [
            *SWEEP, "hydra/launcher=slurm",
            f"hydra.sweep.dir={sweep}", f"hydra.launcher.submitit_folder={submitit}/%j",
            "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=10",
        ]  # fmt: skip

    # 1. Submit; cancel the slow job once it runs and the others are done.
    first = tmp_path / "submitit-1"
    log1 = open(tmp_path / "first.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        command(first), cwd=tmp_path, env=env, stdout=log1, stderr=subprocess.STDOUT
    )
    array_id = None
    try:
        array_id = _wait(
            lambda: next((p.name for p in first.glob("*") if p.name.isdigit()), None),
            120,
            "the job array",
            proc,
        )
        _wait(
            lambda: _states(array_id, env).get(str(SLOW_JOB)) == "RUNNING",
            180,
            "the slow job to run",
            proc,
        )
        _wait(lambda: len(_results(sweep)) == 2, 180, "the quick jobs", proc)
        assert SLOW_JOB not in _results(sweep)
        subprocess.run(["scancel", f"{array_id}_{SLOW_JOB}"], env=env, check=True, timeout=20)
        assert proc.wait(timeout=180) != 0  # submitit reports the cancelled job
    finally:
        _stop(proc, array_id, env, log1)
    assert _states(array_id, env)[str(SLOW_JOB)].startswith("CANCELLED")
    before = _results(sweep)
    assert SLOW_JOB not in before and len(before) == 2

    # 2. Rerun the same sweep (fresh submitit folder): only the cancelled job runs again.
    second = subprocess.run(
        command(tmp_path / "submitit-2"),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    after = _results(sweep)
    assert sorted(after) == [0, 1, 2]
    for layer, rec in before.items():
        assert after[layer]["eval_id"] == rec["eval_id"], f"job of layer {layer} was redone"
    assert after[SLOW_JOB]["saeravel"]["complete"] is True
    logs = "".join(p.read_text() for p in (tmp_path / "submitit-2").rglob("*_log.*"))
    assert logs.count("already complete") == 2

    # 3. The report reads the sweep.
    rep = report.build_report(sweep, tmp_path / "report")
    assert len(rep.tables[0].rows) == 3 * 2 and not rep.skipped


@pytest.mark.slurm
@needs_slurm
def test_slurm_run_py_skips_finished_jobs(tmp_path: Path) -> None:
    """The real entry point through hydra/launcher=slurm: a grid whose results all exist runs
    no job (every job finds its record by hash and returns), so it costs seconds."""
    jobs = _expand("embedded_grid")
    cfgs = _compose_all([["experiment=embedded_grid", "paths.output_dir=/x", *ov] for ov in jobs])
    for cfg in cfgs:
        resolved = OmegaConf.to_container(cfg, resolve=True)
        jid = job_hash(resolved)
        rec = _ravel_record(
            model=cfg.model.name,
            family="trained",
            layer=cfg.layer,
            scores={cfg.eval.method: {"Country": 0.5}},
            millis=1,
        )
        rec["saeravel"]["job_hash"], rec["saeravel"]["config"] = jid, resolved  # this job's
        rec["eval_config"] = resolved["eval"]  # a stored record is served for its own config only
        atomic_write_json(tmp_path / "results" / "ravel" / f"{jid}.json", seal(rec))  # re-sealed
    env = _slurm_env() | {"SAERAVEL_RESULTS": str(tmp_path / "results"), "HYDRA_FULL_ERROR": "1"}
    cmd = [
        *[sys.executable, str(REPO / "run.py"), "-m", "experiment=embedded_grid"],
        *["hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        f"hydra.launcher.submitit_folder={tmp_path / 'submitit'}/%j",
        *[
            "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=1",
            "hydra.launcher.timeout_min=5",
        ],
    ]
    try:
        out = subprocess.run(
            cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400
        )
    finally:  # a timed-out sweep's jobs must not hold the cluster for the tests after this one
        arrays = {p.name.split("_")[0] for p in (tmp_path / "submitit").glob("*_*")}
        for array_id in arrays:
            subprocess.run(["scancel", array_id], env=env, timeout=20)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    logs = "".join(p.read_text() for p in (tmp_path / "submitit").rglob("*_log.*"))
    assert logs.count("already complete") == len(jobs) == 6


# The real entry point, model and eval: two jobs of the embedded default on eval=ravel (neuron
# masks, few pairs), a quick one and a slow one (only eval.epochs differs). Checkpoints every
# CKPT_STEPS training steps (about a second) so the test can interrupt right after one.
QUICK_EPOCHS, SLOW_EPOCHS, CKPT_STEPS = 2, 60, 30
REAL_JOB = [
    "eval=ravel", "eval.method=neurons", "eval.max_pairs_per_split=48",
    "eval.checkpoint_every_s=0", f"eval.checkpoint_every_steps={CKPT_STEPS}",
]  # fmt: skip
REAL_SWEEP = [sys.executable, str(REPO / "run.py"), "-m", *REAL_JOB, f"eval.epochs={QUICK_EPOCHS},{SLOW_EPOCHS}"]  # fmt: skip
SLOW_TASK = 1  # array index of the slow job (the sweep's second value)
RESUMED = re.compile(r"neurons/(\w+): resuming from checkpoint at step (\d+) of (\d+)")


def _progress(store: CheckpointStore, attrs: list[str]) -> tuple[int, int] | None:
    """How far the slow job's checkpoints are: (attributes finished, step of the one in
    training), or None while there is no checkpoint."""
    names = store.names()
    if not names:
        return None
    done = sum(f"scored-neurons-{a}" in names for a in attrs)
    if done == len(attrs):
        return (done, 0)
    state = store.load(f"train-neurons-{attrs[done]}")
    return (done, state["step"]) if state is not None else (done, 0)


def _job_logs(submitit: Path, task: int) -> str:
    """stdout and stderr of array task ``task`` (all its runs: SLURM appends after a requeue)."""
    return "".join(p.read_text() for p in sorted(submitit.glob(f"*_{task}/*_log.*")))


@pytest.mark.slow
@pytest.mark.slurm
@needs_slurm
def test_slurm_real_sweep_kill_rerun_requeue_and_continue(
    tmp_path: Path, embedded_default_model: Any
) -> None:
    """run.py -m on the embedded default through hydra/launcher=slurm: (1) kill the slow job
    mid-training: the quick job's result is complete, the slow job left a checkpoint; (2) rerun
    the sweep: the quick job is skipped, the slow job continues from its checkpoint; send it
    USR2 (what SLURM sends before the time limit): submitit requeues it and it continues again,
    from a later step, to a complete result. ~3 min on 2 cores once the model is cached."""
    results, sweep = tmp_path / "results", tmp_path / "sweep"
    env = _slurm_env() | {
        "SAERAVEL_RESULTS": str(results),
        "HYDRA_FULL_ERROR": "1",
        "TQDM_DISABLE": "1",
        "HF_HUB_OFFLINE": "1",
    }
    # eval.attributes: null means the world's first two (what the eval resolves at run time)
    attrs = list(
        _compose(REAL_JOB).eval.attributes or list(embedded_default_model.world.templates)[:2]
    )
    hashes = {
        e: job_hash(OmegaConf.to_container(c, resolve=True))
        for e, c in zip(
            (QUICK_EPOCHS, SLOW_EPOCHS),
            _compose_all([[*REAL_JOB, f"eval.epochs={e}", "paths.output_dir=/x"] for e in (QUICK_EPOCHS, SLOW_EPOCHS)]),
            strict=True,
        )
    }  # fmt: skip
    quick_result = results / "ravel" / f"{hashes[QUICK_EPOCHS]}.json"
    slow_result = results / "ravel" / f"{hashes[SLOW_EPOCHS]}.json"
    slow_ckpt = CheckpointStore(results / "ravel" / f"{hashes[SLOW_EPOCHS]}.ckpt")

    def launch(submitit: Path) -> tuple[subprocess.Popen, Any]:
        cmd = [
            *REAL_SWEEP, "hydra/launcher=slurm",
            f"hydra.sweep.dir={sweep}", f"hydra.launcher.submitit_folder={submitit}/%j",
            "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2",
            # <= 10 min: submitit counts any USR2 as a timeout, so the requeue below uses one
            # of slurm.yaml's max_num_timeout (with 0 the job would fail instead).
            "hydra.launcher.timeout_min=10",
        ]  # fmt: skip
        log = open(tmp_path / f"{submitit.name}.log", "w")  # noqa: SIM115
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
        return proc, log

    def array_of(submitit: Path, proc: subprocess.Popen) -> str:
        return _wait(
            lambda: next((p.name for p in submitit.glob("*") if p.name.isdigit()), None),
            120, "the job array", proc,
        )  # fmt: skip

    def diagnose(name: str) -> str:
        return (tmp_path / f"{name}.log").read_text()[-3000:] + "".join(
            f"\n--- {p}\n" + p.read_text()[-3000:] for p in (tmp_path / name).rglob("*_log.*")
        )

    # 1. Kill the slow job once it has a checkpoint; the quick job finishes.
    first = tmp_path / "submitit-1"
    proc, log = launch(first)
    array_id = None
    try:
        array_id = array_of(first, proc)
        _wait(lambda: _progress(slow_ckpt, attrs), 240, "the slow job's first checkpoint", proc)
        subprocess.run(["scancel", f"{array_id}_{SLOW_TASK}"], env=env, check=True, timeout=20)
        assert proc.wait(timeout=240) != 0, diagnose(first.name)  # submitit reports the killed job
    finally:
        _stop(proc, array_id, env, log)
    assert _states(array_id, env)[str(SLOW_TASK)].startswith("CANCELLED")
    quick = load_complete(quick_result)
    assert quick is not None and load_complete(slow_result) is None
    killed_at = _progress(slow_ckpt, attrs)
    assert killed_at is not None and killed_at > (0, 0), killed_at

    # 2. Rerun (fresh submitit folder): the slow job continues; USR2 once it has saved again.
    second = tmp_path / "submitit-2"
    proc, log = launch(second)
    array_id = None
    try:
        array_id = array_of(second, proc)
        _wait(
            lambda: (p := _progress(slow_ckpt, attrs)) is not None and p > killed_at,
            180, "a checkpoint of the continued slow job", proc,
        )  # fmt: skip
        signalled_at = _progress(slow_ckpt, attrs)
        task = f"{array_id}_{SLOW_TASK}"
        subprocess.run(["scancel", "--signal=USR2", task], env=env, check=True, timeout=20)
        # SLURM holds a requeued job for ~2 min (EligibleTime = requeue + 121 s); release it.
        _wait(lambda: _squeue_state(task, env) == "PENDING", 60, "the requeued job", proc)
        subprocess.run(
            ["scontrol", "update", f"JobId={task}", "StartTime=now"], env=env, timeout=20
        )
        assert proc.wait(timeout=300) == 0, diagnose(second.name)
    finally:
        _stop(proc, array_id, env, log)

    # Requeued by submitit (a timeout, one of max_num_timeout=3 used) and continued twice: from
    # where the kill left it, then from the checkpoint before the signal, which is later.
    slow_logs = _job_logs(second, SLOW_TASK)
    tail = slow_logs[-3000:]
    assert "Caught signal SIGUSR2" in slow_logs and "this job is timed-out" in slow_logs, tail
    assert f"Requeued job {array_id}_{SLOW_TASK} (2 remaining timeouts)" in slow_logs
    assert slow_logs.count(f"Starting with JobEnvironment(job_id={array_id}_{SLOW_TASK},") == 2
    resumed = [(attrs.index(a), int(s)) for a, s, _ in RESUMED.findall(slow_logs)]
    assert len(resumed) == 2, tail
    assert resumed[0] == killed_at
    assert killed_at < resumed[1] and resumed[1] >= signalled_at and resumed[1][1] > 0
    assert "already complete" not in slow_logs
    assert _job_logs(second, 0).count("already complete") == 1  # the quick job is not redone

    # Every result is complete and sane; the quick one is the same record; no checkpoint left.
    assert load_complete(quick_result)["eval_id"] == quick["eval_id"]
    by_epochs = {r["eval_config"]["epochs"]: r for r in _results_of(sweep)}
    assert sorted(by_epochs) == [QUICK_EPOCHS, SLOW_EPOCHS]
    assert by_epochs[QUICK_EPOCHS]["eval_id"] == quick["eval_id"]
    assert by_epochs[SLOW_EPOCHS]["eval_id"] == load_complete(slow_result)["eval_id"]
    for epochs, rec in by_epochs.items():
        assert rec["saeravel"]["complete"] is True
        assert rec["saeravel"]["model_name"] == "tiny-city-lm"
        metrics = rec["eval_result_metrics"]
        for attr in attrs:
            assert metrics["baselines"]["swap"][attr]["cause"] >= 0.9
            r = metrics["ravel"]["neurons"][attr]
            assert 0 <= r["cause"] <= 1 and 0 <= r["isolation"] <= 1
            assert r["disentangle"] == pytest.approx((r["cause"] + r["isolation"]) / 2)
            assert len(rec["eval_result_details"]["training_curves"][f"neurons/{attr}"]) == epochs
    assert not list(results.glob("ravel/*.ckpt"))


def _squeue_state(job: str, env: dict[str, str]) -> str:
    out = subprocess.run(
        ["squeue", "-h", "-j", job, "-o", "%T"], env=env, capture_output=True, text=True, timeout=20
    )
    return out.stdout.strip()


def _results_of(sweep: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(sweep.rglob("result.json"))]
