"""The raced search's saving: candidate-image evaluations against the exact search, and why it stratifies.

    python benchmarks/bench_race.py [--depth 20] [--layers layer1.0.conv1,layer2.0.conv1] [--keep 0.5]
                                    [--n 1000] [--data test.npz] [--threads 1] [--out FILE]

Greedy CAR (sequential, step 1, loss rule) prunes ``--layers`` of a bundled ResNet to ``--keep`` on the first
``--n`` CIFAR-10 test images three ways: the exact search, the race with a uniform image order
(``Race(strata=1)``) and the race as shipped (``Race()``: 16 strata by per-image loss, hard images first).
Recorded for each: the removals (and whether they equal the exact search's), candidate-image evaluations
as a share of the exact search's, and seconds (one run each, in one sitting). Before pruning, for each
layer: the share of the paired per-image loss differences' sum of squares (every candidate against the
best) carried by the 5 / 10 / 20 % of images with the highest loss: the concentration the strata use.
Evaluation counts do not depend on the machine's load; the seconds do.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import describe_environment, environment, write_json_atomic  # noqa: E402

import carfast  # noqa: E402
from carfast.data import cifar10_test  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHARED_TEST = REPO.parent / "shared" / "data" / "cifar10" / "test.npz"


def concentration(model, layer: str, data) -> dict:
    """{share of images: share of sum of squared paired loss differences} over the highest-loss images."""
    s = carfast.LayerScorer(model, layer, data, progress=False).score(image_loss=True)
    loss = s.image_loss
    best = int(s.loss_sum.argmin())
    sq = (loss - loss[best]).pow(2).sum(0)
    with torch.no_grad():
        base = torch.nn.functional.cross_entropy(model(data[0]).double(), data[1], reduction="none")
    order = base.argsort(descending=True)
    n = len(order)
    return {str(q): float(sq[order[:int(q * n)]].sum() / sq.sum()) for q in (0.05, 0.1, 0.2)}


def run(model, layers, data, keep, search) -> dict:
    t = time.perf_counter()
    res = carfast.prune(model, layers, data, keep=keep, search=search, progress=False)
    made, exact = res.work()
    return {"removed": res.removed, "evaluations": made, "exhaustive": exact, "share": made / exact,
            "seconds": time.perf_counter() - t}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=20, choices=carfast.models.bundled_resnet_depths())
    ap.add_argument("--layers", default="layer1.0.conv1,layer2.0.conv1")
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--data", default=str(SHARED_TEST) if SHARED_TEST.is_file() else None,
                    help="CIFAR-10 test .npz (default ../shared/data/cifar10/test.npz, else the bundled slice)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "race_resnet20.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = carfast.models.cifar_resnet(args.depth)
    data = cifar10_test(args.n, path=args.data)
    layers = args.layers.split(",")
    out = {"environment": environment(), "settings": vars(args),
           "concentration": {layer: concentration(model, layer, data) for layer in layers}, "runs": {}}
    for name, search in (("exact", "exact"), ("race, uniform order", carfast.Race(strata=1)),
                         ("race", carfast.Race())):
        out["runs"][name] = run(model, layers, data, args.keep, search)
        write_json_atomic(args.out, out)
    exact = out["runs"]["exact"]
    print(describe_environment(out["environment"]))
    for layer, c in out["concentration"].items():
        print(f"{layer}: the 5 / 10 / 20 % highest-loss images carry "
              + " / ".join(f"{100 * v:.0f} %" for v in c.values()) + " of the squared paired differences")
    print(f"{'search':<22} {'same removals':>13} {'evaluations':>12} {'seconds':>8}")
    for name, r in out["runs"].items():
        print(f"{name:<22} {str(r['removed'] == exact['removed']):>13} {100 * r['share']:>11.1f}% "
              f"{r['seconds']:>8.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
