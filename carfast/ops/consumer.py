"""A consumer and its epilogue as one spec, passed whole to the ops that ablate its input channels.

The consumer reads the target's filters: a Conv2d (groups 1, zero padding; ``ConvConsumer``) or a Linear
(``LinearConsumer``), followed by the elementwise epilogue E(v) = act(v * scale + shift + residual) of
``ops/epilogue.py``. A spec holds what does not depend on the images (the weight over the consumer's
gathered input, the folded affine, the activation code, the conv settings); the ops take the per-image
tensors beside it. Each op's flat argument list is written once, in its reference (``ops/<op>.py``), and
these methods are the one place a spec is unpacked into it, so scoring never lists a kernel's arguments.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from carfast.ops.ablated_consumer import ablated_consumer
from carfast.ops.closed_form_linear import closed_form_linear_ref
from carfast.ops.closed_form_logits import closed_form_logits
from carfast.ops.closed_form_score import closed_form_score

__all__ = ["ConvConsumer", "LinearConsumer"]


@dataclass(frozen=True, eq=False)
class ConvConsumer:
    """A Conv2d consumer (groups 1, zero padding) and its epilogue.

    weight [O, K, kh, kw]; scale, shift [O]; act an ``ops.epilogue.ACTIVATIONS`` code; stride, padding and
    dilation pairs of ints. In every method ``a`` is the consumer's input [N, K, H, W], ``z`` its intact
    output [N, O, Ho, Wo] and ``residual`` [N, O, Ho, Wo] or None.
    """
    weight: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor
    act: int
    stride: tuple
    padding: tuple
    dilation: tuple

    kind = "conv"

    def ablated(self, a, z, residual, filters, images, out_dtype=None, backend: str = "torch") -> torch.Tensor:
        """[P, O, Ho, Wo] epilogue outputs with input channel ``filters[p]`` removed on image ``images[p]``
        (``ops.ablated_consumer``)."""
        return ablated_consumer(a, self.weight, z, self.scale, self.shift, residual, self.act, filters, images,
                                self.stride, self.padding, self.dilation, out_dtype=out_dtype, backend=backend)

    def closed_form_logits(self, a, z, residual, tail, logits, filters, backend: str = "torch") -> torch.Tensor:
        """[J, N, classes] ablated logits through the affine ``tail`` [classes, O, Ho, Wo] from the intact
        ``logits`` [N, classes] (``ops.closed_form_logits``)."""
        return closed_form_logits(a, self.weight, z, self.scale, self.shift, residual, self.act, tail, logits, filters,
                                  self.stride, self.padding, self.dilation, backend=backend)

    def closed_form_score(self, a, z, residual, tail, logits, filters, labels, backend: str = "torch"):
        """(counts [J, classes] int64, loss sums [J, classes] float64, correct [J, N] bool) of the closed form
        reduced against ``labels`` [N] (``ops.closed_form_score``)."""
        return closed_form_score(a, self.weight, z, self.scale, self.shift, residual, self.act, tail, logits, filters,
                                 labels, self.stride, self.padding, self.dilation, backend=backend)


@dataclass(frozen=True, eq=False)
class LinearConsumer:
    """A Linear consumer and its epilogue: weight [O, K * width] (``width`` input features per filter),
    scale, shift [O], act. ``a`` is [N, K * width], ``z`` and ``residual`` [N, O]."""
    weight: torch.Tensor
    width: int
    scale: torch.Tensor
    shift: torch.Tensor
    act: int

    kind = "linear"

    def closed_form_logits(self, a, z, residual, tail, logits, filters, backend: str = "torch") -> torch.Tensor:
        """[J, N, classes] ablated logits through the affine ``tail`` [classes, O] (``ops.closed_form_linear``;
        its reference is its only implementation, whatever ``backend``)."""
        return closed_form_linear_ref(a, self.weight, self.width, z, self.scale, self.shift, residual, self.act, tail,
                                      logits, filters)
