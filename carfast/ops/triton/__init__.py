"""carfast's Triton kernels: one module per op, each registered as ``torch.ops.carfast_triton.<op>``.

* ``ablated_consumer``  (``carfast.ops.ablated_consumer``'s contract)
* ``closed_form_score`` (``carfast.ops.closed_form_score``'s contract)
* ``score_reduce``      (``carfast.ops.score_reduce``'s contract)

Each op is a ``torch.library.custom_op`` with a fake kernel (so ``torch.compile`` and ``opcheck`` work)
whose implementation validates its arguments and launches the kernel(s). The public dispatchers in
``carfast/ops/<op>.py`` call the module-level function of the same name here (``backend="triton"``).

Triton runs on CUDA tensors; with ``TRITON_INTERPRET=1`` set before triton is imported, its interpreter
runs the same kernels on CPU tensors (slowly, for tests). ``carfast.extensions`` reports this backend as
available when this package imports, so importing it imports triton.

This file also holds the few helpers the three launchers share (device check, conv settings, sizes).
"""
from __future__ import annotations

import contextlib
import os
from typing import Sequence, Tuple

import torch
import triton  # noqa: F401  (the backend probe relies on this import failing when triton is missing)

__all__ = ["INTERPRET", "FLOAT_DTYPES", "check_device", "on_device", "as_pair", "next_pow2"]

#: Whether the kernels run in Triton's interpreter. Read once, as triton.jit reads it when the kernels
#: below are decorated (setting it later does not change how they run).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

#: Floating dtypes the kernels load (arithmetic is float32 whatever the storage dtype).
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_device(fn: str, **tensors) -> None:
    """ValueError unless every tensor given (None skipped) is on one device the kernels can run on:
    CUDA, or the CPU when the interpreter is on."""
    named = [(name, t) for name, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but {first_name} is on {first.device}; "
                             f"move all the tensors to one device")
    if first.device.type == "cuda" or (first.device.type == "cpu" and INTERPRET):
        return
    raise ValueError(f"{fn}: the triton backend needs CUDA tensors, got {first_name} on {first.device}; move the "
                     f"tensors to a GPU, or set TRITON_INTERPRET=1 before triton is imported to run the kernels "
                     f"on the CPU (slowly, for tests), or use backend='torch'")


def on_device(t: torch.Tensor):
    """Context in which to launch kernels on ``t``'s GPU (Triton launches on the current CUDA device)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def as_pair(fn: str, name: str, v) -> Tuple[int, int]:
    """The conv setting ``v`` (an int or a sequence of one or two ints) as ``(h, w)``."""
    if isinstance(v, int):
        return (v, v)
    if not isinstance(v, Sequence) or len(v) not in (1, 2):
        raise ValueError(f"{fn}: {name} must be an int or a pair (h, w), got {v!r}; pass the consumer's "
                         f"Conv2d.{name}")
    v = tuple(int(x) for x in v)
    return (v[0], v[0]) if len(v) == 1 else v


def next_pow2(n: int) -> int:
    """Smallest power of two >= max(n, 1) (Triton block sizes must be powers of two)."""
    return 1 << max(int(n) - 1, 0).bit_length()


# the op modules use the helpers above, so they are imported last
from carfast.ops.triton import ablated_consumer, closed_form_score, score_reduce  # noqa: E402, F401
