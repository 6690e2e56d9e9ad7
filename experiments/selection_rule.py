"""Which selection rule should greedy CAR use? The paper's, against rules that resist the winner's curse.

    python experiments/selection_rule.py [--depth 20] [--keep 0.75] [--n-select 1000] [--offset 0]
                                         [--rules accuracy,lcb,loss] [--data test.npz] [--threads 1] [--out FILE]

Greedy CAR (``carfast.prune``, sequential, step 1) prunes every block's first conv of a bundled pretrained
CIFAR ResNet to ``--keep`` of its filters, once per selection rule (``carfast.scoring.selection``), scored on
``--n-select`` images of the CIFAR-10 test set from ``--offset`` on; each pruned network's top-1 is measured on those
selection images and on all the other test images (held out), before any fine-tuning. The gap between the
two is the winner's curse: the greedy picks, among many noisy counts, the removals that happened to cost
least on its own images. The rule to prefer keeps held-out accuracy at least as high with a smaller gap.

Data: ``--data`` (an .npz with x, y), default ``../shared/data/cifar10/test.npz`` relative to the repository
when it is there, else carfast's bundled 2,000-image slice. Each rule's row is saved as soon as it is done
(JSON, default ``experiments/results/selection_rule.json``); a rerun skips the rules already saved with the
same settings.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from whole_network import block_conv1s

import carfast
from carfast.atomic import write_json_atomic
from carfast.pruning.evaluate import evaluate
from carfast.scoring.selection import RULES, score_by_rule
from carfast.surgery import remove_filters

REPO = Path(__file__).resolve().parent.parent
SHARED_TEST = REPO.parent / "shared" / "data" / "cifar10" / "test.npz"


def crossfit_prune(model, layers, select, keep: float):
    """A prototype of cross-fitting (not in the library yet): greedy CAR, sequential, step 1, where step t
    of each layer chooses by the loss rule on one half of the selection images (even steps: the images at
    even positions, odd steps: the odd ones), so each image drives half of the choices and every scoring
    costs half. Returns (pruned model, {layer: removed original indices})."""
    halves = [(select[0][i::2], select[1][i::2]) for i in (0, 1)]
    removed = {}
    for layer in layers:
        scorers = [carfast.LayerScorer(model, layer, h, progress=False) for h in halves]
        n = scorers[0].num_filters
        for t in range(n - max(1, round(keep * n))):       # as prune rounds a fractional keep
            s, keys = score_by_rule(scorers[t % 2], "loss", False)
            filters = s.filters.tolist()
            j = filters[min(range(len(filters)), key=lambda i: (keys[i], filters[i]))]
            for sc in scorers:
                sc.remove(j)
        removed[layer] = list(scorers[0].removed)
        model = remove_filters(model, {layer: removed[layer]})
    return model, removed


def run_rule(rule: str, args, select, held) -> dict:
    model = carfast.models.cifar_resnet(args.depth)
    layers = block_conv1s(model)
    t = time.perf_counter()
    if rule == "crossfit":
        pruned, removed = crossfit_prune(model, layers, select, args.keep)
    else:
        res = carfast.prune(model, layers, select, keep=args.keep, rule=rule, progress=False)
        pruned, removed = res.model, res.removed
    seconds = time.perf_counter() - t
    sel, out = evaluate(pruned, select).accuracy, evaluate(pruned, held).accuracy
    return {"rule": rule, "selection_accuracy": sel, "held_out_accuracy": out, "gap": sel - out,
            "seconds": seconds, "removed": removed}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=20, choices=carfast.models.bundled_resnet_depths())
    ap.add_argument("--keep", type=float, default=0.75, help="share of each block conv1's filters KEPT")
    ap.add_argument("--n-select", type=int, default=1000, help="selection images")
    ap.add_argument("--offset", type=int, default=0, help="index of the first selection image (several splits)")
    ap.add_argument("--rules", default=",".join(RULES), help=f"comma-separated, of {list(RULES) + ['crossfit']} "
                                                             "(crossfit: a prototype, see crossfit_prune)")
    ap.add_argument("--data", default=str(SHARED_TEST) if SHARED_TEST.is_file() else None,
                    help="CIFAR-10 test .npz (default: ../shared/data/cifar10/test.npz, else the bundled slice)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(REPO / "experiments" / "results" / "selection_rule.json"))
    args = ap.parse_args(argv)
    rules = args.rules.split(",")
    bad = [r for r in rules if r not in RULES + ("crossfit",)]
    if bad:
        ap.error(f"unknown rule(s) {bad}; choose from {list(RULES) + ['crossfit']}")
    torch.set_num_threads(args.threads)
    x, y = carfast.data.cifar10_test(path=args.data)
    lo, hi = args.offset, args.offset + args.n_select
    if args.offset < 0 or hi > len(y) or args.n_select >= len(y):
        ap.error(f"--offset {args.offset} --n-select {args.n_select} do not fit {len(y)} images with some held out")
    select = (x[lo:hi], y[lo:hi])
    held = (torch.cat([x[:lo], x[hi:]]), torch.cat([y[:lo], y[hi:]]))
    settings = {"depth": args.depth, "keep": args.keep, "n_select": args.n_select, "offset": args.offset,
                "data": os.path.basename(args.data) if args.data else "bundled slice", "held_out": len(held[1])}
    saved = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    if saved.get("settings") != settings:
        saved = {"settings": settings, "rows": []}
    base = carfast.models.cifar_resnet(args.depth)
    saved["unpruned"] = {"selection_accuracy": evaluate(base, select).accuracy,
                         "held_out_accuracy": evaluate(base, held).accuracy}
    done = {r["rule"] for r in saved["rows"]}
    for rule in rules:
        if rule in done:
            continue
        row = run_rule(rule, args, select, held)
        saved["rows"].append(row)
        write_json_atomic(args.out, saved)
        print(f"{rule:<9} selection {100 * row['selection_accuracy']:.2f} %  held out "
              f"{100 * row['held_out_accuracy']:.2f} %  gap {100 * row['gap']:.2f} pts  {row['seconds']:.0f} s",
              flush=True)
    u = saved["unpruned"]
    print(f"\nResNet-{args.depth}, block conv1s kept {args.keep:.0%}, {args.n_select} selection (from image "
          f"{args.offset}) / {len(held[1])} "
          f"held-out images; unpruned {100 * u['selection_accuracy']:.2f} / {100 * u['held_out_accuracy']:.2f} %")
    print(f"{'rule':<9} {'selection %':>11} {'held out %':>10} {'gap pts':>8} {'seconds':>8}")
    for r in saved["rows"]:
        print(f"{r['rule']:<9} {100 * r['selection_accuracy']:>11.2f} {100 * r['held_out_accuracy']:>10.2f} "
              f"{100 * r['gap']:>8.2f} {r['seconds']:>8.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
