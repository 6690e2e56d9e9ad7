"""Benchmark ``score_group`` (coupled residual channels) against the naive stream-zeroing rerun.

    python benchmarks/bench_score_group.py [--n 500] [--naive-channels 3] [--data test.npz] [--out FILE]

Pretrained ResNet-56, the first ``--n`` CIFAR-10 test images, each stage's group (named by
``conv1``, ``layer2.0.conv2``, ``layer3.0.conv2``; 16, 32 and 64 channels):

* naive    the tests' reference (``tests/naive.py``: ``naive_stream_scores``): zero channel k at the
           output of the stem's BatchNorm / every block of the stage and rerun the whole network, batch
           256; timed on ``--naive-channels`` channels and scaled to all of them.
* carfast  ``carfast.score_group`` in float32 and in bf16 (exact re-run of near ties), one call each.

The per-image results on the channels the naive run covers must be equal (near ties aside), and the
bf16 counts must equal float32's. Prints a table; writes JSON (default
``benchmarks/results/score_group.json``).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the naive reference

from common import default_data_path, describe_environment, environment, load_cifar10, write_json_atomic  # noqa: E402
from naive import naive_stream_scores  # noqa: E402

import carfast  # noqa: E402

GROUPS = {"conv1": ["bn1"] + [f"layer1.{i}" for i in range(9)],
          "layer2.0.conv2": [f"layer2.{i}" for i in range(9)],
          "layer3.0.conv2": [f"layer3.{i}" for i in range(9)]}


def bench_group(model, layer, stream, x, y, naive_channels: int) -> dict:
    t0 = time.perf_counter()
    fp32 = carfast.score_group(model, layer, (x, y), per_image=True, progress=False)
    t_fp32 = time.perf_counter() - t0
    t0 = time.perf_counter()
    bf16 = carfast.score_group(model, layer, (x, y), per_image=True, precision="bf16", progress=False)
    t_bf16 = time.perf_counter() - t0
    C = fp32.filters.numel()
    chans = list(range(naive_channels))
    t0 = time.perf_counter()
    ref = naive_stream_scores(model, stream, x, y, chans)
    t_naive_part = time.perf_counter() - t0
    t_intact = ref_intact_seconds(model, x)
    per_channel = max(t_naive_part - t_intact, 1e-9) / len(chans)
    t_naive = t_intact + per_channel * C
    diff = fp32.image_correct[:len(chans)] != ref.correct
    mismatched = int((diff & ~ref.near_ties()).sum())
    return {"layer": layer, "channels": C, "images": len(y), "naive_seconds_est": t_naive,
            "naive_channels_run": len(chans), "fp32_seconds": t_fp32, "bf16_seconds": t_bf16,
            "fp32_speedup": t_naive / t_fp32, "bf16_speedup": t_naive / t_bf16,
            "mismatches_vs_naive": mismatched, "bf16_equal_fp32": bool(torch.equal(bf16.correct, fp32.correct)),
            "bf16_rechecked_fraction": bf16.pairs_rechecked / max(1, bf16.pairs_evaluated)}


def ref_intact_seconds(model, x) -> float:
    """The naive reference's one intact pass (it runs the model once without removal first)."""
    t0 = time.perf_counter()
    with torch.no_grad():
        for s in range(0, x.shape[0], 256):
            model(x[s:s + 256])
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500, help="CIFAR-10 test images")
    ap.add_argument("--naive-channels", type=int, default=3, help="channels the naive rerun is timed on")
    ap.add_argument("--data", default=default_data_path(), help="CIFAR-10 test .npz (default: ../shared)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "score_group.json"))
    args = ap.parse_args(argv)
    x, y, src = load_cifar10(args.data, args.n)
    env = environment()
    print(describe_environment(env))
    print(f"data: {src}")
    model = carfast.models.cifar_resnet(56)
    rows = []
    for layer, stream in GROUPS.items():
        rows.append(bench_group(model, layer, stream, x, y, args.naive_channels))
        r = rows[-1]
        print(f"{layer:<15} {r['channels']:>3} ch  naive ~{r['naive_seconds_est']:7.1f} s  "
              f"fp32 {r['fp32_seconds']:6.1f} s "
              f"({r['fp32_speedup']:.1f}x)  bf16 {r['bf16_seconds']:6.1f} s ({r['bf16_speedup']:.1f}x, "
              f"{100 * r['bf16_rechecked_fraction']:.1f} % re-run)  mismatches {r['mismatches_vs_naive']}  "
              f"bf16 == fp32: {r['bf16_equal_fp32']}", flush=True)
    write_json_atomic(args.out, {"environment": env, "data": src, "args": vars(args), "rows": rows})
    print(f"wrote {args.out}")
    return 0 if all(r["mismatches_vs_naive"] == 0 and r["bf16_equal_fp32"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
