"""When CAR pays: the whole-network-pruned ResNet-56s retrained with growing budgets (issue 23).

    python experiments/retrain_curve.py --work [--hours H] [--threads 1]   (run the next jobs, resumable)
    python experiments/retrain_curve.py --status                          (what is done, what is left)
    python experiments/retrain_curve.py --table                           (Markdown tables of the results)
    python experiments/retrain_curve.py --figure                          (experiments/figures/retrain_curve.png)

The pruned networks are those of ``whole_network.py`` (every block conv1 of the pretrained ResNet-56 at
half, chosen on test images 0-1,999): each is rebuilt from its run's checkpoint history (the removed
filters' original indices; the rebuild is checked against the history's last accuracy). Every network,
and the unpruned one as each budget's ceiling, is measured on the held-out test images 2,000-6,999 after
each retraining budget:

- ``none``: as pruned;
- ``select2000``: the fine-tune on record (``whole_network.FINETUNE``: 10 epochs on the 2,000 lossless
  selection images), its results read from ``whole_<run>_seed<S>.json`` (run here where missing);
- ``train5000``: 10 % of the CIFAR-10 training set (5,000 JPEG images, class-balanced), 10 epochs;
- ``train50000``: the whole training set, ``FULL_EPOCHS`` epochs;
- ``train5000-ce`` (an ablation, seed 0, three networks): ``train5000`` without distillation and without
  re-estimating the BatchNorm statistics: what the JPEG training images alone do.

The two training-set budgets use one recipe (``RECIPE``): SGD as the field retrains (Nesterov, lr 0.01
cosine, batch 128, weight decay 5e-4, crop + flip), distillation from the unpruned network (distill 0.9,
T = 4), BatchNorm statistics updated while training and then re-estimated on the 2,000 lossless selection
images (``calibrate=``): the training images are JPEG copies, and a network fitted to them alone loses
about 2 points on the lossless test images (experiments/RESULTS.md says what was measured). Each job is
one (network, budget, seed) with seeds 0 and 1; it checkpoints as it trains
(``results/retrain/<job>_ckpt.pt``) and resumes when run again, and writes
``results/retrain/<job>.json`` with each held-out image's correctness, so differences from L1 are paired
image by image.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from whole_network import FINETUNE, save_figure

import carfast
from carfast.atomic import write_json_atomic
from carfast.finetune import finetune
from carfast.pruning.evaluate import evaluate

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data" / "cifar10"
RESULTS = REPO / "experiments" / "results"
OUT = RESULTS / "retrain"
FIGURE = REPO / "experiments" / "figures" / "retrain_curve.png"
RUNS = ("car-loss", "car-accuracy", "taylor", "l1", "random", "car-loss-race", "unpruned")
BUDGETS = ("none", "select2000", "train5000", "train50000")
SEEDS = (0, 1)
N_SELECT, N_HELD = 2000, 5000
FULL_EPOCHS = 5
#: the retraining recipe of the training-set budgets (``carfast.finetune``)
RECIPE = {"lr": 0.01, "batch_size": 128, "schedule": "cosine", "augment": True, "bn_stats": "update",
          "distill": 0.9, "temperature": 4.0, "channels_last": True}
#: the fine-tune on record
SELECT2000 = {k: v for k, v in FINETUNE.items() if k != "seed"}
TRAIN = {"train5000": (5000, 10), "train50000": (50000, FULL_EPOCHS), "train5000-ce": (5000, 10)}  # images, epochs
#: the ablation ``train5000-ce``: the recipe without distillation and without re-estimating BatchNorm statistics
#: on the lossless images, i.e. the labels of the JPEG training images alone
CE_ONLY = {"distill": 0.0}


def jobs() -> list[tuple[str, str, int]]:
    """Every (run, budget, seed), cheapest budget first; within one, L1, CAR and the ceiling first; the
    ablation of the recipe (``train5000-ce``) before the full training set."""
    order = ("l1", "car-loss", "unpruned", "taylor", "car-accuracy", "random", "car-loss-race")
    out = [(r, "none", 0) for r in order]
    for budget in ("select2000", "train5000"):
        out += [(r, budget, s) for s in SEEDS for r in order]
    out += [(r, "train5000-ce", 0) for r in ("unpruned", "l1", "car-loss")]
    return out + [(r, "train50000", s) for s in SEEDS for r in order]


def name(run: str, budget: str, seed: int) -> str:
    return f"{run}_{budget}" + ("" if budget == "none" else f"_s{seed}")


def pruned(run: str, select) -> torch.nn.Module:
    """The network ``run`` left, rebuilt from its checkpoint's removals and checked against its history."""
    model = carfast.models.cifar_resnet(56)
    if run == "unpruned":
        return model
    history = json.loads((RESULTS / f"whole_{run}_ckpt.json").read_text())["history"]
    removed: dict[str, list[int]] = {}
    for row in history:
        removed.setdefault(row["layer"], []).append(row["filter"])
    net = carfast.remove_filters(model, removed).eval()
    got, want = evaluate(net, select).correct, history[-1]["correct"]
    if abs(got - want) > 2:     # (a near tie may flip with another thread count; a wrong rebuild moves hundreds)
        raise RuntimeError(f"{run}: the rebuilt network gets {got} selection images right, the run's history {want}")
    return net


def correct_string(model, held) -> str:
    with torch.no_grad():
        right = torch.cat([model(x).argmax(1) == y for x, y in zip(held[0].split(500), held[1].split(500))])
    return "".join("1" if r else "0" for r in right.tolist())


def recorded_select2000(run: str, seed: int) -> dict | None:
    """``whole_network.py``'s fine-tune of ``run`` with ``seed``, when it is on record."""
    p = RESULTS / f"whole_{run}_seed{seed}.json"
    if not p.is_file():
        return None
    rec = json.loads(p.read_text())
    return {"held_out_correct": rec["held_out_correct"], "config": rec["finetune"], "seconds": None,
            "source": p.name}


def run_job(run: str, budget: str, seed: int, data: dict, threads: int) -> dict:
    select, held = data["select"], data["held"]
    model = pruned(run, select)
    t0 = time.perf_counter()
    if budget == "none":
        rec = {"config": None}
        tuned = model
    elif budget == "select2000":
        rec = recorded_select2000(run, seed)
        if rec is not None:
            return rec
        config = dict(SELECT2000, seed=seed)
        rec = {"config": config}
        tuned = finetune(model, select, config, checkpoint=OUT / f"{name(run, budget, seed)}_ckpt.pt", progress=True)
    else:
        n, epochs = TRAIN[budget]
        ce = budget.endswith("-ce")
        config = dict(RECIPE, epochs=epochs, seed=seed, **(CE_ONLY if ce else {}))
        rec = {"config": config, "train_images": n, "calibrated": not ce}
        tuned = finetune(model, data["train"](n), config, teacher=None if ce else data["teacher"],
                         calibrate=None if ce else select, checkpoint=OUT / f"{name(run, budget, seed)}_ckpt.pt",
                         progress=True)
    rec.update(seconds=time.perf_counter() - t0, threads=threads, held_out_correct=correct_string(tuned, held),
               selection_accuracy=evaluate(tuned, select).accuracy)
    return rec


def load(run: str, budget: str, seed: int) -> dict | None:
    p = OUT / f"{name(run, budget, seed)}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def work(args) -> None:
    torch.set_num_threads(args.threads)
    x, y = carfast.data.cifar10_test(path=args.test)
    teacher = carfast.models.cifar_resnet(56).eval()
    cache = {}

    def train(n):
        if n not in cache:
            cache.clear()
            cache[n] = carfast.data.cifar10_train(args.train, n if n < 50000 else None, seed=0 if n < 50000 else None)
        return cache[n]
    held = (x[N_SELECT:N_SELECT + N_HELD], y[N_SELECT:N_SELECT + N_HELD])
    data = {"select": (x[:N_SELECT], y[:N_SELECT]), "held": held, "teacher": teacher, "train": train}
    OUT.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + 3600 * args.hours
    for run, budget, seed in jobs():
        if time.time() > deadline:
            break
        if load(run, budget, seed) is not None or (args.only and budget not in args.only):
            continue
        print(f"== {name(run, budget, seed)}", flush=True)
        rec = run_job(run, budget, seed, data, args.threads)
        acc = rec["held_out_correct"].count("1") / len(rec["held_out_correct"])
        write_json_atomic(OUT / f"{name(run, budget, seed)}.json",
                          {"run": run, "budget": budget, "seed": seed, "held_out_accuracy": acc, **rec})
        print(f"   {100 * acc:.2f} % held out", flush=True)


def results() -> dict:
    """{(run, budget): {seed: [bool] per held-out image}} of the finished jobs ("none" under every seed)."""
    out: dict = {}
    for run, budget, seed in jobs():
        rec = load(run, budget, seed)
        if rec is None:
            continue
        bits = [c == "1" for c in rec["held_out_correct"]]
        for s in (SEEDS if budget == "none" else (seed,)):
            out.setdefault((run, budget), {})[s] = bits
    return out


def paired(a: dict, b: dict) -> tuple[float, float, int] | None:
    """Mean and standard error over images of (a - b), each image's difference averaged over the shared seeds."""
    common = sorted(set(a) & set(b))
    if not common:
        return None
    d = torch.tensor([[float(p) - float(q) for p, q in zip(a[s], b[s])] for s in common]).mean(0)
    return float(d.mean()), float(d.std() / len(d) ** 0.5), len(common)


def table() -> str:
    res = results()
    lines = ["| network | " + " | ".join(BUDGETS) + " |", "| --- |" + " ---: |" * len(BUDGETS)]
    for run in RUNS:
        cells = []
        for budget in BUDGETS:
            seeds = res.get((run, budget), {})
            if not seeds:
                cells.append("")
                continue
            acc = [100 * sum(v) / len(v) for v in seeds.values()]
            cell = f"{statistics.mean(acc):.2f}"
            if budget != "none":
                cell += f" ({len(acc)} seeds)"
            d = paired(seeds, res.get(("l1", budget), {})) if run != "l1" else None
            if d is not None:
                cell += f"<br>{100 * d[0]:+.2f} ± {100 * d[1]:.2f}"
            cells.append(cell)
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    times = ["", "| budget | median seconds per job | jobs | threads |", "| --- | ---: | ---: | ---: |"]
    for budget in BUDGETS[1:]:
        secs = [(r["seconds"], r.get("threads")) for r in (load(*j) for j in jobs() if j[1] == budget)
                if r is not None and r.get("seconds")]
        if secs:
            times.append(f"| {budget} | {statistics.median(s for s, _ in secs):,.0f} | {len(secs)} | "
                         f"{sorted({t for _, t in secs})} |")
    return "\n".join(lines + times)


def figure(path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = results()
    colours = {"car-loss": "tab:red", "car-accuracy": "darkred", "taylor": "tab:green", "l1": "tab:blue",
               "random": "0.5", "car-loss-race": "tab:orange", "unpruned": "k"}
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=130)
    for run in RUNS:
        xs, ys, es = [], [], []
        for i, budget in enumerate(BUDGETS):
            seeds = res.get((run, budget))
            if seeds:
                acc = [100 * sum(v) / len(v) for v in seeds.values()]
                xs.append(i)
                ys.append(statistics.mean(acc))
                es.append(statistics.stdev(acc) if len(acc) > 1 else 0.0)
        if xs:
            ax.errorbar(xs, ys, yerr=es, color=colours[run], lw=1.6, marker="o", ms=4, capsize=3,
                        ls="--" if run == "unpruned" else "-", label=run + (" (ceiling)" if run == "unpruned" else ""))
    ax.set_xticks(range(len(BUDGETS)), ["none", "2,000 test images\n10 epochs", "5,000 train\n10 epochs",
                                        f"50,000 train\n{FULL_EPOCHS} epochs"])
    ax.set_ylabel(f"top-1 %, {N_HELD:,} held-out test images")
    ax.set_title("ResNet-56, every block conv1 at half: accuracy after retraining", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", action="store_true", help="run the next unfinished jobs")
    ap.add_argument("--hours", type=float, default=100.0, help="start no job after this many hours")
    ap.add_argument("--only", nargs="*", choices=BUDGETS, help="run only these budgets' jobs")
    ap.add_argument("--status", action="store_true", help="list the jobs done and left")
    ap.add_argument("--table", action="store_true", help="print the results as Markdown tables")
    ap.add_argument("--figure", type=Path, nargs="?", const=FIGURE, help="draw the curve")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--test", default=str(SHARED / "test.npz"), help="the lossless CIFAR-10 test .npz")
    ap.add_argument("--train", default=str(SHARED / "train_jpegq75.npz"), help="the JPEG-packed training .npz")
    args = ap.parse_args(argv)
    if args.status:
        for j in jobs():
            rec = load(*j)
            print(f"{name(*j):32s} " + ("-" if rec is None else f"{100 * rec['held_out_accuracy']:.2f} %"))
    if args.table:
        print(table())
    if args.figure:
        figure(args.figure)
        print(f"figure: {args.figure}")
    if args.work:
        work(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
