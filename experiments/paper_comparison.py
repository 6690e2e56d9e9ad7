"""Reproduce the CAR paper's comparison (Abbasi-Asl and Yu, arXiv 1705.07356) on real CIFAR-10 networks.

One layer at a time is pruned greedily by CAR and by the baseline criteria of ``carfast.criteria``
(random, averaged over seeds; l1; mean_activation; apoz; taylor), and the pruned network's top-1
accuracy is measured on held-out images at several numbers of filters remaining. At one compression
level each criterion's pruned network is also fine-tuned briefly. For the AlexNet-style network's
first layer, the script checks whether the filters CAR removes first are colour-selective.

Data: the CIFAR-10 test set is split, within each class, into a "selection" half (even positions:
filters are scored and chosen on a class-balanced subset of it) and an "evaluation" half (odd
positions: every reported accuracy). The two never overlap.

Run ``python experiments/paper_comparison.py --help``; experiments/README.md says how long each
stage takes. Every stage writes its JSON into ``--results`` as it goes and resumes from it.

Data and weights come from ``--test``, ``--train`` and ``--alexnet``; by default from ``../shared/data``
beside the repository (the project's data folder, see its README) where it exists, else the test
images and the AlexNet weights bundled with carfast (the 2,000-image slice: 1,000 images per half, fewer
than the full run's settings ask for; the fine-tuning stages need the training set).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import importlib
import json
import math
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import carfast
from carfast.atomic import write_json_atomic
from carfast.criteria import CRITERIA, random_scores
from carfast.data import cifar10_train, normalize_images
from carfast.finetune import FinetuneConfig, finetune
from carfast.models import (
    ALEXNET_CIFAR_NORMALIZATION,
    CIFAR_RESNET_NORMALIZATION,
    AlexNetCifar,
    CifarResNet,
    alexnet_cifar,
    cifar_resnet,
)

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SHARED = os.path.normpath(os.path.join(REPO, "..", "shared", "data"))      # the data folder beside the repository
_FN = "paper_comparison"

# ---- what is run -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerSpec:
    """One (network, layer) to prune; ``step_div``: the greedy step is F // step_div filters."""
    network: str
    layer: str
    step_div: int


LAYERS = {
    "alexnet_conv1": LayerSpec("alexnet", "features.0", 8),
    "alexnet_conv2": LayerSpec("alexnet", "features.4", 4),     # 128 filters: step F/4 to fit the budget
    "resnet56_layer1": LayerSpec("resnet56", "layer1.4.conv1", 8),
    "resnet56_layer2": LayerSpec("resnet56", "layer2.4.conv1", 8),
    "resnet56_layer3": LayerSpec("resnet56", "layer3.4.conv1", 8),
}
FINETUNED = ("alexnet_conv1", "resnet56_layer2")
BASELINES = ("l1", "mean_activation", "apoz", "taylor")


@dataclass(frozen=True)
class Config:
    n_sel: int = 500                # selection images the criteria score on (class-balanced)
    n_tick: int = 50                # images for prune's per-removal bookkeeping with the baselines (criterion_fn)
    n_eval: int = 5000              # evaluation images (the whole evaluation half)
    n_verify: int = 1000            # images on which the fast evaluation path is checked against carfast.evaluate
    keep_frac: float = 1 / 8        # prune down to this fraction of the layer's filters
    levels: tuple = (0.25, 0.5, 0.75, 0.875)   # fractions removed at which the evaluation half is scored
    random_seeds: tuple = (0, 1, 2)
    step_div_override: int | None = None
    ft_level: float = 0.5           # fraction removed before fine-tuning
    ft_images: int = 5000           # training images (class-balanced, JPEG copies), one epoch
    ft_lr: float = 0.005
    ft_epochs: int = 1
    ft_random_seeds: tuple = (0,)   # random runs that are fine-tuned
    colour_first: int = 20          # the paper's "first 20 filters removed"
    carsel: tuple = (1000,)         # stage carsel:<layer>: CAR alone on more selection images
    carstep: tuple = (("alexnet_conv1", 2), ("alexnet_conv2", 4))  # stage carstep:<layer>: CAR alone, step F/32 ...
    carstep_keep_frac: float = 1 / 4   # ... down to this fraction of the filters (to fit the budget)
    layers: tuple = tuple(LAYERS)
    finetuned: tuple = FINETUNED


QUICK = Config(n_sel=40, n_tick=20, n_eval=200, n_verify=100, keep_frac=1 / 4, levels=(0.25, 0.5, 0.75),
               random_seeds=(0, 1), step_div_override=4, ft_images=256, colour_first=20, carsel=(60,),
               carstep=(("alexnet_conv1", 8),),
               layers=("alexnet_conv1", "resnet56_layer3"), finetuned=("alexnet_conv1",))

GROUPS = {
    "alexnet": ["prune:alexnet_conv1", "finetune:alexnet_conv1", "prune:alexnet_conv2", "carsel:alexnet_conv1"],
    "resnet56": ["prune:resnet56_layer3", "prune:resnet56_layer2", "finetune:resnet56_layer2",
                 "prune:resnet56_layer1"],
    # the CAR-only runs with a finer step; the fine-tuning stage then adds every CAR-only variant
    "extra": ["carstep:alexnet_conv1", "carstep:alexnet_conv2", "finetune:alexnet_conv1"],
    "report": [f"selacc:{k}" for k in LAYERS] + ["colour", "figures", "summary"],
}


def log(msg: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)


# ---- data and networks -------------------------------------------------------------------------------
def split_test(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(selection [N/2], evaluation [N/2]) indices into the test set: within each class, even positions
    (file order) go to selection, odd to evaluation; each list is ordered rank-major (image i has class
    i % 10), so every prefix of a multiple of 10 is class-balanced."""
    sel, ev = [], []
    counts = np.bincount(labels)
    if len(set(counts.tolist())) != 1:
        raise ValueError(f"{_FN}: the test set is not class-balanced ({counts.tolist()}); pass the CIFAR-10 test.npz")
    for c in range(len(counts)):
        where = np.flatnonzero(labels == c)
        sel.append(where[0::2])
        ev.append(where[1::2])
    return np.stack(sel, 1).reshape(-1), np.stack(ev, 1).reshape(-1)


class Data:
    """The test set split into selection and evaluation halves, normalised per network on demand."""

    def __init__(self, path: str):
        with np.load(path, allow_pickle=False) as z:
            self.x, self.y = z["x"], z["y"].astype(np.int64)
        self.sel, self.ev = split_test(self.y)
        if len(set(self.sel) & set(self.ev)):
            raise RuntimeError(f"{_FN}: selection and evaluation overlap")
        self._cache = {}

    def get(self, part: str, n: int, normalization) -> tuple[torch.Tensor, torch.Tensor]:
        key = (part, n, normalization)
        if key not in self._cache:
            idx = (self.sel if part == "sel" else self.ev)[:n]
            self._cache[key] = (normalize_images(self.x[idx], normalization), torch.from_numpy(self.y[idx]))
        return self._cache[key]


def load_network(name: str, args) -> tuple[nn.Module, tuple]:
    """(model in eval mode, input normalisation)."""
    if name == "alexnet":
        if args.alexnet is None:                  # the copy bundled with carfast (float16-stored, same accuracy)
            return alexnet_cifar(), ALEXNET_CIFAR_NORMALIZATION
        ckpt = torch.load(args.alexnet, map_location="cpu", weights_only=True)
        norm = (tuple(float(v) for v in ckpt["mean"]), tuple(float(v) for v in ckpt["std"]))
        return alexnet_cifar(args.alexnet), norm
    if name == "resnet56":
        return cifar_resnet(56), CIFAR_RESNET_NORMALIZATION
    raise ValueError(f"{_FN}: unknown network {name!r}")


# ---- fast evaluation: the layers before the pruned one are cached ------------------------------------
def split_network(model: nn.Module, layer: str):
    """(prefix(model, x), suffix(model, h)) around the part of ``model`` that pruning ``layer`` changes.

    AlexNet ``features.i``: prefix = features[:i]; ResNet ``layerS.B.conv1``: prefix = stem, earlier
    stages and blocks [:B] of stage S (all unchanged by the surgery), suffix = the rest. The same
    split of the pruned model then computes exactly what the whole pruned network computes.
    """
    if isinstance(model, AlexNetCifar):
        i = int(layer.split(".")[1])

        def prefix(m, x):
            return m.features[:i](x)

        def suffix(m, h):
            return m.classifier(m.features[i:](h))
        return prefix, suffix
    if isinstance(model, CifarResNet):
        stage, block, _ = layer.split(".")
        s, b = int(stage[len("layer"):]), int(block)

        def prefix(m, x):
            out = F.relu(m.bn1(m.conv1(x)))
            for k in range(1, s):
                out = getattr(m, f"layer{k}")(out)
            return getattr(m, f"layer{s}")[:b](out)

        def suffix(m, h):
            out = getattr(m, f"layer{s}")[b:](h)
            for k in range(s + 1, 4):
                out = getattr(m, f"layer{k}")(out)
            return m.linear(m.flatten(m.pool(out)))
        return prefix, suffix
    raise TypeError(f"{_FN}: no prefix/suffix split for {type(model).__name__}")


def _batched(fn, model, x, batch: int = 500) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(model, x[i:i + batch]) for i in range(0, x.shape[0], batch)])


def correct_bits(model: nn.Module, x: torch.Tensor, y: torch.Tensor, fn=None) -> np.ndarray:
    """[N] bool: top-1 == label for each image; ``fn(model, x)`` (default ``model(x)``) gives the logits."""
    model.eval()
    logits = _batched(fn or (lambda m, t: m(t)), model, x)
    return (logits.argmax(1) == y).numpy()


def pack(bits: np.ndarray) -> str:
    return np.packbits(bits.astype(np.uint8)).tobytes().hex()


def unpack(hexstr: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bytes.fromhex(hexstr), dtype=np.uint8))[:n].astype(bool)


def channels_last(t):
    return t.to(memory_format=torch.channels_last)


# ---- bookkeeping -------------------------------------------------------------------------------------
_ENV: dict = {}


def environment() -> dict:
    """Versions, commit and machine; taken once per process (at its start, from ``main``): the code a
    long run uses is the code it imported then, even if the repository moves on meanwhile."""
    if not _ENV:
        _ENV.update(_environment())
    return dict(_ENV)


def _environment() -> dict:
    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        pass
    status = git("status", "--porcelain")
    return {"commit": git("rev-parse", "HEAD"), "uncommitted_files": len(status.splitlines()) if status else 0,
            "torch": torch.__version__, "carfast": carfast.__version__,
            "python": platform.python_version(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "load_avg_at_start": list(os.getloadavg()),
            "started": datetime.datetime.now().isoformat(timespec="seconds")}


_STARTED_FRESH: set = set()


def load_json(path: str, settings: dict, fresh: bool) -> dict:
    """The stage's saved record when its settings match, else a new one. ``fresh`` starts anew, once per
    file and process (a stage listed twice, like finetune:alexnet_conv1 in ``all``, resumes the second time)."""
    if fresh and path not in _STARTED_FRESH:
        _STARTED_FRESH.add(path)
        return {"settings": settings, "env": environment(), "runs": {}}
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved.get("settings") == settings:
            return saved
        raise ValueError(f"{_FN}: {path} was written with other settings; pass --fresh to start the stage "
                         "anew, or --results to another folder")
    return {"settings": settings, "env": environment(), "runs": {}}


def run_ids(cfg: Config, variant: str = "prune", key: str | None = None) -> list[tuple[str, str, int | None, int]]:
    """(run id, criterion, seed, selection images) of each pruning run of a layer; variant "carsel":
    CAR alone on each of ``cfg.carsel`` selection-set sizes."""
    if variant == "carsel":
        return [(f"car_sel{n}", "car", None, n) for n in cfg.carsel]
    if variant == "carstep":
        return [(f"car_step{dict(cfg.carstep)[key]}", "car", None, cfg.n_sel)]
    ids = [("car", "car", None, cfg.n_sel)] + [(f"random_s{s}", "random", s, cfg.n_sel) for s in cfg.random_seeds]
    return ids + [(b, b, None, cfg.n_sel) for b in BASELINES]


def criterion_fn(name: str, seed, sel_data):
    """The importance function ``(model, layer, data) -> [F]`` for ``prune``, scoring on ``sel_data``.

    The function ignores the data ``prune`` passes (the small bookkeeping set) and always scores on
    the selection images, so the removal order is the one ``prune(model, layer, sel_data)`` would give.
    """
    if name == "random":
        def fn(model, layer, _data):
            return random_scores(model, layer, seed=seed)
        fn.__name__ = f"random_seed{seed}"
        fn.fixed_order = True        # drawn once per layer, removed in that order (as random_scores)
        return fn
    base = CRITERIA[name]

    def fn(model, layer, _data):
        return base(model, layer, sel_data)
    fn.__name__ = f"{name}@selection{sel_data[1].numel()}"
    return fn


# ---- stage: prune one layer by every criterion and evaluate --------------------------------------------
def stage_prune(key: str, cfg: Config, data: Data, args, variant: str = "prune") -> dict:
    spec = LAYERS[key]
    model, norm = load_network(spec.network, args)
    num = model.get_submodule(spec.layer).out_channels
    step = max(1, num // (cfg.step_div_override or spec.step_div))
    keep = max(1, round(num * cfg.keep_frac))
    if variant == "carstep":
        if key not in dict(cfg.carstep):
            raise ValueError(f"{_FN}: no finer step set for {key!r} (Config.carstep: {cfg.carstep})")
        step, keep = dict(cfg.carstep)[key], max(1, round(num * cfg.carstep_keep_frac))
    levels = sorted({round(f * num) for f in cfg.levels if round(f * num) <= num - keep})
    sel = data.get("sel", cfg.n_sel, norm)
    tick = data.get("sel", cfg.n_tick, norm)
    x_ev, y_ev = data.get("ev", cfg.n_eval, norm)
    settings = {"network": spec.network, "layer": spec.layer, "filters": num, "step": step, "keep": keep,
                "levels_removed": levels, "n_sel": cfg.n_sel, "n_tick": cfg.n_tick, "n_eval": cfg.n_eval,
                "random_seeds": list(cfg.random_seeds), "runs": [r[0] for r in run_ids(cfg, variant, key)],
                "split": "within each class: even positions -> selection, "
                "odd -> evaluation; first n of each, class-balanced"}
    path = os.path.join(args.results, f"prune_{key}.json" if variant == "prune" else f"prune_{key}_{variant}.json")
    rec = load_json(path, settings, args.fresh)
    log(f"{variant} {key}: {spec.network} {spec.layer}, F={num}, step={step}, keep={keep}, levels removed {levels}")

    prefix, suffix = split_network(model, spec.layer)
    model_cl = channels_last(copy.deepcopy(model))      # the copy in channels_last: faster on this CPU
    t0 = time.perf_counter()
    with torch.no_grad():
        h_ev = _batched(prefix, model_cl, channels_last(x_ev))        # [N, ...] the pruned part's input
    t_prefix = time.perf_counter() - t0
    if "base" not in rec:
        bits = correct_bits(model_cl, h_ev, y_ev, suffix)
        n = min(cfg.n_verify, cfg.n_eval)
        ref = carfast.evaluate(model, (x_ev[:n], y_ev[:n])).correct
        rec["base"] = {"correct": int(bits.sum()), "accuracy": float(bits.mean()), "bits": pack(bits),
                       "verify": {"images": n, "carfast_evaluate": ref, "fast_path": int(bits[:n].sum())},
                       "prefix_seconds": t_prefix}
        log(f"  base accuracy on the evaluation half: {100 * bits.mean():.2f} % (first {n}: fast path "
            f"{int(bits[:n].sum())}, carfast.pruning.evaluate {ref} correct)")
        write_json_atomic(path, rec)

    ckdir = os.path.join(args.results, "checkpoints")
    for run_id, crit, seed, n_sel in run_ids(cfg, variant, key):
        if run_id in rec["runs"]:
            continue
        log(f"  {run_id}: pruning")
        ckpt = os.path.join(ckdir, f"{key}__{run_id}.json")
        t0 = time.perf_counter()
        if crit == "car":
            car_sel = data.get("sel", n_sel, norm)
            res = carfast.prune(model, spec.layer, car_sel, keep=keep, step=step, criterion="car", rule="accuracy",
                                progress=False, checkpoint=ckpt)     # the paper's rule, as the recorded runs
        else:
            res = carfast.prune(model, spec.layer, tick, keep=keep, step=step, progress=False, checkpoint=ckpt,
                                criterion=criterion_fn(crit, seed, sel))
        t_prune = time.perf_counter() - t0
        removed = [int(i) for i in res.removed[spec.layer]]
        # the time of one scoring of all filters of the unpruned layer on the selection images
        if crit == "car":
            t_score = res.history[0]["seconds"]
            first_car = res.scores[spec.layer].car.tolist() if spec.layer in res.scores else None
        else:
            t1 = time.perf_counter()
            criterion_fn(crit, seed, sel)(model, spec.layer, None)
            t_score, first_car = time.perf_counter() - t1, None
        entry = {"criterion": crit, "seed": seed, "n_sel": n_sel, "removed": removed, "prune_seconds": t_prune,
                 "one_scoring_seconds": t_score, "first_car": first_car,
                 "history": [{k: r[k] for k in ("filter", "accuracy", "remaining", "seconds")} for r in res.history],
                 "history_images": n_sel if crit == "car" else cfg.n_tick, "levels": {}}
        t0 = time.perf_counter()
        for k in levels:
            pruned = carfast.remove_filters(model, {spec.layer: removed[:k]}, example=x_ev[:1])
            bits = correct_bits(channels_last(pruned), h_ev, y_ev, suffix)
            entry["levels"][str(k)] = {"remaining": num - k, "correct": int(bits.sum()),
                                       "accuracy": float(bits.mean()), "bits": pack(bits)}
            if run_id == "car" and k == levels[len(levels) // 2]:     # check the fast path once per layer
                n = min(cfg.n_verify, cfg.n_eval)
                ref = carfast.evaluate(pruned, (x_ev[:n], y_ev[:n])).correct
                entry["verify"] = {"removed": k, "images": n, "carfast_evaluate": ref, "fast_path": int(bits[:n].sum())}
                if abs(ref - int(bits[:n].sum())) > 2:
                    raise RuntimeError(f"{_FN}: the cached-prefix evaluation disagrees with carfast.pruning.evaluate "
                                       f"({int(bits[:n].sum())} vs {ref} correct of {n}); the split is wrong")
        entry["eval_seconds"] = time.perf_counter() - t0
        rec["runs"][run_id] = entry
        write_json_atomic(path, rec)
        if os.path.exists(ckpt):
            os.remove(ckpt)
        accs = ", ".join(f"{num - int(k)}: {100 * v['accuracy']:.2f}" for k, v in entry["levels"].items())
        log(f"  {run_id}: prune {t_prune:.0f} s (one scoring {t_score:.1f} s), eval {entry['eval_seconds']:.0f} s; "
            f"accuracy at filters remaining {accs}")
    return rec


# ---- stage: accuracy on the selection images themselves (does CAR overfit the images it chose on?) ---
def stage_selacc(key: str, cfg: Config, data: Data, args) -> dict:
    """Accuracy of every run's pruned networks on the first selection images (as many as the largest
    selection set of the layer's runs): the images CAR chose on. A criterion fitted to those images
    scores higher there than on held-out ones."""
    spec = LAYERS[key]
    main_rec = _load(os.path.join(args.results, f"prune_{key}.json"))
    recs = ([main_rec] if main_rec else []) + _extras(args.results, key)
    if not main_rec:
        raise FileNotFoundError(f"{_FN}: selacc:{key} needs results/prune_{key}.json; run --stage prune:{key} first")
    model, norm = load_network(spec.network, args)
    n = max([cfg.n_sel] + [run.get("n_sel", cfg.n_sel) for rec in recs for run in rec["runs"].values()])
    x, y = data.get("sel", n, norm)
    prefix, suffix = split_network(model, spec.layer)
    with torch.no_grad():
        h = _batched(prefix, channels_last(copy.deepcopy(model)), channels_last(x))
    out = {"images": n, "n_sel": cfg.n_sel, "runs": {},
           "unpruned": pack(correct_bits(channels_last(copy.deepcopy(model)), h, y, suffix))}
    for rec in recs:
        for run_id, run in rec["runs"].items():
            out["runs"][run_id] = {"n_sel": run.get("n_sel", rec["settings"]["n_sel"]), "levels": {}}
            for k in rec["settings"]["levels_removed"]:
                pruned = carfast.remove_filters(model, {spec.layer: run["removed"][:k]}, example=x[:1])
                bits = correct_bits(channels_last(pruned), h, y, suffix)
                out["runs"][run_id]["levels"][str(k)] = pack(bits)
    write_json_atomic(os.path.join(args.results, f"selacc_{key}.json"), out)
    log(f"selacc {key}: accuracy of {len(out['runs'])} runs on {n} selection images saved")
    return out


# ---- stage: fine-tune at one compression level ---------------------------------------------------------
class FrozenBatchNorm(nn.Module):
    """Wraps a network so that ``.train()`` leaves its BatchNorm layers in eval mode: their running
    statistics stay as trained (the JPEG training copies would shift them), their affine weights train."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def forward(self, x):
        return self.net(x)


def finetune_frozen_bn(model: nn.Module, train, cfg: dict) -> tuple[nn.Module, str]:
    """Fine-tune with BatchNorm statistics frozen: the ``bn_stats`` option when FinetuneConfig has it,
    else the ``FrozenBatchNorm`` wrapper."""
    fields = {f for f in FinetuneConfig.__dataclass_fields__}
    if "bn_stats" in fields:
        return finetune(model, train, dict(cfg, bn_stats="freeze"), progress=False), "FinetuneConfig.bn_stats"
    return finetune(FrozenBatchNorm(model), train, cfg, progress=False).net, "FrozenBatchNorm wrapper"


def _bn_buffers(model: nn.Module) -> dict:
    return {n: b.clone() for n, b in model.named_buffers() if "running_" in n}


def stage_finetune(key: str, cfg: Config, data: Data, args) -> dict:
    spec = LAYERS[key]
    ppath = os.path.join(args.results, f"prune_{key}.json")
    if not os.path.exists(ppath):
        raise FileNotFoundError(f"{_FN}: finetune:{key} needs {ppath}; run --stage prune:{key} first")
    with open(ppath) as f:
        prec = json.load(f)
    model, norm = load_network(spec.network, args)
    num = prec["settings"]["filters"]
    k = round(cfg.ft_level * num)
    ft_cfg = {"epochs": cfg.ft_epochs, "lr": cfg.ft_lr, "batch_size": 128, "momentum": 0.9, "nesterov": True,
              "weight_decay": 5e-4, "augment": True, "label_smoothing": 0.0, "schedule": "cosine", "seed": 0}
    settings = {"network": spec.network, "layer": spec.layer, "filters": num, "removed": k, "ft_images": cfg.ft_images,
                "finetune": ft_cfg, "n_eval": cfg.n_eval, "prune_settings": prec["settings"]}
    path = os.path.join(args.results, f"finetune_{key}.json")
    rec = load_json(path, settings, args.fresh)
    x_ev, y_ev = data.get("ev", cfg.n_eval, norm)
    t0 = time.perf_counter()
    train = cifar10_train(args.train, cfg.ft_images, normalization=norm, seed=0)
    log(f"finetune {key}: {k} of {num} filters removed; {cfg.ft_images} training images decoded in "
        f"{time.perf_counter() - t0:.1f} s")
    source = {r: prec for r, c, s, _ in run_ids(cfg) if c != "random" or s in cfg.ft_random_seeds}
    for extra in _extras(args.results, key):          # CAR-only variants (finer step, more images) too
        source.update({r: extra for r, run in extra["runs"].items() if str(k) in run["levels"]})
    for run_id in ["unpruned"] + list(source):
        if run_id in rec["runs"]:
            continue
        if run_id == "unpruned":
            start, before = model, prec["base"]
        else:
            run = source[run_id]["runs"][run_id]
            start = carfast.remove_filters(model, {spec.layer: run["removed"][:k]}, example=x_ev[:1])
            before = run["levels"][str(k)]
        t0 = time.perf_counter()
        bn_before = _bn_buffers(start)
        tuned, how = finetune_frozen_bn(start, train, ft_cfg)
        t_ft = time.perf_counter() - t0
        bn_after = _bn_buffers(tuned)
        frozen = bn_before.keys() == bn_after.keys() and all(torch.equal(bn_before[n], bn_after[n]) for n in bn_before)
        bits = correct_bits(channels_last(tuned), channels_last(x_ev), y_ev)
        rec["runs"][run_id] = {"before_accuracy": before["accuracy"], "before_bits": before["bits"],
                               "after_accuracy": float(bits.mean()), "after_correct": int(bits.sum()),
                               "after_bits": pack(bits), "finetune_seconds": t_ft, "bn_frozen_by": how,
                               "bn_statistics_unchanged": bool(frozen)}
        write_json_atomic(path, rec)
        log(f"  {run_id}: {100 * before['accuracy']:.2f} % -> {100 * bits.mean():.2f} % after fine-tuning "
            f"({t_ft:.0f} s; BN statistics unchanged: {frozen})")
    return rec


# ---- stage: colour selectivity of the first-layer filters CAR removes first ----------------------------
def colour_index(weight: torch.Tensor, std) -> tuple[np.ndarray, str]:
    """[F] float64 in [0, 1]: the fraction of each first-layer filter's energy outside the luminance
    direction. ``carfast.report.filter_images.colour_selectivity`` when it exists, else defined here: the
    weights are taken back to raw RGB (divided by the input normalisation's std per channel, as the
    network sees (x - mean) / std) and each pixel's RGB weight vector w_p is split along
    u = (1, 1, 1) / sqrt(3): index = 1 - sum_p (u . w_p)^2 / sum_p |w_p|^2. 0 = a pure luminance
    filter, 1 = a pure colour-opponent one; a filter with isotropic random RGB weights scores 2/3."""
    try:
        fn = importlib.import_module("carfast.report.filter_images").colour_selectivity
    except (ImportError, AttributeError):
        fn = None
    if fn is not None:
        return (np.asarray(fn(weight, input_std=std), dtype=np.float64),
                "carfast.report.filter_images.colour_selectivity(weight, input_std)")
    w = weight.detach().double() / torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)   # [F, 3, kh, kw]
    lum = w.sum(1) / math.sqrt(3.0)                                                           # [F, kh, kw]
    total = (w ** 2).sum((1, 2, 3))
    return (1.0 - (lum ** 2).sum((1, 2)) / total).numpy(), "defined in experiments/paper_comparison.py"


def hypergeom_sf(k: int, population: int, successes: int, draws: int) -> float:
    """P(X >= k) for X ~ Hypergeometric(population, successes, draws)."""
    total = math.comb(population, draws)
    return sum(math.comb(successes, i) * math.comb(population - successes, draws - i)
               for i in range(k, min(successes, draws) + 1)) / total


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def stage_colour(cfg: Config, args) -> dict:
    ppath = os.path.join(args.results, "prune_alexnet_conv1.json")
    if not os.path.exists(ppath):
        raise FileNotFoundError(f"{_FN}: colour needs {ppath}; run --stage prune:alexnet_conv1 first")
    with open(ppath) as f:
        prec = json.load(f)
    model, norm = load_network("alexnet", args)
    weight = model.features[0].weight
    idx, source = colour_index(weight, norm[1])
    num, first = len(idx), cfg.colour_first
    median = float(np.median(idx))
    selective = idx > median
    n_sel = int(selective.sum())
    out = {"index_source": source, "index": idx.tolist(), "median": median, "threshold": "index > median",
           "num_selective": n_sel, "first": first, "random_expectation": first * n_sel / num, "runs": {}}
    runs = dict(prec["runs"])
    for extra in _extras(args.results, "alexnet_conv1"):
        runs.update(extra["runs"])
    for run_id, run in runs.items():
        head = run["removed"][:first]
        count = int(selective[head].sum())
        order = np.full(num, len(run["removed"]), dtype=float)     # kept filters: removed last (tied)
        order[run["removed"]] = np.arange(len(run["removed"]))
        out["runs"][run_id] = {"first_removed": head, "selective_among_first": count,
                               "p_at_least_this_many_by_chance": hypergeom_sf(count, num, n_sel, first),
                               "mean_index_first": float(idx[head].mean()),
                               "spearman_removal_position_vs_index": spearman(order, idx)}
        if run.get("first_car"):
            out["runs"][run_id]["spearman_car_vs_index"] = spearman(np.asarray(run["first_car"]), idx)
    out["mean_index_all"] = float(idx.mean())
    write_json_atomic(os.path.join(args.results, "colour_alexnet_conv1.json"), out)
    c = out["runs"].get("car", {})
    log(f"colour: {c.get('selective_among_first')} of the first {first} CAR removals are colour-selective "
        f"(index > median {median:.3f}); chance expectation {out['random_expectation']:.1f}")
    return out


# ---- stage: figures ----------------------------------------------------------------------------------
LABELS = {"car": "CAR (greedy)", "random": "random (mean of seeds, range)", "l1": "L1 norm",
          "mean_activation": "mean activation", "apoz": "APoZ", "taylor": "Taylor"}
STYLE = {"car": ("tab:red", "o", 2.4), "random": ("0.45", "s", 1.4), "l1": ("tab:blue", "^", 1.4),
         "mean_activation": ("tab:green", "v", 1.4), "apoz": ("tab:purple", "D", 1.4),
         "taylor": ("tab:orange", "P", 1.4)}


def _load(path: str):
    """The JSON at ``path``, or None when there is none."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _extras(results: str, key: str) -> list:
    """The saved CAR-only variants of a layer (carsel: more selection images, carstep: finer step)."""
    return [r for r in (_load(os.path.join(results, f"prune_{key}_{v}.json")) for v in ("carsel", "carstep")) if r]


def curves(rec: dict) -> dict:
    """{criterion: (remaining [L], accuracy % [L], low [L], high [L])}, level 0 = the base model."""
    num, base = rec["settings"]["filters"], 100 * rec["base"]["accuracy"]
    ks = rec["settings"]["levels_removed"]
    out, rand = {}, []
    for run in rec["runs"].values():
        acc = [base] + [100 * run["levels"][str(k)]["accuracy"] for k in ks]
        if run["criterion"] == "random":
            rand.append(acc)
        else:
            out[run["criterion"]] = (acc, acc, acc)
    if rand:
        r = np.asarray(rand)
        out["random"] = (r.mean(0).tolist(), r.min(0).tolist(), r.max(0).tolist())
    rem = [num] + [num - k for k in ks]
    return {c: (rem,) + v for c, v in out.items()}


def stage_figures(cfg: Config, args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(args.figures, exist_ok=True)
    for key in cfg.layers:
        path = os.path.join(args.results, f"prune_{key}.json")
        if not os.path.exists(path):
            log(f"figures: no {path}, skipped")
            continue
        with open(path) as f:
            rec = json.load(f)
        st = rec["settings"]
        fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=130)
        cv = curves(rec)
        for crit in ("random", "l1", "mean_activation", "apoz", "taylor", "car"):
            if crit not in cv:
                continue
            rem, acc, lo, hi = cv[crit]
            colour, marker, lw = STYLE[crit]
            label = f"CAR (greedy, step {st['step']})" if crit == "car" else LABELS[crit]
            ax.plot(rem, acc, color=colour, marker=marker, lw=lw, ms=6, label=label, zorder=3 if crit == "car" else 2)
            if crit == "random":
                ax.fill_between(rem, lo, hi, color=colour, alpha=0.18, lw=0)
        for extra in _extras(args.results, key):
            ks, est = extra["settings"]["levels_removed"], extra["settings"]
            for run in extra["runs"].values():
                finer = est["step"] != st["step"]
                ax.plot([st["filters"]] + [st["filters"] - k for k in ks],
                        [100 * extra["base"]["accuracy"]] + [100 * run["levels"][str(k)]["accuracy"] for k in ks],
                        color="darkred", ls="-." if finer else "--", marker="*" if finer else "o", mfc="white",
                        lw=1.6, ms=8 if finer else 6,
                        label=f"CAR (greedy, step {est['step']}), chosen on {run['n_sel']} images")
        ax.axhline(100 * rec["base"]["accuracy"], color="k", ls=":", lw=1, label="unpruned")
        ax.set_xlim(st["filters"] * 1.03, 0)
        ax.set_xlabel(f"filters remaining in {st['layer']} (of {st['filters']})")
        ax.set_ylabel(f"top-1 accuracy, % ({st['n_eval']} held-out test images)")
        net = "AlexNet-style CIFAR-10 net" if st["network"] == "alexnet" else "ResNet-56 (CIFAR-10)"
        ax.set_title(f"{net}, pruning {st['layer']} alone\nfilters chosen on {st['n_sel']} other test images, "
                     f"greedy step {st['step']} filters (other CAR runs: see legend)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8.5, loc="lower left")
        fig.tight_layout()
        out = os.path.join(args.figures, f"accuracy_{key}.png")
        fig.savefig(out)
        plt.close(fig)
        log(f"figures: wrote {out}")
    _figure_finetune(cfg, args, plt)
    _figure_colour(cfg, args, plt)


def _figure_finetune(cfg, args, plt):
    recs = [(k, os.path.join(args.results, f"finetune_{k}.json")) for k in cfg.finetuned]
    recs = [(k, json.load(open(p))) for k, p in recs if os.path.exists(p)]
    if not recs:
        return
    fig, axes = plt.subplots(1, len(recs), figsize=(7.8 * len(recs), 4.8), dpi=130, squeeze=False)
    for ax, (_key, rec) in zip(axes[0], recs):
        names = list(rec["runs"])
        before = [100 * rec["runs"][n]["before_accuracy"] for n in names]
        after = [100 * rec["runs"][n]["after_accuracy"] for n in names]
        pos = np.arange(len(names))
        ax.bar(pos - 0.2, before, 0.4, label="before fine-tuning", color="0.6")
        ax.bar(pos + 0.2, after, 0.4, label="after fine-tuning", color="tab:red")
        for p, b, a in zip(pos, before, after):
            ax.text(p - 0.2, b + 0.3, f"{b:.1f}", ha="center", fontsize=7)
            ax.text(p + 0.2, a + 0.3, f"{a:.1f}", ha="center", fontsize=7)
        lo = min(before + after)
        ax.set_ylim(max(0, lo - 8), max(before + after) + 3)
        step = rec["settings"]["prune_settings"]["step"]
        ax.set_xticks(pos, [f"car\nstep {step}" if n == "car" else n.replace("_", "\n") for n in names], fontsize=8)
        st = rec["settings"]
        ax.set_title(f"{st['network']} {st['layer']}: {st['removed']} of {st['filters']} filters removed\n"
                     f"fine-tuned 1 epoch on {st['ft_images']} JPEG training images, BN statistics frozen", fontsize=9)
        ax.set_ylabel(f"top-1 %, {st['n_eval']} held-out test images")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out = os.path.join(args.figures, "finetune.png")
    fig.savefig(out)
    plt.close(fig)
    log(f"figures: wrote {out}")


def _figure_colour(cfg, args, plt):
    cpath = os.path.join(args.results, "colour_alexnet_conv1.json")
    ppath = os.path.join(args.results, "prune_alexnet_conv1.json")
    if not (os.path.exists(cpath) and os.path.exists(ppath)):
        return
    col, prec = json.load(open(cpath)), json.load(open(ppath))
    model, norm = load_network("alexnet", args)
    w = model.features[0].weight.detach()                                    # [64, 3, 5, 5]
    # the finest-step CAR run: the closest to the paper's one-filter-at-a-time greedy loop
    cars = [(prec["settings"]["step"], "car", prec["runs"]["car"])] + [
        (e["settings"]["step"], rid, r) for e in _extras(args.results, "alexnet_conv1") for rid, r in e["runs"].items()]
    step, run_id, run = min(cars, key=lambda c: c[0])
    removed = run["removed"]
    order = removed + [i for i in range(w.shape[0]) if i not in removed]
    idx = np.asarray(col["index"])
    fig, axes = plt.subplots(4, 16, figsize=(13, 4.4), dpi=130)
    try:      # symmetric per-filter scaling (zero weight = grey) when carfast has it
        tiles = importlib.import_module("carfast.report.filter_images").filter_tiles(w, input_std=norm[1]).numpy()
    except (ImportError, AttributeError):
        tiles = [((t - t.min()) / max(t.max() - t.min(), 1e-12)).numpy() for t in w.permute(0, 2, 3, 1)]
    for pos, (ax, k) in enumerate(zip(axes.flat, order)):
        ax.imshow(tiles[k], interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        sel = idx[k] > col["median"]
        for s in ax.spines.values():
            s.set_color("tab:red" if sel else "0.7")
            s.set_linewidth(2.2 if sel else 0.8)
        tag = f"#{pos + 1}" if pos < len(removed) else "kept"
        ax.set_title(f"{tag}\n{idx[k]:.2f}", fontsize=6.5)
    fig.suptitle(f"AlexNet-style conv1 filters in CAR removal order ({run_id}: greedy step {step}, chosen on "
                 f"{run.get('n_sel', prec['settings']['n_sel'])} images; left to right, top to bottom); number: colour "
                 "index (energy off the luminance axis);\nred frame: index above the median (colour-selective)",
                 fontsize=9)
    fig.tight_layout()
    out = os.path.join(args.figures, "colour_alexnet_conv1.png")
    fig.savefig(out)
    plt.close(fig)
    log(f"figures: wrote {out}")


# ---- stage: summary tables (markdown, for RESULTS.md) ---------------------------------------------------
def _paired(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(mean difference, its standard error) in points for paired per-image correctness."""
    d = a.astype(float) - b.astype(float)
    return 100 * d.mean(), 100 * d.std(ddof=1) / math.sqrt(len(d))


def stage_summary(cfg: Config, args) -> str:
    lines = []
    for key in cfg.layers:
        path = os.path.join(args.results, f"prune_{key}.json")
        if not os.path.exists(path):
            continue
        rec = json.load(open(path))
        st, n = rec["settings"], rec["settings"]["n_eval"]
        lines.append(f"\n### {st['network']} `{st['layer']}` ({st['filters']} filters, step {st['step']}, "
                     f"unpruned {100 * rec['base']['accuracy']:.2f} %)\n")
        ks = st["levels_removed"]
        lines.append("| criterion | " + " | ".join(f"{st['filters'] - k} left ({100 * k / st['filters']:.1f} % removed)"
                                                  for k in ks) + " | prune time s | one scoring s |")
        lines.append("| --- |" + " ---: |" * (len(ks) + 2))
        rows = list(rec["runs"].items()) + [kv for e in _extras(args.results, key) for kv in e["runs"].items()]
        for run_id, run in rows:
            cells = [f"{100 * run['levels'][str(k)]['accuracy']:.2f}" if str(k) in run["levels"] else "-" for k in ks]
            lines.append(f"| {run_id} | " + " | ".join(cells) + f" | {run['prune_seconds']:.0f} | "
                         f"{run['one_scoring_seconds']:.2f} |")
        cars = [("car", rec["runs"]["car"])] if "car" in rec["runs"] else []
        cars += [kv for e in _extras(args.results, key) for kv in e["runs"].items()]
        others = {}
        for run_id, run in rec["runs"].items():
            if run_id != "car":
                others.setdefault("random (mean)" if run["criterion"] == "random" else run_id, []).append(run)
        for car_id, car in cars:
            lines.append(f"\n{car_id} minus each criterion (points, paired over the same {n} images, +- 1 "
                         "standard error):\n")
            lines.append("| vs | " + " | ".join(f"{st['filters'] - k} left" for k in ks) + " |")
            lines.append("| --- |" + " ---: |" * len(ks))
            for name, runs in others.items():
                cells = []
                for k in ks:
                    if str(k) not in car["levels"]:
                        cells.append("-")
                        continue
                    a = unpack(car["levels"][str(k)]["bits"], n)
                    b = np.mean([unpack(r["levels"][str(k)]["bits"], n) for r in runs], 0)
                    d, se = _paired(a, b)
                    cells.append(f"{d:+.2f} +- {se:.2f}")
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for key in cfg.layers:
        sa = _load(os.path.join(args.results, f"selacc_{key}.json"))
        rec = _load(os.path.join(args.results, f"prune_{key}.json"))
        if not (sa and rec):
            continue
        st, ks = rec["settings"], rec["settings"]["levels_removed"]
        lines.append(f"\n### {st['network']} `{st['layer']}`: accuracy on the selection images vs the "
                     "evaluation half\n")
        lines.append(f"Each cell: on the first {sa['n_sel']} selection images (CAR chose on them) / on all "
                     f"{st['n_eval']} evaluation images, %.\n")
        lines.append("| run | " + " | ".join(f"{st['filters'] - k} left" for k in ks) + " |")
        lines.append("| --- |" + " ---: |" * len(ks))
        if "unpruned" in sa:
            base_sel = 100 * unpack(sa["unpruned"], sa["images"])[:sa["n_sel"]].mean()
            lines.append("| unpruned | " + " | ".join(f"{base_sel:.1f} / {100 * rec['base']['accuracy']:.1f}"
                                                      for _ in ks) + " |")
        runs = dict(rec["runs"])
        for e in _extras(args.results, key):
            runs.update(e["runs"])
        for run_id, run in runs.items():
            if run_id not in sa["runs"]:
                continue
            cells = []
            for k in ks:
                if str(k) not in run["levels"]:
                    cells.append("-")
                    continue
                sel_bits = unpack(sa["runs"][run_id]["levels"][str(k)], sa["images"])
                held_out = 100 * run["levels"][str(k)]["accuracy"]
                cells.append(f"{100 * sel_bits[:sa['n_sel']].mean():.1f} / {held_out:.1f}")
            lines.append(f"| {run_id} | " + " | ".join(cells) + " |")
    for key in cfg.finetuned:
        path = os.path.join(args.results, f"finetune_{key}.json")
        if not os.path.exists(path):
            continue
        rec = json.load(open(path))
        st, n = rec["settings"], rec["settings"]["n_eval"]
        lines.append(f"\n### fine-tuning: {st['network']} `{st['layer']}`, {st['removed']} of {st['filters']} "
                     "removed\n")
        lines.append("| run | before % | after % | CAR minus this, after (points +- SE) | fine-tune s | "
                     "BN stats unchanged |")
        lines.append("| --- | ---: | ---: | ---: | ---: | --- |")
        car = rec["runs"].get("car")
        for run_id, run in rec["runs"].items():
            diff = ""
            if car is not None and run_id not in ("car", "unpruned"):
                d, se = _paired(unpack(car["after_bits"], n), unpack(run["after_bits"], n))
                diff = f"{d:+.2f} +- {se:.2f}"
            lines.append(f"| {run_id} | {100 * run['before_accuracy']:.2f} | {100 * run['after_accuracy']:.2f} | "
                         f"{diff} | {run['finetune_seconds']:.0f} | {run['bn_statistics_unchanged']} |")
    cpath = os.path.join(args.results, "colour_alexnet_conv1.json")
    if os.path.exists(cpath):
        col = json.load(open(cpath))
        lines.append(f"\n### colour selectivity, AlexNet conv1 (index: {col['index_source']}; median "
                     f"{col['median']:.3f}, mean {col['mean_index_all']:.3f})\n")
        lines.append(f"| run | colour-selective among first {col['first']} removed | P(>= that by chance) | "
                     "mean index of those | Spearman(removal position, index) |")
        lines.append("| --- | ---: | ---: | ---: | ---: |")
        for run_id, r in col["runs"].items():
            lines.append(f"| {run_id} | {r['selective_among_first']} | {r['p_at_least_this_many_by_chance']:.3f} | "
                         f"{r['mean_index_first']:.3f} | {r['spearman_removal_position_vs_index']:+.2f} |")
        car = col["runs"].get("car", {})
        if "spearman_car_vs_index" in car:
            lines.append(f"\nSpearman(single-filter CAR of the unpruned layer, colour index): "
                         f"{car['spearman_car_vs_index']:+.2f}; chance expectation "
                         f"{col['random_expectation']:.1f} of {col['first']}.")
    text = "\n".join(lines)
    with open(os.path.join(args.results, "summary.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return text


# ---- main ----------------------------------------------------------------------------------------------
def _wanted(stage: str, cfg: Config) -> bool:
    """Whether a stage of a group runs under ``cfg`` (its layer is in the configuration)."""
    kind, _, key = stage.partition(":")
    if kind == "carstep":
        return key in cfg.layers and key in dict(cfg.carstep)
    if kind in ("prune", "carsel", "selacc"):
        return key in cfg.layers
    if kind == "finetune":
        return key in cfg.layers and key in cfg.finetuned
    if kind == "colour":
        return "alexnet_conv1" in cfg.layers
    return True


def expand(stages: list[str], cfg: Config) -> list[str]:
    out = []
    for s in stages:
        if s == "all":
            out += expand(["alexnet", "resnet56", "extra", "report"], cfg)
        elif s in GROUPS:
            out += [t for t in GROUPS[s] if _wanted(t, cfg)]
        else:
            out.append(s)
    valid = ({f"{kind}:{k}" for k in LAYERS for kind in ("prune", "carsel", "carstep", "finetune", "selacc")} |
             {"colour", "figures", "summary"})
    bad = [s for s in out if s not in valid]
    if bad:
        raise SystemExit(f"{_FN}: unknown stage(s) {bad}; valid: {sorted(valid)}, groups {sorted(GROUPS)}, all")
    return out


def resolve_data(args) -> None:
    """Fill in the default data and weight paths (``../shared/data`` beside the repository, else what
    carfast bundles) and say which are used."""
    from importlib import resources
    if args.test is None:
        shared = os.path.join(SHARED, "cifar10", "test.npz")
        if os.path.isfile(shared):
            args.test = shared
        else:
            with resources.as_file(resources.files("carfast.assets") / "cifar10_test_2000.npz") as path:
                args.test = os.fspath(path)
            log(f"no {shared}: using carfast's bundled 2,000-image CIFAR-10 slice (1,000 images per half; pass "
                "--test for the full test set)")
    if args.train is None:
        args.train = os.path.join(SHARED, "cifar10", "train_jpegq75.npz")
    if args.alexnet is None:
        shared = os.path.join(SHARED, "models", "alexnet_cifar.pt")
        if os.path.isfile(shared):
            args.alexnet = shared
        else:
            log(f"no {shared}: using the AlexNet-style weights bundled with carfast")
    for option, path in (("--test", args.test), ("--alexnet", args.alexnet)):
        if path is not None and not os.path.isfile(path):
            raise SystemExit(f"{_FN}: {option} {path}: no such file")
    log(f"test images: {args.test}; AlexNet weights: {args.alexnet or 'bundled with carfast'}; training set: "
        f"{args.train}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", nargs="+", default=["all"],
                   help="stages to run, in order: prune:<layer>, finetune:<layer>, colour, figures, summary; "
                        "groups: alexnet, resnet56, report, all (default). Layers: " + ", ".join(LAYERS))
    p.add_argument("--quick", action="store_true", help="a 1-2 minute smoke run (tiny data; results in results/quick)")
    p.add_argument("--test", default=None,
                   help="CIFAR-10 test.npz (x, y) (default: ../shared/data/cifar10/test.npz beside the repository if "
                        "present, else the 2,000-image slice bundled with carfast)")
    p.add_argument("--train", default=None,
                   help="JPEG training set for the fine-tuning stages (default: "
                        "../shared/data/cifar10/train_jpegq75.npz beside the repository)")
    p.add_argument("--alexnet", default=None,
                   help="AlexNet-style weights (default: ../shared/data/models/alexnet_cifar.pt beside the "
                        "repository if present, else the weights bundled with carfast)")
    p.add_argument("--results", default=None, help="folder for the JSON (default experiments/results[/quick])")
    p.add_argument("--figures", default=None, help="folder for the PNGs (default experiments/figures[/quick results])")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    p.add_argument("--fresh", action="store_true", help="ignore saved stage JSON and start the stages anew")
    args = p.parse_args(argv)
    resolve_data(args)
    torch.set_num_threads(args.threads)
    environment()
    cfg = QUICK if args.quick else Config()
    default_results = os.path.join(HERE, "results", "quick") if args.quick else os.path.join(HERE, "results")
    args.results = args.results or default_results
    if args.figures is None:
        args.figures = os.path.join(args.results, "figures") if args.quick else os.path.join(HERE, "figures")
    os.makedirs(args.results, exist_ok=True)
    stages = expand(args.stage, cfg)
    if any(s.startswith("finetune") for s in stages) and not os.path.isfile(args.train):
        raise SystemExit(f"{_FN}: the fine-tuning stages need the training set; {args.train}: no such file (pass "
                         "--train, see ../shared/data/README.md for the format)")
    log(f"stages: {stages}; config: {asdict(cfg)}")
    needs_data = ("prune", "carsel", "carstep", "finetune", "selacc")
    data = Data(args.test) if any(s.startswith(needs_data) for s in stages) else None
    t_all = time.perf_counter()
    for s in stages:
        t0 = time.perf_counter()
        kind, _, key = s.partition(":")
        if kind in ("prune", "carsel", "carstep"):
            stage_prune(key, cfg, data, args, variant=kind)
        elif kind == "finetune":
            stage_finetune(key, cfg, data, args)
        elif kind == "selacc":
            stage_selacc(key, cfg, data, args)
        elif kind == "colour":
            stage_colour(cfg, args)
        elif kind == "figures":
            stage_figures(cfg, args)
        elif kind == "summary":
            stage_summary(cfg, args)
        dt = time.perf_counter() - t0
        # one entry per invocation: a resumed stage that had nothing left to do adds a short one
        tpath = os.path.join(args.results, f"timing_{s.replace(':', '_')}.json")
        rec = _load(tpath) or {"stage": s, "invocations": []}
        if "invocations" not in rec:        # the one-invocation layout of the first recorded run
            rec = {"stage": s, "invocations": [{k: v for k, v in rec.items() if k != "stage"}]}
        rec["invocations"].append({"seconds": dt, "threads": args.threads, "load_avg_at_end": list(os.getloadavg()),
                                   "finished": datetime.datetime.now().isoformat(timespec="seconds")})
        write_json_atomic(tpath, rec)
        log(f"stage {s} done in {dt:.0f} s")
    log(f"all stages done in {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
