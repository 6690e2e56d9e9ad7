"""The report's comparison of criteria: ``PruneResult.comparison`` (written by ``carfast.compare_criteria``
through ``carfast prune --compare`` or ``carfast demo``) as a figure of held-out accuracy per criterion,
a table, and per pruned layer the filters each criterion removed, in removal order, side by side."""
from __future__ import annotations

from carfast.pruning.compare import CriteriaComparison, criterion_label
from carfast.report import figures
from carfast.report.html_page import pct, table

__all__ = ["comparison_section"]

_OPEN_ROWS = 16          # removal-order tables longer than this start folded


def _change(after: float, before: float) -> str:
    return f"{100.0 * (after - before):+.2f} pts"


def _order_table(page, comp: CriteriaComparison, layer: str) -> dict:
    names = [r["criterion"] for r in comp.rows]
    orders = {r["criterion"]: [int(f) for f in r["removed"].get(layer, [])] for r in comp.rows}
    before, after = comp.filters[layer]
    length = max(len(v) for v in orders.values())
    rows = [(k + 1, *[(orders[c][k] if k < len(orders[c]) else "") for c in names]) for k in range(length)]
    first = names[0]
    overlap = {c: len(set(orders[c]) & set(orders[first])) for c in names[1:]}
    page.heading(3, f"Removal order: {layer} ({before} -> {after} filters)")
    if overlap:
        page.note("Filters removed by both " + "; ".join(
            f"{criterion_label(first)} and {criterion_label(c)}: {n} of {len(orders[first])}"
            for c, n in overlap.items()) + ". Each column lists original filter indices, first removed on top.")
    markup = table(["#", *[criterion_label(c) for c in names]], rows, num_cols=tuple(range(len(names) + 1)))
    if length > _OPEN_ROWS:
        markup = f"<details><summary>{length} removals per criterion</summary>\n{markup}\n</details>"
    page.add(markup)
    return {"overlap_with_first": overlap}


def comparison_section(page, result) -> dict | None:
    """Add the section for ``result.comparison`` to ``page`` (nothing when there is none); return its data."""
    if not result.comparison:
        return None
    comp = CriteriaComparison.from_dict(result.comparison)
    labels = [criterion_label(r["criterion"]) for r in comp.rows]
    page.heading(2, "Criteria compared on held-out images")
    page.note(f"The same layers pruned to the same sizes by each criterion ({', '.join(labels)}), from the same "
              f"network, choosing on the same {comp.selection_images:,} selection images; top-{comp.topk} accuracy "
              "measured "
              f"on {comp.held_out_images:,} held-out images the filters were not chosen on (and, lighter, on the "
              "selection images themselves, which flatter the criterion that chose on them). Measured by this "
              "run, without fine-tuning unless the settings say otherwise.")
    page.figure(figures.criteria_bars, "criteria.png",
                f"Top-{comp.topk} accuracy of each criterion's pruned network, held out and on the selection images; "
                "dashed line: the unpruned network held out", labels=labels,
                held_out=[r["held_out_accuracy"] for r in comp.rows],
                selection=[r["selection_accuracy"] for r in comp.rows],
                unpruned_held_out=comp.unpruned_held_out_accuracy,
                unpruned_selection=comp.unpruned_selection_accuracy, held_out_images=comp.held_out_images,
                topk=comp.topk)
    rows = [("unpruned", pct(comp.unpruned_held_out_accuracy), "", pct(comp.unpruned_selection_accuracy), "")]
    for r in comp.rows:
        rows.append((criterion_label(r["criterion"]), pct(r["held_out_accuracy"]),
                     _change(r["held_out_accuracy"], comp.unpruned_held_out_accuracy), pct(r["selection_accuracy"]),
                     _change(r["selection_accuracy"], comp.unpruned_selection_accuracy)))
    page.add(table(["criterion", f"held-out top-{comp.topk} ({comp.held_out_images:,} images)", "change vs unpruned",
                    f"selection top-{comp.topk} ({comp.selection_images:,} images)", "change vs unpruned"], rows,
                   num_cols=(1, 2, 3, 4)))
    data = comp.to_dict()
    data["layers"] = {layer: _order_table(page, comp, layer) for layer in comp.filters}
    data["figure"] = "criteria.png"
    return data
