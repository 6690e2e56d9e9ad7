"""``carfast prune``: greedy CAR (or baseline) pruning of layers and coupling groups; saves the result.

The saved ``PruneResult`` records in ``settings["cli_model"]`` how to rebuild the original network and
its data (``--model``, ``--weights``, ``--data``, the number of images, the input normalisation), so
``carfast report`` can time the original, picture the removed first-layer filters and measure held-out
accuracy on the images after the scored ones.
"""
from __future__ import annotations

import os

from carfast.cli.common import (
    CliError,
    add_compute_options,
    add_data_options,
    add_model_options,
    add_threads,
    build_model,
    check_layers,
    keep_value,
    load_data,
    plain_norm,
    positive_int,
)

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    from carfast.criteria import CRITERIA
    r = sub.add_parser("prune", help="greedy CAR (or baseline) pruning of layers and groups; saves the result",
                       description="Remove filters greedily (the least important by CAR, re-scored after each "
                                   "removal) until --keep remain, print the summary table and save the pruned "
                                   "model with the run's record to --out (see carfast report). A layer whose "
                                   "channels are coupled with other layers' (a ResNet's stem or a block's "
                                   "second conv: the residual stream) prunes its whole coupling group.")
    add_model_options(r, required=True)
    r.add_argument("--layer", action="append", required=True,
                   help="layer to prune (repeatable; carfast layers --model M lists them); a coupled layer "
                        "means its coupling group")
    r.add_argument("--keep", type=keep_value, required=True,
                   help="filters (a group's channels) to keep per layer: a count (14) or a fraction (0.5)")
    r.add_argument("--step", type=positive_int, default=1, help="filters removed per scoring (default 1)")
    r.add_argument("--schedule", choices=("sequential", "global"), default="sequential",
                   help="sequential: layer after layer (default); global: best filter of any layer each step")
    r.add_argument("--criterion", choices=("car", *CRITERIA), default="car", help="importance criterion (default car)")
    r.add_argument("--n", type=positive_int, default=None, help="number of scoring images (default all)")
    add_data_options(r, "the images to score on")
    r.add_argument("--checkpoint", default=None, help="JSON file written after every removal; resumes if present")
    r.add_argument("--max-accuracy-drop", type=float, default=None,
                   help="stop a layer before accuracy falls more than this below the original (fraction: 0.02 = "
                        "2 points)")
    add_compute_options(r)
    r.add_argument("--out", required=True, help="file to save the PruneResult to (e.g. result.pt)")
    add_threads(r)


def run(args) -> int:
    import carfast

    if os.path.isdir(args.out):
        raise CliError(f"--out {args.out} is a folder; pass a file name such as result.pt")
    model, norm = build_model(args.model, args.weights)
    check_layers(model, args.layer, args.model)
    x, y, _, norm = load_data(args.data, args.normalize, norm, need=args.n)
    x, y = x[:args.n], y[:args.n]
    result = carfast.prune(model, args.layer, (x, y), keep=args.keep, step=args.step, schedule=args.schedule,
                           criterion=args.criterion, max_accuracy_drop=args.max_accuracy_drop,
                           checkpoint=args.checkpoint, progress=None, backend=args.backend,
                           precision=args.precision, device=args.device)
    result.settings["cli_model"] = {
        "model": args.model, "weights": None if args.weights is None else os.path.abspath(args.weights),
        "data": None if args.data is None else os.path.abspath(args.data), "n": int(len(y)),
        "normalization": plain_norm(norm)}
    print(result.summary())
    seconds = sum(r["seconds"] for r in result.history)
    print(f"\n{len(result.history)} removals in {seconds:.1f} s")
    result.save(args.out)
    print(f"wrote {args.out}  (carfast report {args.out} writes the report)")
    return 0
