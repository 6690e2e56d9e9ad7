"""The report's section on a pruned layer that reads the RGB image: its removed and kept filters as
pictures (``figures.filter_images``), each beside the classes that depend on it
(``figures.filter_class_panel``), and the colour selectivity of removed vs kept filters
(``filter_images.colour_selectivity``)."""
from __future__ import annotations

import torch
from torch import nn

from carfast.report import figures
from carfast.report.filter_images import colour_selectivity
from carfast.report.html_page import safe_name, table

__all__ = ["filters_section"]


def filters_section(page, result, layer, original, imp, input_std) -> dict:
    """Add the section of RGB layer ``layer`` to ``page``; return its data for summary.json.

    ``original`` (the unpruned model, or None) gives the removed filters' weights; ``imp`` the layer's
    ``ClassImportance`` (None: no class panel); ``input_std`` the input normalisation's (3,) std.
    """
    pruned_w = result.model.get_submodule(layer).weight.detach().cpu()
    kept, removed = list(result.kept[layer]), list(result.removed.get(layer, []))
    page.heading(2, f"First-layer filters: {layer}")
    orig_w = None
    if original is not None:
        try:
            m = original.get_submodule(layer)
        except AttributeError:
            m = None
        if isinstance(m, nn.Conv2d) and m.weight.shape[0] == len(kept) + len(removed) and \
                m.weight.shape[1:] == pruned_w.shape[1:]:
            orig_w = m.weight.detach().cpu()
        else:
            page.note(f"The original model given has no matching {layer} "
                      f"({len(kept) + len(removed)} filters of shape {tuple(pruned_w.shape[1:])}); "
                     "removed filters are not shown.")
    if orig_w is None and original is None:
        page.note('The removed filters\' weights are not in the pruned model: pass the original '
                 "model (write_report(original=...); carfast report rebuilds it from the run's settings) to see "
                 "them. Only the kept filters are shown.")
    if orig_w is None and result.finetuned_accuracy is not None:
        page.note('The kept filters are shown after fine-tuning.')
    kept_w = orig_w[kept] if orig_w is not None else pruned_w
    removed_w = orig_w[removed] if orig_w is not None and removed else None
    page.figure(figures.filter_images, f"filters_{safe_name(layer)}.png",
                f"{layer}: removed filters in removal order and kept filters", kept_weight=kept_w, kept=kept,
                removed_weight=removed_w, removed=removed, input_std=input_std)
    if imp is not None:
        ids = kept + removed if removed_w is not None else kept
        w = torch.cat([kept_w, removed_w]) if removed_w is not None else kept_w
        page.figure(figures.filter_class_panel, f"filter_classes_{safe_name(layer)}.png",
                    f"{layer}: each filter beside the classes that lose most and least without it", weight=w,
                    filters=ids, importance=imp, removed=removed, input_std=input_std)
    else:
        page.note('No CAR scores for this layer (another criterion, or all removals replayed '
                 "from a checkpoint): no class panel.")
    cs_kept = colour_selectivity(kept_w, input_std).tolist()
    data = {"colour_selectivity": {"kept": dict(zip(map(str, kept), cs_kept)), "removed": None},
            "weights": "original" if orig_w is not None else "pruned model"}
    page.heading(3, "Colour selectivity of removed vs kept filters")
    page.note('Colour-selectivity index: the share of a filter\'s weight energy orthogonal to the '
             "luminance axis (1,1,1)/\u221a3 at each position; 0 = grey (responds to brightness only), 1 = pure "
              "colour opponent (e.g. red minus green). The CAR paper reports that greedy CAR removes "
              "colour-selective first-layer filters first.")
    rows = [("kept", len(cs_kept), f"{_mean(cs_kept):.3f}", f"{_median(cs_kept):.3f}")]
    if removed_w is not None:
        cs_removed = colour_selectivity(removed_w, input_std).tolist()
        data["colour_selectivity"]["removed"] = dict(zip(map(str, removed), cs_removed))
        first = cs_removed[:max(1, len(cs_removed) // 2)]
        rows.insert(0, ("removed", len(cs_removed), f"{_mean(cs_removed):.3f}", f"{_median(cs_removed):.3f}"))
        rows.insert(1, (f"first {len(first)} removed", len(first), f"{_mean(first):.3f}", f"{_median(first):.3f}"))
        median_all = _median(cs_removed + cs_kept)
        above = sum(v > median_all for v in cs_removed)
        data["colour_selectivity"]["removed_above_layer_median"] = above
        page.add(table(["filters", "count", "mean index", "median index"], rows, num_cols=(1, 2, 3)))
        page.note(f'Removed filters with an index above the median of all the layer\'s filters '
                 f"({median_all:.3f}): {above} of {len(cs_removed)} (about half by chance).")
        page.figure(figures.colour_selectivity_plot, f"colour_{safe_name(layer)}.png",
                    f"{layer}: colour-selectivity index by removal order, and of the kept filters",
                    removed_index=cs_removed, kept_index=cs_kept)
    else:
        page.add(table(["filters", "count", "mean index", "median index"], rows, num_cols=(1, 2, 3)))
    return data


def _mean(v: list) -> float:
    return sum(v) / len(v) if v else float("nan")


def _median(v: list) -> float:
    if not v:
        return float("nan")
    s = sorted(v)
    m = len(s) // 2
    return s[m] if len(s) % 2 else 0.5 * (s[m - 1] + s[m])
