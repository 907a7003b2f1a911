"""The report never merges two jobs: rows keyed by job hash, differing settings as columns,
mean +- std only over the seeds of otherwise identical jobs."""

from __future__ import annotations

import json
import re
import urllib.parse
from pathlib import Path
from typing import Any

import matplotlib
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from saeravel import figures, report
from saeravel.results import atomic_write_json, build_record, job_hash

CONF = Path(__file__).resolve().parents[1] / "conf"
BASE = ["paths.output_dir=/x", "eval.method=das", "sae=none"]


def _record(overrides: list[str], cause: float, millis: int = 1) -> dict[str, Any]:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[*BASE, *overrides])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    scores = {a: {"cause": cause, "isolation": 0.5, "disentangle": (cause + 0.5) / 2}
              for a in ("Country", "Continent")}  # fmt: skip
    base = {a: {"cause": 0.0, "isolation": 1.0, "disentangle": 0.5} for a in scores}
    rec = build_record(
        eval_name="ravel", eval_cfg=resolved["eval"],
        metrics={"ravel": {"das": scores, "baseline": base}}, details=None, unstructured=None,
        sae_identity=None, sae_cfg=None, model_name=cfg.model.name, model_info={},
        layer=cfg.layer, hook_name=f"blocks.{cfg.layer}.hook_resid_post",
        resolved_config=resolved, job_id=job_hash(resolved), runtime_s=1.0,
    )  # fmt: skip
    rec["datetime_epoch_millis"] = millis
    return rec


def _sweep(tmp: Path, jobs: dict[str, tuple[list[str], float]]) -> report.Report:
    for name, (overrides, cause) in jobs.items():
        atomic_write_json(tmp / name / "result.json", _record(overrides, cause), strict=True)
    return report.build_report(tmp, tmp / "report")


def test_a_sweep_over_model_train_seed_shows_three_seeds(tmp_path: Path) -> None:
    rep = _sweep(tmp_path, {f"s{s}": ([f"model.train_seed={s}"], 0.2 * s) for s in range(3)})
    ravel, spread = rep.tables[:2]
    assert len(ravel.rows) == 3 * 2  # three jobs x two attributes: none merged
    assert sorted({r["model.train_seed"] for r in ravel.rows}) == [0, 1, 2]
    assert len({r["job_hash"] for r in ravel.rows}) == 3
    assert not ravel.notes  # nothing dropped
    assert len(spread.rows) == 2 and all(r["n_seeds"] == 3 for r in spread.rows)
    row = spread.rows[0]
    assert row["cause_mean"] == pytest.approx(0.2)
    assert row["cause_std"] == pytest.approx(0.2)  # sample std of 0, 0.2, 0.4
    assert "model.train_seed" in ravel.about and "seed keys: seed, model.train_seed" in ravel.about
    assert "model.train_seed" in rep.markdown and "n_seeds" in rep.markdown


def test_a_sweep_over_eval_lr_shows_two_rows(tmp_path: Path) -> None:
    rep = _sweep(tmp_path, {"a": (["eval.lr=1e-3"], 0.3), "b": (["eval.lr=1e-2"], 0.7)})
    ravel, spread = rep.tables[:2]
    country = [r for r in ravel.rows if r["attribute"] == "Country"]
    assert sorted((r["eval.lr"], r["cause"]) for r in country) == [(0.001, 0.3), (0.01, 0.7)]
    assert "eval.lr" in ravel.columns and ravel.settings == ["eval.lr"]
    assert "settings that differ between these jobs: eval.lr" in ravel.about
    spread_country = [r for r in spread.rows if r["attribute"] == "Country"]
    assert len(spread_country) == 2 and all(r["n_seeds"] == 1 for r in spread_country)
    header = (tmp_path / "report" / "ravel.csv").read_text().splitlines()[0].split(",")
    assert "eval.lr" in header


def test_jobs_differing_in_layer_and_epochs_are_never_one_line(tmp_path: Path) -> None:
    """The issue's case: a 2-epoch job at layer 0 and a default-epochs job at layer 1."""
    rep = _sweep(tmp_path, {"a": (["layer=0", "eval.epochs=2"], 0.1), "b": (["layer=1"], 0.9)})
    ravel = rep.tables[0]
    assert ravel.settings == ["eval.epochs"]
    report.parts_of(ravel)
    labels = {report.line_label(r) for r in ravel.rows}
    assert labels == {"das [eval.epochs=2]", "das [eval.epochs=30]"}  # 30: the saeravel recipe


def test_seed_and_setting_together(tmp_path: Path) -> None:
    """Two lrs x two seeds: two groups of two seeds each, never one group of four."""
    jobs = {f"{lr}-{s}": ([f"eval.lr={lr}", f"seed={s}"], 0.1 + s * 0.1 + (lr == "1e-2") * 0.5)
            for lr in ("1e-3", "1e-2") for s in (0, 1)}  # fmt: skip
    rep = _sweep(tmp_path, jobs)
    spread = rep.tables[1]
    country = sorted(
        (r["eval.lr"], r["n_seeds"], round(r["cause_mean"], 6))
        for r in spread.rows
        if r["attribute"] == "Country"
    )
    assert country == [(0.001, 2, 0.15), (0.01, 2, 0.65)]


def test_a_force_rerun_of_one_job_keeps_the_newest(tmp_path: Path) -> None:
    old, new = _record([], 0.1, millis=1), _record([], 0.8, millis=2)
    atomic_write_json(tmp_path / "a" / "result.json", old, strict=True)
    atomic_write_json(tmp_path / "b" / "result.json", new, strict=True)
    ravel = report.build_report(tmp_path).tables[0]
    assert {r["cause"] for r in ravel.rows} == {0.8}
    assert len(ravel.notes) == 1 and "kept b/result.json" in ravel.notes[0]  # one line per job


def test_saebench_copies_and_null_scores_are_read_right(tmp_path: Path) -> None:
    rec = _record([], float("nan"))
    atomic_write_json(tmp_path / "a" / "result.json", rec, strict=True)
    (tmp_path / "a" / "x_eval_results.json").write_text(json.dumps({"eval_type_id": "ravel"}))
    rep = report.build_report(tmp_path)
    assert not rep.skipped  # the SAEBench copy is not read as a saeravel record
    ravel = rep.tables[0]
    assert all(r["cause"] != r["cause"] for r in ravel.rows)  # null -> NaN


# ----------------------------------------------------------------------------- figures
# Records of a sweep the way eval=ravel writes them (src/saeravel/evals/ravel/main.py): per method
# and attribute the scores, their ``ci95`` bootstrap interval, the mask's kept entries; the
# no-training baselines ``none`` / ``swap`` under ``baselines`` and ``ravel.baseline``.
PLANTED = ["model=planted-city-lm", "sae=planted", "model.n_layers=5"]
ATTRS = ("Country", "Continent")
NPID = "gpt2-small/8-res-jb"


def _scores(cause: float, isolation: float, kept: list[int] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "cause": cause, "isolation": isolation, "disentangle": (cause + isolation) / 2,
        "ci95": {"cause": [cause - 0.05, cause + 0.02], "isolation": [isolation - 0.1, isolation],
                 "disentangle": [(cause + isolation) / 2 - 0.04, (cause + isolation) / 2 + 0.03]},
    }  # fmt: skip
    if kept is not None:
        out.update(kept_top=kept, mask_kept=len(kept), mask_size=64)
    return out


def _ravel_record(family: str, layer: int, seed: int = 0, npid: str | None = None) -> dict:
    overrides = [*PLANTED, f"sae.family={family}", f"layer={layer}", f"seed={seed}"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["paths.output_dir=/x", *overrides])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    c = 0.5 + 0.1 * layer + 0.05 * seed
    metrics: dict[str, Any] = {"ravel": {
        "sae": {a: _scores(c, 0.9, kept=[7 + layer, 3, 41]) for a in ATTRS},
        "neurons": {a: _scores(0.3 + 0.1 * layer, 0.8, kept=[1, 2]) for a in ATTRS},
        "das": {a: _scores(0.9, 0.95, kept=[0]) for a in ATTRS},
    }, "baselines": {"none": {a: _scores(0.0, 1.0) for a in ATTRS},
                     "swap": {a: _scores(1.0, 0.1) for a in ATTRS}}}  # fmt: skip
    metrics["ravel"]["baseline"] = metrics["baselines"]["none"]
    ident = {"family": family, "release": None, "sae_id": None, "path": None, "extra": {},
             "neuronpedia_id": npid}  # fmt: skip
    return build_record(
        eval_name="ravel", eval_cfg=resolved["eval"], metrics=metrics, details=None,
        unstructured=None, sae_identity=ident, sae_cfg={"d_sae": 64}, model_name=cfg.model.name,
        model_info={}, layer=layer, hook_name=f"blocks.{layer}.hook_resid_post",
        resolved_config=resolved, job_id=job_hash(resolved), runtime_s=1.0,
    )  # fmt: skip


def _ravel_sweep(tmp: Path) -> report.Report:
    """famA at layers 0, 1, 3 (two seeds at layer 1; has a Neuronpedia id), famB at layers 0
    and 3 only (its layer 1 is missing), each job with sae, neurons and das."""
    jobs = [("famA", 0, 0), ("famA", 1, 0), ("famA", 1, 1), ("famA", 3, 0),
            ("famB", 0, 0), ("famB", 3, 0)]  # fmt: skip
    for fam, layer, seed in jobs:
        rec = _ravel_record(fam, layer, seed, NPID if fam == "famA" else None)
        atomic_write_json(tmp / f"{fam}-{layer}-{seed}" / "result.json", rec, strict=True)
    return report.build_report(tmp, tmp / "report")


def _line(ax: Any, label: str) -> Any:
    found = [ln for ln in ax.get_lines() if ln.get_label() == label]
    assert len(found) == 1, [ln.get_label() for ln in ax.get_lines()]
    return found[0]


def _finite_x(line: Any) -> list[int]:
    return [round(x) for x, y in zip(line.get_xdata(), line.get_ydata(), strict=True) if y == y]


def _no_overlap(fig: Any) -> None:
    """The figure legend and caption sit clear of every panel and of the title."""
    fig.canvas.draw()
    panels = [ax.get_tightbbox() for ax in fig.axes if ax.get_visible()]
    for leg in fig.legends:
        box = leg.get_window_extent()
        assert all(not box.overlaps(p) for p in panels), "legend over a panel"
    for text in fig.texts:
        box = text.get_window_extent()
        assert all(not box.overlaps(p) for p in panels), "caption over a panel"
        assert all(not box.overlaps(leg.get_window_extent()) for leg in fig.legends)


def test_ravel_figure_has_attribute_panels_gaps_error_bars_and_method_colours(
    tmp_path: Path,
) -> None:
    rep = _ravel_sweep(tmp_path)
    assert (tmp_path / "report" / "ravel_vs_layer.png").stat().st_size > 0
    fig = rep.figures["ravel_vs_layer.png"]
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == [f"{a} intervened" for a in ATTRS]  # Country first
    assert len({ax.get_ylim() for ax in axes}) == 1
    for ax in axes:
        a_line, b_line = _line(ax, "SAE famA"), _line(ax, "SAE famB")
        assert _finite_x(a_line) == [0, 1, 3]  # markers only where measured
        assert _finite_x(b_line) == [0, 3]
        ys = list(b_line.get_ydata())
        assert len(ys) == 3 and ys[1] != ys[1]  # NaN at layer 1: the line is broken there
        colours = {lab: matplotlib.colors.to_hex(_line(ax, lab).get_color())
                   for lab in ("SAE famA", "SAE famB", "das", "neurons")}  # fmt: skip
        assert len(set(colours.values())) == 4  # four distinct colours ...
        for lab in ("das", "neurons"):
            r, g, b, _ = matplotlib.colors.to_rgba(colours[lab])
            assert not r == g == b  # ... and the methods are not grey references
        assert len(ax.containers) >= 4  # error bars for every line
        assert _finite_x(_line(ax, "no intervention")) == [0, 1, 3]
    # famA at layer 1 has two seeds: its bar is their std; elsewhere the bootstrap interval.
    segs = [seg for c in axes[0].containers for coll in c.lines[2] for seg in coll.get_segments()]
    heights = [float(seg[1][1] - seg[0][1]) for seg in segs]
    two_seeds = 2 * 0.025 / 2**0.5  # disentangle 0.75 and 0.775: +- their std
    assert any(h == pytest.approx(two_seeds) for h in heights)
    assert any(h == pytest.approx(0.07) for h in heights)  # the interval [d - 0.04, d + 0.03]
    caption = " ".join(t.get_text() for t in fig.texts)
    assert "protocol=saeravel" in caption and "match=first_token" in caption
    _no_overlap(fig)


def test_a_reference_method_under_two_saes_is_one_seed(tmp_path: Path) -> None:
    """famA and famB jobs at layer 0 share seed 0: their DAS result is one measurement, so
    its error bar is the bootstrap interval, not a zero std over two copies."""
    ax = _ravel_sweep(tmp_path).figures["ravel_vs_layer.png"].axes[0]
    colour = matplotlib.colors.to_rgb(_line(ax, "das").get_color())
    das = [c for c in ax.containers if tuple(c.lines[2][0].get_colors()[0][:3]) == colour]
    assert len(das) == 1
    seg = next(s for s in das[0].lines[2][0].get_segments() if s[0][0] < 0.5)  # layer 0
    assert seg[1][1] - seg[0][1] == pytest.approx(0.07)
    assert figures.SEED_COLUMNS == report.SEED_KEYS


def test_no_intervention_baseline_is_visible_with_one_layer(tmp_path: Path) -> None:
    rec = _ravel_record("famA", 2)
    atomic_write_json(tmp_path / "a" / "result.json", rec, strict=True)
    fig = report.build_report(tmp_path).figures["ravel_vs_layer.png"]
    base = _line(fig.axes[0], "no intervention")
    assert len(_finite_x(base)) == 2  # a short segment across the one layer
    labels = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert "no intervention" in labels


def test_cause_vs_isolation_has_a_panel_per_attribute_with_methods_as_points(
    tmp_path: Path,
) -> None:
    rep = _ravel_sweep(tmp_path)
    fig = rep.figures["cause_vs_isolation.png"]
    assert [ax.get_title() for ax in fig.axes] == [f"{a} intervened" for a in ATTRS]
    for ax in fig.axes:
        iso = [ln for ln in ax.get_lines() if ln.get_linestyle() == ":"]
        assert len(iso) == 5  # cause + isolation = const lines
        offsets = [tuple(p) for coll in ax.collections for p in coll.get_offsets()]
        assert (1.0, 0.0) in offsets and (0.1, 1.0) in offsets  # none and swap points
        assert len(ax.collections) == 2 + 4  # none, swap + SAE famA, famB, neurons, das
    assert "layer 3" in fig.get_suptitle()  # most method lines (0 and 3), higher scores
    labels = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert {"SAE famA", "das", "no intervention", "swap (whole vector)"} <= set(labels)
    _no_overlap(fig)


def test_neuronpedia_links_only_for_saes_with_an_id(tmp_path: Path) -> None:
    rep = _ravel_sweep(tmp_path)
    links = next(t for t in rep.tables if t.name == "neuronpedia")
    assert {r["sae"] for r in links.rows} == {"famA"}
    assert {r["method"] for r in links.rows} == {"sae"}  # neuron / DAS indices are not latents
    layer3 = [r for r in links.rows if r["layer"] == 3 and r["attribute"] == "Country"]
    assert [r["latent"] for r in layer3] == [10, 3, 41]  # kept_top order kept
    assert layer3[0]["url"] == f"https://www.neuronpedia.org/{NPID}/10"
    assert f"[10](https://www.neuronpedia.org/{NPID}/10)" in rep.markdown
    # one quick-list page per mask: it decodes to exactly the mask's kept latents, in order
    pages = re.findall(r"\[all (\d+) on one page\]\((\S+)\)", rep.markdown)
    masks = {(r["layer"], r["seed"], r["attribute"]) for r in links.rows}
    assert len(pages) == len(masks) == 8  # famA: 4 jobs x 2 attributes, method sae
    page = next(u for _, u in pages if "layer%203%20seed%200%20sae%20Country" in u)
    url = urllib.parse.urlsplit(page)
    assert f"{url.scheme}://{url.netloc}{url.path}" == "https://www.neuronpedia.org/quick-list/"
    query = urllib.parse.parse_qs(url.query)
    assert query["name"] == ["planted-city-lm layer 3 seed 0 sae Country"]
    features = json.loads(query["features"][0])
    assert features == [{"modelId": "gpt2-small", "layer": "8-res-jb", "index": str(i)}
                        for i in (10, 3, 41)]  # fmt: skip
    assert (tmp_path / "report" / "neuronpedia.csv").exists()
    ravel = rep.tables[0]
    assert {r["neuronpedia_id"] for r in ravel.rows if r["sae"] == "famB"} == {None}
    assert json.loads(next(r["kept_top"] for r in ravel.rows if r["method"] == "das")) == [0]


def test_no_neuronpedia_section_without_ids(tmp_path: Path) -> None:
    atomic_write_json(tmp_path / "a" / "result.json", _ravel_record("famB", 0), strict=True)
    rep = report.build_report(tmp_path)
    assert "neuronpedia.org" not in rep.markdown and "## Neuronpedia" not in rep.markdown
    assert not (tmp_path / "report" / "neuronpedia.csv").exists()


def test_ravel_table_puts_disentangle_first_and_keeps_intervals_in_the_csv(
    tmp_path: Path,
) -> None:
    rep = _ravel_sweep(tmp_path)
    ravel = rep.tables[0]
    start = ravel.columns.index("disentangle")
    assert ravel.columns[start : start + 3] == ["disentangle", "cause", "isolation"]
    header = next(
        ln for ln in rep.markdown.split("## ravel (")[1].splitlines() if ln.startswith("|")
    )
    assert header.index("disentangle") < header.index("cause") < header.index("isolation")
    assert "disentangle_lo" not in header  # interval columns are CSV-only
    csv_header = (tmp_path / "report" / "ravel.csv").read_text().splitlines()[0].split(",")
    assert {"disentangle_lo", "disentangle_hi", "swap_cause", "kept_top"} <= set(csv_header)
    row = next(r for r in ravel.rows if r["method"] == "das")
    assert row["disentangle_lo"] == pytest.approx(row["disentangle"] - 0.04)


# Core and sparse-probing records (their metric groups as the evals write them); L0 comes from
# core, joined to the other evals by model, layer and SAE identity.
def _generic_record(eval_name: str, family: str, k: int, metrics: dict[str, Any]) -> dict:
    overrides = [*PLANTED, f"sae.family={family}", f"sae.seed={k}", f"eval={eval_name}"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["paths.output_dir=/x", *overrides])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    ident = {"family": family, "release": None, "sae_id": f"{family}-{k}", "path": None,
             "extra": {}, "neuronpedia_id": None}  # fmt: skip
    return build_record(
        eval_name=eval_name, eval_cfg=resolved["eval"], metrics=metrics, details=None,
        unstructured=None, sae_identity=ident, sae_cfg={"d_sae": 64}, model_name=cfg.model.name,
        model_info={}, layer=cfg.layer, hook_name="blocks.0.hook_resid_post",
        resolved_config=resolved, job_id=job_hash(resolved), runtime_s=1.0,
    )  # fmt: skip


def _core_metrics(l0: float, ce: float) -> dict[str, Any]:
    return {
        "sparsity": {"l0": l0, "l1": 2 * l0},
        "model_performance_preservation": {"ce_loss_score": ce, "ce_loss_with_sae": 3.0,
                                           "ce_loss_without_sae": 2.5, "ce_loss_with_ablation": 9},
        "reconstruction_quality": {"explained_variance": ce - 0.1, "mse": 0.1, "cossim": 0.9},
        "misc_metrics": {"frac_alive": 1.0, "freq_over_1_percent": 0.2},
        "shrinkage": {"l2_ratio": 0.9},
    }  # fmt: skip


def test_core_and_sparse_probing_get_headline_first_tables_and_l0_figures(
    tmp_path: Path,
) -> None:
    sizes = {"famA": [(40.0, 0.9), (10.0, 0.7), (20.0, 0.8)], "famB": [(15.0, 0.6), (30, 0.75)]}
    for fam, pts in sizes.items():
        for k, (l0, ce) in enumerate(pts):
            core = _generic_record("core", fam, k, _core_metrics(l0, ce))
            atomic_write_json(tmp_path / f"core-{fam}-{k}" / "result.json", core, strict=True)
            probe = _generic_record("sparse_probing", fam, k, {
                "llm": {"llm_test_accuracy": 0.95},
                "sae": {"sae_test_accuracy": ce, "sae_top_1_test_accuracy": ce / 2}})  # fmt: skip
            atomic_write_json(tmp_path / f"sp-{fam}-{k}" / "result.json", probe, strict=True)
    rep = report.build_report(tmp_path)
    core = next(t for t in rep.tables if t.name == "core")
    metric_cols = [c for c in core.columns if "." in c and c != "sae.seed"]
    assert metric_cols[:4] == ["sparsity.l0", "model_performance_preservation.ce_loss_score",
                               "model_performance_preservation.ce_loss_with_sae",
                               "reconstruction_quality.explained_variance"]  # fmt: skip
    md_header = next(
        ln for ln in rep.markdown.split("## core (")[1].splitlines() if ln.startswith("|")
    )
    assert md_header.index("sparsity.l0") < md_header.index("misc_metrics.frac_alive")
    for name, n_panels in (("core_vs_l0.png", 2), ("sparse_probing_vs_l0.png", 2)):
        assert (tmp_path / "report" / name).exists()
        fig = rep.figures[name]
        assert len(fig.axes) == n_panels
        ax = fig.axes[0]
        assert "L0" in ax.get_xlabel() and ax.get_xscale() == "log"
        points = [c.lines[0] for c in ax.containers]
        assert all(len(p.get_xdata()) == 1 for p in points)  # no line joins two SAEs
        assert sorted(float(p.get_xdata()[0]) for p in points) == [10, 15, 20, 30, 40]
    sp_ax = rep.figures["sparse_probing_vs_l0.png"].axes[1]  # all-latent probe accuracy
    got = sorted((float(c.lines[0].get_xdata()[0]), float(c.lines[0].get_ydata()[0]))
                 for c in sp_ax.containers)  # fmt: skip
    assert got[:3] == [(10.0, 0.7), (15.0, 0.6), (20.0, 0.8)]  # joined to core's L0 per SAE
    llm = [ln for ln in sp_ax.get_lines() if ln.get_label() == "LLM (no SAE)"]
    assert len(llm) == 1 and llm[0].get_ydata()[0] == pytest.approx(0.95)  # the LLM baseline
    assert "5 from eval=core" in rep.markdown


def test_seed_identity_ignores_sae_seeds_only_for_reference_methods() -> None:
    def row(method: str | None, sae_seed: int) -> dict[str, Any]:
        return {"method": method, "seed": 0, "sae.seed": sae_seed}

    assert figures.seed_of(row("das", 1)) == figures.seed_of(row("das", 2))
    assert figures.seed_of(row("sae", 1)) != figures.seed_of(row("sae", 2))
    assert figures.seed_of(row(None, 1)) != figures.seed_of(row(None, 2))  # core etc.


# ----------------------------------------------------------------------------- paper folders
# tests/report_fixtures.py: all eight methods, references, curves, intervals, layers 0-4,
# two SAEs, two seeds, a verdict block, core and sparse probing; two models in one folder.


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, report.Report]:
    from report_fixtures import paper_folder

    folder = paper_folder(tmp_path_factory.mktemp("two"))
    return folder, report.build_report(folder)


def _md_tables(markdown: str) -> list[list[str]]:
    """The header row of every markdown table."""
    lines = markdown.splitlines()
    return [ln.strip("|").split("|") for prev, ln in zip(["", *lines], lines, strict=False)
            if ln.startswith("|") and not prev.startswith("|")]  # fmt: skip


def test_two_models_get_one_narrow_table_each_and_their_own_figures(two_models) -> None:
    folder, rep = two_models
    headers = _md_tables(rep.markdown)
    assert headers and max(len(h) for h in headers) <= report.MAX_COLUMNS
    for model in ("tiny-city-lm", "planted-city-lm"):
        assert f"### ravel: {model}" in rep.markdown and f"### core: {model}" in rep.markdown
        for fig in ("ravel_vs_layer", "ravel_methods", "cause_vs_isolation", "training_curves",
                    "core_vs_l0", "sparse_probing_vs_l0"):  # fmt: skip
            assert f"{fig}_{model}.png" in rep.figures, fig
    # the settings that differ within a model are one line, not dozens of columns
    assert "differs: sae.k" in rep.markdown and "differs: sae.dictionary" in rep.markdown
    assert "model.n_country" not in rep.markdown.split("## ravel (")[1].split("###")[1]
    ravel = rep.tables[0]
    first = [r["attribute"] for r in ravel.rows if r["part"] == "tiny-city-lm"][0]
    assert first == "Country"  # the config's order, not alphabetical
    for name, fig in rep.figures.items():
        _no_overlap(fig)
        labels = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
        assert all(len(lab) < 60 for lab in labels), (name, labels)
        assert "model." not in fig.get_suptitle()


def test_paper_figures_draw_oracle_verdict_curves_and_blank_undefined(two_models) -> None:
    _, rep = two_models
    planted = rep.figures["ravel_vs_layer_planted-city-lm.png"].axes[0]
    oracle = _line(planted, "oracle (true subspace)")
    assert list(oracle.get_ydata()) == pytest.approx([0.99] * 5)
    tiny = rep.figures["ravel_vs_layer_tiny-city-lm.png"].axes[0]
    assert not [ln for ln in tiny.get_lines() if ln.get_label().startswith("oracle")]
    bars = rep.figures["ravel_methods_tiny-city-lm.png"]
    assert "layer 2" in bars.get_suptitle()
    diffs = [ax for ax in bars.axes if "paired difference" in ax.get_xlabel()]
    assert len(diffs) == 2  # one per attribute: the verdict block of the layer-2 job
    assert [t.get_text() for t in diffs[0].get_yticklabels()][0] == "das - sae"
    curves = rep.figures["training_curves_tiny-city-lm.png"].axes[0]
    das = [ln for ln in curves.get_lines() if ln.get_label() == "das"]
    assert das and len(das[0].get_xdata()) == 30
    core = rep.figures["core_vs_l0_tiny-city-lm.png"].axes[0]
    assert "1 SAE(s): undefined" in core.get_title()  # clean CE above the ablated CE
    ys = [float(c.lines[0].get_ydata()[0]) for c in core.containers]
    assert 2.75 not in ys and len(ys) == 3
    assert "undefined score(s) left out" in rep.markdown


def test_a_verdict_free_result_draws_bars_without_differences(tmp_path: Path) -> None:
    from report_fixtures import ravel_record, write

    write(tmp_path, "a", ravel_record("tiny", 1))
    fig = report.build_report(tmp_path).figures["ravel_methods.png"]
    assert len(fig.axes) == 1 and len(fig.axes[0].patches) == 8 * len(ATTRS)


def test_methods_option_and_split_by(tmp_path: Path, capsys) -> None:
    from report_fixtures import paper_folder

    folder = paper_folder(tmp_path / "r", models=("tiny",))
    rep = report.build_report(folder, methods=["sae", "neurons", "das"])
    assert {r["method"] for r in rep.tables[0].rows} == {"sae", "neurons", "das"}
    labels = {ln.get_label() for ln in rep.figures["ravel_vs_layer.png"].axes[0].get_lines()}
    assert "pca" not in labels and "das" in labels
    assert report.main([str(folder), "--methods", "sae,dass"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dass" in err[0] and "das" in err[0]
    rep = report.build_report(folder, split_by=["sae.k"])
    assert {r["part"] for r in rep.tables[0].rows} == {"tiny-city-lm, sae.k=16",
                                                       "tiny-city-lm, sae.k=32"}  # fmt: skip
    assert "ravel_vs_layer_tiny-city-lm_sae.k_16.png" in rep.figures


def test_stale_figures_of_an_earlier_run_are_removed(tmp_path: Path) -> None:
    from report_fixtures import paper_folder

    folder = paper_folder(tmp_path / "r", models=("tiny",))
    out = tmp_path / "out"
    report.build_report(folder, out)
    assert (out / "ravel_vs_layer.png").exists()
    (out / "notes.png").write_bytes(b"mine")  # not the report's: kept
    paper_folder(folder, models=("planted",))  # a second model: suffixed names now
    rep = report.build_report(folder, out)
    assert not (out / "ravel_vs_layer.png").exists()
    assert (out / "ravel_vs_layer_tiny-city-lm.png").exists() and (out / "notes.png").exists()
    assert "Removed" in rep.markdown and "ravel_vs_layer.png" in rep.markdown


def test_symlinks_followed_and_other_json_ignored_quietly(tmp_path: Path, caplog) -> None:
    from report_fixtures import ravel_record, write

    real = tmp_path / "elsewhere"
    write(real, "job", ravel_record("tiny", 1))
    root = tmp_path / "results"
    root.mkdir()
    (root / "linked").symlink_to(real, target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)  # a cycle: visited once
    (root / "job.ckpt").mkdir()
    (root / "job.ckpt" / "state.json").write_text('{"step": 3}')
    (root / "wandb" / "run").mkdir(parents=True)
    (root / "wandb" / "run" / "scores.table.json").write_text('{"columns": []}')
    (root / "other.json").write_text('{"columns": ["a"], "data": []}')  # a wandb table
    (root / "broken.json").write_text("{not json")
    with caplog.at_level("WARNING", logger="saeravel.report"):
        rep = report.build_report(root)
    assert len({r["job_hash"] for r in rep.tables[0].rows}) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= 30]
    assert len(warnings) == 1 and "broken.json" in warnings[0] and "\n" not in warnings[0]


def test_bad_folders_are_one_line_each(tmp_path: Path, capsys, caplog) -> None:
    from report_fixtures import ravel_record, write

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.json").write_text("[]")
    assert report.main([str(empty)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no saeravel results" in err[0] and "Traceback" not in err[0]
    assert report.main([str(tmp_path / "missing")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    mixed = tmp_path / "mixed"
    old = ravel_record("tiny", 1)
    old["saeravel"]["schema_version"] = 1
    write(mixed, "a", old)
    write(mixed, "b", ravel_record("tiny", 2))
    with caplog.at_level("WARNING", logger="saeravel.report"):
        rep = report.build_report(mixed)
    versions = [r.getMessage() for r in caplog.records if "result versions" in r.getMessage()]
    assert len(versions) == 1 and "version 1: 1" in versions[0]
    assert "several result versions" in rep.markdown


def test_the_verdict_is_pooled_over_seeds_with_each_runs_difference(tmp_path: Path) -> None:
    """Three seeds of one job: SAE beats neurons on two (+0.5 disentangle each) and loses on
    the third (-0.5); the pooled row says +0.167 with 2/3 runs and each run's difference, and
    ``--methods`` drops the comparisons of methods not shown."""
    from report_fixtures import ravel_record, write

    neurons, das = "0011", "1111"  # per entity: cause, cause, isolation, isolation
    for seed, sae in ((0, "1111"), (1, "1111"), (2, "0000")):
        out = {"sae": sae, "neurons": neurons, "das": das}
        write(tmp_path, f"s{seed}", ravel_record("tiny", 1, seed=seed, outcomes=out))
    rep = report.build_report(tmp_path, tmp_path / "rep")
    table = next(t for t in rep.tables if t.name == report.VERDICT_TABLE)
    rows = {
        (r["attribute"], r["comparison"]): r for r in table.rows if r["metric"] == "disentangle"
    }
    assert len(rows) == 2 * 3  # two attributes x (sae-neurons, sae-das, neurons-das)
    sn = rows[("Country", "sae - neurons")]
    assert sn["n_runs"] == 3 and sn["runs_a_better"] == "2/3"
    assert sn["diff"] == pytest.approx((0.5 + 0.5 - 0.5) / 3)
    assert sn["per_run"] == "+0.500 +0.500 -0.500"
    assert sn["ci_lo"] <= sn["diff"] <= sn["ci_hi"]
    nd = rows[("Country", "neurons - das")]
    assert nd["diff"] == pytest.approx(-0.5) and nd["ci_lo"] == nd["ci_hi"] == pytest.approx(-0.5)
    assert nd["runs_a_better"] == "0/3"
    assert "### ravel_verdict: tiny-city-lm" in rep.markdown
    assert "+0.167 [" in rep.markdown
    assert max(len(h) for h in _md_tables(rep.markdown)) <= report.MAX_COLUMNS
    assert (tmp_path / "rep" / "ravel_verdict.csv").exists()
    fig = rep.figures["ravel_methods.png"]  # the figure draws the pooled comparisons
    assert any("pooled over 3 runs" in t.get_text() for t in fig.texts)
    diffs = [ax for ax in fig.axes if "paired difference" in ax.get_xlabel()]
    assert [t.get_text() for t in diffs[0].get_yticklabels()] == [
        "sae - neurons", "sae - das", "neurons - das"]  # fmt: skip
    point = diffs[0].lines[0].get_xdata()[0]
    assert point == pytest.approx((0.5 + 0.5 - 0.5) / 3)
    shown = report.build_report(tmp_path, tmp_path / "rep2", methods=["sae", "neurons"])
    table = next(t for t in shown.tables if t.name == report.VERDICT_TABLE)
    assert {r["comparison"] for r in table.rows} == {"sae - neurons"}


def test_results_without_outcomes_get_no_verdict_table(tmp_path: Path) -> None:
    from report_fixtures import ravel_record, write

    write(tmp_path, "a", ravel_record("tiny", 1))
    rep = report.build_report(tmp_path)
    assert report.VERDICT_TABLE not in {t.name for t in rep.tables}


def test_a_sweep_over_sites_differs_in_site_alone(tmp_path: Path) -> None:
    """``sae.site`` follows ``site``: two sites are one setting, shown as such."""
    rep = _sweep(tmp_path, {s: ([f"site={s}"], 0.1) for s in ("resid_post", "mlp_out")})
    ravel = rep.tables[0]
    assert sorted({r["site"] for r in ravel.rows}) == ["mlp_out", "resid_post"]
    assert "sae.site" not in ravel.columns
    assert "differs: site" in rep.markdown
