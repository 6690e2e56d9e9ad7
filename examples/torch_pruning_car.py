"""Torch-Pruning with CAR as its importance: prune the bundled ResNet-20 in a few iterative steps.

    pip install torch-pruning        # or, in the clone: pip install --no-build-isolation '.[torch-pruning]'
    python examples/torch_pruning_car.py [--images 200] [--ratio 0.2] [--steps 2] [--global]

At each step ``CARImportance`` runs greedy CAR inside every group (bound to the pruner, only as far as
the step needs, each group scored with the step's earlier removals made) on the model as pruned so far;
``channel_map_pruners`` lets Torch-Pruning cut the ResNets' parameter-free padding shortcuts, so its
groups are carfast's.
"""
from __future__ import annotations

import argparse

import torch
import torch_pruning as tp

import carfast
from carfast.integrations.torch_pruning import CARImportance, channel_map_pruners


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=200, help="bundled test images CAR scores on")
    p.add_argument("--ratio", type=float, default=0.2, help="pruning_ratio")
    p.add_argument("--steps", type=int, default=2, help="iterative_steps")
    p.add_argument("--global", dest="global_pruning", action="store_true")
    args = p.parse_args()
    model = carfast.models.cifar_resnet(20)
    x, y = carfast.data.cifar10_test()                       # the bundled 2,000 images
    score, held = (x[:args.images], y[:args.images]), (x[args.images:], y[args.images:])
    example = torch.zeros(1, 3, 32, 32)
    macs0, _ = tp.utils.count_ops_and_params(model, example)
    importance = CARImportance(score)
    pruner = tp.pruner.BasePruner(model, example, importance, pruning_ratio=args.ratio,
                                  iterative_steps=args.steps, global_pruning=args.global_pruning,
                                  ignored_layers=[model.linear], customized_pruners=channel_map_pruners(model))
    importance.bind(pruner)                                  # greedy only as far as each step needs
    for step in range(args.steps):
        pruner.step()
        macs, _ = tp.utils.count_ops_and_params(model, example)
        print(f"step {step + 1}: {macs0 / macs:.2f}x fewer MACs, held-out accuracy "
              f"{100 * carfast.evaluate(model, held).accuracy:.2f} %")


if __name__ == "__main__":
    main()
