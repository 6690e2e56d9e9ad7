"""The report's plots: each function draws one figure and writes it as a PNG (atomically) at ``path``.

- ``accuracy_curves``: accuracy (%) against filters remaining, one line per curve (layer or criterion).
- ``classwise_heatmap``: class-wise CAR of a layer (filters x classes, % points), filters by CAR (a wide
  layer: its most and least important and first removed filters, ``heatmap_rows``).
- ``filter_images``: first-layer filters as RGB tiles, removed ones in removal order beside the kept.
- ``filter_class_panel``: each first-layer filter's tile beside the classes that depend on it most and least.
- ``colour_selectivity_plot``: the colour-selectivity index of removed vs kept filters.
- ``summary_bars``: params, MACs and latency before vs after pruning.
- ``criteria_bars``: held-out (and scoring-set) accuracy of several criteria pruning to the same sizes.

matplotlib is imported inside the functions (``import carfast`` stays light) and figures are drawn on
a ``matplotlib.figure.Figure`` with the Agg renderer, never through ``pyplot``: no global state, no
window, nothing left open. Every function returns ``path``.
"""
from __future__ import annotations

import math
import os

import torch

from carfast.atomic import atomic_path
from carfast.report.filter_images import colour_selectivity, filter_tiles

__all__ = ["accuracy_curves", "classwise_heatmap", "heatmap_rows", "filter_images", "filter_class_panel",
           "colour_selectivity_plot", "summary_bars", "criteria_bars", "DPI", "HEATMAP_MAX_ROWS",
           "HEATMAP_MAX_HEIGHT_IN"]

DPI = 110
_REMOVED_COLOUR = "#c0392b"
_KEPT_COLOUR = "#1f6fb2"


def _figure(width: float, height: float):
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _save(fig, path) -> str:
    path = os.fspath(path)
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path


def _order_labels(removed) -> dict:
    """{original filter index: 1-based removal order}."""
    return {int(f): i + 1 for i, f in enumerate(removed or [])}


# ---- accuracy curves ---------------------------------------------------------------------------------
def accuracy_curves(curves: dict, path, *, title: str = "Accuracy while pruning", baseline: float | None = None,
                    threshold: float | None = None, xlabel: str = "filters remaining in the layer",
                    ylabel: str = "top-1 accuracy (%)") -> str:
    """Accuracy (%) against filters remaining, one line per entry of ``curves``.

    Args:
        curves: {name: [(remaining, accuracy), ...]}, accuracy a fraction in [0, 1]; each line is drawn
            in the given order. The x axis runs from many filters to few (the direction of pruning).
        baseline: accuracy of the unpruned model (a dashed line), fraction.
        threshold: the accuracy pruning may not go below (``max_accuracy_drop``), fraction.
    """
    if not isinstance(curves, dict) or not curves:
        raise ValueError("accuracy_curves: curves must be a non-empty dict {name: [(remaining, accuracy), ...]}")
    fig = _figure(7.5, 4.6)
    ax = fig.add_subplot()
    xs_all = []
    for name, points in curves.items():
        pts = [(float(r), 100.0 * float(a)) for r, a in points]
        if not pts:
            continue
        xs_all += [p[0] for p in pts]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3.5, linewidth=1.6,
                label=str(name))
    if baseline is not None:
        ax.axhline(100.0 * baseline, color="0.35", linestyle="--", linewidth=1,
                   label=f"unpruned ({100.0 * baseline:.2f} %)")
    if threshold is not None:
        ax.axhline(100.0 * threshold, color=_REMOVED_COLOUR, linestyle=":", linewidth=1.2,
                   label=f"stop below ({100.0 * threshold:.2f} %)")
    if xs_all and min(xs_all) != max(xs_all):
        ax.set_xlim(max(xs_all) + 0.5, min(xs_all) - 0.5)      # pruning proceeds left to right
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"{xlabel} (pruning proceeds \u2192)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


# ---- class-wise heatmap --------------------------------------------------------------------------------
#: a layer with more filters shows this many rows: the most and least important and the first removed
HEATMAP_MAX_ROWS = 64
_ROW_IN, _BASE_IN = 0.23, 2.2
#: the tallest heatmap, inches (x DPI = pixels): whatever the number of filters
HEATMAP_MAX_HEIGHT_IN = _BASE_IN + _ROW_IN * HEATMAP_MAX_ROWS
_MAX_CLASS_LABELS = 40


def heatmap_rows(importance, removed=None, max_rows: int = HEATMAP_MAX_ROWS) -> tuple[list[int], str]:
    """Which filters the class-wise heatmap draws: (row indices into ``importance``, most important first by
    CAR, ties to the lower filter index; a sentence saying what is shown, "" when every filter is).

    Up to ``max_rows`` filters: all of them. More: the ``max_rows // 4`` most and least important, and the
    removed filters in removal order (``removed``: original indices) up to ``max_rows`` rows in all.
    """
    car = importance.car.double().tolist()
    filters = importance.filters.tolist()
    order = sorted(range(len(filters)), key=lambda i: (-car[i], filters[i]))
    if len(order) <= max_rows:
        return order, ""
    end = max(1, max_rows // 4)
    ranks = _order_labels(removed)
    ends = set(order[:end]) | set(order[-end:])
    gone = sorted((i for i in order if filters[i] in ranks and i not in ends), key=lambda i: ranks[filters[i]])
    chosen = gone[:max_rows - len(ends)]
    shown = ends | set(chosen)
    rows = [i for i in order if i in shown]
    what = f"the {end} most and {end} least important by CAR"
    if chosen:
        total = len(gone)
        what += (f" and the {'first ' if len(chosen) < total else ''}{len(chosen)} removed filters among the rest"
                 f"{f' (of {total})' if len(chosen) < total else ''}")
    return rows, (f"{len(rows)} of {len(order)} filters shown: {what}; the label's r<k> is the filter's rank by "
                  "CAR (r1 = most important) and a grey line marks skipped ranks. summary.json holds every filter.")


def classwise_heatmap(importance, path, *, removed=None, title: str | None = None,
                      max_rows: int = HEATMAP_MAX_ROWS) -> str:
    """Heatmap of class-wise CAR (``ClassImportance``): rows = filters sorted by CAR (most important on
    top), columns = classes, colour = accuracy of the class lost without the filter (% points;
    red = the class loses, blue = it gains, white = no change; grey = class without images).

    ``removed``: original indices of pruned filters in removal order; their row labels are drawn in red
    with their removal order (``#1`` = removed first). A layer of more than ``max_rows`` filters shows
    ``max_rows`` of them (``heatmap_rows`` says which), so the figure stays at most
    ``HEATMAP_MAX_HEIGHT_IN`` inches tall with one readable label per row; with many classes every k-th
    class is labelled.
    """
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    full = 100.0 * importance.matrix.double().numpy()                   # [F, C] % points
    car = 100.0 * importance.car.double().numpy()                        # [F]
    filters = importance.filters.tolist()
    rows, shown_note = heatmap_rows(importance, removed, max_rows)
    rank = {i: k + 1 for k, i in enumerate(sorted(range(len(filters)), key=lambda i: (-car[i], filters[i])))}
    mat = full[rows]
    finite = full[np.isfinite(full)]
    vmax = float(np.abs(finite).max()) if finite.size else 0.0
    vmax = vmax if vmax > 0 else 1.0
    num_f, num_c = mat.shape
    ranks = _order_labels(removed)
    fig = _figure(min(3.2 + 0.62 * num_c, 14), min(_BASE_IN + _ROW_IN * num_f, HEATMAP_MAX_HEIGHT_IN))
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(mat), cmap=_diverging_cmap(), norm=TwoSlopeNorm(0.0, -vmax, vmax),
                   aspect="auto", interpolation="nearest")
    every = max(1, math.ceil(num_c / _MAX_CLASS_LABELS))
    ax.set_xticks(range(0, num_c, every), list(importance.class_names)[::every], rotation=45, ha="right",
                  fontsize=9 if num_c <= 20 else 7)
    labels = []
    for i in rows:
        f = filters[i]
        head = f"r{rank[i]} " if shown_note else ""
        labels.append(f"{head}#{ranks[f]} f{f}  {car[i]:+.1f}" if f in ranks else f"{head}f{f}  {car[i]:+.1f}")
    ax.set_yticks(range(num_f), labels, fontsize=8 if num_f <= 40 else 6.5)
    for tick, i in zip(ax.get_yticklabels(), rows):
        if filters[i] in ranks:
            tick.set_color(_REMOVED_COLOUR)
            tick.set_fontweight("bold")
    for r in range(num_f - 1):                                            # ranks skipped between two rows
        if rank[rows[r + 1]] - rank[rows[r]] > 1:
            ax.axhline(r + 0.5, color="0.45", linewidth=1.2)
    if num_f * num_c <= 240:                                              # small enough to print values
        for r in range(num_f):
            for c in range(num_c):
                v = mat[r, c]
                if math.isfinite(v) and abs(v) >= 0.05:                   # blank = no change
                    ax.text(c, r, f"{v:.0f}" if abs(v) >= 9.5 else f"{v:.1f}", ha="center", va="center",
                            fontsize=6.5, color="white" if abs(v) > 0.6 * vmax else "black")
    ylabel = "filter and its CAR (% points), most important first"
    ax.set_ylabel(ylabel + (f"\n({num_f} of {len(filters)} filters: see the caption)" if shown_note else ""))
    ax.set_xlabel("class" + ("  (blank cell: no change)" if num_f * num_c <= 240 else "") +
                  (f"  (one class in {every} labelled)" if every > 1 else ""))
    note = "; red labels: removed (#k = k-th removed)" if ranks else ""
    ax.set_title(title or f"Class-wise CAR of {importance.layer}: accuracy of each class lost without the "
                 f"filter{note}", fontsize=10, wrap=True)
    cb = fig.colorbar(im, ax=ax, shrink=min(1.0, 8.0 / max(num_f * _ROW_IN, 1.0)) if num_f > 35 else 1.0)
    cb.set_label("class accuracy lost (% points)")
    return _save(fig, path)


def _diverging_cmap():
    import matplotlib
    return matplotlib.colormaps["RdBu_r"].with_extremes(bad="0.8")


# ---- filter images ---------------------------------------------------------------------------------------
def _tile_grid(subfig, tiles, captions, colours, columns: int) -> None:
    rows = max(1, math.ceil(len(tiles) / columns))
    axes = subfig.subplots(rows, columns, squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if k < len(tiles):
            ax.imshow(tiles[k], interpolation="nearest")
            ax.set_title(captions[k], fontsize=7.5, color=colours[k], pad=2)


def filter_images(path, *, kept_weight: torch.Tensor, kept: list, removed_weight: torch.Tensor | None = None,
                  removed: list | None = None, input_std=None, columns: int = 8, title: str | None = None) -> str:
    """Removed and kept first-layer filters as RGB tiles (``filter_tiles``), with each filter's index
    and colour-selectivity index (``cs``); removed ones in removal order (``#1`` first).

    Args:
        kept_weight: [K, 3, kh, kw] weights of the kept filters, rows in the order of ``kept``.
        kept: K original filter indices.
        removed_weight: [R, 3, kh, kw] weights of the removed filters in removal order, or None when they
            are not known (the figure then says so).
        removed: R original indices in removal order.
    """
    removed = list(removed or [])
    groups = []
    if removed_weight is not None and removed:
        cs = colour_selectivity(removed_weight, input_std).tolist()
        groups.append((f"removed ({len(removed)}), in removal order", filter_tiles(removed_weight, input_std),
                       [f"#{i + 1} f{f}\ncs {c:.2f}" for i, (f, c) in enumerate(zip(removed, cs))], _REMOVED_COLOUR))
    cs = colour_selectivity(kept_weight, input_std).tolist()
    groups.append((f"kept ({len(kept)})", filter_tiles(kept_weight, input_std),
                   [f"f{f}\ncs {c:.2f}" for f, c in zip(kept, cs)], _KEPT_COLOUR))
    columns = max(1, min(columns, max(len(g[1]) for g in groups)))
    rows = [max(1, math.ceil(len(g[1]) / columns)) for g in groups]
    fig = _figure(max(6.8, 1.0 + 1.05 * columns), 1.1 + sum(1.3 * r + 0.45 for r in rows))
    subfigs = fig.subfigures(len(groups), 1, height_ratios=[1.3 * r + 0.45 for r in rows], squeeze=False)[:, 0]
    for sf, (label, tiles, caps, colour) in zip(subfigs, groups):
        _tile_grid(sf, tiles.numpy(), caps, [colour] * len(caps), columns)
        sf.suptitle(label, fontsize=10, color=colour, fontweight="bold")
    missing = "" if removed_weight is not None or not removed else \
        f"\n{len(removed)} removed filters not shown: their weights need the original model"
    fig.suptitle((title or "First-layer filters\n(grey = weight 0; cs = colour-selectivity index, 0 grey .. 1 colour)")
                 + missing, fontsize=10)
    return _save(fig, path)


def filter_class_panel(path, *, weight: torch.Tensor, filters: list, importance, removed=None, top: int = 2,
                       input_std=None, columns: int = 4, title: str | None = None) -> str:
    """Each first-layer filter's tile beside the ``top`` classes that lose the most accuracy without it
    (``ClassImportance.per_filter``: "most", ▲, those that lose any) and the ``top`` at the other end that
    gain accuracy without it ("least", ▼, those that gain any), in % points; classes the removal leaves
    unchanged are not named. Removed filters are captioned in red with their removal order.

    Args:
        weight: [F, 3, kh, kw] weights of the filters to show, rows in the order of ``filters``.
        filters: F original filter indices (rows of ``importance`` by ``importance.filters``).
        importance: the layer's ``ClassImportance``.
    """
    per = importance.per_filter(top)
    car = dict(zip(importance.filters.tolist(), (100.0 * importance.car).tolist()))
    ranks = _order_labels(removed)
    tiles = filter_tiles(weight, input_std).numpy()
    shown = [(k, f) for k, f in enumerate(filters) if f in per]
    shown.sort(key=lambda p: (ranks.get(p[1], 10 ** 9), -car[p[1]], p[1]))   # removal order, then by CAR
    columns = max(1, min(columns, len(shown)))
    rows = max(1, math.ceil(len(shown) / columns))
    fig = _figure(0.4 + 3.3 * columns, 0.8 + 1.25 * rows)
    axes = fig.subplots(rows, columns, squeeze=False)
    for n, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if n >= len(shown):
            continue
        k, f = shown[n]
        ax.imshow(tiles[k], interpolation="nearest", extent=(0, 1, 0, 1))
        ax.set_xlim(0, 3.3)
        ax.set_ylim(-0.05, 1.05)
        colour = _REMOVED_COLOUR if f in ranks else "black"
        head = f"f{f}" + (f"  removed #{ranks[f]}" if f in ranks else "  kept") + f"  CAR {car[f]:+.1f}"
        lines = [f"\u25b2 {c} {100 * v:+.1f}" for c, v in per[f]["most"] if v > 0] or ["\u25b2 no class loses"]
        lines += [f"\u25bc {c} {100 * v:+.1f}" for c, v in per[f]["least"] if v < 0] or ["\u25bc no class gains"]
        ax.text(1.12, 1.02, head, fontsize=8, va="top", ha="left", color=colour, fontweight="bold")
        ax.text(1.12, 0.80, "\n".join(lines), fontsize=7.5, va="top", ha="left", linespacing=1.25)
    fig.suptitle(title or f"{importance.layer}: each filter beside the classes that lose (\u25b2) and gain (\u25bc) "
                 "most accuracy without it (% points)", fontsize=10.5)
    return _save(fig, path)


def colour_selectivity_plot(path, *, removed_index: list, kept_index: list, title: str | None = None) -> str:
    """Colour-selectivity index of removed filters (x = removal order) and of kept filters (a band at the
    right); dashed lines = group means."""
    fig = _figure(7.5, 4.0)
    ax = fig.add_subplot()
    r, k = [float(v) for v in removed_index], [float(v) for v in kept_index]
    if r:
        ax.plot(range(1, len(r) + 1), r, "o-", color=_REMOVED_COLOUR, markersize=4, linewidth=1,
                label=f"removed (mean {sum(r) / len(r):.2f})")
        ax.axhline(sum(r) / len(r), color=_REMOVED_COLOUR, linestyle="--", linewidth=1)
    if k:
        x0 = len(r) + 2
        xs = [x0 + (i % 8) * 0.35 for i in range(len(k))]
        ax.plot(xs, k, "s", color=_KEPT_COLOUR, markersize=4, label=f"kept (mean {sum(k) / len(k):.2f})")
        ax.axhline(sum(k) / len(k), color=_KEPT_COLOUR, linestyle="--", linewidth=1)
        ticks = list(range(1, len(r) + 1, max(1, len(r) // 10))) if r else []
        ax.set_xticks(ticks + [(min(xs) + max(xs)) / 2], [str(t) for t in ticks] + ["kept"])
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("removal order (1 = removed first)")
    ax.set_ylabel("colour-selectivity index (0 grey .. 1 colour)")
    ax.set_title(title or "Colour selectivity of removed vs kept first-layer filters", pad=24)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8.5, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=2, frameon=False)
    return _save(fig, path)


# ---- summary bars ----------------------------------------------------------------------------------------
_METRICS = (("params", "parameters", 1e6, "millions"), ("macs", "MACs per image", 1e6, "millions"),
            ("latency_s", "latency, 1 image", 1e-3, "ms"))


def summary_bars(path, *, before: dict, after: dict, title: str = "Before and after pruning",
                 spread: dict | None = None) -> str:
    """Bars of params, MACs and (when both dicts have it) latency, before vs after, one panel each, with
    the after/before ratio in each panel's title. ``before`` / ``after``: {"params", "macs",
    "latency_s"?} (latency in seconds). ``spread``: {metric: ((low, high) before, (low, high) after)} in
    the same units, drawn as error bars; when the two ranges overlap the panel's title says the ratio is
    within noise."""
    metrics = [m for m in _METRICS if before.get(m[0]) is not None and after.get(m[0]) is not None]
    if not metrics:
        raise ValueError("summary_bars: before and after share none of 'params', 'macs', 'latency_s'")
    fig = _figure(2.9 * len(metrics) + 0.6, 3.6)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, (key, label, scale, unit) in zip(axes, metrics):
        b, a = float(before[key]) / scale, float(after[key]) / scale
        bars = ax.bar(["before", "after"], [b, a], color=["0.6", _KEPT_COLOUR], width=0.6)
        top = max(b, a) or 1.0
        for bar, v in zip(bars, (b, a)):
            ax.text(bar.get_x() + bar.get_width() / 2, v + 0.02 * top, f"{v:.3g}", ha="center", va="bottom",
                    fontsize=9)
        ax.set_ylim(0, 1.18 * top)
        ax.set_ylabel(f"{label} ({unit})")
        ratio = f"{float(after[key]) / float(before[key]):.2f}x" if before[key] else "-"
        ranges = (spread or {}).get(key)
        if ranges is not None:
            (bl, bh), (al, ah) = ranges
            ax.errorbar([0, 1], [b, a], yerr=[[b - bl / scale, a - al / scale], [bh / scale - b, ah / scale - a]],
                        fmt="none", ecolor="0.2", capsize=4, linewidth=1)
            top = max(top, bh / scale, ah / scale)
            ax.set_ylim(0, 1.18 * top)
            if bl <= ah and al <= bh:
                ratio += " (within noise)"
        ax.set_title(f"{label}: {ratio}", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


# ---- criteria compared -----------------------------------------------------------------------------------
def criteria_bars(path, *, labels: list, held_out: list, selection: list | None = None,
                  unpruned_held_out: float | None = None, unpruned_selection: float | None = None,
                  held_out_images: int | None = None, title: str | None = None, topk: int = 1) -> str:
    """Bars of held-out top-``topk`` accuracy (%) per criterion, all pruned to the same sizes, with the unpruned
    network's held-out accuracy as a dashed line; ``selection`` (accuracy on the images the filters were
    chosen on) as a lighter bar beside each, the unpruned one as a dotted line.

    Args:
        labels: K criterion names, in the order to draw.
        held_out, selection: K accuracies (fractions in [0, 1]).
    """
    if not labels or len(held_out) != len(labels) or (selection is not None and len(selection) != len(labels)):
        raise ValueError(f"criteria_bars: one held-out (and selection) accuracy per label; got {len(labels)} "
                         f"labels, {len(held_out)} held-out" +
                         ("" if selection is None else f", {len(selection)} selection") + " accuracies")
    k = len(labels)
    fig = _figure(max(6.0, 1.6 + 1.5 * k), 4.8)
    ax = fig.add_subplot()
    width = 0.38 if selection is not None else 0.6
    xs = list(range(k))
    shift = -width / 2 if selection is not None else 0.0
    n_text = "" if held_out_images is None else f" ({held_out_images:,} images)"
    bars = [ax.bar([x + shift for x in xs], [100.0 * v for v in held_out], width, color=_KEPT_COLOUR,
                   label=f"held out{n_text}")]
    if selection is not None:
        bars.append(ax.bar([x + width / 2 for x in xs], [100.0 * v for v in selection], width, color="#9cc3e6",
                           label="selection (the images the filters were chosen on)"))
    for group in bars:
        for bar in group:
            h = bar.get_height()
            ax.text(bar.get_x() + bar.get_width() / 2, h + 0.8, f"{h:.1f}", ha="center", va="bottom", fontsize=8.5)
    if unpruned_held_out is not None:
        ax.axhline(100.0 * unpruned_held_out, color="0.25", linestyle="--", linewidth=1.2,
                   label=f"unpruned, held out ({100.0 * unpruned_held_out:.1f} %)")
    if unpruned_selection is not None and selection is not None:
        ax.axhline(100.0 * unpruned_selection, color="0.55", linestyle=":", linewidth=1.2,
                   label=f"unpruned, selection ({100.0 * unpruned_selection:.1f} %)")
    ax.set_xticks(xs, [str(v) for v in labels])
    ax.set_ylim(0, 112)
    ax.set_ylabel(f"top-{topk} accuracy (%)")
    ax.set_title(title or f"Criteria pruning the same layers to the same sizes: top-{topk} accuracy", fontsize=10.5)
    ax.grid(True, axis="y", alpha=0.3)
    fig.legend(fontsize=8, loc="outside lower center", ncols=2, frameon=False)
    return _save(fig, path)
