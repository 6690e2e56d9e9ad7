"""The ``carfast`` command.

    carfast score [--model resnet20] [--layer layer1.0.conv1] [--n 2000] [--data test.npz] [--json out.json]
    carfast --version        (also lists the backends found)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

__all__ = ["main"]

_MODELS = ("resnet20", "resnet56")


def _version_text() -> str:
    import carfast
    lines = [f"carfast {carfast.__version__}"]
    for b in carfast.backends():
        lines.append(f"  {b['name']:<7} {'yes' if b['available'] else 'no ':<4} {b['reason']}")
    return "\n".join(lines)


def _write_json_atomic(path: str, obj) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".carfast-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _cmd_score(args) -> int:
    import carfast
    from carfast.data import cifar10_test
    from carfast.models import cifar_resnet

    if args.data is not None and not os.path.isfile(args.data):
        raise ValueError(f"--data {args.data}: no such file; pass a CIFAR-10 test.npz or leave it out for the "
                         "bundled 2,000-image slice")
    model = cifar_resnet(int(args.model.removeprefix("resnet")), weights=args.weights)
    x, y = cifar10_test(n=args.n, path=args.data)
    results = []
    for layer in args.layer:
        res = carfast.score_layer(model, layer, (x, y), backend=args.backend, filters=args.filters,
                                  memory_budget=args.memory_budget, progress=None)
        print(res.table(top=args.top))
        print(f"  {res.pairs_evaluated:,} (filter, image) pairs evaluated, {res.pairs_skipped:,} skipped "
              f"(filter all zero), {res.seconds:.1f} s\n")
        results.append(res.to_dict())
    if args.json:
        _write_json_atomic(args.json, {"model": args.model, "num_images": len(y), "layers": results})
        print(f"wrote {args.json}")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="carfast", description="Exact, fast CAR filter scoring for CNNs.")
    p.add_argument("--version", action="store_true", help="print the version and the backends found")
    sub = p.add_subparsers(dest="command")
    s = sub.add_parser("score", help="score every filter of a layer by CAR and print a table",
                       description="Score the filters of one or more layers by CAR (accuracy lost when the "
                                   "filter is removed) on CIFAR-10 and print them, least important first.")
    s.add_argument("--model", choices=_MODELS, default="resnet20",
                   help="bundled pretrained CIFAR-10 network (default resnet20)")
    s.add_argument("--weights", default=None, help="an original ResNet checkpoint to load instead of the bundled one")
    s.add_argument("--layer", action="append", default=None,
                   help="layer to score (repeatable; default layer1.0.conv1)")
    s.add_argument("--n", type=int, default=None, help="number of images (default all)")
    s.add_argument("--data", default=None, help="CIFAR-10 test.npz (default: the bundled 2,000-image slice)")
    s.add_argument("--filters", type=int, nargs="+", default=None, help="score only these filters")
    s.add_argument("--backend", default="auto", choices=("auto", "torch", "cpu", "triton", "cuda"))
    s.add_argument("--memory-budget", type=float, default=None, help="bytes for cached activations and work")
    s.add_argument("--top", type=int, default=None, help="print only the first TOP rows of each table")
    s.add_argument("--json", default=None, help="also write the scores to this JSON file")
    return p


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.version:
        print(_version_text())
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "score":
        args.layer = args.layer or ["layer1.0.conv1"]
        try:
            return _cmd_score(args)
        except (ValueError, TypeError, FileNotFoundError) as err:
            print(f"carfast score: error: {err}", file=sys.stderr)
            return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
