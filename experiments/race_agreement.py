"""Does the raced search remove what the exact search removes? ResNet-20, the selection-rule setting.

    python experiments/race_agreement.py [--offsets 0,1000,2000] [--delta 0.05] [--epsilon 0] [--block 128]
                                         [--rule loss] [--threads 1] [--data test.npz]

Greedy CAR (sequential, step 1) prunes the 9 block conv1s of the bundled ResNet-20 to 75 % of their filters on
1,000 CIFAR-10 test images from ``--offset`` on, following the raced search (``carfast.Race``, step t's image
order seeded as ``carfast.prune`` seeds it, so the removals are those of ``prune(search=race)``). At every
step the exact search's choice is computed too, on the same state, so "the share of steps where the race
removes the exact search's choice" compares like with like even after the two runs would have parted.
Reported per split: that share, the race's pruned network's top-1 on the 9,000 other test images (held out)
beside the exact search's run on the same images (read from experiments/selection_rule.py's results,
``selection_rule_<rule>[_o<offset>].json``), the race's candidate-image evaluations against the exact
search's, and the seconds each search took inside this run. Rows are saved as they finish
(``experiments/results/race_agreement.json``); a rerun skips those already there.
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
from carfast.scoring.race import race_scores
from carfast.scoring.selection import score_by_rule, settled_keys
from carfast.surgery import remove_filters

REPO = Path(__file__).resolve().parent.parent
SHARED_TEST = REPO.parent / "shared" / "data" / "cifar10" / "test.npz"
RESULTS = REPO / "experiments" / "results"
N_SELECT, KEEP, DEPTH = 1000, 0.75, 20


def exact_row(rule: str, offset: int) -> dict:
    path = RESULTS / f"selection_rule_{rule}{'' if offset == 0 else f'_o{offset}'}.json"
    if not path.is_file():
        raise SystemExit(f"no exact run for offset {offset}: run python experiments/selection_rule.py --rules {rule} "
                         f"--offset {offset} --out {path}")
    saved = json.loads(path.read_text())
    s = saved["settings"]
    if (s["depth"], s["keep"], s["n_select"], s.get("offset", 0)) != (DEPTH, KEEP, N_SELECT, offset):
        raise SystemExit(f"{path} has other settings ({s}); expected depth {DEPTH}, keep {KEEP}, {N_SELECT} images")
    return next(r for r in saved["rows"] if r["rule"] == rule)


def raced_run(model, layers, select, rule: str, race: carfast.Race):
    """Prune ``layers`` as ``carfast.prune(search=race)`` does (sequential, step 1), computing the exact
    search's choice at every step too. Returns (pruned model, {layer: removed}, per-step records)."""
    steps, removed, iteration = [], {}, 0
    for layer in layers:
        scorer = carfast.LayerScorer(model, layer, select, progress=False)
        keep = max(1, round(KEEP * scorer.num_filters))
        scorer.prepare()
        while len(scorer.remaining) > keep:
            t = time.perf_counter()
            s, keys = score_by_rule(scorer, rule, False)
            t_exact = time.perf_counter() - t
            exact = _best(s, keys)
            t = time.perf_counter()
            [r], outcome = race_scores([(scorer, scorer.remaining)], rule, race, False, str(iteration))
            choice = _best(r, settled_keys(scorer, r, rule))
            t_race = time.perf_counter() - t
            steps.append({"layer": layer, "exact": exact, "race": choice, "candidates": len(scorer.remaining),
                          "survivors": len(r.filters), "evaluations": outcome.evaluations,
                          "exhaustive": outcome.exhaustive, "seconds_exact": t_exact, "seconds_race": t_race})
            scorer.remove(choice)
            iteration += 1
        removed[layer] = list(scorer.removed)
        model = remove_filters(model, {layer: removed[layer]})
    return model, removed, steps


def _best(s, keys) -> int:
    filters = s.filters.tolist()
    return filters[min(range(len(filters)), key=lambda i: (keys[i], filters[i]))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--offsets", default="0,1000,2000")
    ap.add_argument("--rule", default="loss", choices=["loss", "accuracy"])
    ap.add_argument("--delta", type=float, default=carfast.Race.delta)
    ap.add_argument("--epsilon", type=float, default=carfast.Race.epsilon)
    ap.add_argument("--block", type=int, default=carfast.Race.block)
    ap.add_argument("--data", default=str(SHARED_TEST) if SHARED_TEST.is_file() else None,
                    help="CIFAR-10 test .npz (default ../shared/data/cifar10/test.npz)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "race_agreement.json"))
    args = ap.parse_args(argv)
    if args.data is None:
        ap.error("needs the full CIFAR-10 test set (--data test.npz): the held-out images are the 9,000 others")
    torch.set_num_threads(args.threads)
    x, y = carfast.data.cifar10_test(path=args.data)
    race = carfast.Race(delta=args.delta, epsilon=args.epsilon, block=args.block)
    saved = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {"rows": []}
    for offset in [int(o) for o in args.offsets.split(",")]:
        key = {"offset": offset, "rule": args.rule, "per_step": True, **race.settings()}
        if any(r["key"] == key for r in saved["rows"]):
            continue
        exact = exact_row(args.rule, offset)
        lo, hi = offset, offset + N_SELECT
        select = (x[lo:hi], y[lo:hi])
        held = (torch.cat([x[:lo], x[hi:]]), torch.cat([y[:lo], y[hi:]]))
        model = carfast.models.cifar_resnet(DEPTH)
        pruned, removed, steps = raced_run(model, block_conv1s(model), select, args.rule, race)
        same = sum(st["exact"] == st["race"] for st in steps)
        row = {"key": key, "steps": len(steps), "same_steps": same,
               "race": {"held_out_accuracy": evaluate(pruned, held).accuracy,
                        "selection_accuracy": evaluate(pruned, select).accuracy,
                        "seconds": sum(st["seconds_race"] for st in steps),
                        "evaluations": sum(st["evaluations"] for st in steps), "removed": removed},
               "exact": {"held_out_accuracy": exact["held_out_accuracy"],
                         "selection_accuracy": exact["selection_accuracy"],
                         "seconds": sum(st["seconds_exact"] for st in steps),
                         "evaluations": sum(st["exhaustive"] for st in steps),
                         "same_network": removed == exact["removed"]},
               "per_step": steps, "data": os.path.basename(args.data)}
        saved["rows"].append(row)
        write_json_atomic(args.out, saved)
        r, e = row["race"], row["exact"]
        print(f"offset {offset}: same choice in {same}/{len(steps)} steps; held out race "
              f"{100 * r['held_out_accuracy']:.2f} "
              f"% exact {100 * e['held_out_accuracy']:.2f} %; evaluations {r['evaluations'] / e['evaluations']:.3f} "
              f"of exact; {r['seconds']:.0f} s against exact's {e['seconds']:.0f} s in this run", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
