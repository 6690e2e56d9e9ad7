"""Coverage of the model zoos: score sampled conv layers of torchvision and timm models, compare each
scored filter with its physical deletion.

    bash ../shared/tools/zoo-venv.sh            # torchvision + timm beside the CPU torch: .zoo-venv
    .zoo-venv/bin/python benchmarks/zoo.py [--per-model 4] [--filters 4] [--models tv:resnet50,timm:dla34]
                                           [--torch-pruning]

For each model (random weights, BatchNorm statistics and affine parameters randomised so they matter;
nothing can be downloaded here) it asks ``carfast.graph.layers`` what carfast can do with each Conv2d, samples
``--per-model`` of them (seeded), and for each sampled layer:

- scores it (``score_layer``, or ``score_group`` where its channels are coupled) on ``--images`` images,
  per image;
- for ``--filters`` of its filters (the first, the last and seeded others) deletes that one filter
  physically (``remove_filters`` / ``remove_groups``) and compares the pruned network's top-1 and loss,
  image by image, with the score (top-1 equal except at near ties; summed loss within 1e-3 relative).
  A layer feeding a grouped conv cannot lose a single filter (the conv's groups would be unequal):
  there the comparison is with the removal run on the whole unpruned network instead (``graph.apply``).
- with ``--torch-pruning``, also deletes each of those filters with Torch-Pruning's dependency graph (an
  independent implementation) where its group has carfast's producers, and counts where that deletion
  agrees with carfast's. Torch-Pruning is a second opinion, not the reference: where the two disagree,
  a network built by hand decides (tests/test_hand_deletion.py; Torch-Pruning 1.6.1 is wrong on a
  selective-kernel attention, which it deletes as if the paths were interleaved).

The tolerances hold in chaotic networks too: with random weights some (RepVGG) reach logits of 1e4-1e5,
where float32 rounding moves a loss sum by about 1e-7 relative, far inside 1e-3 (a missing reader, the
one defect found so far, moved it by 6e-4 in float64).

Each layer ends as "exact", "mismatch" (the score and the deletion differ, or the deletion fails),
"refused" (carfast cannot follow an op: the message names it) or one of the kinds of "undefined" (no
network can have that one filter removed): "fixed-size split" (the forward splits or reshapes its
channels by a size it does not recompute: Res2Net, DPN, a selective kernel's split input), "channel
shuffle" (its channels cross a shuffle), "output layer" (it makes the logits); a layer feeding a grouped
conv is compared as said above. Prints the table, every refusal with its reason, and writes JSON
(``--json``).
"""
from __future__ import annotations

import argparse
import random
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import describe_environment, environment, write_json_atomic  # noqa: E402
from torch import nn  # noqa: E402

import carfast  # noqa: E402
from carfast.graph import analyze, from_recording  # noqa: E402
from carfast.graph.apply import applied  # noqa: E402
from carfast.graph.masking import keep_mask  # noqa: E402

TORCHVISION = ("resnet50", "densenet121", "googlenet", "squeezenet1_1", "shufflenet_v2_x1_0", "mobilenet_v3_large",
               "efficientnet_b0", "regnet_y_400mf", "convnext_tiny", "mnasnet1_0")
TIMM = ("efficientnet_b0", "mobilenetv3_large_100", "ghostnet_100", "cspresnet50", "resnest14d", "dla34",
        "densenet121", "convnext_atto", "repvgg_a0", "skresnet18", "res2net50_14w_8s", "dpn68")
MODELS = tuple(f"tv:{m}" for m in TORCHVISION) + tuple(f"timm:{m}" for m in TIMM)
#: FlowError reasons that say no network can have the filter removed (not a gap of carfast's): the result
#: each gives a layer
UNDEFINED = {"sizes": "fixed-size split", "spread": "channel shuffle", "output": "output layer"}
RESULTS = ("exact", *UNDEFINED.values(), "refused", "mismatch")


def build(spec: str, seed: int) -> nn.Module:
    """A zoo model with random weights and randomised BatchNorm statistics, in eval mode."""
    src, name = spec.split(":")
    torch.manual_seed(seed)
    if src == "tv":
        import torchvision
        kw = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
        model = getattr(torchvision.models, name)(num_classes=10, **kw)
    else:
        import timm
        model = timm.create_model(name, num_classes=10)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=g) * 0.2)
    return model.eval()


def make_data(model: nn.Module, n: int, size: int, seed: int):
    """Seeded images and labels: the model's own prediction for two thirds of them, random for the rest."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    flip = torch.arange(n) % 3 == 2
    y[flip] = torch.randint(0, 10, (int(flip.sum()),), generator=g)
    return x, y


def _near_tie(logits: torch.Tensor) -> torch.Tensor:
    top = logits.topk(2, 1).values
    return (top[:, 0] - top[:, 1]) < 1e-4 * logits.abs().amax(1).clamp(min=1)


def _removed_logits(model, name, unit, x, group: bool):
    """Logits of the unpruned model with the unit removed where it is read (``graph.apply``)."""
    with torch.no_grad():
        flow = analyze(model, name, x[:1], "zoo", group=group, graph=from_recording(model, x[:1]), cut_checks=False)
        with applied(model, flow, keep_mask(None, [unit], flow.num_units, x.device)):
            return model(x)


def _agrees(logits, y, correct, loss_sum) -> tuple[int, float]:
    """(images whose top-1 differs from ``correct`` outside near ties, relative loss difference)."""
    diff = ((logits.argmax(1) == y) != correct) & ~_near_tie(logits)
    loss = float(F.cross_entropy(logits.double(), y, reduction="sum"))
    return int(diff.sum()), abs(loss - float(loss_sum)) / max(1.0, abs(loss))


def _torch_pruning_logits(model, name, channels, x, producers):
    """Logits after Torch-Pruning deletes ``channels`` of layer ``name`` (its dependency graph on a copy);
    None where its group's producers are not ``producers`` (carfast's): then it deletes something else."""
    import copy

    import torch_pruning as tp
    work = copy.deepcopy(model)
    with warnings.catch_warnings():         # its notes on parameters it finds unwrapped (layer scales)
        warnings.simplefilter("ignore", UserWarning)
        dg = tp.DependencyGraph().build_dependency(work, example_inputs=x[:1])
    group = dg.get_pruning_group(work.get_submodule(name), tp.prune_conv_out_channels, idxs=channels)
    theirs = sorted({dg._module2name[d.target.module] for d, _ in group if dg.is_out_channel_pruning_fn(d.handler)
                     and _plain(d.target.module)} | {name})
    if theirs != producers:
        return None
    group.prune()
    with torch.no_grad():
        return work(x)


def _plain(m: nn.Module) -> bool:
    """A Linear or an ungrouped Conv2d (a depthwise conv on the channels' way is per-channel to carfast, a
    producer to Torch-Pruning: the same deletion, so neither side counts it)."""
    return isinstance(m, nn.Linear) or isinstance(m, nn.Conv2d) and m.groups == 1


def check_layer(model, info, x, y, n_filters: int, rng: random.Random, torch_pruning: bool = False) -> dict:
    """Score one layer and compare ``n_filters`` of its filters with their physical deletion."""
    group = info.status == "group"
    units = list(range(info.units))
    picks = sorted({units[0], units[-1], *rng.sample(units, min(n_filters, len(units)))})[:max(n_filters, 2)]
    score = carfast.score_group if group else carfast.score_layer
    remove = carfast.remove_groups if group else carfast.remove_filters
    t0 = time.perf_counter()
    res = score(model, info.name, (x, y), filters=picks, per_image=True, progress=False)
    seconds = time.perf_counter() - t0
    worst, by, tp_rows = 0.0, "deletion", []
    flow = analyze(model, info.name, x[:1], "zoo", group=group, cut_checks=False) if torch_pruning else None
    for i, k in enumerate(picks):
        try:
            pruned = remove(model, {info.name: [k]}, example=x[:1])
            with torch.no_grad():
                logits = pruned(x)
        except ValueError as err:
            if "equal groups" not in str(err):
                raise
            logits, by = _removed_logits(model, info.name, k, x, group), "removal on the unpruned network"
        except RuntimeError as err:     # surgery's own check: the pruned network does not compute the removal
            return {"result": "mismatch", "filter": k, "why": f"deletion failed: {err}", "method": res.method,
                    "seconds": seconds}
        images, rel = _agrees(logits, y, res.image_correct[i], res.loss_sum[i])
        worst = max(worst, rel)
        if images or rel > 1e-3:
            return {"result": "mismatch", "filter": k, "images": images, "loss_rel": rel,
                    "method": res.method, "seconds": seconds}
        if flow is not None:
            tp_rows.append(_compare_torch_pruning(model, info, flow, k, x, y, res, i))
    row = {"result": "exact", "filters": picks, "loss_rel": worst, "method": res.method, "compared_with": by,
           "seconds": seconds}
    if tp_rows:
        row["torch_pruning"] = ("agrees" if all(r == "agrees" for r in tp_rows) else
                                next(r for r in tp_rows if r != "agrees"))
    return row


def _compare_torch_pruning(model, info, flow, k, x, y, res, i) -> str:
    """What Torch-Pruning's deletion of unit ``k`` gives against the score: "agrees", "differs", "other group"
    (its group has other producers) or "fails (why)"."""
    channels = (flow.unit_of == k).nonzero().flatten().tolist()
    producers = sorted({p.op.name for p in flow.producers if _plain(p.op.target)} | {info.name})
    try:
        logits = _torch_pruning_logits(model, info.name, channels, x, producers)
    except Exception as err:  # noqa: BLE001 - Torch-Pruning may fail on any op it does not know
        return f"fails ({type(err).__name__}: {str(err).splitlines()[0][:80] if str(err) else ''})"
    if logits is None:
        return "other group"
    images, rel = _agrees(logits, y, res.image_correct[i], res.loss_sum[i])
    return "agrees" if not images and rel <= 1e-3 else "differs"


def run_model(spec: str, args, listing: dict) -> list[dict]:
    model = build(spec, args.seed)
    x, y = make_data(model, args.images, args.size, args.seed)
    infos = [i for i in carfast.layers(model, example=x[:1]) if i.type == "Conv2d"]
    kinds = [_kind(i) for i in infos]
    listing[spec] = {"alone": sum(i.status == "layer" for i in infos), "group": sum(i.status == "group" for i in infos),
                     **{kind: kinds.count(kind) for kind in (*UNDEFINED.values(), "refused")},
                     "why": {kind: next(i.reason for i, k in zip(infos, kinds) if k == kind)
                             for kind in dict.fromkeys(kinds) if kind is not None}}
    rng = random.Random(f"{spec}-{args.seed}")
    sample = infos if args.per_model <= 0 else rng.sample(infos, min(args.per_model, len(infos)))
    rows = []
    for info in sample:
        row = {"model": spec, "layer": info.name, "status": info.status, "units": info.units}
        if info.status == "refused":
            row.update(result=_kind(info), why=info.reason)
        else:
            try:
                row.update(check_layer(model, info, x, y, args.filters, rng, args.torch_pruning))
            except ValueError as err:      # a refusal the layer listing did not foresee
                row.update(result="refused", why=str(err))
        rows.append(row)
        extra = f" [Torch-Pruning: {row['torch_pruning']}]" if "torch_pruning" in row else ""
        print(f"  {spec:28s} {info.name:40s} {info.status:7s} {row['result']:16s} "
              f"{row.get('why', row.get('method', ''))[:110]}{extra}", flush=True)
    return rows


def _kind(info) -> str | None:
    """The result a refused layer gets (``RESULTS``); None for a layer carfast scores."""
    if info.status != "refused":
        return None
    return UNDEFINED.get(info.reason_tag, "refused")


def summarise(rows: list[dict]) -> str:
    tp = any("torch_pruning" in r for r in rows)
    head = ["model", "sampled", "exact (alone / group)", *UNDEFINED.values(), "refused", "mismatch"] + \
        (["Torch-Pruning agrees"] if tp else [])
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    total = dict.fromkeys((*RESULTS, "n", "alone", "tp", "tp_of"), 0)
    for model in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == model]
        c = {k: sum(r["result"] == k for r in rs) for k in RESULTS}
        c.update(n=len(rs), alone=sum(r["result"] == "exact" and r["status"] == "layer" for r in rs),
                 tp=sum(r.get("torch_pruning") == "agrees" for r in rs), tp_of=sum("torch_pruning" in r for r in rs))
        lines.append(_row(model, c, tp))
        for k in total:
            total[k] += c[k]
    lines.append(_row("**all**", total, tp))
    undefined = sum(total[k] for k in UNDEFINED.values())
    defined = total["n"] - undefined
    lines.append(f"\nCoverage: {total['exact']} of the {defined} sampled layers whose removal is defined score "
                 f"exactly ({100.0 * total['exact'] / max(1, defined):.1f} %); {total['mismatch']} mismatch.")
    refusals = [r for r in rows if r["result"] not in ("exact", "mismatch")]
    if refusals:
        lines += ["", "Every sampled layer not scored, and why:", "", "| model | layer | result | reason |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {r['model']} | {r['layer']} | {r['result']} | {_short(r['why'])} |" for r in refusals]
    differs = [r for r in rows if r.get("torch_pruning", "agrees") != "agrees"]
    if differs:
        lines += ["", "Where Torch-Pruning's deletion is not carfast's:", ""]
        lines += [f"- {r['model']} {r['layer']}: {r['torch_pruning']}" for r in differs]
    return "\n".join(lines)


def _row(name: str, c: dict, tp: bool) -> str:
    cells = [name, str(c["n"]), f"{c['exact']} ({c['alone']} / {c['exact'] - c['alone']})",
             *(str(c[k]) for k in UNDEFINED.values()), str(c["refused"]), str(c["mismatch"])]
    return "| " + " | ".join(cells + ([f"{c['tp']} of {c['tp_of']}"] if tp else [])) + " |"


def _short(reason: str, n: int = 220) -> str:
    reason = " ".join(reason.split()).replace("|", "/")
    return reason if len(reason) <= n else reason[:n - 3] + "..."


def summarise_listing(listing: dict) -> str:
    """Every conv layer of every model, as ``carfast.graph.layers`` classifies it (no scoring)."""
    keys = ("alone", "group", *UNDEFINED.values(), "refused")
    lines = ["All conv layers (carfast.graph.layers, not scored):", "",
             "| model | conv layers | " + " | ".join(keys) + " |", "| --- |" + " ---: |" * (len(keys) + 1)]
    total = dict.fromkeys(keys, 0)
    for model, c in listing.items():
        lines.append(f"| {model} | {sum(c[k] for k in keys)} | " + " | ".join(str(c[k]) for k in keys) + " |")
        for k in keys:
            total[k] += c[k]
    lines.append(f"| **all** | {sum(total.values())} | " + " | ".join(str(total[k]) for k in keys) + " |")
    lines += ["", "One reason of each kind, per model:", ""]
    lines += [f"- {model}, {kind}: {_short(why, 200)}" for model, c in listing.items()
              for kind, why in c["why"].items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated tv:<name> / timm:<name>")
    p.add_argument("--per-model", type=int, default=4, help="conv layers sampled per model (0: all)")
    p.add_argument("--filters", type=int, default=4, help="filters per layer compared with their deletion")
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--size", type=int, default=64, help="input height and width")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--torch-pruning", action="store_true",
                   help="also delete each compared filter with Torch-Pruning (a second, independent deletion)")
    p.add_argument("--json", default=None, help="write the rows and the environment here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment()
    print(describe_environment(env))
    rows, listing = [], {}
    t0 = time.perf_counter()
    for spec in args.models.split(","):
        rows += run_model(spec.strip(), args, listing)
    print()
    print(summarise(rows))
    print()
    print(summarise_listing(listing))
    print(f"\n{time.perf_counter() - t0:.0f} s")
    if args.json:
        write_json_atomic(args.json, {"environment": env, "args": vars(args), "rows": rows, "listing": listing})
    return 1 if any(r["result"] == "mismatch" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
