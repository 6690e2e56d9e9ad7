"""Held-out top-1 of whole-network greedy runs, rebuilt from their checkpoints, on one range of test images.

    python experiments/held_out.py exact=experiments/results/whole_car-loss_ckpt.json \\
        race5000=experiments/results/whole_select5000/whole_car-loss-race_ckpt.json \\
        --images 5000:10000 [--data test.npz] [--out FILE]

Each ``NAME=CHECKPOINT`` is a finished ``carfast.prune`` checkpoint of the bundled ResNet-56
(experiments/whole_network.py writes them). Its removals are applied to a fresh pretrained ResNet-56 by
surgery (``carfast.remove_filters``), and the network is measured on test images ``--images`` (start:end):
runs that chose on different images are compared on images none of them chose on. Prints each run's
top-1 and, for every run after the first, the paired difference from the first (image by image, with its
standard error); ``--out`` keeps them as JSON with each image's correctness.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import carfast
from carfast.atomic import write_json_atomic

REPO = Path(__file__).resolve().parent.parent
SHARED_TEST = REPO.parent / "shared" / "data" / "cifar10" / "test.npz"


def rebuilt(checkpoint: Path) -> torch.nn.Module:
    """The pretrained ResNet-56 with the checkpoint's removals made (by original filter index)."""
    history = json.loads(checkpoint.read_text())["history"]
    removals: dict[str, list[int]] = {}
    for row in history:
        removals.setdefault(row["layer"], []).append(row["filter"])
    model = carfast.models.cifar_resnet(56)
    return carfast.remove_filters(model, removals, example=torch.zeros(2, 3, 32, 32))


def correct(model, x, y) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.eval()(a).argmax(1) == b for a, b in zip(x.split(500), y.split(500))])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="NAME=CHECKPOINT, the first is the one the others are compared with")
    ap.add_argument("--images", required=True, help="start:end of the CIFAR-10 test images to measure on")
    ap.add_argument("--data", default=str(SHARED_TEST) if SHARED_TEST.is_file() else None,
                    help="CIFAR-10 test .npz (default: ../shared/data/cifar10/test.npz)")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.data is None:
        ap.error("the full CIFAR-10 test set is needed: pass --data test.npz")
    start, end = (int(v) for v in args.images.split(":"))
    x, y = carfast.data.cifar10_test(path=args.data)
    if not 0 <= start < end <= len(y):
        ap.error(f"--images {args.images} is not a range of the {len(y)} test images")
    x, y = x[start:end], y[start:end]
    runs = dict(r.split("=", 1) for r in args.runs)
    right = {name: correct(rebuilt(Path(path)), x, y) for name, path in runs.items()}
    first = next(iter(right))
    out = {"images": [start, end], "runs": {}}
    for name, c in right.items():
        rec = {"checkpoint": runs[name], "top1": c.double().mean().item(),
               "correct": "".join("1" if v else "0" for v in c.tolist())}
        line = f"{name:12s} {100 * rec['top1']:.2f} %"
        if name != first:
            d = c.double() - right[first].double()
            rec["minus_first"], rec["se"] = d.mean().item(), (d.std() / len(d) ** 0.5).item()
            line += f"   minus {first}: {100 * rec['minus_first']:+.2f} +- {100 * rec['se']:.2f} points"
        out["runs"][name] = rec
        print(line)
    if args.out:
        write_json_atomic(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
