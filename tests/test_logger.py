"""The ``logger`` config group: ``none`` does nothing; ``wandb`` leaves a real offline run.

The wandb tests use the real client in offline mode and read back the run's ``.wandb`` file
(a LevelDB-style log of protobuf records), so they check what ``wandb sync`` would upload.
"""

from __future__ import annotations

import glob
import json
import logging
import struct
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from saeravel.errors import UserError
from saeravel.logger import (
    NoLogger,
    WandbLogger,
    build_logger,
    flatten,
    has_wandb_credentials,
    logged_job,
    run_group,
    run_identity,
    scores_table,
    wandb_host,
)

CONF = Path(__file__).resolve().parents[1] / "conf"


def _compose(overrides: list[str], **kw):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, **kw)


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """Keep every wandb file under tmp_path and start with no credentials and no WANDB_MODE."""
    for var, sub in (("WANDB_DIR", "wdir"), ("WANDB_CACHE_DIR", "wcache"),
                     ("WANDB_CONFIG_DIR", "wconfig"), ("WANDB_DATA_DIR", "wdata"),
                     ("WANDB_ARTIFACT_DIR", "wartifacts")):  # fmt: skip
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield tmp_path
    import wandb

    wandb.teardown()  # (finish() has stopped wandb's service already; this is for a failed test)


def _resolved(out: Path, *overrides: str) -> dict:
    cfg = _compose(["logger=wandb", f"paths.output_dir={out}", *overrides])
    return cfg, OmegaConf.to_container(cfg, resolve=True)


def _record(result_path: Path) -> dict:
    """A result record of the pipeline's shape (RAVEL: nested metrics, per-epoch curves)."""
    record = {
        "eval_type_id": "ravel",
        "eval_result_metrics": {
            "ravel": {
                "sae": {
                    "Country": {
                        "cause": 0.25,
                        "isolation": 0.75,
                        "disentangle": 0.5,
                        "cause_interval": [0.125, 0.375],
                        "mask_kept": 12,
                    }
                },
                "das": {"Country": {"cause": 0.5, "isolation": 0.625, "disentangle": 0.5625}},
            },
            "baselines": {"none": {"Country": {"cause": 0.0, "isolation": 1.0}}},
        },  # fmt: skip
        "eval_result_details": {
            "training_curves": {
                "sae/Country": [2.5, 1.75, 1.5],
                "das/Country": [3.0, 1.25],
                "sae/Continent": [1.0, 0.5, 0.375],
            }
        },
        "saeravel": {"job_hash": "0123abcd", "runtime_s": 12.5},
    }
    result_path.write_text(json.dumps(record))
    return record


def _records(run_folder: Path) -> list:
    """Every protobuf record of an offline run's ``.wandb`` file."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_folder.glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, chunks, buf = 32768, 7, [], b""  # 7-byte file header, 32 KiB blocks
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        buf = chunk if kind in (1, 2) else buf + chunk  # full / first, middle / last
        if kind in (1, 4):
            chunks.append(buf)
    out = []
    for chunk in chunks:
        rec = pb.Record()
        rec.ParseFromString(chunk)
        out.append(rec)
    return out


def _of(records: list, kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def _key(item) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def _summary(records: list) -> dict:
    out = {}
    for s in _of(records, "summary"):
        for u in s.update:
            out[_key(u)] = json.loads(u.value_json)
    return out


def _history(records: list) -> list[dict]:
    return [{_key(i): json.loads(i.value_json) for i in h.item} for h in _of(records, "history")]


def _only_run_folder(parent: Path) -> Path:
    runs = [Path(p) for p in glob.glob(str(parent / "wandb" / "offline-run-*"))]
    assert len(runs) == 1, runs
    return runs[0]


# ----------------------------------------------------------------------------- none


def test_none_is_the_default_and_does_nothing(tmp_path):
    cfg = _compose([])
    assert cfg.logger._target_ == "saeravel.logger.NoLogger"
    logger = build_logger(cfg.logger)
    assert isinstance(logger, NoLogger)
    assert isinstance(build_logger(None), NoLogger)  # a config without the group
    with logged_job(cfg.logger, {"layer": 1}, "abc", tmp_path) as lg:
        lg.log_result(_record(tmp_path / "result.json"), tmp_path / "result.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_wandb_composes_with_its_defaults():
    cfg = _compose(["logger=wandb", "logger.tags=[paper,gpt2]", "logger.mode=offline"])
    logger = build_logger(cfg.logger)
    assert isinstance(logger, WandbLogger)
    assert (logger.project, logger.tags, logger.mode) == ("saeravel", ["paper", "gpt2"], "offline")


# ----------------------------------------------------------------------------- bad input


def test_unknown_logger_option_lists_the_real_ones():
    with pytest.raises(ConfigCompositionException) as err:
        _compose(["logger=wandbb"])
    msg = str(err.value) + str(err.value.__cause__ or "")
    assert "logger/wandbb" in msg and "\twandb" in msg and "\tnone" in msg


@pytest.mark.parametrize("override", ["logger.mode=onlin", "logger.projet=x"])
def test_bad_wandb_options_fail_at_composition(override):
    with pytest.raises(ConfigCompositionException):
        _compose(["logger=wandb", override])


def test_bad_mode_given_directly_is_a_user_error():
    with pytest.raises(UserError, match="unknown logger.mode 'onlin'.*valid: online, offline"):
        WandbLogger(mode="onlin")
    with pytest.raises(UserError, match="unknown logger.mode 'onlin'"):  # not Hydra's wrapper
        build_logger(OmegaConf.create({"_target_": "saeravel.logger.WandbLogger", "mode": "onlin"}))


def test_credentials_are_found_in_env_and_netrc(tmp_path, monkeypatch):
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    assert not has_wandb_credentials()  # no file
    netrc.write_text("machine example.org login u password p\n")
    assert not has_wandb_credentials()  # an entry for another host
    netrc.write_text("machine api.wandb.ai login user password k" + "0" * 39 + "\n")
    assert has_wandb_credentials()  # the host behind wandb 0.31's default
    import wandb

    default = urlsplit(str(wandb.Settings().base_url)).netloc  # where `wandb login` writes
    netrc.write_text(f"machine {default} login user password k" + "1" * 39 + "\n")
    assert wandb_host() == str(wandb.Settings().base_url).rstrip("/")
    assert has_wandb_credentials()
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert not has_wandb_credentials()  # a self-hosted server needs its own entry
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert has_wandb_credentials()


def test_a_failing_start_is_one_warning_and_the_rest_are_no_ops(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")  # no folder can be made under a regular file
    logger = WandbLogger(dir=str(blocker / "runs"), mode="offline")
    with caplog.at_level(logging.WARNING, logger="saeravel.logger"):
        logger.start({"layer": 1}, "abc", tmp_path)
        logger.log_result(_record(tmp_path / "result.json"), tmp_path / "result.json")
        logger.finish(ok=True)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "wandb logging failed (start)" in warnings[0], warnings
    assert "\n" not in warnings[0]


# ----------------------------------------------------------------------------- helpers


def test_flatten_joins_keys_and_drops_none():
    got = flatten({"a": {"b": {"c": 1.5, "d": None}, "e": [1, 2]}, "f": "x"})
    assert got == {"a/b/c": 1.5, "a/e": [1, 2], "f": "x"}


def test_group_is_the_experiment_and_sweep_name(tmp_path, monkeypatch):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    assert run_group(tmp_path) is None  # not under Hydra
    sweep = tmp_path / "multirun" / "2026-01-02" / "03-04-05"
    cfg = _compose([f"hydra.sweep.dir={sweep}", "hydra.job.num=0"], return_hydra_config=True)
    cfg.hydra.mode = RunMode.MULTIRUN
    HydraConfig.instance().set_config(cfg)
    try:
        assert run_group(sweep / "4_layer=2") == "sweep 2026-01-02/03-04-05"
        OmegaConf.set_readonly(cfg.hydra, False)  # set_config made it read-only
        cfg.hydra.runtime.choices["experiment"] = "paper_grid"
        HydraConfig.instance().set_config(cfg)
        assert run_group(sweep / "4_layer=2") == "paper_grid 2026-01-02/03-04-05"
        OmegaConf.set_readonly(cfg.hydra, False)
        cfg.hydra.mode = RunMode.RUN
        HydraConfig.instance().set_config(cfg)
        assert run_group(sweep / "4_layer=2") == "paper_grid"  # one run of an experiment
    finally:
        HydraConfig.instance().cfg = None


def test_run_name_and_tags_come_from_model_sae_layer_method_and_eval():
    cfg, resolved = _resolved(Path("job"), "layer=1", "eval.method=das")
    name, tags = run_identity(resolved)
    model, family = cfg.model.name, cfg.sae.family
    assert name == f"ravel das {model} L1 {family}"
    assert tags == [f"model:{model}", f"sae:{family}", "layer:1", "method:das", "eval:ravel"]


def test_scores_table_has_a_row_per_method_and_attribute(tmp_path):
    cols, rows = scores_table(_record(tmp_path / "r.json"))
    assert cols[:5] == ["method", "attribute", "cause", "isolation", "disentangle"]
    assert [r[:5] for r in rows] == [["sae", "Country", 0.25, 0.75, 0.5],
                                     ["das", "Country", 0.5, 0.625, 0.5625]]  # fmt: skip
    cols, rows = scores_table({"eval_result_metrics": {"sparsity": {"l0": 3, "x": None}}})
    assert (cols, rows) == (["metric", "value"], [["sparsity/l0", 3.0]])


def test_every_logger_key_has_a_comment():
    for path in (CONF / "logger").glob("*.yaml"):
        for line in path.read_text().splitlines():
            s = line.strip()
            if s and not s.startswith(("#", "-", "defaults")) and ":" in s:
                assert "#" in line, f"{path.name}: {line}"


# ----------------------------------------------------------------------------- real wandb


def test_wandb_offline_run_holds_config_curves_metrics_and_artifact(wandb_env):
    out = wandb_env / "job"
    out.mkdir()
    cfg, resolved = _resolved(out, "logger.tags=[unit]", "logger.group=g1")
    record = _record(out / "result.json")
    (out / "ravel_das_Country.pt").write_bytes(b"rotation")  # eval.save_artifacts' files
    logger = build_logger(cfg.logger)
    logger.start(resolved, "0123abcd", out)
    for step, (loss, temp) in enumerate([(2.5, 10.0), (2.25, 5.0)], start=1):  # live, in training
        logger.log_metrics({"das/Country/loss": loss, "das/Country/temperature": temp}, step)
    logger.log_result(record, out / "result.json")
    logger.finish(ok=True)

    folder = _only_run_folder(out)  # offline by default (no WANDB_MODE), beside result.json
    recs = _records(folder)
    (run,) = _of(recs, "run")
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["job_hash"] == "0123abcd"
    assert config["model"]["name"] == resolved["model"]["name"]
    assert config["eval"]["epochs"] == resolved["eval"]["epochs"]
    assert config["logger"]["_target_"] == "saeravel.logger.WandbLogger"
    name, tags = run_identity(resolved)
    assert (run.project, run.run_group, run.display_name) == ("saeravel", "g1", name)
    assert list(run.tags) == [*tags, "unit"]
    assert run.job_type == "ravel"

    rows = _history(recs)
    live = [(r["train_step"], r["train/das/Country/loss"], r["train/das/Country/temperature"])
            for r in rows if "train/das/Country/loss" in r]  # fmt: skip
    assert live == [(1, 2.5, 10.0), (2, 2.25, 5.0)]
    assert [r for r in rows if any(k.startswith("scores") for k in r)]  # the scores Table
    for key, curve in record["eval_result_details"]["training_curves"].items():
        got = [(r["epoch"], r[f"train_loss/{key}"]) for r in rows if f"train_loss/{key}" in r]
        assert got == [(i + 1, v) for i, v in enumerate(curve)], key
    charts = {k.split("_table/")[0] for r in rows for k in r if k.startswith("train_loss_chart/")}
    assert charts == {"train_loss_chart/Country", "train_loss_chart/Continent"}
    metrics = _of(recs, "metric")
    assert any(m.glob_name == "train_loss/*" and m.step_metric == "epoch" for m in metrics)
    assert any(m.glob_name == "train/*" and m.step_metric == "train_step" for m in metrics)

    summary = _summary(recs)
    for key, value in flatten(record["eval_result_metrics"]).items():
        assert summary[key] == value, key
    assert summary["runtime_s"] == 12.5

    (art,) = [a for a in _of(recs, "artifact") if a.type == "result"]  # (charts are tables)
    assert (art.type, art.name) == ("result", "ravel-0123abcd")
    assert sorted(c.path for c in art.manifest.contents) == ["ravel_das_Country.pt", "result.json"]
    assert art.manifest.contents[0].digest  # the file's hash, computed from result.json
    (end,) = _of(recs, "exit")
    assert end.exit_code == 0


def test_online_without_key_warns_once_and_logs_offline(wandb_env, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_MODE", "online")
    out = wandb_env / "job"
    out.mkdir()
    cfg, resolved = _resolved(out)
    with caplog.at_level(logging.WARNING, logger="saeravel.logger"):
        with pytest.raises(RuntimeError, match="the eval failed"):
            with logged_job(cfg.logger, resolved, "feedbeef", out) as logger:
                logger.log_result(_record(out / "result.json"), out / "missing.json")
                raise RuntimeError("the eval failed")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    login = [w for w in warnings if "API key" in w]
    assert len(login) == 1, warnings
    assert "`wandb login`" in login[0] and "WANDB_MODE=offline" in login[0]
    # the missing result file is one warning too, and the run still closes, marked failed
    assert [w for w in warnings if "result artifact" in w] and len(warnings) == 2, warnings
    recs = _records(_only_run_folder(out))
    assert _summary(recs)["ravel/sae/Country/cause"] == 0.25
    assert not [a for a in _of(recs, "artifact") if a.type == "result"]
    (end,) = _of(recs, "exit")
    assert end.exit_code == 1


def test_the_logger_is_not_part_of_the_job_identity(tmp_path):
    from saeravel.results import job_hash

    out = f"paths.output_dir={tmp_path}"
    plain = _compose([out])
    logged = _compose([out, "logger=wandb", "logger.tags=[paper]", "logger.mode=online"])
    resolve = lambda c: OmegaConf.to_container(c, resolve=True)  # noqa: E731
    assert job_hash(resolve(plain)) == job_hash(resolve(logged))
    assert job_hash(resolve(plain)) != job_hash(resolve(_compose([out, "seed=1"])))


def test_a_stored_job_logs_its_stored_result(tmp_path):
    """``logger=wandb`` after a run without it: the job is skipped and its stored record is
    what the logger receives (pipeline._log_stored)."""
    from saeravel import pipeline

    calls = []

    class Spy(NoLogger):
        def start(self, resolved_cfg, job_hash, output_dir):
            calls.append(("start", job_hash))

        def log_result(self, record, result_path):
            calls.append(("result", record["eval_id"], Path(result_path).name))

        def finish(self, ok):
            calls.append(("finish", ok))

    record = {"eval_id": "e1"}
    got = pipeline._log_stored(Spy(), {}, "h1", tmp_path, record)
    assert got is record
    assert calls == [("start", "h1"), ("result", "e1", "result.json"), ("finish", True)]
