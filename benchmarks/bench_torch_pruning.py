"""CAR inside Torch-Pruning against Torch-Pruning's MagnitudeImportance, on a pretrained CIFAR ResNet.

    python benchmarks/bench_torch_pruning.py [--depth 56] [--n-score 500] [--ratio 0.3] [--steps 3] [--global]
                                            [--blocks-only] [--precision bf16] [--threads N]
                                            [--variants magnitude,magnitude-l1,car,car-single,car-loss]
                                            [--data test.npz] [--out FILE]

Variants: "car" is ``CARImportance`` as shipped (greedy CAR inside each group, bound to the pruner so the
greedy runs as far as each step needs), "car-single" each channel's own CAR (``greedy=False``),
"car-loss" the loss increase alone (single), "magnitude" / "magnitude-l1" ``MagnitudeImportance(p=2 / 1)``.
All runs prune the same pretrained ResNet with ``tp.pruner.BasePruner`` (``ignored_layers=[linear]``,
``customized_pruners=channel_map_pruners(model)`` so the option-A shortcuts are pruned as carfast's
per-stage groups), the same ``pruning_ratio`` and ``iterative_steps``; per-layer pruning (the default)
gives both the same architecture and MACs, so only which channels go differs. ``--blocks-only`` prunes
only the blocks' first convs (the residual streams keep every channel), as the CAR paper prunes. CAR scores on the first
``--n-score`` CIFAR-10 test images; the accuracy that counts is on the other (held-out) test images,
before any fine-tuning. Prints a table and writes JSON (default ``benchmarks/results/torch_pruning.json``).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import default_data_path, describe_environment, environment, load_cifar10, write_json_atomic  # noqa: E402

import carfast  # noqa: E402

try:
    import torch_pruning as tp  # noqa: E402

    from carfast.integrations.torch_pruning import CARImportance, channel_map_pruners  # noqa: E402
except ImportError as err:
    sys.exit(f"bench_torch_pruning: {err}")


def accuracy(model, x, y, batch: int = 500) -> float:
    with torch.no_grad():
        hits = sum(int((model(x[s:s + batch]).argmax(1) == y[s:s + batch]).sum()) for s in range(0, len(y), batch))
    return hits / len(y)


def run(name, importance, args, score, held) -> dict:
    model = carfast.models.cifar_resnet(args.depth)
    example = torch.zeros(1, 3, 32, 32)
    macs0, params0 = tp.utils.count_ops_and_params(model, example)
    ignored = [model.linear]
    if args.blocks_only:     # the residual streams stay whole: only each block's conv1 loses channels
        ignored += [model.conv1] + [m for n, m in model.named_modules() if n.endswith(".conv2")]
    pruner = tp.pruner.BasePruner(model, example, importance, pruning_ratio=args.ratio, iterative_steps=args.steps,
                                  global_pruning=args.global_pruning, ignored_layers=ignored,
                                  customized_pruners=channel_map_pruners(model))
    if isinstance(importance, CARImportance):
        importance.bind(pruner)
    steps = []
    t0 = time.perf_counter()
    for s in range(args.steps):
        t1 = time.perf_counter()
        pruner.step()
        macs, params = tp.utils.count_ops_and_params(model, example)
        steps.append({"step": s + 1, "seconds": time.perf_counter() - t1, "macs_ratio": macs0 / macs,
                      "params_ratio": params0 / params, "score_accuracy": accuracy(model, *score)})
        print(f"  {name} step {s + 1}: {steps[-1]['seconds']:.0f} s, {macs0 / macs:.2f}x fewer MACs, "
              f"scoring-set accuracy {100 * steps[-1]['score_accuracy']:.2f} %", flush=True)
    macs, params = tp.utils.count_ops_and_params(model, example)
    return {"importance": name, "seconds": time.perf_counter() - t0, "macs": macs, "params": params,
            "macs_ratio": macs0 / macs, "params_ratio": params0 / params, "steps": steps,
            "score_accuracy": accuracy(model, *score), "held_out_accuracy": accuracy(model, *held),
            "widths": {n: m.out_channels for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=56, choices=carfast.models.bundled_resnet_depths(),
                    help="the bundled pretrained CIFAR ResNet to prune")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--n-score", type=int, default=500, help="test images CAR scores on (the first ones)")
    ap.add_argument("--ratio", type=float, default=0.3, help="Torch-Pruning pruning_ratio (0.3: about 2x MACs)")
    ap.add_argument("--steps", type=int, default=3, help="iterative_steps (CAR re-scores at each)")
    ap.add_argument("--global", dest="global_pruning", action="store_true", help="global pruning")
    ap.add_argument("--blocks-only", action="store_true", help="prune only the blocks' first convs (ignore the "
                    "stem and every conv2, so the residual-stream groups keep their channels)")
    ap.add_argument("--precision", default="fp32", help="CAR's score_layer precision (groups: fp32; greedy CAR's "
                                                        "default loss rule needs fp32)")
    ap.add_argument("--variants", default="magnitude,magnitude-l1,car", help="comma-separated: magnitude, "
                    "magnitude-l1, car (greedy), car-single, car-loss (single, ranked by the loss increase)")
    ap.add_argument("--data", default=default_data_path(), help="CIFAR-10 test .npz (default: ../shared)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "torch_pruning.json"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    x, y, src = load_cifar10(args.data, None)
    if args.n_score >= len(y):
        sys.exit(f"bench_torch_pruning: --n-score {args.n_score} leaves no held-out images of {len(y)}")
    score, held = (x[:args.n_score], y[:args.n_score]), (x[args.n_score:], y[args.n_score:])
    env = environment()
    print(describe_environment(env))
    print(f"data: {src}; CAR scores on {len(score[1])}, held out {len(held[1])}")
    base = carfast.models.cifar_resnet(args.depth)
    rows = [{"importance": "unpruned", "held_out_accuracy": accuracy(base, *held),
             "score_accuracy": accuracy(base, *score), "macs_ratio": 1.0, "params_ratio": 1.0, "seconds": 0.0}]
    variants = {"magnitude": lambda: ("magnitude (L2)", tp.importance.MagnitudeImportance(p=2)),
                "magnitude-l1": lambda: ("magnitude (L1)", tp.importance.MagnitudeImportance(p=1)),
                "car": lambda: ("CAR, greedy", CARImportance(score, precision=args.precision)),
                "car-single": lambda: ("CAR, single", CARImportance(score, greedy=False, precision=args.precision)),
                "car-loss": lambda: ("CAR, loss", CARImportance(score, greedy=False, rank_by="loss",
                                                                precision=args.precision))}
    for v in args.variants.split(","):
        if v not in variants:
            sys.exit(f"bench_torch_pruning: unknown variant {v!r}; choose from {sorted(variants)}")
        rows.append(run(*variants[v](), args, score, held))
    print(f"\n{'importance':<16} {'MACs':>7} {'params':>7} {'scoring acc':>11} {'held-out acc':>12} {'time':>8}")
    for r in rows:
        print(f"{r['importance']:<16} {r['macs_ratio']:>6.2f}x {r['params_ratio']:>6.2f}x "
              f"{100 * r['score_accuracy']:>10.2f}% {100 * r['held_out_accuracy']:>11.2f}% {r['seconds']:>7.0f}s")
    write_json_atomic(args.out, {"environment": env, "data": src, "args": vars(args), "rows": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
