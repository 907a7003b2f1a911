"""The report's figures (matplotlib, Agg backend), drawn from the report's table rows
(saeravel.report), never from result files.

Figures of one *part* (a model, or a model and the values of ``--split-by`` keys):

* :func:`ravel_layer_figure`: disentangle vs layer, one panel per attribute (the config's
  order). SAE families, neurons, DAS and every other method are lines of their own colour and
  marker (:func:`method_style`: the methods are the comparison, not grey references); the
  no-intervention baseline, the SAE-reconstruction reference and, where the world knows it
  (the planted model), the oracle are thin black / grey lines;
* :func:`methods_bar_figure`: the methods at one layer as bars with their interval, per
  attribute; below, the paired differences of the result's ``verdict`` block when it has one;
* :func:`cause_isolation_figure`: cause vs isolation, one panel per attribute, each method line
  a point (with its layer written beside it when several layers were measured);
* :func:`training_curves_figure`: each method's per-epoch training loss, a panel per attribute;
* :func:`metric_vs_l0_figure`: SAEBench-style, a metric per panel against L0 on a log axis;
  one point per SAE (never a line joining different SAEs), colour by SAE family, marker by
  architecture, the LLM's own score as a dashed line where the eval has one, undefined scores
  left out and counted in the panel.

Error bars: the standard deviation over seeds where a point has several, else the result's
bootstrap interval (``<score>_lo`` / ``<score>_hi``). Legends sit below the panels, titles are
one short line, and a figure's settings are in a caption line, never in each label.
"""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

SAE_METHOD = "sae"
ISO_DISENTANGLE = (0.5, 0.6, 0.7, 0.8, 0.9)
# Fixed colours and markers per RAVEL method, so a method looks the same in every figure.
METHOD_STYLES: dict[str, tuple[str, str]] = {  # in the order drawn and listed
    "neurons": ("#1f77b4", "^"),  # blue
    "das": ("#d62728", "s"),  # red
    "boundless_das": ("#ff7f0e", "D"),  # orange
    "mdas": ("#8c564b", "P"),  # brown
    "pca": ("#9467bd", "v"),  # purple
    "sae_probe": ("#bcbd22", "X"),  # olive
    "fixed": ("#7f7f7f", "h"),  # grey
}
# SAE families: greens, teals and pinks, none of the method colours above.
SAE_COLORS = ("#2ca02c", "#17becf", "#e377c2", "#006d2c", "#41ab5d", "#0868ac", "#ae017e")
OTHER_COLORS = ("#637939", "#843c39", "#393b79", "#7b4173", "#3182bd", "#e6550d")
OTHER_MARKERS = "<>p*d8H"
ARCH_MARKERS = {"topk": "o", "standard": "s", "relu": "s", "jumprelu": "D", "gated": "^",
                "batch_topk": "v", "e2e": "P", "custom": "X", "none": "."}  # fmt: skip
REFERENCE_LINES = (  # (row column, label, style)
    ("oracle", "oracle (true subspace)", {"color": "black", "linestyle": "-", "linewidth": 1.0}),
    ("baseline", "no intervention", {"color": "0.35", "linestyle": ":", "linewidth": 1.2}),
    ("sae_recon", "SAE reconstruction only", {"color": "0.55", "linestyle": "-.",
                                              "linewidth": 1.0}),
)  # fmt: skip
SEED_COLUMNS = ("seed", "model.train_seed", "sae.seed", "eval.seed")  # report.SEED_KEYS


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def slug(text: str) -> str:
    """A file-name-safe version of ``text``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def _finite(values: Sequence[Any]) -> list[float]:
    out = []
    for v in values:
        if isinstance(v, int | float) and not isinstance(v, bool) and not math.isnan(v):
            out.append(float(v))
    return out


def is_reference(method: str) -> bool:
    """Whether a RAVEL method is not the SAE mask (the SAE families' own lines)."""
    return method != SAE_METHOD


def seed_of(row: Mapping[str, Any]) -> tuple:
    """The seed identity of a row: a method that does not use the SAE does not depend on it, so
    its ``sae.*`` seeds are left out (the same DAS job under two SAEs is one seed)."""
    method = row.get("method")  # None: a row of an SAE eval (core, ...), the SAE's own seed
    ref = method is not None and not str(method).startswith("sae")
    keys = [k for k in SEED_COLUMNS if not (ref and k.startswith("sae."))]
    return tuple(str(row.get(k)) for k in keys)


def point(rows: Sequence[Mapping[str, Any]], score: str) -> tuple[float, float, float, int]:
    """(mean, lower error, upper error, n seeds) of ``score`` over ``rows``: rows of one seed
    (:func:`seed_of`) are averaged first; then the seeds' standard deviation when there are
    two or more, else the row's bootstrap interval (``<score>_lo`` / ``<score>_hi``), else no
    error bar (NaN)."""
    by_seed: dict[tuple, list[float]] = {}
    for r in rows:
        by_seed.setdefault(seed_of(r), []).extend(_finite([r.get(score)]))
    vals = [sum(v) / len(v) for v in by_seed.values() if v]
    if not vals:
        return math.nan, math.nan, math.nan, 0
    mean = sum(vals) / len(vals)
    if len(vals) > 1:
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
        return mean, std, std, len(vals)
    lo, hi = (_finite([rows[0].get(f"{score}_{k}")]) for k in ("lo", "hi"))
    if lo and hi:
        return mean, max(mean - lo[0], 0.0), max(hi[0] - mean, 0.0), 1
    return mean, math.nan, math.nan, 1


def method_style(labels: Sequence[str], method_of: Mapping[str, str]) -> dict[str, dict]:
    """A distinct colour and marker per line: SAE families solid in greens / teals / pinks,
    each other method its fixed :data:`METHOD_STYLES` colour (dashed)."""
    styles: dict[str, dict[str, Any]] = {}
    n_sae = n_other = 0
    used: dict[str, int] = {}
    for lab in labels:
        method = method_of[lab]
        if method == SAE_METHOD:
            color, marker, ls = SAE_COLORS[n_sae % len(SAE_COLORS)], "o", "-"
            n_sae += 1
        elif method in METHOD_STYLES:
            color, marker = METHOD_STYLES[method]
            n = used.get(method, 0)  # variants of one method: lighter, another dash
            color, ls = _lighter(color, min(0.25 * n, 0.6)), ("--", "-.", ":")[n % 3]
            used[method] = n + 1
        else:
            color = OTHER_COLORS[n_other % len(OTHER_COLORS)]
            marker, ls = OTHER_MARKERS[n_other % len(OTHER_MARKERS)], "--"
            n_other += 1
        styles[lab] = {"color": color, "marker": marker, "linestyle": ls}
    return styles


def _lighter(color: str, amount: float) -> str:
    """``color`` blended with white by ``amount`` (0: unchanged)."""
    from matplotlib.colors import to_hex, to_rgb

    if amount <= 0:
        return color
    r, g, b = to_rgb(color)
    return to_hex((r + (1 - r) * amount, g + (1 - g) * amount, b + (1 - b) * amount))


def order_lines(labels: Sequence[str], method_of: Mapping[str, str]) -> list[str]:
    """SAE family lines first, then the methods in :data:`METHOD_STYLES` order, then others."""
    rank = {m: i for i, m in enumerate(METHOD_STYLES)}

    def key(lab: str) -> tuple:
        m = method_of[lab]
        return (m != SAE_METHOD, rank.get(m, len(rank)), lab)

    return sorted(labels, key=key)


def _bottom(
    fig: Any,
    handles: list,
    labels: list[str],
    caption: str,
    width: float,
    height: float,
    title: str,
) -> float:
    """Resize ``fig`` to ``height`` of panels plus a legend (under the panels) and a caption
    (under the legend), lay it out and return the total height in inches."""
    longest = max((len(lab) for lab in labels), default=1) + 6
    ncol = max(1, min(len(labels), int(width * 12 // longest), 5))
    leg_h = 0.22 * math.ceil(len(labels) / ncol) + 0.3 if labels else 0.0
    lines = textwrap.wrap(caption, int(width * 14))[:5] if caption else []
    cap_h = 0.15 * len(lines) + 0.08 if lines else 0.0
    total = height + leg_h + cap_h
    fig.set_size_inches(width, total)
    if lines:
        fig.text(0.01, 0.01, "\n".join(lines), fontsize=7, color="0.3", va="bottom")
    if labels:
        fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False,
                   bbox_to_anchor=(0.5, cap_h / total))  # fmt: skip
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, (leg_h + cap_h) / total, 1, 1 - 0.35 / total))
    return total


def _save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    _plt().close(fig)


def _handles(axes: Sequence[Any]) -> tuple[list, list[str]]:
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels and not lab.startswith("_"):
                handles.append(h)
                labels.append(lab)
    return handles, labels


def ravel_layer_figure(
    rows: Sequence[Mapping[str, Any]],
    label_of: Callable[[Mapping[str, Any]], str],
    attrs: Sequence[str],
    path: Path,
    title: str,
    caption: str = "",
) -> tuple[Path, Any]:
    """Disentangle vs layer, one panel per attribute (``attrs`` order), shared y; a line per
    method line, broken at a layer it did not measure; reference lines where the rows have
    them (:data:`REFERENCE_LINES`)."""
    plt = _plt()
    grid = sorted({int(r["layer"]) for r in rows})
    method_of = {label_of(r): str(r["method"]) for r in rows}
    labels = order_lines(list(method_of), method_of)
    styles = method_style(labels, method_of)
    width = max(3.6 * len(attrs), 6.5)
    height = 3.6
    fig, axes = plt.subplots(1, len(attrs), figsize=(width, height), sharey=True, squeeze=False)
    step = min((b - a for a, b in zip(grid, grid[1:], strict=False)), default=1)
    dx = 0.25 * step / max(len(labels) - 1, 1)  # lines side by side: error bars stay apart
    for j, attr in enumerate(attrs):
        ax = axes[0][j]
        sub = [r for r in rows if r["attribute"] == attr]
        for k, lab in enumerate(labels):
            mine = [r for r in sub if label_of(r) == lab]
            if not mine:
                continue
            shift = (k - (len(labels) - 1) / 2) * dx if len(grid) > 1 else 0.0
            pts = {
                lay: point([r for r in mine if int(r["layer"]) == lay], "disentangle")
                for lay in sorted({int(r["layer"]) for r in mine})
            }
            st = styles[lab]
            ys = [pts[g][0] if g in pts else math.nan for g in grid]
            ax.plot([g + shift for g in grid], ys, label=lab, linewidth=1.8, markersize=6, **st)
            err = [(g + shift, *p) for g, p in pts.items() if not math.isnan(p[1])]
            if err:
                ax.errorbar([e[0] for e in err], [e[1] for e in err],
                            yerr=[[e[2] for e in err], [e[3] for e in err]], fmt="none",
                            ecolor=st["color"], capsize=2.5, elinewidth=1.0, alpha=0.8)  # fmt: skip
        for col, lab, st in REFERENCE_LINES:
            vals = {g: point([r for r in sub if int(r["layer"]) == g], col)[0] for g in grid}
            if all(math.isnan(v) for v in vals.values()):
                continue
            xs = grid if len(grid) > 1 else [grid[0] - 0.5, grid[0] + 0.5]
            ys = [vals[g] for g in grid] if len(grid) > 1 else [vals[grid[0]]] * 2
            ax.plot(xs, ys, label=lab, zorder=1, **st)
        ax.set_title(f"{attr} intervened", fontsize=10)
        ax.set_xlabel("layer")
        ax.set_xticks(grid)
        if len(grid) == 1:
            ax.set_xlim(grid[0] - 1, grid[0] + 1)
        ax.set_ylim(0.3, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("disentangle (cause + isolation) / 2")
    handles, labs = _handles(axes[0])
    _bottom(fig, handles, labs, caption, width, height, title)
    _save(fig, path)
    return path, fig


def methods_bar_figure(
    rows: Sequence[Mapping[str, Any]],
    label_of: Callable[[Mapping[str, Any]], str],
    attrs: Sequence[str],
    path: Path,
    title: str,
    verdict: Mapping[str, Mapping[str, Any]] | None = None,
    caption: str = "",
) -> tuple[Path, Any]:
    """Disentangle of each method line at one layer (``rows`` of that layer), bars grouped by
    attribute, error bars as in :func:`point`; the no-intervention baseline as a dashed line.
    With ``verdict`` (``{attr: {"a - b": {"disentangle": {"diff", "ci"}}}}``), a second panel
    row draws each paired difference with its interval."""
    plt = _plt()
    method_of = {label_of(r): str(r["method"]) for r in rows}
    labels = order_lines(list(method_of), method_of)
    styles = method_style(labels, method_of)
    pairs = _verdict_pairs(verdict, attrs)
    width = max(1.0 + 0.45 * len(labels) * len(attrs), 6.5)
    top_h = 3.4
    diff_h = 0.32 * max((len(p) for p in pairs.values()), default=0) + 1.0 if pairs else 0.0
    height = top_h + diff_h
    nrows = 2 if pairs else 1
    fig = plt.figure(figsize=(width, height))
    gs = fig.add_gridspec(nrows, len(attrs) if pairs else 1,
                          height_ratios=[top_h, diff_h] if pairs else [1])  # fmt: skip
    ax = fig.add_subplot(gs[0, :])
    n = len(labels)
    bw = 0.8 / max(n, 1)
    for k, lab in enumerate(labels):
        xs, ys, lo, hi = [], [], [], []
        for j, attr in enumerate(attrs):
            sel = [r for r in rows if r["attribute"] == attr and label_of(r) == lab]
            if not sel:
                continue
            m, el, eh, _ = point(sel, "disentangle")
            xs.append(j + (k - (n - 1) / 2) * bw)
            ys.append(m)
            lo.append(0 if math.isnan(el) else el)
            hi.append(0 if math.isnan(eh) else eh)
        st = styles[lab]
        ax.bar(xs, ys, width=bw * 0.92, color=st["color"], label=lab,
               hatch=None if method_of[lab] == SAE_METHOD else "", edgecolor="white")  # fmt: skip
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="none", ecolor="black", capsize=2, elinewidth=0.9)
    for j, attr in enumerate(attrs):
        base = point([r for r in rows if r["attribute"] == attr], "baseline")[0]
        if not math.isnan(base):
            ax.hlines(base, j - 0.45, j + 0.45, colors="0.3", linestyles="--", linewidth=1,
                      label="no intervention" if j == 0 else "_")  # fmt: skip
        oracle = point([r for r in rows if r["attribute"] == attr], "oracle")[0]
        if not math.isnan(oracle):
            ax.hlines(oracle, j - 0.45, j + 0.45, colors="black", linewidth=1.2,
                      label="oracle (true subspace)" if j == 0 else "_")  # fmt: skip
    ax.set_xticks(range(len(attrs)))
    ax.set_xticklabels([f"{a} intervened" for a in attrs])
    ax.set_ylabel("disentangle")
    ax.set_ylim(0.3, 1.02)
    ax.grid(axis="y", alpha=0.3)
    if pairs:
        for j, attr in enumerate(attrs):
            dax = fig.add_subplot(gs[1, j])
            items = pairs.get(attr, [])
            for i, (_name, diff, ci) in enumerate(items):
                err = [[max(diff - ci[0], 0)], [max(ci[1] - diff, 0)]] if ci else None
                strong = ci is not None and (ci[0] > 0 or ci[1] < 0)
                dax.errorbar([diff], [i], xerr=err, fmt="o", color="black" if strong else "0.55",
                             capsize=2.5, markersize=4)  # fmt: skip
            dax.axvline(0, color="0.4", linewidth=0.8)
            dax.set_yticks(range(len(items)))
            dax.set_yticklabels([it[0] for it in items], fontsize=7)
            dax.set_ylim(-0.6, len(items) - 0.4)
            dax.invert_yaxis()
            dax.set_xlabel(f"{attr}: paired difference, 95% interval", fontsize=8)
            dax.grid(axis="x", alpha=0.3)
    handles, labs = _handles([ax])
    _bottom(fig, handles, labs, caption, width, height, title)
    _save(fig, path)
    return path, fig


def _verdict_pairs(
    verdict: Mapping[str, Any] | None, attrs: Sequence[str]
) -> dict[str, list[tuple[str, float, list[float] | None]]]:
    """``{attr: [(pair name, diff, [lo, hi] or None)]}`` of a result's verdict block: each
    pair's difference in disentangle, then (when scored) in held-out isolation; empty when
    there is none or it has no readable entries."""
    out: dict[str, list[tuple[str, float, list[float] | None]]] = {}
    if not isinstance(verdict, Mapping):
        return out
    for attr in attrs:
        entries = verdict.get(attr)
        if not isinstance(entries, Mapping):
            continue
        for name, val in entries.items():
            for metric, label in (("disentangle", str(name)),
                                  ("isolation_heldout", f"{name}: held-out iso")):  # fmt: skip
                d = val.get(metric) if isinstance(val, Mapping) else None
                diff = _finite([d.get("diff")]) if isinstance(d, Mapping) else []
                if not diff:
                    continue
                ci = d.get("ci")
                ci_ok = isinstance(ci, list | tuple) and len(_finite(list(ci))) == 2
                out.setdefault(attr, []).append((label, diff[0], list(ci) if ci_ok else None))
    return out


def cause_isolation_figure(
    rows: Sequence[Mapping[str, Any]],
    label_of: Callable[[Mapping[str, Any]], str],
    attrs: Sequence[str],
    path: Path,
    title: str,
    caption: str = "",
) -> tuple[Path, Any]:
    """Cause vs isolation, one panel per attribute; each method line a point per layer (seeds
    averaged; the layer written beside it when there are several), dotted lines of equal
    disentangle, the no-intervention and swap corners as black marks."""
    plt = _plt()
    from matplotlib.lines import Line2D

    method_of = {label_of(r): str(r["method"]) for r in rows}
    labels = order_lines(list(method_of), method_of)
    styles = method_style(labels, method_of)
    grid = sorted({int(r["layer"]) for r in rows})
    width = max(3.8 * len(attrs), 6.5)
    height = 4.0
    fig, axes = plt.subplots(1, len(attrs), figsize=(width, height), sharey=True, squeeze=False)
    for j, attr in enumerate(attrs):
        ax = axes[0][j]
        for d in ISO_DISENTANGLE:
            xs = [max(0.0, 2 * d - 1), min(1.0, 2 * d)]
            ax.plot(xs, [2 * d - x for x in xs], color="0.8", linestyle=":", linewidth=0.9,
                    zorder=0, label="_")  # fmt: skip
            ax.text(xs[1] - 0.01, 2 * d - xs[1] + 0.015, f"{d:g}", fontsize=6, color="0.5",
                    ha="right")  # fmt: skip
        sub = [r for r in rows if r["attribute"] == attr]
        for name, marker in (("baseline", "P"), ("swap", "*")):
            pts = {(r.get(f"{name}_isolation"), r.get(f"{name}_cause")) for r in sub}
            pts = {p for p in pts if len(_finite(list(p))) == 2}
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, s=70,
                           color="black", alpha=0.6, zorder=2, linewidths=0)  # fmt: skip
        for lab in labels:
            st = styles[lab]
            for layer in grid:
                sel = [r for r in sub if label_of(r) == lab and int(r["layer"]) == layer]
                if not sel:
                    continue
                x, y = point(sel, "isolation")[0], point(sel, "cause")[0]
                if math.isnan(x) or math.isnan(y):
                    continue
                ax.scatter([x], [y], color=st["color"], marker=st["marker"], s=45,
                           edgecolors="black", linewidths=0.4, zorder=3)  # fmt: skip
                if len(grid) > 1:
                    ax.annotate(str(layer), (x, y), xytext=(3, 3), textcoords="offset points",
                                fontsize=6, color=st["color"])  # fmt: skip
        ax.set(xlim=(-0.04, 1.06), ylim=(-0.04, 1.06))
        ax.set_aspect("equal")
        ax.grid(alpha=0.25)
        ax.set_title(f"{attr} intervened", fontsize=10)
        ax.set_xlabel("isolation")
    axes[0][0].set_ylabel("cause")
    handles = [Line2D([], [], color=styles[lab]["color"], marker=styles[lab]["marker"],
                      linestyle="", markeredgecolor="black", label=lab) for lab in labels]  # fmt: skip
    handles += [Line2D([], [], marker="P", linestyle="", color="black", alpha=0.6,
                       label="no intervention"),
                Line2D([], [], marker="*", linestyle="", color="black", alpha=0.6, markersize=9,
                       label="swap (whole vector)"),
                Line2D([], [], color="0.7", linestyle=":", label="equal disentangle")]  # fmt: skip
    text = caption + ("; numbers beside points: layer" if len(grid) > 1 else "")
    title += f", layer {grid[0]}" if len(grid) == 1 else ""
    _bottom(fig, handles, [h.get_label() for h in handles], text.strip("; "), width, height, title)
    _save(fig, path)
    return path, fig


def training_curves_figure(
    curves: Sequence[tuple[str, str, str, Sequence[float]]],
    attrs: Sequence[str],
    path: Path,
    title: str,
    caption: str = "",
) -> tuple[Path, Any]:
    """Per-epoch training loss: ``curves`` are (line label, method, attribute, losses); one
    panel per attribute, a line per method line (several jobs of a line: each drawn thin)."""
    plt = _plt()
    method_of = {lab: m for lab, m, _, _ in curves}
    labels = order_lines(list(method_of), method_of)
    styles = method_style(labels, method_of)
    width = max(3.8 * len(attrs), 6.5)
    height = 3.4
    fig, axes = plt.subplots(1, len(attrs), figsize=(width, height), squeeze=False)
    for j, attr in enumerate(attrs):
        ax = axes[0][j]
        for lab in labels:
            mine = [c for lb, _, a, c in curves if lb == lab and a == attr and c]
            for n, curve in enumerate(mine):
                st = styles[lab]
                ax.plot(range(1, len(curve) + 1), curve, color=st["color"],
                        linestyle=st["linestyle"], linewidth=1.6 if len(mine) == 1 else 0.9,
                        label=lab if n == 0 else "_")  # fmt: skip
        ax.set_title(f"{attr} intervened", fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("training loss (cross-entropy)")
    handles, labs = _handles(axes[0])
    _bottom(fig, handles, labs, caption, width, height, title)
    _save(fig, path)
    return path, fig


def metric_vs_l0_figure(
    rows: Sequence[Mapping[str, Any]],
    metrics: Sequence[tuple[str, str]],
    color_of: Callable[[Mapping[str, Any]], str],
    point_of: Callable[[Mapping[str, Any]], str],
    path: Path,
    title: str,
    baselines: Mapping[str, float] | None = None,
    caption: str = "",
) -> tuple[Path, Any]:
    """SAEBench-style: one panel per (column, label) in ``metrics``; each SAE (``point_of``)
    one marker at its L0 (``l0`` column) on a log axis, seeds averaged with their std as the
    bar; colour by ``color_of`` (SAE family), marker by the row's ``architecture``; no line
    joins two SAEs. ``baselines[column]``: the LLM's own score, a dashed line. NaN scores
    (undefined) are not drawn; each panel says how many were left out."""
    plt = _plt()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import ScalarFormatter

    colors = sorted({color_of(r) for r in rows})
    cmap = {c: SAE_COLORS[i % len(SAE_COLORS)] if i < len(SAE_COLORS)
            else OTHER_COLORS[i % len(OTHER_COLORS)] for i, c in enumerate(colors)}  # fmt: skip
    archs = sorted({str(r.get("architecture") or "custom") for r in rows})
    n = len(metrics)
    width = max(4.0 * n, 6.5)
    height = 3.6
    fig, axes = plt.subplots(1, n, figsize=(width, height), squeeze=False)
    for ax, (col, label) in zip(axes[0], metrics, strict=True):
        blank = 0
        for key in sorted({point_of(r) for r in rows}):
            sel = [r for r in rows if point_of(r) == key]
            x, y = point(sel, "l0")[0], point(sel, col)
            if math.isnan(x) or x <= 0:
                continue
            if math.isnan(y[0]):
                blank += 1
                continue
            arch = str(sel[0].get("architecture") or "custom")
            err = [[0 if math.isnan(y[1]) else y[1]], [0 if math.isnan(y[2]) else y[2]]]
            ax.errorbar([x], [y[0]], yerr=err, fmt=ARCH_MARKERS.get(arch, "X"),
                        color=cmap[color_of(sel[0])], markersize=6, capsize=2,
                        markeredgecolor="black", markeredgewidth=0.4)  # fmt: skip
        base = (baselines or {}).get(col)
        if base is not None and not math.isnan(base):
            ax.axhline(base, color="black", linestyle="--", linewidth=1, label="LLM (no SAE)")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.margins(0.1)
        ax.set_xlabel("L0 (active latents per token, log)")
        ax.set_title(label + (f"\n({blank} SAE(s): undefined, not drawn)" if blank else ""),
                     fontsize=9)  # fmt: skip
        ax.grid(alpha=0.3, which="both")
    handles = [Line2D([], [], color=cmap[c], marker="o", linestyle="", label=c) for c in colors]
    handles += [Line2D([], [], color="0.5", marker=ARCH_MARKERS.get(a, "X"), linestyle="",
                       markeredgecolor="black", label=f"architecture: {a}") for a in archs]  # fmt: skip
    if any(b is not None and not math.isnan(b) for b in (baselines or {}).values()):
        handles.append(Line2D([], [], color="black", linestyle="--", label="LLM (no SAE)"))
    _bottom(fig, handles, [h.get_label() for h in handles], caption, width, height, title)
    _save(fig, path)
    return path, fig
