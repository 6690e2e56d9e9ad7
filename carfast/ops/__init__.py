"""carfast's ops: each file holds one op's plain-PyTorch reference, its fake kernel, and the public
function that picks a backend ("torch", "cpu", "triton", "cuda"). The reference is the ``torch``
backend and the oracle that tests and benchmarks import. Triton kernels live in ``ops/triton/``, the
C++ and CUDA ones in ``csrc/``; the op schemas in ``csrc/ops.cpp``.

Importing this package registers the fake kernels of the compiled ops (``csrc/ops.cpp`` names it as
their Python module)."""
from carfast.ops import ablated_consumer, closed_form_logits, closed_form_score, score_reduce  # noqa: F401
