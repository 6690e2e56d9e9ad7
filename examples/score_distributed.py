"""CAR scores of one layer on several processes with torch.distributed: each scores its shard of the
images, the counts are all-reduced, and every process holds the scores of all the images. With
``--keep K`` the processes then prune the layer greedily to K filters together (``carfast.pruning.prune``: the
same removals on every process).

    torchrun --nproc-per-node=2 examples/score_distributed.py --images 1000              # one machine
    torchrun --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d \\
             --rdzv-endpoint=HOST:29500 examples/score_distributed.py                # several machines

On GPUs each process uses the GPU of its LOCAL_RANK and the nccl backend; on CPUs gloo.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import carfast


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layer", default="layer2.4.conv1")
    p.add_argument("--images", type=int, default=None, help="images of the bundled CIFAR-10 slice (default all)")
    p.add_argument("--data", default=None, help="a CIFAR-10 test.npz (default: the bundled 2,000 images)")
    p.add_argument("--keep", type=int, default=None, help="then prune the layer to this many filters")
    args = p.parse_args()
    gpu = torch.cuda.is_available()
    dist.init_process_group("nccl" if gpu else "gloo")          # torchrun sets RANK, WORLD_SIZE, MASTER_*
    rank, world = dist.get_rank(), dist.get_world_size()
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if gpu else "cpu"
    if gpu:
        torch.cuda.set_device(device)
    model = carfast.models.cifar_resnet(56)
    x, y = carfast.data.cifar10_test(args.images, path=args.data)
    shard = (x[rank::world], y[rank::world])                     # each process its own images
    scores = carfast.score_layer(model, args.layer, shard, device=device, progress=False)
    if rank == 0:
        print(f"{world} processes, {scores.num_images} images")
        print(scores.table(top=10))
    if args.keep is not None:
        result = carfast.prune(model, args.layer, shard, keep=args.keep, device=device, progress=False)
        if rank == 0:
            last = result.history[-1]
            print(f"removed filters {result.removed[args.layer]}: accuracy {100 * last['accuracy']:.2f} % on all "
                  f"{scores.num_images} images (every process made the same removals)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
