"""Triton kernels of ``closed_form_score``: closed-form ablated logits fused with the scoring reduction.

Contract and oracle: ``carfast.ops.closed_form_score.closed_form_score_ref``. Registered as
``torch.ops.carfast_triton.closed_form_score``. The [J, N, classes] ablated logits never reach memory.

Main kernel: grid (filter j, block of BLOCK_N images). A program
1. marks which of its images have a nonzero channel a[n, k] (k = filters[j]); an all-zero channel
   (free zero) gives exactly logits[n] and is skipped below, and a block of free zeros skips step 2;
2. per chunk of BLOCK_C classes (one chunk when C <= 64), walks the output map in tiles of BLOCK_HW
   positions x BLOCK_O channels; per tile it loads the tail [BLOCK_C, BLOCK_HW, BLOCK_O] once and, for
   each live image of the block, computes delta = U_k(a[n, k]) on the tile (kh*kw unrolled taps, one
   input channel), d = E(z - delta) - E(z) (float32), and adds the contraction sum(tail * d) to that
   image's row of a [BLOCK_N, BLOCK_C] accumulator (the tail tile is read once per BLOCK_N pairs);
3. adds logits[n] to the chunk and folds it into a running top-1 per image (ties to the lowest class)
   and a running log-sum-exp in float64; then stores the correct bits to correct[j, n] and writes the
   block's per-class partial counts and cross-entropy sums to scratch [J, num_image_blocks, C].
Finish kernel: grid (J,); sums the scratch over the image blocks in order into counts / loss_sums.
No atomics: the results are bit-identical run to run.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from carfast.ops.triton import INTERPRET, as_pair, check_device, next_pow2, on_device
from carfast.ops.triton.ablated_consumer import check_conv_args, check_index, check_ranges

__all__ = ["closed_form_score"]

_BLOCK_N = 8                                # images per program
_MAX_BLOCK_C = 1024 if INTERPRET else 64    # classes per chunk
_TILE = 1 << 15 if INTERPRET else 2048      # elements of the [BLOCK_C, BLOCK_HW, BLOCK_O] tail tile
_MAX_BLOCK_O = 256                          # output channels per tile
_BLOCK_A = 1024 if INTERPRET else 256       # elements of a[n, k] per step of the free-zero scan


@triton.jit
def _contract(a_chan, w_ptr, z_ptr, scale_ptr, shift_ptr, res_ptr, tail_ptr, k, blk, live, any_live, cls, c_ok,
              O, H, W, Ho, Wo, sa_n, sa_h, sa_w, sw_o, sw_k, sw_h, sw_w, sz_n, sz_o, sz_h, sz_w,
              sr_n, sr_o, sr_h, sr_w, st_c, st_o, st_h, st_w,
              SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr,
              DW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_O: tl.constexpr):
    """acc [BLOCK_N, BLOCK_C]: acc[i, c] = sum over (o, oh, ow) of tail[c, o, oh, ow] * d_i[o, oh, ow],
    d_i = E(z[n] - U_k(a[n, k])) - E(z[n]) for image n = blk * BLOCK_N + i; rows of dead images stay 0."""
    rows = tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    if any_live != 0:
        for hw0 in range(0, Ho * Wo, BLOCK_HW):
            hw = hw0 + tl.arange(0, BLOCK_HW)
            hw_ok = hw < Ho * Wo
            oh = hw // Wo
            ow = hw % Wo
            for o0 in range(0, O, BLOCK_O):
                o = o0 + tl.arange(0, BLOCK_O)
                o_ok = o < O
                tile_ok = hw_ok[:, None] & o_ok[None, :]
                scale = tl.load(scale_ptr + o, mask=o_ok, other=0.0)[None, :]
                shift = tl.load(shift_ptr + o, mask=o_ok, other=0.0)[None, :]
                # the tail tile, read once for the BLOCK_N images
                tail = tl.load(tail_ptr + cls[:, None, None] * st_c + (oh * st_h + ow * st_w)[None, :, None]
                               + o[None, None, :] * st_o,
                               mask=c_ok[:, None, None] & tile_ok[None, :, :], other=0.0)
                for i in range(BLOCK_N):
                    if tl.sum(tl.where(rows == i, live, 0), axis=0) != 0:
                        n = blk * BLOCK_N + i
                        delta = tl.zeros([BLOCK_HW, BLOCK_O], dtype=tl.float32)
                        for t in tl.static_range(KH * KW):
                            ih = oh * SH - PH + (t // KW) * DH
                            iw = ow * SW - PW + (t % KW) * DW
                            inside = hw_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                            av = tl.load(a_chan + n * sa_n + ih * sa_h + iw * sa_w, mask=inside, other=0.0)
                            wv = tl.load(w_ptr + k * sw_k + o * sw_o + (t // KW) * sw_h + (t % KW) * sw_w,
                                         mask=o_ok, other=0.0)
                            delta += av[:, None] * wv[None, :]
                        z = tl.load(z_ptr + n * sz_n + o[None, :] * sz_o + oh[:, None] * sz_h + ow[:, None] * sz_w,
                                    mask=tile_ok, other=0.0)
                        y0 = z * scale + shift
                        y1 = (z - delta) * scale + shift
                        if HAS_RES:
                            r = tl.load(res_ptr + n * sr_n + o[None, :] * sr_o + oh[:, None] * sr_h
                                        + ow[:, None] * sr_w, mask=tile_ok, other=0.0)
                            y0 += r
                            y1 += r
                        if ACT == 1:
                            y0 = tl.maximum(y0, 0.0)
                            y1 = tl.maximum(y1, 0.0)
                        elif ACT == 2:
                            y0 = tl.minimum(tl.maximum(y0, 0.0), 6.0)
                            y1 = tl.minimum(tl.maximum(y1, 0.0), 6.0)
                        d = tl.where(tile_ok, y1 - y0, 0.0)
                        part = tl.sum(tl.sum(tail * d[None, :, :], axis=2), axis=1)          # [BLOCK_C]
                        acc = tl.where(rows[:, None] == i, acc + part[None, :], acc)
    return acc


@triton.jit
def _closed_form_score_kernel(
        a_ptr, w_ptr, z_ptr, scale_ptr, shift_ptr, res_ptr, tail_ptr, logits_ptr, filters_ptr, labels_ptr,
        correct_ptr, part_count_ptr, part_loss_ptr,
        N, C, O, H, W, Ho, Wo,
        sa_n, sa_k, sa_h, sa_w,
        sw_o, sw_k, sw_h, sw_w,
        sz_n, sz_o, sz_h, sz_w,
        sr_n, sr_o, sr_h, sr_w,
        st_c, st_o, st_h, st_w,
        sl_n, sl_c,
        SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr,
        DW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_O: tl.constexpr,
        BLOCK_A: tl.constexpr):
    j = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1).to(tl.int64)
    k = tl.load(filters_ptr + j)
    rows = tl.arange(0, BLOCK_N)
    n_vec = blk * BLOCK_N + rows                                       # [BLOCK_N] images, int64
    n_ok = n_vec < N
    a_chan = a_ptr + k * sa_k

    # 1. live[i] = 1 where a[n, k] has a nonzero (stop scanning at the first one)
    live = tl.zeros([BLOCK_N], dtype=tl.int32)
    for i in range(BLOCK_N):
        n = blk * BLOCK_N + i
        if n < N:
            hit = tl.zeros([BLOCK_A], dtype=tl.int32)
            start = 0
            while (tl.max(hit, axis=0) == 0) & (start < H * W):
                idx = start + tl.arange(0, BLOCK_A)
                v = tl.load(a_chan + n * sa_n + (idx // W) * sa_h + (idx % W) * sa_w, mask=idx < H * W, other=0.0)
                hit = (v != 0).to(tl.int32)
                start += BLOCK_A
            live = tl.where(rows == i, tl.max(hit, axis=0), live)

    # 2.-3. per chunk of BLOCK_C classes: the chunk's ablated logits, folded into a running top-1 and a running
    # log-sum-exp (float64) per image; the tail contraction is redone per chunk, the delta with it
    best = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)        # running top-1 value and class
    best_cls = tl.zeros([BLOCK_N], dtype=tl.int32)
    run_max = tl.full([BLOCK_N], float("-inf"), dtype=tl.float64)     # running log-sum-exp: max, sum of exp
    run_sum = tl.zeros([BLOCK_N], dtype=tl.float64)
    x_label = tl.zeros([BLOCK_N], dtype=tl.float64)
    label = tl.load(labels_ptr + n_vec, mask=n_ok, other=0)
    any_live = tl.max(live, axis=0)
    for c0 in range(0, C, BLOCK_C):
        cls = c0 + tl.arange(0, BLOCK_C)
        c_ok = cls < C
        acc = _contract(a_chan, w_ptr, z_ptr, scale_ptr, shift_ptr, res_ptr, tail_ptr, k, blk, live, any_live,
                        cls, c_ok, O, H, W, Ho, Wo, sa_n, sa_h, sa_w, sw_o, sw_k, sw_h, sw_w, sz_n, sz_o, sz_h, sz_w,
                        sr_n, sr_o, sr_h, sr_w, st_c, st_o, st_h, st_w,
                        SH, SW, PH, PW, DH, DW, KH, KW, HAS_RES, ACT, BLOCK_N, BLOCK_C, BLOCK_HW, BLOCK_O)
        x = tl.load(logits_ptr + n_vec[:, None] * sl_n + cls[None, :] * sl_c, mask=n_ok[:, None] & c_ok[None, :],
                    other=0.0) + acc
        x = tl.where(c_ok[None, :], x, float("-inf"))
        # top-1, ties to the lowest class: a later chunk wins only when strictly larger
        x_max = tl.max(x, axis=1)
        top = tl.min(tl.where(x == x_max[:, None], cls[None, :], C + BLOCK_C), axis=1)
        better = x_max > best
        best_cls = tl.where(better, top, best_cls)
        best = tl.where(better, x_max, best)
        # log-sum-exp and the label's logit, float64
        x64 = x.to(tl.float64)
        new_max = tl.maximum(run_max, x_max.to(tl.float64))
        e = tl.where(c_ok[None, :], tl.exp(x64 - new_max[:, None]), 0.0)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(e, axis=1)
        run_max = new_max
        x_label += tl.sum(tl.where(cls[None, :] == label[:, None], x64, 0.0), axis=1)
    correct = (best_cls == label) & n_ok
    tl.store(correct_ptr + j * N + n_vec, correct, mask=n_ok)
    loss = tl.where(n_ok, run_max + tl.log(run_sum) - x_label, 0.0)

    # 4. per-class partial counts and loss sums of this block of images
    for c0 in range(0, C, BLOCK_C):
        cls = c0 + tl.arange(0, BLOCK_C)
        c_ok = cls < C
        hot = (cls[None, :] == label[:, None]) & n_ok[:, None]
        part_off = (j * tl.num_programs(1) + blk) * C + cls
        tl.store(part_count_ptr + part_off, tl.sum((hot & correct[:, None]).to(tl.int32), axis=0), mask=c_ok)
        tl.store(part_loss_ptr + part_off, tl.sum(tl.where(hot, loss[:, None], 0.0), axis=0), mask=c_ok)


@triton.jit
def _sum_blocks_kernel(part_count_ptr, part_loss_ptr, counts_ptr, loss_ptr, C, NB, BLOCK_C: tl.constexpr):
    """counts[j] = sum_b part_count[j, b], loss_sums[j] likewise, b in order (deterministic)."""
    j = tl.program_id(0).to(tl.int64)
    cls = tl.arange(0, BLOCK_C)
    c_ok = cls < C
    count = tl.zeros([BLOCK_C], dtype=tl.int64)
    loss = tl.zeros([BLOCK_C], dtype=tl.float64)
    for b in range(NB):
        off = (j * NB + b) * C + cls
        count += tl.load(part_count_ptr + off, mask=c_ok, other=0).to(tl.int64)
        loss += tl.load(part_loss_ptr + off, mask=c_ok, other=0.0)
    tl.store(counts_ptr + j * C + cls, count, mask=c_ok)
    tl.store(loss_ptr + j * C + cls, loss, mask=c_ok)


def _check_args(fn, a, weight, z, scale, shift, residual, act, tail, logits, filters, labels, stride, padding,
                dilation):
    """Validate everything but index ranges; returns (stride, padding, dilation) as int pairs."""
    f32 = (torch.float32,)
    stride, padding, dilation = check_conv_args(fn, a, weight, z, scale, shift, residual, act, stride, padding,
                                                dilation, dtypes=f32)
    N, O, Ho, Wo = z.shape
    for name, t in (("tail", tail), ("logits", logits)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{fn}: {name} must be float32, got {got}; convert it ({name}.float())")
    if logits.dim() != 2 or logits.shape[0] != N:
        raise ValueError(f"{fn}: logits must be [N={N}, classes], got shape {tuple(logits.shape)}")
    C = logits.shape[1]
    if tuple(tail.shape) != (C, O, Ho, Wo):
        raise ValueError(f"{fn}: tail must be [classes, O, Ho, Wo] = {(C, O, Ho, Wo)} (classes from logits, the "
                         f"rest from z), got {tuple(tail.shape)}")
    check_index(fn, "filters", filters)
    check_index(fn, "labels", labels, N)
    check_device(fn, a=a, weight=weight, z=z, scale=scale, shift=shift, residual=residual, tail=tail,
                 logits=logits, filters=filters, labels=labels)
    return stride, padding, dilation


# the schema of csrc/ops.cpp's carfast::closed_form_score
@torch.library.custom_op(
    "carfast_triton::closed_form_score", mutates_args=(),
    schema="(Tensor a, Tensor weight, Tensor z, Tensor scale, Tensor shift, Tensor? residual, int act, Tensor tail, "
           "Tensor logits, Tensor filters, Tensor labels, int[] stride, int[] padding, int[] dilation) "
           "-> (Tensor, Tensor, Tensor)")
def _closed_form_score_op(a: torch.Tensor, weight: torch.Tensor, z: torch.Tensor, scale: torch.Tensor,
                          shift: torch.Tensor, residual: Optional[torch.Tensor], act: int, tail: torch.Tensor,
                          logits: torch.Tensor, filters: torch.Tensor, labels: torch.Tensor, stride: List[int],
                          padding: List[int], dilation: List[int]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    fn = "closed_form_score"
    stride, padding, dilation = _check_args(fn, a, weight, z, scale, shift, residual, act, tail, logits, filters,
                                            labels, stride, padding, dilation)
    N, K, H, W = a.shape
    O, _, kh, kw = weight.shape
    Ho, Wo = z.shape[2:]
    J, C = filters.shape[0], logits.shape[1]
    dev = a.device
    counts = torch.zeros((J, C), dtype=torch.int64, device=dev)
    loss_sums = torch.zeros((J, C), dtype=torch.float64, device=dev)
    correct = torch.empty((J, N), dtype=torch.bool, device=dev)
    if J == 0 or N == 0 or C == 0:
        return counts, loss_sums, correct
    check_ranges(fn, filters=(filters, K), labels=(labels, C))
    filters, labels = filters.contiguous(), labels.contiguous()      # read as ptr + index

    BLOCK_C = min(next_pow2(C), _MAX_BLOCK_C)
    BLOCK_O = min(next_pow2(O), _MAX_BLOCK_O, max(1, _TILE // BLOCK_C))
    BLOCK_HW = max(1, min(next_pow2(Ho * Wo), _TILE // (BLOCK_C * BLOCK_O)))
    NB = triton.cdiv(N, _BLOCK_N)
    if NB > 65535:                                                    # CUDA's limit on grid dim 1
        raise ValueError(f"{fn}: at most {65535 * _BLOCK_N} images per call, got {N}; score the images in batches "
                         f"(counts and loss sums add up across batches)")
    part_count = torch.empty((J, NB, C), dtype=torch.int32, device=dev)     # per image block, summed below
    part_loss = torch.empty((J, NB, C), dtype=torch.float64, device=dev)
    res = residual if residual is not None else z                     # never read when HAS_RES is False
    with on_device(a):
        _closed_form_score_kernel[(J, NB)](
            a, weight, z, scale, shift, res, tail, logits, filters, labels, correct, part_count, part_loss,
            N, C, O, H, W, Ho, Wo,
            *a.stride(), *weight.stride(), *z.stride(), *res.stride(), *tail.stride(), *logits.stride(),
            SH=stride[0], SW=stride[1], PH=padding[0], PW=padding[1], DH=dilation[0], DW=dilation[1], KH=kh, KW=kw,
            HAS_RES=residual is not None, ACT=int(act), BLOCK_N=_BLOCK_N, BLOCK_C=BLOCK_C, BLOCK_HW=BLOCK_HW,
            BLOCK_O=BLOCK_O, BLOCK_A=_BLOCK_A, num_warps=8)
        _sum_blocks_kernel[(J,)](part_count, part_loss, counts, loss_sums, C, NB, BLOCK_C=next_pow2(C), num_warps=4)
    return counts, loss_sums, correct


@_closed_form_score_op.register_fake
def _(a, weight, z, scale, shift, residual, act, tail, logits, filters, labels, stride, padding, dilation):
    J, N, C = filters.shape[0], logits.shape[0], logits.shape[1]
    return (logits.new_empty((J, C), dtype=torch.int64), logits.new_empty((J, C), dtype=torch.float64),
            logits.new_empty((J, N), dtype=torch.bool))


def closed_form_score(a: torch.Tensor, weight: torch.Tensor, z: torch.Tensor, scale: torch.Tensor,
                      shift: torch.Tensor, residual: Optional[torch.Tensor], act: int, tail: torch.Tensor,
                      logits: torch.Tensor, filters: torch.Tensor, labels: torch.Tensor, stride=(1, 1),
                      padding=(0, 0), dilation=(1, 1)) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``closed_form_score_ref`` on the Triton kernels; same contract.

    Args:
        a [N, K, H, W], weight [O, K, kh, kw], z [N, O, Ho, Wo], scale/shift [O], residual [N, O, Ho, Wo] or
        None, tail [classes, O, Ho, Wo], logits [N, classes]: float32, any strides; act 0/1/2;
        filters [J] int64 in [0, K); labels [N] int64 in [0, classes); stride/padding/dilation ints or pairs.
    Returns:
        counts [J, classes] int64, loss_sums [J, classes] float64, correct [J, N] bool.
    """
    fn = "closed_form_score"
    return tuple(torch.ops.carfast_triton.closed_form_score(
        a, weight, z, scale, shift, residual, int(act), tail, logits, filters, labels,
        list(as_pair(fn, "stride", stride)), list(as_pair(fn, "padding", padding)),
        list(as_pair(fn, "dilation", dilation))))
