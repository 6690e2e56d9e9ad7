"""The ``carfast`` command: one module per subcommand, the shared options in ``common.py``.

    carfast score  [--model M] [--layer L ...] [--group] [--n N] [--data FILE.npz] [--json out.json]
    carfast prune  --model M [--weights PATH] --layer L [--layer L2 ...] --keep K [--step S]
                   [--schedule sequential|global] [--criterion car|l1|...] [--rule loss|accuracy|lcb]
                   [--n N] [--data FILE.npz] [--compare l1,random [--held-out FILE.npz]]
                   [--checkpoint run.json] [--max-accuracy-drop 0.02] --out result.pt
    carfast report RESULT.pt [--model M --weights PATH] [--out DIR] [--data FILE.npz] [--heldout-n N]
    carfast demo   [--model resnet20|alexnet] [--out DIR] [--n 2000]
    carfast layers [--model M] [--input 3,224,224]
    carfast --version        (also lists the backends found)

M is resnet20 / resnet56 / alexnet (bundled) or ``package.module:factory`` for your own network.
Bad arguments (a missing file, an unknown layer, an impossible ``--keep``) end with one line on stderr,
``carfast <command>: error: ...``, and exit status 2. Long work shows a progress bar with elapsed time
and an estimate of the time left when stderr is a terminal, and a line every few seconds otherwise
(``CARFAST_PROGRESS=0`` turns both off). Every subcommand uses fewer torch threads than the default when
other processes keep the cores busy (``--threads N`` chooses; see ``common.set_threads``).
"""
from __future__ import annotations

import contextlib
import sys
import warnings

from carfast.cli import demo, layers, prune, report, score
from carfast.cli.common import Parser, set_threads

__all__ = ["main"]

_COMMANDS = {"score": score, "prune": prune, "report": report, "demo": demo, "layers": layers}


def _version_text() -> str:
    import carfast
    lines = [f"carfast {carfast.__version__}"]
    for b in carfast.backends():
        lines.append(f"  {b['name']:<7} {'yes' if b['available'] else 'no ':<4} {b['reason']}")
        if b["kernels"]:
            lines.append(f"          kernels: {', '.join(b['kernels'])}")
    return "\n".join(lines)


@contextlib.contextmanager
def _one_line_warnings(command: str):
    """carfast's warnings (``errors.CarfastWarning``: near-chance accuracy, a 'before' that disagrees...) as
    one line each on stderr, ``carfast <command>: warning: ...``, each distinct message once; others as usual."""
    from carfast.errors import CarfastWarning
    seen = set()
    with warnings.catch_warnings():
        warnings.simplefilter("always", CarfastWarning)
        default = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if not issubclass(category, CarfastWarning):
                return default(message, category, filename, lineno, file, line)
            text = " ".join(str(message).split())
            if text not in seen:
                seen.add(text)
                print(f"carfast {command}: warning: {text}", file=sys.stderr)

        warnings.showwarning = show
        yield


def _parser() -> Parser:
    p = Parser(prog="carfast", description="Exact, fast CAR filter scoring and greedy CAR pruning for CNNs.")
    p.add_argument("--version", action="store_true", help="print the version and the backends found")
    sub = p.add_subparsers(dest="command", metavar="{" + ",".join(_COMMANDS) + "}")
    for command in _COMMANDS.values():
        command.add_parser(sub)
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
    try:
        note = set_threads(args.threads)
        if note:
            print(f"note: {note}", file=sys.stderr)
        with _one_line_warnings(args.command):
            return _COMMANDS[args.command].run(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        message = " ".join(str(err).split())          # one line
        print(f"carfast {args.command}: error: {message}", file=sys.stderr)
        return 2
