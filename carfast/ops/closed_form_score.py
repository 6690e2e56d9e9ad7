"""Closed-form logits fused with the scoring reduction: per-(filter, class) counts without logits in memory.

The composition of ``closed_form_logits`` (all J x N ablated logits of a conv consumer with an
elementwise epilogue and an affine tail, see that module) and ``score_reduce`` (per-(filter, class)
correct counts and float64 loss sums), in one op, so that the [J, N, classes] logits never reach memory
on the GPU backends: each pair's classes are reduced where they are computed.

Backends: "torch" / "cpu" (this reference; "cpu" runs the C++ closed_form_logits kernel then the
reduction), "triton" (``ops/triton/closed_form_score.py``) and "cuda" (``csrc/cuda/closed_form_score.cu``,
``torch.ops.carfast.closed_form_score``).
"""
from __future__ import annotations

import torch

from carfast import extensions
from carfast.ops import dispatch
from carfast.ops.closed_form_logits import closed_form_logits
from carfast.ops.score_reduce import score_reduce_ref

__all__ = ["closed_form_score_ref", "closed_form_score"]


def closed_form_score_ref(a, weight, z, scale, shift, residual, act: int, tail, logits, filters, labels,
                          stride=(1, 1), padding=(0, 0), dilation=(1, 1), backend: str = "torch"):
    """Per-(filter, class) results of removing each of ``filters``; plain PyTorch.

    Args: those of ``closed_form_logits_ref`` (a [N, K, H, W], weight [O, K, kh, kw], z [N, O, Ho, Wo],
    scale/shift [O], residual [N, O, Ho, Wo] or None, act, tail [classes, O, Ho, Wo], logits [N, classes],
    filters [J] int64, stride/padding/dilation), all float32, plus labels [N] int64.
    Returns:
        counts [J, classes] int64, loss_sums [J, classes] float64, correct [J, N] bool
        (as ``score_reduce_ref`` over the J x N pairs, filter-major).
    """
    abl = closed_form_logits(a, weight, z, scale, shift, residual, act, tail, logits, filters, stride, padding,
                             dilation, backend=backend)                       # [J, N, classes]
    J, N, C = abl.shape
    slots = torch.arange(J, device=abl.device).repeat_interleave(N)
    counts, loss_sums, correct = score_reduce_ref(abl.reshape(J * N, C), labels.repeat(J), slots, J)
    return counts, loss_sums, correct.view(J, N)


def closed_form_score(a, weight, z, scale, shift, residual, act, tail, logits, filters, labels, stride=(1, 1),
                      padding=(0, 0), dilation=(1, 1), backend: str = "torch"):
    """``closed_form_score_ref`` on the chosen backend (``dispatch``: "torch", "cpu", "triton" or "cuda"); same
    contract."""
    return dispatch.implementation("closed_form_score", backend)(a, weight, z, scale, shift, residual, act, tail,
                                                                 logits, filters, labels, stride, padding, dilation)


def _cpu(*args):
    """The C++ closed_form_logits kernel, then the reduction (the reference's arguments)."""
    return closed_form_score_ref(*args, backend="cpu")


def _triton(*args):
    from carfast.ops.triton import closed_form_score as tri
    return tri.closed_form_score(*args)


def _cuda(a, weight, z, scale, shift, residual, act, tail, logits, filters, labels, stride, padding, dilation):
    return tuple(torch.ops.carfast.closed_form_score(a, weight, z, scale, shift, residual, int(act), tail, logits,
                                                     filters, labels, list(stride), list(padding), list(dilation)))


dispatch.register("closed_form_score", "torch", closed_form_score_ref)
dispatch.register("closed_form_score", "cpu", _cpu)
dispatch.register("closed_form_score", "triton", _triton)
dispatch.register("closed_form_score", "cuda", _cuda)


if extensions.has_op("closed_form_score"):
    @torch.library.register_fake("carfast::closed_form_score")
    def _closed_form_score_fake(a, weight, z, scale, shift, residual, act, tail, logits, filters, labels, stride,
                                padding, dilation):
        J, N, C = filters.shape[0], logits.shape[0], logits.shape[1]
        return (logits.new_empty((J, C), dtype=torch.int64), logits.new_empty((J, C), dtype=torch.float64),
                logits.new_empty((J, N), dtype=torch.bool))

    torch.library.impl("carfast::closed_form_score", "CPU")(_cpu)
