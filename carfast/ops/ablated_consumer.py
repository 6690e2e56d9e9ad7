"""Ablated consumer: the consumer's output after its epilogue, for many (filter, image) pairs at once.

Setting (docs/design.md 3.2): the consumer U is a Conv2d (groups 1, zero padding) whose input channel k is
filter k's channel, followed by an elementwise epilogue E(v) = act(v * scale + shift + residual) (its
BatchNorm folded to scale/shift, an optional residual add, ReLU/ReLU6/identity). For pair p, removing
filter k = filters[p] on image n = images[p] gives

    out[p] = E(z[n] - U_k(a[n, k]))              U_k: the conv restricted to input channel k

which is what the rest of the network (the suffix after the epilogue) reads. All pairs come from one
cached A and Z: no copy of A per filter is made, and only the owned channel is convolved.

Layout: ``out`` is [P, O, Ho, Wo] in channels_last memory format (cuDNN's preferred layout for bf16/fp16
convolutions, and oneDNN's on CPU), so the suffix reads it without a transpose.

Backends: "torch" / "cpu" (this reference), "triton" (``ops/triton/ablated_consumer.py``) and "cuda"
(``csrc/cuda/ablated_consumer.cu``, registered as ``torch.ops.carfast.ablated_consumer``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from carfast import extensions
from carfast.ops import dispatch
from carfast.ops.epilogue import epilogue

__all__ = ["ablated_consumer_ref", "ablated_consumer"]


def ablated_consumer_ref(a: torch.Tensor, weight: torch.Tensor, z: torch.Tensor, scale: torch.Tensor,
                         shift: torch.Tensor, residual: torch.Tensor | None, act: int, filters: torch.Tensor,
                         images: torch.Tensor, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                         out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """E(z[n] - U_k(a[n, k])) for every pair (k, n) = (filters[p], images[p]); plain PyTorch.

    Args:
        a:        [N, K, H, W] float32/float16/bfloat16, the consumer's input (any strides).
        weight:   [O, K, kh, kw], the consumer's weight (groups 1), same dtype as ``a``.
        z:        [N, O, Ho, Wo], the consumer's intact output (bias included).
        scale, shift: [O], the epilogue's per-channel affine.
        residual: [N, O, Ho, Wo] or None, added after the affine (indexed by image).
        act:      0 identity, 1 relu, 2 relu6.
        filters:  [P] int64, the input channel removed in pair p.
        images:   [P] int64, the image of pair p.
        stride, padding, dilation: the consumer's conv settings (pairs of ints).
        out_dtype: dtype of the result (default ``a.dtype``); the arithmetic is float32.
    Returns:
        [P, O, Ho, Wo] in ``out_dtype``, channels_last memory format.
    """
    out_dtype = out_dtype or a.dtype
    f32 = torch.float32
    w = weight.to(f32)
    zp = z[images].to(f32)
    res = residual[images].to(f32) if residual is not None else None
    owned = a[images, filters].unsqueeze(1).to(f32)                        # [P, 1, H, W]
    # one grouped conv: pair p's single channel against weight[:, filters[p]]
    P, O = owned.shape[0], w.shape[0]
    if P:
        wk = w[:, filters].transpose(0, 1).reshape(P * O, 1, *w.shape[2:])   # [P*O, 1, kh, kw]
        delta = F.conv2d(owned.reshape(1, P, *owned.shape[2:]), wk, None, stride, padding, dilation, groups=P)
        delta = delta.reshape(P, O, *delta.shape[2:])
    else:
        delta = torch.zeros_like(zp)
    out = epilogue(zp - delta, scale.to(f32), shift.to(f32), res, act, 2)
    return out.to(out_dtype).contiguous(memory_format=torch.channels_last)


def ablated_consumer(a, weight, z, scale, shift, residual, act, filters, images, stride=(1, 1), padding=(0, 0),
                     dilation=(1, 1), out_dtype=None, backend: str = "torch") -> torch.Tensor:
    """``ablated_consumer_ref`` on the chosen backend (``dispatch``: "torch", "triton" or "cuda"; "cpu" has no
    kernel of its own and runs the reference); same contract."""
    return dispatch.implementation("ablated_consumer", backend)(a, weight, z, scale, shift, residual, act, filters,
                                                                images, stride, padding, dilation, out_dtype)


def _triton(*args):
    from carfast.ops.triton import ablated_consumer as tri
    return tri.ablated_consumer(*args)


def _cuda(a, weight, z, scale, shift, residual, act, filters, images, stride, padding, dilation, out_dtype):
    return torch.ops.carfast.ablated_consumer(a, weight, z, scale, shift, residual, int(act), filters, images,
                                              list(stride), list(padding), list(dilation), out_dtype)


dispatch.register("ablated_consumer", "torch", ablated_consumer_ref)
dispatch.register("ablated_consumer", "triton", _triton)
dispatch.register("ablated_consumer", "cuda", _cuda)


if extensions.has_op("ablated_consumer"):
    @torch.library.register_fake("carfast::ablated_consumer")
    def _ablated_consumer_fake(a, weight, z, scale, shift, residual, act, filters, images, stride, padding,
                               dilation, out_dtype):
        shape = (filters.shape[0], z.shape[1], z.shape[2], z.shape[3])
        return z.new_empty(shape, dtype=out_dtype or a.dtype).contiguous(memory_format=torch.channels_last)

    torch.library.impl("carfast::ablated_consumer", "CPU")(ablated_consumer_ref)
