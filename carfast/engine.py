"""The scoring engine: ``score_layer`` and the loops that evaluate (filter, image) ablation pairs.

Per chunk of images (sized to the memory budget) the prefix runs once (design.md 3.1) and yields the
consumers' inputs A and outputs Z, the boundary values and the intact logits. Then, for every scored
filter, the ablated logits come from one of three methods:

- ``closed_form``: the consumer is followed by an elementwise epilogue and an affine tail
  (``closed_form.py``); one fused op computes all pairs (``ops/closed_form_logits.py``).
- ``suffix``: Z - U_k(A_k) (``ops/consumer_delta.py``) runs through the rest of the network, many pairs
  per call, the suffix's Conv2d->BN pairs folded.
- ``full_network``: for models torch.fx cannot trace, the whole network reruns with the owned input
  slice of each consumer zeroed by a hook (the naive method, exact by construction).

Pairs whose filter is all zero on an image equal the intact result and are skipped (3.5).
"""
from __future__ import annotations

import copy
import itertools
import time
from dataclasses import dataclass

import torch
from torch import nn

from . import _ext
from .batching import (Progress, _as_batches, _check_batch, check_finite, check_labels, default_memory_budget,
                       eval_mode, iter_chunks)
from .closed_form import find_closed_form
from .dynamic_graph import discover_consumers
from .errors import resolve_layer
from .graph import TraceError, analyze, optimized_suffix, target_num_filters
from .ops.closed_form_logits import closed_form_logits
from .ops.consumer_delta import consumer_delta, owned_weight
from .ops.score_reduce import score_reduce_ref
from .scores import LayerScores

__all__ = ["ScoreOptions", "score_layer"]

_FN = "score_layer"
_BACKENDS = ("auto", "torch", "cpu", "triton", "cuda")


@dataclass
class ScoreOptions:
    """Engine settings beyond the public arguments.

    fold_bn: fold Conv2d->BatchNorm pairs of the suffix (float rounding only; default on).
    channels_last: run the suffix channels_last (default: on CPU).
    chunk_images: images per prefix chunk (default: from the memory budget, at most 2048).
    """
    fold_bn: bool = True
    channels_last: bool | None = None
    chunk_images: int | None = None


def _check_filters(filters, num: int, name: str) -> torch.Tensor:
    if filters is None:
        return torch.arange(num)
    f = torch.as_tensor(filters)
    if f.dim() != 1 or f.dtype.is_floating_point or f.dtype == torch.bool:
        raise TypeError(f"{_FN}: filters must be a 1-D list of int filter indices, got {filters!r}")
    f = f.long()
    if f.numel() == 0:
        raise ValueError(f"{_FN}: filters is empty; pass None to score all {num} filters")
    bad = f[(f < 0) | (f >= num)]
    if bad.numel():
        raise ValueError(f"{_FN}: filter {int(bad[0])} is out of range: layer {name!r} has {num} filters "
                         f"(0..{num - 1})")
    if f.unique().numel() != f.numel():
        dup = [int(v) for v in f.unique() if int((f == v).sum()) > 1]
        raise ValueError(f"{_FN}: filters repeat {dup[:5]}; list each filter once")
    return f


def _pick_backend(backend: str, device: torch.device) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"{_FN}: backend {backend!r} unknown; choose one of {', '.join(_BACKENDS)}")
    if backend == "auto":
        return "cpu" if device.type == "cpu" and _ext.has_backend("cpu") else "torch"
    if backend != "torch":
        _ext.require_backend(backend)
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"{_FN}: backend 'cpu' runs on the CPU but the model is on {device}; pass device='cpu' "
                         "or backend='auto'")
    return backend


def _work_model(model: nn.Module, device) -> tuple[nn.Module, torch.device]:
    p = next(itertools.chain(model.parameters(), model.buffers()), None)
    home = p.device if p is not None else torch.device("cpu")
    if device is None or torch.device(device) == home:
        return model, home
    return copy.deepcopy(model).to(device), torch.device(device)  # never move the user's model


def _nbytes(shape, dtype=torch.float32) -> int:
    n = 1
    for s in shape[1:]:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


class _Accumulator:
    """Integer counts and float64 loss sums over chunks; optional per-image results."""

    def __init__(self, num_filters: int, per_image: bool):
        self.F, self.per_image = num_filters, per_image
        self.C = None
        self.n = 0
        self.image_correct, self.base_image_correct = [], []

    def start(self, num_classes: int, device):
        if self.C is None:
            self.C = num_classes
            self.class_totals = torch.zeros(num_classes, dtype=torch.long, device=device)
            self.base_correct = torch.zeros(num_classes, dtype=torch.long, device=device)
            self.correct = torch.zeros(self.F, num_classes, dtype=torch.long, device=device)
            self.base_loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            self.loss_sum = torch.zeros(self.F, dtype=torch.float64, device=device)

    def add(self, y, base_correct, base_loss, img_correct, img_loss):
        """y [n]; base_correct [n] bool; base_loss [n] f64; img_correct [F, n] bool; img_loss [F, n] f64."""
        self.n += y.numel()
        self.class_totals += torch.bincount(y, minlength=self.C)
        self.base_correct.index_add_(0, y, base_correct.long())
        self.correct.index_add_(1, y, img_correct.long())
        self.base_loss_sum += base_loss.sum()
        self.loss_sum += img_loss.sum(1)
        if self.per_image:
            self.image_correct.append(img_correct.cpu())
            self.base_image_correct.append(base_correct.cpu())

    def result(self, name, filters, **info) -> LayerScores:
        return LayerScores(
            layer=name, filters=filters.cpu(), num_images=self.n, class_totals=self.class_totals.cpu(),
            base_correct=self.base_correct.cpu(), correct=self.correct.cpu(),
            base_loss_sum=float(self.base_loss_sum), loss_sum=self.loss_sum.cpu(),
            image_correct=torch.cat(self.image_correct, 1) if self.per_image else None,
            base_image_correct=torch.cat(self.base_image_correct) if self.per_image else None, **info)


def score_layer(model: nn.Module, layer, data, *, filters=None, device=None, batch_size: int | None = None,
                memory_budget: int | None = None, backend: str = "auto", progress=None, per_image: bool = False,
                options: ScoreOptions | None = None) -> LayerScores:
    """Score each filter of ``layer`` by CAR: the accuracy the model loses when that filter is removed.

    Args:
        model: an ``nn.Module`` returning logits [N, classes]; evaluated in eval mode and left exactly as
            it came (weights, buffers, train/eval flags, hooks).
        layer: a name from ``model.named_modules()`` or the module: a Conv2d (any groups, bias or not)
            or a Linear.
        data: ``(inputs [N, ...], labels [N] int)`` or an iterable of such batches (a DataLoader).
        filters: filter indices to score, in the order wanted (default all).
        device: where to compute (default: where the model's parameters are).
        batch_size: (filter, image) pairs per evaluation of the network's suffix (default: 128 on CPU,
            4096 on GPU, reduced to fit the memory budget).
        memory_budget: bytes the engine may use for cached activations and work (default: a quarter of
            free host memory up to 8 GiB, or half of free GPU memory); it works in chunks of images.
        backend: "auto", "torch" (plain PyTorch), "cpu" (the compiled C++ kernels), "triton", "cuda".
        progress: None (a bar on stderr when it is a terminal), True, False, or ``callable(done, total)``.
        per_image: also return ``image_correct`` [F, N] and ``base_image_correct`` [N].
        options: ``ScoreOptions`` engine settings.
    Returns:
        ``LayerScores`` (see ``carfast.scores``).
    Raises:
        ValueError / TypeError for bad input (each message names the problem and the fix), ValueError
        when the layer's channels are coupled through a residual add.
    """
    t0 = time.perf_counter()
    options = options or ScoreOptions()
    name, module = resolve_layer(model, layer, _FN)
    num = target_num_filters(module)
    filt = _check_filters(filters, num, name)
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"{_FN}: batch_size must be a positive int, got {batch_size!r}")
    if memory_budget is not None and (not isinstance(memory_budget, (int, float)) or memory_budget <= 0):
        raise ValueError(f"{_FN}: memory_budget must be a positive number of bytes, got {memory_budget!r}")
    work, dev = _work_model(model, device)
    kernel = _pick_backend(backend, dev)
    budget = int(memory_budget) if memory_budget is not None else default_memory_budget(dev)
    batches = iter(_as_batches(data, _FN))
    first = next(batches, None)
    if first is None:
        raise ValueError(f"{_FN}: data holds no images; pass at least one (inputs, labels) pair")
    x0, _ = _check_batch(first, _FN)
    if x0.shape[0] == 0:
        raise ValueError(f"{_FN}: the first batch of data is empty; pass non-empty batches")
    stream = itertools.chain([first], batches)
    example = x0[:1].to(dev)
    with eval_mode(work), torch.no_grad():
        try:
            lg = analyze(work, name, example)
        except TraceError:
            lg = None
        if lg is None:
            consumers = discover_consumers(work, name, example)
            return _score_full_network(work, name, consumers, stream, filt, dev, batch_size, budget, progress,
                                       per_image, example, t0)
        return _score_traced(lg, stream, filt, dev, kernel, batch_size, budget, progress, per_image, options, t0)


def _score_traced(lg, stream, filt, dev, kernel, batch_size, budget, progress, per_image, options, t0):
    cf = find_closed_form(lg)
    method = "closed_form" if cf is not None else "suffix"
    if cf is None:
        kernel = "torch"  # no compiled kernel applies to a general suffix: it runs in PyTorch
    cl = options.channels_last if options.channels_last is not None else dev.type == "cpu"
    suffix = optimized_suffix(lg.suffix, cl) if options.fold_bn and cf is None else lg.suffix
    # memory plan: per image, the cached tensors (and their transient twin while the prefix runs)
    # plus, per (filter, image) pair, the suffix's widest activations
    metas = [n.meta["tensor_meta"] for n in lg.gm.graph.nodes if "tensor_meta" in n.meta
             and hasattr(n.meta["tensor_meta"], "shape")]
    widest = max(_nbytes(m.shape, m.dtype) for m in metas)
    cached = [c.node.args[0] for c in lg.consumers] + [c.node for c in lg.consumers] + lg.boundary
    per_image_bytes = 2 * sum(_nbytes(n.meta["tensor_meta"].shape) for n in cached) + 3 * widest
    suffix_metas = [n.meta["tensor_meta"] for n in lg.changed if "tensor_meta" in n.meta
                    and hasattr(n.meta["tensor_meta"], "shape")]
    per_pair_bytes = 4 * max([_nbytes(m.shape, m.dtype) for m in suffix_metas] + [1]) + \
        2 * sum(_nbytes(n.meta["tensor_meta"].shape) for n in cached[len(lg.consumers):])
    if cf is not None:
        per_image_bytes += 4 * _nbytes(lg.consumers[0].node.meta["tensor_meta"].shape) * \
            (1 if kernel == "cpu" else 2)
    if budget < per_image_bytes + per_pair_bytes:
        raise ValueError(f"{_FN}: memory_budget={budget} bytes is too small for one image at layer {lg.layer!r} "
                         f"(needs at least {per_image_bytes + per_pair_bytes}); raise memory_budget")
    pair_batch = batch_size or (128 if dev.type == "cpu" else 4096)
    pair_batch = max(1, min(pair_batch, (budget // 2) // per_pair_bytes))
    chunk = options.chunk_images or max(1, min(2048, (budget - pair_batch * per_pair_bytes) // per_image_bytes))
    weights = [[owned_weight(c.module, int(k) * c.width, c.width).detach() for k in filt] for c in lg.consumers]
    acc = _Accumulator(len(filt), per_image)
    bar = Progress(progress, None, f"scoring {lg.layer}")
    evaluated = skipped = 0
    u = len(lg.consumers)
    for x, y in iter_chunks(stream, chunk, dev, _FN):
        outs = lg.prefix(x)
        A, Z, B, logits = outs[:u], outs[u:2 * u], outs[2 * u:-1], outs[-1]
        check_finite(logits, _FN)
        acc.start(logits.shape[1], dev)
        check_labels(y, logits.shape[1], _FN)
        base_correct, base_loss = score_reduce_ref(logits, y)
        active = _active_pairs(A, lg.consumers, filt)                      # [F, n] bool
        img_correct = base_correct.expand(len(filt), -1).clone()
        img_loss = base_loss.expand(len(filt), -1).clone()
        if cf is not None:
            R = B[cf.residual_index] if cf.residual_index is not None else None
            abl = closed_form_logits(A[0], cf.weight, Z[0], cf.scale, cf.shift, R, cf.act, cf.tail, logits,
                                     filt.to(dev), cf.stride, cf.padding, cf.dilation, backend=kernel)
            check_finite(abl, _FN, "the model's output with a filter removed")
            c, l = score_reduce_ref(abl.reshape(-1, abl.shape[-1]), y.repeat(len(filt)))
            img_correct, img_loss = c.view(len(filt), -1), l.view(len(filt), -1)
            n_active = int(active.sum())
            evaluated += n_active if kernel == "cpu" else active.numel()
            skipped += active.numel() - n_active if kernel == "cpu" else 0
            bar.update(active.numel())
        else:
            fi, ni = active.nonzero(as_tuple=True)
            for s in range(0, fi.numel(), pair_batch):
                f_b, n_b = fi[s:s + pair_batch], ni[s:s + pair_batch]
                abl = _suffix_logits(suffix, lg.consumers, weights, filt, A, Z, B, f_b, n_b, cl)
                check_finite(abl, _FN, "the model's output with a filter removed")
                c, l = score_reduce_ref(abl, y[n_b])
                img_correct[f_b, n_b], img_loss[f_b, n_b] = c, l
                bar.update(f_b.numel())
            evaluated += fi.numel()
            skipped += active.numel() - fi.numel()
            bar.update(active.numel() - fi.numel())
        acc.add(y, base_correct, base_loss, img_correct, img_loss)
    bar.close()
    return acc.result(lg.layer, filt, method=method, backend=kernel, pairs_evaluated=evaluated,
                      pairs_skipped=skipped, seconds=time.perf_counter() - t0)


def _active_pairs(A, consumers, filt) -> torch.Tensor:
    """[F, n] bool: does filter f have any nonzero activation at any consumer's input on image n?"""
    active = None
    for a, c in zip(A, consumers):
        n = a.shape[0]
        nz = a.reshape(n, a.shape[1] // c.width, -1).ne(0).any(2)       # [n, K]
        nz = nz[:, filt.to(a.device)].t()
        active = nz if active is None else active | nz
    return active


def _suffix_logits(suffix, consumers, weights, filt, A, Z, B, f_b, n_b, channels_last) -> torch.Tensor:
    """Ablated logits [P, classes] for the pairs (filt[f_b[p]], image n_b[p]), f_b sorted."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    runs, counts = torch.unique_consecutive(f_b, return_counts=True)
    zs = []
    for ui, (a, z, c) in enumerate(zip(A, Z, consumers)):
        zp = z[n_b]
        off = 0
        for f, cnt in zip(runs.tolist(), counts.tolist()):
            k = int(filt[f])
            owned = a[n_b[off:off + cnt], k * c.width:(k + 1) * c.width]
            zp[off:off + cnt] -= consumer_delta(c.module, owned, weights[ui][f])
            off += cnt
        zs.append(zp.contiguous(memory_format=fmt) if zp.dim() == 4 else zp)
    bs = [b[n_b].contiguous(memory_format=fmt) if b.dim() == 4 else b[n_b] if isinstance(b, torch.Tensor) else b
          for b in B]
    return suffix(*zs, *bs)


def _score_full_network(model, name, consumers, stream, filt, dev, batch_size, budget, progress, per_image,
                        example, t0):
    """Exact scores by rerunning the whole network per filter, the consumers' owned inputs zeroed by hooks."""
    with torch.no_grad():
        out = model(example)
    chunk = max(1, min(batch_size or 256, budget // max(1, 64 * _nbytes(example.shape))))
    acc = _Accumulator(len(filt), per_image)
    bar = Progress(progress, None, f"scoring {name} (full network)")
    evaluated = 0
    for x, y in iter_chunks(stream, chunk, dev, _FN):
        logits = model(x)
        check_finite(logits, _FN)
        acc.start(out.shape[1], dev)
        check_labels(y, logits.shape[1], _FN)
        base_correct, base_loss = score_reduce_ref(logits, y)
        img_correct = base_correct.expand(len(filt), -1).clone()
        img_loss = base_loss.expand(len(filt), -1).clone()
        for f, k in enumerate(filt.tolist()):
            handles = [c.module.register_forward_pre_hook(_zeroing_hook(k, c.width)) for c in consumers]
            try:
                abl = model(x)
            finally:
                for h in handles:
                    h.remove()
            check_finite(abl, _FN, "the model's output with a filter removed")
            img_correct[f], img_loss[f] = score_reduce_ref(abl, y)
            bar.update(x.shape[0])
        evaluated += x.shape[0] * len(filt)
        acc.add(y, base_correct, base_loss, img_correct, img_loss)
    bar.close()
    return acc.result(name, filt, method="full_network", backend="torch", pairs_evaluated=evaluated,
                      pairs_skipped=0, seconds=time.perf_counter() - t0)


def _zeroing_hook(k: int, width: int):
    def hook(_module, args):
        x = args[0].clone()
        x[:, k * width:(k + 1) * width] = 0
        return (x,) + tuple(args[1:])
    return hook
