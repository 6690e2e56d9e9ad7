"""Does the raced search remove what the exact search removes? ResNet-20, the selection-rule setting.

    python experiments/race_agreement.py [--offsets 0,1000,2000] [--delta 0.05] [--epsilon 0] [--block 128]
                                         [--rule loss] [--threads 1] [--data test.npz]

Greedy CAR (``carfast.prune``, sequential, step 1) prunes the 9 block conv1s of the bundled ResNet-20 to 75 %
of their filters on 1,000 CIFAR-10 test images from ``--offset`` on, with ``search=carfast.Race(...)``, and
is compared with the exact search's run on the same images, read from experiments/selection_rule.py's
results (``selection_rule_<rule>[_o<offset>].json``; run that first for a split it lacks). Reported per split:
the share of steps (position by position in each layer's removal order) where the race removed what the
exact search removed, both pruned networks' top-1 on the 9,000 other test images (held out), and the
candidate-image evaluations and seconds of each. Rows are saved as they finish
(``experiments/results/race_agreement.json``) and a rerun skips those already there.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import carfast
from carfast.atomic import write_json_atomic
from carfast.pruning.evaluate import evaluate

REPO = Path(__file__).resolve().parent.parent
SHARED_TEST = REPO.parent / "shared" / "data" / "cifar10" / "test.npz"
RESULTS = REPO / "experiments" / "results"
N_SELECT, KEEP, DEPTH = 1000, 0.75, 20


def block_conv1s(model) -> list[str]:
    return [n for n, _ in model.named_modules() if n.startswith("layer") and n.endswith(".conv1")]


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


def exhaustive(removed: dict, model, n: int) -> int:
    """Candidate-image evaluations of the exact search: at each step every remaining filter on every image."""
    total = 0
    for layer, gone in removed.items():
        f = model.get_submodule(layer).out_channels
        total += sum(f - t for t in range(len(gone))) * n
    return total


def agreement(race: dict, exact: dict) -> tuple[int, int]:
    same = sum(a == b for layer in exact for a, b in zip(race[layer], exact[layer]))
    return same, sum(len(v) for v in exact.values())


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
        key = {"offset": offset, "rule": args.rule, **race.settings()}
        if any(r["key"] == key for r in saved["rows"]):
            continue
        exact = exact_row(args.rule, offset)
        lo, hi = offset, offset + N_SELECT
        select = (x[lo:hi], y[lo:hi])
        held = (torch.cat([x[:lo], x[hi:]]), torch.cat([y[:lo], y[hi:]]))
        model = carfast.models.cifar_resnet(DEPTH)
        t = time.perf_counter()
        res = carfast.prune(model, block_conv1s(model), select, keep=KEEP, rule=args.rule, search=race,
                            progress=False)
        seconds = time.perf_counter() - t
        same, steps = agreement(res.removed, exact["removed"])
        row = {"key": key, "steps": steps, "same_steps": same,
               "race": {"held_out_accuracy": evaluate(res.model, held).accuracy,
                        "selection_accuracy": evaluate(res.model, select).accuracy, "seconds": seconds,
                        "evaluations": sum(h["evaluations"] for h in res.history), "removed": res.removed},
               "exact": {"held_out_accuracy": exact["held_out_accuracy"],
                         "selection_accuracy": exact["selection_accuracy"], "seconds": exact["seconds"],
                         "evaluations": exhaustive(exact["removed"], model, N_SELECT)},
               "data": os.path.basename(args.data)}
        saved["rows"].append(row)
        write_json_atomic(args.out, saved)
        r, e = row["race"], row["exact"]
        print(f"offset {offset}: same choice in {same}/{steps} steps; held out race {100 * r['held_out_accuracy']:.2f} "
              f"% exact {100 * e['held_out_accuracy']:.2f} %; evaluations {r['evaluations'] / e['evaluations']:.3f} "
              f"of exact; {r['seconds']:.0f} s (exact on record {e['seconds']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
