#!/usr/bin/env bash
# Build carfast's sdist and wheel with `python -m build`, install the wheel into a fresh virtual
# environment outside the clone, and from a folder outside the clone run `carfast --version` and a
# small scoring with the bundled model and images. Any failure stops the script with a non-zero status.
# CI (.ci/run) runs it after tools/test.sh; about 3-4 minutes on a busy 2-core CPU (compiling the kernels,
# installing torch).
#
# Usage: bash tools/check_wheel.sh [OUTDIR]
#   OUTDIR  keep the sdist and the wheel there (default: a temporary folder, deleted at the end)
#   PYTHON=python3.11 chooses the interpreter of the fresh venv; KEEP_TMP=1 keeps the temporary folder.
#
# How it builds: `python -m build --no-isolation` from the project's .venv (created by
# tools/setup_venv.sh if missing). Without --no-isolation, build would make an isolated environment from
# pyproject.toml's build requirements, which do not list torch (on purpose: the kernels must be compiled
# against the torch that runs them), so the wheel would come out without the compiled kernels; and a
# bare torch requirement would download a multi-GB CUDA build. The wheel is compiled against .venv's torch
# (2.13.0, CPU) with CARFAST_MARCH_NATIVE=0 (a binary for any x86-64 CPU, not just this one), so the
# fresh venv installs torch==2.13.0 first.
set -euo pipefail
caller="$(pwd -P)"
cd "$(dirname "$0")/.."
repo="$(pwd -P)"
start=$SECONDS
say() { echo "check_wheel: $*"; }
fail() { echo "check_wheel: FAILED: $*" >&2; exit 1; }

[ -x .venv/bin/python ] || bash tools/setup_venv.sh
# the build frontend and pyproject.toml's build requirements (quick when already there)
.venv/bin/python -m pip install -q --disable-pip-version-check build "setuptools>=77" wheel

tmp="$(mktemp -d "${TMPDIR:-/tmp}/carfast-wheel.XXXXXX")"
tmp="$(cd "$tmp" && pwd -P)"
case "$tmp/" in "$repo"/*) fail "the temporary folder $tmp lies inside the clone; set TMPDIR elsewhere" ;; esac
had_egg_info=0; [ -e carfast.egg-info ] && had_egg_info=1
cleanup() {
    local rc=$?
    # the sdist step writes carfast.egg-info into the clone; remove it if this run made it
    [ "$had_egg_info" = 1 ] || rm -rf "$repo/carfast.egg-info"
    if [ "${KEEP_TMP:-0}" = 1 ]; then say "kept $tmp"; else rm -rf "$tmp"; fi
    [ "$rc" != 0 ] || say "OK in $((SECONDS - start)) s"
}
trap cleanup EXIT
dist="${1:-$tmp/dist}"
case "$dist" in /*) ;; *) dist="$caller/$dist" ;; esac
mkdir -p "$dist"
dist="$(cd "$dist" && pwd -P)"

say "building the sdist and the wheel into $dist"
rm -f "$dist"/carfast-*.tar.gz "$dist"/carfast-*.whl
CARFAST_MARCH_NATIVE=0 .venv/bin/python -m build --no-isolation --outdir "$dist" . > "$tmp/build.log" 2>&1 \
    || { tail -40 "$tmp/build.log" >&2; fail "python -m build (full log above, last 40 lines)"; }
grep "^carfast: skipping" "$tmp/build.log" | sort -u || true
shopt -s nullglob
sdists=("$dist"/carfast-*.tar.gz); wheels=("$dist"/carfast-*.whl)
[ ${#sdists[@]} = 1 ] || fail "expected one sdist in $dist, found ${#sdists[@]}"
[ ${#wheels[@]} = 1 ] || fail "expected one wheel in $dist, found ${#wheels[@]}"
sdist="${sdists[0]}"; wheel="${wheels[0]}"
say "built $(basename "$sdist") ($(du -h "$sdist" | cut -f1)), $(basename "$wheel") ($(du -h "$wheel" | cut -f1))"

# what each must hold: the sdist the sources and licences, the wheel the compiled kernels and the bundled data
.venv/bin/python - "$sdist" "$wheel" <<'EOF'
import re, sys, tarfile, zipfile
sdist, wheel = sys.argv[1:]
with tarfile.open(sdist) as t:
    s = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
with zipfile.ZipFile(wheel) as z:
    w = set(z.namelist())
    meta = next(z.read(n).decode() for n in w if n.endswith(".dist-info/METADATA"))
need_s = ["setup.py", "pyproject.toml", "README.md", "LICENSE", "CITATION.cff", "MANIFEST.in", "csrc/ops.cpp",
          "csrc/module.cpp", "carfast/__init__.py", "carfast/assets/cifar10_test_2000.npz",
          "carfast/assets/resnet20_cifar10.pt", "carfast/assets/LICENSE.resnet-cifar10"]
need_w = ["carfast/__init__.py", "carfast/cli/app.py", "carfast/assets/cifar10_test_2000.npz",
          "carfast/assets/resnet20_cifar10.pt", "carfast/assets/resnet56_cifar10.pt",
          "carfast/assets/alexnet_cifar10_fp16.pt", "carfast/assets/README.md",
          "carfast/assets/LICENSE.resnet-cifar10"]
problems = [f"sdist lacks {p}" for p in need_s if p not in s]
problems += [f"wheel lacks {p}" for p in need_w if p not in w]
if not any(re.fullmatch(r"carfast/_C\..*\.(so|pyd)", n) for n in w):
    problems.append("wheel lacks the compiled CPU kernels carfast/_C (see 'carfast: skipping' above)")
if not any(re.search(r"\.dist-info/licenses/LICENSE$", n) for n in w):
    problems.append("wheel lacks .dist-info/licenses/LICENSE")
if not re.search(r"^License-Expression: BSD-3-Clause$", meta, re.M):
    problems.append("wheel METADATA has no 'License-Expression: BSD-3-Clause'")
if problems:
    sys.exit("check_wheel: FAILED:\n  " + "\n  ".join(problems))
print(f"check_wheel: sdist ({len(s)} files) and wheel ({len(w)} files) hold the sources, kernels, data and licences")
EOF

say "installing torch==2.13.0 and the wheel into a fresh venv in $tmp/venv"
"${PYTHON:-python3}" -m venv "$tmp/venv"
pip=("$tmp/venv/bin/python" -m pip install -q --disable-pip-version-check)
# torch first, pinned: a bare torch requirement would download a multi-GB CUDA build
"${pip[@]}" torch==2.13.0 || fail "pip install torch==2.13.0"
"${pip[@]}" "$wheel" || fail "pip install $(basename "$wheel")"

cd "$tmp"   # outside the clone: nothing may come from the source tree
say "carfast --version (from $tmp)"
version="$("$tmp/venv/bin/carfast" --version)" || fail "carfast --version"
echo "$version"
echo "$version" | grep -Eq "^carfast [0-9]+\.[0-9]+" || fail "carfast --version printed no version"
echo "$version" | grep -Eq "^ +cpu +yes " || fail "the wheel's compiled CPU kernels do not load (see above)"

say "scoring with the installed package (from $tmp)"
OMP_NUM_THREADS=1 "$tmp/venv/bin/python" - "$repo" <<'EOF'
import os, sys
import torch
import carfast
from carfast.data import cifar10_test
from carfast.models import cifar_resnet

repo = os.path.realpath(sys.argv[1])
where = os.path.realpath(carfast.__file__)
assert not where.startswith(repo + os.sep), f"carfast was imported from the clone ({where}), not the wheel"
torch.set_num_threads(1)
model = cifar_resnet(20)                  # bundled pretrained weights
x, y = cifar10_test(64)                   # bundled CIFAR-10 slice
assert x.shape == (64, 3, 32, 32) and y.shape == (64,), (x.shape, y.shape)
res = carfast.score_layer(model, "layer3.2.conv1", (x, y), backend="cpu")   # the compiled kernel
assert res.car.shape == (64,), res.car.shape
assert res.class_car.shape == (64, 10), res.class_car.shape
ref = carfast.score_layer(model, "layer3.2.conv1", (x, y), backend="torch")  # plain PyTorch
assert torch.equal(res.car, ref.car), "the compiled kernel's scores differ from plain PyTorch's"
early = carfast.score_layer(model, "layer1.0.conv1", (x[:16], y[:16]))
assert early.car.shape == (16,), early.car.shape
order = res.ranking()
assert sorted(order.tolist()) == list(range(64)), "ranking is not a permutation of the filters"
print(f"check_wheel: carfast {carfast.__version__} from {os.path.dirname(where)}: scored layer3.2.conv1 "
      f"(64 filters) and layer1.0.conv1 (16) of the bundled ResNet-20; compiled kernel equals plain PyTorch")
EOF
