"""The scoring engine: ``LayerScorer`` (prepared once, scored many times) and ``score_layer``.

Per chunk of images the prefix runs once (docs/design.md 3.1) and yields the consumers' inputs A and
outputs Z, the boundary values B and the intact logits; when the whole data set's prefix fits the
memory budget it is kept, so later ``score`` calls (greedy pruning re-scores) skip it. Then, for every
scored filter, the ablated logits come from one of three methods:

- ``closed_form``: the consumer is followed by an elementwise epilogue and an affine tail
  (``closed_form.py``); one fused op computes all pairs and reduces them to counts
  (``ops/closed_form_score.py``).
- ``suffix``: Z - U_k(A_k) (``ops/consumer_delta.py``) runs through the rest of the network, many pairs
  per call, on an optimised copy of the suffix (``suffix_opt.py``, ``suffix_eval.py``); on the GPU backends
  one op gives the consumer's output after its epilogue for all pairs of a batch
  (``ops/ablated_consumer.py``, ``fused_suffix.py``). The suffix may run in bf16/fp16 with an exact
  float32 re-run of the pairs whose top-1 margin is too small to trust (``precision.py``).
- ``full_network``: for models torch.fx cannot trace, the whole network reruns with the owned input
  slice of each consumer zeroed by a hook (the naive method, exact by construction).

Pairs whose filter is all zero on an image equal the intact result and are not evaluated (3.5). Each
batch of ablated logits reduces to per-(filter, class) counts and loss sums (``ops/score_reduce.py``).

Greedy pruning removes filters one at a time with ``remove(k)``: the cached state is updated in place
(docs/design.md 3.7: A_k <- 0, Z <- Z - U_k(A_k), logits and base results recomputed from the new Z) instead
of being rebuilt; a prefix that is streamed gets the same updates, in the same order, on every pass.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import itertools
import time
from dataclasses import dataclass

import torch
from torch import nn

from carfast.batching import (
    Progress,
    as_batches,
    check_batch,
    check_finite,
    check_labels,
    check_work_sizes,
    default_memory_budget,
    eval_mode,
    iter_chunks,
    model_dtype,
)
from carfast.distributed import UNSET, process_group_argument, resolve_group
from carfast.errors import resolve_layer
from carfast.graph import analyze as analyze_flow
from carfast.graph import from_recording
from carfast.graph.masking import keep_mask
from carfast.graph.split import TraceError, analyze, target_num_filters
from carfast.ops.consumer_delta import consumer_delta, owned_weight
from carfast.ops.score_reduce import pair_results
from carfast.scoring.checks import check_filters, count_images, meta_bytes, nbytes, pick_backend, work_model
from carfast.scoring.closed_form import find_closed_form
from carfast.scoring.fused_suffix import find_fused_consumer
from carfast.scoring.method_evaluators import ClosedFormEvaluator, FullNetworkEvaluator, split_outputs
from carfast.scoring.pairs import Accumulator, suffix_base_logits
from carfast.scoring.precision import check_precision
from carfast.scoring.scores import LayerScores
from carfast.scoring.suffix_eval import SuffixEvaluator
from carfast.scoring.suffix_opt import optimized_suffix

__all__ = ["ScoreOptions", "LayerScorer", "score_layer"]

_FN = "score_layer"


@dataclass
class ScoreOptions:
    """Engine settings beyond the public arguments.

    fold_bn: run an optimised copy of the suffix: Conv2d->BatchNorm folded, and on CPU conv->relu and
        conv->add->relu fused into oneDNN convolutions (``suffix_opt.py``; float rounding only; default on).
    channels_last: run the suffix channels_last (default: on CPU, where oneDNN is faster so, and on GPU
        with precision bf16/fp16, cuDNN's layout for tensor-core convolutions).
    chunk_images: images per prefix chunk (default: from the memory budget, at most 2048).
    prefix_batch: images per prefix call inside a chunk (default 128 on CPU: faster than huge batches).
    cache: keep the prefix of the whole data set when it fits the budget (``score_layer``, which scores
        once, does not).
    fused_consumer: evaluate the consumer and its epilogue with the ``ablated_consumer`` op and run only
        the network after it (default: with the triton and cuda backends, where the op is a fused kernel;
        True also on the others, where it runs the op's reference; it applies where ``fused_suffix.py``
        finds a single Conv2d consumer).
    """
    fold_bn: bool = True
    channels_last: bool | None = None
    chunk_images: int | None = None
    prefix_batch: int | None = None
    cache: bool = True
    fused_consumer: bool | None = None


class LayerScorer:
    """One layer prepared for CAR scoring: graph split, memory plan, and the prefix cache.

    ``LayerScorer(model, layer, data, ...)`` takes the arguments of ``score_layer`` except ``filters``
    and ``per_image``; ``score(filters=None, per_image=False)`` returns ``LayerScores``. The first
    ``score`` runs the prefix over the data and keeps it when it fits the memory budget, so later calls
    only evaluate ablations. The model must not change between calls (the scorer holds a folded copy
    of the suffix). A one-shot iterator as data can be scored once unless its prefix was kept.
    ``remove(k)`` removes filter k for good (greedy pruning): later scores are those of the model
    without the removed filters, and score only the filters that remain.
    """

    fn = "score_layer"     # the public function named in messages
    as_group = False       # score the layer's coupling group (``GroupScorer``)

    def __init__(self, model: nn.Module, layer, data, *, device=None, batch_size: int | None = None,
                 memory_budget: int | None = None, backend: str = "auto", precision: str = "fp32", progress=None,
                 process_group=None, options: ScoreOptions | None = None, group=UNSET):
        self.options = options or ScoreOptions()
        self.process_group = resolve_group(process_group_argument(process_group, group, self.fn), self.fn)
        self.dtype = check_precision(precision, self.fn)
        self.precision = precision
        if not isinstance(model, nn.Module):
            raise TypeError(f"{self.fn}: model must be a torch.nn.Module, got {type(model).__name__}")
        self.name, module = resolve_layer(model, layer, self.fn)
        self.num_filters = target_num_filters(module)
        check_work_sizes(batch_size, memory_budget, self.fn)
        self.model, self.device = work_model(model, device)
        self.in_dtype = model_dtype(self.model, self.fn)
        self.kernel = pick_backend(backend, self.device, self.fn)
        self.budget = int(memory_budget) if memory_budget is not None else default_memory_budget(self.device)
        self.progress = progress
        self.data = data
        batches = iter(as_batches(data, self.fn))
        first = next(batches, None)
        if first is None:
            raise ValueError(f"{self.fn}: data holds no images; pass at least one (inputs, labels) pair")
        x0, _ = check_batch(first, self.fn, self.in_dtype)
        if x0.shape[0] == 0:
            raise ValueError(f"{self.fn}: the first batch of data is empty; pass non-empty batches")
        self._first_pass = itertools.chain([first], batches)
        self.num_images_hint = count_images(data)    # for the progress bar; None when unknown
        self._one_shot = isinstance(data, collections.abc.Iterator)   # a generator: can be read once
        example = x0[:1].to(self.device)
        cpu = self.device.type == "cpu"
        self.prefix_batch = self.options.prefix_batch or (128 if cpu else 1024)
        self.trace_error = None
        with eval_mode(self.model), torch.no_grad():
            try:
                self.lg = analyze(self.model, self.name, example, fn=self.fn, group=self.as_group)
                self.flow = self.lg.flow
            except TraceError as err:
                self.lg, self.trace_error = None, str(err)
                self.flow = analyze_flow(self.model, self.name, example, self.fn, group=self.as_group,
                                         graph=from_recording(self.model, example))
            self.num_filters = self.flow.num_units
            self.removed: list[int] = []
            self._plan(example, batch_size, cpu)
        self._cache: list | None = [] if self.options.cache else None
        self._cache_complete = False

    # ---- planning -------------------------------------------------------------------------------------
    def _plan(self, example, batch_size, cpu):
        opt = self.options
        self.fused = None
        if self.lg is None:
            self.method, self.cf = "full_network", None     # score_reduce runs on the backend picked
            per_image = 8 * nbytes(example.shape)     # inputs and logits are cached; activations transient
            self.cache_bytes_per_image = nbytes(example.shape)
            per_pair = 0
            self.pair_batch = batch_size or self.prefix_batch
            self.evaluator = FullNetworkEvaluator(self.model, self.flow, self.pair_batch, self.kernel, self.fn)
        else:
            lg = self.lg
            self.cf = find_closed_form(lg)
            self.method = "closed_form" if self.cf is not None else "suffix"
            if self.kernel == "cpu" and (self.cf is None or self.cf.kind == "linear"):
                self.kernel = "torch"  # no C++ kernel for a general suffix or a Linear consumer
            # channels_last: oneDNN's fast layout on CPU, and cuDNN's for bf16/fp16 tensor-core convolutions
            self.channels_last = opt.channels_last if opt.channels_last is not None else \
                cpu or self.dtype != torch.float32
            self.suffix = optimized_suffix(lg.suffix, self.channels_last) \
                if opt.fold_bn and self.cf is None else lg.suffix
            fuse = opt.fused_consumer if opt.fused_consumer is not None else self.kernel in ("triton", "cuda")
            if self.cf is None and fuse:
                self.fused = find_fused_consumer(lg)
                if self.fused is not None and opt.fold_bn:
                    self.fused.post = optimized_suffix(self.fused.post, self.channels_last)
            cached = [c.node.args[0] for c in lg.consumers] + [c.node for c in lg.consumers] + lg.boundary
            widest = max(meta_bytes(n for n in lg.gm.graph.nodes if n.op != "get_attr"))
            self.cache_bytes_per_image = sum(meta_bytes(cached))
            per_image = 2 * self.cache_bytes_per_image + 3 * widest
            per_pair = 4 * max(meta_bytes(lg.changed) + [1]) + 2 * sum(meta_bytes(cached[len(lg.consumers):]))
            if self.cf is not None:   # the closed form works on whole chunks: a few Z-sized temporaries
                per_image += 4 * meta_bytes([lg.consumers[0].node])[0]
            self.pair_batch = batch_size or (128 if cpu else 4096)
            self.pair_batch = max(1, min(self.pair_batch, (self.budget // 2) // per_pair))
            self.evaluator = ClosedFormEvaluator(lg, self.cf, self.kernel, self.fn) if self.cf is not None else \
                SuffixEvaluator(lg, self.suffix, self.fused, self.channels_last, self.dtype, self.kernel,
                                self.pair_batch, self.removed)
        if self.budget < per_image + per_pair:
            raise ValueError(f"{self.fn}: memory_budget={self.budget} bytes is too small for one image at layer "
                             f"{self.name!r} (needs at least {per_image + per_pair}); raise memory_budget")
        work = self.pair_batch * per_pair
        # at most a quarter of what is left for the transient chunk, the rest for the cache
        self.chunk = opt.chunk_images or max(1, min(2048, (self.budget - work) // (4 * per_image)))
        self.cache_budget = self.budget - work - self.chunk * per_image

    # ---- the prefix, cached when it fits ------------------------------------------------------------------
    def _prefix(self, x: torch.Tensor) -> tuple:
        """Run the prefix over a chunk in sub-batches; returns the concatenated outputs."""
        parts = []
        for s in range(0, x.shape[0], self.prefix_batch):
            xb = x[s:s + self.prefix_batch]
            parts.append(self.lg.prefix(xb) if self.lg is not None else (xb, self.model(xb)))
        return tuple(torch.cat(p) for p in zip(*parts)) if len(parts) > 1 else parts[0]

    def _chunks(self):
        """Yield (y, outputs, base_correct, base_loss) per chunk, from the cache or by running the prefix."""
        if self._cache_complete:
            yield from self._cache
            return
        if self._first_pass is not None:
            stream, self._first_pass = self._first_pass, None
        elif self._one_shot:
            raise ValueError(f"{self.fn}: data is a one-shot iterator and was consumed by the first score (its "
                             "prefix did not fit the memory budget); pass a list, tensors or a DataLoader")
        else:
            stream = self.data
        if self._cache is not None:
            self._cache = []     # a pass cut short before (an exception) must not leave chunks behind
        used = 0
        for x, y in iter_chunks(stream, self.chunk, self.device, self.fn, self.in_dtype):
            outs = self._prefix(x)
            logits = outs[-1]
            check_finite(logits, self.fn)
            check_labels(y, logits.shape[1], self.fn)
            entry = (y, outs, *pair_results(logits, y))
            if self._cache is not None:
                used += y.numel() * self.cache_bytes_per_image
                if used <= self.cache_budget:
                    self._cache.append(entry)
                else:
                    self._cache = None   # does not fit: stream the prefix on every score
            # a fresh chunk gets the removals made so far, in order (the full network reruns once, with all)
            for k in (self.removed if self.lg is not None else self.removed[-1:]):
                entry = self._remove_from(entry, k)
            yield entry
        if self._cache is not None:
            self._cache_complete = True

    def prepare(self) -> "LayerScorer":
        """Run the prefix over the data now, keeping it when it fits (so ``score`` times only ablations)."""
        if not self._cache_complete:
            with eval_mode(self.model), torch.no_grad():
                for _ in self._chunks():
                    pass
        return self

    @property
    def cached(self) -> bool:
        """Whether the prefix of the whole data set is held in memory."""
        return self._cache_complete

    @property
    def remaining(self) -> list[int]:
        """Filter indices not removed, ascending."""
        gone = set(self.removed)
        return [k for k in range(self.num_filters) if k not in gone]

    # ---- incremental removal (greedy pruning) ------------------------------------------------------------
    def remove(self, k: int) -> None:
        """Remove filter ``k`` from the model this scorer evaluates, updating the cached state in place."""
        if isinstance(k, bool) or not isinstance(k, int) and not (isinstance(k, torch.Tensor) and k.numel() == 1):
            raise TypeError(f"{self.fn}: remove takes one int filter index, got {k!r}")
        k = int(k)
        if not 0 <= k < self.num_filters:
            raise ValueError(f"{self.fn}: filter {k} is out of range: layer {self.name!r} has {self.num_filters} "
                             f"filters (0..{self.num_filters - 1})")
        if k in self.removed:
            raise ValueError(f"{self.fn}: filter {k} of {self.name!r} is already removed")
        self.removed.append(k)
        if self._cache_complete:
            with eval_mode(self.model), torch.no_grad():
                self._cache = [self._remove_from(entry, k) for entry in self._cache]

    def _remove_from(self, entry, k: int):
        """One chunk's (y, outs, base_correct, base_loss) with filter k removed (tensors updated in place)."""
        y, outs = entry[0], list(entry[1])
        if self.lg is None:   # full network: rerun with every removed filter zeroed at its consumers
            outs[-1] = self.evaluator.run_removed(outs[0], self.removed[:self.removed.index(k) + 1])
        else:
            u = len(self.lg.consumers)
            A, Z = outs[:u], outs[u:2 * u]
            if self.cf is not None:   # the closed form of removing k is the new base (before Z changes)
                outs[-1] = self.evaluator.ablated(outs, torch.tensor([k]))[0]
            for a, z, c in zip(A, Z, self.lg.consumers):
                s, e = c.owned(k)
                if s == e:
                    continue
                owned = a.narrow(c.axis, s, e - s)
                z.sub_(consumer_delta(c.spec, owned, owned_weight(c.spec, c.index[s:e])))
                owned.zero_()
            if self.cf is None:
                keep = keep_mask(None, self.removed[:self.removed.index(k) + 1], self.num_filters, y.device) \
                    if self.lg.masked else None
                outs[-1] = suffix_base_logits(self.suffix, Z, outs[2 * u:-1], self.pair_batch, self.channels_last,
                                              keep)
        check_finite(outs[-1], self.fn, f"the model's output with filters {self.removed} removed")
        return (y, tuple(outs), *pair_results(outs[-1], y))

    # ---- scoring -------------------------------------------------------------------------------------
    def score(self, filters=None, per_image: bool = False) -> LayerScores:
        """CAR scores of ``filters`` (default all), see ``score_layer``."""
        t0 = time.perf_counter()
        filt = check_filters(self.remaining if filters is None else filters, self.num_filters, self.name, self.fn)
        gone = sorted(set(filt.tolist()) & set(self.removed))
        if gone:
            raise ValueError(f"{self.fn}: filters {gone[:5]} of {self.name!r} were removed; score the remaining ones "
                             "(filters=None scores all that remain)")
        acc = Accumulator(len(filt), per_image)
        total = len(filt) * self.num_images_hint if self.num_images_hint else None
        bar = Progress(self.progress, total, f"scoring {self.name}")
        stats = [0, 0, 0]                    # pairs evaluated, skipped (free zeros), re-run in float32
        weights = None
        if self.method == "suffix":   # each consumer's weight restricted to each filter's inputs, [u][f]
            weights = [[owned_weight(c.spec, c.index[slice(*c.owned(int(k)))]).detach() for k in filt]
                       for c in self.lg.consumers]
        with eval_mode(self.model), torch.no_grad():
            for y, outs, base_correct, base_loss in self._chunks():
                C = outs[-1].shape[1]
                if self.cf is not None:
                    res = self.evaluator.score_chunk(outs, y, filt, stats, bar)
                elif self.lg is None:
                    res = self.evaluator.score_chunk(outs[0], y, filt, self.removed, C, stats, bar)
                else:
                    A, Z, B, _ = split_outputs(outs, len(self.lg.consumers))
                    res = self.evaluator.score_chunk(A, Z, B, y, C, base_correct, base_loss, filt, weights, per_image,
                                                     stats, bar)
                correct, loss_sum, img_correct = res
                acc.add(y, base_correct, base_loss, correct, loss_sum, img_correct, C)
        bar.close()
        if self.process_group is not None:   # every process scored its shard: add the counts up, exactly
            stats = acc.all_reduce(self.process_group, stats, self.fn)
        low = self.method == "suffix" and self.dtype != torch.float32
        return acc.result(self.name, filt, method=self.method, backend=self.kernel, pairs_evaluated=stats[0],
                          pairs_skipped=stats[1], seconds=time.perf_counter() - t0,
                          precision=self.precision if low else "fp32", pairs_rechecked=stats[2],
                          margin_threshold=float(self.evaluator.threshold or 0.0) if low else 0.0)



def score_layer(model: nn.Module, layer, data, *, filters=None, device=None, batch_size: int | None = None,
                memory_budget: int | None = None, backend: str = "auto", precision: str = "fp32", progress=None,
                per_image: bool = False, process_group=None, options: ScoreOptions | None = None,
                group=UNSET) -> LayerScores:
    """Score each filter of ``layer`` by CAR: the accuracy the model loses when that filter is removed.

    Removing filter k means what docs/design.md section 2 says: the channel disappears from every consumer
    (the next Conv2d / Linear), through BatchNorm, activations, pooling, dropout, depthwise convs and
    flatten; results equal re-running the whole network with that channel zeroed at each consumer's
    input, image by image (up to images whose top-1 is a float near tie).

    Args:
        model: an ``nn.Module`` returning logits [N, classes]; evaluated in eval mode and left exactly as
            it came (weights, buffers, train/eval flags, hooks).
        layer: a name from ``model.named_modules()`` or the module: a Conv2d (any groups, bias or not)
            or a Linear. A layer whose channels enter a residual add is refused (coupled channels).
        data: ``(inputs [N, ...], labels [N] int)`` or an iterable of such batches (a DataLoader).
        filters: filter indices to score, in the order wanted (default all).
        device: where to compute (default: where the model's parameters are; the model is copied, never
            moved, when another device is asked for).
        batch_size: (filter, image) pairs per evaluation of the network's suffix (default 128 on CPU,
            4096 on GPU, reduced to fit the memory budget).
        memory_budget: bytes the engine may use for cached activations and work (default: a quarter of
            free host memory up to 8 GiB, or half of free GPU memory); it works in chunks of images.
        backend: "auto", "torch" (plain PyTorch), "cpu" (the compiled C++ kernels), "triton", "cuda" (the GPU
            kernels); "auto" picks cuda, then triton, on a GPU and cpu on the CPU, where available.
        precision: "fp32" (default), "bf16" or "fp16": the suffix's arithmetic. Low precision re-runs in
            float32 every pair whose top-1 margin is below a calibrated threshold (``carfast.precision``), so
            accuracies equal float32's; ``pairs_rechecked`` says how many. Applies to the suffix method; the
            closed form and the full-network method always compute in float32.
        progress: None (a bar on stderr when it is a terminal), True, False, or ``callable(done, total)``.
        per_image: also return ``image_correct`` [F, N] bool and ``base_image_correct`` [N] bool (with
            several processes: of this process's images).
        process_group: several processes (``torch.distributed``), each passing its own shard of the data: the
            counts are all-reduced, so every process returns the scores of all the shards, equal to one
            process scoring them all (counts exactly; loss sums up to float rounding). None (default):
            the default process group when ``torch.distributed`` is initialised, else this process alone;
            a ``ProcessGroup``; or False for this process alone. A process that fails makes the others
            raise RuntimeError after the process group's timeout (``carfast.distributed``).
        options: ``ScoreOptions`` engine settings.
        group: the deprecated name of ``process_group``.
    Returns:
        ``LayerScores`` (see ``carfast.scoring.scores``).
    Raises:
        ValueError / TypeError for bad input, each naming the problem and the fix.
    """
    if isinstance(model, nn.Module):   # check filters before the work of preparing the layer
        name, module = resolve_layer(model, layer, _FN)
        check_filters(filters, target_num_filters(module), name)
    options = dataclasses.replace(options or ScoreOptions(), cache=False)   # one score: nothing to keep
    scorer = LayerScorer(model, layer, data, device=device, batch_size=batch_size, memory_budget=memory_budget,
                         backend=backend, precision=precision, progress=progress, process_group=process_group,
                         options=options, group=group)
    return scorer.score(filters, per_image=per_image)
