"""The report's figures (matplotlib, Agg backend): RAVEL scores over layers, cause vs
isolation, and SAEBench-style metric-vs-L0 plots.

Input is the report's table rows (saeravel.report), never result files. Conventions:

* an SAE line is the ``sae`` method of one SAE family (and differing setting); every other
  method (das, neurons, pca, ...) is a *reference* drawn in grey with its own dash and marker;
* a line is drawn only between two consecutive layers of the figure's layer grid (the union
  of the layers measured in it) that the line measured: a layer it lacks breaks the line, and
  markers sit only at measured layers;
* error bars: the standard deviation over seeds where a point has more than one seed, else the
  result's bootstrap interval (``ci95``-style fields) when it has one;
* the no-intervention baseline is a dotted black line with a wide horizontal tick at every
  measured layer, so it shows with one layer too.
"""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

SAE_METHOD = "sae"
PANEL_SCORES = ("disentangle", "cause", "isolation")
ISO_DISENTANGLE = (0.5, 0.6, 0.7, 0.8, 0.9)
REFERENCE_STYLES = (("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1, 1, 1)), "v"),
                    ((0, (1, 1)), "P"), ((0, (6, 2)), "X"), ((0, (3, 1, 1, 1, 1, 1)), "h"))  # fmt: skip
REFERENCE_GREYS = ("0.35", "0.55", "0.2", "0.65", "0.45", "0.3", "0.6")
ATTRIBUTE_MARKERS = "osD^v<>ph"


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


SEED_COLUMNS = ("seed", "model.train_seed", "sae.seed", "eval.seed")  # report.SEED_KEYS


def seed_of(row: Mapping[str, Any]) -> tuple:
    """The seed identity of a row: a reference method's result does not depend on the SAE, so
    its ``sae.*`` seeds are left out (the same DAS job under two SAEs is one seed)."""
    method = row.get("method")  # None: a row of an SAE eval (core, ...), the SAE's own seed
    ref = method is not None and is_reference(str(method))
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


def is_reference(method: str) -> bool:
    """Whether a RAVEL method is drawn as a reference (every method but the SAE mask)."""
    return method != SAE_METHOD


def _common(rows: Sequence[Mapping[str, Any]], key: str) -> str:
    values = sorted({str(r.get(key)) for r in rows if r.get(key) not in (None, "")})
    return values[0] if len(values) == 1 else ("mixed" if values else "?")


def ravel_title(rows: Sequence[Mapping[str, Any]]) -> str:
    """``protocol=..., match=..., split=...`` of the rows (``mixed`` when they differ)."""
    return (
        f"protocol={_common(rows, 'protocol')}, match={_common(rows, 'match')}, "
        f"split={_common(rows, 'split_by')}"
    )


def _order(labels: Sequence[str], method_of: Mapping[str, str]) -> list[str]:
    """SAE lines first, then references, each sorted."""
    return sorted(labels, key=lambda lab: (is_reference(method_of[lab]), lab))


def _styles(labels: Sequence[str], method_of: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    styles: dict[str, dict[str, Any]] = {}
    n_sae = n_ref = 0
    for lab in labels:
        if is_reference(method_of[lab]):
            ls, mk = REFERENCE_STYLES[n_ref % len(REFERENCE_STYLES)]
            color = REFERENCE_GREYS[n_ref % len(REFERENCE_GREYS)]
            styles[lab] = {"color": color, "linestyle": ls, "marker": mk, "linewidth": 1.3,
                           "markersize": 5, "markerfacecolor": "white"}  # fmt: skip
            n_ref += 1
        else:
            styles[lab] = {"color": f"C{n_sae % 10}", "linestyle": "-", "marker": "o",
                           "linewidth": 2.0, "markersize": 6}  # fmt: skip
            n_sae += 1
    return styles


def legend_columns(labels: Sequence[str], width_in: float, most: int = 3) -> int:
    """Legend columns that fit ``labels`` (8 pt text, about 14 characters per inch) across a
    figure ``width_in`` wide."""
    longest = max((len(lab) for lab in labels), default=1) + 6
    return max(1, min(most, len(labels), int(width_in * 14 // longest)))


def _on_grid(grid: Sequence[int], pts: Mapping[int, float]) -> list[float]:
    """Values over the layer grid, NaN where not measured (matplotlib breaks the line)."""
    return [pts.get(layer, math.nan) for layer in grid]


def ravel_layer_figure(
    rows: Sequence[Mapping[str, Any]],
    label_of: Callable[[Mapping[str, Any]], str],
    path: Path,
    title: str,
    legend_title: str = "",
) -> tuple[Path, Any]:
    """Disentangle, cause and isolation (rows of panels) vs layer for every attribute
    (columns), all panels sharing the y axis; returns the path and the (closed) figure."""
    plt = _plt()
    attrs = sorted({str(r["attribute"]) for r in rows})
    grid = sorted({int(r["layer"]) for r in rows})
    method_of = {label_of(r): str(r["method"]) for r in rows}
    labels = _order(list(method_of), method_of)
    styles = _styles(labels, method_of)
    n_handles = len(labels) + 1
    width = max(3.3 * len(attrs), 6.0) + 0.8
    ncol = legend_columns([*labels, legend_title], width)
    legend_in = 0.2 * math.ceil(n_handles / ncol) + 0.45
    height = 2.4 * len(PANEL_SCORES) + 0.9 + legend_in
    fig, axes = plt.subplots(
        len(PANEL_SCORES), len(attrs), figsize=(width, height), sharex=True, sharey=True,
        squeeze=False,
    )  # fmt: skip
    # Lines side by side within a fifth of a layer step, so error bars of equal scores do not
    # hide each other and every marker stays next to its tick.
    step = min((b - a for a, b in zip(grid, grid[1:], strict=False)), default=1)
    dx = 0.2 * step / max(len(labels) - 1, 1)
    for j, attr in enumerate(attrs):
        sub = [r for r in rows if r["attribute"] == attr]
        for i, score in enumerate(PANEL_SCORES):
            ax = axes[i][j]
            for k, lab in enumerate(labels):
                mine = [r for r in sub if label_of(r) == lab]
                if not mine:
                    continue
                by_layer: dict[int, tuple[float, float, float, int]] = {}
                for layer in sorted({int(r["layer"]) for r in mine}):
                    by_layer[layer] = point([r for r in mine if r["layer"] == layer], score)
                ref = is_reference(method_of[lab])
                shift = (k - (len(labels) - 1) / 2) * dx
                xs = [g + shift for g in grid]
                ys = _on_grid(grid, {lay: p[0] for lay, p in by_layer.items()})
                ax.plot(xs, ys, label=lab, **styles[lab])
                err = [(lay + shift, *p) for lay, p in by_layer.items() if not math.isnan(p[1])]
                if err:
                    ax.errorbar(
                        [e[0] for e in err], [e[1] for e in err],
                        yerr=[[e[2] for e in err], [e[3] for e in err]],
                        fmt="none", ecolor=styles[lab]["color"], capsize=2.5,
                        elinewidth=0.8 if ref else 1.1, alpha=0.45 if ref else 0.9,
                    )  # fmt: skip
            base_col = "baseline" if score == "disentangle" else f"baseline_{score}"
            base = {
                layer: point([r for r in sub if r["layer"] == layer], base_col)[0] for layer in grid
            }
            if any(not math.isnan(v) for v in base.values()):
                ax.plot(grid, _on_grid(grid, base), color="black", linestyle=":", marker="_",
                        markersize=18, markeredgewidth=2, linewidth=1.2,
                        label="no intervention")  # fmt: skip
            ax.set_ylim(-0.03, 1.05)
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(f"{attr} intervened", fontsize=10)
            if j == 0:
                ax.set_ylabel(score)
            if i == len(PANEL_SCORES) - 1:
                ax.set_xlabel("layer")
                ax.set_xticks(grid)
                if len(grid) == 1:
                    ax.set_xlim(grid[0] - 1, grid[0] + 1)
    handles, seen = [], set()
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in seen:
                seen.add(lab)
                handles.append((h, lab))
    fig.legend([h for h, _ in handles], [lab for _, lab in handles], loc="lower center",
               ncol=ncol, fontsize=8, frameon=False, title=legend_title or None,
               title_fontsize=7)  # fmt: skip
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, legend_in / height, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path, fig


def _reference_points(rows: Sequence[Mapping[str, Any]], name: str) -> list[tuple[float, float]]:
    """(isolation, cause) of a no-training baseline (``baseline`` = none, ``swap``) per
    (job, attribute), deduplicated."""
    out = set()
    for r in rows:
        c, i = r.get(f"{name}_cause"), r.get(f"{name}_isolation")
        if _finite([c]) and _finite([i]):
            out.add((float(i), float(c)))
    return sorted(out)


def cause_isolation_figure(
    rows: Sequence[Mapping[str, Any]],
    label_of: Callable[[Mapping[str, Any]], str],
    path: Path,
    title: str,
) -> tuple[Path, Any]:
    """Cause vs isolation, one panel per method line (SAE families first): points coloured by
    layer, marker by attribute, seeds averaged; dotted lines of equal disentangle and the
    ``none`` / ``swap`` reference points; legend and colour bar outside the data."""
    plt = _plt()
    from matplotlib.colors import BoundaryNorm
    from matplotlib.lines import Line2D

    method_of = {label_of(r): str(r["method"]) for r in rows}
    labels = _order(list(method_of), method_of)
    attrs = sorted({str(r["attribute"]) for r in rows})
    grid = sorted({int(r["layer"]) for r in rows})
    cmap = plt.get_cmap("viridis", max(len(grid), 2))
    # colour by the layer's position in the grid: one equal band per measured layer
    norm = BoundaryNorm([i - 0.5 for i in range(len(grid) + 1)], cmap.N)
    ncol = min(len(labels), 3)
    nrow = math.ceil(len(labels) / ncol)
    height = 3.6 * nrow + 1.5
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol + 1.2, height),
                             sharex=True, sharey=True, squeeze=False)  # fmt: skip
    refs = {"none": _reference_points(rows, "baseline"), "swap": _reference_points(rows, "swap")}
    ref_style = {"none": ("P", "no intervention (none)"), "swap": ("*", "swap (whole vector)")}
    sc = None
    for n, lab in enumerate(labels):
        ax = axes[n // ncol][n % ncol]
        for d in ISO_DISENTANGLE:
            xs = [max(0.0, 2 * d - 1), min(1.0, 2 * d)]
            ax.plot(xs, [2 * d - x for x in xs], color="0.75", linestyle=":", linewidth=0.9,
                    zorder=0)  # fmt: skip
            ax.text(xs[1] - 0.01, 2 * d - xs[1] + 0.015, f"{d:g}", fontsize=6, color="0.5",
                    ha="right")  # fmt: skip
        for name, pts in refs.items():
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=ref_style[name][0],
                           s=70, color="black", alpha=0.5, zorder=2, linewidths=0)  # fmt: skip
        mine = [r for r in rows if label_of(r) == lab]
        for a, attr in enumerate(attrs):
            pts = []
            for layer in grid:
                sel = [r for r in mine if r["attribute"] == attr and r["layer"] == layer]
                if sel:
                    pts.append(
                        (point(sel, "isolation")[0], point(sel, "cause")[0], grid.index(layer))
                    )
            if pts:
                sc = ax.scatter([p[0] for p in pts], [p[1] for p in pts], c=[p[2] for p in pts],
                                cmap=cmap, norm=norm, marker=ATTRIBUTE_MARKERS[a % 9], s=38,
                                edgecolors="black", linewidths=0.4, zorder=3)  # fmt: skip
        kind = "reference" if is_reference(method_of[lab]) else "SAE"
        ax.set_title(textwrap.fill(f"{lab} ({kind})", 48), fontsize=8)
        ax.set(xlim=(-0.04, 1.06), ylim=(-0.04, 1.06))
        ax.set_aspect("equal")
        ax.grid(alpha=0.25)
        if n % ncol == 0:
            ax.set_ylabel("cause")
        if n // ncol == nrow - 1 or n + ncol >= len(labels):
            ax.set_xlabel("isolation")
            ax.tick_params(labelbottom=True)  # the panel below is empty: show this one's ticks
    for n in range(len(labels), nrow * ncol):
        axes[n // ncol][n % ncol].set_visible(False)
    handles = [Line2D([], [], marker=ATTRIBUTE_MARKERS[a % 9], linestyle="", color="0.5",
                      markeredgecolor="black", label=f"{attr} intervened")
               for a, attr in enumerate(attrs)]  # fmt: skip
    handles += [Line2D([], [], marker=ref_style[k][0], linestyle="", color="black", alpha=0.5,
                       markersize=9, label=ref_style[k][1]) for k in refs if refs[k]]  # fmt: skip
    handles.append(
        Line2D([], [], color="0.6", linestyle=":", label="equal disentangle (value at the right)")
    )
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=8,
               frameon=False)  # fmt: skip
    fig.suptitle(title + (f"; layer {grid[0]}" if len(grid) == 1 else ""), fontsize=10)
    fig.tight_layout(rect=(0, 0.75 / height, 0.9 if len(grid) > 1 else 1, 0.96))
    if sc is not None and len(grid) > 1:
        cax = fig.add_axes((0.91, 0.2, 0.015, 0.6))
        bar = fig.colorbar(sc, cax=cax, ticks=range(len(grid)))
        bar.set_ticklabels([str(g) for g in grid])
        bar.set_label("layer")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path, fig


def metric_vs_l0_figure(
    rows: Sequence[Mapping[str, Any]],
    metrics: Sequence[tuple[str, str]],
    line_of: Callable[[Mapping[str, Any]], str],
    point_of: Callable[[Mapping[str, Any]], str],
    path: Path,
    title: str,
) -> tuple[Path, Any]:
    """SAEBench-style trade-off plot: one panel per headline metric (column, label), the SAE's
    L0 (``l0`` column of each row) on x, one line per ``line_of`` (an SAE family at one
    layer) through its SAEs (``point_of``) in L0 order; seeds of one SAE averaged, their
    standard deviation as error bars."""
    plt = _plt()
    lines = sorted({line_of(r) for r in rows})
    n = len(metrics)
    fig, axes = plt.subplots(1, n, figsize=(4.0 * n + 2.8, 3.8), squeeze=False)
    l0s = _finite([r.get("l0") for r in rows])
    for ax, (col, label) in zip(axes[0], metrics, strict=True):
        for k, line in enumerate(lines):
            mine = [r for r in rows if line_of(r) == line]
            pts = []
            for key in sorted({point_of(r) for r in mine}):
                sel = [r for r in mine if point_of(r) == key]
                x, y = point(sel, "l0")[0], point(sel, col)
                if not math.isnan(x) and not math.isnan(y[0]):
                    pts.append((x, *y))
            pts.sort()
            if not pts:
                continue
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts],
                        yerr=[[0 if math.isnan(p[2]) else p[2] for p in pts],
                              [0 if math.isnan(p[3]) else p[3] for p in pts]],
                        color=f"C{k % 10}", marker="o", linewidth=1.6, markersize=5, capsize=2.5,
                        label=line)  # fmt: skip
        ax.set_xlabel("L0 (active latents per token)")
        ax.set_ylabel(label)
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
        if l0s and min(l0s) > 0 and max(l0s) / min(l0s) > 20:
            ax.set_xscale("log")
    handles, labs = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labs:
                handles.append(h)
                labs.append(lab)
    width = 4.0 * n + 2.8
    fig.legend(handles, labs, loc="center left", bbox_to_anchor=(1 - 2.7 / width, 0.5),
               fontsize=8, frameon=False, title="SAE family", title_fontsize=8)  # fmt: skip
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 2.8 / width, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path, fig
