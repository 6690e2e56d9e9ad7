"""torch.nn.utils.prune masks from a carfast pruning result, and back.

    python examples/masks.py [--images 300]
"""
from __future__ import annotations

import argparse

import torch

import carfast
from carfast.integrations.masks import from_masks, to_masks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=300)
    args = p.parse_args()
    model = carfast.models.cifar_resnet(20)
    x, y = carfast.data.cifar10_test(args.images)
    result = carfast.prune(model, ["layer1.0.conv1", "layer2.0.conv1"], (x, y), keep=0.75, progress=False)
    masked = to_masks(model, result)                      # a masked copy of the original model
    with torch.no_grad():
        gap = (masked(x) - result.model(x)).abs().max().item()
    print(f"removed {result.removed}")
    print(f"masks read back: {from_masks(masked)}")
    print(f"largest output difference, masked vs physically pruned: {gap:.2e}")
    torch.nn.utils.prune.remove(masked.layer1[0].conv1, "weight")  # make one layer's mask permanent


if __name__ == "__main__":
    main()
