"""The ``carfast`` command.

    carfast score  [--model resnet20] [--layer layer1.0.conv1] [--group] [--n 2000] [--data test.npz] [--json out.json]
    carfast prune  --model {resnet20,resnet56,alexnet} [--weights PATH] --layer L [--layer L2 ...] --keep K
                   [--step S] [--schedule sequential|global] [--criterion car|l1|...] [--n N] [--data test.npz]
                   [--checkpoint run.json] [--max-accuracy-drop 0.02] --out result.pt
    carfast report RESULT.pt [--out DIR] [--data test.npz] [--heldout-n N]
    carfast demo   [--out DIR] [--n 2000]
    carfast layers [--model resnet20|package.module:factory] [--input 3,224,224]   (see cli/layers.py)
    carfast --version        (also lists the backends found)

``prune`` runs ``carfast.prune`` on a CIFAR-10 network and saves the ``PruneResult`` (``--keep`` is a
count, ``14``, or a fraction, ``0.5``); it records in ``result.settings["cli_model"]`` how to rebuild
the original network and its data (model name, weights path, data path, number of images, input
normalisation), so ``report`` can time the original, picture the removed first-layer filters and
measure held-out accuracy on the images after the scored ones. ``demo`` prunes three block convs of
the bundled ResNet-20 by greedy CAR on the first half of the bundled 2,000-image CIFAR-10 slice,
measures held-out accuracy on the second half, and writes the report into a new folder
(``./carfast-demo-YYYYmmdd-HHMMSS``); it took 106 s on the 2-core development machine while two other
processes kept both cores busy.

Bad arguments (a missing file, an unknown layer, an impossible ``--keep``) end with one line on stderr,
``carfast <command>: error: ...``, and exit status 2. Long work shows a progress bar when stderr is a
terminal (``CARFAST_PROGRESS=0`` turns it off). ``prune``, ``report`` and ``demo`` use fewer torch
threads than the default when other processes keep the cores busy (``--threads N`` chooses; see
``_set_threads``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

from carfast.cli import layers as cli_layers

__all__ = ["main"]

_MODELS = ("resnet20", "resnet56", "alexnet")
_DEMO_LAYERS = {"layer1.2.conv1": 12, "layer2.2.conv1": 24, "layer3.2.conv1": 32}
_QUICK_LAYERS = {"layer3.2.conv1": 60}
_PRECISION_HELP = ("arithmetic of the network after the consumer: fp32 (default), or bf16/fp16 with an exact "
                   "float32 re-run of the image/filter pairs whose top-1 margin is too small to trust")
_THREADS_HELP = "torch threads (default: torch's default, fewer when other processes keep the cores busy)"


class _CliError(ValueError):
    """A bad argument found by the command itself (printed as one line, exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``carfast prune: error: ... (see carfast prune --help)``, exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _version_text() -> str:
    import carfast
    lines = [f"carfast {carfast.__version__}"]
    for b in carfast.backends():
        lines.append(f"  {b['name']:<7} {'yes' if b['available'] else 'no ':<4} {b['reason']}")
    return "\n".join(lines)


# ---- argument values ------------------------------------------------------------------------------------
def _keep_value(text: str):
    """``--keep``: an int count ("14") or a fraction ("0.5")."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a filter count (14) nor a fraction (0.5)") from None


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return v


def _nonnegative_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = -1
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 0")
    return v


def _existing_file(path: str | None, option: str, hint: str) -> str | None:
    if path is None:
        return None
    if not os.path.isfile(path):
        raise _CliError(f"{option} {path}: no such file; {hint}")
    return os.path.abspath(path)


# ---- threads ------------------------------------------------------------------------------------------
def _set_threads(requested: int | None) -> str | None:
    """Set torch's intra-op threads: ``--threads N``, or by default as many as there are idle cores.

    Why the default: on a small machine shared with other busy processes, torch's threads wait for each
    other at every op, and a thread that is not scheduled stalls the rest; measured on a 2-core machine
    with two other busy processes, one thread pruned 3-4x faster than two and ran a single ResNet-20
    image in 2 ms instead of 380 ms. With idle cores it keeps torch's default. Returns a note to print
    when it chose fewer threads than the default, else None.
    """
    import torch
    default = torch.get_num_threads()
    if requested is not None:
        torch.set_num_threads(requested)
        return None
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):            # not on every platform
        return None
    cores = os.cpu_count() or default
    threads = max(1, min(default, int(cores - load + 0.5)))
    if threads >= default:
        return None
    torch.set_num_threads(threads)
    return (f"using {threads} torch thread{'s' if threads > 1 else ''} instead of {default}: the machine is busy "
            f"(load {load:.1f} on {cores} cores); pass --threads to choose")


# ---- models and data ------------------------------------------------------------------------------------
def _build_model(name: str, weights: str | None):
    """(model, (mean, std) input normalisation) for a ``--model`` name."""
    from carfast import models
    if name == "alexnet":
        if weights is None:
            raise _CliError("--model alexnet needs --weights PATH (e.g. shared/data/models/alexnet_cifar.pt): "
                            "carfast bundles no AlexNet weights")
        return models.alexnet_cifar(weights), models.ALEXNET_CIFAR_NORMALIZATION
    return models.cifar_resnet(int(name.removeprefix("resnet")), weights=weights), models.CIFAR_RESNET_NORMALIZATION


def _plain_norm(norm) -> list:
    return [list(map(float, norm[0])), list(map(float, norm[1]))]


# ---- score ----------------------------------------------------------------------------------------------
def _cmd_score(args) -> int:
    import carfast
    from carfast.atomic import write_json_atomic
    from carfast.data import cifar10_test

    weights = _existing_file(args.weights, "--weights", "pass a checkpoint file or leave it out for the "
                                                        "bundled weights")
    data = _existing_file(args.data, "--data", "pass a CIFAR-10 test.npz or leave it out for the bundled "
                                               "2,000-image slice")
    model, norm = _build_model(args.model, weights)
    x, y = cifar10_test(n=args.n, path=data, normalization=norm)
    results = []
    for layer in args.layer or ["layer1.0.conv1"]:
        score = carfast.score_group if args.group else carfast.score_layer
        res = score(model, layer, (x, y), backend=args.backend, filters=args.filters,
                    memory_budget=args.memory_budget, progress=None, precision=args.precision, device=args.device)
        print(res.table(top=args.top))
        if args.group:
            print(f"  group of {len(res.members)} members: producers "
                  f"{', '.join(m['layer'] for m in res.members if m['role'] == 'output')}")
        print(f"  {res.pairs_evaluated:,} (filter, image) pairs evaluated, {res.pairs_skipped:,} skipped "
              f"(filter all zero), {res.seconds:.1f} s")
        if res.precision != "fp32":
            print(f"  {res.precision}: {res.pairs_rechecked:,} pairs re-run in float32 (top-1 margin at most "
                  f"{res.margin_threshold:.3g})")
        print()
        results.append(res.to_dict())
    if args.json:
        write_json_atomic(args.json, {"model": args.model, "num_images": len(y), "layers": results})
        print(f"wrote {args.json}")
    return 0


# ---- prune ----------------------------------------------------------------------------------------------
def _cmd_prune(args) -> int:
    import carfast
    from carfast.data import cifar10_test

    weights = _existing_file(args.weights, "--weights", "pass a checkpoint file" +
                             ("" if args.model == "alexnet" else " or leave it out for the bundled weights"))
    data = _existing_file(args.data, "--data", "pass a CIFAR-10 test.npz or leave it out for the bundled "
                                               "2,000-image slice")
    if os.path.isdir(args.out):
        raise _CliError(f"--out {args.out} is a folder; pass a file name such as result.pt")
    model, norm = _build_model(args.model, weights)
    x, y = cifar10_test(n=args.n, path=data, normalization=norm)
    result = carfast.prune(model, args.layer, (x, y), keep=args.keep, step=args.step, schedule=args.schedule,
                           criterion=args.criterion, max_accuracy_drop=args.max_accuracy_drop,
                           checkpoint=args.checkpoint, progress=None, backend=args.backend,
                           precision=args.precision, device=args.device)
    result.settings["cli_model"] = {"model": args.model, "weights": weights, "data": data, "n": int(len(y)),
                                    "normalization": _plain_norm(norm)}
    print(result.summary())
    seconds = sum(r["seconds"] for r in result.history)
    print(f"\n{len(result.history)} filters removed in {seconds:.1f} s")
    result.save(args.out)
    print(f"wrote {args.out}  (carfast report {args.out} writes the report)")
    return 0


# ---- report ---------------------------------------------------------------------------------------------
def _original_from_settings(cli: dict | None):
    """(original model or None, normalisation or None, a note when it cannot be rebuilt)."""
    if not cli:
        return None, None, ("the result was not made by the carfast command: no original model to rebuild "
                            "(latency and removed filter pictures are left out)")
    weights = cli.get("weights")
    if weights is not None and not os.path.isfile(weights):
        return None, cli.get("normalization"), (f"the original weights {weights} are gone: latency and removed "
                                                "filter pictures are left out")
    model, _ = _build_model(cli["model"], weights)
    return model, cli.get("normalization"), None


def _heldout(cli: dict | None, data: str | None, count: int | None, norm):
    """(x, y) held-out images or None, and a note. The images after the run's scored ones when the source
    is the one the run scored on (default), else the first of ``data``."""
    from carfast.data import cifar10_test
    from carfast.models import CIFAR_RESNET_NORMALIZATION
    if count == 0 or (cli is None and data is None):
        return None, None
    source = data if data is not None else cli.get("data")
    same = cli is not None and source == cli.get("data")
    start = int(cli.get("n", 0)) if same else 0
    x, y = cifar10_test(path=source, normalization=norm or CIFAR_RESNET_NORMALIZATION)
    stop = len(y) if count is None else start + count
    if start >= len(y):
        if count is not None:
            raise _CliError(f"--heldout-n {count}: the run scored on all {len(y):,} images of "
                            f"{source or 'the bundled slice'}, none is left to hold out; pass --data with "
                            "other images (e.g. the full CIFAR-10 test.npz)")
        return None, (f"no held-out images: the run scored on all {len(y):,} images of "
                      f"{source or 'the bundled slice'} (pass --data test.npz for more)")
    if stop > len(y):
        raise _CliError(f"--heldout-n {count}: only {len(y) - start:,} images of {source or 'the bundled slice'} "
                        "follow the scored ones; pass a smaller --heldout-n or --data with more images")
    return (x[start:stop], y[start:stop]), None


def _cmd_report(args) -> int:
    import carfast
    from carfast.data import cifar10_classes
    from carfast.report import write_report

    path = _existing_file(args.result, "RESULT", "pass a file written by carfast prune (or PruneResult.save)")
    data = _existing_file(args.data, "--data", "pass a CIFAR-10 test.npz")
    result = carfast.load_pruned(path)
    cli = result.settings.get("cli_model")
    original, norm, note = _original_from_settings(cli)
    if note:
        print(f"note: {note}", file=sys.stderr)
    heldout, note = _heldout(cli, data, args.heldout_n, norm)
    if note:
        print(f"note: {note}", file=sys.stderr)
    names = cifar10_classes() if (cli is not None or data is not None) else None
    if names is not None and any(s.num_classes != len(names) for s in result.scores.values()):
        names = None
    out = args.out or os.path.splitext(path)[0] + "-report"
    model_name = cli["model"] if cli else "model"
    index = write_report(result, out, original=original, heldout=heldout, class_names=names,
                         title=args.title or f"carfast pruning report: {model_name}, {', '.join(result.kept)}",
                         input_std=norm[1] if norm else None)
    print(f"wrote {index}")
    return 0


# ---- demo -----------------------------------------------------------------------------------------------
def _new_folder(base: str) -> str:
    path, k = base, 1
    while os.path.exists(path):
        k += 1
        path = f"{base}-{k}"
    os.makedirs(path)
    return path


def _cmd_demo(args) -> int:
    import carfast
    from carfast.data import cifar10_classes, cifar10_test
    from carfast.models import CIFAR_RESNET_NORMALIZATION, cifar_resnet
    from carfast.report import write_report

    t0 = time.perf_counter()
    layers = _QUICK_LAYERS if args.quick else _DEMO_LAYERS
    n = args.n if args.n is not None else (40 if args.quick else 2000)
    if n < 2:
        raise _CliError(f"--n {n}: the demo needs at least 2 images (half to score, half held out)")
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
                                    "normalization": _plain_norm(CIFAR_RESNET_NORMALIZATION)}
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


# ---- parser ---------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    from carfast.criteria import CRITERIA

    p = _Parser(prog="carfast", description="Exact, fast CAR filter scoring and greedy CAR pruning for CNNs.")
    p.add_argument("--version", action="store_true", help="print the version and the backends found")
    sub = p.add_subparsers(dest="command", metavar="{score,prune,report,demo,layers}")

    s = sub.add_parser("score", help="score every filter of a layer by CAR and print a table",
                       description="Score the filters of one or more layers by CAR (accuracy lost when the "
                                   "filter is removed) on CIFAR-10 and print them, least important first.")
    s.add_argument("--model", choices=_MODELS, default="resnet20",
                   help="pretrained CIFAR-10 network (default resnet20; alexnet needs --weights)")
    s.add_argument("--weights", default=None, help="a checkpoint to load instead of the bundled weights")
    s.add_argument("--layer", action="append", default=None,
                   help="layer to score (repeatable; default layer1.0.conv1)")
    s.add_argument("--n", type=_positive_int, default=None, help="number of images (default all)")
    s.add_argument("--data", default=None, help="CIFAR-10 test.npz (default: the bundled 2,000-image slice)")
    s.add_argument("--filters", type=int, nargs="+", default=None, help="score only these filters")
    s.add_argument("--backend", default="auto", choices=("auto", "torch", "cpu", "triton", "cuda"))
    s.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"), help=_PRECISION_HELP)
    s.add_argument("--device", default=None, help="where to compute, e.g. cuda (default: cpu)")
    s.add_argument("--memory-budget", type=float, default=None, help="bytes for cached activations and work")
    s.add_argument("--top", type=int, default=None, help="print only the first TOP rows of each table")
    s.add_argument("--json", default=None, help="also write the scores to this JSON file")
    s.add_argument("--group", action="store_true",
                   help="score the coupling group of each --layer (its residual stream's channels: score_group)")

    r = sub.add_parser("prune", help="greedy CAR (or baseline) pruning of layers; saves the result",
                       description="Remove filters greedily (the least important by CAR, re-scored after each "
                                   "removal) until --keep remain, print the summary table and save the pruned "
                                   "model with the run's record to --out (see carfast report).")
    r.add_argument("--model", choices=_MODELS, required=True,
                   help="CIFAR-10 network: resnet20 / resnet56 (bundled weights) or alexnet (needs --weights)")
    r.add_argument("--weights", default=None, help="checkpoint to load (required for alexnet)")
    r.add_argument("--layer", action="append", required=True,
                   help="layer to prune, a name from model.named_modules() (repeatable)")
    r.add_argument("--keep", type=_keep_value, required=True,
                   help="filters to keep per layer: a count (14) or a fraction of the layer (0.5)")
    r.add_argument("--step", type=_positive_int, default=1, help="filters removed per scoring (default 1)")
    r.add_argument("--schedule", choices=("sequential", "global"), default="sequential",
                   help="sequential: layer after layer (default); global: best filter of any layer each step")
    r.add_argument("--criterion", choices=("car", *CRITERIA), default="car", help="importance criterion (default car)")
    r.add_argument("--n", type=_positive_int, default=None, help="number of scoring images (default all)")
    r.add_argument("--data", default=None, help="CIFAR-10 test.npz (default: the bundled 2,000-image slice)")
    r.add_argument("--checkpoint", default=None, help="JSON file written after every removal; resumes if present")
    r.add_argument("--max-accuracy-drop", type=float, default=None,
                   help="stop before accuracy falls more than this below the original (fraction: 0.02 = 2 points)")
    r.add_argument("--backend", default="auto", choices=("auto", "torch", "cpu", "triton", "cuda"))
    r.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"), help=_PRECISION_HELP)
    r.add_argument("--device", default=None, help="where to compute, e.g. cuda (default: cpu)")
    r.add_argument("--out", required=True, help="file to save the PruneResult to (e.g. result.pt)")
    r.add_argument("--threads", type=_positive_int, default=None, help=_THREADS_HELP)

    t = sub.add_parser("report", help="write the HTML report of a saved pruning result",
                       description="Write index.html (self-contained), its PNG figures and summary.json for a "
                                   "result saved by carfast prune. The original model is rebuilt from the "
                                   "run's settings; held-out accuracy is measured on the images that follow "
                                   "the scored ones in the same source, or on --data.")
    t.add_argument("result", metavar="RESULT.pt", help="a file written by carfast prune")
    t.add_argument("--out", default=None, help="report folder (default: RESULT-report beside the file)")
    t.add_argument("--data", default=None, help="CIFAR-10 test.npz to take held-out images from")
    t.add_argument("--heldout-n", type=_nonnegative_int, default=None,
                   help="number of held-out images (default: all available; 0: none)")
    t.add_argument("--title", default=None, help="page title")
    t.add_argument("--threads", type=_positive_int, default=None, help=_THREADS_HELP)

    d = sub.add_parser("demo", help="prune the bundled ResNet-20 by greedy CAR and write a report (about 2 min)",
                       description="Greedy CAR pruning of three block convs of the bundled ResNet-20 "
                                   f"({', '.join(f'{k} to {v}' for k, v in _DEMO_LAYERS.items())} filters), "
                                   "scored on the first half of the bundled CIFAR-10 slice, held-out accuracy "
                                   "on the second half; prints the summary and writes the report.")
    d.add_argument("--out", default=None, help="report folder (default: a new ./carfast-demo-YYYYmmdd-HHMMSS)")
    d.add_argument("--n", type=_positive_int, default=None,
                   help="images of the bundled slice to use, half to score, half held out (default 2000)")
    d.add_argument("--threads", type=_positive_int, default=None, help=_THREADS_HELP)
    d.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)   # tests: one layer, 40 images
    cli_layers.add_parser(sub, _MODELS, p.error)
    return p


_COMMANDS = {"score": _cmd_score, "prune": _cmd_prune, "report": _cmd_report, "demo": _cmd_demo,
             "layers": lambda args: cli_layers.run(args, _build_model)}


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.version:
        print(_version_text())
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command != "score":
            note = _set_threads(args.threads)
            if note:
                print(f"note: {note}", file=sys.stderr)
        return _COMMANDS[args.command](args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        message = " ".join(str(err).split())          # one line
        print(f"carfast {args.command}: error: {message}", file=sys.stderr)
        return 2


