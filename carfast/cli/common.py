"""What the ``carfast`` subcommands share: argument types, the model and data options, threads, errors.

``--model`` is a bundled network (resnet20, resnet56, alexnet: pretrained weights ship with carfast) or
``package.module:factory``: a callable
importable from the current folder that returns the network (``--weights``: a state dict to load).
``--data`` is an ``.npz`` file (``DATA_HELP``); without it the bundled 2,000-image CIFAR-10 test slice.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys

from carfast.errors import CliError

__all__ = ["CliError", "Parser", "BUNDLED", "DATA_HELP", "keep_value", "positive_int", "nonnegative_int",
           "existing_file", "set_threads", "add_model_options", "add_data_options", "add_compute_options",
           "add_threads", "build_model", "user_spec", "load_data", "normalization", "check_layers", "plain_norm",
           "criteria_list", "KEEP_HELP"]

BUNDLED = ("resnet20", "resnet56", "alexnet")
DATA_HELP = ("an .npz file with x: uint8 images [N, H, W, C] (scaled to [0, 1], then normalised by --normalize) "
             "or float32 inputs [N, ...] used as they are; y: int labels [N]; optional classes: [K] class names "
             "(default: the bundled 2,000-image CIFAR-10 test slice)")
_NORMALIZE_HELP = ("for uint8 --data images: 'cifar' (the bundled ResNets' mean and std), 'none' (only scaled to "
                   "[0, 1]) or MEAN/STD per channel, e.g. 0.49,0.48,0.45/0.25,0.24,0.26 (default: the bundled "
                   "model's own; 'none' for package.module:factory)")
KEEP_HELP = ("what to KEEP per layer, not what to remove: a count of filters (a group's channels) to keep (14) or "
             "the fraction kept (0.75 keeps three quarters, removes one quarter). Torch-Pruning's pruning_ratio "
             "and torch.nn.utils.prune's amount are the share REMOVED: --keep 0.75 = pruning_ratio 0.25")
_THREADS_HELP = "torch threads (default: torch's default, fewer when other processes keep the cores busy)"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``carfast prune: error: ... (see carfast prune --help)``, exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---- argument types ------------------------------------------------------------------------------------
def keep_value(text: str):
    """``--keep``: an int count ("14") or a fraction ("0.5")."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a filter count (14) nor a fraction (0.5)") from None


def criteria_list(text: str) -> list[str]:
    """``--compare``: comma-separated baseline criteria, e.g. "l1,random" (names of carfast.criteria.CRITERIA,
    or car)."""
    from carfast.criteria import CRITERIA
    valid = ["car", *CRITERIA]
    names = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in names if c not in valid]
    if bad or not names:
        what = f"unknown criterion {bad[0]!r}" if bad else "no criterion named"
        raise argparse.ArgumentTypeError(f"{text!r}: {what}; give comma-separated names from "
                                         f"{', '.join(valid)} (e.g. --compare l1,random)")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r}: a criterion is named twice; name each once")
    return names


def _int_at_least(low: int, what: str):
    """An argparse type: an int >= ``low``, else an error saying it is not ``what``."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = low - 1
        if v < low:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return v
    return parse


positive_int = _int_at_least(1, "a positive integer")
nonnegative_int = _int_at_least(0, "an integer >= 0")


def existing_file(path: str | None, option: str, hint: str) -> str | None:
    if path is None:
        return None
    if not os.path.isfile(path):
        raise CliError(f"{option} {path}: no such file; {hint}")
    return os.path.abspath(path)


# ---- options --------------------------------------------------------------------------------------------
def add_model_options(p, required: bool = False, default: str | None = "resnet20") -> None:
    p.add_argument("--model", required=required, default=None if required else default,
                   help=f"{' / '.join(BUNDLED)} (bundled pretrained CIFAR-10 networks), or "
                        "package.module:factory, a callable importable from the current folder that returns your "
                        f"network{'' if required or default is None else f' (default {default})'}")
    p.add_argument("--weights", default=None, help="a checkpoint (state dict) to load into the model")


def add_data_options(p, what: str = "the images to score on") -> None:
    p.add_argument("--data", default=None, metavar="FILE.npz", help=f"{what}: {DATA_HELP}")
    p.add_argument("--normalize", default=None, help=_NORMALIZE_HELP)


def _cli_options():
    """The score options the command line offers: (field, argparse keywords) of each ``ScoreSettings`` field
    with a ``cli`` entry."""
    from carfast.scoring.settings import ScoreSettings
    for f in dataclasses.fields(ScoreSettings):
        if f.metadata["cli"] is not None:
            kw = dict(f.metadata["cli"])
            if kw.get("type") == "positive_int":
                kw["type"] = positive_int
            yield f, kw


def add_compute_options(p) -> None:
    """``--device``, ``--backend``, ``--precision``, ``--topk``...: the score options (``ScoreSettings``)."""
    for f, kw in _cli_options():
        p.add_argument("--" + f.name.replace("_", "-"), default=f.default, **kw)


def score_options(args) -> dict:
    """{option: value} of the score options ``add_compute_options`` added, as ``score_layer`` takes them."""
    return {f.name: getattr(args, f.name) for f, _ in _cli_options()}


def add_threads(p) -> None:
    p.add_argument("--threads", type=positive_int, default=None, help=_THREADS_HELP)


# ---- threads ------------------------------------------------------------------------------------------
def set_threads(requested: int | None) -> str | None:
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


# ---- models ---------------------------------------------------------------------------------------------
def _user_model(spec: str, weights: str | None):
    mod_name, _, attr = spec.partition(":")
    if not attr or not mod_name:
        raise CliError(f"--model {spec!r}: not a bundled model ({', '.join(BUNDLED)}); give package.module:factory "
                       "(a callable that returns the network)")
    sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as err:
        raise CliError(f"--model {spec!r}: cannot import it ({err}); run carfast from the folder that holds "
                       f"{mod_name.split('.')[0]} or put it on PYTHONPATH") from None
    model = factory()
    import torch
    if not isinstance(model, torch.nn.Module):
        raise CliError(f"--model {spec!r}: {attr}() returned a {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line error
            raise CliError(f"--weights {weights}: torch.load cannot read it as a state dict "
                           f"({type(err).__name__})") from None
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError):
            from carfast.errors import state_dict_mismatch
            raise CliError(f"--weights {weights}: does not fit {spec} ({state_dict_mismatch(model, state)}); pass "
                           "the state dict saved from this network (torch.save(model.state_dict(), PATH)) or the "
                           "factory that built it") from None
    return model.eval()


def user_spec(spec: str | None) -> str | None:
    """``spec`` when it names a user's network (``package.module:factory``), else None (bundled or none)."""
    return spec if spec is not None and spec not in BUNDLED else None


def build_model(spec: str, weights: str | None):
    """(model in eval mode, input normalisation (mean, std) or None) for a ``--model`` value."""
    from carfast import models
    weights = existing_file(weights, "--weights", "pass a checkpoint file" +
                            ("" if spec not in BUNDLED else " or leave it out for the bundled weights"))
    if spec not in BUNDLED:
        return _user_model(spec, weights), None
    if spec == "alexnet":
        return models.alexnet_cifar(weights), models.ALEXNET_CIFAR_NORMALIZATION
    return models.cifar_resnet(int(spec.removeprefix("resnet")), weights=weights), models.CIFAR_RESNET_NORMALIZATION


def check_layers(model, names: list[str], spec: str) -> None:
    """Every ``--layer`` is a Conv2d / Linear of the model, else a CliError pointing at ``carfast layers``
    (a "did you mean" names only Conv2d / Linear layers)."""
    from torch import nn

    from carfast.errors import scorable_near
    modules = dict(model.named_modules())
    listing = f"carfast layers --model {spec} lists them"
    for name in names:
        if name not in modules or not name:
            near = scorable_near(model, name)
            hint = f"did you mean {', '.join(near)}? " if near else ""
            raise CliError(f"--layer {name}: layer {name!r} not found in {spec}; {hint}({listing})")
        if not isinstance(modules[name], (nn.Conv2d, nn.Linear)):
            raise CliError(f"--layer {name}: it is a {type(modules[name]).__name__}; carfast scores and prunes "
                           f"Conv2d and Linear layers ({listing})")


# ---- data -----------------------------------------------------------------------------------------------
def normalization(text: str | None, default):
    """The (mean, std) a ``--normalize`` value names (``default`` when None; None for 'none')."""
    from carfast.models import CIFAR_RESNET_NORMALIZATION
    if text is None:
        return default
    if text == "none":
        return None
    if text == "cifar":
        return CIFAR_RESNET_NORMALIZATION
    try:
        mean, std = ([float(v) for v in part.split(",")] for part in text.split("/"))
    except ValueError:
        raise CliError(f"--normalize {text!r}: give cifar, none, or MEAN/STD per channel, e.g. "
                       "0.49,0.48,0.45/0.25,0.24,0.26") from None
    if len(mean) != len(std) or not all(s > 0 for s in std):
        raise CliError(f"--normalize {text!r}: as many means as stds, every std > 0")
    return mean, std


def load_data(path: str | None, normalize: str | None, default_norm, need: int | None = None,
              option: str = "--data", model: str | None = None):
    """(x [N, ...] float32, y [N] int64, class names or None, normalisation used): all of ``--data`` (or of
    the bundled slice), which must hold at least ``need`` images; ``option`` names the file in errors.
    ``model``: the ``--model`` of a user's network whose input normalisation is not known; uint8 images
    then need an explicit ``--normalize`` (a CliError saying so): scaling them to [0, 1] alone is a guess."""
    from carfast.data import cifar10_classes, cifar10_test
    from carfast.data.arrays import read_npz, to_tensors
    path = existing_file(path, option, f"pass {DATA_HELP.split(' (default')[0]}" +
                         (", or leave it out for the bundled CIFAR-10 slice" if option == "--data" else ""))
    norm = normalization(normalize, default_norm)
    source = path or "the bundled CIFAR-10 slice"
    try:
        raw = read_npz(path, option) if path is not None else None
    except (ValueError, TypeError) as err:
        raise CliError(str(err)) from None
    if model is not None and normalize is None and (raw is None or raw[0].dtype == "uint8"):
        raise CliError(f"{option} {source} holds uint8 images and --model {model} is your own network, whose input "
                       "normalisation carfast cannot know: pass --normalize MEAN/STD as in its training (e.g. "
                       "0.49,0.48,0.45/0.25,0.24,0.26), cifar, or none (only scaled to [0, 1])")
    if raw is None:
        x, y = cifar10_test(normalization=norm if norm is not None else NO_NORMALIZATION)
        classes = cifar10_classes()
    else:
        try:
            x, y, classes = to_tensors(*raw, path, normalization=norm, fn=option)
        except (ValueError, TypeError) as err:
            raise CliError(str(err)) from None
    if need is not None and need > len(y):
        raise CliError(f"--n {need}: {source} holds {len(y):,} images; pass a "
                       "smaller --n" + ("" if path else " or --data with more (e.g. the full CIFAR-10 test.npz)"))
    return x, y, classes, norm


NO_NORMALIZATION = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))      # no normalisation: x / 255 only


def plain_norm(norm) -> list | None:
    return None if norm is None else [list(map(float, norm[0])), list(map(float, norm[1]))]
