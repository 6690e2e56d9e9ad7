"""``carfast score``: CAR scores of every filter of one or more layers (or of their coupling groups)."""
from __future__ import annotations

from carfast.cli import common

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    s = sub.add_parser("score", help="score every filter of a layer by CAR and print a table",
                       description="Score the filters of one or more layers by CAR (accuracy lost when the "
                                   "filter is removed) and print them, least important first.")
    common.add_model_options(s)
    s.add_argument("--layer", action="append", default=None,
                   help="layer to score (repeatable; default layer1.0.conv1; carfast layers lists them)")
    s.add_argument("--n", type=common.positive_int, default=None, help="number of images (default all)")
    common.add_data_options(s)
    s.add_argument("--filters", type=int, nargs="+", default=None, help="score only these filters")
    common.add_compute_options(s)
    s.add_argument("--top", type=int, default=None, help="print only the first TOP rows of each table")
    s.add_argument("--json", default=None, help="also write the scores to this JSON file")
    s.add_argument("--group", action="store_true",
                   help="score the coupling group of each --layer (its residual stream's channels: score_group)")
    common.add_threads(s)


def run(args) -> int:
    import carfast
    from carfast.atomic import write_json_atomic

    model, norm = common.build_model(args.model, args.weights)
    layers = args.layer or ["layer1.0.conv1"]
    common.check_layers(model, layers, args.model)
    x, y, _, _ = common.load_data(args.data, args.normalize, norm, need=args.n, model=common.user_spec(args.model))
    x, y = x[:args.n], y[:args.n]
    results = []
    for layer in layers:
        target = carfast.Group(layer) if args.group else layer
        res = carfast.score_layer(model, target, (x, y), filters=args.filters, progress=None,
                                  **common.score_options(args))
        print(res.table(top=args.top))
        if args.group:
            print(f"  group of {len(res.members)} members: producers "
                  f"{', '.join(m['layer'] for m in res.members if m['role'] == 'output')}")
        print(f"  {res.pairs_evaluated:,} (filter, image) pairs evaluated, {res.pairs_skipped:,} skipped "
              f"(filter all zero), {res.seconds:.1f} s")
        if res.precision != "fp32":
            print(f"  {res.precision}: {res.pairs_rechecked:,} pairs re-run in float32 (top-{res.topk} margin at most "
                  f"{res.margin_threshold:.3g})")
        print()
        results.append(res.to_dict())
    if args.json:
        write_json_atomic(args.json, {"model": args.model, "num_images": len(y), "layers": results})
        print(f"wrote {args.json}")
    return 0
