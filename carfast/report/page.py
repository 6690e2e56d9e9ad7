"""The pruning report: one self-contained HTML page, its figures as PNG files, and ``summary.json``.

``write_report(result, out_dir, ...)`` reads a ``PruneResult`` (``carfast.prune``'s or
``carfast.load_pruned``'s) and writes into ``out_dir``:

- ``index.html``: run settings; the summary table (params, MACs, accuracy on the scoring data before
  and after, held-out accuracy and latency, with its run-to-run spread, when given the means); when the
  result holds a comparison of criteria (``PruneResult.comparison``), their held-out accuracy as a figure
  and a table and each layer's removal order per criterion (``comparison.py``); the accuracy curve; for each layer
  with CAR scores the class-wise heatmap (of a wide layer, its most and least important and first removed
  filters) and a per-filter interpretation table; for each pruned layer
  that reads the RGB image (weight ``[F, 3, kh, kw]``) the removed and kept filters as pictures, each
  filter beside the classes that depend on it, and the colour-selectivity index of removed vs kept
  filters (``filter_section.py``, ``filter_images.py``); the removal history. Images are embedded as
  base64 data URIs and there is no external CSS or JS: the page is one file that can be mailed. All
  text is HTML-escaped.
- the same figures as ``*.png`` beside it, and ``summary.json`` (the page's numbers as plain data).

Every file is written atomically (``atomic.py``), ``index.html`` last, so a reader never sees a
half-written page. Nothing of the models is changed (evaluation and latency run in eval mode with
their flags restored).
"""
from __future__ import annotations

import datetime
import json
import math
import os
import statistics
import warnings

import torch
from torch import nn

from carfast.atomic import atomic_path, write_json_atomic
from carfast.batching import model_device
from carfast.errors import CarfastWarning
from carfast.pruning.evaluate import evaluate
from carfast.pruning.result import PruneResult, kept_percent
from carfast.report import figures
from carfast.report.comparison import comparison_section
from carfast.report.filter_section import filters_section
from carfast.report.html_page import CSS, Page, count, e, pct, plain, ratio, safe_name, table
from carfast.scoring.classwise import ClassImportance
from carfast.surgery.measure import latency

__all__ = ["write_report", "history_curves", "layer_importance"]

_FN = "write_report"
_FORMAT = "carfast-report/1"

def history_curves(result: PruneResult) -> dict:
    """{layer: [(filters remaining, accuracy), ...]} from ``result.history``: each layer's curve starts at
    its full size with the accuracy just before its first removal (the input model's, or after the
    layers pruned before it) and has one point per removal. Layers without removals are left out."""
    sizes = {layer: len(result.removed.get(layer, [])) + len(kept) for layer, kept in result.kept.items()}
    curves, prev = {}, result.base["accuracy"]
    for row in result.history:
        layer = row["layer"]
        if layer not in curves:
            curves[layer] = [(sizes.get(layer, row["remaining"] + 1), prev)]
        curves[layer].append((row["remaining"], row["accuracy"]))
        prev = row["accuracy"]
    return curves


def layer_importance(result: PruneResult, layer: str, class_names) -> tuple[ClassImportance, str]:
    """The layer's ClassImportance with ORIGINAL filter indices, and a note when it was scored late.

    ``result.scores[layer]`` is the layer's first CAR scoring. Normally that is all filters of the intact
    layer (indices = original). A sequential run resumed from a checkpoint in the middle of a layer scores
    it first after the replayed removals: the filters then left, still by original index. (The global
    schedule records a layer's scores only while the layer is intact.)
    """
    scores = result.scores[layer]
    imp = ClassImportance.from_scores(scores, class_names)
    total = len(result.removed.get(layer, [])) + len(result.kept.get(layer, []))
    if len(scores.filters) == total or total == 0:
        return imp, ""
    if result.settings.get("search"):
        return imp, (f"The raced search scored {len(scores.filters)} of the {total} filters on every image; the others "
                     "were dropped early as confidently worse choices, so only these are shown (score the layer "
                     "with carfast.score_layer for all).")
    early = result.removed[layer][:total - len(scores.filters)]
    note = (f"Scored after {len(early)} removals replayed from a checkpoint: these scores cover the "
            f"{len(scores.filters)} filters then left.")
    return imp, note


def _check_args(result, original, heldout, curves, class_names):
    if not isinstance(result, PruneResult):
        raise TypeError(f"{_FN}: result must be a PruneResult (carfast.prune or carfast.load_pruned), got "
                        f"{type(result).__name__}")
    if original is not None and not isinstance(original, nn.Module):
        raise TypeError(f"{_FN}: original must be the unpruned nn.Module or None, got {type(original).__name__}")
    if heldout is not None:
        if not (isinstance(heldout, (tuple, list)) and len(heldout) == 2 and
                all(isinstance(t, torch.Tensor) for t in heldout)):
            raise TypeError(f"{_FN}: heldout must be (inputs [N, ...], labels [N]) tensors, got "
                            f"{type(heldout).__name__}")
        if heldout[0].shape[0] != heldout[1].shape[0] or heldout[0].shape[0] == 0:
            raise ValueError(f"{_FN}: heldout has {heldout[0].shape[0]} inputs and {heldout[1].shape[0]} labels; "
                             "pass the same positive number of each")
    if curves is not None and (not isinstance(curves, dict) or
                               not all(isinstance(v, (list, tuple)) for v in curves.values())):
        raise TypeError(f"{_FN}: curves must be a dict {{name: [(remaining, accuracy), ...]}}")
    if class_names is not None:
        for layer, s in result.scores.items():
            if len(class_names) != s.num_classes:
                raise ValueError(f"{_FN}: {len(class_names)} class names, but {layer!r} was scored on "
                                 f"{s.num_classes} classes; pass one name per class, in label order")


def _example(result, heldout, device) -> torch.Tensor:
    if heldout is not None:
        return heldout[0][:1].to(device)
    shape = result.settings.get("input_shape")
    if not shape:
        raise ValueError(f"{_FN}: the result records no input_shape; pass heldout=(x, y) to measure latency")
    return torch.zeros([1, *list(shape)[1:]], device=device)


def _rgb_layers(result: PruneResult) -> list[str]:
    """Pruned layers whose weight reads 3 input channels (a first layer over the RGB image)."""
    out = []
    for layer in result.kept:
        try:
            m = result.model.get_submodule(layer)
        except AttributeError:
            continue
        if isinstance(m, nn.Conv2d) and m.groups == 1 and m.weight.shape[1] == 3:
            out.append(layer)
    return out


def _latencies(original: nn.Module, pruned: nn.Module, example: torch.Tensor, repeats: int = 20,
               warmup: int = 3) -> dict:
    """Seconds per forward of one image, the two networks timed alternately (so a load spike hits both):
    medians, the middle half of the runs (25th-75th percentile) of each, and whether those overlap (the
    difference is within run-to-run noise)."""
    ex_o, ex_p = example.to(model_device(original)), example.to(model_device(pruned))
    times = {"before": [], "after": []}
    for i in range(warmup + repeats):
        for key, model, ex in (("before", original, ex_o), ("after", pruned, ex_p)):
            t = latency(model, ex, repeats=1, warmup=0)
            if i >= warmup:
                times[key].append(t)
    out = {"repeats": repeats}
    for key, ts in times.items():
        q1, q2, q3 = statistics.quantiles(ts, n=4, method="inclusive")
        out[key], out[f"{key}_range"] = statistics.median(ts), (q1, q3)
    (bl, bh), (al, ah) = out["before_range"], out["after_range"]
    out["within_noise"] = bool(bl <= ah and al <= bh)
    return out


def _disagrees(p1: float, n1: int, p0: float, n0: int) -> bool:
    """Whether accuracies ``p1`` on ``n1`` images and ``p0`` on ``n0`` other images of the same kind are too far
    apart for one network: more than 4 standard errors of their difference and more than 3 points."""
    if n1 < 1 or n0 < 1:
        return False
    p = (p1 * n1 + p0 * n0) / (n1 + n0)
    se = math.sqrt(max(p * (1 - p), 1e-12) * (1 / n1 + 1 / n0))
    return abs(p1 - p0) > max(4 * se, 0.03)


def _ms(median: float, spread) -> str:
    return f"{1e3 * median:.2f} ms ({1e3 * spread[0]:.2f}-{1e3 * spread[1]:.2f})"


# ---- sections ------------------------------------------------------------------------------------------
def _summary_section(page, result, original, heldout, example) -> dict:
    s = result.summary()
    top = f"top-{s.topk}"
    data = {"summary": s.to_dict(), "heldout": None, "latency_s": None, "warnings": []}
    rows = [("parameters", count(s.params_before), count(s.params_after), ratio(s.params_after, s.params_before)),
            ("MACs per image", count(s.macs_before), count(s.macs_after), ratio(s.macs_after, s.macs_before)),
            (f"{top} on the scoring data ({result.base['num_images']:,} images)", pct(s.accuracy_before),
             pct(s.accuracy_after), f"{100 * (s.accuracy_after - s.accuracy_before):+.2f} pts")]
    if s.accuracy_finetuned is not None:
        rows.append((f"{top} on the scoring data after fine-tuning", "", pct(s.accuracy_finetuned),
                     f"{100 * (s.accuracy_finetuned - s.accuracy_before):+.2f} pts"))
    if heldout is not None:
        after = evaluate(result.model, heldout, topk=s.topk).accuracy
        before = evaluate(original, heldout, topk=s.topk).accuracy if original is not None else None
        data["heldout"] = {"num_images": int(heldout[1].shape[0]), "accuracy_before": before,
                           "accuracy_after": after}
        rows.append((f"{top} held out ({heldout[1].shape[0]:,} images not used for scoring)", pct(before),
                     pct(after), "-" if before is None else f"{100 * (after - before):+.2f} pts"))
        if before is not None and _disagrees(before, int(heldout[1].shape[0]), result.base["accuracy"],
                                             int(result.base["num_images"])):
            warning = (f"the original network given scores {pct(before)} on the held-out images, but the result "
                       f"records {pct(result.base['accuracy'])} for the network it pruned, on its "
                       f"{result.base['num_images']:,} scoring images: too far apart for chance, so the original is "
                       "likely not that network (other weights or input normalisation) and the 'before' figures "
                       "are not comparable; pass the original it was pruned from")
            data["warnings"].append(warning)
            warnings.warn(f"{_FN}: {warning}", CarfastWarning, stacklevel=3)
    bars_before = {"params": s.params_before, "macs": s.macs_before}
    bars_after = {"params": s.params_after, "macs": s.macs_after}
    spread, lat_note = None, None
    if original is not None:
        lat = _latencies(original, result.model, example)
        data["latency_s"] = {"before": lat["before"], "after": lat["after"], "device": str(example.device),
                             "batch": 1, "repeats": lat["repeats"], "before_range": lat["before_range"],
                             "after_range": lat["after_range"], "within_noise": lat["within_noise"]}
        change = ratio(lat["after"], lat["before"]) + (" (within noise)" if lat["within_noise"] else "")
        rows.append((f"latency, 1 image ({example.device.type}, median of {lat['repeats']} runs each, alternating; "
                     "middle half of the runs in brackets)", _ms(lat["before"], lat["before_range"]),
                     _ms(lat["after"], lat["after_range"]), change))
        bars_before["latency_s"], bars_after["latency_s"] = lat["before"], lat["after"]
        spread = {"latency_s": (lat["before_range"], lat["after_range"])}
        if lat["within_noise"]:
            lat_note = (f"Latency: the pruned network's {ratio(lat['after'], lat['before'])} of the original's "
                        f"is within run-to-run noise (the middle halves of the {lat['repeats']} timed runs of each "
                        "overlap): it is not a measured speed-up or slow-down. Time on an idle machine, or a larger "
                        "network, to tell.")
    for layer, before in s.filters_before.items():
        after = s.filters_after[layer]
        rows.append((f"filters of {layer}", str(before), str(after),
                     f"{ratio(after, before)} (kept {kept_percent(after, before)}, removed {before - after})"))
    page.heading(2, "Summary")
    page.add(table(["", "before", "after", "after / before"], rows, num_cols=(1, 2, 3)))
    notes = [f"Warning: {w[0].upper()}{w[1:]}." for w in data["warnings"]]
    if heldout is None:
        notes.append("No held-out data was given: accuracy is on the images the filters were chosen on, which "
                     "flatters the pruned model (pass heldout=(x, y), or --data / --heldout-n to carfast report).")
    elif original is None:
        notes.append("Held-out accuracy of the original model needs the original model (not given).")
    if original is None:
        notes.append("Latency needs the original model (not given).")
    elif lat_note:
        notes.append(lat_note)
    for n in notes:
        page.note(n)
    page.figure(figures.summary_bars, "summary.png", "Parameters, MACs and latency before and after pruning"
                + ("; latency bars with the middle half of the timed runs" if spread else ""),
                before=bars_before, after=bars_after, spread=spread)
    return data


def _work_note(result) -> str:
    """How CAR searched and what it cost in candidate-image evaluations ("" for a baseline criterion)."""
    made, exact = result.work()
    if made is None:
        return ""
    race = result.settings.get("search")
    if not race:
        return f"Exact search: {made:,} candidate-image evaluations."
    return (f"Raced search (delta {race['delta']}, epsilon {race['epsilon']}, blocks of {race['block']} images): "
            f"{made:,} candidate-image evaluations, {made / exact:.1%} of the exact search's {exact:,}; every "
            "recorded removal's scores are exact.")


def _criterion_name(result) -> str:
    name = str(result.settings.get("criterion", "car"))
    return "CAR" if name == "car" else name


def _curve_section(page, result, curves) -> dict:
    page.heading(2, "Accuracy while pruning")
    hist = history_curves(result)
    drop = result.settings.get("max_accuracy_drop")
    if isinstance(drop, dict):       # a budget per layer: draw the line where they all agree
        drops = {d for d in drop.values()}
        drop = drops.pop() if len(drops) == 1 else None
    threshold = None if drop is None else result.base["accuracy"] - drop
    if hist:
        page.figure(figures.accuracy_curves, "accuracy.png",
                    "Accuracy on the scoring data against filters remaining, one line per pruned layer",
                    curves=hist, baseline=result.base["accuracy"], threshold=threshold,
                    ylabel=f"top-{result.summary().topk} accuracy (%)",
                    title=f"Greedy {_criterion_name(result)} pruning: accuracy on the scoring data after each "
                          "removal")
    else:
        page.note('No filter was removed: there is no curve.')
    if curves:
        page.figure(figures.accuracy_curves, "accuracy_compare.png", "The accuracy curves passed to the report",
                    curves=curves, title="Accuracy against filters remaining (given curves)",
                    baseline=result.base["accuracy"], xlabel="filters remaining")
    return {"history": {k: [list(p) for p in v] for k, v in hist.items()},
            "given": {str(k): [[float(a) for a in p] for p in v] for k, v in (curves or {}).items()}}


def _classwise_section(page, result, layer, class_names) -> tuple[dict, ClassImportance]:
    imp, note = layer_importance(result, layer, class_names)
    removed = result.removed.get(layer, [])
    ranks = {f: i + 1 for i, f in enumerate(removed)}
    page.heading(2, f"Class-wise CAR: {layer}")
    page.note('For each filter and class: the accuracy of the class lost when the filter alone is '
             "removed, measured before any filter of this layer was pruned (positive = the class depends on the "
             "filter). Filters are sorted by CAR, the overall accuracy lost; removed filters are marked with their "
             "removal order.")
    if layer in result.settings.get("groups", ()):
        note = (f"{layer} was pruned as its coupling group: each row is a channel of the residual stream it "
                f"writes, removed from every layer that writes or reads it. {note or ''}").strip()
    if note:
        page.note(note)
    shown = figures.heatmap_rows(imp, removed)[1]
    page.figure(figures.classwise_heatmap, f"classwise_{safe_name(layer)}.png",
                f"Class-wise CAR of {layer} (% points)" + (f". {shown}" if shown else ""), importance=imp,
                removed=removed)
    sel = imp.selectivity().tolist()
    per = [{"filter": f, **d} for f, d in imp.per_filter(3).items()]
    loss = (result.scores[layer].loss_increase.tolist() if hasattr(result.scores[layer], "loss_increase")
            else [float("nan")] * len(per))
    order = sorted(range(len(per)), key=lambda i: (-float(imp.car[i]), per[i]["filter"]))
    rows, classes = [], []
    for i in order:
        f = per[i]["filter"]
        lose = ", ".join(f"{c} {100 * v:+.1f}" for c, v in per[i]["most"] if v > 0) or "-"
        gain = ", ".join(f"{c} {100 * v:+.1f}" for c, v in per[i]["least"] if v < 0) or "-"
        rows.append((f, f"removed #{ranks[f]}" if f in ranks else "kept", f"{100 * float(imp.car[i]):+.2f}",
                     f"{loss[i]:+.4f}" if math.isfinite(loss[i]) else "-", f"{sel[i]:.2f}", lose, gain))
        classes.append("removed" if f in ranks else "")
    page.heading(3, "Per-filter interpretation")
    page.note('CAR: accuracy lost without the filter (% points); loss +: mean cross-entropy '
             "increase; class selectivity: 1 = its removal hurts a single class, 0 = all classes alike (or none); "
             "then the classes that lose most and those that gain (% points).")
    markup = table(["filter", "status", "CAR %", "loss +", "class selectivity", "classes that lose most",
                    "classes that gain"], rows, classes, num_cols=(0, 2, 3, 4))
    if len(rows) > figures.HEATMAP_MAX_ROWS:
        markup = f"<details><summary>{len(rows)} filters, most important first</summary>\n{markup}\n</details>"
    page.add(markup)
    return {"classwise": imp.to_dict(3), "note": note or None, "heatmap_rows": shown or None}, imp


def _settings_section(page, result, title) -> None:
    rows = []
    for k, v in result.settings.items():
        rows.append((k, v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)))
    rows.append(("removals", str(len(result.history))))
    rows.append(("pruning time", f"{sum(r.get('seconds', 0.0) for r in result.history):.1f} s"))
    page.heading(2, "Run settings")
    page.add(table(["setting", "value"], rows))


def _history_section(page, result) -> None:
    page.heading(2, "Removal history")
    if not result.history:
        page.note('No removals.')
        return
    rows = [(r["step"], r["layer"], r["filter"], f"{100 * r['accuracy']:.2f}", f"{r['loss']:.4f}", r["remaining"],
             f"{r['seconds']:.2f}") for r in result.history]
    page.add(f"<details><summary>{len(rows)} removals, in order</summary>")
    page.add(table(["step", "layer", "filter or group channel (original index)",
                    f"top-{result.summary().topk} % after", "loss after", "remaining", "seconds"], rows,
                   num_cols=(0, 2, 3, 4, 5, 6)))
    page.add("</details>")


# ---- entry point ---------------------------------------------------------------------------------------
def write_report(result: PruneResult, out_dir, *, original: nn.Module | None = None, heldout=None,
                 curves: dict | None = None, class_names=None, title: str | None = None,
                 input_std=None) -> str:
    """Write the pruning report of ``result`` into ``out_dir`` (created if needed); return the path of
    ``index.html``.

    Args:
        result: a ``PruneResult``.
        out_dir: folder for ``index.html``, the PNG figures and ``summary.json`` (existing files of the
            same names are replaced).
        original: the unpruned model: enables latency before/after (20 runs of each, alternating; the
            middle half of the runs is shown, and a ratio inside that spread is labelled within noise),
            held-out accuracy of the original (a warning when it is too far from the accuracy the result
            records for the network it pruned: another network) and the pictures of removed first-layer
            filters. Not changed.
        heldout: ``(inputs [N, ...], labels [N])`` not used for scoring: held-out accuracy of the original
            (when given) and pruned models; its first input also times latency.
        curves: extra accuracy curves ``{name: [(filters remaining, accuracy fraction), ...]}`` (e.g. other
            criteria on the same layer), drawn in a second figure.
        class_names: C class names in label order (default "0" .. "C-1").
        title: page title (default from the pruned layers).
        input_std: (3,) per-channel std of the input normalisation, to show and measure first-layer
            filters in raw RGB terms (``filter_images``); default: the weights as they are.
    """
    _check_args(result, original, heldout, curves, class_names)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    layers = list(result.kept)
    title = title or f"carfast pruning report: {', '.join(layers)}"
    page = Page(out_dir)
    example = _example(result, heldout, model_device(result.model))
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    page.heading(1, title)
    page.note(f"Written {stamp} by carfast. Criterion {_criterion_name(result)}, schedule "
              f"{result.settings.get('schedule')}, {len(result.history)} filters removed.")
    work = _work_note(result)
    if work:
        page.note(work)
    _settings_section(page, result, title)
    data = {"format": _FORMAT, "title": title, "written": stamp, "settings": result.settings,
            "base": result.base, "stats": result.stats, "finetuned_accuracy": result.finetuned_accuracy}
    data.update(_summary_section(page, result, original, heldout, example))
    data["comparison"] = comparison_section(page, result)
    data["curves"] = _curve_section(page, result, curves)
    data["layers"] = {layer: {"removed": list(result.removed.get(layer, [])), "kept": list(result.kept[layer])}
                      for layer in layers}
    importances = {}
    for layer in layers:
        if layer in result.scores:
            d, importances[layer] = _classwise_section(page, result, layer, class_names)
            data["layers"][layer].update(d)
    if not result.scores:
        page.heading(2, "Class-wise CAR")
        page.note("The result holds no CAR scores (a baseline criterion, or every removal replayed from a "
                  "checkpoint): no class-wise view.")
    for layer in _rgb_layers(result):
        data["layers"][layer]["filters"] = filters_section(page, result, layer, original, importances.get(layer),
                                                          input_std)
    _history_section(page, result)
    data["figures"] = list(page.figures)
    data["history"] = result.history
    write_json_atomic(os.path.join(out_dir, "summary.json"), plain(data))
    index = os.path.join(out_dir, "index.html")
    doc = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
           f"<title>{e(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n" + "\n".join(page.parts)
           + "\n</body>\n</html>\n")
    with atomic_path(index, ".html") as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(doc)
    return index
