"""``carfast prune``: greedy CAR (or baseline) pruning of layers and coupling groups; saves the result.

The saved ``PruneResult`` records in ``settings["cli_model"]`` how to rebuild the original network and
its data (``--model``, ``--weights``, ``--data``, the number of images, the input normalisation), so
``carfast report`` can time the original, picture the removed first-layer filters and measure held-out
accuracy on the images after the scored ones (or on ``--held-out``).

``--compare l1,random`` also prunes the same layers to the same sizes with those criteria
(``carfast.compare_criteria``), measures every pruned network on held-out images (``--held-out FILE.npz``,
else the images of ``--data`` after the ``--n`` scored ones), prints the comparison and stores it in the
saved result (``PruneResult.comparison``), which ``carfast report`` draws.
"""
from __future__ import annotations

import os

from carfast.cli.common import (
    DATA_HELP,
    KEEP_HELP,
    NO_NORMALIZATION,
    CliError,
    add_compute_options,
    add_data_options,
    add_model_options,
    add_threads,
    build_model,
    check_layers,
    criteria_list,
    existing_file,
    keep_value,
    load_data,
    plain_norm,
    positive_int,
    score_options,
    user_spec,
)

__all__ = ["add_parser", "run"]


def _log(message: str) -> None:
    print(f"compare: {message}", flush=True)


def add_parser(sub) -> None:
    from carfast.criteria import CRITERIA
    from carfast.scoring.race import SEARCHES
    from carfast.scoring.selection import DEFAULT_RULE, RULES
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
    r.add_argument("--keep", type=keep_value, required=True, help=KEEP_HELP)
    r.add_argument("--step", type=positive_int, default=1, help="filters removed per scoring (default 1)")
    r.add_argument("--schedule", choices=("sequential", "global"), default="sequential",
                   help="sequential: layer after layer (default); global: best filter of any layer each step")
    r.add_argument("--criterion", choices=("car", *CRITERIA), default="car", help="importance criterion (default car)")
    r.add_argument("--rule", choices=RULES, default=None,
                   help=f"CAR's selection rule (default {DEFAULT_RULE}): 'accuracy' the paper's (most images still "
                        "correct), 'loss' the smallest loss, 'lcb' a lower confidence bound of the accuracy "
                        "(see experiments/RESULTS.md)")
    r.add_argument("--search", choices=SEARCHES, default="exact",
                   help="how CAR finds each removal: 'exact' (default) scores every remaining filter on every "
                        "image; 'race' visits the images in blocks and drops the filters confidently worse than "
                        "the best (the choice is still made on exact scores; see --delta, --epsilon)")
    r.add_argument("--delta", type=float, default=None,
                   help="with --search race: the chance per step of dropping the best filter, under the bound's "
                        "normal approximation (default 0.05; 0 drops none)")
    r.add_argument("--epsilon", type=float, default=None,
                   help="with --search race: stop a step once the best so far is within this of the others, in "
                        "the rule's units per image (mean loss, or a fraction of images); default 0: never")
    r.add_argument("--n", type=positive_int, default=None,
                   help="number of scoring images: the first N of --data (default all)")
    add_data_options(r, "the images to score on")
    r.add_argument("--compare", type=criteria_list, default=None, metavar="CRITERIA",
                   help="also prune the same layers to the same sizes with these criteria (comma-separated, e.g. "
                        "l1,random), measure every pruned network on held-out images, print the comparison and "
                        "store it in --out for carfast report")
    r.add_argument("--held-out", default=None, metavar="FILE.npz",
                   help="held-out images for --compare, not used for scoring (same format as --data: "
                        f"{DATA_HELP.split(' (default')[0]}); default: the images of --data after the --n scored "
                        "ones")
    r.add_argument("--checkpoint", default=None, help="JSON file written after every removal; resumes if present")
    r.add_argument("--max-accuracy-drop", type=float, default=None,
                   help="stop a layer before accuracy falls more than this below the original (fraction: 0.02 = "
                        "2 points)")
    add_compute_options(r)
    _add_finetune_options(r)
    r.add_argument("--out", required=True, help="file to save the PruneResult to (e.g. result.pt)")
    add_threads(r)


def _add_finetune_options(r) -> None:
    ft = r.add_argument_group("fine-tuning the pruned network (carfast.finetune; with --compare, every criterion's)")
    ft.add_argument("--finetune-data", metavar="FILE.npz", default=None,
                    help="training images to fine-tune on: an .npz of x, y (as --data) or a JPEG-packed one "
                         "(jpeg_bytes, offsets, labels: the format of carfast.data.cifar10_train)")
    ft.add_argument("--finetune-epochs", type=positive_int, default=None, help="epochs (default 1)")
    ft.add_argument("--finetune-lr", type=float, default=None, help="peak learning rate, cosine (default 0.01)")
    ft.add_argument("--finetune-batch-size", type=positive_int, default=None, help="batch size (default 128)")
    ft.add_argument("--distill", type=float, default=None,
                    help="weight in [0, 1] of distillation from the network before pruning (e.g. 0.9); default 0: "
                         "the labels alone")
    ft.add_argument("--bn-stats", choices=("freeze", "update"), default=None,
                    help="BatchNorm statistics while training: kept (freeze, default) or re-estimated (update)")
    ft.add_argument("--calibrate", action="store_true",
                    help="after fine-tuning, re-estimate the BatchNorm statistics on the scoring images (use when "
                         "the training images differ from them, e.g. JPEG copies)")
    ft.add_argument("--finetune-checkpoint", metavar="FILE", default=None,
                    help="save the fine-tune's state here as it goes; a later run with the same options resumes it")
    ft.add_argument("--finetune-seed", type=int, default=None, help="seed of the order and augmentation (default 0)")
    ft.add_argument("--finetune-pad", choices=("black", "reflect"), default=None,
                    help="how the random crops are padded: black (default), as torchvision's RandomCrop(padding=4) "
                         "pads and the bundled CIFAR ResNets were trained, or reflect. Use the padding the network "
                         "was trained with: with --calibrate, the bundled ResNet-56 loses about 2 points otherwise")


#: --flag: the ``FinetuneConfig`` field it sets (unset flags keep the field's default)
_FINETUNE_FIELDS = {"finetune_epochs": "epochs", "finetune_lr": "lr", "finetune_batch_size": "batch_size",
                    "distill": "distill", "bn_stats": "bn_stats", "finetune_seed": "seed"}


def _finetune(args, norm, scoring):
    """The ``finetune=`` dict of ``carfast.prune`` from the --finetune-* flags, or None (CliError when a flag is
    given without --finetune-data, or a value is out of range)."""
    fields = {f: getattr(args, k) for k, f in _FINETUNE_FIELDS.items() if getattr(args, k) is not None}
    if args.finetune_data is None:
        given = [f"--{k.replace('_', '-')}" for k in (*_FINETUNE_FIELDS, "calibrate", "finetune_checkpoint",
                                                      "finetune_pad")
                 if getattr(args, k) not in (None, False)]
        if given:
            raise CliError(f"{', '.join(given)} set(s) the fine-tune; add --finetune-data FILE.npz (training images)")
        return None
    from carfast.finetune import FinetuneConfig, black_fill
    if args.finetune_pad in (None, "black"):      # a black pixel after the normalisation in use
        fields["pad_fill"] = black_fill(norm if norm is not None else NO_NORMALIZATION)
    try:
        config = FinetuneConfig(**fields).to_dict()
    except ValueError as err:
        raise CliError(str(err).replace("FinetuneConfig: ", "fine-tune: ")) from None
    config["data"] = _finetune_data(args, norm)
    if args.calibrate:
        config["calibrate"] = scoring
    if args.finetune_checkpoint is not None:
        config["checkpoint"] = args.finetune_checkpoint
    return config


def _finetune_data(args, norm):
    """(x, y) of --finetune-data: a JPEG-packed .npz is decoded, any other read as --data is."""
    import numpy as np

    from carfast.data import cifar10_train
    path = existing_file(args.finetune_data, "--finetune-data", "pass an .npz of training images")
    try:
        with np.load(path, allow_pickle=False) as z:
            packed = "jpeg_bytes" in z.files
    except (OSError, ValueError) as err:
        raise CliError(f"--finetune-data {path} is not an .npz file ({type(err).__name__})") from None
    if packed:
        try:
            return cifar10_train(path, normalization=norm if norm is not None else NO_NORMALIZATION)
        except (ValueError, TypeError, ImportError) as err:
            raise CliError(str(err)) from None
    x, y, _, _ = load_data(path, args.normalize, norm, option="--finetune-data", model=user_spec(args.model))
    return x, y


def _held_out(args, x, y, norm):
    """(inputs, labels) for --compare: --held-out, else the images of --data after the --n scored ones."""
    if args.held_out is not None:
        hx, hy, _, _ = load_data(args.held_out, args.normalize, norm, option="--held-out",
                                 model=user_spec(args.model))
        return hx, hy
    n = len(y) if args.n is None else args.n
    if n >= len(y):
        source = args.data or "the bundled CIFAR-10 slice"
        raise CliError(f"--compare needs held-out images, but the run scores on all {len(y):,} images of {source}; "
                       "pass --held-out FILE.npz (images not used for scoring) or a smaller --n")
    return x[n:], y[n:]


def _search(args):
    """"exact", or the ``carfast.Race`` of --search race --delta --epsilon (CliError for a bad combination)."""
    import carfast

    given = [f"--{k}" for k in ("delta", "epsilon") if getattr(args, k) is not None]
    if args.search == "exact":
        if given:
            raise CliError(f"{' and '.join(given)} set(s) the raced search; add --search race")
        return "exact"
    if args.criterion != "car":
        raise CliError(f"--search race is how CAR finds its choice; --criterion {args.criterion} ranks by its own "
                       "importance: drop --search")
    if args.rule == "lcb":
        raise CliError("--search race races per-image sums, and --rule lcb is not one: use --rule loss or accuracy")
    kw = {k: getattr(args, k) for k in ("delta", "epsilon") if getattr(args, k) is not None}
    try:
        return carfast.Race(**kw)
    except ValueError as err:
        raise CliError(str(err).replace("Race: delta", "--delta").replace("Race: epsilon", "--epsilon")) from None


def run(args) -> int:
    import carfast

    if os.path.isdir(args.out):
        raise CliError(f"--out {args.out} is a folder; pass a file name such as result.pt")
    if args.held_out is not None and args.compare is None:
        raise CliError("--held-out serves --compare; pass --compare l1,random (or carfast report --data FILE.npz "
                       "for held-out accuracy in the report)")
    if args.rule is not None and args.criterion != "car":
        raise CliError(f"--rule {args.rule} is CAR's selection rule; --criterion {args.criterion} ranks by its own "
                       "importance: drop --rule")
    if args.compare is not None and args.criterion in args.compare:
        raise CliError(f"--compare {','.join(args.compare)}: {args.criterion} is already --criterion; compare it "
                       "with other criteria")
    search = _search(args)
    model, norm = build_model(args.model, args.weights)
    check_layers(model, args.layer, args.model)
    x_all, y_all, _, norm = load_data(args.data, args.normalize, norm, need=args.n, model=user_spec(args.model))
    x, y = x_all[:args.n], y_all[:args.n]
    options = dict(step=args.step, schedule=args.schedule, max_accuracy_drop=args.max_accuracy_drop, rule=args.rule,
                   checkpoint=args.checkpoint, progress=None, search=search, finetune=_finetune(args, norm, (x, y)),
                   **score_options(args))
    if args.compare is None:
        result = carfast.prune(model, args.layer, (x, y), keep=args.keep, criterion=args.criterion, **options)
    else:
        held_out = _held_out(args, x_all, y_all, norm)
        comparison = carfast.compare_criteria(model, args.layer, (x, y), held_out, args.keep,
                                              [args.criterion, *args.compare], log=_log, **options)
        result = comparison.results[args.criterion]
        result.comparison = comparison.to_dict()
    result.settings["cli_model"] = {
        "model": args.model, "weights": None if args.weights is None else os.path.abspath(args.weights),
        "data": None if args.data is None else os.path.abspath(args.data), "n": int(len(y)),
        "normalization": plain_norm(norm)}
    if args.normalize is not None:       # the explicit choice (e.g. none), which carfast report reuses
        result.settings["cli_model"]["normalize"] = args.normalize
    if args.held_out is not None:
        result.settings["cli_model"]["held_out"] = os.path.abspath(args.held_out)
    print(result.summary())
    seconds = sum(r["seconds"] for r in result.history)
    print(f"\n{len(result.history)} removals in {seconds:.1f} s")
    if args.compare is not None:
        print()
        print(comparison.table())
    result.save(args.out)
    print(f"wrote {args.out}  (carfast report {args.out} writes the report)")
    return 0
