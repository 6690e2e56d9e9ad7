"""carfast's CUDA kernels (csrc/cuda/*.cu) compiled for the CPU and called like the torch binding calls them.

The emulation (csrc/cuda/emu, overview in csrc/cuda/README.md) runs the very .cu files nvcc builds: this
module reads each one, rewrites the two constructs a C++ compiler cannot parse (``translate``), compiles
it with g++ against the shim headers of csrc/cuda/emu/include, links the result with the emulator's runtime
and C API into a shared library (``build``, cached by the hash of every input), and loads it with ctypes
(``Emulator``). The launchers choose their grids, blocks and shared memory as on the GPU; the
emulator checks those launches as the driver does and runs every block, thread by thread.

``Emulator``'s op methods mirror csrc/cuda/bindings.cpp: the same input conversions, output layouts and
launcher calls, outputs and workspaces filled with a poison byte first (so anything the kernels leave
unwritten shows). ``mutated`` and ``run_isolated`` serve the tests that break a kernel on purpose: a
broken kernel may also crash or hang, so it runs in a forked child.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import pickle
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
EMU_DIR = os.path.join(CUDA_DIR, "emu")
KERNEL_FILES = ("ablated_consumer.cu", "closed_form_score.cu", "score_reduce.cu")
# translation units of the library: the kernels, the emulator's own test kernels, its runtime and C API
UNITS = tuple(os.path.join(CUDA_DIR, f) for f in KERNEL_FILES) + tuple(
    os.path.join(EMU_DIR, f) for f in ("selftest.cu", "runtime.cpp", "api.cpp"))
# every header a unit may include (their text is part of every cache key)
HEADERS = (os.path.join(CUDA_DIR, "common.cuh"), os.path.join(CUDA_DIR, "kernels.h"),
           os.path.join(EMU_DIR, "cuda_emu.h"), os.path.join(EMU_DIR, "emu_control.h"),
           *(os.path.join(EMU_DIR, "include", h) for h in ("cuda_runtime.h", "cuda_fp16.h", "cuda_bf16.h")))
# -O1: compiles faster than -O2, and the emulated runs are no slower (fiber switches and the references
# dominate); -ffp-contract=off: no a*b+c fused behind the kernels' back (they call fmaf where they mean
# it); -fno-strict-aliasing: shared memory is one buffer read through several types, as CUDA code does;
# -U_FORTIFY_SOURCE: glibc's checked longjmp may reject the jumps between fiber stacks
CXXFLAGS = ("-std=c++17", "-O1", "-fPIC", "-fvisibility=hidden", "-fno-strict-aliasing", "-ffp-contract=off",
            "-U_FORTIFY_SOURCE", "-Wno-unknown-pragmas")
INCLUDES = (os.path.join(EMU_DIR, "include"), EMU_DIR, CUDA_DIR)
POISON = 0xFF            # fills outputs, workspaces and shared memory: NaN for floats, -1 for integers
ORDERS = {"forward": 0, "reverse": 1, "shuffled": 2}
H100_SHARED_OPTIN = 232448   # sharedMemPerBlockOptin of an H100 / H200 (227 KiB)
H100_SMS = 132
KERNEL_DTYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


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


# ---------------------------------------------------------------------------------------------
# Source translation

_LAUNCH = re.compile(r"(?P<kernel>(?:::)?[A-Za-z_]\w*(?:::[A-Za-z_]\w*)*(?:\s*<[^<>;()]*>)?)\s*<<<(?P<config>[^;]*?)>>>"
                     r"\s*\(")
_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?(?P<type>[A-Za-z_][\w:]*)\s+"
                            r"(?P<name>\w+)\s*\[\s*\]\s*;")


def _closing_paren(text: str, start: int) -> int:
    """Index of the ')' closing the '(' at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced parentheses after offset {start}")


def _in_line_comment(text: str, pos: int) -> bool:
    return "//" in text[text.rfind("\n", 0, pos) + 1:pos]


def translate(text: str, path: str) -> str:
    """A .cu file's text as C++ for the emulation; every line keeps its number (and a #line names the .cu).

    ``kernel<<<grid, block[, smem[, stream]]>>>(args)`` becomes
    ``::carfast_emu::launch(kernel, ::carfast_emu::LaunchConfig(__FILE__, __LINE__, "kernel", grid, block,
    smem, stream), args)``, and ``extern __shared__ T name[];`` becomes
    ``T* name = ::carfast_emu::dynamic_shared<T>();``. Everything else is compiled as written.
    """
    out, pos = [], 0
    for m in _LAUNCH.finditer(text):
        if m.start() < pos or _in_line_comment(text, m.start()):
            continue
        open_at = m.end() - 1
        close_at = _closing_paren(text, open_at)
        kernel, config = m.group("kernel"), m.group("config").strip()
        args = text[open_at + 1:close_at]
        out.append(text[pos:m.start()])
        out.append(f'::carfast_emu::launch({kernel}, ::carfast_emu::LaunchConfig(__FILE__, __LINE__, "{kernel}", '
                   f'{config}){", " if args.strip() else ""}{args})')
        pos = close_at + 1
    out.append(text[pos:])
    text = "".join(out)
    text = _EXTERN_SHARED.sub(lambda m: f"{m['type']}* {m['name']} = ::carfast_emu::dynamic_shared<{m['type']}>();",
                              text)
    leftover = [line for line in text.splitlines() if re.search(r"<<<|extern\s+__shared__", line)
                and not line.lstrip().startswith("//")]
    if leftover:
        raise ValueError(f"{path}: constructs the emulation cannot translate:\n" + "\n".join(leftover))
    return f'#line 1 "{path}"\n' + text


# ---------------------------------------------------------------------------------------------
# Build

def cache_dir() -> str:
    """$CARFAST_CUDA_EMU_CACHE, else a per-user folder in the temp dir."""
    d = os.environ.get("CARFAST_CUDA_EMU_CACHE") or os.path.join(tempfile.gettempdir(),
                                                                 f"carfast-cuda-emu-{os.getuid()}")
    os.makedirs(d, exist_ok=True)
    return d


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


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
    text = {p: overrides.get(p) if p in overrides else _read(p) for p in UNITS + HEADERS}
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
    """Compiles one unit in a scratch copy of csrc/cuda holding every header (overrides applied), so that
    every #include, relative or by the include path, finds the same text; a #line keeps each file's
    real name and line numbers in diagnostics and in the emulator's messages."""
    with tempfile.TemporaryDirectory(prefix="carfast-emu-") as tmp:
        def copy(path: str, body: str, suffix: str = "") -> str:
            dst = os.path.join(tmp, os.path.relpath(path, CUDA_DIR) + suffix)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            _write_atomic(dst, body if body.startswith("#line 1 ") else f'#line 1 "{path}"\n{body}')
            return dst

        for path, body in headers.items():
            copy(path, body)
        src = copy(unit, source, ".cpp")
        out = os.path.join(tmp, "unit.o")
        includes = [flag for d in INCLUDES for flag in ("-I", os.path.join(tmp, os.path.relpath(d, CUDA_DIR)))]
        _run([cxx, *CXXFLAGS, *includes, "-c", src, "-o", out], os.path.relpath(unit, ROOT), verbose)
        os.replace(out, obj)


def _run(cmd: list[str], what: str, verbose: bool) -> None:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if verbose:
        print(f"[cuda_emu] {what}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if res.returncode != 0:
        raise RuntimeError(f"building the CUDA emulation failed ({what}):\n{' '.join(cmd)}\n{res.stdout}{res.stderr}")


def mutated(path: str, old: str, new: str, occurrence: int | None = None) -> dict[str, str]:
    """``build`` overrides replacing ``old`` by ``new`` in ``path``: every occurrence, or only the given one
    (0-based). Fails when ``old`` is not there, so a mutation that no longer applies is noticed."""
    text = _read(path)
    count = text.count(old)
    if count == 0 or (occurrence is not None and occurrence >= count):
        raise ValueError(f"{os.path.relpath(path, ROOT)}: {old!r} occurs {count} time(s); the mutation no longer "
                         "applies, update it to the current source")
    if occurrence is None:
        return {path: text.replace(old, new)}
    at = -1
    for _ in range(occurrence + 1):
        at = text.index(old, at + 1)
    return {path: text[:at] + new + text[at + len(old):]}


# ---------------------------------------------------------------------------------------------
# Calls

class EmulatorError(RuntimeError):
    """A launch the emulated driver rejected, a fault inside a kernel, or the binding's shared memory check."""

    def __init__(self, code: int, message: str):
        super().__init__(f"CUDA emulation error {code}: {message}")
        self.code = code


@dataclass
class Call:
    """A prepared op call: ``launch()`` runs the kernels (no torch inside, so it may run in a forked child)
    and returns the status; ``outputs`` are what the kernels write; ``finish()`` makes the op's result."""
    launch: Callable[[], int]
    outputs: list[torch.Tensor]
    finish: Callable[[], Any]
    keep: list = field(default_factory=list)  # inputs in the kernels' layouts, alive until the call is done


def poisoned(shape, dtype, byte: int = POISON, memory_format=torch.contiguous_format) -> torch.Tensor:
    """torch.empty filled with ``byte`` (what the binding's at::empty leaves is undefined)."""
    t = torch.empty(shape, dtype=dtype, memory_format=memory_format)
    t.untyped_storage().fill_(byte)
    return t


def _ptr(t: torch.Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _int64s(values) -> ctypes.Array:
    return (ctypes.c_int64 * len(values))(*values)


def conv_geometry(a, weight, z, stride, padding, dilation) -> list[int]:
    """ConvGeometry's 15 sizes, as csrc/conv_checks.h computes them (the shapes must be valid)."""
    N, K, H, W = a.shape
    O, _, kh, kw = weight.shape
    sy, sx = stride
    py, px = padding
    dy, dx = dilation
    Ho = (H + 2 * py - dy * (kh - 1) - 1) // sy + 1
    Wo = (W + 2 * px - dx * (kw - 1) - 1) // sx + 1
    assert tuple(z.shape) == (N, O, Ho, Wo), (tuple(z.shape), (N, O, Ho, Wo))
    return [N, K, H, W, O, kh, kw, Ho, Wo, sy, sx, py, px, dy, dx]


_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_I = ctypes.c_int
_SIGNATURES = {
    "carfast_emu_configure": (None, [_I, ctypes.c_uint64, _I, _I64]),
    "carfast_emu_message": (ctypes.c_char_p, []),
    "carfast_emu_launch_count": (_I, []),
    "carfast_emu_launch_info": (None, [_I, _P, ctypes.POINTER(ctypes.c_char_p)]),
    "carfast_emu_ablated_consumer": (_I, [_P, _I64, _I, _I, _I] + [_P] * 12),
    "carfast_emu_closed_form": (_I, [_P, _I64, _I64, _I] + [_P] * 14 + [_I, _I, _I, _P, _P]),
    "carfast_emu_score_reduce": (_I, [_I64, _I64, _I64, _I, _P, _I64, _I64, _P, _P, _P, _P, _P]),
    "carfast_emu_selftest": (_I, [_I, _P, _I]),
    "carfast_emu_convert": (None, [_I, _P, _P, _I64]),
    "carfast_emu_fma": (None, [_I, _P, _P, _P, _P, _I64]),
}


class Emulator:
    """One loaded build of the emulation: an emulated H100 (132 SMs, 227 KiB of shared memory per block
    with the opt-in) whose ops take and return CPU tensors, as the CUDA ops take and return CUDA ones."""

    def __init__(self, lib_path: str, order: str = "forward", seed: int = 0, poison: int = POISON,
                 sm_count: int = H100_SMS, shared_optin: int = H100_SHARED_OPTIN):
        """order: the schedule, "forward", "reverse" or "shuffled" (with ``seed``), see
        csrc/cuda/emu/runtime.cpp; poison: the byte shared memory, outputs and workspaces start as;
        sm_count and shared_optin: the device the launchers plan for."""
        self.path = lib_path
        self.lib = ctypes.CDLL(lib_path)
        for name, (res, args) in _SIGNATURES.items():
            fn = getattr(self.lib, name)
            fn.restype, fn.argtypes = res, args
        self.order, self.seed, self.poison = order, seed, poison
        self.sm_count, self.shared_optin = sm_count, shared_optin

    def _apply(self) -> None:
        """Sets this object's schedule and device on the library (Emulators of one build share its state)."""
        self.lib.carfast_emu_configure(ORDERS[self.order], self.seed, self.poison, self.shared_optin)

    def _launcher(self, fn, args) -> Callable[[], int]:
        def launch() -> int:
            self._apply()
            return fn(*args)
        return launch

    def message(self) -> str:
        return self.lib.carfast_emu_message().decode()

    def launches(self) -> list[dict]:
        """The launches of the last call: kernel, grid, block, dynamic shared bytes, configuration error."""
        out = []
        for i in range(self.lib.carfast_emu_launch_count()):
            v, name = _int64s([0] * 8), ctypes.c_char_p()
            self.lib.carfast_emu_launch_info(i, v, ctypes.byref(name))
            out.append(dict(kernel=name.value.decode(), grid=tuple(v[0:3]), block=tuple(v[3:6]), shared_bytes=v[6],
                            error=v[7]))
        return out

    def run(self, call: Call):
        """Runs a prepared call in this process; EmulatorError if the launch or a kernel failed."""
        code = call.launch()
        if code != 0:
            raise EmulatorError(code, self.message())
        return call.finish()

    # -- carfast::ablated_consumer (bindings.cpp, ablated_consumer_cuda) --------------------------------
    def prepare_ablated_consumer(self, a, weight, z, scale, shift, residual, act, filters, images, stride,
                                 padding, dilation, out_dtype=None) -> Call:
        geom = conv_geometry(a, weight, z, stride, padding, dilation)
        O, Ho, Wo = geom[4], geom[7], geom[8]
        P = filters.shape[0]
        res = residual is not None
        # a, z and residual are read in one dtype: a's when they share it, else float32
        a_k, z_k, r_k = a, z, residual
        if z.dtype != a.dtype or (res and residual.dtype != a.dtype):
            a_k, z_k = a.float(), z.float()
            r_k = residual.float() if res else None
        want = out_dtype or a.dtype
        out_k = KERNEL_DTYPE.get(want)
        out_t = want if out_k is not None else torch.float32
        out = poisoned((P, O, Ho, Wo), out_t, self.poison)
        if not out.is_contiguous(memory_format=torch.channels_last):
            out = poisoned((P, O, Ho, Wo), out_t, self.poison, torch.channels_last)

        def finish():
            return out if out_k is not None else out.to(want)

        if out.numel() == 0:
            return Call(lambda: 0, [out], finish)
        wt = weight.float().permute(1, 2, 3, 0).contiguous()  # [K, kh, kw, O]
        scale_f, shift_f = scale.float().contiguous(), shift.float().contiguous()
        filters_c, images_c = filters.contiguous(), images.contiguous()
        strides = [_int64s(t.stride() if t is not None else (0,) * 4) for t in (a_k, z_k, r_k)]
        args = (_int64s(geom), P, int(act), KERNEL_DTYPE[a_k.dtype], out_k if out_k is not None else 0,
                _ptr(a_k), strides[0], _ptr(wt), _ptr(z_k), strides[1], _ptr(r_k), strides[2], _ptr(scale_f),
                _ptr(shift_f), _ptr(filters_c), _ptr(images_c), _ptr(out))
        return Call(self._launcher(self.lib.carfast_emu_ablated_consumer, args), [out], finish,
                    [a_k, z_k, r_k, wt, scale_f, shift_f, filters_c, images_c, args])

    def ablated_consumer(self, *args, **kwargs) -> torch.Tensor:
        return self.run(self.prepare_ablated_consumer(*args, **kwargs))

    # -- carfast::closed_form_logits / closed_form_score (bindings.cpp, closed_form_inputs, run_closed_form)
    def prepare_closed_form(self, a, weight, z, scale, shift, residual, act, tail, logits, filters, stride,
                            padding, dilation, labels=None) -> Call:
        score = labels is not None
        geom = conv_geometry(a, weight, z, stride, padding, dilation)
        N, C, J = geom[0], logits.shape[1], filters.shape[0]
        ins = [a.contiguous(), weight.transpose(0, 1).contiguous(), z.contiguous(),
               residual.contiguous() if residual is not None else None, scale.contiguous(), shift.contiguous(),
               tail.contiguous(), logits.contiguous(), filters.contiguous(),
               labels.contiguous() if score else None]
        if score:
            outs = [poisoned((J, C), torch.int64, self.poison), poisoned((J, C), torch.float64, self.poison),
                    poisoned((J, N), torch.bool, self.poison)]
            out_ptrs = [None, *map(_ptr, outs)]
        else:
            outs = [poisoned((J, N, C), torch.float32, self.poison)]
            out_ptrs = [_ptr(outs[0]), None, None, None]
        head = (_int64s(geom), C, J, int(act), *map(_ptr, ins), *out_ptrs, int(score), self.sm_count)
        plan = _int64s([0] * 6)
        self._apply()
        code = self.lib.carfast_emu_closed_form(*head, 0, None, plan)
        if code != 0:
            raise EmulatorError(code, self.message())
        workspace = poisoned((plan[5],), torch.uint8, self.poison)
        args = (*head, 1, _ptr(workspace), None)
        self.last_plan = dict(zip(("tile_images", "tiles", "a_in_shared", "w_in_shared", "shared_bytes",
                                   "workspace_bytes"), list(plan)))
        finish = (lambda: tuple(outs)) if score else (lambda: outs[0])
        return Call(self._launcher(self.lib.carfast_emu_closed_form, args), outs, finish, [ins, workspace, args])

    def closed_form_logits(self, a, weight, z, scale, shift, residual, act, tail, logits, filters, stride,
                           padding, dilation) -> torch.Tensor:
        return self.run(self.prepare_closed_form(a, weight, z, scale, shift, residual, act, tail, logits, filters,
                                                 stride, padding, dilation))

    def closed_form_score(self, a, weight, z, scale, shift, residual, act, tail, logits, filters, labels, stride,
                          padding, dilation):
        return self.run(self.prepare_closed_form(a, weight, z, scale, shift, residual, act, tail, logits, filters,
                                                 stride, padding, dilation, labels=labels))

    # -- carfast::score_reduce (bindings.cpp, score_reduce_cuda) ----------------------------------------
    def prepare_score_reduce(self, logits, labels, slots, num_slots) -> Call:
        P, C = logits.shape
        outs = [poisoned((num_slots, C), torch.int64, self.poison),
                poisoned((num_slots, C), torch.float64, self.poison), poisoned((P,), torch.bool, self.poison)]
        labels_c, slots_c = labels.contiguous(), slots.contiguous()
        args = (P, C, num_slots, KERNEL_DTYPE[logits.dtype], _ptr(logits), logits.stride(0), logits.stride(1),
                _ptr(labels_c), _ptr(slots_c), *map(_ptr, outs))
        return Call(self._launcher(self.lib.carfast_emu_score_reduce, args), outs, lambda: tuple(outs),
                    [logits, labels_c, slots_c, args])

    def score_reduce(self, logits, labels, slots, num_slots):
        return self.run(self.prepare_score_reduce(logits, labels, slots, num_slots))

    # -- the emulation's own checks ------------------------------------------------------------------------
    def selftest(self, which: int, threads: int, out_size: int) -> tuple[int, torch.Tensor]:
        """Runs test kernel ``which`` of csrc/cuda/emu/selftest.cu; (status, its int64 output)."""
        out = poisoned((out_size,), torch.int64, self.poison)
        self._apply()
        return self.lib.carfast_emu_selftest(which, _ptr(out), threads), out

    def convert(self, kind: int, x: torch.Tensor) -> torch.Tensor:
        """The shim's conversions: 0 float32 -> float16, 1 float16 -> float32, 2 -> bfloat16, 3 bfloat16 -> float32."""
        out_dtype = {0: torch.float16, 1: torch.float32, 2: torch.bfloat16, 3: torch.float32}[kind]
        x = x.contiguous()
        out = torch.empty(x.shape, dtype=out_dtype)
        self.lib.carfast_emu_convert(kind, _ptr(x), _ptr(out), x.numel())
        return out

    def fma(self, kind: int, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """0: fmaf, 1: __fmaf_rn, 2: __fadd_rn(__fmul_rn(a, b), c), elementwise on float32 tensors."""
        out = torch.empty_like(a)
        self.lib.carfast_emu_fma(kind, _ptr(a), _ptr(b), _ptr(c), _ptr(out), a.numel())
        return out


# ---------------------------------------------------------------------------------------------
# Isolation, for kernels broken on purpose

@dataclass
class Outcome:
    """How an isolated call ended: "ok" (``result``), "error" (the emulator reported one: ``detail``),
    "crash" (a signal) or "timeout"."""
    status: str
    detail: str = ""
    result: Any = None


def run_isolated(emu: Emulator, call: Call, timeout: float = 30.0) -> Outcome:
    """Runs ``call`` in a forked child, so that a kernel that reads or writes out of bounds, or loops, cannot
    take the test process with it; its outputs come back through a pipe. The child runs only the launch
    (the emulator and ctypes, no torch), then leaves with os._exit."""
    r, w = os.pipe()
    with warnings.catch_warnings():  # Python 3.12+ warns about forking with threads (torch's pool): the
        warnings.simplefilter("ignore", DeprecationWarning)  # child uses none of them, only ctypes
        pid = os.fork()
    if pid == 0:  # child: never returns
        status = 1
        try:
            import faulthandler
            faulthandler.disable()  # a crash is an expected outcome here, not worth a traceback
            os.close(r)
            code = call.launch()
            blobs = [ctypes.string_at(t.data_ptr(), t.untyped_storage().nbytes()) for t in call.outputs]
            view = memoryview(pickle.dumps((code, emu.message() if code else "", blobs)))
            while view:
                view = view[os.write(w, view):]
            status = 0
        finally:
            os._exit(status)
    os.close(w)
    chunks, deadline, timed_out = [], time.monotonic() + timeout, False
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                timed_out = True
                os.kill(pid, signal.SIGKILL)
                break
            chunk = os.read(r, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    if timed_out:
        return Outcome("timeout", f"no result within {timeout:.0f} s")
    if os.WIFSIGNALED(status):
        return Outcome("crash", f"killed by signal {signal.Signals(os.WTERMSIG(status)).name}")
    if not chunks:
        return Outcome("crash", f"the child exited with status {os.WEXITSTATUS(status)} before reporting")
    code, message, blobs = pickle.loads(b"".join(chunks))
    if code != 0:
        return Outcome("error", f"{code}: {message}")
    for t, blob in zip(call.outputs, blobs):
        ctypes.memmove(t.data_ptr(), blob, len(blob))
    return Outcome("ok", result=call.finish())
