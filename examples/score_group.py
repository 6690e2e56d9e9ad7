"""Score the coupled channels of a residual stream, then cut the least important ones from the whole group.

    python examples/score_group.py [--layer conv1] [--images 500] [--remove 2]

``--layer`` names any producer of a group of the bundled ResNet-20 (``conv1`` and every
``layer1.*.conv2`` share the stage-1 stream; ``layer2.*.conv2`` stage 2, ``layer3.*.conv2`` stage 3).
"""
from __future__ import annotations

import argparse

import carfast


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layer", default="conv1")
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--remove", type=int, default=2, help="channels of the group to cut")
    args = p.parse_args()
    model = carfast.models.cifar_resnet(20)
    x, y = carfast.data.cifar10_test(args.images)
    scores = carfast.score_group(model, args.layer, (x, y), progress=False)
    print(scores.table(top=5))
    for m in scores.members:
        print(f"  {m['role']:>12}  {m['layer']:<18} channels {m['channels'][:4]}...")
    cut = scores.ranking()[:args.remove].tolist()
    pruned = carfast.remove_groups(model, {args.layer: cut})
    before, after = carfast.evaluate(model, (x, y)), carfast.evaluate(pruned, (x, y))
    params = sum(t.numel() for t in model.parameters()), sum(t.numel() for t in pruned.parameters())
    print(f"removed channels {cut} from {len(scores.members)} members: params {params[0]} -> {params[1]}, "
          f"accuracy {100 * before.accuracy:.2f} % -> {100 * after.accuracy:.2f} %")


if __name__ == "__main__":
    main()
