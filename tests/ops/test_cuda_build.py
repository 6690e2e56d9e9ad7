"""The CUDA sources (csrc/cuda/*.cu) compile with nvcc alone, on a machine without a GPU.

Each .cu holds raw-pointer kernels and their launchers, declared in csrc/cuda/kernels.h, and includes
no torch header (the torch binding is csrc/cuda/bindings.cpp, built only by setup.py with a CUDA build
of torch). So the kernels' syntax, templates and device code are checked here with the installed nvcc,
for sm_90 (H100), in seconds; whether they compute the right thing is tests/ops/test_cuda_ops.py's job,
on a GPU. Skips, with the reason, where no nvcc is installed.
"""
from __future__ import annotations

import concurrent.futures
import glob
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CSRC = os.path.join(ROOT, "csrc")
CUDA_DIR = os.path.join(CSRC, "cuda")
CU_FILES = sorted(glob.glob(os.path.join(CUDA_DIR, "*.cu")))
# the flags torch's BuildExtension gives nvcc besides the architecture: the .cu files must not rely on
# implicit half/bfloat16 conversions, which torch's build turns off
TORCH_NVCC_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
FORBIDDEN_INCLUDE = re.compile(r"^(torch|ATen|c10|caffe2|pybind11)/|^Python\.h$|^torch\.h$")


def find_nvcc() -> str | None:
    """$CUDA_HOME/bin/nvcc, else /usr/local/cuda/bin/nvcc, else nvcc on PATH; None if none runs."""
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    for path in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return shutil.which("nvcc")


NVCC = find_nvcc()
needs_nvcc = pytest.mark.skipif(
    NVCC is None, reason="nvcc not found ($CUDA_HOME/bin/nvcc, /usr/local/cuda/bin/nvcc or PATH); install the "
                         "CUDA toolkit to check that csrc/cuda/*.cu compile")


def local_includes(path: str) -> list[tuple[str, bool]]:
    """(name, quoted) of every #include of a source file."""
    out = []
    with open(path) as f:
        for line in f:
            m = re.match(r'\s*#\s*include\s*([<"])([^>"]+)[>"]', line)
            if m:
                out.append((m.group(2), m.group(1) == '"'))
    return out


def test_cuda_sources_present():
    names = {os.path.basename(p) for p in glob.glob(os.path.join(CUDA_DIR, "*"))}
    expected = {"ablated_consumer.cu", "closed_form_score.cu", "score_reduce.cu", "kernels.h", "bindings.cpp"}
    assert expected <= names, f"csrc/cuda lacks {sorted(expected - names)}"


def test_cu_files_include_no_torch_header():
    """The .cu files, and the local headers they include, include CUDA and standard headers only."""
    seen, todo, bad = set(), list(CU_FILES), []
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name, quoted in local_includes(path):
            if FORBIDDEN_INCLUDE.search(name):
                bad.append(f"{os.path.relpath(path, ROOT)} includes <{name}>")
            local = os.path.normpath(os.path.join(os.path.dirname(path), name))
            if quoted and os.path.isfile(local):
                todo.append(local)
    assert CU_FILES and not bad, "the CUDA kernels must compile without torch:\n" + "\n".join(bad)
    assert os.path.join(CUDA_DIR, "kernels.h") in seen


def declared_launchers() -> list[str]:
    """Names of the functions kernels.h declares (the launchers the binding calls)."""
    with open(os.path.join(CUDA_DIR, "kernels.h")) as f:
        text = f.read()
    return re.findall(r"^(?:cudaError_t|size_t|ClosedFormPlan)\s+(\w+)\(", text, re.M)


def test_kernels_header_declares_each_op_launcher():
    assert {"launch_ablated_consumer", "launch_closed_form", "launch_score_reduce"} <= set(declared_launchers())


def compile_one(src: str, out_dir: str) -> tuple[str, str, int]:
    obj = os.path.join(out_dir, os.path.basename(src)[:-3] + ".o")
    cmd = [NVCC, "-arch=sm_90", "-c", "-O3", "-std=c++17", "-I", CSRC, *TORCH_NVCC_DEFINES, src, "-o", obj]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return obj, " ".join(cmd) + "\n" + res.stdout + res.stderr, res.returncode


@needs_nvcc
def test_every_cu_file_compiles_with_nvcc_alone(tmp_path):
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(CU_FILES)) as pool:
        results = list(pool.map(lambda src: compile_one(src, str(tmp_path)), CU_FILES))
    failed = [log for _, log, rc in results if rc != 0]
    assert not failed, "nvcc failed:\n" + "\n\n".join(failed)
    objects = [obj for obj, _, _ in results]
    assert all(os.path.getsize(obj) > 0 for obj in objects)

    # every launcher kernels.h declares is defined by some object (else the extension would not link)
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) not found: compiled, but the launchers' definitions are not checked")
    defined = subprocess.run([nm, "-C", "--defined-only", *objects], capture_output=True, text=True, check=True).stdout
    missing = [name for name in declared_launchers() if not re.search(rf" T carfast::cuda::{name}\(", defined)]
    assert not missing, f"declared in csrc/cuda/kernels.h but defined by no .cu file: {missing}"
