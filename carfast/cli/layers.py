"""``carfast layers``: list every Conv2d / Linear of a network and what carfast can do with it.

    carfast layers [--model resnet20|resnet56|alexnet|package.module:factory] [--weights PATH]
                   [--input 3,32,32] [--json out.json] [--all]

A ``package.module:factory`` model is built by calling ``factory()`` (importable from the current
directory); ``--input`` gives one image's shape when it cannot be inferred. Prints, per layer, "layer"
(``score_layer`` scores it alone), "group" (``score_group``: its channels are tied to the listed
producers') or "refused" with the reason (``--all`` prints whole reasons).
"""
from __future__ import annotations

import importlib
import os
import sys

__all__ = ["add_parser", "run"]


def add_parser(sub, models, parser_error) -> None:
    p = sub.add_parser("layers", help="list every Conv2d / Linear and whether carfast scores it alone, as a "
                                      "group, or not (and why)",
                       description="List every Conv2d and Linear of a network with what carfast can do with it: "
                                   "score it alone (score_layer), score its coupling group (score_group, naming "
                                   "the group's producers), or not, and why.")
    p.add_argument("--model", default="resnet20",
                   help=f"{' / '.join(models)} (bundled), or package.module:factory for your own network")
    p.add_argument("--weights", default=None, help="a checkpoint to load (state dict)")
    p.add_argument("--input", default=None, help="one input's shape, e.g. 3,224,224 (default: inferred)")
    p.add_argument("--json", default=None, help="also write the listing to this JSON file")
    p.add_argument("--all", action="store_true", help="print whole reasons, not the first line")
    p.add_argument("--threads", type=int, default=None, help="torch threads")


def _user_model(spec: str, weights: str | None):
    mod_name, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"--model {spec!r}: not a bundled model; give package.module:factory (a callable that "
                         "returns the network)")
    sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"--model {spec!r}: cannot import it ({err})") from err
    model = factory()
    if weights is not None:
        import torch
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
    return model.eval()


def run(args, build_model) -> int:
    import torch

    import carfast
    from carfast.atomic import write_json_atomic

    model = build_model(args.model, args.weights)[0] if ":" not in args.model else \
        _user_model(args.model, args.weights)
    example = None
    if args.input:
        try:
            shape = tuple(int(s) for s in args.input.split(","))
        except ValueError as err:
            raise ValueError(f"--input {args.input!r}: give one input's shape as integers, e.g. 3,224,224") from err
        example = torch.zeros((1, *shape))
    infos = carfast.layers(model, example=example)
    width = max([len(i.name) for i in infos] + [5])
    print(f"{'layer':{width}s}  {'type':6s} {'filters':>7s}  status   detail")
    for i in infos:
        if i.status == "group":
            detail = f"{i.units} channels with {', '.join(i.group)}"
        elif i.status == "refused":
            detail = i.reason.split(": ", 1)[-1]
            detail = detail if args.all else detail[:110]
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
