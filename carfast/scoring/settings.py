"""The score options, declared once: ``ScoreSettings``.

Every entry point that scores takes the same options by the same names, defaults and meaning:
``score_layer`` / ``score_group``, ``LayerScorer`` / ``GroupScorer``, ``carfast.prune`` (all but ``progress``,
which it has itself), ``CARImportance`` (all but the deprecated ``group``) and the command line (the options
with a ``cli`` entry). Each field below is one option: its default, the text of its ``Args`` entry (the
entry points' docstrings are filled from it, ``takes_score_options``) and, for the command line, the
``argparse`` keywords of its flag. A new option is one field here, plus the code that uses it.

``ScoreOptions`` (``scorer.py``) is something else: the engine's fine settings, passed whole as the
``options`` option.
"""
from __future__ import annotations

import inspect
import textwrap
from dataclasses import dataclass, field, fields

from carfast import extensions
from carfast.distributed import UNSET

__all__ = ["ScoreSettings", "SCORE_OPTIONS", "takes_score_options", "score_options_doc"]


def _option(default, doc: str, cli: dict | None = None):
    """One option: ``default``, its ``Args`` text ``doc``, and ``cli``: argparse keywords of ``--name`` (None:
    Python only)."""
    return field(default=default, metadata={"doc": doc, "cli": cli})


@dataclass(frozen=True)
class ScoreSettings:
    """The score options of one call (module docstring); ``ScoreSettings.of(kwargs, fn)`` checks them."""
    device: object = _option(
        None, "where to compute (default: where the model's parameters are; the model is copied, never moved, "
              "when another device is asked for).",
        cli={"help": "where to compute, e.g. cuda (default: cpu)"})
    batch_size: int | None = _option(
        None, "(filter, image) pairs per evaluation of the network's suffix (default 128 on CPU, 4096 on GPU, "
              "reduced to fit the memory budget).")
    memory_budget: int | None = _option(
        None, "bytes the engine may use for cached activations and work (default: a quarter of free host "
              "memory up to 8 GiB, or half of free GPU memory); it works in chunks of images.",
        cli={"type": float, "help": "bytes for cached activations and work"})
    backend: str = _option(
        "auto", "\"auto\", \"torch\" (plain PyTorch), \"cpu\" (the compiled C++ kernels), \"triton\", \"cuda\" (the "
                "GPU kernels); \"auto\" picks cuda, then triton, on a GPU and cpu on the CPU, where available.",
        cli={"choices": ("auto", *reversed(extensions.BACKENDS))})
    precision: str = _option(
        "fp32", "\"fp32\" (default), \"bf16\" or \"fp16\": the suffix's arithmetic. Low precision re-runs in "
                "float32 every pair whose top-k margin is below a calibrated threshold "
                "(``carfast.scoring.precision``), so accuracies equal float32's; ``pairs_rechecked`` says how many. "
                "Applies to the suffix method; the closed form and the full-network method always compute in "
                "float32.",
        cli={"choices": ("fp32", "bf16", "fp16"),
             "help": "arithmetic of the network after the consumer: fp32 (default), or bf16/fp16 with an exact "
                     "float32 re-run of the image/filter pairs whose top-k margin is too small to trust (pruning: "
                     "with --rule accuracy or lcb; the loss rule needs fp32)"})
    progress: object = _option(
        None, "None (a bar on stderr when it is a terminal), True, False, or ``callable(done, total)``.")
    process_group: object = _option(
        None, "several processes (``torch.distributed``), each passing its own shard of the data: the counts are "
              "all-reduced, so every process returns the scores of all the shards, equal to one process scoring "
              "them all (counts exactly; loss sums up to float rounding). None (default): the default process "
              "group when ``torch.distributed`` is initialised, else this process alone; a ``ProcessGroup``; or "
              "False for this process alone. A process that fails makes the others raise RuntimeError after the "
              "process group's timeout (``carfast.distributed``).")
    options: object = _option(None, "``ScoreOptions``: the engine's fine settings.")
    group: object = _option(UNSET, "the deprecated name of ``process_group``.")
    topk: int = _option(
        1, "an image counts correct when its label is among the ``topk`` largest logits (default 1: top-1; 5 for "
           "the top-5 accuracy ImageNet results quote; ties go to the lower class index). The fused kernels "
           "count top-1; k > 1 counts with the plain-PyTorch reduction (same results).",
        cli={"type": "positive_int",
             "help": "count an image correct when its label is among the k largest logits (default 1: top-1 "
                     "accuracy; 5: the top-5 accuracy ImageNet results quote)"})

    @classmethod
    def of(cls, kwargs: dict, fn: str) -> "ScoreSettings":
        """The settings ``kwargs`` names (the rest at their defaults); TypeError naming ``fn`` for a name
        that is not a score option."""
        unknown = sorted(set(kwargs) - set(SCORE_OPTIONS))
        if unknown:
            raise TypeError(f"{fn}: unexpected argument(s) {unknown}; the score options are {list(SCORE_OPTIONS)}")
        return cls(**kwargs)

    def given(self) -> dict:
        """{option: value} of the options not at their defaults."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not f.default}


#: the option names, in declaration order
SCORE_OPTIONS = tuple(f.name for f in fields(ScoreSettings))


def score_options_doc(indent: int = 8, width: int = 116, skip=()) -> str:
    """The ``Args`` entries of the score options, ``name: text``, wrapped at ``width`` and indented ``indent``."""
    out = []
    for f in fields(ScoreSettings):
        if f.name not in skip:
            out.append(textwrap.fill(f"{f.name}: {f.metadata['doc']}", width, initial_indent=" " * indent,
                                     subsequent_indent=" " * (indent + 4)))
    return "\n".join(out).lstrip()


def takes_score_options(func):
    """Decorate ``func(..., **settings)``: its signature lists the score options as keyword-only
    parameters (for ``help`` and ``inspect``), and ``{score_options}`` in its docstring becomes their
    ``Args`` entries."""
    sig = inspect.signature(func)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    have = {p.name for p in params}
    params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default)
               for f in fields(ScoreSettings) if f.name not in have]
    func.__signature__ = sig.replace(parameters=params)
    if func.__doc__ and "{score_options}" in func.__doc__:
        line = next(ln for ln in func.__doc__.splitlines() if "{score_options}" in ln)
        func.__doc__ = func.__doc__.replace("{score_options}",
                                            score_options_doc(indent=len(line) - len(line.lstrip())))
    return func
