"""``carfast demo``: greedy CAR pruning of a bundled network beside two baselines, with a report.

``--model resnet20`` (default): three block convs of the bundled ResNet-20. ``--model alexnet``: the
bundled AlexNet-style network's first conv (the RGB filters, to half, as in the CAR paper; the report
shows them as pictures) and its fourth (``features.11``, 256 -> 224 filters), removing 4 filters per
scoring. The filters are chosen on the first images of the bundled 2,000-image CIFAR-10 slice (half of
them for ResNet-20, a quarter for AlexNet, whose first layer is slow to score: every removal is
evaluated through the rest of the network) and every accuracy that matters is measured on the rest,
held out. The same layers are then pruned to the same sizes by the L1
norm of the weights and at random (seed 0), which need no CAR scoring, and the three are compared
(``carfast.compare_criteria``): printed as a table and drawn in the report (a new folder
``./carfast-demo-YYYYmmdd-HHMMSS`` unless ``--out``). Every number comes from the run.
"""
from __future__ import annotations

import argparse
import datetime
import os
import time
from dataclasses import dataclass

from carfast.cli.common import CliError, add_threads, plain_norm, positive_int

__all__ = ["add_parser", "run", "DEMOS", "DEMO_LAYERS"]

BASELINES = ("l1", "random")


@dataclass(frozen=True)
class Demo:
    """What the demo prunes: {layer: filters kept}, the greedy step, the images used and the share scored."""
    title: str
    layers: dict
    step: int = 1
    n: int = 2000
    score_share: float = 0.5

    def split(self, n: int) -> int:
        """Images to score on, of ``n`` (at least one scored and one held out)."""
        return min(n - 1, max(1, round(n * self.score_share)))


DEMOS = {
    "resnet20": Demo("the bundled pretrained ResNet-20", {"layer1.2.conv1": 12, "layer2.2.conv1": 24,
                                                          "layer3.2.conv1": 32}),
    "alexnet": Demo("the bundled AlexNet-style CIFAR-10 network", {"features.0": 32, "features.11": 224}, step=4,
                    score_share=0.25),
}
_QUICK = {"resnet20": Demo(DEMOS["resnet20"].title, {"layer3.2.conv1": 60}, n=40),
          "alexnet": Demo(DEMOS["alexnet"].title, {"features.0": 60, "features.11": 252}, step=2, n=40)}
DEMO_LAYERS = DEMOS["resnet20"].layers


def _describe(demo: Demo) -> str:
    return ", ".join(f"{k} to {v}" for k, v in demo.layers.items())


def add_parser(sub) -> None:
    from carfast.scoring.race import SEARCHES
    d = sub.add_parser("demo", help="greedy CAR pruning of a bundled network beside L1 and random, with a report "
                                    "(about 2-3 min on 2 cores)",
                       description="Greedy CAR pruning of a bundled network, then the same layers pruned to the "
                                   "same sizes by the L1 norm and at random (seed 0); all three measured on "
                                   "held-out images of the bundled CIFAR-10 slice, printed side by side and "
                                   "drawn in the report. resnet20: "
                                   f"{_describe(DEMOS['resnet20'])} filters, chosen on half of the images. "
                                   f"alexnet: {_describe(DEMOS['alexnet'])} filters (step "
                                   f"{DEMOS['alexnet'].step}), chosen on a quarter; the report shows the first "
                                   "layer's removed and kept filters as pictures.")
    d.add_argument("--model", choices=tuple(DEMOS), default="resnet20",
                   help="the bundled network to prune (default resnet20; alexnet: about 7 minutes on 2 busy cores)")
    d.add_argument("--out", default=None, help="report folder (default: a new ./carfast-demo-YYYYmmdd-HHMMSS)")
    d.add_argument("--n", type=positive_int, default=None,
                   help="images of the bundled slice to use (default 2000): the first half (resnet20) or "
                        "quarter (alexnet) to choose filters on, the rest held out")
    d.add_argument("--search", choices=SEARCHES, default="exact",
                   help="how CAR finds each removal: 'exact' (default) or 'race' (the raced search at its default "
                        "settings: fewer evaluations, recorded scores still exact; see carfast prune --help)")
    add_threads(d)
    d.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)   # tests: small layers, 40 images


def _new_folder(base: str) -> str:
    path, k = base, 1
    while os.path.exists(path):
        k += 1
        path = f"{base}-{k}"
    os.makedirs(path)
    return path


def _network(name: str):
    """(model, input normalisation)."""
    from carfast import models
    if name == "alexnet":
        return models.alexnet_cifar(), models.ALEXNET_CIFAR_NORMALIZATION
    return models.cifar_resnet(20), models.CIFAR_RESNET_NORMALIZATION


def _log(message: str) -> None:
    print(f"  {message}", flush=True)


def run(args) -> int:
    import carfast
    from carfast.data import cifar10_classes, cifar10_test
    from carfast.pruning.compare import criterion_label
    from carfast.report import write_report

    t0 = time.perf_counter()
    demo = (_QUICK if args.quick else DEMOS)[args.model]
    n = args.n if args.n is not None else demo.n
    if n < 2:
        raise CliError(f"--n {n}: the demo needs at least 2 images (some to score, the rest held out)")
    if n > 2000:
        raise CliError(f"--n {n}: the bundled CIFAR-10 slice holds 2,000 images; pass --n 2000 or fewer")
    out = os.path.abspath(args.out) if args.out else \
        _new_folder(os.path.abspath(f"carfast-demo-{datetime.datetime.now():%Y%m%d-%H%M%S}"))
    model, norm = _network(args.model)
    x, y = cifar10_test(n, normalization=norm)
    k = demo.split(n)
    score, heldout = (x[:k], y[:k]), (x[k:], y[k:])
    print(f"carfast demo: greedy CAR pruning of {demo.title}, then the same layers pruned to the same sizes by "
          f"{' and '.join(criterion_label(b) for b in BASELINES)}; filters chosen on {k:,} CIFAR-10 test images, "
          f"top-1 measured on the other {n - k:,} (held out)")
    for layer, keep in demo.layers.items():
        print(f"  {layer}: {model.get_submodule(layer).out_channels} -> {keep} filters")
    comparison = carfast.compare_criteria(model, list(demo.layers), score, heldout, dict(demo.layers),
                                          ("car", *BASELINES), step=demo.step, progress=None, log=_log,
                                          search=args.search)
    result = comparison.results["car"]
    result.comparison = comparison.to_dict()
    result.settings["cli_model"] = {"model": args.model, "weights": None, "data": None, "n": k,
                                    "normalization": plain_norm(norm)}
    result.save(os.path.join(out, "result.pt"))
    index = write_report(result, out, original=model, heldout=heldout, class_names=cifar10_classes(),
                         title=f"carfast demo: greedy CAR pruning of {demo.title} on CIFAR-10, beside "
                               f"{' and '.join(criterion_label(b) for b in BASELINES)}",
                         input_std=norm[1])
    print()
    print(result.summary())
    print()
    print(comparison.table())
    print(f"\nreport: {index}\nresult: {os.path.join(out, 'result.pt')}  "
          f"(demo took {time.perf_counter() - t0:.0f} s)")
    return 0
