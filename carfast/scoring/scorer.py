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
- ``full_network``: for models torch.fx cannot trace, the whole network reruns with the removal applied
  at its readers (the naive method, exact by construction).

Each method is an object with one face (``method.ScoringMethod``; ``suffix_eval.py``,
``closed_form_method.py``, ``full_network_method.py``) over the typed record of what a chunk keeps
(``chunks.Chunk``).

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
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from carfast.batching import (
    as_batches,
    check_batch,
    check_finite,
    check_labels,
    check_topk,
    check_work_sizes,
    default_memory_budget,
    eval_mode,
    iter_chunks,
    model_dtype,
)
from carfast.distributed import process_group_argument, resolve_group
from carfast.graph import analyze as analyze_flow
from carfast.graph import from_recording, members_of
from carfast.graph.split import TraceError, analyze, target_num_filters
from carfast.graph.target import resolve_target
from carfast.ops import dispatch
from carfast.progress import Progress
from carfast.scoring import suffix_opt
from carfast.scoring.checks import (
    check_filters,
    count_images,
    meta_bytes,
    nbytes,
    pick_backend,
    warn_near_chance,
    work_model,
)
from carfast.scoring.chunks import PairStats
from carfast.scoring.closed_form import find_closed_form
from carfast.scoring.closed_form_method import ClosedFormMethod
from carfast.scoring.full_network_method import FullNetworkMethod
from carfast.scoring.fused_suffix import find_fused_consumer
from carfast.scoring.logit_memo import LogitMemo
from carfast.scoring.pairs import Accumulator
from carfast.scoring.precision import check_precision
from carfast.scoring.scores import LayerScores
from carfast.scoring.settings import ScoreSettings, takes_score_options
from carfast.scoring.suffix_eval import SuffixMethod
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
    warn_near_chance: warn (``errors.NearChanceWarning``) when the first score finds the intact model's
        accuracy near chance (``checks.near_chance``); ``carfast.prune`` checks once itself and turns it off
        for its scorers.
    """
    fold_bn: bool = True
    channels_last: bool | None = None
    chunk_images: int | None = None
    prefix_batch: int | None = None
    cache: bool = True
    fused_consumer: bool | None = None
    warn_near_chance: bool = True


#: the ops a method runs with its backend: the conv closed form, and the others (suffix, linear closed form)
_CONV_CLOSED_FORM_OPS = ("closed_form_score", "closed_form_logits")
_REDUCE_OPS = ("score_reduce", "ablated_consumer")


def one_score(settings: dict, fn: str) -> dict:
    """``settings`` for a scorer that scores once: ``ScoreOptions.cache`` off (nothing to keep)."""
    options = ScoreSettings.of(settings, fn).options
    return {**settings, "options": dataclasses.replace(options or ScoreOptions(), cache=False)}


class LayerScorer:
    """One target prepared for CAR scoring: graph split, memory plan, the scoring method, the prefix cache.

    ``LayerScorer(model, target, data, ...)`` takes the arguments of ``score_layer`` except ``filters``
    and ``per_image``: ``target`` is a layer or ``carfast.Group(layer)`` (``graph/target.py``);
    ``score(filters=None, per_image=False)`` returns ``LayerScores``. The first
    ``score`` runs the prefix over the data and keeps it when it fits the memory budget, so later calls
    only evaluate removals. The model must not change between calls (the scorer holds a folded copy
    of the suffix). A one-shot iterator as data can be scored once unless its prefix was kept.
    ``remove(k)`` removes filter k for good (greedy pruning): later scores are those of the model
    without the removed filters, and score only the filters that remain. For a group target the
    "filters" are the group's channels (``members`` lists the layers they span); ``GroupScorer`` is this
    scorer with every target taken as a group.
    """

    fn = "score_layer"     # the public function named in messages
    as_group = False       # every target is a coupling group (``GroupScorer``); else ``Group`` targets only

    @takes_score_options
    def __init__(self, model: nn.Module, layer, data, **settings):
        s = ScoreSettings.of(settings, self.fn)
        device, batch_size, memory_budget, backend, precision, progress = (
            s.device, s.batch_size, s.memory_budget, s.backend, s.precision, s.progress)
        self._options = s.options or ScoreOptions()
        self.topk = check_topk(s.topk, self.fn)
        self._process_group = resolve_group(process_group_argument(s.process_group, s.group, self.fn), self.fn)
        self._dtype = check_precision(precision, self.fn)
        if not isinstance(model, nn.Module):
            raise TypeError(f"{self.fn}: model must be a torch.nn.Module, got {type(model).__name__}")
        self.name, _, self.as_group = resolve_target(model, layer, self.fn, self.as_group)
        check_work_sizes(batch_size, memory_budget, self.fn)
        self._model, self._device = work_model(model, device)
        self._in_dtype = model_dtype(self._model, self.fn)
        self._backend = pick_backend(backend, self._device, self.fn)
        self._asked_backend = backend
        self._budget = int(memory_budget) if memory_budget is not None else default_memory_budget(self._device)
        self._progress, self._data = progress, data
        batches = iter(as_batches(data, self.fn))
        first = next(batches, None)
        if first is None:
            raise ValueError(f"{self.fn}: data holds no images; pass at least one (inputs, labels) pair")
        x0, _ = check_batch(first, self.fn, self._in_dtype)
        if x0.shape[0] == 0:
            raise ValueError(f"{self.fn}: the first batch of data is empty; pass non-empty batches")
        self._first_pass = itertools.chain([first], batches)
        self._num_images_hint = count_images(data)    # for the progress bar; None when unknown
        self._one_shot = isinstance(data, collections.abc.Iterator)   # a generator: can be read once
        example = x0[:1].to(self._device)
        self.removed: list[int] = []
        with eval_mode(self._model), torch.no_grad():
            try:
                lg = analyze(self._model, self.name, example, fn=self.fn, group=self.as_group)
                self.flow = lg.flow
            except TraceError:
                lg = None
                self.flow = analyze_flow(self._model, self.name, example, self.fn, group=self.as_group,
                                         graph=from_recording(self._model, example))
            self.num_filters = self.flow.num_units
            self._plan(lg, example, batch_size, precision)
        self._cache: list | None = [] if self._options.cache else None
        self._cache_complete = False
        self._memo = LogitMemo()     # the scored logits the next removal may take (held prefix only)
        self._check_chance = self._options.warn_near_chance    # on the first score of the intact model

    # ---- what the caller may read -----------------------------------------------------------------------
    @property
    def method(self) -> str:
        """"closed_form", "suffix" or "full_network" (see the module docstring)."""
        return self._method.name

    @property
    def precision(self) -> str:
        """The suffix's arithmetic: "fp32", "bf16" or "fp16" (the closed form and full network: "fp32")."""
        return self._method.precision

    @property
    def backend(self) -> str:
        """The backend the method's ops run on."""
        return self._method.backend

    #: why ``backend`` is not the one asked for ("" when it is): backend="cpu" runs "torch" where it has no kernel
    backend_note: str = ""

    @property
    def pair_batch(self) -> int:
        """(filter, image) pairs per evaluation of the network's suffix."""
        return self._pair_batch

    @property
    def chunk_images(self) -> int:
        """Images per prefix chunk (from the memory budget)."""
        return self._chunk

    @property
    def channels_last(self) -> bool:
        """Whether the suffix runs channels_last."""
        return getattr(self._method, "channels_last", False)

    @property
    def process_group(self):
        """The ``torch.distributed`` process group the counts are summed over, or None (this process alone)."""
        return self._process_group

    @property
    def cached(self) -> bool:
        """Whether the prefix of the whole data set is held in memory."""
        return self._cache_complete

    @property
    def members(self) -> list[dict] | None:
        """A group target's layers and channel mappings (``groups.GroupMember.to_dict``); None for a layer."""
        return [m.to_dict() for m in members_of(self.flow)] if self.as_group else None

    @property
    def remaining(self) -> list[int]:
        """Filter indices not removed, ascending."""
        gone = set(self.removed)
        return [k for k in range(self.num_filters) if k not in gone]

    # ---- planning -------------------------------------------------------------------------------------
    def _plan(self, lg, example, batch_size, precision):
        """Pick the method and size the work: pairs per call, images per chunk, the cache's share."""
        opt, cpu = self._options, self._device.type == "cpu"
        prefix_batch = opt.prefix_batch or (128 if cpu else 1024)
        if lg is None:
            self._cache_bytes = nbytes(example.shape)   # inputs and logits are cached; activations transient
            per_image, per_pair = 8 * self._cache_bytes, 0
            self._pair_batch = batch_size or prefix_batch
            self._method = FullNetworkMethod(self._model, self.flow, self._pair_batch, self._backend, self.fn)
        else:
            cf = find_closed_form(lg)
            per_image, per_pair = self._plan_split(lg, cf, batch_size, cpu)
            self._method = self._split_method(lg, cf, cpu, prefix_batch, precision)
        if self._budget < per_image + per_pair:
            raise ValueError(f"{self.fn}: memory_budget={self._budget} bytes is too small for one image at layer "
                             f"{self.name!r} (needs at least {per_image + per_pair}); raise memory_budget")
        work = self._pair_batch * per_pair
        # at most a quarter of what is left for the transient chunk, the rest for the cache
        self._chunk = opt.chunk_images or max(1, min(2048, (self._budget - work) // (4 * per_image)))
        self._cache_budget = self._budget - work - self._chunk * per_image

    def _plan_split(self, lg, cf, batch_size, cpu) -> tuple[int, int]:
        """(bytes per image, bytes per pair) of the suffix / closed-form methods; sets the pair batch."""
        cached = [c.node.args[0] for c in lg.consumers] + [c.node for c in lg.consumers] + lg.boundary
        widest = max(meta_bytes(n for n in lg.gm.graph.nodes if n.op != "get_attr"))
        self._cache_bytes = sum(meta_bytes(cached))
        per_image = 2 * self._cache_bytes + 3 * widest
        if cf is not None:   # the closed form works on whole chunks: a few Z-sized temporaries
            per_image += 4 * meta_bytes([lg.consumers[0].node])[0]
        per_pair = 4 * max(meta_bytes(lg.changed) + [1]) + 2 * sum(meta_bytes(cached[len(lg.consumers):]))
        self._pair_batch = max(1, min(batch_size or (128 if cpu else 4096), (self._budget // 2) // per_pair))
        return per_image, per_pair

    def _split_method(self, lg, cf, cpu, prefix_batch, precision):
        """The closed form where it applies, else the suffix (fused with the consumer on GPU backends)."""
        opt, backend = self._options, self._backend
        ops = _CONV_CLOSED_FORM_OPS if cf is not None and cf.kind == "conv" else _REDUCE_OPS
        if not any(dispatch.has_kernel(op, backend) for op in ops):
            if backend != "torch" and self._asked_backend == backend:   # asked for by name: say why it is not used
                method = "suffix" if cf is None else f"{cf.kind} closed form"
                self.backend_note = (f"backend {backend!r} has no kernel for the ops of the {method} method, which "
                                     f"scores this layer ({', '.join(ops)}: carfast.backends() lists the kernels); "
                                     "it runs on 'torch' (same results; backend='auto' picks this without a note)")
            backend = "torch"
        if cf is not None:
            return ClosedFormMethod(lg, cf, backend, prefix_batch, self.fn)
        # channels_last: oneDNN's fast layout on CPU, and cuDNN's for bf16/fp16 tensor-core convolutions
        channels_last = opt.channels_last if opt.channels_last is not None else cpu or self._dtype != torch.float32
        suffix = optimized_suffix(lg.suffix, channels_last) if opt.fold_bn else lg.suffix
        fused = None
        if opt.fused_consumer if opt.fused_consumer is not None else backend in ("triton", "cuda"):
            fused = find_fused_consumer(lg)
            if fused is not None and opt.fold_bn:
                fused.post = optimized_suffix(fused.post, channels_last)
        low = self._dtype != torch.float32
        if low:
            self._warn_if_emulated(precision)
        return SuffixMethod(lg, suffix, fused, channels_last, self._dtype, backend, self._pair_batch, prefix_batch,
                            precision if low else "fp32", self.fn)

    def _warn_if_emulated(self, precision: str) -> None:
        """UserWarning where this CPU has no native ``precision`` convolutions: the optimised suffix computes
        them in float32 and rounds (``suffix_opt.py``; without ``fold_bn``, PyTorch's slow kernel runs), exact
        as always but slower than float32."""
        if not suffix_opt.emulates_low_precision(self._dtype, self._device):
            return
        needs = "AVX-512 BF16 or AMX" if precision == "bf16" else "AVX-512-FP16 or AVX-NE-CONVERT"
        warnings.warn(f"{self.fn}: this CPU has no native {precision} convolutions (they need {needs}), so "
                      f"precision={precision!r} gives the same counts as precision='fp32' but more slowly (its "
                      "convolutions compute in float32 and round, and the threshold's calibration and the re-run "
                      "come on top); use precision='fp32' on this CPU", stacklevel=2)

    # ---- the prefix, cached when it fits ------------------------------------------------------------------
    def _chunks(self):
        """Yield the ``Chunk`` of every chunk of images, from the cache or by running the prefix."""
        if self._cache_complete:
            yield from self._cache
            return
        if self._first_pass is not None:
            stream, self._first_pass = self._first_pass, None
        elif self._one_shot:
            raise ValueError(f"{self.fn}: data is a one-shot iterator and was consumed by the first score (its "
                             "prefix did not fit the memory budget); pass a list, tensors or a DataLoader")
        else:
            stream = self._data
        if self._cache is not None:
            self._cache = []     # a pass cut short before (an exception) must not leave chunks behind
        used = 0
        for x, y in iter_chunks(stream, self._chunk, self._device, self.fn, self._in_dtype):
            chunk = self._method.prefix(x, y)
            check_finite(chunk.logits, self.fn)
            check_labels(y, chunk.num_classes, self.fn)
            check_topk(self.topk, self.fn, chunk.num_classes)
            chunk.topk = self.topk
            chunk.set_logits(chunk.logits)                 # the per-image results of the intact model
            if self._cache is not None:
                used += y.numel() * self._cache_bytes
                if used <= self._cache_budget:
                    self._cache.append(chunk)
                else:
                    self._cache = None   # does not fit: stream the prefix on every score
            self._method.catch_up(chunk, self.removed)     # a fresh chunk gets the removals made so far
            self._check_removed(chunk)
            yield chunk
        if self._cache is not None:
            self._cache_complete = True

    def prepare(self) -> "LayerScorer":
        """Run the prefix over the data now, keeping it when it fits (so ``score`` times only removals)."""
        if not self._cache_complete:
            with eval_mode(self._model), torch.no_grad():
                for _ in self._chunks():
                    pass
        return self

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
            with eval_mode(self._model), torch.no_grad():
                for i, chunk in enumerate(self._cache):
                    self._method.remove(chunk, k, self.removed, known=self._memo.take(i, k))
                    self._check_removed(chunk)
        self._memo.clear()

    def _check_removed(self, chunk) -> None:
        if self.removed:
            check_finite(chunk.logits, self.fn, f"the model's output with filters {self.removed} removed")

    # ---- scoring -------------------------------------------------------------------------------------
    def _held(self) -> list:
        """The cached chunks of the whole data set (running the prefix pass if it has not run yet); ValueError
        when they do not fit the memory budget."""
        if not self._cache_complete:
            self.prepare()
        if not self._cache_complete:
            raise ValueError(f"{self.fn}: the prefix of the data does not fit memory_budget, so its images are not "
                             "held (scoring a subset of them, or the raced search, needs them); raise memory_budget, "
                             "pass fewer images, or use search='exact'")
        return self._cache

    @property
    def num_images(self) -> int:
        """Images of this process's data (the prefix must be held in memory)."""
        return sum(c.num_images for c in self._held())

    def image_losses(self) -> torch.Tensor:
        """[n] float64: each image's cross-entropy under the model with the removals made so far, in data order
        (the prefix must be held in memory)."""
        return torch.cat([c.base_loss.cpu() for c in self._held()])

    def _image_chunks(self, images: torch.Tensor | None):
        """(cached chunk index or None, positions in it or None, chunk) of the chunks to score: all of them
        (``images`` None; index None when the prefix is streamed), or the cached ones restricted to
        ``images`` ([m] int64 ascending positions in the data), in order."""
        if images is None:
            held = self._cache_complete
            for i, chunk in enumerate(self._chunks()):
                yield (i if held else None), None, chunk
            return
        start = 0
        for i, chunk in enumerate(self._held()):
            end = start + chunk.num_images
            lo, hi = torch.searchsorted(images, torch.tensor([start, end])).tolist()
            if hi > lo:
                at = images[lo:hi] - start
                yield i, at, chunk.select(at)
            start = end

    def _memo_slot(self, i, filters: list[int], chunk) -> dict | None:
        """An empty dict for the method to fill with cached chunk ``i``'s scored logits when they fit the memo."""
        if i is None or not self._memo.room(i, filters, self._cache[i].num_images, chunk.num_classes):
            return None
        return {}

    def score(self, filters=None, per_image: bool = False, float32: bool = False, *, image_loss: bool = False,
              images=None) -> LayerScores:
        """CAR scores of ``filters`` (default all that remain), see ``score_layer``. ``float32``: compute in
        float32 even when the scorer's precision is lower (exact loss sums, e.g. to settle ties).
        ``image_loss``: per-image results with each pair's loss (``LayerScores.image_loss``; implies
        ``per_image``). ``images``: score only these images, [m] int64 positions in the data, ascending (the
        prefix must be held in memory; ``num_images`` counts them); the per-image results follow that order."""
        per_image = per_image or image_loss
        if images is not None:
            images = torch.as_tensor(images, dtype=torch.long).flatten().cpu()
            if images.numel() and (bool((images.diff() <= 0).any()) or int(images[0]) < 0
                                   or int(images[-1]) >= self.num_images):
                raise ValueError(f"{self.fn}: images must be ascending distinct positions in [0, {self.num_images})")
        t0 = time.perf_counter()
        filt = check_filters(self.remaining if filters is None else filters, self.num_filters, self.name, self.fn)
        gone = sorted(set(filt.tolist()) & set(self.removed))
        if gone:
            raise ValueError(f"{self.fn}: filters {gone[:5]} of {self.name!r} were removed; score the remaining ones "
                             "(filters=None scores all that remain)")
        acc = Accumulator(len(filt), per_image)
        n_images = self._num_images_hint if images is None else images.numel()
        bar = Progress(self._progress, len(filt) * n_images if n_images else None, f"scoring {self.name}")
        stats = PairStats()
        with eval_mode(self._model), torch.no_grad():
            filters = filt.tolist()
            for i, at, chunk in self._image_chunks(images):
                slot = self._memo_slot(i, filters, chunk)
                counts, loss_sum, img = self._method.score_chunk(chunk, filt, self.removed, per_image, stats, bar,
                                                                 image_loss=image_loss, memo=slot, float32=float32)
                if slot:
                    self._memo.add(i, self._cache[i].num_images, filters, at, slot["logits"], slot["evaluated"])
                acc.add(chunk.y, chunk.base_correct, chunk.base_loss, counts, loss_sum, img, chunk.num_classes)
        bar.close()
        if self._process_group is not None:   # every process scored its shard: add the counts up, exactly
            stats = PairStats(*acc.all_reduce(self._process_group, stats.as_list(), self.fn))
        res = acc.result(self.name, filt, method=self.method, backend=self.backend, pairs_evaluated=stats.evaluated,
                         pairs_skipped=stats.skipped, seconds=time.perf_counter() - t0,
                         precision="fp32" if float32 else self._method.precision, pairs_rechecked=stats.rechecked,
                         margin_threshold=self._method.margin_threshold, topk=self.topk)
        res.backend_note = self.backend_note
        if self.as_group:
            res.coupled, res.members = self.flow.coupled, self.members
        if self._check_chance and not self.removed and images is None:
            self._check_chance = False
            warn_near_chance(res.base_accuracy, res.num_images, res.num_classes, self.fn, self.topk)
        return res


@takes_score_options
def score_layer(model: nn.Module, layer, data, *, filters=None, per_image: bool = False, **settings) -> LayerScores:
    """Score each filter of ``layer`` by CAR: the accuracy the model loses when that filter is removed.

    Removing filter k means what docs/design.md section 2 says: the channel disappears from every consumer
    (the next Conv2d / Linear), through BatchNorm, activations, pooling, dropout, depthwise convs and
    flatten; results equal re-running the whole network with that channel zeroed at each consumer's
    input, image by image (up to images whose top-1 is a float near tie).

    Args:
        model: an ``nn.Module`` returning logits [N, classes]; evaluated in eval mode and left exactly as
            it came (weights, buffers, train/eval flags, hooks).
        layer: a name from ``model.named_modules()`` or the module: a Conv2d (any groups, bias or not)
            or a Linear. A layer whose channels enter a residual add is refused (coupled channels): pass
            ``carfast.Group(layer)`` to score the channels of its coupling group instead (see
            ``score_group``; ``filters`` then index the group's channels).
        data: ``(inputs [N, ...], labels [N] int)`` or an iterable of such batches (a DataLoader).
        filters: filter indices to score, in the order wanted (default all).
        per_image: also return ``image_correct`` [F, N] bool and ``base_image_correct`` [N] bool (with
            several processes: of this process's images).
        {score_options}
    Returns:
        ``LayerScores`` (see ``carfast.scoring.scores``).
    Raises:
        ValueError / TypeError for bad input, each naming the problem and the fix.
    """
    if isinstance(model, nn.Module):   # check filters before the work of preparing the layer
        name, module, group = resolve_target(model, layer, _FN)
        if not group:     # (a group's channels are counted by the analysis)
            check_filters(filters, target_num_filters(module), name)
    return LayerScorer(model, layer, data, **one_score(settings, _FN)).score(filters, per_image=per_image)
