"""Which implementation runs an op on a backend: one registry for every op.

Each op file registers its implementations (``register``): the plain-PyTorch reference under "torch",
which runs on any device and dtype, and each kernel under the name of its backend (``extensions.BACKENDS``:
"cpu", "triton", "cuda"), saying whether it counts top-k with k > 1. An implementation takes the op's
arguments as its public function does, without ``backend``.

``implementation(op, backend, topk=1)`` is the one place that chooses: the backend's kernel when it has
one for the op and the call (its availability checked, ``extensions.require_backend``), else the
reference, which gives the same results (a backend without a kernel for an op, or k > 1 where the
kernel counts top-1 only, runs the reference). ``has_kernel(op, backend)`` lets the scoring code ask
instead of naming backends; ``kernels()`` lists the registry (``carfast.backends()`` shows it).

A new backend is its op files (kernels) plus one ``register`` call per op, and its probe in
``extensions.py``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from carfast import extensions

__all__ = ["Implementation", "register", "implementation", "has_kernel", "kernels"]


@dataclass(frozen=True)
class Implementation:
    """``run`` implements an op on ``backend``; ``topk``: it counts top-k for any k (else top-1 only)."""
    backend: str
    run: Callable
    topk: bool = False


_OPS: dict[str, dict[str, Implementation]] = {}


def register(op: str, backend: str, run: Callable, *, topk: bool = False) -> None:
    """Make ``run`` the implementation of ``op`` on ``backend`` ("torch": the reference, which must come first)."""
    if backend not in extensions.BACKENDS:
        raise ValueError(f"register: unknown backend {backend!r}; expected one of {list(extensions.BACKENDS)} "
                         "(a new backend also needs its probe in carfast/extensions.py)")
    if backend != "torch" and "torch" not in _OPS.get(op, {}):
        raise ValueError(f"register: register the reference of {op!r} (backend 'torch') before its kernels")
    _OPS.setdefault(op, {})[backend] = Implementation(backend, run, topk=topk or backend == "torch")


def has_kernel(op: str, backend: str) -> bool:
    """Whether ``backend`` has a kernel of its own for ``op`` (the "torch" reference is not a kernel)."""
    return backend != "torch" and backend in _OPS.get(op, {})


def implementation(op: str, backend: str, topk: int = 1) -> Callable:
    """The function that runs ``op`` on ``backend`` for a call counting top-``topk`` (module docstring)."""
    if backend not in extensions.BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; expected one of {list(extensions.BACKENDS)}")
    impls = _OPS[op]
    impl = impls.get(backend)
    if impl is None or (topk != 1 and not impl.topk):
        return impls["torch"].run
    if backend != "torch":
        extensions.require_backend(backend)
    return impl.run


def kernels() -> dict[str, list[str]]:
    """{op: the backends with a kernel for it}, in registration order."""
    return {op: [b for b in impls if b != "torch"] for op, impls in _OPS.items()}
