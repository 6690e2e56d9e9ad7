#!/usr/bin/env bash
# carfast's prepared GPU check: everything a GPU machine should do, in under 8 minutes.
#
#   bash benchmarks/gpu_check.sh RESULTS_DIR [--smoke] [--data PATH] [--limit SECONDS]
#   (RESULTS_DIR may instead come from $CARFAST_GPU_RESULTS, or $OUT on the device machine)
#
# Steps, each under a `timeout`, each logged to RESULTS_DIR; a failed step makes the exit status 1 but
# the later steps still run and write what they have:
#   1. versions   nvidia-smi, python, torch (+ CUDA, cuDNN), triton, nvcc, git commit  -> versions.log
#   2. data       the full CIFAR-10 test set (see "Data" below)
#   3. build      both extensions in place against this machine's python3 torch, all cores:
#                 MAX_JOBS=$(nproc) python3 setup.py build_ext --inplace -j $(nproc)   -> build.log
#                 then `carfast.extensions.backends()` must list cpu, triton and cuda as available
#                 (setup.py only warns when an extension fails to compile)
#   4. tests      TRITON_INTERPRET=0 python3 -m pytest tests/ops tests/test_backends.py -q  -> tests.log
#   5. bench      benchmarks/bench_gpu.py (naive, Captum if present, torch/triton/cuda x fp32/bf16 at
#                 layer1.0.conv1, layer2.4.conv1, layer3.8.conv1 on the full test set) -> bench.log,
#                 gpu_bench.json, gpu_bench.txt
# then prints the steps' status and the benchmark's short table last (also in summary.txt). At most 7
# files, flat in RESULTS_DIR (the device machine returns at most 8 files, each under 16 MiB; logs over
# 8 MiB keep their last 8 MiB).
#
# Data: the device machine receives the git working tree and carried folders, not ../shared. Once, here:
#     mkdir -p .gpu_data && cp ../shared/data/cifar10/test.npz .gpu_data/
#     grep -qx '/.gpu_data/' .git/info/exclude || echo '/.gpu_data/' >> .git/info/exclude
# and run on the device with carry [".gpu_data"] (28 MB; the tree must stay under 64 MiB):
#     bash benchmarks/gpu_check.sh "$OUT"          (timeout_s 540)
# The data file is looked up as: --data PATH, $CARFAST_GPU_DATA, ../shared/data/cifar10/test.npz,
# .gpu_data/test.npz; without one the benchmark runs on carfast's bundled 2,000-image slice and the
# data step fails.
#
# Smoke mode (--smoke, or automatically when no CUDA device is visible): no build; versions, the
# tests under TRITON_INTERPRET=1 and a CPU benchmark on 256 images (torch, cpu, triton in Triton's
# interpreter when cheap), so every CPU-side step of this script runs anywhere in a couple of minutes.
#
# Environment: PYTHON (default python3 if it imports torch, else .venv/bin/python), CARFAST_GPU_RESULTS,
# CARFAST_GPU_DATA, CARFAST_GPU_CHECK_SECONDS (the whole check's limit, default 460 s; smoke 240 s).

set -u -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2

RES="" SMOKE=0 DATA="${CARFAST_GPU_DATA:-}" LIMIT="${CARFAST_GPU_CHECK_SECONDS:-}"
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) SMOKE=1 ;;
        --data) DATA="$2"; shift ;;
        --data=*) DATA="${1#--data=}" ;;
        --limit) LIMIT="$2"; shift ;;
        --limit=*) LIMIT="${1#--limit=}" ;;
        -h|--help) sed -n '2,40p' "$0"; exit 0 ;;
        -*) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) RES="$1" ;;
    esac
    shift
done
RES="${RES:-${CARFAST_GPU_RESULTS:-${OUT:-}}}"
if [ -z "$RES" ]; then
    echo "gpu_check: give the results folder: bash benchmarks/gpu_check.sh RESULTS_DIR (or CARFAST_GPU_RESULTS=DIR)" >&2
    exit 2
fi
mkdir -p "$RES" || exit 2
RES="$(cd "$RES" && pwd)"

if [ -z "${PYTHON:-}" ]; then
    if python3 -c 'import torch' >/dev/null 2>&1; then PYTHON=python3
    elif [ -x "$REPO/.venv/bin/python" ]; then PYTHON="$REPO/.venv/bin/python"
    else echo "gpu_check: no python with torch (set PYTHON=...)" >&2; exit 2
    fi
fi
NPROC="$(nproc)"
export PYTHONUNBUFFERED=1 PYTHON NPROC

if [ "$SMOKE" = 0 ] && ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA device visible: smoke mode (no build; CPU benchmark)"
    SMOKE=1
fi
if [ "$SMOKE" = 1 ]; then
    export TRITON_INTERPRET=1
    LIMIT="${LIMIT:-240}"
else
    export TRITON_INTERPRET=0
    LIMIT="${LIMIT:-460}"
fi

T0=$SECONDS
FAIL=0
STEPS=()
left() { echo $(( LIMIT - (SECONDS - T0) )); }

cap_log() {   # keep a log's last 8 MiB (the device machine returns files under 16 MiB)
    local f="$1" max=$((8 << 20))
    if [ -f "$f" ] && [ "$(stat -c %s "$f")" -gt "$max" ]; then
        tail -c "$max" "$f" > "$f.tmp" && mv "$f.tmp" "$f"
    fi
}

# step NAME LOG CAP_SECONDS CMD...: run CMD under `timeout`, within what is left of the limit (keeping
# RESERVE seconds for the later steps), output to the terminal and to LOG; record status and time.
RESERVE=0
step() {
    local name="$1" log="$2" cap="$3"; shift 3
    local t=$(( $(left) - RESERVE ))
    [ "$t" -gt "$cap" ] && t="$cap"
    if [ "$t" -lt 10 ]; then
        STEPS+=("$(printf '%-9s SKIPPED  (no time left under the %s s limit)' "$name" "$LIMIT")")
        FAIL=1
        return 1
    fi
    echo; echo "==== $name (timeout ${t} s) ===="
    local s=$SECONDS rc
    # timeout signals its whole process group (compilers, pytest workers); a shell function runs in a
    # child bash, which inherits the functions exported with `export -f`
    if [ "$(type -t "$1")" = function ]; then set -- bash -c '"$@"' _ "$@"; fi
    timeout --signal=TERM --kill-after=15 "$t" "$@" 2>&1 | tee -a "$RES/$log"
    rc=${PIPESTATUS[0]}
    cap_log "$RES/$log"
    local verdict=OK
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then verdict="TIMEOUT"; elif [ "$rc" != 0 ]; then verdict="FAIL"; fi
    STEPS+=("$(printf '%-9s %-8s rc=%-3s %4d s  %s' "$name" "$verdict" "$rc" $((SECONDS - s)) "$log")")
    [ "$rc" = 0 ] || FAIL=1
    return "$rc"
}

rm -f "$RES"/{versions,build,tests,bench}.log "$RES"/summary.txt "$RES"/gpu_bench.{json,txt}
export SMOKE

# ---- 1. versions -----------------------------------------------------------------------------------
versions() {
    echo "date: $(date -Is)  host: $(hostname)  cores: $NPROC  mode: $([ "$SMOKE" = 1 ] && echo smoke || echo gpu)"
    echo "git: $(git rev-parse HEAD 2>/dev/null || echo '?') $(git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo '(dirty)')"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
    else
        echo "nvidia-smi: not found"
    fi
    command -v nvcc >/dev/null && nvcc --version | tail -n 2 || echo "nvcc: not found"
    "$PYTHON" - <<'EOF'
import platform, torch
print(f"python {platform.python_version()} ({__import__('sys').executable})")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
      f"{torch.backends.cudnn.version() if torch.cuda.is_available() else '-'}, "
      f"cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.1f} GiB")
try:
    import triton
    print(f"triton {triton.__version__}")
except Exception as exc:
    print(f"triton: not importable ({type(exc).__name__}: {exc})")
try:
    import captum
    print(f"captum {captum.__version__}")
except Exception:
    print("captum: not installed (the benchmark records it as unavailable)")
EOF
}
export -f versions
step versions versions.log 60 versions

# ---- 2. data ---------------------------------------------------------------------------------------
find_data() {
    for p in "$DATA" "$REPO/../shared/data/cifar10/test.npz" "$REPO/.gpu_data/test.npz"; do
        [ -n "$p" ] && [ -f "$p" ] && { echo "$p"; return 0; }
    done
    return 1
}
if DATA_PATH="$(find_data)"; then
    STEPS+=("$(printf '%-9s %-8s        %4d s  %s' data OK 0 "$DATA_PATH")")
    BENCH_DATA=(--data "$DATA_PATH")
else
    if [ -n "$DATA" ]; then echo "gpu_check: no data file at $DATA" >&2; fi
    STEPS+=("$(printf '%-9s %-8s        %4d s  %s' data FAIL 0 "full test set not found: bundled 2,000-image slice used (see the top of this script)")")
    FAIL=1
    BENCH_DATA=(--data bundled)
fi

# ---- 3. build ----------------------------------------------------------------------------------------
build() {
    export MAX_JOBS="$NPROC"
    if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then   # this GPU's architecture only: a short build
        TORCH_CUDA_ARCH_LIST="$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
        export TORCH_CUDA_ARCH_LIST
    fi
    echo "MAX_JOBS=$MAX_JOBS TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
    "$PYTHON" setup.py build_ext --inplace -j "$NPROC" || return 1
}
backends() {   # setup.py only warns when an extension does not compile: ask carfast what loads
    "$PYTHON" - "$@" <<'EOF'
import sys
import carfast.extensions as e
need = sys.argv[1:]
bad = []
for b in e.backends():
    print(f"  {b['name']:<7} {'available' if b['available'] else 'UNAVAILABLE'}: {b['reason']}")
    if b["name"] in need and not b["available"]:
        bad.append(b["name"])
if bad:
    print(f"backends: required but unavailable: {', '.join(bad)}")
sys.exit(1 if bad else 0)
EOF
}
export -f build backends
if [ "$SMOKE" = 1 ]; then
    STEPS+=("$(printf '%-9s %-8s        %4d s  %s' build SKIPPED 0 "smoke mode: no build")")
    step backends build.log 60 backends
else
    RESERVE=200          # keep room for the tests and the benchmark
    step build build.log 200 build
    step backends build.log 60 backends cpu triton cuda
fi

# ---- 4. tests ----------------------------------------------------------------------------------------
RESERVE=$([ "$SMOKE" = 1 ] && echo 100 || echo 150)
step tests tests.log 150 "$PYTHON" -m pytest tests/ops tests/test_backends.py -q -p no:cacheprovider

# ---- 5. benchmark ------------------------------------------------------------------------------------
RESERVE=0
BT=$(( $(left) - 5 ))
BUDGET=$(( BT - 25 ))   # the benchmark's own budget: it stops starting rows and writes its table in time
[ "$BUDGET" -lt 20 ] && BUDGET=20
BENCH_ARGS=(--out "$RES" --budget "$BUDGET" "${BENCH_DATA[@]}")
[ "$SMOKE" = 1 ] && BENCH_ARGS+=(--smoke)
step bench bench.log "$BT" "$PYTHON" benchmarks/bench_gpu.py "${BENCH_ARGS[@]}"

# ---- summary: the steps, then the benchmark's table last ------------------------------------------------
{
    echo
    echo "==== gpu_check $([ "$SMOKE" = 1 ] && echo '(SMOKE, CPU)') in $((SECONDS - T0)) s: $([ "$FAIL" = 0 ] && echo PASS || echo FAIL) ===="
    printf '%s\n' "${STEPS[@]}"
    echo "results: $RES"
    echo
    if [ -f "$RES/gpu_bench.txt" ]; then cat "$RES/gpu_bench.txt"; else echo "(no benchmark table: see bench.log)"; fi
} | tee "$RES/summary.txt"
exit "$FAIL"
