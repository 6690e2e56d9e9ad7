"""``carfast demo``: greedy CAR pruning of three block convs of the bundled ResNet-20, with a report.

Scored on the first half of the bundled 2,000-image CIFAR-10 slice, held-out accuracy on the second
half; the report goes into a new folder (``./carfast-demo-YYYYmmdd-HHMMSS``). It took 106 s on the
2-core development machine while two other processes kept both cores busy.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import time

from carfast.cli.common import CliError, add_threads, plain_norm, positive_int

__all__ = ["add_parser", "run", "DEMO_LAYERS"]

DEMO_LAYERS = {"layer1.2.conv1": 12, "layer2.2.conv1": 24, "layer3.2.conv1": 32}
_QUICK_LAYERS = {"layer3.2.conv1": 60}


def add_parser(sub) -> None:
    d = sub.add_parser("demo", help="prune the bundled ResNet-20 by greedy CAR and write a report (about 2 min)",
                       description="Greedy CAR pruning of three block convs of the bundled ResNet-20 "
                                   f"({', '.join(f'{k} to {v}' for k, v in DEMO_LAYERS.items())} filters), "
                                   "scored on the first half of the bundled CIFAR-10 slice, held-out accuracy "
                                   "on the second half; prints the summary and writes the report.")
    d.add_argument("--out", default=None, help="report folder (default: a new ./carfast-demo-YYYYmmdd-HHMMSS)")
    d.add_argument("--n", type=positive_int, default=None,
                   help="images of the bundled slice to use, half to score, half held out (default 2000)")
    add_threads(d)
    d.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)   # tests: one layer, 40 images


def _new_folder(base: str) -> str:
    path, k = base, 1
    while os.path.exists(path):
        k += 1
        path = f"{base}-{k}"
    os.makedirs(path)
    return path


def run(args) -> int:
    import carfast
    from carfast.data import cifar10_classes, cifar10_test
    from carfast.models import CIFAR_RESNET_NORMALIZATION, cifar_resnet
    from carfast.report import write_report

    t0 = time.perf_counter()
    layers = _QUICK_LAYERS if args.quick else DEMO_LAYERS
    n = args.n if args.n is not None else (40 if args.quick else 2000)
    if n < 2:
        raise CliError(f"--n {n}: the demo needs at least 2 images (half to score, half held out)")
    out = os.path.abspath(args.out) if args.out else \
        _new_folder(os.path.abspath(f"carfast-demo-{datetime.datetime.now():%Y%m%d-%H%M%S}"))
    model = cifar_resnet(20)
    x, y = cifar10_test(n)
    half = n // 2
    score, heldout = (x[:half], y[:half]), (x[half:], y[half:])
    print(f"carfast demo: greedy CAR pruning of the bundled pretrained ResNet-20, scored on {half:,} CIFAR-10 "
          f"test images, held-out accuracy on the other {n - half:,}")
    for layer, keep in layers.items():
        print(f"  {layer}: {model.get_submodule(layer).out_channels} -> {keep} filters")
    result = carfast.prune(model, list(layers), score, keep=dict(layers), progress=None)
    result.settings["cli_model"] = {"model": "resnet20", "weights": None, "data": None, "n": half,
                                    "normalization": plain_norm(CIFAR_RESNET_NORMALIZATION)}
    result.save(os.path.join(out, "result.pt"))
    index = write_report(result, out, original=model, heldout=heldout, class_names=cifar10_classes(),
                         title="carfast demo: greedy CAR pruning of ResNet-20 on CIFAR-10",
                         input_std=CIFAR_RESNET_NORMALIZATION[1])
    with open(os.path.join(out, "summary.json")) as f:
        held = json.load(f)["heldout"]
    print()
    print(result.summary())
    print(f"held-out top-1 % ({held['num_images']:,} images)  {100 * held['accuracy_before']:.2f} -> "
          f"{100 * held['accuracy_after']:.2f}  ({100 * (held['accuracy_after'] - held['accuracy_before']):+.2f} "
          "pts)")
    print(f"\nreport: {index}\nresult: {os.path.join(out, 'result.pt')}  "
          f"(demo took {time.perf_counter() - t0:.0f} s)")
    return 0
