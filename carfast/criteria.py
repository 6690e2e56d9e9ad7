"""Baseline filter-importance criteria, to compare CAR against.

Every criterion is a function ``criterion(model, layer, data, **kw) -> scores: [F] float64`` (on the
CPU) with one importance per filter of ``layer`` (a Conv2d output channel or a Linear output
feature). HIGHER means MORE IMPORTANT for every criterion, so a pruning loop removes the argmin.
Each is deterministic (``random_scores`` given its seed). The model is evaluated in eval mode and
left exactly as it came: weights, buffers, train/eval flags, hooks, and no ``.grad`` set.

The data-driven criteria measure a filter's activation where the network reads it: at the input of
each *reader* of its channels (the Conv2d / Linear layers, normalisers and shortcuts the channel-flow
analysis ``carfast.graph`` finds), i.e. after the per-channel chain (BatchNorm, activation, pooling,
dropout, depthwise conv, flatten, concatenation...) -- the same place where CAR removes the filter.
"Positions" below are all the entries of a reader's input that carry the filter on one image (its
channel, or its block of features after a flatten). A layer whose channels are coupled with other
layers' (a residual add), or that merge, is scored as ``carfast.prune`` prunes it: per channel of its
coupling group (``score_group``'s units), read at every reader of the group's stream (``l1_norm`` sums
the weights of every filter that makes the channel). ``l1_norm`` and ``random_scores`` read no
activations and score any other Conv2d / Linear per filter, even one the analysis cannot follow. With
several readers the per-reader values are combined as each criterion says.

``data`` takes the forms ``score_layer`` takes: ``(inputs [N, ...], labels [N] int)`` or an iterable
of such batches; it is re-chunked into batches of ``batch_size`` images (default 256).
"""
from __future__ import annotations

import copy
import functools
import itertools
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from carfast.batching import check_finite, check_labels, eval_mode, iter_chunks, model_device
from carfast.errors import resolve_layer
from carfast.graph import FlowError, analyze_units, from_recording
from carfast.graph.apply import intercept, reader_profile
from carfast.graph.example import infer_example
from carfast.graph.split import target_num_filters

__all__ = ["random_scores", "l1_norm", "mean_activation", "apoz", "taylor", "CRITERIA", "get_criterion",
           "draws_fixed_order"]


def _resolve(model, layer, fn: str) -> tuple[str, nn.Module, int]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}")
    name, module = resolve_layer(model, layer, fn)
    return name, module, target_num_filters(module)


def _first_image(data, model: nn.Module, fn: str) -> torch.Tensor:
    """One input [1, ...]: the first of ``data``, or (``data`` None) one inferred from the model."""
    if data is None:
        try:
            return infer_example(model, None, fn)[0]
        except ValueError:
            raise ValueError(f"{fn}: cannot infer an input for {type(model).__name__} to find whether the layer's "
                             "channels are coupled with other layers'; pass data (one batch is enough)") from None
    (x, _), _ = _chunks(data, 1, model_device(model), fn)
    return x[:1]


def _group_flow(model: nn.Module, name: str, data, fn: str):
    """The coupling group's flow when layer ``name``'s filters are coupled or merge, else None (a layer
    the analysis refuses for another reason is scored per filter: its weights need no flow)."""
    work = copy.deepcopy(model)
    with eval_mode(work), torch.no_grad():
        example = _first_image(data, work, fn)
        try:
            flow, group = analyze_units(work, name, example, fn, cut_checks=False)
        except FlowError:
            return None
    return flow if group else None


def random_scores(model: nn.Module, layer, data=None, *, seed: int = 0) -> torch.Tensor:
    """[F] float64 uniform in [0, 1) from a ``torch.Generator`` seeded with ``seed`` and the layer's name
    (so two layers get independent draws); F is the layer's filters, or its coupling group's channels
    (found on ``data``'s first image, or an inferred input).

    The chance baseline: any criterion worth using must beat it. Its scores belong to the filters, not to
    the model's state (``fixed_order``): ``carfast.prune`` draws them once per layer on the input model and
    removes in that order, i.e. along one uniformly random permutation of the layer's filters.
    """
    name, _, num = _resolve(model, layer, "random_scores")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"random_scores: seed must be an int, got {type(seed).__name__}")
    flow = _group_flow(model, name, data, "random_scores")
    num = flow.num_units if flow is not None else num
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
    return torch.rand(num, generator=generator, dtype=torch.float64)


random_scores.fixed_order = True


def draws_fixed_order(criterion) -> bool:
    """Whether ``criterion`` (a function, or a ``functools.partial`` of one) has ``fixed_order = True``:
    its score of a filter does not depend on the model's state (the random baseline), so a pruning loop
    draws the scores once on the input model and removes in their order instead of drawing anew on every
    smaller model (which would keep picking the same position, i.e. runs of neighbouring filters)."""
    while isinstance(criterion, functools.partial):
        criterion = criterion.func
    return getattr(criterion, "fixed_order", False) is True


def l1_norm(model: nn.Module, layer, data=None) -> torch.Tensor:
    """[F] float64: the L1 norm of each filter's weights, sum |W[k]| (Li et al. 2017, "Pruning Filters
    for Efficient ConvNets").

    Conv2d: ``weight[k]`` is [in / groups, kh, kw]; Linear: ``weight[k]`` is [in]. The bias is left out,
    as in Li et al., who rank the kernels. For a coupled layer (found on ``data``'s first image, or an
    inferred input) F is its coupling group's channels, each scored by the summed L1 norms of the
    filters that make it in every producer of the group (the stem and each block's last conv of a
    ResNet stage).
    """
    name, module, num = _resolve(model, layer, "l1_norm")
    flow = _group_flow(model, name, data, "l1_norm")
    if flow is None:
        w = module.weight.detach()
        return w.reshape(num, -1).abs().sum(1, dtype=torch.float64).cpu()
    out = torch.zeros(flow.num_units, dtype=torch.float64)
    modules = dict(model.named_modules())
    for p in flow.producers:
        if p.kind not in ("conv", "linear"):
            continue                      # a channel-map shortcut has no weights
        w = modules[p.op.name].weight.detach()
        per_row = w.reshape(w.shape[0], -1).abs().sum(1, dtype=torch.float64).cpu()
        for u, rows in enumerate(p.rows):
            out[u] += per_row[torch.as_tensor(rows, dtype=torch.long).flatten()].sum()
    return out


# ---- activations at the consumers ---------------------------------------------------------------------
def _check_batch_size(batch_size, fn: str) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"{fn}: batch_size must be a positive int, got {batch_size!r}")


def _flow(model: nn.Module, name: str, example: torch.Tensor, fn: str):
    """The channel flow of layer ``name`` (or of its coupling group) on a recording of ``model``
    (``carfast.graph``): its readers are where the criteria read each unit's activation, and
    ``graph.apply.intercept`` hooks them."""
    return analyze_units(model, name, example, fn, graph=from_recording(model, example), cut_checks=False)[0]


def _per_unit(v: torch.Tensor, reader, num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(per image and unit: sum of ``v`` over the unit's positions [N, F] float64, positions per unit [F]).

    ``v`` is shaped like the reader's input [N, ...]; the unit's positions are its indices along the
    reader's axis (``graph.apply.reader_profile``) times every position of the other axes."""
    prof, axis = reader_profile(reader)
    n = v.shape[0]
    per_c = v.movedim(axis, 1).reshape(n, v.shape[axis], -1)
    rest = per_c.shape[2]
    sums = torch.zeros(n, num + 1, dtype=torch.float64, device=v.device)
    sums.index_add_(1, prof.to(v.device), per_c.sum(2, dtype=torch.float64))
    counts = torch.bincount(prof, minlength=num + 1)[1:] * rest
    return sums[:, 1:], counts


def _chunks(data, batch_size: int, device, fn: str):
    """(first chunk, iterator over all chunks): the first is needed before the pass for the analysis."""
    chunks = iter_chunks(data, batch_size, device, fn)
    first = next(chunks)          # iter_chunks raises ValueError for empty data
    return first, itertools.chain([first], chunks)


def _consumer_stats(model, layer, data, batch_size: int, fn: str):
    """Per reader u: (sum of activations [F] float64, zeros [F] int64, entries per filter [F]) over data."""
    _check_batch_size(batch_size, fn)
    name, _, _ = _resolve(model, layer, fn)
    work = copy.deepcopy(model)                # hooks go on a copy: the caller's model is never touched
    with eval_mode(work), torch.no_grad():
        (x0, _), chunks = _chunks(data, batch_size, model_device(work), fn)
        flow = _flow(work, name, x0[:1], fn)
        num = flow.num_units
        readers = {id(r): i for i, r in enumerate(flow.readers)}
        sums = [torch.zeros(num, dtype=torch.float64) for _ in readers]
        zeros = [torch.zeros(num, dtype=torch.float64) for _ in readers]
        counts = [torch.zeros(num, dtype=torch.long) for _ in readers]

        def before(r, x):
            u = readers[id(r)]
            s, c = _per_unit(x, r, num)
            z, _ = _per_unit((x == 0).to(x.dtype), r, num)
            sums[u] += s.sum(0).cpu()
            zeros[u] += z.sum(0).cpu()
            counts[u] += c.cpu() * x.shape[0]
            return x

        with intercept(work, flow, before=before):
            for x, _ in chunks:
                work(x)
    return sums, [z.round().long() for z in zeros], counts


def mean_activation(model: nn.Module, layer, data, *, batch_size: int = 256) -> torch.Tensor:
    """[F] float64: mean of each filter's activation over images and positions, as its consumers read it.

    Measured at the consumers' inputs, after the per-channel chain (BN, activation, pooling ...): where
    the chain ends in a ReLU the values are >= 0; where it does not (a linear bottleneck, BN after the
    activation) a mean can be negative, and a large negative mean ranks low. With several consumers,
    the mean of the per-consumer means (each consumer counts equally whatever its spatial size).
    """
    sums, _, counts = _consumer_stats(model, layer, data, batch_size, "mean_activation")
    return torch.stack([s / c.clamp(min=1) for s, c in zip(sums, counts)]).mean(0)


def apoz(model: nn.Module, layer, data, *, batch_size: int = 256) -> torch.Tensor:
    """[F] float64: 1 - APoZ, APoZ being the Average Percentage of Zeros of the filter's activation over
    images and positions (Hu et al. 2016, "Network Trimming"); higher APoZ = less important.

    Measured after the activation, at the consumers' inputs (after pooling too, where the chain pools:
    a max-pool window is zero only when all its inputs are). Entries count as zero when exactly 0.0.
    For an activation that is never exactly zero (sigmoid, GELU) every filter scores about 1: APoZ is
    meant for ReLU networks. With several consumers, the mean of the per-consumer fractions.
    """
    _, zeros, counts = _consumer_stats(model, layer, data, batch_size, "apoz")
    return 1.0 - torch.stack([z.double() / c.clamp(min=1) for z, c in zip(zeros, counts)]).mean(0)


def taylor(model: nn.Module, layer, data, *, batch_size: int = 256) -> torch.Tensor:
    """[F] float64: first-order Taylor importance (Molchanov et al. 2017, "Pruning Convolutional Neural
    Networks for Resource Efficient Inference"), the estimated change of the loss without the filter.

    For image n and filter k, with a the filter's activation at a consumer's input (after the chain,
    where removal happens) and g = dL_n / da:  s[n, k] = | sum over consumers of mean over positions of
    (a * g) |, and the score is the mean of s[n, k] over images. L_n is image n's own cross-entropy
    (the loss is summed over the batch, so g does not depend on how the data is batched; Molchanov et
    al. average over a minibatch, which scales every score by the same constant). With one consumer
    this is Molchanov's criterion exactly. No per-layer L2 normalisation: it rescales all filters of a
    layer by one constant, so it matters only when ranking across layers, and then it is the caller's
    choice.

    Gradients are taken on a private copy of the model with ``torch.autograd.grad`` w.r.t. the consumer
    inputs only; the model's parameters get no ``.grad``.
    """
    fn = "taylor"
    _check_batch_size(batch_size, fn)
    name, _, _ = _resolve(model, layer, fn)
    work = copy.deepcopy(model).eval().requires_grad_(False)   # no graph through the prefix, no .grad
    (x0, _), chunks = _chunks(data, batch_size, model_device(model), fn)
    with eval_mode(work), torch.no_grad():
        flow = _flow(work, name, x0[:1], fn)
    num = flow.num_units
    total = torch.zeros(num, dtype=torch.float64)
    images, captured = 0, []

    def before(r, x):
        a = x.detach().requires_grad_(True)     # the leaf we differentiate against
        captured.append((a, r))
        return a

    with intercept(work, flow, before=before):
        for x, y in chunks:
            captured.clear()
            with torch.enable_grad():
                logits = work(x)
                check_finite(logits.detach(), fn)
                check_labels(y, logits.shape[1], fn)
                loss = F.cross_entropy(logits.float(), y, reduction="sum")
                grads = torch.autograd.grad(loss, [a for a, _ in captured], allow_unused=True)
            per_image = torch.zeros(x.shape[0], num, dtype=torch.float64, device=x.device)
            for (a, r), g in zip(captured, grads):
                if g is not None:   # a reader whose output the logits do not read contributes 0
                    s, c = _per_unit(a.detach().double() * g.double(), r, num)
                    per_image += s / c.clamp(min=1).to(s.device)
            total += per_image.abs().sum(0).cpu()
            images += x.shape[0]
    return total / images


CRITERIA = {"random": random_scores, "l1": l1_norm, "mean_activation": mean_activation, "apoz": apoz,
            "taylor": taylor}


def get_criterion(name_or_callable):
    """The criterion function named ``name_or_callable`` (a key of ``CRITERIA``), or the callable itself."""
    if callable(name_or_callable):
        return name_or_callable
    if isinstance(name_or_callable, str):
        if name_or_callable in CRITERIA:
            return CRITERIA[name_or_callable]
        raise ValueError(f"get_criterion: unknown criterion {name_or_callable!r}; valid names: "
                         f"{', '.join(repr(k) for k in CRITERIA)}, or pass a callable "
                         "(model, layer, data) -> [F] scores")
    raise TypeError(f"get_criterion: expected a criterion name (str) or a callable, got "
                    f"{type(name_or_callable).__name__}; valid names: {', '.join(repr(k) for k in CRITERIA)}")
