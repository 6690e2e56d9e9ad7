"""Benchmark ``carfast.score_layer`` against the naive re-run and Captum on the pretrained ResNet-56.

    python benchmarks/bench_score_layer.py [--n N] [--layers ...] [--providers ...] [--out FILE] [--memory]

For each layer (default layer1.0.conv1, layer2.4.conv1, layer3.8.conv1; the consumer is the block's
conv2) and each provider, on the same images in one run:

* naive   every filter k: a forward pre-hook on the consumer zeroes input channel k (on a clone) and the
          whole model runs over the data in batches of 128 under ``torch.inference_mode``. By default only
          a few evenly spaced filters are run (``--naive-filters``) and the time is extrapolated linearly
          (one full pass per filter): t_naive = t_forward (the intact pass) + K x median per-filter pass.
* captum  Captum's ``LayerFeatureAblation`` on the consumer's input, one feature per channel, baseline 0,
          ``perturbations_per_eval=8``, forward = per-image correctness; on ``--captum-images`` images
          (batches of ``--captum-batch``), the time extrapolated linearly to all images.
* torch / cpu   ``carfast.score_layer(model, layer, (x, y), backend=...)`` for all filters, end to end
          (cold); and warm: ``LayerScorer(...).prepare()`` caches the prefix, then ``score()`` is timed.
* cpu-bf16      the same with ``precision="bf16"`` (suffix in bf16, small-margin pairs re-run in fp32).

``t_forward`` (one plain forward of the model over the data, batches of 128) is the prefix-cost floor.
The scoring-only column is carfast's warm ``score()`` (measured) and, for naive and Captum, their time
minus ``t_forward``: the part that repeats at every greedy pruning step.
Every provider's per-image accuracy drops are checked against every other's on the (filter, image)
pairs both ran; a disagreement that is not a near tie (top-2 logits within ``--tie-rel``) is a MISMATCH.

``--memory`` also scores layer1.0.conv1 on all the images with ``memory_budget=2 GiB`` in a subprocess
and reports its peak RSS increase against the 3 GiB (budget + 1 GiB) target.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the naive reference

import common  # noqa: E402
import torch  # noqa: E402
from common import GIB, fmt_rate, fmt_seconds, fmt_x  # noqa: E402
from naive import margin_of, naive_logits, near_tie  # noqa: E402

import carfast  # noqa: E402

#: layer -> (consumer, target speedup over naive, default number of naive filters)
CASES = {
    "layer1.0.conv1": ("layer1.0.conv2", 2.0, 4),
    "layer2.4.conv1": ("layer2.4.conv2", 4.0, 4),
    "layer3.8.conv1": ("layer3.8.conv2", 500.0, 8),
}
NAIVE_BATCH = 128          # the naive method's best batch size on the benchmark CPU
MEMORY_LAYER = "layer1.0.conv1"
MEMORY_BUDGET = 2 * GIB
MIN_SCORING_S = 1e-3       # clip for the scoring-only estimate
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "score_layer.json"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- the case ----------------------------------------------------------------------------------

@dataclass
class ScoreLayerCase:
    """Everything one (layer) run needs; built by ``setup_score_layer``, shared by speed and memory runs."""
    model: torch.nn.Module
    layer: str
    consumer_name: str
    consumer: torch.nn.Module
    num_filters: int
    x: torch.Tensor
    y: torch.Tensor
    data_source: str
    target: float | None
    naive_filters_default: int

    @property
    def n(self) -> int:
        return int(self.y.numel())


def consumer_of(layer: str) -> str:
    if layer in CASES:
        return CASES[layer][0]
    if layer.endswith(".conv1"):          # any ResNet block: conv1 feeds conv2
        return layer[: -len("conv1")] + "conv2"
    raise SystemExit(f"bench_score_layer: don't know the consumer of {layer!r}; use a block's conv1 "
                     f"(layerS.B.conv1), e.g. {', '.join(CASES)}")


def setup_score_layer(layer: str, data: str | None, n: int | None, loaded=None) -> ScoreLayerCase:
    """The pretrained ResNet-56 and the CIFAR-10 images; ``loaded`` = (model, x, y, source) to reuse."""
    if loaded is None:
        model = carfast.models.cifar_resnet(56).eval()
        x, y, src = common.load_cifar10(data, n)
    else:
        model, x, y, src = loaded
    modules = dict(model.named_modules())
    cname = consumer_of(layer)
    if layer not in modules or cname not in modules:
        raise SystemExit(f"bench_score_layer: ResNet-56 has no module {layer if layer not in modules else cname!r}")
    _, target, nf = CASES.get(layer, (cname, None, 4))
    return ScoreLayerCase(model, layer, cname, modules[cname], modules[layer].out_channels, x, y, src, target, nf)


# ---- providers ---------------------------------------------------------------------------------

def forward_logits(model, x: torch.Tensor, batch: int = NAIVE_BATCH) -> torch.Tensor:
    """[N, C] logits of one plain pass over ``x`` in batches."""
    with torch.inference_mode():
        return torch.cat([model(x[s:s + batch]) for s in range(0, x.shape[0], batch)])


def ablated_logits(case: ScoreLayerCase, k: int, x: torch.Tensor, batch: int = NAIVE_BATCH) -> torch.Tensor:
    """[n, C] logits of the whole model with filter k removed: the naive reference of tests/naive.py."""
    return naive_logits(case.model, {case.consumer_name: 1}, x, k, batch_size=batch)


@dataclass
class Run:
    """One provider's result on one layer: timing plus per-image accuracy drops for the checks."""
    provider: str
    status: str = "ok"                 # ok | skipped | error
    reason: str = ""
    seconds: float | None = None       # end to end over all N images and all K filters
    extrapolated: bool = False
    note: str = ""
    timing: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    filters: list = field(default_factory=list)    # filters with per-image drops
    n_images: int = 0                               # drops cover images [0, n_images)
    drop: torch.Tensor | None = None                # [len(filters), n_images] int8: base_correct - correct


def run_naive(case: ScoreLayerCase, base_correct: torch.Tensor, t_forward: float, m: int) -> Run:
    K = case.num_filters
    m = K if m <= 0 or m >= K else m
    filters = sorted(set(torch.linspace(0, K - 1, m).round().long().tolist()))
    times, drops = [], []
    for i, k in enumerate(filters):
        t0 = time.perf_counter()
        logits = ablated_logits(case, k, case.x)
        correct = logits.argmax(1) == case.y
        times.append(time.perf_counter() - t0)
        drops.append(base_correct.to(torch.int8) - correct.to(torch.int8))
        log(f"  naive filter {k} ({i + 1}/{len(filters)}): {times[-1]:.2f} s")
    per_filter = float(torch.tensor(times).median()) if len(filters) < K else None
    total = t_forward + (K * per_filter if per_filter is not None else sum(times))
    run = Run("naive", seconds=total, extrapolated=len(filters) < K, filters=filters, n_images=case.n,
              drop=torch.stack(drops), timing={"per_filter_s": times, "t_forward_s": t_forward})
    run.note = (f"extrapolated from {len(filters)} of {K} filters: t_forward + {K} x median per-filter pass "
                f"({per_filter:.3g} s)" if run.extrapolated else f"all {K} filters run")
    return run


def run_captum(case: ScoreLayerCase, n_images: int, batch: int, ppe: int) -> Run:
    from captum.attr import LayerFeatureAblation

    model, C = case.model, case.consumer.in_channels
    mask = torch.arange(C).view(1, C, 1, 1)           # one feature per input channel of the consumer

    def correct(x, y):                                 # per-image correctness, float 1/0
        return (model(x).argmax(1) == y).float()

    ablator = LayerFeatureAblation(correct, case.consumer)

    def attribute(x, y):
        a = ablator.attribute(x, layer_baselines=0.0, additional_forward_args=(y,), layer_mask=mask,
                              attribute_to_layer_input=True, perturbations_per_eval=ppe)
        return a[:, :, 0, 0]                           # [n, C]: base - ablated correctness per channel

    n_images = min(n_images, case.n) if n_images > 0 else case.n
    attribute(case.x[:2], case.y[:2])                  # warm-up
    t0 = time.perf_counter()
    parts = [attribute(case.x[s:min(s + batch, n_images)], case.y[s:min(s + batch, n_images)])
             for s in range(0, n_images, batch)]
    dt = time.perf_counter() - t0
    attr = torch.cat(parts)                            # [n_images, C]
    if not torch.equal(attr, attr.round()):
        log("  captum: attributions are not whole numbers (expected base - ablated correctness in {-1, 0, 1})")
    run = Run("captum", seconds=dt * case.n / n_images, extrapolated=n_images < case.n,
              filters=list(range(C)), n_images=n_images, drop=attr.round().t().to(torch.int8).contiguous(),
              timing={"measured_s": dt, "measured_images": n_images, "batch": batch,
                      "perturbations_per_eval": ppe})
    run.note = (f"extrapolated from {n_images} of {case.n} images (x {case.n / n_images:.3g})"
                if run.extrapolated else f"all {case.n} images")
    return run


def run_carfast(case: ScoreLayerCase, provider: str, repeat: int, budget_s: float) -> Run:
    backend, precision = common.carfast_provider(provider)

    def call(x, y):
        return carfast.score_layer(case.model, case.layer, (x, y), backend=backend, precision=precision,
                                   progress=False, per_image=True)

    t = common.time_call(lambda: call(case.x, case.y), warmup=lambda: call(case.x[:64], case.y[:64]),
                         repeat=repeat, budget_s=budget_s)
    res = t.result
    drop = res.base_image_correct.to(torch.int8).unsqueeze(0) - res.image_correct.to(torch.int8)
    run = Run(provider, seconds=t.median, filters=res.filters.tolist(), n_images=res.num_images, drop=drop,
              timing=t.to_dict(),
              info={"method": res.method, "backend": res.backend, "pairs_evaluated": res.pairs_evaluated,
                    "pairs_skipped": getattr(res, "pairs_skipped", None),
                    "base_accuracy": res.base_accuracy, "precision": res.precision,
                    "pairs_rechecked": res.pairs_rechecked, "margin_threshold": res.margin_threshold})
    # warm: the layer prepared once (prefix cached), then only the ablations are scored, as in greedy pruning
    scorer = carfast.LayerScorer(case.model, case.layer, (case.x, case.y), backend=backend, precision=precision,
                                 progress=False)
    t_prep = time.perf_counter()
    scorer.prepare()
    t_prep = time.perf_counter() - t_prep
    w = common.time_call(lambda: scorer.score(per_image=True), repeat=repeat, budget_s=budget_s)
    if not torch.equal(w.result.correct, res.correct):
        log(f"MISMATCH: {case.layer} {backend}: cached scores differ from score_layer's")
    run.info.update({"warm_seconds": w.median, "prepare_seconds": t_prep, "cached": scorer.cached})
    rerun = f", {res.pairs_rechecked} pairs re-run in fp32" if res.precision != "fp32" else ""
    run.note = (f"median of {len(t.times)} run(s), {res.method}/{res.backend}/{res.precision}{rerun}; warm: prefix "
                f"{'cached' if scorer.cached else 'NOT cached (budget)'}, prepare {t_prep:.2f} s")
    return run


# ---- exactness checks --------------------------------------------------------------------------

def compare(case: ScoreLayerCase, a: Run, b: Run, base_logits: torch.Tensor, rel: float) -> dict:
    """Per-filter accuracy drops and per-image drops of two providers on the pairs both ran."""
    common_f = [k for k in a.filters if k in set(b.filters)]
    n = min(a.n_images, b.n_images)
    out = {"layer": case.layer, "a": a.provider, "b": b.provider, "filters": len(common_f), "images": n,
           "filters_equal": 0, "filters_differ": [], "image_disagreements": 0, "near_ties": 0,
           "non_tie_disagreements": 0, "examples": []}
    if not common_f or n == 0:
        out["status"] = "nothing in common"
        return out
    ia = torch.tensor([a.filters.index(k) for k in common_f])
    ib = torch.tensor([b.filters.index(k) for k in common_f])
    da, db = a.drop[ia, :n], b.drop[ib, :n]
    sa, sb = da.sum(1, dtype=torch.int64), db.sum(1, dtype=torch.int64)
    for j, k in enumerate(common_f):
        if int(sa[j]) == int(sb[j]):
            out["filters_equal"] += 1
        else:
            out["filters_differ"].append({"filter": k, "drop_images_a": int(sa[j]), "drop_images_b": int(sb[j])})
    diff = (da != db).nonzero().tolist()
    out["image_disagreements"] = len(diff)
    base_tie = near_tie(margin_of(base_logits[:n]), base_logits[:n], rel)
    by_filter: dict[int, list[int]] = {}
    for j, i in diff:
        by_filter.setdefault(common_f[j], []).append(i)
    for k, imgs in by_filter.items():     # judge each disagreement on the reference logits of that image
        idx = torch.tensor(imgs)
        abl = ablated_logits(case, k, case.x[idx])
        tie = base_tie[idx] | near_tie(margin_of(abl), abl, rel)
        out["near_ties"] += int(tie.sum())
        out["non_tie_disagreements"] += int((~tie).sum())
        for i, t in zip(imgs, tie.tolist()):
            if len(out["examples"]) < 10 and not t:
                out["examples"].append({"filter": k, "image": i, "drop_a": int(a.drop[a.filters.index(k), i]),
                                        "drop_b": int(b.drop[b.filters.index(k), i])})
    if out["non_tie_disagreements"]:
        out["status"] = "MISMATCH"
    elif out["image_disagreements"]:
        out["status"] = "equal up to near ties"
    else:
        out["status"] = "equal"
    return out


# ---- memory ------------------------------------------------------------------------------------

def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def memory_child(args) -> None:
    """Runs in the subprocess: score MEMORY_LAYER with a 2 GiB budget, print the RSS figures as JSON."""
    torch.set_num_threads(args.threads)
    case = setup_score_layer(MEMORY_LAYER, args.data, args.n)
    carfast.score_layer(case.model, case.layer, (case.x[:8], case.y[:8]), backend=args.memory_backend,
                        progress=False)           # first-call allocations (fx trace, kernels) out of the way
    rss_before = _status_kib("VmRSS")
    hwm_reset = True
    try:                                           # reset the peak to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        hwm_reset = False
    hwm_before = _status_kib("VmHWM")
    t0 = time.perf_counter()
    res = carfast.score_layer(case.model, case.layer, (case.x, case.y), backend=args.memory_backend,
                              memory_budget=MEMORY_BUDGET, progress=False)
    dt = time.perf_counter() - t0
    hwm_after = _status_kib("VmHWM")
    print(json.dumps({"layer": case.layer, "images": case.n, "budget_bytes": MEMORY_BUDGET,
                      "rss_before_kib": rss_before, "hwm_before_kib": hwm_before, "hwm_after_kib": hwm_after,
                      "hwm_reset": hwm_reset, "seconds": dt, "method": res.method, "backend": res.backend}))


def run_memory(args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", "--threads", str(args.threads),
           "--memory-backend", args.memory_backend]
    cmd += ["--data", args.data if args.data is not None else "bundled"]
    if args.n is not None:
        cmd += ["--n", str(args.n)]
    log(f"memory: {MEMORY_LAYER} with memory_budget=2 GiB in a subprocess ...")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"status": "error", "reason": proc.stderr.strip()[-2000:]}
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    peak = (r["hwm_after_kib"] - r["rss_before_kib"]) * 1024
    target = MEMORY_BUDGET + GIB
    r.update(status="ok", peak_increase_bytes=peak, target_bytes=target, within_target=peak <= target,
             note=("peak reset before scoring (/proc/self/clear_refs)" if r["hwm_reset"] else
                   "peak could not be reset: the figure may include the setup's own peak (an upper bound)"))
    return r


# ---- main --------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Example (quick): python benchmarks/bench_score_layer.py --n 200 "
                                       "--naive-filters 2 --captum-images 64 --repeat 1",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=common.default_data_path(),
                   help=f"CIFAR-10 test.npz (default: {common.SHARED_CIFAR10} if it exists, else carfast's "
                        "bundled 2,000-image slice; 'bundled' picks the slice)")
    p.add_argument("--n", type=int, default=None,
                   help="use the first N images of the data (default: all; 10,000 for the full test set)")
    p.add_argument("--layers", nargs="+", default=list(CASES), metavar="LAYER",
                   help=f"layers to score (default: {' '.join(CASES)})")
    p.add_argument("--providers", nargs="+", default=list(common.PROVIDERS), choices=common.PROVIDERS,
                   metavar="PROVIDER", help=f"providers to run (default: all of {' '.join(common.PROVIDERS)})")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="JSON results file (default: %(default)s)")
    p.add_argument("--memory", action="store_true",
                   help=f"also measure the peak RSS of scoring {MEMORY_LAYER} with memory_budget=2 GiB")
    p.add_argument("--no-speed", action="store_true", help="skip the speed runs (with --memory: memory only)")
    p.add_argument("--naive-filters", type=int, default=None, metavar="M",
                   help="filters the naive provider runs, evenly spaced, its time extrapolated to all "
                        "(default: 4 at layer1/layer2, 8 at layer3; 0 = all filters, no extrapolation)")
    p.add_argument("--captum-images", type=int, default=256, metavar="M",
                   help="images Captum runs on, its time extrapolated to all (default: %(default)s; 0 = all)")
    p.add_argument("--captum-batch", type=int, default=128, help="images per Captum call (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=3,
                   help="timed repeats of the carfast calls and the plain forward, median reported "
                        "(default: %(default)s)")
    p.add_argument("--repeat-budget", type=float, default=60.0, metavar="S",
                   help="stop repeating a measurement once it has taken S seconds (default: %(default)s)")
    p.add_argument("--tie-rel", type=float, default=1e-5,
                   help="a disagreement is a near tie when the top-2 logits are within this fraction of "
                        "max(1, max |logit|) (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: %(default)s)")
    p.add_argument("--memory-backend", default="auto", help="carfast backend of the memory run (default: auto)")
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def rows_for_layer(case, runs, t_forward):
    """Table / JSON rows: seconds, image-ablations per second, speedups over naive."""
    naive = next((r for r in runs if r.provider == "naive" and r.status == "ok"), None)
    K, N = case.num_filters, case.n
    rows = []
    for r in runs:
        row = {"layer": case.layer, "consumer": case.consumer_name, "provider": r.provider, "status": r.status,
               "reason": r.reason, "filters": K, "images": N, "seconds": r.seconds, "extrapolated": r.extrapolated,
               "note": r.note, "t_forward": t_forward, "target_speedup": case.target, "timing": r.timing, **r.info}
        if r.status == "ok":
            # scoring only: carfast's warm score on its cached prefix (measured); others minus t_forward
            scoring = r.info.get("warm_seconds", r.seconds - t_forward)
            row["scoring_seconds"] = max(scoring, MIN_SCORING_S)
            row["scoring_clipped"] = scoring < MIN_SCORING_S
            row["image_ablations_per_s"] = N * K / r.seconds
            if naive is not None:
                row["speedup_cold"] = naive.seconds / r.seconds
                row["speedup_scoring"] = (naive.seconds - t_forward) / row["scoring_seconds"]
        rows.append(row)
    return rows


def print_table(rows, t_forward_by_layer) -> None:
    head = (f"{'layer':<15} {'provider':<8} {'seconds':>9} {'img-abl/s':>10} {'speedup':>9} "
            f"{'scoring s':>10} {'speedup':>9} {'target':>7}  note")
    print()
    print(f"{'':<15} {'':<8} {'(cold, end to end)':>30}  {'(scoring only)':>20}")
    print(head)
    print("-" * len(head))
    last = None
    for r in rows:
        if r["layer"] != last:
            if last is not None:
                print()
            last = r["layer"]
            print(f"{r['layer']:<15} t_forward (one plain pass, batch {NAIVE_BATCH}) = "
                  f"{fmt_seconds(t_forward_by_layer[r['layer']])} s")
        if r["status"] != "ok":
            print(f"{'':<15} {r['provider']:<8} {r['status'].upper()}: {r['reason']}")
            continue
        tgt = r.get("target_speedup")
        carfast_row = r["provider"] in common.CARFAST_PROVIDERS
        tgt_s = ""
        if carfast_row and tgt is not None:
            met = [name for name, key in (("cold", "speedup_cold"), ("scoring", "speedup_scoring"))
                   if r.get(key) is not None and r[key] >= tgt]
            tgt_s = f"{tgt:g}x"
            note_met = f"target met ({', '.join(met)})" if met else "target NOT met"
        else:
            note_met = ""
        sc = fmt_seconds(r["scoring_seconds"]) + ("*" if r["scoring_clipped"] else "")
        note = "; ".join(s for s in (r["note"], note_met) if s)
        print(f"{'':<15} {r['provider']:<8} {fmt_seconds(r['seconds']):>9}{'~' if r['extrapolated'] else ' '}"
              f"{fmt_rate(r['image_ablations_per_s']):>10} {fmt_x(r.get('speedup_cold')):>9} "
              f"{sc:>10} {fmt_x(r.get('speedup_scoring')):>9} {tgt_s:>7}  {note}")
    print("\n~ extrapolated (see note); * scoring time clipped at 1 ms; speedups are over naive in this run; "
          "targets: float32, exact")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_child:
        args.data = None if args.data == "bundled" else args.data
        memory_child(args)
        return 0
    torch.set_num_threads(args.threads)
    if args.data is None:
        log(f"note: {common.SHARED_CIFAR10} not found; using carfast's bundled 2,000-image slice")
    if args.data == "bundled":
        args.data = None
    args.layers = list(dict.fromkeys(args.layers))       # each layer once, in the order given
    for layer in args.layers:
        consumer_of(layer)
    env = common.environment("cpu")
    log("environment: " + common.describe_environment(env))
    status = {p: common.provider_status(p) for p in common.PROVIDERS}
    for p in args.providers:
        if not status[p][0]:
            log(f"provider {p}: SKIPPED ({status[p][1]})")
    results = {"benchmark": "score_layer", "environment": env, "config": vars(args).copy(), "rows": [],
               "checks": [], "memory": None, "complete": False,
               "providers": {p: {"available": a, "reason": r} for p, (a, r) in status.items()}}
    mismatches = 0
    if not args.no_speed:
        model = carfast.models.cifar_resnet(56).eval()
        x, y, src = common.load_cifar10(args.data, args.n)
        results["data"] = {"source": src, "images": int(y.numel())}
        log(f"data: {src}: {y.numel()} images")
        results["forward"] = {}
        tfl = {}
        for layer in args.layers:
            case = setup_score_layer(layer, args.data, args.n, loaded=(model, x, y, src))
            log(f"[{layer}] {case.num_filters} filters, consumer {case.consumer_name}, {case.n} images")
            # the plain forward is the same for every layer, but it is timed beside each layer's providers
            # so that t_forward and the scoring-only estimates share the machine's conditions (load)
            tf = common.time_call(lambda: forward_logits(model, x),
                                  warmup=lambda: forward_logits(model, x[:NAIVE_BATCH]),
                                  repeat=args.repeat, budget_s=args.repeat_budget)
            t_forward, base_logits = tf.median, tf.result
            base_correct = base_logits.argmax(1) == y
            tfl[layer] = t_forward
            results["forward"][layer] = {"batch": NAIVE_BATCH, **tf.to_dict(),
                                         "base_accuracy": float(base_correct.double().mean())}
            log(f"[{layer}] t_forward: {t_forward:.3f} s (median of {len(tf.times)}), base accuracy "
                f"{100 * float(base_correct.double().mean()):.2f} %")
            runs = []
            for p in args.providers:
                if not status[p][0]:
                    runs.append(Run(p, status="skipped", reason=status[p][1]))
                    continue
                log(f"[{layer}] {p} ...")
                try:
                    if p == "naive":
                        m = args.naive_filters if args.naive_filters is not None else case.naive_filters_default
                        r = run_naive(case, base_correct, t_forward, m)
                    elif p == "captum":
                        r = run_captum(case, args.captum_images, args.captum_batch, 8)
                    else:
                        r = run_carfast(case, p, args.repeat, args.repeat_budget)
                except Exception as exc:  # record and go on with the other providers
                    traceback.print_exc()
                    r = Run(p, status="error", reason=f"{type(exc).__name__}: {exc}")
                log(f"[{layer}] {p}: " + (f"{r.seconds:.3f} s ({r.note})" if r.status == "ok"
                                          else f"{r.status}: {r.reason}"))
                runs.append(r)
            results["rows"] += rows_for_layer(case, runs, t_forward)
            ok = [r for r in runs if r.status == "ok" and r.drop is not None]
            for i in range(len(ok)):
                for j in range(i + 1, len(ok)):
                    c = compare(case, ok[i], ok[j], base_logits, args.tie_rel)
                    results["checks"].append(c)
                    mismatches += c["status"] == "MISMATCH"
            common.write_json_atomic(args.out, results)      # partial results survive an interrupt
        print("environment: " + common.describe_environment(env))
        print(f"data: {results['data']['source']}: {results['data']['images']} images; "
              f"torch threads {torch.get_num_threads()}")
        print_table(results["rows"], tfl)
        print("\nexactness (per-image accuracy drop, on the (filter, image) pairs both providers ran):")
        for c in results["checks"]:
            line = (f"  {c['layer']:<15} {c['a']:>6} vs {c['b']:<6} {c['filters']:>3} filters x {c['images']:>5} "
                    f"images: {c['status']}")
            if c["image_disagreements"]:
                line += (f" ({c['image_disagreements']} image disagreements: {c['near_ties']} near ties, "
                         f"{c['non_tie_disagreements']} not)")
            if c["filters_differ"]:
                line += f"; per-filter drop differs at {len(c['filters_differ'])} filter(s)"
            print(line)
            if c["status"] == "MISMATCH":
                print(f"  !!!!!!!! MISMATCH {c['layer']} {c['a']} vs {c['b']}: "
                      f"filters {c['filters_differ'][:5]}, e.g. {c['examples'][:3]} !!!!!!!!")
    if args.memory:
        mem = run_memory(args)
        results["memory"] = mem
        if mem["status"] == "ok":
            print(f"\nmemory: {mem['layer']} on {mem['images']} images, memory_budget=2 GiB ({mem['backend']}): "
                  f"peak RSS increase {mem['peak_increase_bytes'] / GIB:.3f} GiB vs target "
                  f"{mem['target_bytes'] / GIB:.0f} GiB: {'OK' if mem['within_target'] else 'OVER TARGET'} "
                  f"({mem['note']}; {mem['seconds']:.1f} s)")
        else:
            print(f"\nmemory: ERROR: {mem['reason']}")
    results["complete"] = True
    try:
        results["load_average_at_end"] = list(os.getloadavg())
    except OSError:
        pass
    results["mismatches"] = mismatches
    out = common.write_json_atomic(args.out, results)
    print(f"\nresults: {out}")
    if mismatches:
        print(f"!!!!!!!! {mismatches} MISMATCH(ES): see the checks above !!!!!!!!")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
