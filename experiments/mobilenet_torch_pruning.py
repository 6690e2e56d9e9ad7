"""Torch-Pruning on MobileNetV2-style blocks: CAR against magnitude on the expansion groups (issue 20).

    python experiments/mobilenet_torch_pruning.py [--epochs 3] [--ratio 0.5] [--n-select 1000]
        [--methods car,car-single,magnitude-l2,magnitude-l1,random] [--test FILE] [--train FILE] [--threads 1]
        [--out FILE] [--table]

A small MobileNetV2-style CIFAR-10 network with squeeze-and-excitation (``tests/nets/mobilenet.py``: a 3x3
stem of stride 2, five inverted residual blocks of expansion 3, each 1x1 expand -> depthwise 3x3 -> SE gate ->
1x1 project, a 1x1 head) is trained from scratch for ``--epochs`` on the CIFAR-10 training set (JPEG copies,
``carfast.finetune`` with BatchNorm statistics updated), then each block's expansion group (the expand conv,
the depthwise conv and the SE gate's conv that Torch-Pruning prunes together) loses ``--ratio`` of its
channels in one step of Torch-Pruning's ``BasePruner``, every other layer ignored, by each importance:

- ``car``: ``CARImportance`` as shipped (greedy CAR inside each group, bound to the pruner, loss rule);
- ``car-single``: ``CARImportance(greedy=False)`` (each channel's own CAR, one scoring per group);
- ``magnitude-l2`` / ``magnitude-l1``: Torch-Pruning's ``MagnitudeImportance(p=2)`` (its default) / ``p=1``;
- ``random``: Torch-Pruning's ``RandomImportance`` (seeded).

Channels are chosen on the first ``--n-select`` images of the CIFAR-10 test set (CAR scores them there;
magnitude needs no data); every pruned network's top-1 is measured on those and on all the other test images
(held out), before any retraining.

Data: ``--test`` (an .npz with x, y), default ``../shared/data/cifar10/test.npz`` relative to the repository
when it is there, else carfast's bundled 2,000-image slice; ``--train`` default
``../shared/data/cifar10/train_jpegq75.npz`` (needed only to train). Each method's row is saved to the results
JSON (``--out``, default ``experiments/results/mobilenet_torch_pruning.json``) as soon as it is done, the trained
network beside it (``..._model.pt``, not in git); a rerun skips the training and the methods already saved with
the same settings. A smoke run: ``--epochs 1 --max-train 1000 --n-select 100 --out /tmp/smoke.json``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch
from torch import nn

import carfast
from carfast.atomic import atomic_path, write_json_atomic
from carfast.data import cifar10_train
from carfast.finetune import FinetuneConfig, finetune
from carfast.pruning.evaluate import evaluate

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data" / "cifar10"
RESULTS = REPO / "experiments" / "results"
sys.path.insert(0, str(REPO / "tests"))
from nets import prune_step  # noqa: E402  (the tests' Torch-Pruning step)
from nets.mobilenet import MobileNetV2SE  # noqa: E402  (the network of the tests, one definition)

#: (expansion ratio, output channels, stride) of each block: expansion groups of 48, 48, 72, 72 and 96 channels
BLOCKS = ((3, 16, 1), (3, 24, 2), (3, 24, 1), (3, 32, 2), (3, 32, 1))
EXPANSION = ("expand", "dw", "se.fc2")      # the producers of a block's expansion group, to Torch-Pruning
METHODS = ("car", "car-single", "magnitude-l2", "magnitude-l1", "random")


def build_net(seed: int) -> MobileNetV2SE:
    """The network, seeded default initialisation: 3x32x32 inputs, stem 16 channels of stride 2, head 128."""
    torch.manual_seed(seed)
    return MobileNetV2SE(BLOCKS, stem=16, head=128, num_classes=10, stem_stride=2)


def trained_net(args, settings: dict) -> tuple[nn.Module, dict]:
    """(the trained network, its training record): loaded from ``<out>_model.pt`` when saved there with the
    same settings, else trained and saved there."""
    out = Path(args.out)
    path = out.with_name(out.stem + "_model.pt")
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved["settings"] == settings:
            model = build_net(args.seed)
            model.load_state_dict(saved["state_dict"])
            return model.eval(), saved["record"]
    if not args.train or not Path(args.train).is_file():
        sys.exit(f"mobilenet_torch_pruning: no training set at {args.train}; pass --train to a CIFAR-10 "
                 "train_jpegq75.npz (shared/data/cifar10/) to train the network")
    x, y = cifar10_train(args.train)
    cfg = FinetuneConfig(epochs=args.epochs, lr=args.lr, batch_size=128, weight_decay=5e-4, augment=True,
                         schedule="cosine", seed=args.seed, bn_stats="update", max_images=args.max_train)
    wall, cpu = time.perf_counter(), time.process_time()
    model = finetune(build_net(args.seed), (x, y), cfg)
    record = {"train_images": len(y), "config": cfg.to_dict(), "wall_seconds": time.perf_counter() - wall,
              "cpu_seconds": time.process_time() - cpu}
    with atomic_path(path, ".pt") as tmp:
        torch.save({"settings": settings, "state_dict": model.state_dict(), "record": record}, tmp)
    return model, record


def expansion_layers(model: MobileNetV2SE) -> set[str]:
    return {f"{b}.{m}" for b in model.names for m in EXPANSION}


def importance(method: str, select, seed: int):
    import torch_pruning as tp

    from carfast.integrations.torch_pruning import CARImportance
    if method == "car":
        return CARImportance(select)
    if method == "car-single":
        return CARImportance(select, greedy=False)
    if method in ("magnitude-l2", "magnitude-l1"):
        return tp.importance.MagnitudeImportance(p=2 if method == "magnitude-l2" else 1)
    torch.manual_seed(seed)
    return tp.importance.RandomImportance()


def prune_expansions(model: MobileNetV2SE, method: str, ratio: float, select, seed: int):
    """(a copy of ``model`` whose expansion groups lost ``ratio`` of their channels in one Torch-Pruning step
    by ``method``, {group root: removed channels}); every other layer is ignored."""
    import torch_pruning as tp

    from carfast.integrations.torch_pruning import CARImportance
    work = copy.deepcopy(model).eval()
    keep = expansion_layers(work)
    ignored = [m for n, m in work.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n not in keep]
    imp = importance(method, select, seed)
    pruner = tp.pruner.BasePruner(work, select[0][:1], imp, pruning_ratio=ratio, ignored_layers=ignored)
    if isinstance(imp, CARImportance):
        imp.bind(pruner)
    removed, messages = prune_step(pruner, work)
    refused = [m for m in messages if "cannot score" in m]
    if refused or len(removed) != len(work.names):
        raise RuntimeError(f"{method}: {len(removed)} of {len(work.names)} expansion groups pruned; {refused}")
    return work, removed


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_method(method: str, model, args, select, held) -> dict:
    import torch_pruning as tp
    wall, cpu = time.perf_counter(), time.process_time()
    pruned, removed = prune_expansions(model, method, args.ratio, select, args.seed)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    macs, params = tp.utils.count_ops_and_params(pruned, select[0][:1])
    sel, out = evaluate(pruned, select), evaluate(pruned, held)
    return {"method": method, "selection_accuracy": sel.accuracy, "held_out_accuracy": out.accuracy,
            "held_out_loss": out.loss, "gap": sel.accuracy - out.accuracy, "macs": int(macs), "params": int(params),
            "wall_seconds": wall, "cpu_seconds": cpu, "removed": removed,
            "expansion_channels": {b: pruned.get_submodule(f"{b}.expand").out_channels for b in pruned.names}}


def table(saved: dict) -> str:
    u = saved["unpruned"]
    lines = ["| importance | held-out top-1 | selection top-1 | gap | MACs | params | wall s | CPU s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |",
             f"| unpruned | {100 * u['held_out_accuracy']:.2f} % | {100 * u['selection_accuracy']:.2f} % | "
             f"{100 * (u['selection_accuracy'] - u['held_out_accuracy']):.2f} | {u['macs'] / 1e6:.2f} M | "
             f"{u['params'] / 1e3:.1f} k | | |"]
    for r in saved["rows"]:
        lines.append(f"| {r['method']} | {100 * r['held_out_accuracy']:.2f} % | {100 * r['selection_accuracy']:.2f} % "
                     f"| {100 * r['gap']:.2f} | {r['macs'] / 1e6:.2f} M | {r['params'] / 1e3:.1f} k | "
                     f"{r['wall_seconds']:.0f} | {r['cpu_seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3, help="training epochs over the 50,000 training images")
    ap.add_argument("--lr", type=float, default=0.1, help="peak learning rate (cosine to 0)")
    ap.add_argument("--max-train", type=int, default=None, help="training images per epoch (default: all; smoke runs)")
    ap.add_argument("--ratio", type=float, default=0.5, help="share of each expansion group's channels removed")
    ap.add_argument("--n-select", type=int, default=1000, help="first test images, on which channels are chosen")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {list(METHODS)}")
    ap.add_argument("--seed", type=int, default=0, help="initialisation, training order, random importance")
    ap.add_argument("--test", default=str(SHARED / "test.npz") if (SHARED / "test.npz").is_file() else None,
                    help="CIFAR-10 test .npz (default: ../shared/data/cifar10/test.npz, else the bundled slice)")
    ap.add_argument("--train", default=str(SHARED / "train_jpegq75.npz"),
                    help="CIFAR-10 training set as JPEGs (default: ../shared/data/cifar10/train_jpegq75.npz)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "mobilenet_torch_pruning.json"))
    ap.add_argument("--table", action="store_true", help="print the saved results as a Markdown table and stop")
    args = ap.parse_args(argv)
    if args.table:
        print(table(json.loads(Path(args.out).read_text())))
        return 0
    methods = args.methods.split(",")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown method(s) {bad}; choose from {list(METHODS)}")
    if not 0 < args.ratio < 1:
        ap.error(f"--ratio must be in (0, 1), got {args.ratio}")
    torch.set_num_threads(args.threads)
    x, y = carfast.data.cifar10_test(path=args.test)
    if not 0 < args.n_select < len(y):
        ap.error(f"--n-select {args.n_select} does not fit {len(y)} test images with some held out")
    select, held = (x[:args.n_select], y[:args.n_select]), (x[args.n_select:], y[args.n_select:])
    import torch_pruning as tp
    train_settings = {"epochs": args.epochs, "lr": args.lr, "max_train": args.max_train, "seed": args.seed,
                      "blocks": [list(b) for b in BLOCKS], "train": os.path.basename(args.train)}
    settings = {**train_settings, "ratio": args.ratio, "n_select": args.n_select, "held_out": len(held[1]),
                "test": os.path.basename(args.test) if args.test else "bundled slice"}
    saved = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    if saved.get("settings") != settings:
        saved = {"settings": settings, "rows": []}
    model, record = trained_net(args, train_settings)
    macs, params = tp.utils.count_ops_and_params(model, select[0][:1])
    sel, out = evaluate(model, select), evaluate(model, held)
    saved["training"] = record
    saved["unpruned"] = {"selection_accuracy": sel.accuracy, "held_out_accuracy": out.accuracy,
                         "held_out_loss": out.loss, "macs": int(macs), "params": int(params),
                         "expansion_channels": {b: model.get_submodule(f"{b}.expand").out_channels
                                                for b in model.names}}
    saved["machine"] = {"cpu": cpu_model(), "torch": torch.__version__, "torch_pruning": version("torch-pruning"),
                        "threads": args.threads, "python": platform.python_version()}
    write_json_atomic(args.out, saved)
    print(f"unpruned: selection {100 * sel.accuracy:.2f} %  held out {100 * out.accuracy:.2f} %  "
          f"(trained in {record['wall_seconds']:.0f} s wall, {record['cpu_seconds']:.0f} s CPU)", flush=True)
    done = {r["method"] for r in saved["rows"]}
    for method in methods:
        if method in done:
            continue
        row = run_method(method, model, args, select, held)
        saved["rows"].append(row)
        write_json_atomic(args.out, saved)
        print(f"{method:<13} selection {100 * row['selection_accuracy']:.2f} %  held out "
              f"{100 * row['held_out_accuracy']:.2f} %  {row['wall_seconds']:.0f} s wall, {row['cpu_seconds']:.0f} s "
              "CPU", flush=True)
    print(table(saved))
    return 0


if __name__ == "__main__":
    sys.exit(main())
