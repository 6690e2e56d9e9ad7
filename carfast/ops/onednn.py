"""oneDNN's private convolution ops (``torch.ops.mkldnn``), behind this one module.

torch does not document ``torch.ops.mkldnn._convolution_pointwise`` or ``_is_mkldnn_bf16_supported`` /
``_is_mkldnn_fp16_supported``; carfast uses them for the CPU suffix's fused conv -> ReLU and
conv -> add -> ReLU (``scoring/suffix_opt.py``). Nothing else in carfast names them, and
``tests/test_third_party.py`` checks their schemas and results against plain PyTorch, so a torch
release that changes them fails there, by name, rather than somewhere in scoring.

- ``available()``: whether this torch has oneDNN and the fused op;
- ``supports(dtype)``: whether this CPU's oneDNN runs convolutions in ``dtype`` (float32 always; bfloat16
  needs AVX-512 BF16 or AMX, float16 AVX-512-FP16 or AVX-NE-CONVERT, which e.g. AMD Zen 5 lacks);
- ``conv_relu`` / ``conv_add_relu``: x [N, C, H, W] -> relu(conv2d(x) (+ other)) [N, O, Ho, Wo], one
  oneDNN convolution with fused post-ops (the caller checks ``supports(x.dtype)``).
"""
from __future__ import annotations

import functools

import torch

__all__ = ["available", "supports", "conv_relu", "conv_add_relu"]


def available() -> bool:
    """oneDNN is built in and has the fused pointwise convolution."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


@functools.cache
def supports(dtype: torch.dtype) -> bool:
    """Whether this CPU's oneDNN runs convolutions in ``dtype`` (module docstring)."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32


def conv_relu(x, weight, bias, padding, stride, dilation, groups) -> torch.Tensor:
    """relu(conv2d(x, weight, bias)) as one oneDNN convolution; padding, stride, dilation: lists of 2 ints."""
    return torch.ops.mkldnn._convolution_pointwise.default(x, weight, bias, padding, stride, dilation, groups,
                                                           "relu", [], "")


def conv_add_relu(x, other, weight, bias, padding, stride, dilation, groups) -> torch.Tensor:
    """relu(conv2d(x, weight, bias) + other) as one oneDNN convolution (``other`` shaped like the output)."""
    return torch.ops.mkldnn._convolution_pointwise.binary(x, other, weight, bias, padding, stride, dilation, groups,
                                                          "add", 1.0, "relu", [], "")
