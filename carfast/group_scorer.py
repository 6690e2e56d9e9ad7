"""CAR scores of coupled channels: ``score_group`` and ``GroupScorer`` (``groups.py`` finds the group).

Removing channel i of a coupling group zeroes channel i of every value on the group's residual stream
(``CouplingGroup.stream``). The network is split where the stream begins: a *prefix* (the network up
to the stream's entry values, run once per image) and a *masked suffix*, a copy of the rest of the
network that multiplies every stream value read off the stream by a per-pair channel mask [P, C] (1
everywhere except 0 at the pair's channel, and at channels already removed). Multiplying by 1 and by 0
is exact, so each (channel, image) pair gives the logits of the naive method (zero the channel on the
whole stream, rerun the whole network); many pairs run per suffix call, on the engine's optimised copy
of the suffix (BatchNorm folded, oneDNN fusions, channels_last: ``suffix_opt.py``) and, with
``precision="bf16"``, in bf16 with the float32 re-run of near ties (``precision.py``). The rest is the
engine's: per-(channel, class) counts and loss sums (``ops/score_reduce.py``), integers all-reduced
over processes.

Unlike ``score_layer``, the removal reaches the whole rest of the stream, so there is no consumer
delta, closed form or free-zero skipping here: each pair costs one run of the network after the
stream's first producer.
"""
from __future__ import annotations

import copy
import operator
import time

import torch
from torch import fx, nn

from .batching import (Progress, _as_batches, _check_batch, check_finite, check_labels, check_work_sizes,
                       default_memory_budget, eval_mode, iter_chunks)
from .distributed import resolve_group
from .engine import ScoreOptions, _check_filters, _count_images, _meta_bytes, _pick_backend, _work_model
from .errors import resolve_layer
from .graph import TraceError, build_prefix, descendants, fn_name, subgraph, suffix_inputs, trace
from .groups import CouplingGroup, find_group
from .ops_catalog import CHAIN_MODULES
from .suffix_opt import optimized_suffix
from .ops.score_reduce import pair_results
from .pairs import Accumulator, reduce_pair_batch, run_suffix
from .precision import CALIBRATION_PAIRS, check_precision, margin_threshold, top1_margin
from .scores import LayerScores

__all__ = ["GroupScorer", "score_group", "masked_suffix"]

_FN = "score_group"


def masked_suffix(cg: CouplingGroup) -> tuple[fx.GraphModule, fx.GraphModule, list[fx.Node]]:
    """(prefix, suffix, the suffix's inputs as nodes of ``cg.gm``) of a coupling group's network.

    prefix: x [n, ...] -> (each input of the suffix [n, ...], logits [n, classes]);
    suffix: (mask [P, C] float, the same inputs [P, ...]) -> logits [P, classes], where every stream value
    that is read off the stream is multiplied by ``mask`` (viewed [P, C, 1, ...]). A stream value read
    only by per-channel ops of the stream (BatchNorm, an add, an activation) is not: its channel k reaches
    nothing but channel k of a value that is masked itself. That leaves conv -> BN -> add -> ReLU free for
    ``optimized_suffix`` to fold and fuse, with one multiply per block output.
    """
    gm, stream = cg.gm, set(cg.stream)
    modules = dict(gm.named_modules())

    def mixing(n):   # a stream node whose output channel k depends on other channels of its input
        return n.op == "call_module" and not isinstance(modules[n.target], CHAIN_MODULES) or fn_name(n) == "pad"

    read_off = {n for n in stream if any(u not in stream or mixing(u) for u in n.users)}
    changed = descendants(cg.stream)
    entries = [n for n in cg.stream if not any(a in changed for a in n.all_input_nodes)]
    boundary, recompute = suffix_inputs(gm, changed, entries)
    inputs = entries + boundary
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    body = sorted((changed | recompute) - set(entries), key=order.__getitem__)
    g = fx.Graph()
    mask = g.placeholder("mask")
    views = {}

    def masked(node, value):
        if node not in read_off:
            return value
        rank = len(node.meta["tensor_meta"].shape)
        if rank not in views:
            views[rank] = g.call_method("view", (mask, -1, cg.num_channels) + (1,) * (rank - 2))
        return g.call_function(operator.mul, (value, views[rank]))

    suffix = subgraph(gm, [(n, f"b{i}") for i, n in enumerate(inputs)], body, graph=g, wrap=masked)
    return build_prefix(gm, inputs), suffix, inputs


class GroupScorer:
    """One coupling group prepared for CAR scoring; ``score(filters=None, per_image=False)`` returns
    ``LayerScores`` over the group's channels; ``remove(k)`` removes channel k for good (greedy pruning).

    Takes the arguments of ``score_group`` except ``filters`` and ``per_image``.
    """

    def __init__(self, model: nn.Module, layer, data, *, device=None, batch_size: int | None = None,
                 memory_budget: int | None = None, backend: str = "auto", precision: str = "fp32", progress=None,
                 group=None, options: ScoreOptions | None = None):
        self.group = resolve_group(group, _FN)
        self.dtype = check_precision(precision, _FN)
        self.precision, opt = precision, options or ScoreOptions()
        if not isinstance(model, nn.Module):
            raise TypeError(f"{_FN}: model must be a torch.nn.Module, got {type(model).__name__}")
        self.name, _ = resolve_layer(model, layer, _FN)
        check_work_sizes(batch_size, memory_budget, _FN)
        self.model, self.device = _work_model(model, device)
        self.kernel = _pick_backend(backend, self.device)
        if self.kernel == "cpu":
            self.kernel = "torch"         # the C++ kernels do not cover a general suffix
        self.data, self.progress = data, progress
        first = next(iter(_as_batches(data, _FN)), None)
        if first is None:
            raise ValueError(f"{_FN}: data holds no images; pass at least one (inputs, labels) pair")
        x0, _ = _check_batch(first, _FN)
        if x0.shape[0] == 0:
            raise ValueError(f"{_FN}: the first batch of data is empty; pass non-empty batches")
        self.num_images_hint = _count_images(data)
        with eval_mode(self.model), torch.no_grad():
            try:
                gm = trace(self.model, x0[:1].to(self.device))
            except TraceError as err:
                raise ValueError(f"{_FN}: finding a coupling group needs torch.fx, which cannot trace this model "
                                 f"({err}); score_layer scores layers whose channels are not coupled") from err
            self.cg = find_group(gm, self.name, _FN)
            self.prefix, suffix, cut = masked_suffix(self.cg)
        self.num_channels = self.cg.num_channels
        cpu = self.device.type == "cpu"
        self.channels_last = opt.channels_last if opt.channels_last is not None else \
            cpu or self.dtype != torch.float32
        self.suffix = optimized_suffix(suffix, self.channels_last) if opt.fold_bn else suffix
        self.low_suffix = None if self.dtype == torch.float32 else copy.deepcopy(self.suffix).to(self.dtype)
        self.threshold: float | None = None     # the low-precision re-run margin, set on the first chunk
        budget = int(memory_budget) if memory_budget is not None else default_memory_budget(self.device)
        # half the budget for a batch of pairs (a few of the widest activations each), half for a chunk's
        # cached suffix inputs (and their gathered copies)
        widest = max(_meta_bytes(gm.graph.nodes))
        inputs = sum(_meta_bytes(cut))
        self.pair_batch = max(1, min(batch_size or (128 if cpu else 2048), budget // 2 // (4 * widest + inputs)))
        self.chunk = max(1, min(1024 if cpu else 8192, budget // 2 // (2 * inputs)))
        self.removed: list[int] = []

    @property
    def members(self) -> list[dict]:
        """The group's layers and channel mappings (``groups.GroupMember.to_dict``)."""
        return [m.to_dict() for m in self.cg.members]

    @property
    def remaining(self) -> list[int]:
        gone = set(self.removed)
        return [k for k in range(self.num_channels) if k not in gone]

    def remove(self, k: int) -> None:
        """Remove channel ``k`` of the group from the model this scorer evaluates."""
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"{_FN}: remove takes one int channel index, got {k!r}")
        if not 0 <= k < self.num_channels or k in self.removed:
            raise ValueError(f"{_FN}: channel {k} of the group of {self.name!r} is out of range "
                             f"(0..{self.num_channels - 1}) or already removed")
        self.removed.append(k)

    def _base_mask(self) -> torch.Tensor:
        mask = torch.ones(1, self.num_channels, device=self.device)
        mask[0, self.removed] = 0
        return mask

    def _run(self, mask, inputs, n_b, dtype=torch.float32) -> torch.Tensor:
        """Logits [P, classes] of the suffix on ``mask`` [P, C] and the inputs of images ``n_b`` [P]."""
        suffix = self.suffix if dtype == torch.float32 else self.low_suffix
        return run_suffix(suffix, [mask], [b[n_b] for b in inputs], self.channels_last, dtype)

    def _pair_logits(self, mask, inputs, n_b, stats) -> torch.Tensor:
        """Float32-exact top-1 logits of a batch of pairs: in low precision, re-running in float32 every pair
        whose top-1 margin is at most the calibrated threshold (``precision.py``); stats[2] counts them."""
        if self.dtype == torch.float32:
            return self._run(mask, inputs, n_b)
        abl = self._run(mask, inputs, n_b, self.dtype)
        redo = (top1_margin(abl) <= self.threshold).nonzero().flatten()
        abl = abl.float()
        if redo.numel():
            abl[redo] = self._run(mask[redo], inputs, n_b[redo])
        stats[2] += redo.numel()
        return abl

    def _calibrate(self, base_mask, filt_dev, inputs, n: int) -> None:
        """Set the re-run margin from up to CALIBRATION_PAIRS random pairs of the chunk (n images, pairs
        f * n + i) evaluated both ways."""
        g = torch.Generator().manual_seed(0)
        pick = torch.randperm(len(filt_dev) * n, generator=g)[:CALIBRATION_PAIRS].to(self.device)
        low, exact = [], []
        for p in pick.split(self.pair_batch):
            mask = self._masks(base_mask, filt_dev, p // n)
            low.append(self._run(mask, inputs, p % n, self.dtype))
            exact.append(self._run(mask, inputs, p % n))
        self.threshold = margin_threshold(torch.cat(low), torch.cat(exact))

    def _masks(self, base_mask, filt_dev, f_b) -> torch.Tensor:
        """[P, C]: the base mask with each pair's channel filt[f_b[p]] zeroed."""
        mask = base_mask.repeat(len(f_b), 1)
        mask[torch.arange(len(f_b), device=self.device), filt_dev[f_b]] = 0
        return mask

    def score(self, filters=None, per_image: bool = False) -> LayerScores:
        """CAR scores of the group's channels ``filters`` (default: all that remain)."""
        t0 = time.perf_counter()
        filt = _check_filters(self.remaining if filters is None else filters, self.num_channels, self.name, _FN)
        gone = sorted(set(filt.tolist()) & set(self.removed))
        if gone:
            raise ValueError(f"{_FN}: channels {gone[:5]} of the group were removed; score the remaining ones")
        F_ = len(filt)
        acc = Accumulator(F_, per_image)
        bar = Progress(self.progress, F_ * self.num_images_hint if self.num_images_hint else None,
                       f"scoring the group of {self.name}")
        base_mask = self._base_mask()
        filt_dev = filt.to(self.device)
        stats = [0, 0, 0]                    # pairs evaluated, skipped (none here), re-run in float32
        with eval_mode(self.model), torch.no_grad():
            for x, y in iter_chunks(self.data, self.chunk, self.device, _FN):
                outs = [self.prefix(x[s:s + self.pair_batch]) for s in range(0, x.shape[0], self.pair_batch)]
                outs = [torch.cat(p) for p in zip(*outs)]
                inputs, logits = outs[:-1], outs[-1]
                check_finite(logits, _FN)
                C, n = logits.shape[1], y.numel()
                check_labels(y, C, _FN)
                if self.removed:        # the intact model is the one without the removed channels
                    idx = torch.arange(n, device=self.device)
                    logits = torch.cat([self._run(base_mask.expand(len(b), -1), inputs, b)
                                        for b in idx.split(self.pair_batch)])
                    check_finite(logits, _FN, f"the model's output with channels {self.removed} removed")
                base_correct, base_loss = pair_results(logits, y)
                counts = torch.zeros(F_, C, dtype=torch.long, device=self.device)
                loss = torch.zeros(F_, dtype=torch.float64, device=self.device)
                img_correct = torch.zeros(F_, n, dtype=torch.bool, device=self.device) if per_image else None
                pairs = torch.arange(F_ * n, device=self.device)
                if self.dtype != torch.float32 and self.threshold is None:
                    self._calibrate(base_mask, filt_dev, inputs, n)
                for p in pairs.split(self.pair_batch):
                    f_b, n_b = p // n, p % n
                    abl = self._pair_logits(self._masks(base_mask, filt_dev, f_b), inputs, n_b, stats)
                    reduce_pair_batch(abl, y[n_b], f_b, n_b, counts, loss, img_correct, self.kernel, _FN,
                                      "the model's output with a channel removed")
                    bar.update(len(p))
                acc.add(y, base_correct, base_loss, counts, loss, img_correct, C)
        bar.close()
        stats[0] = acc.n * F_
        if self.group is not None:
            stats = acc.all_reduce(self.group, stats, _FN)
        low = self.dtype != torch.float32
        return acc.result(self.name, filt, coupled=self.cg.coupled, method="group_suffix", backend=self.kernel,
                          pairs_evaluated=stats[0], pairs_skipped=0, seconds=time.perf_counter() - t0,
                          precision=self.precision, pairs_rechecked=stats[2],
                          margin_threshold=float(self.threshold or 0.0) if low else 0.0, members=self.members)


def score_group(model: nn.Module, layer, data, *, filters=None, device=None, batch_size: int | None = None,
                memory_budget: int | None = None, backend: str = "auto", precision: str = "fp32", progress=None,
                per_image: bool = False, group=None, options: ScoreOptions | None = None) -> LayerScores:
    """Score each channel of the coupling group of ``layer`` by CAR (``carfast.groups``).

    ``layer`` names any producer of the group (the stem conv, a block's second conv, a 1x1 shortcut
    conv). Channel i's score is the accuracy lost when channel i is removed from every member of the
    group (so it is zero wherever the residual stream is read), equal image by image to zeroing it on
    the stream and rerunning the whole network. With channel-padding ("option A") shortcuts each stage
    is its own group (see ``carfast.groups``). A layer whose channels enter no residual add gets the
    scores ``score_layer`` gives (slower: this path evaluates the whole rest of the network per pair).

    Args are those of ``score_layer``; ``filters`` are channel indices of the group; ``precision``
    "bf16" / "fp16" runs the network after the cut in that dtype with the float32 re-run of near-tie pairs
    (``carfast.precision``), so accuracies equal float32's; ``options`` uses ``fold_bn`` and
    ``channels_last`` of ``ScoreOptions``; ``group`` is the ``torch.distributed`` process group.
    Returns:
        ``LayerScores`` with ``coupled`` True for a real group, ``method`` "group_suffix" and ``members``:
        the layers of the group and how its channels map onto each (``groups.GroupMember``).
    """
    if isinstance(model, nn.Module):
        resolve_layer(model, layer, _FN)
    scorer = GroupScorer(model, layer, data, device=device, batch_size=batch_size, memory_budget=memory_budget,
                         backend=backend, precision=precision, progress=progress, group=group, options=options)
    return scorer.score(filters, per_image=per_image)
