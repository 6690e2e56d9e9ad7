"""Baseline filter-importance criteria, to compare CAR against.

Every criterion is a function ``criterion(model, layer, data, **kw) -> scores: [F] float64`` (on the
CPU) with one importance per filter of ``layer`` (a Conv2d output channel or a Linear output
feature). HIGHER means MORE IMPORTANT for every criterion, so a pruning loop removes the argmin.
Each is deterministic (``random_scores`` given its seed). The model is evaluated in eval mode and
left exactly as it came: weights, buffers, train/eval flags, hooks, and no ``.grad`` set.

The data-driven criteria measure a filter's activation where the network reads it: at the input of
each *consumer* (the next Conv2d / Linear, ``graph.analyze``), i.e. after the per-channel chain
(BatchNorm, activation, pooling, dropout, depthwise conv, flatten) -- the same place where CAR
removes the filter. At a consumer whose input is ``[N, F * width, ...]`` filter k owns the slice
``[k * width, (k + 1) * width)`` of dim 1 (a Linear after flatten: ``width`` = H * W features per
filter); "positions" below are all the entries of that slice of one image. A layer whose channels
enter a residual add is refused, as ``score_layer`` refuses it (``l1_norm`` and ``random_scores``
read no activations and accept any Conv2d / Linear). With several consumers the per-consumer values
are combined as each criterion says.

``data`` takes the forms ``score_layer`` takes: ``(inputs [N, ...], labels [N] int)`` or an iterable
of such batches; it is re-chunked into batches of ``batch_size`` images (default 256).
"""
from __future__ import annotations

import copy
import itertools

import torch
import torch.nn.functional as F
from torch import nn

from .batching import check_finite, check_labels, eval_mode, iter_chunks, model_device
from .dynamic_graph import find_consumers
from .errors import resolve_layer
from .graph import target_num_filters

__all__ = ["random_scores", "l1_norm", "mean_activation", "apoz", "taylor", "CRITERIA", "get_criterion"]


def _resolve(model, layer, fn: str) -> tuple[str, nn.Module, int]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}")
    name, module = resolve_layer(model, layer, fn)
    return name, module, target_num_filters(module)


def random_scores(model: nn.Module, layer, data=None, *, seed: int = 0) -> torch.Tensor:
    """[F] float64 uniform in [0, 1) from a ``torch.Generator`` seeded with ``seed``; ``data`` is unused.

    The chance baseline: any criterion worth using must beat it.
    """
    _, _, num = _resolve(model, layer, "random_scores")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"random_scores: seed must be an int, got {type(seed).__name__}")
    return torch.rand(num, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def l1_norm(model: nn.Module, layer, data=None) -> torch.Tensor:
    """[F] float64: the L1 norm of each filter's weights, sum |W[k]| (Li et al. 2017, "Pruning Filters
    for Efficient ConvNets"); ``data`` is unused.

    Conv2d: ``weight[k]`` is [in / groups, kh, kw]; Linear: ``weight[k]`` is [in]. The bias is left out,
    as in Li et al., who rank the kernels.
    """
    _, module, num = _resolve(model, layer, "l1_norm")
    w = module.weight.detach()
    return w.reshape(num, -1).abs().sum(1, dtype=torch.float64).cpu()


# ---- activations at the consumers ---------------------------------------------------------------------
def _check_batch_size(batch_size, fn: str) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"{fn}: batch_size must be a positive int, got {batch_size!r}")


def _consumers(model: nn.Module, name: str, example: torch.Tensor, fn: str) -> list[tuple[nn.Module, int]]:
    """(module, width) of each consumer of ``name`` (``dynamic_graph.find_consumers``)."""
    return [(c.module, c.width) for c in find_consumers(model, name, example, fn)]


def _owned(x: torch.Tensor, num: int, width: int, fn: str) -> torch.Tensor:
    """[N, F, P]: consumer input ``x`` [N, F * width, ...] with each filter's P = width * rest entries."""
    if x.dim() < 2 or x.shape[1] != num * width:
        raise ValueError(f"{fn}: a consumer's input has shape {tuple(x.shape)}, expected dim 1 of size "
                         f"{num} filters x {width} = {num * width}; the layer's channels must reach the "
                         "consumer along dim 1")
    return x.reshape(x.shape[0], num, -1)


def _chunks(data, batch_size: int, device, fn: str):
    """(first chunk, iterator over all chunks): the first is needed before the pass for the analysis."""
    chunks = iter_chunks(data, batch_size, device, fn)
    first = next(chunks)          # iter_chunks raises ValueError for empty data
    return first, itertools.chain([first], chunks)


def _consumer_stats(model, layer, data, batch_size: int, fn: str):
    """Per consumer u: (sum of activations [F] float64, zeros [F] int64, entries per filter) over data."""
    _check_batch_size(batch_size, fn)
    name, _, num = _resolve(model, layer, fn)
    with eval_mode(model), torch.no_grad():
        (x0, _), chunks = _chunks(data, batch_size, model_device(model), fn)
        consumers = _consumers(model, name, x0[:1], fn)
        sums = [torch.zeros(num, dtype=torch.float64) for _ in consumers]
        zeros = [torch.zeros(num, dtype=torch.int64) for _ in consumers]
        counts = [0] * len(consumers)

        def hook_for(u: int, width: int):
            def hook(_module, args):
                a = _owned(args[0], num, width, fn)
                sums[u] += a.sum((0, 2), dtype=torch.float64).cpu()
                zeros[u] += (a == 0).sum((0, 2)).cpu()
                counts[u] += a.shape[0] * a.shape[2]
            return hook

        handles = [m.register_forward_pre_hook(hook_for(u, w)) for u, (m, w) in enumerate(consumers)]
        try:
            for x, _ in chunks:
                model(x)
        finally:
            for h in handles:
                h.remove()
    return sums, zeros, counts


def mean_activation(model: nn.Module, layer, data, *, batch_size: int = 256) -> torch.Tensor:
    """[F] float64: mean of each filter's activation over images and positions, as its consumers read it.

    Measured at the consumers' inputs, after the per-channel chain (BN, activation, pooling ...): where
    the chain ends in a ReLU the values are >= 0; where it does not (a linear bottleneck, BN after the
    activation) a mean can be negative, and a large negative mean ranks low. With several consumers,
    the mean of the per-consumer means (each consumer counts equally whatever its spatial size).
    """
    sums, _, counts = _consumer_stats(model, layer, data, batch_size, "mean_activation")
    return torch.stack([s / c for s, c in zip(sums, counts)]).mean(0)


def apoz(model: nn.Module, layer, data, *, batch_size: int = 256) -> torch.Tensor:
    """[F] float64: 1 - APoZ, APoZ being the Average Percentage of Zeros of the filter's activation over
    images and positions (Hu et al. 2016, "Network Trimming"); higher APoZ = less important.

    Measured after the activation, at the consumers' inputs (after pooling too, where the chain pools:
    a max-pool window is zero only when all its inputs are). Entries count as zero when exactly 0.0.
    For an activation that is never exactly zero (sigmoid, GELU) every filter scores about 1: APoZ is
    meant for ReLU networks. With several consumers, the mean of the per-consumer fractions.
    """
    _, zeros, counts = _consumer_stats(model, layer, data, batch_size, "apoz")
    return 1.0 - torch.stack([z.double() / c for z, c in zip(zeros, counts)]).mean(0)


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
    name, _, num = _resolve(model, layer, fn)
    work = copy.deepcopy(model).eval().requires_grad_(False)   # no graph through the prefix, no .grad
    (x0, _), chunks = _chunks(data, batch_size, model_device(model), fn)
    consumers = _consumers(work, name, x0[:1], fn)
    total = torch.zeros(num, dtype=torch.float64)
    images, captured = 0, []

    def hook_for(width: int):
        def hook(_module, args):
            a = args[0].detach().requires_grad_(True)     # the leaf we differentiate against
            captured.append((a, width))
            return (a,) + tuple(args[1:])
        return hook

    handles = [m.register_forward_pre_hook(hook_for(w)) for m, w in consumers]
    try:
        for x, y in chunks:
            captured.clear()
            with torch.enable_grad():
                logits = work(x)
                check_finite(logits.detach(), fn)
                check_labels(y, logits.shape[1], fn)
                loss = F.cross_entropy(logits.float(), y, reduction="sum")
                grads = torch.autograd.grad(loss, [a for a, _ in captured], allow_unused=True)
            per_image = torch.zeros(x.shape[0], num, dtype=torch.float64, device=x.device)
            for (a, width), g in zip(captured, grads):
                if g is not None:   # a consumer whose output the logits do not read contributes 0
                    prod = _owned(a.detach(), num, width, fn).double() * _owned(g, num, width, fn).double()
                    per_image += prod.mean(2)
            total += per_image.abs().sum(0).cpu()
            images += x.shape[0]
    finally:
        for h in handles:
            h.remove()
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
