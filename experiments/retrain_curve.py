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

Two workers may run at once (``--work`` twice, e.g. ``--seed-first 1`` for the second): each claims its job
with a lock file. The teacher's logits are memoised on disk by the content of the batch (``MemoTeacher``):
the batches a seed draws do not depend on the network trained, so every network after the first of a seed
reads the teacher's outputs instead of recomputing them (about 40 % of a pruned network's training step), and
the result is the same bit for bit.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import time
from pathlib import Path

import torch
from whole_network import FINETUNE, save_figure

import carfast
from carfast.atomic import atomic_path, write_json_atomic
from carfast.finetune import black_fill, finetune
from carfast.pruning.evaluate import evaluate

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data" / "cifar10"
RESULTS = REPO / "experiments" / "results"
OUT = RESULTS / "retrain"
FIGURE = REPO / "experiments" / "figures" / "retrain_curve.png"
RUNS = ("car-loss", "car-accuracy", "taylor", "l1", "random", "car-loss-race", "car-loss-staged", "unpruned")
BUDGETS = ("none", "select2000", "train5000", "train50000")
SEEDS = (0, 1)
N_SELECT, N_HELD = 2000, 5000
FULL_EPOCHS = 5
#: the retraining budgets' names on the figure's axes
BUDGET_LABELS = ("2,000 test images\n10 epochs", "5,000 train\n10 epochs", f"50,000 train\n{FULL_EPOCHS} epochs")
#: the retraining recipe of the training-set budgets (``carfast.finetune``)
RECIPE = {"lr": 0.01, "batch_size": 128, "schedule": "cosine", "augment": True, "bn_stats": "update",
          "distill": 0.9, "temperature": 4.0, "channels_last": True, "calibrate_passes": 4,
          # crops padded with black, as the pretrained ResNets were trained (torchvision's RandomCrop)
          "pad_fill": black_fill(carfast.models.cifar.CIFAR_RESNET_NORMALIZATION)}
#: the fine-tune on record
SELECT2000 = {k: v for k, v in FINETUNE.items() if k != "seed"}
TRAIN = {"train5000": (5000, 10), "train50000": (50000, FULL_EPOCHS), "train5000-ce": (5000, 10)}  # images, epochs
#: the ablation ``train5000-ce``: the recipe without distillation and without re-estimating BatchNorm statistics
#: on the lossless images, i.e. the labels of the JPEG training images alone
CE_ONLY = {"distill": 0.0}


class MemoTeacher(torch.nn.Module):
    """``teacher`` whose outputs are kept in ``folder``, one file per input batch, keyed by the batch's bytes.

    forward(x: (N, 3, 32, 32)) -> (N, 10) logits, read from the folder when that exact batch was seen
    before (by any process), else computed and written atomically. Exact: a batch's logits are what the
    teacher gave for those very bytes. ``counts`` (a class attribute: ``finetune`` works on a deep copy)
    tallies the batches read and computed.
    """
    counts = {"read": 0, "computed": 0}

    def __init__(self, teacher: torch.nn.Module, folder: Path):
        super().__init__()
        self.teacher, self.folder = teacher, Path(folder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = hashlib.blake2b(x.detach().cpu().numpy().tobytes(), digest_size=20).hexdigest()
        path = self.folder / f"{key}.pt"
        if path.is_file():
            MemoTeacher.counts["read"] += 1
            return torch.load(path, weights_only=True)
        MemoTeacher.counts["computed"] += 1
        out = self.teacher(x)
        with atomic_path(path, ".pt") as tmp:
            torch.save(out.detach().clone(), tmp)
        return out


def chosen(run: str) -> bool:
    """Whether ``run``'s pruning has finished (``staged_car.py`` may not have run yet)."""
    return run == "unpruned" or (RESULTS / f"whole_{run}_ckpt.json").is_file()


def claim(job: str) -> bool:
    """Take ``job`` for this process by creating its lock file; False when a live process holds it."""
    lock = OUT / f"{job}.lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                os.kill(int(lock.read_text() or 0), 0)
                return False                     # held by a live worker
            except (ProcessLookupError, ValueError):
                lock.unlink(missing_ok=True)     # left by a worker that stopped
                continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True
    return False


def jobs() -> list[tuple[str, str, int]]:
    """Every (run, budget, seed), cheapest budget first; within one, the ceiling, L1 and CAR first; the
    ablation of the recipe (``train5000-ce``) before the full training set."""
    order = ("unpruned", "l1", "car-loss", "taylor", "car-accuracy", "random", "car-loss-race", "car-loss-staged")
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
    rec = json.loads((RESULTS / f"whole_{run}_ckpt.json").read_text())
    history = rec["history"]
    removed: dict[str, list[int]] = {}
    for row in history:
        removed.setdefault(row["layer"], []).append(row["filter"])
    net = carfast.remove_filters(model, removed).eval()
    # (staged_car.py chose on networks that recovered between stages: it records the rebuilt network's count)
    got, want = evaluate(net, select).correct, rec.get("rebuilt_correct", history[-1]["correct"])
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
    # a job resumed from its checkpoint times only this sitting: the time table leaves it out
    resumed = (OUT / f"{name(run, budget, seed)}_ckpt.pt").is_file()
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
        MemoTeacher.counts.update(read=0, computed=0)
        tuned = finetune(model, data["train"](n), config, teacher=None if ce else data["teacher"],
                         calibrate=None if ce else select, checkpoint=OUT / f"{name(run, budget, seed)}_ckpt.pt",
                         progress=True)
        if not ce:      # the teacher's batches read from the memo make a job faster (its seconds say less)
            rec["teacher_batches"] = dict(MemoTeacher.counts)
    rec.update(seconds=time.perf_counter() - t0, resumed=resumed, threads=threads,
               held_out_correct=correct_string(tuned, held), selection_accuracy=evaluate(tuned, select).accuracy)
    return rec


def load(run: str, budget: str, seed: int) -> dict | None:
    p = OUT / f"{name(run, budget, seed)}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def work(args) -> None:
    torch.set_num_threads(args.threads)
    x, y = carfast.data.cifar10_test(path=args.test)
    teacher = MemoTeacher(carfast.models.cifar_resnet(56).eval(), OUT / "teacher_logits")
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
    todo = jobs()
    if args.seed_first is not None:      # within each budget, this seed's jobs first (a second worker's order)
        budget_rank = {b: i for i, b in enumerate(dict.fromkeys(b for _, b, _ in todo))}
        todo.sort(key=lambda j: (budget_rank[j[1]], j[2] != args.seed_first))
    for run, budget, seed in todo:
        if time.time() > deadline:
            break
        job = name(run, budget, seed)
        if load(run, budget, seed) is not None or (args.only and budget not in args.only) or not chosen(run) \
                or not claim(job):
            continue
        try:
            if load(run, budget, seed) is not None:     # finished by another worker since
                continue
            print(f"== {job}", flush=True)
            rec = run_job(run, budget, seed, data, args.threads)
            acc = rec["held_out_correct"].count("1") / len(rec["held_out_correct"])
            write_json_atomic(OUT / f"{job}.json",
                              {"run": run, "budget": budget, "seed": seed, "held_out_accuracy": acc, **rec})
            print(f"   {100 * acc:.2f} % held out", flush=True)
        finally:
            (OUT / f"{job}.lock").unlink(missing_ok=True)


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
                each = ": " + ", ".join(f"{a:.2f}" for a in acc) if run == "l1" else ""   # L1's per seed
                cell += f" ({len(acc)} seed{'s' if len(acc) > 1 else ''}{each})"
            base = res.get(("l1", budget), {})
            d = paired(seeds, base) if run != "l1" else None
            if d is not None:
                cell += f"<br>{100 * d[0]:+.2f} ± {100 * d[1]:.2f}"
                if budget != "none" and d[2] > 1:   # each seed's own: the spread the SE over images leaves out
                    cell += " (" + ", ".join(f"{100 * paired({s: seeds[s]}, {s: base[s]})[0]:+.2f}"
                                             for s in sorted(set(seeds) & set(base))) + ")"
            cells.append(cell)
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    times = ["", "| budget | median s per pruned network's job, teacher computed (jobs) | the same, teacher read "
             "from the memo (jobs) |", "| --- | ---: | ---: |"]
    for budget in BUDGETS[1:]:
        recs = [r for r in (load(*j) for j in jobs() if j[1] == budget and j[0] != "unpruned")
                if r is not None and r.get("seconds") and not r.get("resumed")]
        read = [r["seconds"] for r in recs if r.get("teacher_batches", {}).get("read", 0) > 0]
        computed = [r["seconds"] for r in recs if r.get("teacher_batches", {}).get("read", 0) == 0]
        cells = [f"{statistics.median(v):,.0f} ({len(v)})" if v else "" for v in (computed, read)]
        if recs:
            times.append(f"| {budget} | " + " | ".join(cells) + " |")
    return "\n".join(lines + times + ablation(res))


def ablation(res: dict) -> list[str]:
    """The recipe against the labels alone (``train5000-ce``), seed 0: each network's held-out top-1 and,
    for the pruned ones, the paired difference from L1 under the same recipe."""
    out = ["", "| network | train5000, seed 0 (the recipe) | train5000-ce, seed 0 (labels alone) |",
           "| --- | ---: | ---: |"]
    for run in ("unpruned", "l1", "car-loss"):
        cells = []
        for budget in ("train5000", "train5000-ce"):
            mine = {0: res[(run, budget)][0]} if 0 in res.get((run, budget), {}) else {}
            if not mine:
                cells.append("")
                continue
            cell = f"{100 * sum(mine[0]) / len(mine[0]):.2f}"
            base = res.get(("l1", budget), {})
            d = paired(mine, {0: base[0]}) if run not in ("l1", "unpruned") and 0 in base else None
            cells.append(cell + (f"<br>{100 * d[0]:+.2f} ± {100 * d[1]:.2f}" if d else ""))
        out.append(f"| {run} | " + " | ".join(cells) + " |")
    return out


def figure(path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = results()
    colours = {"car-loss": "tab:red", "car-accuracy": "darkred", "taylor": "tab:green", "l1": "tab:blue",
               "random": "0.5", "car-loss-race": "tab:orange", "car-loss-staged": "tab:purple", "unpruned": "k"}
    fig, (ax, dx) = plt.subplots(1, 2, figsize=(12.5, 4.8), dpi=130, gridspec_kw={"width_ratios": (4, 3)})
    retrained = BUDGETS[1:]
    for run in RUNS:
        style = dict(color=colours[run], lw=1.6, marker="o", ms=4, capsize=3, ls="--" if run == "unpruned" else "-")
        xs, ys, es = [], [], []
        for i, budget in enumerate(BUDGETS):
            seeds = res.get((run, budget))
            if seeds:
                acc = [100 * sum(v) / len(v) for v in seeds.values()]
                xs.append(i)
                ys.append(statistics.mean(acc))
                es.append(statistics.stdev(acc) if len(acc) > 1 else 0.0)
        if xs:
            ax.errorbar(xs, ys, yerr=es, label=run + (" (ceiling)" if run == "unpruned" else ""), **style)
        if run in ("l1", "unpruned"):     # the right panel holds the criteria only
            continue
        diffs = [(i, paired(res.get((run, b), {}), res.get(("l1", b), {}))) for i, b in enumerate(retrained)]
        diffs = [(i, d) for i, d in diffs if d is not None]
        if diffs:
            dx.errorbar([i for i, _ in diffs], [100 * d[0] for _, d in diffs], yerr=[100 * d[1] for _, d in diffs],
                        **style)
    ax.set_xticks(range(len(BUDGETS)), ["none", *BUDGET_LABELS])
    ax.set_ylabel(f"top-1 %, {N_HELD:,} held-out test images (± the seeds' SD)")
    ax.set_title("ResNet-56, every block conv1 at half: accuracy after retraining", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    dx.axhline(0, color=colours["l1"], lw=1.2)
    dx.set_xticks(range(len(retrained)), BUDGET_LABELS)
    dx.set_xlim(-0.4, len(retrained) - 0.6)
    dx.set_ylabel("minus L1, points (paired over images, ± SE)")
    dx.set_title("the retrained networks against L1", fontsize=10)
    for a in (ax, dx):
        a.grid(alpha=0.3)
    save_figure(fig, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", action="store_true", help="run the next unfinished jobs")
    ap.add_argument("--hours", type=float, default=100.0, help="start no job after this many hours")
    ap.add_argument("--only", nargs="*", choices=BUDGETS + ("train5000-ce",), help="run only these budgets' jobs")
    ap.add_argument("--seed-first", type=int, choices=SEEDS, help="within each budget, take this seed's jobs first")
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
