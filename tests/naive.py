"""The naive CAR reference: remove one filter by zeroing what it owns in each consumer's input, run the
whole network, repeat for every filter.

This is the oracle the exactness tests compare carfast against, so it is written to be obviously
correct rather than fast: one full forward pass of the model per (filter, batch), with forward
pre-hooks on the consumers that zero the removed filter's slice of their input (on a clone).

Consumers are given by hand as ``{consumer_module_name: width}``: filter ``k`` owns the contiguous
slice ``[k * width, (k + 1) * width)`` of dim 1 of that consumer's input (width 1 for a conv consumer,
H*W for a Linear after flatten, the channel multiplier m for a conv after a depthwise conv, m*H*W for a
Linear after flatten after a depthwise conv).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from carfast.scoring.selection import LCB_Z

__all__ = ["NaiveResult", "naive_scores", "naive_stream_scores", "naive_stream_logits", "RESNET20_STREAMS",
           "naive_logits", "naive_greedy", "per_class_counts",
           "naive_removal_logits", "naive_removal_scores", "naive_greedy_by",
           "near_tie", "margin_of", "topk_correct", "topk_margin_of"]


@dataclass
class NaiveResult:
    """Per-image results of the naive reference, F filters (in the order asked) by N images."""

    filters: torch.Tensor        # [F] int64
    labels: torch.Tensor         # [N] int64
    base_logits: torch.Tensor    # [N, C] float32
    logits: torch.Tensor         # [F, N, C] float32
    base_pred: torch.Tensor      # [N] int64
    pred: torch.Tensor           # [F, N] int64
    base_correct: torch.Tensor   # [N] bool
    correct: torch.Tensor        # [F, N] bool
    base_loss: torch.Tensor      # [N] float64, per-image cross-entropy of the intact model
    loss: torch.Tensor           # [F, N] float64, per-image cross-entropy with filter f removed
    base_margin: torch.Tensor    # [N] float32, top1 - top2 logit of the intact model
    margin: torch.Tensor         # [F, N] float32, top1 - top2 logit with filter f removed

    @property
    def num_classes(self) -> int:
        return int(self.base_logits.shape[1])

    def class_counts(self, num_classes: int | None = None) -> torch.Tensor:
        """[F, C] int64: images of each class still correct with filter f removed."""
        return per_class_counts(self.correct, self.labels, num_classes or self.num_classes)

    def base_class_counts(self, num_classes: int | None = None) -> torch.Tensor:
        """[C] int64: images of each class the intact model gets right."""
        return per_class_counts(self.base_correct.unsqueeze(0), self.labels, num_classes or self.num_classes)[0]

    def class_totals(self, num_classes: int | None = None) -> torch.Tensor:
        """[C] int64: images per class."""
        return torch.bincount(self.labels, minlength=num_classes or self.num_classes)

    def near_ties(self, rel: float = 1e-5) -> torch.Tensor:
        """[F, N] bool: images whose naive top-1 with filter f removed is a near tie."""
        return near_tie(self.margin, self.logits, rel)


def margin_of(logits: torch.Tensor) -> torch.Tensor:
    """top-1 logit minus top-2 logit, over the last dim."""
    top2 = torch.topk(logits, 2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def near_tie(margin: torch.Tensor, logits: torch.Tensor, rel: float = 1e-5) -> torch.Tensor:
    """margin < rel * max(1, max |logit| of that image)."""
    scale = logits.abs().amax(dim=-1).clamp(min=1.0)
    return margin < rel * scale


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """[..., N, C] logits, [N] labels -> [..., N] bool: is the label among the k first classes when each row
    is sorted by logit, largest first, equal logits in class order (a stable sort)?"""
    order = torch.sort(-logits, dim=-1, stable=True).indices[..., :k]
    return (order == labels[:, None]).any(-1)


def topk_margin_of(logits: torch.Tensor, k: int) -> torch.Tensor:
    """[..., C] -> [...]: the k-th largest logit minus the (k+1)-th (where top-k membership can flip)."""
    top = logits.topk(k + 1, dim=-1).values
    return top[..., k - 1] - top[..., k]


def per_class_counts(correct: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[F, N] bool correct, [N] labels -> [F, C] int64 counts of correct images per class."""
    correct = correct.to(torch.bool)
    out = torch.zeros(correct.shape[0], num_classes, dtype=torch.int64)
    for c in range(num_classes):
        out[:, c] = correct[:, labels == c].sum(dim=1)
    return out


def _zeroing_pre_hook(first: int, last: int):
    def hook(module, args):
        x = args[0].clone()
        x[:, first:last] = 0
        return (x,) + tuple(args[1:])
    return hook


def _run(model: nn.Module, data_x: torch.Tensor, batch_size: int) -> torch.Tensor:
    outs = []
    for start in range(0, data_x.shape[0], batch_size):
        outs.append(model(data_x[start:start + batch_size]).float())
    return torch.cat(outs, dim=0)


def naive_logits(model: nn.Module, consumers: dict[str, int], data_x: torch.Tensor,
                 filter_index: int | None, batch_size: int = 256, removed=()) -> torch.Tensor:
    """[N, C] logits of the model in eval mode with filter ``filter_index`` removed (None: intact), and
    the filters in ``removed`` too.

    The model's hooks and train/eval flags are restored afterwards.
    """
    modules = dict(model.named_modules())
    flags = {name: m.training for name, m in modules.items()}
    handles = []
    try:
        model.eval()
        gone = list(removed) + ([filter_index] if filter_index is not None else [])
        for k in gone:
            k = int(k)
            for name, width in consumers.items():
                handles.append(modules[name].register_forward_pre_hook(
                    _zeroing_pre_hook(k * width, (k + 1) * width)))
        with torch.no_grad():
            return _run(model, data_x, batch_size)
    finally:
        for h in handles:
            h.remove()
        for name, m in modules.items():
            m.training = flags[name]


def naive_scores(model: nn.Module, consumers: dict[str, int], data_x: torch.Tensor, data_y: torch.Tensor,
                 filters, batch_size: int = 256) -> NaiveResult:
    """Remove each filter in ``filters`` in turn (zero its slice of every consumer's input), run the
    whole model in eval mode, and record per-image logits, predictions, correctness, loss and margin."""
    filters = torch.as_tensor(list(filters), dtype=torch.int64)
    data_y = torch.as_tensor(data_y, dtype=torch.int64)

    base_logits = naive_logits(model, consumers, data_x, None, batch_size)
    all_logits = []
    for k in filters.tolist():
        all_logits.append(naive_logits(model, consumers, data_x, k, batch_size))
    logits = torch.stack(all_logits, dim=0) if all_logits else base_logits.new_zeros((0,) + base_logits.shape)

    return _result(filters, data_y, base_logits, logits)


def naive_stream_logits(model: nn.Module, stream: list[str], data_x: torch.Tensor, channels,
                        batch_size: int = 256) -> torch.Tensor:
    """[N, C] logits of the model in eval mode with ``channels`` (an int or a list) of a residual stream
    zeroed where the stream is produced: at the output of every module in ``stream`` (given by hand, e.g.
    a ResNet's stem BatchNorm and its blocks). Hooks and train/eval flags are restored afterwards."""
    channels = [channels] if isinstance(channels, int) else list(channels)
    modules = dict(model.named_modules())
    flags = {name: m.training for name, m in modules.items()}

    def zero_output(_module, _args, out):
        out = out.clone()
        out[:, channels] = 0
        return out

    handles = [modules[name].register_forward_hook(zero_output) for name in stream] if channels else []
    try:
        model.eval()
        with torch.no_grad():
            return _run(model, data_x, batch_size)
    finally:
        for h in handles:
            h.remove()
        for name, m in modules.items():
            m.training = flags[name]


def naive_stream_scores(model: nn.Module, stream: list[str], data_x: torch.Tensor, data_y: torch.Tensor,
                        channels, batch_size: int = 256) -> NaiveResult:
    """The naive reference of a coupling group: for each channel in turn, zero it on the stream
    (``naive_stream_logits``), run the whole model, record per-image results."""
    channels = torch.as_tensor(list(channels), dtype=torch.int64)
    data_y = torch.as_tensor(data_y, dtype=torch.int64)
    base_logits = naive_stream_logits(model, stream, data_x, [], batch_size)
    logits = [naive_stream_logits(model, stream, data_x, k, batch_size) for k in channels.tolist()]
    logits = torch.stack(logits) if logits else torch.zeros(0, *base_logits.shape)
    return _result(channels, data_y, base_logits, logits)


#: a producer of each ResNet-20 coupling group -> the modules whose outputs are its residual stream
RESNET20_STREAMS = {
    "conv1": ["bn1", "layer1.0", "layer1.1", "layer1.2"],
    "layer2.1.conv2": ["layer2.0", "layer2.1", "layer2.2"],
    "layer3.2.conv2": ["layer3.0", "layer3.1", "layer3.2"],
}


def _result(filters, data_y, base_logits, logits) -> NaiveResult:
    base_pred = base_logits.argmax(dim=1)
    pred = logits.argmax(dim=2)
    base_loss = F.cross_entropy(base_logits.double(), data_y, reduction="none")
    loss = torch.stack([F.cross_entropy(lg.double(), data_y, reduction="none") for lg in logits], dim=0) \
        if len(filters) else torch.zeros(0, len(data_y), dtype=torch.float64)
    return NaiveResult(
        filters=filters, labels=data_y, base_logits=base_logits, logits=logits,
        base_pred=base_pred, pred=pred, base_correct=base_pred == data_y, correct=pred == data_y.unsqueeze(0),
        base_loss=base_loss, loss=loss, base_margin=margin_of(base_logits), margin=margin_of(logits),
    )


def naive_greedy(model: nn.Module, consumers: dict[str, int], data_x: torch.Tensor, labels: torch.Tensor,
                 num_filters: int, num_remove: int, batch_size: int = 256, rule: str = "accuracy") -> list[dict]:
    """The naive greedy CAR loop with the filters zeroed at each consumer (``naive_logits``)."""
    return naive_greedy_by(lambda gone: naive_logits(model, consumers, data_x, None, batch_size, removed=gone),
                           labels, num_filters, num_remove, rule)


def naive_greedy_by(logits_without, labels: torch.Tensor, num_units: int, num_remove: int,
                    rule: str = "accuracy") -> list[dict]:
    """The naive greedy CAR loop: at every step run the whole network once per remaining candidate, with the
    units removed so far and the candidate (``logits_without(list of units) -> [N, C]``), and remove the
    best candidate under ``rule``, ties to the lowest index:
    "accuracy" (the paper's): most images correct, then smallest summed cross-entropy;
    "loss": smallest summed cross-entropy, then most images correct;
    "lcb": largest gained - lost - LCB_Z * sqrt(gained + lost), gained / lost the images the candidate's
    removal turns right / wrong against the network as it is now, then most correct, then smallest loss.
    Returns one dict per removal: ``filter``, ``correct`` (images correct after it), ``loss_sum``."""
    removed, steps = [], []
    for _ in range(num_remove):
        now = logits_without(list(removed)).argmax(1) == labels
        best = None
        for k in range(num_units):
            if k in removed:
                continue
            logits = logits_without(removed + [k])
            right = logits.argmax(1) == labels
            correct = int(right.sum())
            loss = float(F.cross_entropy(logits.double(), labels, reduction="sum"))
            if rule == "accuracy":
                key = (-correct, loss, k)
            elif rule == "loss":
                key = (loss, -correct, k)
            else:
                gained, lost = int((right & ~now).sum()), int((~right & now).sum())
                key = (-(gained - lost - LCB_Z * math.sqrt(gained + lost)), -correct, loss, k)
            if best is None or key < best[0]:
                best = (key, {"filter": k, "correct": correct, "loss_sum": loss})
        removed.append(best[1]["filter"])
        steps.append(best[1])
    return steps


def _drop_and_renormalise(norm: nn.Module, inp: torch.Tensor, drop: list[int], dim: int) -> torch.Tensor:
    """A LayerNorm-like module's output without entries ``drop`` along ``dim``: the norm of the other
    entries alone, with their own weight and bias, as the physically smaller norm computes; the dropped
    entries come out zero (no reader sees them)."""
    keep = torch.tensor([i for i in range(inp.shape[dim]) if i not in set(drop)])
    if isinstance(norm, nn.GroupNorm):            # one group: over the channels that remain and every position
        out = torch.zeros_like(inp)
        out[:, keep] = F.group_norm(inp[:, keep], 1, norm.weight[keep], norm.bias[keep], norm.eps)
        return out
    z = inp.movedim(dim, -1)
    w = norm.weight[keep] if norm.weight is not None else None
    b = norm.bias[keep] if norm.bias is not None else None
    out = torch.zeros_like(z)
    out[..., keep] = F.layer_norm(z[..., keep], (len(keep),), w, b, norm.eps)
    return out.movedim(-1, dim)


def naive_removal_logits(model: nn.Module, removal, data_x: torch.Tensor, unit,
                         batch_size: int = 256) -> torch.Tensor:
    """[N, C] logits of the model in eval mode with ``unit`` (an int, or a list of them) removed by hand as
    ``removal`` (a ``nets.Removal``) says: its input indices zeroed at each reader module (a forward
    pre-hook on a clone), each normaliser's output recomputed without it, and the weight columns of
    functional readers zeroed (a conv or linear is linear in its input, so a zero column is a zero input
    channel). None or []: the intact model. Hooks, weights and flags are restored afterwards."""
    units = [] if unit is None else [unit] if isinstance(unit, int) else list(unit)
    if not units:
        with torch.no_grad():
            flags = {n: m.training for n, m in model.named_modules()}
            model.eval()
            try:
                return _run(model, data_x, batch_size)
            finally:
                for n, m in model.named_modules():
                    m.training = flags[n]
    modules, params = dict(model.named_modules()), dict(model.named_parameters())
    handles, saved = [], {}

    def zero(idx, dim):
        def hook(_m, args):
            x = args[0].clone()
            x.index_fill_(dim % x.dim(), torch.tensor(idx), 0)
            return (x,) + tuple(args[1:])
        return hook

    def renorm(idx, dim):
        return lambda m, args, out: _drop_and_renormalise(m, args[0], idx, dim)

    def all_of(owned):
        return sorted({i for k in units for i in owned(k)})

    try:
        for name, owned in removal.readers.items():
            handles.append(modules[name].register_forward_pre_hook(zero(all_of(owned), removal.dims.get(name, 1))))
        for name, owned in removal.norms.items():
            handles.append(modules[name].register_forward_hook(renorm(all_of(owned), removal.dims.get(name, 1))))
        with torch.no_grad():
            for name, owned in removal.columns.items():
                saved[name] = params[name].detach().clone()
                params[name][:, all_of(owned)] = 0
        return naive_removal_logits(model, removal, data_x, None, batch_size)
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for name, w in saved.items():
                params[name].copy_(w)


def naive_removal_scores(model: nn.Module, removal, data_x: torch.Tensor, data_y: torch.Tensor, units,
                         batch_size: int = 256) -> NaiveResult:
    """``naive_scores`` for a hand-written ``nets.Removal``: one full run per unit."""
    units = torch.as_tensor(list(units), dtype=torch.int64)
    base = naive_removal_logits(model, removal, data_x, None, batch_size)
    logits = torch.stack([naive_removal_logits(model, removal, data_x, int(k), batch_size) for k in units])
    return _result(units, torch.as_tensor(data_y, dtype=torch.int64), base, logits)
