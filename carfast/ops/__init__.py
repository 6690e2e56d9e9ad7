"""carfast's ops: each file holds one op's plain-PyTorch reference, its fake kernel, its registrations in
``dispatch`` (the reference as the ``torch`` backend, each kernel under its backend) and the public
function, which asks ``dispatch`` for the implementation. The reference is the oracle that tests and
benchmarks import. Triton kernels live in ``ops/triton/``, the
C++ and CUDA ones in ``csrc/``; the op schemas in ``csrc/ops.cpp``.

Importing this package registers the fake kernels of the compiled ops (``csrc/ops.cpp`` names it as
their Python module)."""
from carfast.ops import ablated_consumer, closed_form_logits, closed_form_score, score_reduce  # noqa: F401
