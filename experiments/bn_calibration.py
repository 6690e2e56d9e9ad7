"""BatchNorm statistics re-estimated on test images: which images keep the pretrained ResNet-56's accuracy.

    python experiments/bn_calibration.py [--test test.npz] [--threads 1]

The pretrained CIFAR ResNets' running statistics are those of their training batches: crops of the
training images padded with black (torchvision's ``RandomCrop(32, padding=4)``) and flipped. Re-estimating
them (``carfast.finetune.recalibrate_bn``) on the 2,000 selection images (test images 0-1,999) as they
are, or cropped with reflection padding, moves the statistics and costs accuracy on the held-out images
2,000-6,999; cropped with black padding as in training, they keep it. Prints top-1 on the held-out images
for each way; ``retrain_curve.py``'s recipe follows from it (``pad_fill`` black, ``calibrate_passes`` 4).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import carfast
from carfast.atomic import write_json_atomic
from carfast.finetune import black_fill, random_crop_flip, recalibrate_bn
from carfast.pruning.evaluate import evaluate

REPO = Path(__file__).resolve().parent.parent
SHARED_TEST = REPO.parent / "shared" / "data" / "cifar10" / "test.npz"
OUT = REPO / "experiments" / "results" / "bn_calibration.json"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--test", default=str(SHARED_TEST), help="the lossless CIFAR-10 test .npz")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    x, y = carfast.data.cifar10_test(path=args.test)
    select, held = (x[:2000], y[:2000]), (x[2000:7000], y[2000:7000])
    model = carfast.models.cifar_resnet(56).eval()
    black = black_fill(carfast.models.cifar.CIFAR_RESNET_NORMALIZATION)

    def crops(fill):
        gen = torch.Generator().manual_seed(0)
        return lambda t: random_crop_flip(t, 4, gen, fill)

    ways = {
        "pretrained statistics (not re-estimated)": model,
        "selection images as they are": recalibrate_bn(model, select),
        "selection images, 4 passes of reflect-padded crops": recalibrate_bn(model, select, transform=crops(None),
                                                                             passes=4),
        "selection images, 4 passes of black-padded crops": recalibrate_bn(model, select, transform=crops(black),
                                                                           passes=4),
        "the held-out images themselves, as they are": recalibrate_bn(model, held),
    }
    rows = {k: evaluate(m, held).accuracy for k, m in ways.items()}
    for k, acc in rows.items():
        print(f"{100 * acc:6.2f} %  {k}")
    write_json_atomic(OUT, {"held_out_images": "2000:7000", "top1": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
