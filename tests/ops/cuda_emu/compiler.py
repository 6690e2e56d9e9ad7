"""Building the CUDA emulation: g++ compiles each translation unit (sources.UNITS, the .cu files translated)
against the shim headers of csrc/cuda/emu/include, and links them into a shared library (``build``),
every object cached by the hash of its inputs. Broken variants of a kernel build from overrides of the
sources' text, never from changed files.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time

from .sources import CUDA_DIR, EMU_DIR, HEADERS, ROOT, UNITS, read, translate

# -O1: compiles faster than -O2, and the emulated runs are no slower (fiber switches and the references
# dominate); -ffp-contract=off: no a*b+c fused behind the kernels' back (they call fmaf where they mean
# it); -fno-strict-aliasing: shared memory is one buffer read through several types, as CUDA code does;
# -U_FORTIFY_SOURCE: glibc's checked longjmp may reject the jumps between fiber stacks
CXXFLAGS = ("-std=c++17", "-O1", "-fPIC", "-fvisibility=hidden", "-fno-strict-aliasing", "-ffp-contract=off",
            "-U_FORTIFY_SOURCE", "-Wno-unknown-pragmas")
INCLUDES = (os.path.join(EMU_DIR, "include"), EMU_DIR, CUDA_DIR)
CSRC_DIR = os.path.dirname(CUDA_DIR)      # the scratch copy mirrors csrc/ (kernels.h includes ../conv_geometry.h)


def find_cxx() -> str | None:
    """$CXX, else g++, else c++ (None if none is found): the compiler that builds the emulation."""
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def unavailable_reason() -> str | None:
    """Why the emulation cannot be built here (None if it can): it needs a C++17 compiler and a POSIX
    system with ucontext (Linux)."""
    if not sys.platform.startswith("linux"):
        return f"the CUDA emulation needs Linux (ucontext fibers), this is {sys.platform}"
    if find_cxx() is None:
        return "no C++ compiler ($CXX, g++ or c++ on PATH) to build the CUDA emulation"
    return None


def cache_dir() -> str:
    """$CARFAST_CUDA_EMU_CACHE, else a per-user folder in the temp dir."""
    d = os.environ.get("CARFAST_CUDA_EMU_CACHE") or os.path.join(tempfile.gettempdir(),
                                                                 f"carfast-cuda-emu-{os.getuid()}")
    os.makedirs(d, exist_ok=True)
    return d


def _write_atomic(path: str, data: bytes | str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    os.replace(tmp, path)


_CXX_VERSION: dict[str, str] = {}


def _cxx_version(cxx: str) -> str:
    if cxx not in _CXX_VERSION:
        _CXX_VERSION[cxx] = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    return _CXX_VERSION[cxx]


def build(overrides: dict[str, str] | None = None, verbose: bool = False) -> str:
    """Compiles the emulation and returns the path of its shared library.

    ``overrides`` maps a source path (one of UNITS or HEADERS) to the text to compile instead of the file's
    (a deliberately broken kernel); the files themselves are never changed. Each translation unit's
    object is cached under ``cache_dir()`` by the hash of the compiler, the flags, its text and every
    header's, so a rebuild only compiles what changed (one .cu for a broken variant).
    """
    overrides = {os.path.abspath(k): v for k, v in (overrides or {}).items()}
    unknown = set(overrides) - set(UNITS) - set(HEADERS)
    if unknown:
        raise ValueError(f"overrides for files outside the emulation's sources: {sorted(unknown)}")
    cxx = find_cxx()
    if cxx is None:
        raise RuntimeError(unavailable_reason())
    text = {p: overrides.get(p) if p in overrides else read(p) for p in UNITS + HEADERS}
    common = hashlib.sha256()
    for part in (cxx, _cxx_version(cxx), " ".join(CXXFLAGS), *(text[h] for h in HEADERS)):
        common.update(part.encode() + b"\0")
    root = cache_dir()
    objects = []
    for unit in UNITS:
        source = translate(text[unit], unit) if unit.endswith(".cu") else text[unit]
        key = common.copy()
        key.update(unit.encode() + b"\0" + source.encode())
        obj = os.path.join(root, f"{os.path.basename(unit)}-{key.hexdigest()[:24]}.o")
        if not os.path.exists(obj):
            _compile(cxx, unit, source, {h: text[h] for h in HEADERS}, obj, verbose)
        objects.append(obj)
    lib = os.path.join(root, "carfast_cuda_emu-" + hashlib.sha256("\0".join(objects).encode()).hexdigest()[:24] + ".so")
    if not os.path.exists(lib):
        tmp = f"{lib}.{os.getpid()}.tmp"
        _run([cxx, "-shared", "-pthread", "-o", tmp, *objects], "link", verbose)
        os.replace(tmp, lib)
    return lib


def _compile(cxx: str, unit: str, source: str, headers: dict[str, str], obj: str, verbose: bool) -> None:
    """Compiles one unit in a scratch copy of csrc holding every header (overrides applied), so that
    every #include, relative or by the include path, finds the same text; a #line keeps each file's
    real name and line numbers in diagnostics and in the emulator's messages."""
    with tempfile.TemporaryDirectory(prefix="carfast-emu-") as tmp:
        def copy(path: str, body: str, suffix: str = "") -> str:
            dst = os.path.join(tmp, os.path.relpath(path, CSRC_DIR) + suffix)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            _write_atomic(dst, body if body.startswith("#line 1 ") else f'#line 1 "{path}"\n{body}')
            return dst

        for path, body in headers.items():
            copy(path, body)
        src = copy(unit, source, ".cpp")
        out = os.path.join(tmp, "unit.o")
        includes = [flag for d in INCLUDES for flag in ("-I", os.path.join(tmp, os.path.relpath(d, CSRC_DIR)))]
        _run([cxx, *CXXFLAGS, *includes, "-c", src, "-o", out], os.path.relpath(unit, ROOT), verbose)
        os.replace(out, obj)


def _run(cmd: list[str], what: str, verbose: bool) -> None:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if verbose:
        print(f"[cuda_emu] {what}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if res.returncode != 0:
        raise RuntimeError(f"building the CUDA emulation failed ({what}):\n{' '.join(cmd)}\n{res.stdout}{res.stderr}")
