"""Coverage of the model zoos: score sampled conv layers of torchvision and timm models, compare each
scored filter with carfast's own physical deletion.

    bash ../shared/tools/zoo-venv.sh            # torchvision + timm beside the CPU torch: .zoo-venv
    .zoo-venv/bin/python benchmarks/zoo.py [--per-model 4] [--filters 4] [--models tv:resnet50,timm:dla34]

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

Each layer ends as "exact", "mismatch", "refused" (carfast cannot follow an op: the message names it)
or "undefined" (no network can have that one filter removed: the layer makes the logits, its channels
cross a channel shuffle, the forward selects channels by sizes it does not recompute, or it feeds a
grouped conv). Prints the table and writes JSON (``--json``).
"""
from __future__ import annotations

import argparse
import random
import sys
import time
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
        "densenet121", "convnext_atto")
MODELS = tuple(f"tv:{m}" for m in TORCHVISION) + tuple(f"timm:{m}" for m in TIMM)
#: FlowError reasons that say no network can have the filter removed (not a gap of carfast's)
UNDEFINED = {"output": "makes the logits", "spread": "channels cross a channel shuffle",
             "sizes": "forward selects channels by fixed sizes"}


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


def check_layer(model, info, x, y, n_filters: int, rng: random.Random) -> dict:
    """Score one layer and compare ``n_filters`` of its filters with their physical deletion."""
    group = info.status == "group"
    units = list(range(info.units))
    picks = sorted({units[0], units[-1], *rng.sample(units, min(n_filters, len(units)))})[:max(n_filters, 2)]
    score = carfast.score_group if group else carfast.score_layer
    remove = carfast.remove_groups if group else carfast.remove_filters
    t0 = time.perf_counter()
    res = score(model, info.name, (x, y), filters=picks, per_image=True, progress=False)
    seconds = time.perf_counter() - t0
    worst, by = 0.0, "deletion"
    for i, k in enumerate(picks):
        try:
            pruned = remove(model, {info.name: [k]}, example=x[:1])
            with torch.no_grad():
                logits = pruned(x)
        except ValueError as err:
            if "equal groups" not in str(err):
                raise
            logits, by = _removed_logits(model, info.name, k, x, group), "removal on the unpruned network"
        ok = logits.argmax(1) == y
        diff = (ok != res.image_correct[i]) & ~_near_tie(logits)
        loss = F.cross_entropy(logits.double(), y, reduction="sum")
        rel = abs(float(loss) - float(res.loss_sum[i])) / max(1.0, abs(float(loss)))
        worst = max(worst, rel)
        if bool(diff.any()) or rel > 1e-3:
            return {"result": "mismatch", "filter": k, "images": int(diff.sum()), "loss_rel": rel,
                    "method": res.method, "seconds": seconds}
    return {"result": "exact", "filters": picks, "loss_rel": worst, "method": res.method, "compared_with": by,
            "seconds": seconds}


def run_model(spec: str, args, listing: dict) -> list[dict]:
    model = build(spec, args.seed)
    x, y = make_data(model, args.images, args.size, args.seed)
    infos = [i for i in carfast.layers(model, example=x[:1]) if i.type == "Conv2d"]
    listing[spec] = {"alone": sum(i.status == "layer" for i in infos), "group": sum(i.status == "group" for i in infos),
                     "undefined": sum(i.status == "refused" and i.reason_tag in UNDEFINED for i in infos),
                     "refused": sum(i.status == "refused" and i.reason_tag not in UNDEFINED for i in infos),
                     "why": sorted({UNDEFINED.get(i.reason_tag, i.reason) for i in infos if i.status == "refused"})}
    rng = random.Random(f"{spec}-{args.seed}")
    sample = infos if args.per_model <= 0 else rng.sample(infos, min(args.per_model, len(infos)))
    rows = []
    for info in sample:
        row = {"model": spec, "layer": info.name, "status": info.status, "units": info.units}
        if info.status == "refused":
            undefined = UNDEFINED.get(info.reason_tag)
            row.update(result="undefined" if undefined else "refused", why=undefined or info.reason)
        else:
            try:
                row.update(check_layer(model, info, x, y, args.filters, rng))
            except ValueError as err:      # a refusal the layer listing did not foresee
                row.update(result="refused", why=str(err))
        rows.append(row)
        print(f"  {spec:28s} {info.name:40s} {info.status:7s} {row['result']:9s} "
              f"{row.get('why', row.get('method', ''))[:110]}", flush=True)
    return rows


def summarise(rows: list[dict]) -> str:
    lines = ["| model | sampled | exact (alone / group) | undefined | refused | mismatch |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    total = {"n": 0, "exact": 0, "alone": 0, "undefined": 0, "refused": 0, "mismatch": 0}
    for model in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == model]
        c = {k: sum(r["result"] == k for r in rs) for k in ("exact", "undefined", "refused", "mismatch")}
        alone = sum(r["result"] == "exact" and r["status"] == "layer" for r in rs)
        lines.append(f"| {model} | {len(rs)} | {c['exact']} ({alone} / {c['exact'] - alone}) | {c['undefined']} | "
                     f"{c['refused']} | {c['mismatch']} |")
        total["n"] += len(rs)
        total["alone"] += alone
        for k in c:
            total[k] += c[k]
    defined = total["n"] - total["undefined"]
    lines.append(f"| **all** | {total['n']} | {total['exact']} ({total['alone']} / {total['exact'] - total['alone']}) "
                 f"| {total['undefined']} | {total['refused']} | {total['mismatch']} |")
    lines.append(f"\nCoverage: {total['exact']} of the {defined} sampled layers whose removal is defined score "
                 f"exactly ({100.0 * total['exact'] / max(1, defined):.1f} %); {total['mismatch']} mismatch.")
    return "\n".join(lines)


def summarise_listing(listing: dict) -> str:
    """Every conv layer of every model, as ``carfast.graph.layers`` classifies it (no scoring)."""
    lines = ["All conv layers (carfast.graph.layers, not scored):", "",
             "| model | conv layers | alone | group | undefined | refused |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    keys = ("alone", "group", "undefined", "refused")
    total = dict.fromkeys(keys, 0)
    for model, c in listing.items():
        lines.append(f"| {model} | {sum(c[k] for k in keys)} | " + " | ".join(str(c[k]) for k in keys) + " |")
        for k in keys:
            total[k] += c[k]
    lines.append(f"| **all** | {sum(total.values())} | " + " | ".join(str(total[k]) for k in keys) + " |")
    why = sorted({w for c in listing.values() for w in c["why"]})
    return "\n".join(lines + ["", "Refusal reasons: " + "; ".join(w[:160] for w in why)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated tv:<name> / timm:<name>")
    p.add_argument("--per-model", type=int, default=4, help="conv layers sampled per model (0: all)")
    p.add_argument("--filters", type=int, default=4, help="filters per layer compared with their deletion")
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--size", type=int, default=64, help="input height and width")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
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
