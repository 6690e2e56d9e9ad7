"""What the CUDA emulation compiles, and the translation of the .cu files into C++ (``translate``).

The very .cu files nvcc builds are compiled, each rewritten at build time (never on disk) where a C++
compiler cannot parse it: the launches ``kernel<<<...>>>(args)`` and the ``extern __shared__`` arrays.
Every line keeps its number, so compiler errors and the emulator's messages point into the real file.
"""
from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
EMU_DIR = os.path.join(CUDA_DIR, "emu")
KERNEL_FILES = ("ablated_consumer.cu", "closed_form_score.cu", "score_reduce.cu")
# translation units of the library: the kernels, the emulator's own test kernels, its runtime (launch,
# scheduler, sync: csrc/cuda/emu/runtime.h) and C API
UNITS = tuple(os.path.join(CUDA_DIR, f) for f in KERNEL_FILES) + tuple(
    os.path.join(EMU_DIR, f) for f in ("selftest.cu", "launch.cpp", "scheduler.cpp", "sync.cpp", "api.cpp"))
# every header a unit may include (their text is part of every cache key)
HEADERS = (os.path.join(ROOT, "csrc", "conv_geometry.h"), os.path.join(CUDA_DIR, "common.cuh"),
           os.path.join(CUDA_DIR, "kernels.h"),
           os.path.join(EMU_DIR, "cuda_emu.h"), os.path.join(EMU_DIR, "emu_control.h"),
           os.path.join(EMU_DIR, "runtime.h"),
           *(os.path.join(EMU_DIR, "include", h) for h in ("cuda_runtime.h", "cuda_fp16.h", "cuda_bf16.h")))


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


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
