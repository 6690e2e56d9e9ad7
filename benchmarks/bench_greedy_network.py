"""Benchmark whole-network greedy CAR: every block conv1 of a pretrained CIFAR ResNet, float32 against bf16.

    python benchmarks/bench_greedy_network.py [--depth 20] [--keep 0.75] [--n 1000] [--rule accuracy]
                                              [--threads 1] [--order reverse] [--out FILE]

The workload is ``carfast.prune`` (sequential, step 1, re-scored after every removal) over all the block
conv1s of the network, on the first ``--n`` CIFAR-10 test images. It runs twice, alternately timed in
the same process: ``precision="fp32"`` and ``precision="bf16"`` (the suffix in bf16, the pairs whose
top-1 margin is too small re-run in float32, ties in count settled by float32 loss sums), with a
counting rule (``--rule accuracy`` or ``lcb``: the loss rule needs float32). The two runs must make the
same removals with the same counts (``equal`` in the output). Per layer, the candidate evaluations the
naive greedy loop would make (one full network pass each) are counted and timed from a measured pass.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import default_data_path, describe_environment, environment, load_cifar10, write_json_atomic  # noqa: E402

import carfast  # noqa: E402
from carfast.pruning.evaluate import evaluate  # noqa: E402


def block_conv1s(model, order: str) -> list[str]:
    names = [n for n, _ in model.named_modules() if n.startswith("layer") and n.endswith(".conv1")]
    return names[::-1] if order == "reverse" else names


def run(model, layers, data, keep, rule, precision) -> dict:
    t = time.perf_counter()
    res = carfast.prune(model, layers, data, keep=keep, rule=rule, precision=precision, progress=False)
    seconds = time.perf_counter() - t
    per_layer = {}
    for r in res.history:
        per_layer[r["layer"]] = per_layer.get(r["layer"], 0.0) + r["seconds"]
    return {"seconds": seconds, "per_layer_seconds": per_layer,
            "removals": [(r["layer"], r["filter"], r["correct"]) for r in res.history],
            "candidates": sum(r["remaining"] + 1 for r in res.history)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=default_data_path(), help="CIFAR-10 test.npz (default: the shared copy)")
    p.add_argument("--depth", type=int, default=20, choices=carfast.models.bundled_resnet_depths())
    p.add_argument("--keep", type=float, default=0.75, help="share of each block conv1's filters KEPT")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--rule", default="accuracy", choices=("accuracy", "lcb"))
    p.add_argument("--order", default="forward", choices=("forward", "reverse"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="JSON results file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    x, y, source = load_cifar10(args.data, args.n)
    model = carfast.models.cifar_resnet(args.depth)
    layers = block_conv1s(model, args.order)
    env = environment()
    print(describe_environment(env), flush=True)
    print(source, flush=True)
    runs = {}
    for precision in ("fp32", "bf16"):
        runs[precision] = run(model, layers, (x, y), args.keep, args.rule, precision)
        print(f"{precision}: {runs[precision]['seconds']:.1f} s", flush=True)
    passes = []
    for _ in range(3):
        t = time.perf_counter()
        evaluate(model, (x, y))
        passes.append(time.perf_counter() - t)
    fp32, bf16 = runs["fp32"], runs["bf16"]
    out = {"environment": env, "data": source, "settings": vars(args), "layers": layers, "runs": runs,
           "equal": fp32["removals"] == bf16["removals"], "speedup_bf16": fp32["seconds"] / bf16["seconds"],
           "naive_pass_seconds": statistics.median(passes),
           "naive_seconds_upper": fp32["candidates"] * statistics.median(passes)}
    print(f"ResNet-{args.depth}, {len(layers)} block conv1s kept {args.keep:.0%}, {args.n} images, rule {args.rule}: "
          f"fp32 {fp32['seconds']:.1f} s, bf16 {bf16['seconds']:.1f} s ({out['speedup_bf16']:.2f}x), same removals: "
          f"{out['equal']}; naive greedy (unpruned pass {out['naive_pass_seconds']:.2f} s x {fp32['candidates']} "
          f"candidate passes): <= {out['naive_seconds_upper']:.0f} s")
    if args.out:
        write_json_atomic(args.out, out)
    return 0 if out["equal"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
