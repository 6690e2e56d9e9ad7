"""Shared benchmark harness: timing, environment record, atomic JSON, data loading, providers.

Every benchmark in this folder uses these helpers so that numbers are taken and recorded the same way:

* ``time_call``: warm-up, then a ``time.perf_counter`` loop; reports the median (and every sample).
* ``environment``: what the numbers were measured on (CPU model, threads, torch / carfast versions,
  git commit, date, load average).
* ``write_json_atomic``: results land whole or not at all (temp file in the same folder + ``os.replace``).
* ``load_cifar10``: the data every case runs on (``--data`` / ``--n``).
* providers are named by string: "naive", "captum" (optional), "torch" and "cpu" (carfast backends);
  ``provider_status`` says whether one can run here and, if not, why.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:          # run as `python benchmarks/xxx.py` from anywhere
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import carfast  # noqa: E402
from carfast import atomic  # noqa: E402

#: the full CIFAR-10 test set shared beside the repository (10,000 images)
SHARED_CIFAR10 = REPO.parent / "shared" / "data" / "cifar10" / "test.npz"

#: every provider a benchmark may name, in display order; "<backend>-<precision>" runs carfast's
#: backend with a low-precision suffix (exact float32 re-run of small-margin pairs)
PROVIDERS = ("naive", "captum", "torch", "cpu", "cpu-bf16")
CARFAST_PROVIDERS = ("torch", "cpu", "cpu-bf16")


def carfast_provider(name: str) -> tuple[str, str]:
    """(backend, precision) of a carfast provider name such as "cpu" or "cpu-bf16"."""
    backend, _, precision = name.partition("-")
    return backend, precision or "fp32"

GIB = 1 << 30


# ---- timing ------------------------------------------------------------------------------------

@dataclass
class Timing:
    """Result of ``time_call``: the median of ``times`` (seconds) and the last call's return value."""
    median: float
    times: list = field(default_factory=list)
    result: Any = None

    def to_dict(self) -> dict:
        return {"median_s": self.median, "times_s": self.times}


def time_call(fn: Callable[[], Any], *, warmup: int | Callable[[], Any] = 1, repeat: int = 3,
              budget_s: float | None = None) -> Timing:
    """Time ``fn()``: warm up, then up to ``repeat`` timed calls; return the median.

    warmup: number of untimed calls of ``fn`` first, or a callable to run once instead (e.g. the
        same work on a few images, when a full call is too long to spend on warming up).
    budget_s: stop repeating once the timed calls have taken this long (at least one call is timed).
    """
    if callable(warmup):
        warmup()
    else:
        for _ in range(int(warmup)):
            fn()
    times, result, spent = [], None, 0.0
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        result = fn()
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
        if budget_s is not None and spent >= budget_s:
            break
    return Timing(statistics.median(times), times, result)


# ---- environment -------------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment(device: str = "cpu") -> dict:
    """What the numbers were measured on (``device``: where the benchmark computes)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds"),
        "device": device if device == "cpu" else f"{device} ({torch.cuda.get_device_name(torch.device(device))})",
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),    # the widest vector ISA torch uses: AVX2, AVX512
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "carfast_version": getattr(carfast, "__version__", None),
        "carfast_backends": [{k: b[k] for k in ("name", "available", "reason")} for b in carfast.extensions.backends()],
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "load_average_1_5_15": load,
    }


def describe_environment(env: dict) -> str:
    load = env.get("load_average_1_5_15")
    isa = f", {env['cpu_capability']}" if env.get("cpu_capability") else ""
    return (f"{env['date']}  {env['device']} ({env['cpu_model']}, {env['cpu_count']} logical CPUs{isa}), "
            f"torch {env['torch_version']} x{env['torch_threads']} threads, carfast {env['carfast_version']}, "
            f"commit {(env['git_commit'] or '?')[:10]}{' (dirty)' if env['git_dirty'] else ''}"
            + (f", load avg {load[0]:.2f}" if load else ""))


# ---- results -----------------------------------------------------------------------------------

def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (``carfast.atomic``), tensors and paths as plain data."""
    atomic.write_json_atomic(path, obj, indent=2, default=_json_default)
    return Path(path)


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-able: {type(o).__name__}")


# ---- data --------------------------------------------------------------------------------------

def default_data_path() -> str | None:
    """The shared full test set if it is there, else None (the bundled 2,000-image slice)."""
    return str(SHARED_CIFAR10) if SHARED_CIFAR10.is_file() else None


def load_cifar10(path: str | None, n: int | None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(x [N,3,32,32] float32 normalised, y [N] int64, a sentence saying where they came from)."""
    x, y = carfast.data.cifar10_test(n=n, path=path)
    if path is None:
        src = (f"carfast's bundled 2,000-image CIFAR-10 slice (class-balanced order"
               f"{'' if n is None else f', first {n}'}); the full test set was not found at {SHARED_CIFAR10}")
    else:
        src = f"{path} ({'all' if n is None else f'first {n}'} images in file order)"
    return x, y, src


# ---- providers ---------------------------------------------------------------------------------

def provider_status(name: str) -> tuple[bool, str]:
    """(available, reason) for a provider name."""
    if name == "naive":
        return True, "whole-network rerun per filter (reference)"
    if name == "captum":
        try:
            import captum
            from captum.attr import LayerFeatureAblation  # noqa: F401
        except Exception as exc:  # ImportError or a broken install
            return False, f"captum is not importable ({type(exc).__name__}: {exc}); `pip install captum`"
        return True, f"captum {captum.__version__} LayerFeatureAblation"
    if name in CARFAST_PROVIDERS:
        for b in carfast.extensions.backends():
            if b["name"] == carfast_provider(name)[0]:
                return bool(b["available"]), f"carfast backend {name!r}: {b['reason']}"
        return False, f"carfast does not list a backend {name!r}"
    raise ValueError(f"unknown provider {name!r}; choose from {', '.join(PROVIDERS)}")


# ---- exactness checks --------------------------------------------------------------------------

def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 100:
        return f"{s:.0f}"
    if s >= 1:
        return f"{s:.2f}"
    return f"{s:.3g}"


def fmt_rate(r: float | None) -> str:
    if r is None:
        return "-"
    if r >= 1e6:
        return f"{r / 1e6:.2f}M"
    if r >= 1e3:
        return f"{r / 1e3:.1f}k"
    return f"{r:.0f}"


def fmt_x(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}x" if v < 1000 else f"{v:.0f}x"
