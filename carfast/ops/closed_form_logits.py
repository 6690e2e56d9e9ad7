"""Closed-form ablated logits for a conv consumer whose epilogue is elementwise and whose tail is linear.

Setting (docs/design.md 3.2 + 3.4): the consumer U is a Conv2d (groups=1, zero padding); after it comes an
elementwise epilogue E(v) = act(v * scale + shift + residual) per output channel, with ``residual`` a
fixed per-image tensor (a residual branch that does not depend on the ablated layer); after E, the
network is affine up to the logits: logits = T(y) + b. Removing input channel k of U then gives

    logits'[k, n] = logits[n] + T(E(z[n] - delta[k, n]) - E(z[n])),   delta[k, n] = U_k(a[n, k])

which touches only the output positions that ``a[n, k]`` reaches through the kernel window, and is
exactly ``logits[n]`` when ``a[n, k]`` is all zero (free zeros).

The reference below is the ``torch`` backend and the oracle for the compiled kernels; the ``cpu``
backend is the C++/OpenMP kernel in csrc/cpu/closed_form_logits.cpp, registered as
``torch.ops.carfast.closed_form_logits`` (schema in csrc/ops.cpp; its fake kernel is here).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from carfast import extensions
from carfast.ops import dispatch
from carfast.ops.epilogue import ACTIVATIONS, epilogue

__all__ = ["ACTIVATIONS", "closed_form_logits_ref", "closed_form_logits"]

def closed_form_logits_ref(a: torch.Tensor, weight: torch.Tensor, z: torch.Tensor, scale: torch.Tensor,
                           shift: torch.Tensor, residual: torch.Tensor | None, act: int, tail: torch.Tensor,
                           logits: torch.Tensor, filters: torch.Tensor, stride=(1, 1), padding=(0, 0),
                           dilation=(1, 1)) -> torch.Tensor:
    """Ablated logits for every (filter, image) pair; plain PyTorch.

    Args:
        a:        [N, K, H, W] float32, the consumer's input.
        weight:   [O, K, kh, kw] float32, the consumer's weight (groups=1).
        z:        [N, O, Ho, Wo] float32, the consumer's intact output (bias included).
        scale, shift: [O] float32, per-channel affine of the epilogue.
        residual: [N, O, Ho, Wo] float32 or None, added after the affine.
        act:      ``ACTIVATIONS`` code: 0 identity, 1 relu, 2 relu6.
        tail:     [classes, O, Ho, Wo] float32, the linear part of the affine tail.
        logits:   [N, classes] float32, the intact logits.
        filters:  [J] int64, input channels of the consumer to remove, one at a time.
        stride, padding, dilation: the consumer's conv settings.
    Returns:
        [J, N, classes] float32 ablated logits.
    """
    y0 = epilogue(z, scale, shift, residual, act, 2)
    tail2d = tail.reshape(tail.shape[0], -1)
    out = []
    for k in filters.tolist():
        delta = F.conv2d(a[:, k:k + 1], weight[:, k:k + 1], None, stride, padding, dilation)
        dy = epilogue(z - delta, scale, shift, residual, act, 2) - y0
        out.append(logits + dy.reshape(dy.shape[0], -1) @ tail2d.t())
    return torch.stack(out) if out else logits.new_zeros((0,) + tuple(logits.shape))


def _pair(v, name: str) -> list:
    """The conv setting ``v`` (an int or a pair) as ``[h, w]`` ints, for the compiled op's int[] arguments."""
    if isinstance(v, int):
        return [v, v]
    v = [int(x) for x in v]
    if len(v) == 1:
        return v * 2
    if len(v) != 2:
        raise ValueError(f"closed_form_logits: {name} must be an int or a pair (h, w), got {v!r}; "
                         f"pass the consumer's Conv2d.{name}")
    return v


def _closed_form_logits_cpu(a, weight, z, scale, shift, residual, act, tail, logits, filters, stride,
                            padding, dilation) -> torch.Tensor:
    """Launcher of the C++/OpenMP kernel (csrc/cpu/closed_form_logits.cpp); same contract as the reference.

    The kernel checks dtypes, devices and shapes itself; here ``filters`` may also be a list of ints.
    """
    if not isinstance(filters, torch.Tensor):
        filters = torch.tensor(list(filters), dtype=torch.int64)
    return torch.ops.carfast.closed_form_logits(a, weight, z, scale, shift, residual, int(act), tail, logits,
                                                filters, _pair(stride, "stride"), _pair(padding, "padding"),
                                                _pair(dilation, "dilation"))


if extensions.has_op("closed_form_logits"):
    @torch.library.register_fake("carfast::closed_form_logits")
    def _closed_form_logits_fake(a, weight, z, scale, shift, residual, act, tail, logits, filters, stride,
                                 padding, dilation):
        """Shape and dtype of the result for torch.compile / opcheck: [J, N, classes] like ``logits``."""
        return logits.new_empty((filters.shape[0], logits.shape[0], logits.shape[1]))


def closed_form_logits(a, weight, z, scale, shift, residual, act, tail, logits, filters, stride=(1, 1),
                       padding=(0, 0), dilation=(1, 1), backend: str = "torch") -> torch.Tensor:
    """``closed_form_logits_ref`` on the chosen backend; same contract and shapes.

    backend: "torch" (the plain-PyTorch reference, any device and dtype), "cpu" (the C++/OpenMP
    kernel: float32 CPU tensors) or "cuda" (the CUDA kernel: float32 CUDA tensors); a compiled backend
    that is not built raises RuntimeError saying why and how to fix it (see ``carfast.backends()``).
    """
    return dispatch.implementation("closed_form_logits", backend)(a, weight, z, scale, shift, residual, act, tail,
                                                                  logits, filters, stride, padding, dilation)


def _cuda(a, weight, z, scale, shift, residual, act, tail, logits, filters, stride, padding, dilation):
    """The CUDA kernel of closed_form_score also serves this op (csrc/cuda/bindings.cpp)."""
    if not isinstance(filters, torch.Tensor):
        filters = torch.tensor(list(filters), dtype=torch.int64, device=a.device)
    return torch.ops.carfast.closed_form_logits(a, weight, z, scale, shift, residual, int(act), tail, logits, filters,
                                                _pair(stride, "stride"), _pair(padding, "padding"),
                                                _pair(dilation, "dilation"))


dispatch.register("closed_form_logits", "torch", closed_form_logits_ref)
dispatch.register("closed_form_logits", "cpu", _closed_form_logits_cpu)
dispatch.register("closed_form_logits", "cuda", _cuda)
