"""How good is greedy pruning's time-left estimate? The demo's CAR run, estimate against what it took.

    python benchmarks/bench_eta.py [--demo resnet20|alexnet] [--threads 1] [--out FILE]

Runs the CAR pruning of ``carfast demo`` (the same network, layers, sizes, step and scoring images of
the bundled CIFAR-10 slice) and records, after every removal, the elapsed time and the estimate the
progress bar shows (``carfast/pruning/eta.py``: candidate evaluations left, weighted by each layer's
suffix MACs, at the measured seconds per unit). The run's end gives the true time left at each of those
moments. Beside it, from the same records, the old estimate (elapsed time scaled by the share of
removals left), so both are judged on one run. Reported: the ratio estimate / true time left at the
first removal (what a user sees first), at 10 %, 25 % and 50 % of the removals, and its worst over the
run (a ratio of 2 or 0.5 is "within 2x").
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
import carfast.pruning.loop as loop  # noqa: E402
from carfast.cli.demo import DEMOS, _network  # noqa: E402
from carfast.data import cifar10_test  # noqa: E402
from carfast.progress import Progress  # noqa: E402


class _Recording(Progress):
    """A progress bar that keeps (removals done, elapsed seconds, estimated seconds left) after each update."""
    records: list = []

    def update(self, n: int) -> None:
        super().update(n)
        left = self.estimate() if self.estimate is not None else None
        _Recording.records.append((self.done, time.perf_counter() - self.start, left))


def _ratios(records, total: int, end: float) -> list[dict]:
    rows = []
    for done, elapsed, left in records:
        if done >= total or end - elapsed <= 0:
            continue
        true = end - elapsed
        old = elapsed * (total - done) / done
        rows.append({"done": done, "elapsed_s": elapsed, "true_left_s": true, "estimate_s": left,
                     "estimate_ratio": None if left is None else left / true, "old_ratio": old / true})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", choices=sorted(DEMOS), default="resnet20")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="JSON file (default benchmarks/results/eta_<demo>.json)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    demo = DEMOS[args.demo]
    model, norm = _network(args.demo)
    x, y = cifar10_test(demo.n, normalization=norm)
    k = demo.split(demo.n)
    loop.Progress = _Recording
    t0 = time.perf_counter()
    result = carfast.prune(model, list(demo.layers), (x[:k], y[:k]), keep=dict(demo.layers), step=demo.step,
                           progress=False)
    end = time.perf_counter() - t0
    total = len(result.history)
    rows = _ratios(_Recording.records, total, _Recording.records[-1][1])
    env = environment()
    print(describe_environment(env))
    print(f"{args.demo} demo CAR run: {total} removals in {end:.1f} s ({k} scoring images, {args.threads} thread)")
    print(f"{'removals done':>14} {'elapsed':>8} {'true left':>10} {'estimate':>9} {'ratio':>6} {'old ratio':>9}")
    picks = {rows[0]["done"]} | {max(1, round(total * f)) for f in (0.1, 0.25, 0.5)}
    for r in rows:
        if r["done"] in picks:
            est = "-" if r["estimate_s"] is None else f"{r['estimate_s']:.1f}"
            ratio = "-" if r["estimate_ratio"] is None else f"{r['estimate_ratio']:.2f}"
            print(f"{r['done']:>14} {r['elapsed_s']:>8.1f} {r['true_left_s']:>10.1f} {est:>9} {ratio:>6} "
                  f"{r['old_ratio']:>9.2f}")
    ratios = [r["estimate_ratio"] for r in rows if r["estimate_ratio"] is not None]
    worst = max(ratios, key=lambda v: max(v, 1 / v))
    worst_old = max((r["old_ratio"] for r in rows), key=lambda v: max(v, 1 / v))
    print(f"worst ratio over the run: {worst:.2f} (old estimate {worst_old:.2f})")
    out = args.out or str(Path(__file__).resolve().parent / "results" / f"eta_{args.demo}.json")
    write_json_atomic(out, {"environment": env, "demo": args.demo, "threads": args.threads, "seconds": end,
                            "removals": total, "rows": rows, "worst_ratio": worst, "worst_old_ratio": worst_old})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
