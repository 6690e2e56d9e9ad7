"""``carfast layers``: list every Conv2d / Linear of a network and what carfast can do with it.

Prints, per layer, "layer" (``score_layer`` scores it alone), "group" (``score_group`` and ``prune``
take its coupling group: its channels are tied to the listed producers') or "refused" with the whole
reason, on one line. ``--input`` gives one input's shape when it cannot be inferred.
"""
from __future__ import annotations

import argparse

from carfast.cli.common import CliError, add_model_options, add_threads, build_model

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    p = sub.add_parser("layers", help="list every Conv2d / Linear and whether carfast scores it alone, as a "
                                      "group, or not (and why)",
                       description="List every Conv2d and Linear of a network with what carfast can do with it: "
                                   "score it alone (score_layer), score and prune its coupling group "
                                   "(score_group, naming the group's producers), or not, and why.")
    add_model_options(p)
    p.add_argument("--input", default=None, help="one input's shape, e.g. 3,224,224 (default: inferred)")
    p.add_argument("--json", default=None, help="also write the listing to this JSON file")
    p.add_argument("--all", action="store_true", help=argparse.SUPPRESS)   # reasons are always whole now
    add_threads(p)


def run(args) -> int:
    import torch

    import carfast
    from carfast.atomic import write_json_atomic

    model = build_model(args.model, args.weights)[0]
    example = None
    if args.input:
        try:
            shape = tuple(int(s) for s in args.input.split(","))
        except ValueError:
            raise CliError(f"--input {args.input!r}: give one input's shape as integers, e.g. 3,224,224") from None
        example = torch.zeros((1, *shape))
    infos = carfast.layers(model, example=example)
    width = max([len(i.name) for i in infos] + [5])
    print(f"{'layer':{width}s}  {'type':6s} {'filters':>7s}  status   detail")
    for i in infos:
        if i.status == "group":
            detail = f"{i.units} channels with {', '.join(i.group)}"
        elif i.status == "refused":
            detail = " ".join(i.reason.split(": ", 1)[-1].split())     # whole, on one line
        else:
            detail = ""
        print(f"{i.name:{width}s}  {i.type:6s} {i.filters:7d}  {i.status:7s}  {detail}")
    counts = {s: sum(i.status == s for i in infos) for s in ("layer", "group", "refused")}
    print(f"\n{len(infos)} layers: {counts['layer']} alone, {counts['group']} in coupling groups, "
          f"{counts['refused']} refused")
    if args.json:
        write_json_atomic(args.json, {"model": args.model, "layers": [i.to_dict() for i in infos]})
        print(f"wrote {args.json}")
    return 0
