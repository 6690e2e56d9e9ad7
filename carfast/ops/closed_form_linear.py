"""Closed-form ablated logits for a Linear consumer (e.g. the classifier itself, docs/design.md 3.4).

Setting: the consumer U is a Linear whose input feature block [k*w, (k+1)*w) belongs to filter k (w = 1
for a Linear target, H*W after flatten); after U comes an elementwise epilogue
E(v) = act(v * scale + shift + residual) and an affine tail with linear part ``tail`` [classes, O]
(the identity when U is the classifier). Then, for every filter k and image n,

    logits'[k, n] = logits[n] + tail @ (E(z[n] - delta[k, n]) - E(z[n])),
    delta[k, n]   = W[:, k*w:(k+1)*w] @ a[n, k*w:(k+1)*w]

which costs O(K * N * O * w) for all pairs, one batched contraction instead of K network passes.
"""
from __future__ import annotations

import torch

from carfast.ops.epilogue import epilogue

__all__ = ["closed_form_linear_ref"]


def closed_form_linear_ref(a: torch.Tensor, weight: torch.Tensor, width: int, z: torch.Tensor, scale: torch.Tensor,
                           shift: torch.Tensor, residual: torch.Tensor | None, act: int, tail: torch.Tensor,
                           logits: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """Ablated logits for every (filter, image) pair; plain PyTorch (works on any device).

    Args:
        a:        [N, K*w] float, the consumer's input.
        weight:   [O, K*w] float, the consumer's weight.
        width:    w, input features per filter.
        z:        [N, O] float, the consumer's intact output (bias included).
        scale, shift: [O], per-feature affine of the epilogue; residual: [N, O] or None.
        act:      0 identity, 1 relu, 2 relu6.
        tail:     [classes, O], the linear part of the affine tail.
        logits:   [N, classes], the intact logits.
        filters:  [J] int64, filters to remove one at a time.
    Returns:
        [J, N, classes] ablated logits.
    """
    n, o = a.shape[0], weight.shape[0]
    a_blocks = a.view(n, -1, width)[:, filters]                       # [N, J, w]
    w_blocks = weight.view(o, -1, width)[:, filters]                  # [O, J, w]
    delta = torch.einsum("njw,ojw->jno", a_blocks, w_blocks)         # [J, N, O]
    y0 = epilogue(z, scale, shift, residual, act, 0)                    # [N, O]
    dy = epilogue(z.unsqueeze(0) - delta, scale, shift, residual, act, 0) - y0
    return logits.unsqueeze(0) + dy @ tail.t()
