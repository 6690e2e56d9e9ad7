"""Whole-network greedy pruning of ResNet-56: every block's first conv to half, CAR against the baselines.

    python experiments/whole_network.py --run car-loss      [--order reverse] [--threads 1] [--data test.npz]
    python experiments/whole_network.py --run car-accuracy
    python experiments/whole_network.py --run car-loss-race   (the raced search, carfast.Race defaults)
    python experiments/whole_network.py --run car-loss-race --n-select 1000 --step 4 --out-dir DIR
    python experiments/whole_network.py --run l1 | taylor | random
    python experiments/whole_network.py --table             (the results so far, as a Markdown table)
    python experiments/whole_network.py --figure            (experiments/figures/whole_resnet56.png)
    python experiments/whole_network.py --run l1 --finetune-seed 1   (a finished run fine-tuned again, seed 1)

One ``--run`` prunes the 27 block conv1s of the bundled pretrained ResNet-56 to half their filters
(``carfast.prune``: sequential, step 1, re-scored after every removal) on ``--n-select`` CIFAR-10 test
images (the first ones), and measures the pruned network on the ``--n-held`` images after them (held
out), before and after one fixed short fine-tune (``FINETUNE``, on the selection images: lossless, the
test distribution; the JPEG training copies shift it, experiments/RESULTS.md). ``car-loss`` is greedy CAR
with carfast's default selection rule, ``car-accuracy`` with the paper's; ``l1``, ``taylor``, ``random``
are the baseline criteria, re-computed after every removal in the same loop.

``--step`` removes that many filters per scoring (the ``step`` of ``carfast.prune``; the race then keeps
that many best candidates), ``--block`` sets the race's images per block (``carfast.Race(block=...)``);
both are recorded in the run's settings when not the defaults, so such runs belong in their own
``--out-dir``.

``--order reverse`` (the default) prunes the deepest layer first. Either order is "sequential"; the
reverse one is about twice as cheap for CAR, because every layer's suffix (the network after it, run
once per candidate) already has its later blocks thinned. ``--order forward`` prunes layer1.0 first.

A run writes a checkpoint after every removal (``experiments/results/whole_<run>_ckpt.json``) and is
resumed from it when started again, so a run may span several sittings; the seconds spent are summed
in ``whole_<run>_time.json``, and the removals' own times in the checkpoint's history (the row's
``seconds``). The finished row goes to ``whole_<run>.json``. The time the naive greedy
loop would take (one full network pass over the selection images per candidate per step) is estimated
from the measured pass time of the unpruned and of the pruned network.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

import carfast
from carfast.atomic import write_json_atomic
from carfast.finetune import finetune
from carfast.pruning.evaluate import evaluate

REPO = Path(__file__).resolve().parent.parent
SHARED_TEST = REPO.parent / "shared" / "data" / "cifar10" / "test.npz"
RESULTS = REPO / "experiments" / "results"
FIGURE = REPO / "experiments" / "figures" / "whole_resnet56.png"
RUNS = {"car-loss": ("car", "loss"), "car-accuracy": ("car", "accuracy"), "l1": ("l1", None),
        "taylor": ("taylor", None), "random": ("random", None), "car-loss-race": ("car", "loss")}
SEARCH = {"car-loss-race": "race"}     # runs with the raced search at its default settings (the others: exact)
#: the one fixed fine-tune every pruned network gets (and the unpruned one, for reference). BatchNorm
#: statistics are re-estimated: the data is the test distribution, and half of every block's filters
#: gone moves them. Chosen on an L1-pruned copy, judged on test images 7,000-7,999 (neither selection nor
#: held out): 10 epochs at lr 0.01 / 0.005 with "update" 88.5 / 89.5 %; lr 0.002 with "freeze" 28.8 %
#: (frozen statistics let the deep network diverge: lr 0.01 with "freeze" ends in NaN).
FINETUNE = {"epochs": 10, "lr": 0.005, "batch_size": 128, "schedule": "cosine", "augment": True,
            "bn_stats": "update", "seed": 0}


def block_conv1s(model, order: str = "forward") -> list[str]:
    """The block conv1s of a CIFAR ResNet (``layerS.B.conv1``), in model order or, ``order="reverse"``, deepest
    first."""
    names = [n for n, _ in model.named_modules() if n.startswith("layer") and n.endswith(".conv1")]
    return names[::-1] if order == "reverse" else names


def pass_seconds(model, data, repeat: int = 3) -> float:
    """Median seconds of one evaluation pass of ``model`` over ``data``."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        evaluate(model, data)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(model, select, held) -> dict:
    tuned = finetune(model, select, FINETUNE, progress=False)
    return {"finetune": FINETUNE, "selection_accuracy": evaluate(model, select).accuracy,
            "held_out_accuracy": evaluate(model, held).accuracy,
            "finetuned_selection_accuracy": evaluate(tuned, select).accuracy,
            "finetuned_held_out_accuracy": evaluate(tuned, held).accuracy}


def pruned_model(args):
    """The network ``--run`` left: the pretrained ResNet-56 for "unpruned", else the saved pruned model."""
    if args.run == "unpruned":
        return carfast.models.cifar_resnet(56)
    return carfast.surgery.load_pruned_model(args.out_dir / f"whole_{args.run}_model.pt")[0]


def reseeded(args, select, held, settings: dict) -> dict:
    """A finished run's pruned network fine-tuned again with seed ``args.finetune_seed`` (the fine-tune's
    own noise: batch order and augmentation); the held-out images' correctness is kept ("1"/"0" per
    image) so that runs can be compared image by image. Written to ``whole_<run>_seed<S>.json``."""
    config = dict(FINETUNE, seed=args.finetune_seed)
    tuned = finetune(pruned_model(args), select, config, progress=False)
    with torch.no_grad():
        right = torch.cat([tuned(x).argmax(1) == y for x, y in zip(held[0].split(500), held[1].split(500))])
    rec = {"settings": settings, "finetune": config, "held_out_accuracy": right.double().mean().item(),
           "held_out_correct": "".join("1" if r else "0" for r in right.tolist())}
    write_json_atomic(args.out_dir / f"whole_{args.run}_seed{args.finetune_seed}.json", rec)
    return rec


class Clock:
    """Progress of a run (removals done, sittings, wall seconds summed over the sittings), saved after
    every removal. The row's ``seconds`` is the sum of the removals' times in the run's history."""

    def __init__(self, path: Path, settings: dict):
        saved = json.loads(path.read_text()) if path.is_file() else {}
        self.path, self.settings = path, settings
        self.before = saved.get("seconds", 0.0) if saved.get("settings") == settings else 0.0
        self.sittings = saved.get("sittings", 0) + 1 if saved.get("settings") == settings else 1
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.start

    def __call__(self, done, total) -> None:
        write_json_atomic(self.path, {"settings": self.settings, "seconds": self.seconds, "sittings": self.sittings,
                                      "done": done, "total": total})


def prune(args, select, settings: dict) -> dict:
    """Prune (resuming from the checkpoint if there is one); save the pruned model; return the run's row."""
    criterion, rule = RUNS[args.run]
    model = carfast.models.cifar_resnet(56)
    layers = block_conv1s(model, args.order)
    clock = Clock(args.out_dir / f"whole_{args.run}_time.json", settings)
    search = {}
    if args.run in SEARCH:
        search = {"search": carfast.Race(block=args.block) if args.block else SEARCH[args.run]}
    res = carfast.prune(model, layers, select, keep=0.5, criterion=criterion, rule=rule, progress=clock,
                        step=args.step, checkpoint=str(args.out_dir / f"whole_{args.run}_ckpt.json"), **search)
    seconds = sum(r["seconds"] for r in res.history)    # the removals' time, summed over every sitting
    res.save(args.out_dir / f"whole_{args.run}_model.pt")
    row = {"run": args.run, "criterion": criterion, "rule": rule, "seconds": seconds, "sittings": clock.sittings,
           "removals": len(res.history), "threads": args.threads}
    if criterion == "car":
        candidates = sum(r["remaining"] + 1 for r in res.history)      # candidates scored before each removal
        t_full, t_pruned = pass_seconds(model, select), pass_seconds(res.model, select)
        row.update(candidate_passes=candidates, naive_seconds_upper=candidates * t_full,
                   naive_seconds_lower=candidates * t_pruned)
        row["evaluations"], row["exhaustive"] = res.work()
    return row


def finished(out_dir: Path, settings: dict) -> dict[str, dict]:
    """{run: its row} for the runs measured after the fine-tune, with these settings."""
    rows = {}
    for run in (*RUNS, "unpruned"):
        p = out_dir / f"whole_{run}.json"
        rec = json.loads(p.read_text()) if p.is_file() else {}
        if rec.get("settings") == settings and "finetune" in rec["row"]:
            rows[run] = rec["row"]
    return rows


def table(out_dir: Path, settings: dict) -> str:
    lines = ["| run | selection | held out | held out after fine-tune | time |", "| --- | ---: | ---: | ---: | ---: |"]
    for x in sorted(finished(out_dir, settings).values(), key=lambda x: x["run"]):
        lines.append(f"| {x['run']} | {100 * x['selection_accuracy']:.2f} % | {100 * x['held_out_accuracy']:.2f} % | "
                     f"{100 * x['finetuned_held_out_accuracy']:.2f} % | {x['seconds']:.0f} s |")
    return "\n".join(lines)


def seed_table(out_dir: Path, settings: dict) -> str:
    """The fine-tune repeated with several seeds: each run's held-out accuracy per seed and its mean, and
    the paired difference from L1 (same seed, image by image) with its standard error."""
    seeds: dict[str, dict[int, list[bool]]] = {}
    for p in sorted(out_dir.glob("whole_*_seed*.json")):
        rec = json.loads(p.read_text())
        if rec.get("settings") == settings:
            run, seed = p.stem[len("whole_"):].rsplit("_seed", 1)
            seeds.setdefault(run, {})[int(seed)] = [c == "1" for c in rec["held_out_correct"]]
    if not seeds:
        return ""
    all_seeds = sorted({s for r in seeds.values() for s in r})
    lines = ["| run | " + " | ".join(f"seed {s}" for s in all_seeds) + " | mean | minus L1 (paired, same seeds) |",
             "| --- |" + " ---: |" * (len(all_seeds) + 2)]
    for run in [r for r in (*RUNS, "unpruned") if r in seeds]:
        acc = {s: 100 * sum(c) / len(c) for s, c in seeds[run].items()}
        cells = [f"{acc[s]:.2f}" if s in acc else "" for s in all_seeds]
        common = [s for s in seeds[run] if s in seeds.get("l1", {})]
        diff = ""
        if run != "l1" and common:
            d = torch.tensor([[float(a) - float(b) for a, b in zip(seeds[run][s], seeds["l1"][s])] for s in common])
            per_image = d.mean(0)                       # each image's difference, averaged over the seeds
            se = per_image.std() / len(per_image) ** 0.5
            diff = f"{100 * per_image.mean():+.2f} ± {100 * se:.2f} ({len(common)} seeds)"
        lines.append(f"| {run} | " + " | ".join(cells) + f" | {statistics.mean(acc.values()):.2f} | {diff} |")
    return "\n".join(lines)


LABELS = {"car-loss-race": "CAR, loss rule, raced search",
          "car-loss": "CAR, loss rule (default)", "car-accuracy": "CAR, paper's rule", "l1": "L1 norm",
          "taylor": "Taylor", "random": "random (seed 0)", "unpruned": "unpruned"}
COLOURS = {"car-loss-race": "tab:orange",
           "car-loss": "tab:red", "car-accuracy": "darkred", "l1": "tab:blue", "taylor": "tab:green",
           "random": "0.5", "unpruned": "k"}


def figure(out_dir: Path, settings: dict, path: Path) -> None:
    """Left: selection accuracy after every removal, from each run's checkpoint (unfinished runs stop where
    they are). Right: held-out accuracy of every finished run before and after the fixed fine-tune."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), dpi=130, gridspec_kw={"width_ratios": [1.5, 1]})
    for run in RUNS:
        ckpt = out_dir / f"whole_{run}_ckpt.json"
        if not ckpt.is_file():
            continue
        history = json.loads(ckpt.read_text())["history"]
        acc = [100 * r["accuracy"] for r in history]
        done = "" if len(history) == 504 else f" ({len(history)} of 504 so far)"
        left.plot(range(1, len(acc) + 1), acc, color=COLOURS[run], lw=1.4, label=LABELS[run] + done)
    for boundary, name in ((288, "stage 3 done"), (432, "stage 2 done")):
        left.axvline(boundary, color="0.7", ls=":", lw=1)
        left.text(boundary, 3, name, rotation=90, ha="right", va="bottom", fontsize=7, color="0.4")
    left.set_xlim(0, 504)
    left.set_ylim(0, 100)
    left.set_xlabel("filters removed (deepest block conv1 first; 504 = every block conv1 at half)")
    left.set_ylabel(f"top-1 %, the {settings['n_select']:,} selection images")
    left.set_title("ResNet-56, sequential greedy, step 1: accuracy on the images that choose", fontsize=10)
    left.grid(alpha=0.3)
    left.legend(fontsize=8, loc="lower left")

    rows = finished(out_dir, settings)
    names = [r for r in ("unpruned", *RUNS) if r in rows]
    before = [100 * rows[r]["held_out_accuracy"] for r in names]
    after = [100 * rows[r]["finetuned_held_out_accuracy"] for r in names]
    pos = range(len(names))
    right.bar([p - 0.2 for p in pos], before, 0.4, color="0.75", label="before fine-tuning")
    right.bar([p + 0.2 for p in pos], after, 0.4, color="0.3", label="after the fixed fine-tune")
    for p, b, a in zip(pos, before, after):
        right.text(p - 0.2, b + 1, f"{b:.1f}", ha="center", fontsize=7)
        right.text(p + 0.2, a + 1, f"{a:.1f}", ha="center", fontsize=7)
    right.set_xticks(list(pos), [LABELS[r].replace(", ", "\n").replace(" (", "\n(") for r in names], fontsize=7.5)
    right.set_ylim(0, 115)
    right.set_ylabel(f"top-1 %, {settings['n_held']:,} held-out test images")
    right.set_title("held out, before and after one fixed fine-tune", fontsize=10)
    right.grid(axis="y", alpha=0.3)
    right.legend(fontsize=8, loc="upper center", ncol=2)
    save_figure(fig, path)


def save_figure(fig, path: Path) -> None:
    """Write ``fig`` to ``path`` (a PNG) atomically and close it."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", choices=sorted(RUNS) + ["unpruned"], help="what to prune with")
    ap.add_argument("--table", action="store_true", help="print the finished runs as a Markdown table")
    ap.add_argument("--figure", type=Path, nargs="?", const=FIGURE,
                    help=f"draw the runs so far (default path: {FIGURE.relative_to(REPO)})")
    ap.add_argument("--order", choices=("reverse", "forward"), default="reverse",
                    help="reverse: the deepest block conv1 first (default; cheaper); forward: layer1.0 first")
    ap.add_argument("--n-select", type=int, default=2000, help="selection images: the first ones of the test set")
    ap.add_argument("--n-held", type=int, default=5000, help="held-out images: the ones after the selection images")
    ap.add_argument("--data", default=str(SHARED_TEST) if SHARED_TEST.is_file() else None,
                    help="CIFAR-10 test .npz (default: ../shared/data/cifar10/test.npz)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--finetune-seed", type=int, default=None,
                    help="fine-tune a finished --run again with this seed (whole_<run>_seed<S>.json)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS, help="where the results and checkpoints go")
    ap.add_argument("--step", type=int, default=1, help="filters removed per scoring (carfast.prune's step)")
    ap.add_argument("--block", type=int, default=None, help="the race's images per block (default: carfast.Race's)")
    ap.add_argument("--no-finetune", action="store_true",
                    help="measure the pruned network as it is (selection and held-out top-1), without the fine-tune")
    args = ap.parse_args(argv)
    if args.data is None:
        ap.error("the full CIFAR-10 test set is needed (7,000 images): pass --data test.npz")
    settings = {"order": args.order, "n_select": args.n_select, "n_held": args.n_held,
                "data": os.path.basename(args.data)}
    if args.step != 1:
        settings["step"] = args.step
    if args.block is not None:
        if args.run not in SEARCH:
            ap.error("--block sets the raced search's blocks: use it with --run car-loss-race")
        settings["block"] = args.block
    if args.table or args.figure:
        if args.table:
            print(table(args.out_dir, settings))
            print(seed_table(args.out_dir, settings))
        if args.figure:
            figure(args.out_dir, settings, args.figure)
            print(f"figure: {args.figure}")
        return 0
    if args.run is None:
        ap.error("pass --run, --table or --figure")
    torch.set_num_threads(args.threads)
    x, y = carfast.data.cifar10_test(path=args.data)
    n, m = args.n_select, args.n_held
    if n + m > len(y):
        ap.error(f"--n-select {n} + --n-held {m} exceed the {len(y)} images of {args.data}")
    select, held = (x[:n], y[:n]), (x[n:n + m], y[n:n + m])
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"whole_{args.run}.json"
    saved = json.loads(out.read_text()) if out.is_file() else {}
    if args.finetune_seed is not None:
        if saved.get("settings") != settings:
            ap.error(f"--finetune-seed needs the finished run: run --run {args.run} first")
        rec = reseeded(args, select, held, settings)
        print(f"{args.run}, fine-tune seed {args.finetune_seed}: {100 * rec['held_out_accuracy']:.2f} % held out")
        return 0
    row = saved["row"] if saved.get("settings") == settings else None
    if row is None:
        row = {"run": "unpruned", "seconds": 0.0} if args.run == "unpruned" else prune(args, select, settings)
        write_json_atomic(out, {"settings": settings, "row": row})
    if args.no_finetune and "held_out_accuracy" not in row:
        model = pruned_model(args)
        row.update(selection_accuracy=evaluate(model, select).accuracy,
                   held_out_accuracy=evaluate(model, held).accuracy)
        write_json_atomic(out, {"settings": settings, "row": row})
    elif not args.no_finetune and row.get("finetune") != FINETUNE:
        # measured apart from the pruning, so a failed measurement costs no pruning
        row.update(measure(pruned_model(args), select, held))
        write_json_atomic(out, {"settings": settings, "row": row})
    print(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
