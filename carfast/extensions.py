"""The one module that imports carfast's compiled code, and the record of which backends work here.

Backends:

* ``torch``  pure PyTorch (each op's reference); always available.
* ``cpu``    the C++/OpenMP kernels in ``carfast._C`` (csrc/, built by setup.py or CMakeLists.txt).
             Importing ``carfast._C`` registers the ops as ``torch.ops.carfast.*``.
* ``triton`` Triton kernels; needs ``import triton`` and a GPU (or ``TRITON_INTERPRET=1``).
* ``cuda``   CUDA kernels in ``carfast._C_cuda``.

``CARFAST_DISABLE_EXT=1`` keeps the compiled extensions and the Triton kernels from loading (to test the
pure-PyTorch path);
it is read once, when this module is first imported.

``python -c "import carfast.extensions as e; print(e.backends())"`` prints the table.
"""
from __future__ import annotations

import importlib
import os
from typing import Dict, List, Tuple

import torch

__all__ = ["backends", "has_backend", "require_backend", "has_op", "BACKENDS"]

#: every backend name, in order of preference for the user who does not choose
BACKENDS = ("cuda", "triton", "cpu", "torch")

REBUILD = "rebuild with `pip install --no-build-isolation -e .` (add -v to see the compiler's output)"
_DISABLED = os.environ.get("CARFAST_DISABLE_EXT") == "1"
_DISABLED_REASON = "disabled by CARFAST_DISABLE_EXT=1 (unset it to load the compiled extension)"


def _import(module: str) -> Tuple[bool, str]:
    """(loaded, reason) for one compiled module."""
    if _DISABLED:
        return False, _DISABLED_REASON
    try:
        importlib.import_module(module)
    except ImportError as exc:
        if getattr(exc, "name", None) == module:
            return False, f"{module} is not built; {REBUILD}"
        # built, but for another torch or platform (undefined symbol, wrong ABI, ...)
        return False, (f"{module} is built but does not load ({exc}); it was probably built against "
                       f"another torch than {torch.__version__}: {REBUILD}")
    except OSError as exc:
        return False, f"{module} does not load ({exc}); {REBUILD}"
    return True, f"{module} loaded"


_C_LOADED, _C_REASON = _import("carfast._C")


def has_op(name: str) -> bool:
    """Whether ``torch.ops.carfast.<name>`` exists (some compiled extension defined it)."""
    try:
        return hasattr(torch.ops.carfast, name)
    except RuntimeError:
        return False


def _has_kernel(op: str, key: str) -> bool:
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"carfast::{op}", key))
    except (AttributeError, RuntimeError):  # private API moved: trust the import
        return True


def _probe_cpu() -> Tuple[bool, str]:
    if not _C_LOADED:
        return False, _C_REASON
    if not _has_kernel("closed_form_logits", "CPU"):
        return False, f"carfast._C loaded but registered no CPU kernels; {REBUILD}"
    return True, "C++/OpenMP kernels in carfast._C"


def _probe_triton() -> Tuple[bool, str]:
    if _DISABLED:
        return False, _DISABLED_REASON
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return False, (f"triton is not importable ({type(exc).__name__}: {exc}); install it with "
                       "`pip install triton` (Linux)")
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not (torch.cuda.is_available() or interpret):
        return False, ("triton imports but there is no GPU (set TRITON_INTERPRET=1 before importing triton to "
                       "run its kernels on the CPU, slowly: for tests)")
    try:
        importlib.import_module("carfast.ops.triton")
    except Exception as exc:
        return False, f"carfast's Triton kernels do not load ({type(exc).__name__}: {exc})"
    where = "the CPU, in Triton's interpreter (TRITON_INTERPRET=1)" if interpret and not torch.cuda.is_available() \
        else "the GPU"
    return True, f"Triton kernels in carfast.ops.triton, on {where}"


def _probe_cuda() -> Tuple[bool, str]:
    why: List[str] = []
    if torch.version.cuda is None:
        why.append(f"torch {torch.__version__} is a CPU-only build (install a CUDA build of torch)")
    elif not torch.cuda.is_available():
        why.append("no CUDA device is visible")
    if _DISABLED:
        why.append(_DISABLED_REASON)
    elif not _C_LOADED:
        why.append(f"the ops are defined by carfast._C, which did not load ({_C_REASON})")
    else:
        loaded, reason = _import("carfast._C_cuda")
        if not loaded:
            why.append(reason)
    if why:
        return False, "; ".join(why)
    return True, "CUDA kernels in carfast._C_cuda"


_PROBES = {
    "torch": lambda: (True, "pure PyTorch (the ops' reference implementations)"),
    "cpu": _probe_cpu,
    "triton": _probe_triton,
    "cuda": _probe_cuda,
}
_RECORD: Dict[str, Tuple[bool, str]] = {}


def _status(name: str) -> Tuple[bool, str]:
    if name not in _PROBES:
        raise ValueError(f"carfast backend: unknown backend {name!r}; expected one of {list(BACKENDS)}")
    if name not in _RECORD:  # probed lazily: `import triton` is slow and needs no doing for "cpu"
        _RECORD[name] = _PROBES[name]()
    return _RECORD[name]


def backends() -> List[dict]:
    """One dict per backend: ``{"name": str, "available": bool, "reason": str, "kernels": [op, ...]}``, the
    ops it has kernels for (``carfast.ops.dispatch``; the others run the "torch" reference)."""
    from carfast.ops import dispatch  # the registry the op files fill (they import this module)
    ops = dispatch.kernels()
    return [{"name": n, "available": _status(n)[0], "reason": _status(n)[1],
             "kernels": [op for op, on in ops.items() if n in on]} for n in BACKENDS]


def has_backend(name: str) -> bool:
    """Whether backend ``name`` ("torch", "cpu", "triton", "cuda") can run here."""
    return _status(name)[0]


def require_backend(name: str) -> None:
    """Raise RuntimeError, with the recorded reason and the fix, unless backend ``name`` can run."""
    available, reason = _status(name)
    if not available:
        raise RuntimeError(f"carfast: backend {name!r} is not available: {reason}. "
                           f"Use backend='torch' (pure PyTorch) meanwhile.")

