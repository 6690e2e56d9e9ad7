"""Benchmark greedy CAR pruning against the naive greedy loop, and the pruned network's CPU latency.

    python benchmarks/bench_prune.py [--n 5000] [--layer layer3.8.conv1] [--keep 32] [--out FILE]

Greedy (pretrained ResNet-56, ``--n`` CIFAR-10 test images, ``--layer`` from K filters to ``--keep``):

* carfast  ``carfast.prune(model, layer, (x, y), keep=...)`` end to end: prefix pass, one CAR scoring of
           the remaining filters per removal with the cached state updated in place, final surgery.
* naive    the tests' naive greedy loop (``tests/naive.py``): at every step, one full forward pass of
           the network over all images per remaining candidate (the filters removed so far and the
           candidate zeroed at the consumer's input), then the argmin. Its cost is exactly
           sum_{t=0}^{K-keep-1} (K - t) candidate passes plus nothing else worth counting, so it is timed
           on ``--naive-candidates`` candidate passes of the loop's second step (after carfast's first
           removal) and the median pass time is multiplied by that count. The same passes check carfast:
           the naive correct count of carfast's second removal must equal carfast's history.

Surgery: the original ResNet-56 against a copy with half of every block's first conv removed (the
filters with the smallest L1 norm; the latency does not depend on which), median forward latency at
batch 1 and batch 256 (``carfast.surgery.measure.latency``), the two models timed alternately.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the naive reference

from common import default_data_path, describe_environment, environment, load_cifar10, write_json_atomic  # noqa: E402
from naive import naive_logits  # noqa: E402

import carfast  # noqa: E402
from carfast.criteria import l1_norm  # noqa: E402
from carfast.surgery.measure import count_macs, count_params, latency  # noqa: E402


def bench_greedy(model, layer, x, y, keep, naive_candidates) -> dict:
    consumer = layer.rsplit(".", 1)[0] + ".conv2"
    num = model.get_submodule(layer).out_channels
    t0 = time.perf_counter()
    result = carfast.prune(model, layer, (x, y), keep=keep, progress=False)
    t_carfast = time.perf_counter() - t0
    first, second = result.history[0], result.history[1]
    # naive: time candidate passes of step 2, including carfast's pick (checked against carfast's count)
    others = [k for k in range(num) if k not in (first["filter"], second["filter"])]
    cands = [second["filter"]] + others[:max(0, naive_candidates - 1)]
    times, naive_correct = [], None
    for k in cands:
        t1 = time.perf_counter()
        logits = naive_logits(model, {consumer: 1}, x, k, batch_size=256, removed=[first["filter"]])
        times.append(time.perf_counter() - t1)
        if k == second["filter"]:
            naive_correct = int((logits.argmax(1) == y).sum())
    passes = sum(num - t for t in range(num - keep))
    t_pass = statistics.median(times)
    t_naive = t_pass * passes
    return {
        "layer": layer, "filters": num, "keep": keep, "num_images": len(y),
        "carfast_s": t_carfast, "carfast_iterations_s": [r["seconds"] for r in result.history],
        "naive_pass_times_s": times, "naive_pass_median_s": t_pass, "naive_passes": passes, "naive_s": t_naive,
        "speedup": t_naive / t_carfast, "target_speedup": 50.0,
        "check_second_removal": {"filter": second["filter"], "carfast_correct": second["correct"],
                                 "naive_correct": naive_correct, "equal": naive_correct == second["correct"]},
        "removed": result.removed[layer], "accuracy_after": result.history[-1]["accuracy"],
        "base_accuracy": result.base["accuracy"],
    }


def bench_surgery(model, x) -> dict:
    layers = [n for n, _ in model.named_modules() if n.endswith(".conv1") and n.startswith("layer")]
    removals = {n: torch.argsort(l1_norm(model, n), stable=True)[:model.get_submodule(n).out_channels // 2].tolist()
                for n in layers}
    pruned = carfast.remove_filters(model, removals, example=x[:1])
    out = {"removed": "half of every block's conv1 (smallest L1)", "layers": len(layers)}
    cl = torch.channels_last
    models = {"original": (model, None), "pruned": (pruned, None),
              "original_cl": (copy.deepcopy(model).to(memory_format=cl), cl),
              "pruned_cl": (copy.deepcopy(pruned).to(memory_format=cl), cl)}
    for name, (m, _) in models.items():
        out[name] = {"params": count_params(m), "macs": count_macs(m, x[:1])}
    # latency: the models alternate, one timed forward each per round, so a change of machine load
    # between them (this machine is shared) affects all alike; medians over the rounds. "_cl": the model
    # and input in channels_last, the layout oneDNN is fastest in on CPU
    for key, batch, rounds in (("latency_b1_s", x[:1], 60), ("latency_b256_s", x[:256], 9)):
        inputs = {fmt: batch if fmt is None else batch.contiguous(memory_format=fmt) for fmt in (None, cl)}
        for m, fmt in models.values():
            latency(m, inputs[fmt], repeats=1, warmup=2)
        times = {name: [] for name in models}
        for _ in range(rounds):
            for name, (m, fmt) in models.items():
                times[name].append(latency(m, inputs[fmt], repeats=1, warmup=0))
        for name in models:
            out[name][key] = statistics.median(times[name])
            out[name][key.replace("_s", "_times_s")] = times[name]
    for key in ("params", "macs", "latency_b1_s", "latency_b256_s"):
        out[f"{key}_ratio"] = out["original"][key] / out["pruned"][key]
        out[f"{key}_ratio_cl"] = out["original_cl"][key] / out["pruned_cl"][key]
    return out   # that the pruned network computes what the masked one does is tested in tests/test_surgery.py


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=default_data_path(), help="CIFAR-10 test.npz (default: the shared copy)")
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--layer", default="layer3.8.conv1")
    p.add_argument("--keep", type=int, default=32)
    p.add_argument("--naive-candidates", type=int, default=4)
    p.add_argument("--skip-greedy", action="store_true")
    p.add_argument("--skip-surgery", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--out", default=None, help="JSON results file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment("cpu")
    print(describe_environment(env))
    model = carfast.models.cifar_resnet(56)
    x, y, src = load_cifar10(args.data, args.n)
    print(f"data: {src}")
    results = {"environment": env, "data": src}
    if not args.skip_greedy:
        g = bench_greedy(model, args.layer, x, y, args.keep, args.naive_candidates)
        results["greedy"] = g
        print(f"greedy {g['layer']} {g['filters']} -> {g['keep']} filters on {g['num_images']} images:")
        per_iteration = statistics.median(g["carfast_iterations_s"])
        print(f"  carfast  {g['carfast_s']:8.1f} s  (iterations: median {per_iteration:.2f} s)")
        print(f"  naive    {g['naive_s']:8.1f} s  = {g['naive_passes']} passes x {g['naive_pass_median_s']:.2f} s "
              f"(median of {len(g['naive_pass_times_s'])} timed)")
        print(f"  speedup  {g['speedup']:8.1f}x  (target {g['target_speedup']:.0f}x); naive check of the 2nd removal: "
              f"{'equal' if g['check_second_removal']['equal'] else 'MISMATCH'}")
    if not args.skip_surgery:
        s = bench_surgery(model, x)
        results["surgery"] = s
        print(f"surgery ({s['removed']}): params {s['params_ratio']:.2f}x fewer, MACs {s['macs_ratio']:.2f}x fewer")
        for suffix, label in (("", "NCHW"), ("_cl", "channels_last")):
            o, q = s["original" + suffix], s["pruned" + suffix]
            print(f"  latency {label:>13}: batch 1 {o['latency_b1_s'] * 1e3:.2f} -> {q['latency_b1_s'] * 1e3:.2f} ms "
                  f"({s['latency_b1_s_ratio' + suffix]:.2f}x), batch 256 {o['latency_b256_s'] * 1e3:.0f} -> "
                  f"{q['latency_b256_s'] * 1e3:.0f} ms ({s['latency_b256_s_ratio' + suffix]:.2f}x)")
    if args.out:
        write_json_atomic(args.out, results)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
