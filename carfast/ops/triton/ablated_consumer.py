"""Triton kernel of ``ablated_consumer``: out[p] = E(z[n] - U_k(a[n, k])) for pairs (k, n) = (filters[p], images[p]).

Contract and oracle: ``carfast.ops.ablated_consumer.ablated_consumer_ref``. Registered as
``torch.ops.carfast_triton.ablated_consumer``.

Kernel: grid (pair p, block of BLOCK_HW output positions, block of BLOCK_O output channels). A program
computes a [BLOCK_HW, BLOCK_O] tile of pair p's output: for each of the kh*kw taps (unrolled) it loads the
owned input channel a[n, k] once at the tap's input positions ([BLOCK_HW]) and the tap's weights
weight[:, k, i, j] ([BLOCK_O]), and accumulates their outer product in float32; then the epilogue
act((z - delta) * scale + shift + residual) in float32, cast to the output dtype and stored to
[P, Ho, Wo, O] memory (``out`` [P, O, Ho, Wo] channels_last). BLOCK_O is O rounded up to a power of two
(so one program covers all O channels) unless O > 256, where the channels are split over grid dim 2.
Every input is addressed through its strides, so any layout works without a copy.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from carfast.ops.triton import FLOAT_DTYPES, INTERPRET, as_pair, check_device, next_pow2, on_device

__all__ = ["ablated_consumer", "check_conv_args"]

_MAX_BLOCK_O = 256
_TILE = 1 << 14 if INTERPRET else 512      # elements of a program's [BLOCK_HW, BLOCK_O] tile


@triton.jit
def _ablated_consumer_kernel(
        a_ptr, w_ptr, z_ptr, scale_ptr, shift_ptr, res_ptr, filters_ptr, images_ptr, out_ptr,
        O, H, W, Ho, Wo,
        sa_n, sa_k, sa_h, sa_w,
        sw_o, sw_k, sw_h, sw_w,
        sz_n, sz_o, sz_h, sz_w,
        sr_n, sr_o, sr_h, sr_w,
        so_p, so_o, so_h, so_w,
        SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr,
        DW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
        BLOCK_HW: tl.constexpr, BLOCK_O: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    k = tl.load(filters_ptr + p)                                      # int64 scalars
    n = tl.load(images_ptr + p)
    hw = tl.program_id(1) * BLOCK_HW + tl.arange(0, BLOCK_HW)        # [BLOCK_HW] output positions
    o = tl.program_id(2) * BLOCK_O + tl.arange(0, BLOCK_O)           # [BLOCK_O] output channels
    hw_ok = hw < Ho * Wo
    o_ok = o < O
    oh = hw // Wo
    ow = hw % Wo

    # delta = U_k(a[n, k]) on the tile: one input channel, kh*kw taps
    a_chan = a_ptr + n * sa_n + k * sa_k
    w_chan = w_ptr + k * sw_k + o * sw_o                              # [BLOCK_O]
    delta = tl.zeros([BLOCK_HW, BLOCK_O], dtype=tl.float32)
    for t in tl.static_range(KH * KW):
        ih = oh * SH - PH + (t // KW) * DH
        iw = ow * SW - PW + (t % KW) * DW
        inside = hw_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)  # zero padding
        av = tl.load(a_chan + ih * sa_h + iw * sa_w, mask=inside, other=0.0).to(tl.float32)
        wv = tl.load(w_chan + (t // KW) * sw_h + (t % KW) * sw_w, mask=o_ok, other=0.0).to(tl.float32)
        delta += av[:, None] * wv[None, :]

    # epilogue E(z - delta), float32
    tile_ok = hw_ok[:, None] & o_ok[None, :]
    z = tl.load(z_ptr + n * sz_n + o[None, :] * sz_o + oh[:, None] * sz_h + ow[:, None] * sz_w,
                mask=tile_ok, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + o, mask=o_ok, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + o, mask=o_ok, other=0.0).to(tl.float32)
    v = (z - delta) * scale[None, :] + shift[None, :]
    if HAS_RES:
        v += tl.load(res_ptr + n * sr_n + o[None, :] * sr_o + oh[:, None] * sr_h + ow[:, None] * sr_w,
                     mask=tile_ok, other=0.0).to(tl.float32)
    if ACT == 1:
        v = tl.maximum(v, 0.0)
    elif ACT == 2:
        v = tl.minimum(tl.maximum(v, 0.0), 6.0)
    tl.store(out_ptr + p * so_p + o[None, :] * so_o + oh[:, None] * so_h + ow[:, None] * so_w,
             v.to(out_ptr.dtype.element_ty), mask=tile_ok)


def conv_out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    """Output length of a conv along one dim (PyTorch's formula)."""
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def check_conv_args(fn: str, a, weight, z, scale, shift, residual, act, stride, padding, dilation,
                    dtypes=FLOAT_DTYPES):
    """Validate the conv consumer's arguments shared by ablated_consumer and closed_form_score.

    Returns ``(stride, padding, dilation)`` as int pairs; raises ValueError naming the argument and the fix.
    """
    names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
    for name, t in (("a", a), ("weight", weight), ("z", z), ("scale", scale), ("shift", shift),
                    ("residual", residual)):
        if t is None and name == "residual":
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{fn}: {name} must be a tensor, got {type(t).__name__}")
        if t.dtype not in dtypes:
            raise ValueError(f"{fn}: {name} must be {names}, got {t.dtype}; convert it (e.g. {name}.float())")
    if a.dim() != 4:
        raise ValueError(f"{fn}: a must be [N, K, H, W], got shape {tuple(a.shape)}")
    if weight.dim() != 4 or weight.shape[1] != a.shape[1]:
        raise ValueError(f"{fn}: weight must be [O, K={a.shape[1]}, kh, kw] (groups 1, K = a.shape[1]), got "
                         f"shape {tuple(weight.shape)}")
    stride, padding, dilation = (as_pair(fn, "stride", stride), as_pair(fn, "padding", padding),
                                 as_pair(fn, "dilation", dilation))
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"{fn}: need stride >= 1, dilation >= 1, padding >= 0; got stride {stride}, padding "
                         f"{padding}, dilation {dilation}")
    N, _, H, W = a.shape
    O, _, kh, kw = weight.shape
    Ho = conv_out_size(H, kh, stride[0], padding[0], dilation[0])
    Wo = conv_out_size(W, kw, stride[1], padding[1], dilation[1])
    if tuple(z.shape) != (N, O, Ho, Wo):
        raise ValueError(f"{fn}: z must be the conv's output [N, O, Ho, Wo] = {(N, O, Ho, Wo)} for a "
                         f"{tuple(a.shape)}, weight {tuple(weight.shape)}, stride {stride}, padding {padding}, "
                         f"dilation {dilation}; got {tuple(z.shape)} (are the conv settings the consumer's?)")
    for name, t in (("scale", scale), ("shift", shift)):
        if tuple(t.shape) != (O,):
            raise ValueError(f"{fn}: {name} must be [O] = [{O}] (per output channel), got {tuple(t.shape)}")
    if residual is not None and tuple(residual.shape) != tuple(z.shape):
        raise ValueError(f"{fn}: residual must be None or shaped like z {tuple(z.shape)}, got "
                         f"{tuple(residual.shape)}")
    if int(act) not in (0, 1, 2):
        raise ValueError(f"{fn}: act must be 0 (identity), 1 (relu) or 2 (relu6), got {act}")
    return stride, padding, dilation


def check_index(fn: str, name: str, t, length: Optional[int] = None) -> None:
    """ValueError unless ``t`` is a 1-D int64 tensor (of ``length`` elements when given)."""
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype != torch.int64:
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{fn}: {name} must be a 1-D int64 tensor, got {got}; build it with "
                         f"torch.tensor(..., dtype=torch.int64)")
    if length is not None and t.shape[0] != length:
        raise ValueError(f"{fn}: {name} must have {length} elements, got {t.shape[0]}")


def check_ranges(fn: str, **bounded) -> None:
    """ValueError unless each index tensor lies in [0, bound); ``bounded`` maps name -> (tensor, bound).
    One device sync for all of them (the kernels would read out of bounds otherwise)."""
    items = [(name, t, bound) for name, (t, bound) in bounded.items() if t.numel()]
    if not items:
        return
    ext = torch.stack([x for _, t, _ in items for x in (t.min(), t.max())]).tolist()
    for i, (name, _, bound) in enumerate(items):
        lo, hi = ext[2 * i], ext[2 * i + 1]
        if lo < 0 or hi >= bound:
            raise ValueError(f"{fn}: {name} must lie in [0, {bound}), got values in [{lo}, {hi}]")


# the schema of csrc/ops.cpp's carfast::ablated_consumer
@torch.library.custom_op(
    "carfast_triton::ablated_consumer", mutates_args=(),
    schema="(Tensor a, Tensor weight, Tensor z, Tensor scale, Tensor shift, Tensor? residual, int act, Tensor filters, "
           "Tensor images, int[] stride, int[] padding, int[] dilation, ScalarType? out_dtype) -> Tensor")
def _ablated_consumer_op(a: torch.Tensor, weight: torch.Tensor, z: torch.Tensor, scale: torch.Tensor,
                         shift: torch.Tensor, residual: Optional[torch.Tensor], act: int, filters: torch.Tensor,
                         images: torch.Tensor, stride: List[int], padding: List[int], dilation: List[int],
                         out_dtype: Optional[torch.dtype]) -> torch.Tensor:
    fn = "ablated_consumer"
    stride, padding, dilation = check_conv_args(fn, a, weight, z, scale, shift, residual, act, stride, padding,
                                                dilation)
    check_index(fn, "filters", filters)
    check_index(fn, "images", images, filters.shape[0])
    check_device(fn, a=a, weight=weight, z=z, scale=scale, shift=shift, residual=residual, filters=filters,
                 images=images)
    out_dtype = out_dtype or a.dtype
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"{fn}: out_dtype must be float32, float16 or bfloat16 (or None for a's), got {out_dtype}")
    N, K, H, W = a.shape
    O, _, kh, kw = weight.shape
    Ho, Wo = z.shape[2:]
    P = filters.shape[0]
    out = torch.empty((P, O, Ho, Wo), dtype=out_dtype, device=a.device, memory_format=torch.channels_last)
    if out.numel() == 0:
        return out
    check_ranges(fn, filters=(filters, K), images=(images, N))

    BLOCK_O = min(next_pow2(O), _MAX_BLOCK_O)
    BLOCK_HW = max(1, min(next_pow2(Ho * Wo), _TILE // BLOCK_O))
    grid = (P, triton.cdiv(Ho * Wo, BLOCK_HW), triton.cdiv(O, BLOCK_O))
    filters, images = filters.contiguous(), images.contiguous()     # read as ptr + p
    res = residual if residual is not None else z                     # never read when HAS_RES is False
    with on_device(a):
        _ablated_consumer_kernel[grid](
            a, weight, z, scale, shift, res, filters, images, out,
            O, H, W, Ho, Wo,
            *a.stride(), *weight.stride(), *z.stride(), *res.stride(), *out.stride(),
            SH=stride[0], SW=stride[1], PH=padding[0], PW=padding[1], DH=dilation[0], DW=dilation[1], KH=kh, KW=kw,
            HAS_RES=residual is not None, ACT=int(act), BLOCK_HW=BLOCK_HW, BLOCK_O=BLOCK_O, num_warps=4)
    return out


@_ablated_consumer_op.register_fake
def _(a, weight, z, scale, shift, residual, act, filters, images, stride, padding, dilation, out_dtype):
    shape = (filters.shape[0], z.shape[1], z.shape[2], z.shape[3])
    return torch.empty(shape, dtype=out_dtype or a.dtype, device=z.device, memory_format=torch.channels_last)


def ablated_consumer(a: torch.Tensor, weight: torch.Tensor, z: torch.Tensor, scale: torch.Tensor,
                     shift: torch.Tensor, residual: Optional[torch.Tensor], act: int, filters: torch.Tensor,
                     images: torch.Tensor, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                     out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``ablated_consumer_ref`` on the Triton kernel; same contract.

    Args:
        a [N, K, H, W], weight [O, K, kh, kw], z [N, O, Ho, Wo], scale/shift [O], residual [N, O, Ho, Wo] or
        None: float32/float16/bfloat16, any strides; act 0/1/2; filters, images [P] int64;
        stride/padding/dilation ints or pairs; out_dtype float32/float16/bfloat16 or None (a's dtype).
    Returns:
        [P, O, Ho, Wo] in ``out_dtype``, channels_last memory format (float32 arithmetic).
    """
    fn = "ablated_consumer"
    return torch.ops.carfast_triton.ablated_consumer(
        a, weight, z, scale, shift, residual, int(act), filters, images, list(as_pair(fn, "stride", stride)),
        list(as_pair(fn, "padding", padding)), list(as_pair(fn, "dilation", dilation)), out_dtype)
