"""``python -m saeravel.prefetch``: sweep expansion, de-duplication, dry runs, fast offline
failures, cache checks and size reporting. No test touches the network: the Hugging Face cache
and ``SAERAVEL_CACHE`` point at temporary folders, and "no network" is either
``HF_HUB_OFFLINE=1`` or endpoints on a closed local port."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import socket
import time
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants as hub_constants
import pytest
import yaml

from saeravel import prefetch
from saeravel.evals.ravel import data as ravel_data
from saeravel.models import TransformerLensModel
from saeravel.saes.sae_lens import SaeLensSource

REPO = Path(__file__).resolve().parents[1]
PAPER_GRID = "experiment=paper_grid,paper_grid_baselines,paper_grid_apollo"
V5 = "gpt2-small-resid-post-v5-32k"
JB = "gpt2-small-res-jb"


def _sae_yaml(name: str) -> dict:
    return yaml.safe_load((REPO / "conf" / "sae" / f"{name}.yaml").read_text())


def _names(plan: prefetch.Plan) -> list[tuple[str, str]]:
    return [(i.kind, i.name) for i in plan.items.values()]


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens: connections are refused at once


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Empty Hugging Face and saeravel caches; HF_HUB_OFFLINE and WANDB_API_KEY unset."""
    hub = tmp_path / "hf-hub"
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("SAERAVEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return hub


@pytest.fixture(scope="module")
def paper_plan(tmp_path_factory: pytest.TempPathFactory) -> prefetch.Plan:
    """The plan of the whole paper grid (three experiments, composed once for the module)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAERAVEL_CACHE", str(tmp_path_factory.mktemp("cache")))
        sweeps, jobs = prefetch.compose_jobs([PAPER_GRID])
        plan = prefetch.plan_jobs(jobs)
    plan.sweeps = sweeps
    return plan


# ----------------------------------------------------------------------------- planning


def test_dry_run_of_the_paper_grid_lists_exactly_what_it_needs(
    paper_plan: prefetch.Plan, tmp_path: Path
) -> None:
    assert paper_plan.n_jobs == 24 + 24 + 6 and not paper_plan.errors
    assert paper_plan.sweeps == [[f"experiment={e}"] for e in PAPER_GRID[11:].split(",")]
    want = [("model", "gpt2")]
    want += [("sae_lens", f"{V5} blocks.{L}.hook_resid_post") for L in range(12)]
    want += [("sae_lens", f"{JB} blocks.{b}.hook_resid_pre") for b in range(1, 12)]
    want += [("sae_lens", f"{JB} blocks.11.hook_resid_post")]  # jbloom's ids, from sae_lens
    want += [("apollo", f"sparsify/gpt2/{r}") for r in _sae_yaml("apollo_e2e")["run_ids"].values()]
    want += [
        ("apollo", f"sparsify/gpt2/{r}") for r in _sae_yaml("apollo_e2e_ds")["run_ids"].values()
    ]
    want += [("ravel", "city data")]
    got = _names(paper_plan)
    assert sorted(got) == sorted(want) and len(got) == len(set(got)) == 1 + 12 + 12 + 6 + 1
    assert sorted(_sae_yaml("apollo_e2e")["run_ids"]) == [1, 5, 9]
    jobs = {(i.kind, i.name): i.jobs for i in paper_plan.items.values()}
    assert jobs[("model", "gpt2")] == jobs[("ravel", "city data")] == 54  # needed once, by all
    assert all(n == 1 for (kind, _), n in jobs.items() if kind in ("sae_lens", "apollo"))

    # The dry run reports each item once and downloads nothing.
    outcomes = prefetch.run_items(paper_plan.ordered(), dry_run=True)
    lines = prefetch.format_report(paper_plan, outcomes, dry_run=True, check_only=False)
    assert sum(line.startswith("  would fetch ") for line in lines) == 32
    assert sum(line.strip().startswith("would fetch model gpt2") for line in lines) == 1
    assert "https://huggingface.co/jbloom/GPT2-Small-SAEs-Reformatted" in "\n".join(lines)
    assert lines[-1].startswith("total: 32 would fetch")
    assert not (tmp_path / "hf-hub").exists() and not (tmp_path / "cache").exists()


def test_sweep_expansion_and_de_duplication() -> None:
    """Command-line comma lists are a product; repeated needs are one item; a swept key on the
    command line replaces the experiment's values (as Hydra's basic sweeper)."""
    overrides = [
        "sae=openai_v5_32k,jbloom",
        "layer=1,1,2",
        "model=gpt2-small",
        "eval.method=sae,all",
    ]
    _, jobs = prefetch.compose_jobs(overrides)
    plan = prefetch.plan_jobs(jobs)
    assert plan.n_jobs == 2 * 3 * 2 and not plan.errors
    jobs_of = {(i.kind, i.name): i.jobs for i in plan.items.values()}
    assert jobs_of == {
        ("model", "gpt2"): 12,
        ("sae_lens", f"{V5} blocks.1.hook_resid_post"): 4,
        ("sae_lens", f"{V5} blocks.2.hook_resid_post"): 2,
        ("sae_lens", f"{JB} blocks.2.hook_resid_pre"): 4,
        ("sae_lens", f"{JB} blocks.3.hook_resid_pre"): 2,
        ("ravel", "city data"): 12,
    }

    _, jobs = prefetch.compose_jobs(["experiment=paper_grid", "layer=3"])
    plan = prefetch.plan_jobs(jobs)
    assert sorted(_names(plan)) == sorted(
        [
            ("model", "gpt2"),
            ("ravel", "city data"),
            ("sae_lens", f"{V5} blocks.3.hook_resid_post"),
            ("sae_lens", f"{JB} blocks.4.hook_resid_pre"),
        ]
    )


def test_embedded_default_needs_no_download(capsys: pytest.CaptureFixture[str]) -> None:
    assert prefetch.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "1 job(s) in 1 sweep(s) need 0 item(s)" in out
    assert "total: nothing to fetch" in out
    assert "model=tiny-city-lm: embedded: trained here on first use" in out
    assert "sae=trained on tiny-city-lm: trained here on first use" in out

    # --train-embedded: the model once, an SAE per layer (only the sae-method jobs load one).
    _, jobs = prefetch.compose_jobs(["experiment=embedded_grid"])
    assert _names(prefetch.plan_jobs(jobs)) == []
    plan = prefetch.plan_jobs(jobs, train_embedded=True)
    assert _names(plan) == [
        ("train", "model=tiny-city-lm"),
        ("train", "sae=trained on tiny-city-lm layer 0"),
        ("train", "sae=trained on tiny-city-lm layer 1"),
    ]
    assert [i.jobs for i in plan.items.values()] == [6, 1, 1]


def test_a_job_that_cannot_run_is_one_error_line_and_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = prefetch.main(["--dry-run", "sae=apollo_e2e", "layer=0,1", "model=gpt2-small"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert code == 2
    assert err == [
        "error: job sae=apollo_e2e layer=0 model=gpt2-small: family apollo_e2e has no SAE for "
        "layer 0; layers: 1, 5, 9"
    ]
    assert prefetch.main(["--dry-run", "sae=opneai_v5_32k"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Could not find 'sae/opneai_v5_32k'" in err[0]


# ----------------------------------------------------------------------------- failing fast

SMALL_GRID = ["sae=openai_v5_32k,jbloom,apollo_e2e", "layer=1,5", "model=gpt2-small"]
SMALL_GRID_ITEMS = 1 + 2 + 2 + 2 + 1  # model, v5 x2, jbloom x2, apollo x2, RAVEL


def _warm_imports() -> None:
    """Import the heavy libraries first (~10 s of CPU, no network) so the timings below
    measure the fetching alone."""
    for name in ("transformer_lens.loading_from_pretrained", "sae_lens.constants", "wandb"):
        importlib.import_module(name)


def _error_lines(err: str) -> list[str]:
    lines = [line for line in err.splitlines() if line.strip()]
    assert all(line.startswith("error: ") for line in lines), err
    return lines


def test_offline_fetch_fails_fast_with_one_line_per_item(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """HF_HUB_OFFLINE=1 and no WANDB_API_KEY: nothing is cached, so every item fails at once."""
    _warm_imports()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    code = prefetch.main(SMALL_GRID)
    elapsed = time.monotonic() - start
    captured = capsys.readouterr()
    assert code == 1 and elapsed < 20, elapsed
    errors = _error_lines(captured.err)
    assert len(errors) == SMALL_GRID_ITEMS
    assert sum("not in the Hugging Face cache" in e for e in errors) == 1 + 4
    apollo = [e for e in errors if e.startswith("error: apollo ")]
    assert len(apollo) == 2 and all("needs WANDB_API_KEY" in e for e in apollo)
    assert "check only, no downloads (HF_HUB_OFFLINE=1)" in captured.out
    assert not (tmp_path / "hf-hub").exists() and not (tmp_path / "cache").exists()


def test_unreachable_network_fails_fast_without_calling_the_libraries(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each host is probed once; when it refuses, its items fail with one line and the hub /
    wandb / RAVEL downloads (which retry for long) are never called."""
    _warm_imports()
    dead = _closed_port_url()
    monkeypatch.setattr(hub_constants, "ENDPOINT", dead)
    monkeypatch.setattr(ravel_data, "RAVEL_URL", f"{dead}/data.tgz")
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", dead)

    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("a download was attempted")

    for name in ("hf_hub_download", "snapshot_download"):
        monkeypatch.setattr(huggingface_hub, name, must_not_run)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", must_not_run)
    monkeypatch.setattr(ravel_data, "download_ravel", must_not_run)
    monkeypatch.setattr("saeravel.saes.apollo.ApolloWandbSource.fetch", must_not_run)

    start = time.monotonic()
    code = prefetch.main(SMALL_GRID)
    elapsed = time.monotonic() - start
    errors = _error_lines(capsys.readouterr().err)
    assert code == 1 and elapsed < 20, elapsed
    assert len(errors) == SMALL_GRID_ITEMS
    assert all(f"{dead} cannot be reached" in e and "refused" in e for e in errors), errors


# ----------------------------------------------------------------------------- cache and sizes


def _fake_hub_file(hub: Path, repo: str, filename: str, content: bytes, commit: str) -> Path:
    """A file in the Hugging Face cache layout: blob, snapshot symlink, refs/main."""
    root = hub / f"models--{repo.replace('/', '--')}"
    blob = root / "blobs" / hashlib.sha256(content).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(content)
    link = root / "snapshots" / commit / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return link


def test_disk_size_counts_each_file_once_and_human_sizes(tmp_path: Path) -> None:
    folder = tmp_path / "fake-cache"
    (folder / "blobs").mkdir(parents=True)
    (folder / "blobs" / "a").write_bytes(b"x" * 1500)
    (folder / "blobs" / "b").write_bytes(b"y" * 500)
    (folder / "snap").mkdir()
    (folder / "snap" / "model.safetensors").symlink_to(folder / "blobs" / "a")
    (folder / "snap" / "same-blob").symlink_to(folder / "blobs" / "a")
    (folder / "snap" / "dangling").symlink_to(folder / "blobs" / "missing")
    assert prefetch.disk_size([folder]) == 2000
    assert prefetch.disk_size([folder / "snap"]) == 1500
    assert prefetch.disk_size([folder / "snap" / "model.safetensors", folder / "blobs"]) == 2000
    assert prefetch.disk_size([tmp_path / "absent"]) == 0
    sizes = [0, 999, 1500, 548_100_000, 5_230_000_000]
    assert [prefetch.human_size(n) for n in sizes] == [
        "0 B",
        "999 B",
        "1.5 kB",
        "548.1 MB",
        "5.23 GB",
    ]


def test_check_reports_cached_items_and_their_size(
    _isolated_caches: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Everything a small sweep needs, planted in fake caches: --check finds it all (no
    network) and reports each item's size on disk."""
    hub = _isolated_caches
    old, new = "1" * 40, "2" * 40
    weights = b"w" * 3000
    _fake_hub_file(hub, "gpt2", "model.safetensors", weights, old)  # an older revision
    for name, content in [
        ("config.json", b"{}"),
        ("tokenizer.json", b"t" * 100),
        ("model.safetensors", weights),  # same blob as the old revision: counted once
    ]:
        _fake_hub_file(hub, "gpt2", name, content, new)
    sae_repo, sae_dir = "jbloom/GPT2-Small-SAEs-Reformatted", "blocks.2.hook_resid_pre"
    _fake_hub_file(hub, sae_repo, f"{sae_dir}/cfg.json", b"c" * 10, new)
    _fake_hub_file(hub, sae_repo, f"{sae_dir}/sae_weights.safetensors", b"s" * 990, new)
    run = tmp_path / "cache" / "apollo" / _sae_yaml("apollo_e2e")["run_ids"][1]
    run.mkdir(parents=True)
    (run / "samples_400000.pt").write_bytes(b"p" * 4000)
    marker = json.dumps({"checkpoint": "samples_400000.pt"})
    (run / "saeravel_download.json").write_text(marker)
    ravel = tmp_path / "cache" / "ravel"
    ravel.mkdir()
    for name in ravel_data.CITY_FILES.values():
        (ravel / name).write_text("{}")

    overrides = ["sae=jbloom,apollo_e2e", "layer=1", "model=gpt2-small"]
    assert prefetch.main(["--check", *overrides]) == 0
    out = capsys.readouterr().out
    cached = {line.split()[1]: line for line in out.splitlines() if line.startswith("  cached")}
    assert set(cached) == {"model", "sae_lens", "apollo", "ravel"}
    assert cached["model"].endswith("3.1 kB")  # config + tokenizer + one weights blob
    assert cached["sae_lens"].endswith("1.0 kB")
    assert cached["apollo"].endswith(prefetch.human_size(4000 + len(marker)))
    assert cached["ravel"].endswith("10 B")
    assert "all items available: run the jobs with HF_HUB_OFFLINE=1" in out

    # A weights file missing from the snapshot: the model is incomplete, one error line.
    (hub / "models--gpt2" / "snapshots" / new / "model.safetensors").unlink()
    assert prefetch.main(["--check", *overrides]) == 1
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "model gpt2" in err[0] and "no weights" in err[0]


def test_model_and_sae_fetch_download_only_the_needed_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hub calls a fetch makes, with the hub faked: the model's config, tokenizer and one
    set of weights (no TF/Flax/ONNX copies); an SAE's folder files, sparsity optional."""
    from huggingface_hub.errors import EntryNotFoundError

    gpt2_files = [
        "README.md", "config.json", "generation_config.json", "merges.txt", "vocab.json",
        "tokenizer.json", "tokenizer_config.json", "model.safetensors", "pytorch_model.bin",
        "tf_model.h5", "flax_model.msgpack", "rust_model.ot", "64-8bits.tflite",
        "onnx/config.json", "onnx/decoder_model.onnx",
    ]  # fmt: skip
    calls: dict[str, object] = {}

    def snapshot_download(repo: str, allow_patterns: list[str]) -> str:
        calls["snapshot"] = (repo, allow_patterns)
        folder = tmp_path / "snap"
        folder.mkdir()
        for f in allow_patterns:
            (folder / f).write_bytes(b"x")
        return str(folder)

    def hf_hub_download(repo: str, filename: str) -> str:
        calls.setdefault("files", []).append(filename)  # type: ignore[union-attr]
        if filename.endswith("sparsity.safetensors"):
            raise EntryNotFoundError(filename)
        path = tmp_path / "sae" / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        return str(path)

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo: gpt2_files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    reach = prefetch.Reachability()
    reach._seen[hub_constants.ENDPOINT] = None  # the hub "answers"

    gpt2 = TransformerLensModel("gpt2-small", "gpt2", 12, 768, 5, device="cpu")
    ctx = prefetch.OfflineContext(tmp_path / "cache", model=gpt2)
    (model,) = gpt2.offline_needs(ctx)  # the source says what it needs
    assert model.hosts == (hub_constants.ENDPOINT,)  # probed before it is fetched
    paths = model.fetch()
    want = [
        "config.json", "generation_config.json", "merges.txt", "tokenizer.json",
        "tokenizer_config.json", "vocab.json", "model.safetensors",
    ]  # fmt: skip
    assert calls["snapshot"] == ("gpt2", want)
    assert [p.name for p in paths] == want

    (sae,) = SaeLensSource("jbloom", 0, JB).offline_needs(ctx)  # layer 0: blocks.1.hook_resid_pre
    # the release's repo, in sae_lens' own layout (fetched file by file)
    assert sae.source.split()[0].endswith("/jbloom/GPT2-Small-SAEs-Reformatted")
    assert sae.source.split()[1] == "blocks.1.hook_resid_pre/"
    assert prefetch.disk_size(sae.fetch()) == 2
    assert calls["files"] == [
        "blocks.1.hook_resid_pre/cfg.json",
        "blocks.1.hook_resid_pre/sae_weights.safetensors",
        "blocks.1.hook_resid_pre/sparsity.safetensors",
    ]

    # Without safetensors, PyTorch weights; sharded snapshots need every shard.
    assert prefetch.select_model_files(["config.json", "pytorch_model.bin", "tf_model.h5"]) == [
        "config.json",
        "pytorch_model.bin",
    ]
    snap = tmp_path / "sharded"
    snap.mkdir()
    for f in ("config.json", "tokenizer.model", "model-00001-of-00002.safetensors"):
        (snap / f).write_text("{}")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}  # fmt: skip
    (snap / "model.safetensors.index.json").write_text(json.dumps(index))
    assert prefetch.model_folder_missing(snap) == "model-00002-of-00002.safetensors"
    (snap / "model-00002-of-00002.safetensors").write_text("{}")
    assert prefetch.model_folder_missing(snap) is None


# ----------------------------------------------------------------------------- sources answer


def test_sweep_expansion_is_the_basic_sweepers() -> None:
    """``expand_sweep`` (public parser API) gives the jobs Hydra's basic sweeper would run."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper  # the reference only
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    cases = [
        ["sae=openai_v5_32k,jbloom", "layer=1,1,2", "model=gpt2-small"],
        ["layer=1,5", "sae=jbloom", "layer=3,4", "eval.method=sae"],  # a key given twice
        ["layer=range(0,3)", "eval.attributes=[Country,Continent]", "+x=choice(a,b)"],
        [],
    ]
    for lines in cases:
        overrides = parser.parse_overrides(lines)
        (theirs,) = BasicSweeper.split_arguments(overrides, None)
        assert prefetch.expand_sweep(overrides) == theirs, lines
    with pytest.raises(prefetch.UserError, match="interval"):
        prefetch.expand_sweep(parser.parse_overrides(["eval.lr=interval(0,1)"]))


def test_prefetch_asks_the_sources(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """What a job needs is its sources' answer (``offline_needs``), not a list of classes in
    prefetch: a source that answers differently changes the plan."""
    from saeravel.saes.none import NoSource

    made = tmp_path / "thing"

    def needs(self: NoSource, ctx: prefetch.OfflineContext) -> list:
        assert ctx.model.name == "tiny-city-lm" and not ctx.train
        return [
            prefetch.Need("apollo", "probe", "", str(made), check=lambda: [made],
                          fetch=lambda: [made]),
            prefetch.Skip("sae=none", "asked"),
        ]  # fmt: skip

    monkeypatch.setattr(NoSource, "offline_needs", needs)
    _, jobs = prefetch.compose_jobs(["sae=none", "eval.method=das,neurons"])
    plan = prefetch.plan_jobs(jobs)
    assert not plan.errors  # the das/neurons jobs load no SAE: the source is not asked
    assert _names(plan) == [] and "sae=none" not in plan.skipped
    _, jobs = prefetch.compose_jobs(["sae=none", "eval=core"])  # core loads the (no) SAE
    plan = prefetch.plan_jobs(jobs)
    assert _names(plan) == [("apollo", "probe")] and plan.skipped["sae=none"] == "asked"
