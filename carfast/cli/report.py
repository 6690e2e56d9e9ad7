"""``carfast report``: the HTML report of a saved pruning result.

The original network (for its latency and pictures of the removed first-layer filters) is ``--model``
with ``--weights``, or what ``carfast prune`` recorded; a result saved from Python by
``PruneResult.save`` has no such record, so pass ``--model`` there. A ``package.module:factory`` ``--model``
needs ``--weights`` (the run's own ``--model`` takes the weights it recorded): the factory's own weights
would make the 'before' figures another network's; a bundled ``--model`` must be the one the result was
pruned from. When ``--model`` / ``--normalize`` replace the run's, the original is measured on the images
the run scored on and a warning says when it disagrees with the recorded accuracy (the report itself
warns when its held-out 'before' is too far from it). Held-out accuracy is measured on the
images that follow the scored ones in the source ``carfast prune`` read, on the ``--held-out`` file of
``carfast prune --compare``, or on ``--data``. A result saved with a comparison of criteria
(``--compare``, ``carfast demo``) gets its figure and tables.
"""
from __future__ import annotations

import os
import sys

from carfast.cli.common import (
    BUNDLED,
    CliError,
    add_data_options,
    add_model_options,
    add_threads,
    build_model,
    existing_file,
    load_data,
    nonnegative_int,
    normalization,
    user_spec,
)

__all__ = ["add_parser", "run"]

_ABOUT = ("Write index.html (self-contained), its PNG figures and summary.json for a result saved by carfast prune or "
          "PruneResult.save. The original model is --model (with --weights), else the one carfast prune recorded; "
          "held-out accuracy is measured on the images that follow the scored ones in the same source, or on --data.")


def add_parser(sub) -> None:
    t = sub.add_parser("report", help="write the HTML report of a saved pruning result", description=_ABOUT)
    t.add_argument("result", metavar="RESULT.pt", help="a file written by carfast prune or PruneResult.save")
    t.add_argument("--out", default=None, help="report folder (default: RESULT-report beside the file)")
    add_model_options(t, default=None)
    add_data_options(t, "images to measure held-out accuracy on")
    t.add_argument("--heldout-n", type=nonnegative_int, default=None,
                   help="number of held-out images (default: all available; 0: none)")
    t.add_argument("--title", default=None, help="page title")
    add_threads(t)


def _note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr)


_BUNDLED_ARCH = {"resnet20": ("cifar_resnet", {"depth": 20}), "resnet56": ("cifar_resnet", {"depth": 56}),
                 "alexnet": ("alexnet_cifar", {})}


def _arch_name(arch) -> str | None:
    """The bundled ``--model`` name of a saved carfast architecture record, or None."""
    if not isinstance(arch, dict):
        return None
    key = (arch.get("builder"), arch.get("kwargs"))
    return next((name for name, a in _BUNDLED_ARCH.items() if a == key), None)


def _check_spec(spec: str | None, saved: dict, cli: dict, path: str) -> None:
    """A bundled ``--model`` must be the network the result was pruned from (else a CliError saying which)."""
    if spec not in BUNDLED:
        return
    pruned_from = _arch_name(saved.get("arch"))
    if pruned_from == spec:
        return
    if pruned_from is not None:
        raise CliError(f"--model {spec}: {path} was pruned from {pruned_from}, not {spec}; pass --model "
                       f"{pruned_from} or leave --model out")
    recorded = user_spec(cli.get("model"))
    what = f"your network {recorded} (the run's --model)" if recorded else "a network of your own"
    raise CliError(f"--model {spec}: {path} was pruned from {what}, not {spec}; pass --model "
                   f"{recorded or 'package.module:factory'} (with --weights) naming that network")


def _original(args, cli: dict):
    """(original model or None, the unpruned architecture to load the result into or None, normalisation)."""
    if args.weights is not None and args.model is None:
        raise CliError("--weights needs --model (the network the weights belong to)")
    spec = args.model or cli.get("model")
    if args.model is None or args.weights is not None:
        weights = args.weights if args.model is not None else cli.get("weights")
    elif args.model == cli.get("model"):          # the run's own network: the weights it recorded
        weights = cli.get("weights")
        if weights is not None:
            _note(f"--model {args.model} without --weights: using the weights the run recorded, {weights}")
    elif user_spec(args.model):
        factory = args.model.partition(":")[2]
        raise CliError(f"--model {args.model} without --weights: the original network would get the weights "
                       f"{factory}() gives it (random unless it loads trained ones), not those the result was "
                       "pruned from; pass --weights with that checkpoint (torch.save(model.state_dict(), PATH))")
    else:
        weights = None                            # a bundled network: its bundled weights
    if spec is None:
        _note("no original model (pass --model and --weights): latency and removed filter pictures are left out")
        return None, None, None
    if weights is not None and not os.path.isfile(weights):
        if args.model is not None and args.weights is not None:
            existing_file(weights, "--weights", "pass the original network's checkpoint")
        _note(f"the original weights {weights} are gone: latency and removed filter pictures are left out")
        arch = build_model(spec, None)[0] if spec not in BUNDLED else None
        return None, arch, None
    model, norm = build_model(spec, weights)
    return model, (model if spec not in BUNDLED else None), norm


def _normalisation(args, cli: dict, norm):
    """(normalisation of the images read, or None; the --model whose uint8 images need --normalize, or None).

    --normalize when given; else the run's recorded one when the network is the run's; else the bundled
    network's own; a user's network with none known needs --normalize for uint8 images."""
    same = args.model is None or args.model == cli.get("model")
    if args.normalize is None and same and cli.get("normalization") is not None:
        return cli["normalization"], None
    if args.normalize is not None:
        return normalization(args.normalize, norm), None
    if norm is not None:
        return norm, None
    if same and cli.get("normalize") == "none":       # the run chose no normalisation, explicitly
        return None, None
    return None, (args.model or cli.get("model") or "the result's network")


def _heldout(args, cli: dict, norm, ask):
    """((x, y) held-out images or None, class names or None). The images after the run's scored ones when
    the source is the one the run scored on (default), else the first of ``--data`` (or of the
    ``--held-out`` file ``carfast prune --compare`` recorded)."""
    if args.heldout_n == 0:
        return None, None
    if not cli and args.data is None:
        _note("no held-out images: pass --data with images the run did not score on")
        return None, None
    recorded = cli.get("held_out")
    if args.data is None and recorded is not None and not os.path.isfile(recorded):
        _note(f"the recorded held-out file {recorded} is gone: held-out accuracy uses the images after the scored "
              "ones (pass --data for others)")
        recorded = None
    if args.data is not None:
        data = os.path.abspath(args.data)
    else:
        data = recorded if recorded is not None else cli.get("data")
    same = bool(cli) and data == cli.get("data")
    start = int(cli.get("n", 0)) if same else 0
    x, y, classes, _ = load_data(data, args.normalize, norm, model=ask)
    source = data or "the bundled slice"
    if start >= len(y):
        if args.heldout_n is not None:
            raise CliError(f"--heldout-n {args.heldout_n}: the run scored on all {len(y):,} images of {source}, "
                           "none is left to hold out; pass --data with other images (e.g. the full CIFAR-10 "
                           "test.npz)")
        _note(f"no held-out images: the run scored on all {len(y):,} images of {source} (pass --data "
              "test.npz for more)")
        return None, classes
    stop = len(y) if args.heldout_n is None else start + args.heldout_n
    if stop > len(y):
        raise CliError(f"--heldout-n {args.heldout_n}: only {len(y) - start:,} images of {source} follow the "
                       "scored ones; pass a smaller --heldout-n or --data with more images")
    return (x[start:stop], y[start:stop]), classes


def _check_before(args, cli: dict, result, original, norm, ask) -> None:
    """When --model / --weights / --normalize replace the run's own, measure the original on the images the
    run scored on and warn (CarfastWarning) when it disagrees with the accuracy the result records."""
    import warnings

    from carfast.errors import CarfastWarning
    from carfast.pruning.evaluate import evaluate
    data, n = cli.get("data"), cli.get("n")
    if original is None or not n or (args.model is None and args.normalize is None) or \
            (data is not None and not os.path.isfile(data)):
        return
    x, y, _, _ = load_data(data, args.normalize, norm, model=ask)
    if int(n) > len(y) or int(n) != int(result.base.get("num_images", -1)):
        return
    topk = int(result.settings.get("topk", 1))
    got = evaluate(original, (x[:n], y[:n]), topk=topk).correct
    want = round(result.base["accuracy"] * int(n))
    if abs(got - want) > max(1, 0.005 * int(n)):
        warnings.warn(f"the original network ({args.model or cli.get('model')}) scores {100 * got / int(n):.2f} % "
                      f"on the {int(n):,} images the run scored on, but the result records "
                      f"{100 * result.base['accuracy']:.2f} %: its weights or input normalisation are not the run's, "
                      "so 'before' figures are of another network; pass the run's --weights and --normalize",
                      CarfastWarning, stacklevel=2)


def run(args) -> int:
    import carfast
    from carfast.report import write_report
    from carfast.surgery.pruned_io import read_saved

    path = existing_file(args.result, "RESULT", "pass a file written by carfast prune (or PruneResult.save)")
    saved = read_saved(path, "RESULT")
    settings = (saved.get("extra") or {}).get("settings") or {}
    cli = settings.get("cli_model") or {}
    _check_spec(args.model, saved, cli, path)
    original, arch, norm = _original(args, cli)
    if arch is None and saved.get("arch") is None:
        raise CliError(f"{path} holds a network carfast cannot rebuild on its own; pass --model "
                       "package.module:factory (and --weights) naming the original network")
    result = carfast.load_pruned(path, model=arch)
    norm, ask = _normalisation(args, cli, norm)
    _check_before(args, cli, result, original, norm, ask)
    heldout, names = _heldout(args, cli, norm, ask)
    if names is not None and any(s.num_classes != len(names) for s in result.scores.values()):
        names = None
    out = args.out or os.path.splitext(path)[0] + "-report"
    model_name = args.model or cli.get("model") or "model"
    index = write_report(result, out, original=original, heldout=heldout, class_names=names,
                         title=args.title or f"carfast pruning report: {model_name}, {', '.join(result.kept)}",
                         input_std=norm[1] if norm else None)
    print(f"wrote {index}")
    return 0
