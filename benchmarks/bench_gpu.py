"""GPU benchmark of CAR scoring: the naive re-run, Captum, and carfast's torch / triton / cuda backends
in float32 and bf16, on the pretrained ResNet-56 and the CIFAR-10 test set.

    python benchmarks/bench_gpu.py --out RESULTS_DIR              # on a GPU (benchmarks/gpu_check.sh runs it)
    python benchmarks/bench_gpu.py --out /tmp/gpucheck --smoke    # CPU smoke run: 256 images, torch/cpu/triton

Layers layer1.0.conv1, layer2.4.conv1, layer3.8.conv1 (each scored through its consumer, the block's
conv2). Per layer, on the same images in one process:

* naive       float32 (TF32 off): every filter k, a pre-hook on the consumer zeroes input channel k
              and the whole network runs over the data (``tests/naive.py``); timed on a few evenly
              spaced filters and extrapolated to all (one full pass per filter), which the row says.
* naive_tf32  the same passes with PyTorch's default GPU conv math (TF32): for information only; it is
              not exact and no speedup is taken against it.
* captum      ``LayerFeatureAblation`` when captum imports (``bench_score_layer.run_captum``), on a
              few images, extrapolated.
* carfast     ``LayerScorer(model, layer, (x, y), backend=B, precision=P, options=ScoreOptions(
              channels_last=L))``: ``prepare()`` (the prefix, cached) is timed apart from ``score()``;
              triton and cuda are run in both suffix layouts (NCHW and channels_last).

Per row: scoring seconds (median), image-ablations/s (filters x images / scoring seconds), speedup
over the naive run of this run (scoring only, and cold = setup + prepare + score), pairs re-run in
float32 by the low-precision fallback, the suffix's achieved TFLOP/s (2 x suffix MACs per pair x
pairs evaluated / scoring seconds; suffix MACs = Conv2d/Linear MACs from the consumer on, by forward
hooks) beside the measured bf16 matmul rate (8192^3 on the GPU), and peak GPU memory (reset per row).
Exactness: every carfast row's per-(filter, class) counts must equal the float32 torch backend's;
a difference is judged image by image against the naive logits (near tie or MISMATCH).

A time budget (``--budget``) bounds the run: the rows that matter most run first (the naive run and
the float32 reference, then bf16 on the fast backends, then the rest); a row that no longer fits is
skipped and says so. Results are written atomically to OUT/gpu_bench.json and OUT/gpu_bench.txt after
every row; the short table is printed last. Exit status: 0 ok, 1 a MISMATCH or a row that raised,
2 interrupted (SIGTERM / Ctrl-C; what was measured is written).
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import math
import os
import signal
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))     # the naive reference
if __name__ == "__main__" and ("--smoke" in sys.argv[1:] or not torch.cuda.is_available()):
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before anything imports triton

import common  # noqa: E402  (imports carfast from the repository)
from bench_score_layer import consumer_of, run_captum, setup_score_layer  # noqa: E402
from common import fmt_rate, fmt_seconds, fmt_x  # noqa: E402
from naive import margin_of, naive_logits, per_class_counts  # noqa: E402

import carfast  # noqa: E402
from carfast.atomic import atomic_path  # noqa: E402

LAYERS = ("layer1.0.conv1", "layer2.4.conv1", "layer3.8.conv1")
#: scoring-only speedup over the naive run, bf16 with the exact fallback, on an H100 (the issue's targets)
TARGETS = {"layer1.0.conv1": 5.0, "layer2.4.conv1": 20.0, "layer3.8.conv1": 1000.0}
SUFFIX_RATE_TARGET = 0.30          # of the measured bf16 matmul rate
NAIVE_FILTERS = {"layer1.0.conv1": 4, "layer2.4.conv1": 4, "layer3.8.conv1": 8}
ENGINE_HAS_PRECISION = "precision" in inspect.signature(carfast.LayerScorer.__init__).parameters
PROVIDER_ORDER = ("naive", "naive_tf32", "captum", "torch", "cpu", "triton", "cuda")
MIB = 1 << 20


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Interrupted(BaseException):
    """SIGTERM (the gpu_check.sh timeout): not an Exception, so a row's error handler lets it through."""


def _on_term(signum, _frame):
    raise Interrupted(f"signal {signum}")


# ---- timing and device helpers -------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """(seconds, fn()) with the device synchronized before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


@contextlib.contextmanager
def tf32(device: torch.device):
    """PyTorch's default GPU float32 conv math (TF32) inside; exact float32 (the run's setting) after."""
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def bf16_matmul_rate(device: torch.device, n: int) -> dict:
    """Measured bf16 matrix rate: median of 10 timed n x n x n products after 3 warm-ups."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10 if device.type == "cuda" else 3):
        if device.type == "cuda":          # device events: the GPU's own time for the product
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            times.append(timed(lambda: a @ b, device)[0])
    t = statistics.median(times)
    return {"size": n, "median_s": t, "tflops": 2 * n ** 3 / t / 1e12, "times_s": times}


def suffix_macs(model: torch.nn.Module, consumer: str, example: torch.Tensor) -> tuple[int, int]:
    """(MACs per image of the Conv/Linear layers from ``consumer`` on, of which the consumer's own).

    Forward hooks record each Conv1d/2d/3d / Linear call in execution order (per output element:
    in_channels / groups x kernel elements, or in_features, as ``carfast.surgery.measure`` counts); the suffix
    is every call from the consumer's on. That holds for chain-like networks such as ResNet-56, whose
    shortcuts hold no conv. The consumer is counted whole although the engine runs only its delta
    U_k(A_k) (1/C of it); its share is returned so the overstatement is known.
    """
    calls: list[tuple[str, int]] = []

    def hook(name):
        def record(m, _args, out):
            per_out = (m.in_channels // m.groups) * math.prod(m.kernel_size) \
                if isinstance(m, torch.nn.modules.conv._ConvNd) else m.in_features
            calls.append((name, out.numel() // out.shape[0] * per_out))
        return record

    kinds = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)
    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, kinds)]
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
    first = next(i for i, (n, _) in enumerate(calls) if n == consumer)
    return sum(m for _, m in calls[first:]), calls[first][1]


def layout_name(channels_last) -> str:
    return {None: "auto", True: "NHWC", False: "NCHW"}[channels_last]


# ---- rows ------------------------------------------------------------------------------------------

@dataclass
class Row:
    layer: str
    provider: str
    precision: str = "fp32"
    layout: str = "-"
    status: str = "ok"                 # ok | skipped | unavailable | error | n/a
    reason: str = ""
    method: str = ""
    backend: str = ""                  # the kernels that actually ran (LayerScores.backend)
    score_s: float | None = None       # scoring only (all filters, all images), median
    score_times_s: list = field(default_factory=list)
    setup_s: float | None = None       # LayerScorer(...) + prepare(): trace, plan, prefix
    cold_s: float | None = None        # setup_s + score_s (naive: the intact pass + K passes)
    extrapolated: bool = False
    note: str = ""
    image_ablations_per_s: float | None = None
    speedup: float | None = None       # scoring only, over the naive run of this run
    speedup_cold: float | None = None
    pairs_evaluated: int | None = None
    pairs_skipped: int | None = None
    pairs_rechecked: int | None = None
    margin_threshold: float | None = None
    suffix_tflops: float | None = None
    suffix_tflops_equivalent: bool = False   # closed form: far less arithmetic than the suffix it replaces
    pct_bf16_peak: float | None = None
    peak_mem_bytes: int | None = None
    peak_mem_above_start_bytes: int | None = None
    exact: str = ""                    # reference | equal | equal up to near ties | MISMATCH | ...
    exact_detail: dict = field(default_factory=dict)

    def label(self) -> str:
        return f"{self.provider} {self.precision} {self.layout}"


@dataclass
class LayerCase:
    layer: str
    consumer: str
    K: int
    macs: int                          # suffix MACs per image (from the consumer on)
    consumer_macs: int
    base_logits: torch.Tensor          # [N, classes] float32, intact, on the device
    t_forward: float                   # one intact pass over the data (naive batch)
    naive: Row | None = None
    naive_filters: list = field(default_factory=list)
    naive_logits: torch.Tensor | None = None   # [m, N, classes]
    ref: object = None                 # LayerScores of torch fp32 (counts)


class Bench:
    def __init__(self, args, device: torch.device, model, x, y, deadline: float):
        self.args, self.device, self.model, self.x, self.y = args, device, model, x, y
        self.deadline = deadline
        self.N = int(y.numel())
        self.rows: list[Row] = []
        self.cases: dict[str, LayerCase] = {}
        self.peak = None
        self.errors = 0
        self.estimates: dict[tuple, float] = {}   # (layer, backend, precision) -> seconds per full score

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    # ---- setup and the naive run -------------------------------------------------------------------
    def setup(self, layer: str) -> LayerCase:
        consumer = consumer_of(layer)
        modules = dict(self.model.named_modules())
        K = modules[layer].out_channels
        macs, cmacs = suffix_macs(self.model, consumer, self.x)
        naive_logits(self.model, {}, self.x[:self.args.naive_batch], None, self.args.naive_batch)   # warm-up
        t, logits = timed(lambda: naive_logits(self.model, {}, self.x, None, self.args.naive_batch), self.device)
        case = LayerCase(layer, consumer, K, macs, cmacs, logits, t)
        log(f"[{layer}] {K} filters, consumer {consumer}, suffix {macs / 1e6:.1f} MMAC/image "
            f"(consumer {100 * cmacs / macs:.1f} %), intact pass {t:.3f} s, base accuracy "
            f"{100 * float((logits.argmax(1) == self.y).double().mean()):.2f} %")
        self.cases[layer] = case
        return case

    def run_naive(self, case: LayerCase, use_tf32: bool) -> Row:
        K, name = case.K, "naive_tf32" if use_tf32 else "naive"
        m = self.args.naive_filters if self.args.naive_filters is not None else NAIVE_FILTERS.get(case.layer, 4)
        m = K if m <= 0 or m >= K else m
        filters = sorted(set(torch.linspace(0, K - 1, m).round().long().tolist()))
        times, logits = [], []
        ctx = tf32(self.device) if use_tf32 else contextlib.nullcontext()
        with ctx:
            if use_tf32:   # warm-up in this math mode (cuDNN picks other kernels)
                naive_logits(self.model, {case.consumer: 1}, self.x[:self.args.naive_batch], filters[0],
                             self.args.naive_batch)
            for k in filters:
                t, lg = timed(lambda k=k: naive_logits(self.model, {case.consumer: 1}, self.x, k,
                                                       self.args.naive_batch), self.device)
                times.append(t)
                logits.append(lg)
                if self.left() < 0 and len(times) >= 2:
                    log(f"  {name}: time budget spent after {len(times)} filters")
                    filters = filters[:len(times)]
                    break
        per_pass = statistics.median(times)
        scoring = per_pass * K if len(filters) < K else sum(times)
        row = Row(case.layer, name, "fp32", "NCHW", method="full_network", backend="torch", score_s=scoring,
                  score_times_s=times, cold_s=case.t_forward + scoring, extrapolated=len(filters) < K,
                  image_ablations_per_s=K * self.N / scoring)
        row.note = (f"timed on {len(filters)} of {K} filters {filters}, x {K / len(filters):.3g}"
                    if row.extrapolated else f"all {K} filters") + f", batch {self.args.naive_batch}"
        if use_tf32:
            row.precision, row.note = "tf32", row.note + "; PyTorch's default conv math, not exact"
            return row
        case.naive, case.naive_filters, case.naive_logits = row, filters, torch.stack(logits)
        row.speedup, row.speedup_cold = 1.0, 1.0
        row.exact = "reference"
        return row

    # ---- carfast rows ----------------------------------------------------------------------------------
    def scorer(self, layer, data, backend, precision, channels_last):
        kw = {"device": self.device, "backend": backend, "progress": False,
              "options": carfast.ScoreOptions(channels_last=channels_last)}
        if ENGINE_HAS_PRECISION:
            kw["precision"] = precision
        return carfast.LayerScorer(self.model, layer, data, **kw)

    def run_carfast(self, case: LayerCase, backend: str, precision: str, channels_last) -> Row:
        row = Row(case.layer, backend, precision, layout_name(channels_last))
        if not carfast.extensions.has_backend(backend):
            row.status = "unavailable"
            row.reason = next(b["reason"] for b in carfast.extensions.backends() if b["name"] == backend)
            return row
        if precision != "fp32" and not ENGINE_HAS_PRECISION:
            row.status, row.reason = "unavailable", "this carfast's LayerScorer takes no precision argument"
            return row
        dev, x, y = self.device, self.x, self.y
        # warm-up on a few images (kernel compilation, cuDNN plans), then a second timed score for an estimate
        w = min(self.args.warmup_images, self.N)
        ws = self.scorer(case.layer, (x[:w], y[:w]), backend, precision, channels_last)
        kernel = getattr(ws, "kernel", backend)
        if kernel != backend and kernel == "torch":   # e.g. "cpu" at a suffix layer: no C++ kernel applies
            row.status = "n/a"
            row.reason = f"the engine runs the torch kernels for backend {backend!r} here: same as the torch row"
            return row
        known = self.estimates.get((case.layer, backend, precision))
        if known is not None and known * 2 + 1 > self.left():   # a probe of this backend here said so already
            row.status = "skipped"
            row.reason = f"time budget: ~{known:.1f} s per score (probed before), {max(0, self.left()):.0f} s left"
            return row
        ws.prepare()
        if dev.type == "cuda":
            ws.score()                  # kernel compilation and cuDNN plans out of the timed estimate
        t_w, _ = timed(ws.score, dev)
        del ws
        estimate = self.estimates[(case.layer, backend, precision)] = t_w * self.N / w
        if estimate * 2 + 1 > self.left():
            row.status = "skipped"
            row.reason = f"time budget: ~{estimate:.1f} s per score (from {w} images), {max(0, self.left()):.0f} s left"
            return row
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
            start_mem = torch.cuda.memory_allocated(dev)
        row.setup_s, scorer = timed(lambda: self.scorer(case.layer, (x, y), backend, precision, channels_last)
                                    .prepare(), dev)
        times, res = [], None
        for _ in range(max(1, self.args.repeat)):
            t, res = timed(scorer.score, dev)
            times.append(t)
            if sum(times) > self.args.repeat_budget or self.left() < 2 * t + 1:
                break
        if dev.type == "cuda":
            row.peak_mem_bytes = torch.cuda.max_memory_allocated(dev)
            row.peak_mem_above_start_bytes = row.peak_mem_bytes - start_mem
        if channels_last is None and getattr(scorer, "channels_last", None) is not None:
            row.layout = f"{layout_name(scorer.channels_last)}(auto)"   # the engine's choice for this device
        row.score_times_s, row.score_s = times, statistics.median(times)
        row.cold_s = row.setup_s + row.score_s
        row.method, row.backend = res.method, res.backend
        row.pairs_evaluated, row.pairs_skipped = res.pairs_evaluated, res.pairs_skipped
        row.pairs_rechecked = getattr(res, "pairs_rechecked", None)
        row.margin_threshold = getattr(res, "margin_threshold", None)
        row.image_ablations_per_s = case.K * self.N / row.score_s
        if case.naive is not None:
            row.speedup = case.naive.score_s / row.score_s
            row.speedup_cold = case.naive.cold_s / row.cold_s
        if res.method in ("suffix", "closed_form"):
            row.suffix_tflops = 2 * case.macs * res.pairs_evaluated / row.score_s / 1e12
            row.suffix_tflops_equivalent = res.method == "closed_form"
            if self.peak and res.method == "suffix":
                row.pct_bf16_peak = 100 * row.suffix_tflops / self.peak["tflops"]
        if not getattr(scorer, "cached", True):
            row.note = "prefix NOT cached (memory budget): every score reruns it"
        row.note = "; ".join(s for s in (row.note, f"median of {len(times)}") if s)
        if case.ref is None and backend == "torch" and precision == "fp32" and channels_last is None:
            case.ref = res
            row.exact = "reference"
            self.check_naive(case, scorer, row)
        else:
            self.check_counts(case, scorer, res, row)
        del scorer
        return row

    # ---- exactness -------------------------------------------------------------------------------------
    def judge(self, case: LayerCase, filters: list, a: torch.Tensor, b: torch.Tensor, logits=None) -> dict:
        """Per-image disagreements of a, b [F, N] (correctness, or accuracy drop) of ``filters``: near ties or
        not, judged on the naive float32 logits (``logits`` [F, N, classes], else recomputed for those images)."""
        diff = (a.cpu() != b.cpu()).nonzero().tolist()
        out = {"image_disagreements": len(diff), "near_ties": 0, "not_ties": 0, "max_rel_margin": 0.0,
               "examples": []}
        by_filter: dict[int, list[int]] = {}
        for j, i in diff:
            by_filter.setdefault(j, []).append(i)
        base_rel = self.rel_margin(case.base_logits)
        for j, imgs in by_filter.items():
            idx = torch.tensor(imgs, device=self.device)
            abl = logits[j][idx] if logits is not None else naive_logits(
                self.model, {case.consumer: 1}, self.x[idx], filters[j], self.args.naive_batch)
            rel = torch.minimum(self.rel_margin(abl), base_rel[idx]).cpu()
            tie = rel < self.args.tie_rel
            out["near_ties"] += int(tie.sum())
            out["not_ties"] += int((~tie).sum())
            out["max_rel_margin"] = max(out["max_rel_margin"], float(rel.max()))
            for i, r in zip(imgs, rel.tolist()):
                if len(out["examples"]) < 8:
                    out["examples"].append({"filter": filters[j], "image": i, "rel_margin": r})
        return out

    @staticmethod
    def rel_margin(logits: torch.Tensor) -> torch.Tensor:
        """top-1 minus top-2 logit over max(1, max |logit|), per image (tests/naive.near_tie's measure)."""
        return margin_of(logits) / logits.abs().amax(dim=-1).clamp(min=1.0)

    @staticmethod
    def verdict(j: dict) -> str:
        if j["not_ties"]:
            return "MISMATCH"
        return "equal up to near ties" if j["image_disagreements"] else "equal"

    def check_naive(self, case: LayerCase, scorer, row: Row) -> None:
        """The torch fp32 reference against the naive run, image by image, on the filters naive ran."""
        if case.naive is None:
            return
        f = case.naive_filters
        res = scorer.score(filters=f, per_image=True)
        naive_correct = case.naive_logits.argmax(-1) == self.y
        j = self.judge(case, f, res.image_correct, naive_correct, case.naive_logits)
        counts = per_class_counts(naive_correct.cpu(), self.y.cpu(), res.correct.shape[1])
        j["counts_equal"] = torch.equal(counts, res.correct.cpu())
        case.naive.exact_detail = {"vs": "torch fp32 (this layer's reference)", "filters": f, **j}
        case.naive.exact = self.verdict(j)
        if case.naive.exact == "MISMATCH":
            log(f"!!!!!!!! MISMATCH {case.layer}: torch fp32 vs naive on filters {f}: {j}")

    def check_counts(self, case: LayerCase, scorer, res, row: Row) -> None:
        """Counts [F, C] against the torch fp32 reference; any difference is judged image by image."""
        if case.ref is None:
            row.exact = "no reference"
            return
        a, b = res.correct.cpu(), case.ref.correct.cpu()
        if torch.equal(a, b):
            row.exact = "equal"
            return
        bad = [int(k) for k in (a != b).any(1).nonzero().flatten().tolist()]
        log(f"!!!!!!!! {case.layer} {row.label()}: counts differ from torch fp32 at filters {bad[:10]}")
        mine = scorer.score(filters=bad, per_image=True).image_correct
        theirs = self.scorer(case.layer, (self.x, self.y), "torch", "fp32", None).score(
            filters=bad, per_image=True).image_correct
        j = self.judge(case, bad, mine, theirs)
        row.exact_detail = {"vs": "torch fp32", "counts_equal": False, "filters_differ": bad, **j}
        row.exact = "COUNTS DIFFER: " + self.verdict(j)
        log(f"!!!!!!!! {case.layer} {row.label()}: {row.exact}: {j}")

    def run_captum(self, case: LayerCase) -> Row:
        ok, reason = common.provider_status("captum")
        row = Row(case.layer, "captum", "fp32", "NCHW")
        if not ok:
            row.status, row.reason = "unavailable", reason
            return row
        sc = setup_score_layer(case.layer, None, None, loaded=(self.model, self.x, self.y, ""))
        n = min(self.args.captum_images, self.N)
        r = run_captum(sc, n, min(128, n), 8)
        # Captum times its own calls with perf_counter; on a GPU the last batch's kernels may be in flight
        row.method, row.score_s, row.cold_s = "full_network", r.seconds, r.seconds
        row.extrapolated, row.note = r.extrapolated, r.note
        row.image_ablations_per_s = case.K * self.N / r.seconds
        if case.naive is not None:
            row.speedup, row.speedup_cold = case.naive.score_s / r.seconds, case.naive.cold_s / r.seconds
        ref = self.scorer(case.layer, (self.x[:n], self.y[:n]), "torch", "fp32", None).score(per_image=True)
        drop = ref.base_image_correct.to(torch.int8).unsqueeze(0) - ref.image_correct.to(torch.int8)
        j = self.judge(case, list(range(case.K)), r.drop, drop.cpu())   # [K, n] int8 drops, -1 / 0 / 1
        row.exact_detail, row.exact = {"vs": f"torch fp32 on the first {n} images", **j}, self.verdict(j)
        return row


# ---- the schedule ----------------------------------------------------------------------------------

def jobs(args, device) -> list[tuple]:
    """(priority, layer index, kind, backend, precision, channels_last), run in sorted order."""
    out = []
    for li, _layer in enumerate(args.layers):
        out.append((0, li, "naive", "naive", "fp32", None))
        out.append((0, li, "carfast", "torch", "fp32", None))     # the exactness reference
        for b in args.backends:
            layouts = [False, True] if b in ("triton", "cuda") else [None]
            for p in args.precisions:
                for cl in layouts:
                    if b == "torch" and p == "fp32":
                        continue
                    if args.smoke:   # CPU: torch/cpu bf16 first, Triton's interpreter (slow) last
                        prio = 3 if b == "triton" else 1 if p == "bf16" else 2
                    else:            # GPU: bf16 on the fast backends first (the targets)
                        prio = 1 if p == "bf16" and b != "torch" and cl == layouts[0] else 2
                    out.append((prio, li, "carfast", b, p, cl))
        if device.type == "cuda":
            out.append((3, li, "naive_tf32", "naive", "tf32", None))
        out.append((1 if args.smoke else 3, li, "captum", "captum", "fp32", None))   # cheap on a few images
    return sorted(out, key=lambda j: (j[0], j[1]))


def run_all(bench: Bench, args, save) -> None:
    setup_failed: dict[str, str] = {}
    for _prio, li, kind, backend, precision, cl in jobs(args, bench.device):
        layer = args.layers[li]
        prov, lay = (backend, layout_name(cl)) if kind == "carfast" else (kind, "NCHW")
        label = f"[{layer}] {prov} {precision} {lay}"
        if layer in setup_failed:
            bench.rows.append(Row(layer, prov, precision, lay, status="error", reason=setup_failed[layer]))
            continue
        case = bench.cases.get(layer)
        if case is None:
            if bench.left() < args.min_row_s:
                bench.rows.append(Row(layer, prov, precision, lay, status="skipped",
                                      reason="time budget spent before this layer was set up"))
                continue
            try:
                case = bench.setup(layer)
            except Exception as exc:   # the layer cannot run: every row of it says why
                traceback.print_exc()
                setup_failed[layer] = f"layer setup: {type(exc).__name__}: {' '.join(str(exc).split())[:250]}"
                bench.errors += 1
                bench.rows.append(Row(layer, prov, precision, lay, status="error", reason=setup_failed[layer]))
                continue
        if kind == "carfast" and cl is True and backend in ("triton", "cuda"):
            first = next((r for r in bench.rows if (r.layer, r.provider, r.precision, r.layout) ==
                          (layer, backend, precision, "NCHW") and r.status == "ok"), None)
            if first is not None and first.method == "closed_form":
                bench.rows.append(Row(layer, backend, precision, "NHWC", status="n/a",
                                      reason="the closed form has no suffix: layout does not apply"))
                continue
        if bench.left() < args.min_row_s:
            bench.rows.append(Row(layer, prov, precision, lay, status="skipped",
                                  reason=f"time budget: {max(0, bench.left()):.0f} s left"))
            log(f"{label}: skipped (time budget)")
            continue
        log(f"{label} ...")
        t0 = time.perf_counter()
        try:
            if kind in ("naive", "naive_tf32"):
                row = bench.run_naive(case, kind == "naive_tf32")
            elif kind == "captum":
                row = bench.run_captum(case)
            else:
                row = bench.run_carfast(case, backend, precision, cl)
        except Exception as exc:   # record it and go on with the other rows
            traceback.print_exc()
            row = Row(layer, prov, precision, lay, status="error",
                      reason=f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
            bench.errors += 1
        finally:
            if bench.device.type == "cuda":
                torch.cuda.empty_cache()
        log(f"{label}: " + (f"score {fmt_seconds(row.score_s)} s, {row.exact or '-'} "
                            f"({time.perf_counter() - t0:.1f} s)" if row.status == "ok"
                            else f"{row.status}: {row.reason}"))
        bench.rows.append(row)
        save()


# ---- output ----------------------------------------------------------------------------------------

def sorted_rows(rows, layers):
    prec = {"fp32": 0, "tf32": 1, "bf16": 2, "fp16": 3}
    return sorted(rows, key=lambda r: (layers.index(r.layer) if r.layer in layers else 99,
                                       PROVIDER_ORDER.index(r.provider) if r.provider in PROVIDER_ORDER else 99,
                                       prec.get(r.precision, 9), r.layout))


def table(bench: Bench, args, env: dict, data_src: str, interrupted: str | None) -> str:
    peak = bench.peak
    lines = [f"device: {env['device']}; torch {env['torch_version']}, triton {env.get('triton_version')}, "
             f"carfast {env['carfast_version']}, commit {(env['git_commit'] or '?')[:10]}"
             f"{' (dirty)' if env['git_dirty'] else ''}",
             f"data: {data_src}: {bench.N} images; float32 runs with TF32 off",
             f"bf16 matmul {peak['size']}^3: {peak['tflops']:.1f} TFLOP/s measured" if peak else "bf16 matmul: -"]
    if args.smoke:
        lines.append("SMOKE RUN (CPU, few images): the figures check the harness, not the targets (H100)")
    head = (f"{'layer':<15} {'provider':<21} {'method':<12} {'score s':>8} {'img-abl/s':>9} {'x naive':>8} "
            f"{'cold s':>7} {'x cold':>7} {'rechk':>6} {'TFLOP/s':>8} {'%bf16':>6} {'peak MiB':>8}  exact")
    lines += ["", head, "-" * len(head)]
    last = None
    for r in sorted_rows(bench.rows, args.layers):
        if last is not None and r.layer != last:
            lines.append("")
        lab = f"{r.provider} {r.precision} {r.layout}"
        lay = r.layer if r.layer != last else ""
        last = r.layer
        if r.status != "ok":
            lines.append(f"{lay:<15} {lab:<21} {r.status.upper()}: {r.reason[:110]}")
            continue
        tf = "-" if r.suffix_tflops is None else f"{r.suffix_tflops:.3g}{'e' if r.suffix_tflops_equivalent else ''}"
        pct = "-" if r.pct_bf16_peak is None else f"{r.pct_bf16_peak:.1f}"
        mem = "-" if r.peak_mem_bytes is None else f"{r.peak_mem_bytes / MIB:.0f}"
        rechk = "-" if r.pairs_rechecked is None else str(r.pairs_rechecked)
        ext = "~" if r.extrapolated else " "
        lines.append(f"{lay:<15} {lab:<21} {r.method[:12]:<12} {fmt_seconds(r.score_s):>7}{ext}"
                     f"{fmt_rate(r.image_ablations_per_s):>9} {fmt_x(r.speedup):>8} {fmt_seconds(r.cold_s):>7} "
                     f"{fmt_x(r.speedup_cold):>7} {rechk:>6} {tf:>8} {pct:>6} {mem:>8}  {r.exact}")
    lines += ["", "~ extrapolated from a few filters (naive) or images (captum); x naive = scoring-only speedup "
              "over the naive run (K passes), x cold = (intact pass + K passes) / (setup + prepare + score); "
              "TFLOP/s = 2 x suffix MACs x pairs evaluated / score s (e = closed form: equivalent rate); "
              "%bf16 = of the measured bf16 matmul rate; rechk = pairs re-run in float32"]
    lines += layout_lines(bench) + target_lines(bench, args)
    if interrupted:
        lines.append(f"INTERRUPTED ({interrupted}): partial results")
    return "\n".join(lines)


def layout_lines(bench: Bench) -> list[str]:
    out, ok = [], {(r.layer, r.provider, r.precision, r.layout): r for r in bench.rows if r.status == "ok"}
    for (layer, prov, prec, lay), r in ok.items():
        o = ok.get((layer, prov, prec, "NHWC"))
        if lay == "NCHW" and o is not None:
            fast, slow = (o, r) if o.score_s < r.score_s else (r, o)
            out.append(f"layout {layer} {prov} {prec}: {fast.layout} faster ({fmt_seconds(fast.score_s)} s vs "
                       f"{slow.layout} {fmt_seconds(slow.score_s)} s, {slow.score_s / fast.score_s:.2f}x)")
    return out


def target_lines(bench: Bench, args) -> list[str]:
    """The issue's targets (H100): scoring speedup over naive in bf16 with the exact fallback; suffix rate."""
    out = []
    for layer in args.layers:
        tgt = TARGETS.get(layer)
        cands = [r for r in bench.rows if r.layer == layer and r.status == "ok" and r.precision == "bf16"
                 and r.speedup is not None and r.provider in ("torch", "cpu", "triton", "cuda")]
        exact = [r for r in cands if r.exact.startswith("equal")]
        if tgt is None:
            continue
        if not exact:
            out.append(f"target {layer}: >= {tgt:g}x naive (bf16, exact): NO EXACT bf16 ROW"
                       + (f" (best inexact {max(r.speedup for r in cands):.3g}x)" if cands else ""))
            continue
        best = max(exact, key=lambda r: r.speedup)
        out.append(f"target {layer}: >= {tgt:g}x naive (bf16, exact): {fmt_x(best.speedup)} ({best.label()}, "
                   f"cold {fmt_x(best.speedup_cold)}): {'MET' if best.speedup >= tgt else 'NOT MET'}")
        suf = [r for r in exact if r.method == "suffix" and r.pct_bf16_peak is not None]
        if suf:
            s = max(suf, key=lambda r: r.pct_bf16_peak)
            out.append(f"target {layer}: suffix >= {100 * SUFFIX_RATE_TARGET:.0f} % of bf16 matmul: "
                       f"{s.pct_bf16_peak:.1f} % ({s.suffix_tflops:.3g} TFLOP/s, {s.label()}): "
                       f"{'MET' if s.pct_bf16_peak >= 100 * SUFFIX_RATE_TARGET else 'NOT MET'}")
    return out


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path, ".txt") as tmp:
        with open(tmp, "w") as f:
            f.write(text + "\n")


# ---- main ------------------------------------------------------------------------------------------

def resolve_data(arg: str | None) -> str | None:
    """--data, then $CARFAST_GPU_DATA, then ../shared/data/cifar10/test.npz, then .gpu_data/test.npz;
    None = carfast's bundled 2,000-image slice ('bundled' asks for it)."""
    for p in (arg, os.environ.get("CARFAST_GPU_DATA"), str(common.SHARED_CIFAR10),
              str(common.REPO / ".gpu_data" / "test.npz")):
        if p == "bundled":
            return None
        if p and Path(p).is_file():
            return p
        if p and p in (arg, os.environ.get("CARFAST_GPU_DATA")):
            raise SystemExit(f"bench_gpu: no data file at {p!r}; pass a CIFAR-10 test.npz or 'bundled'")
    return None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Smoke run (CPU): python benchmarks/bench_gpu.py --out /tmp/gpucheck --smoke")
    p.add_argument("--out", default=os.environ.get("CARFAST_GPU_RESULTS"),
                   help="results folder (default: $CARFAST_GPU_RESULTS): gpu_bench.json, gpu_bench.txt")
    p.add_argument("--smoke", action="store_true",
                   help="CPU smoke run: --n 256, backends torch cpu triton (TRITON_INTERPRET=1), 1 naive filter "
                        "(implied when no CUDA device is visible)")
    p.add_argument("--data", default=None, help="CIFAR-10 test.npz (default: $CARFAST_GPU_DATA, "
                   "../shared/data/cifar10/test.npz, .gpu_data/test.npz, else the bundled 2,000-image slice)")
    p.add_argument("--n", type=int, default=None, help="first N images (default: all; smoke 256)")
    p.add_argument("--layers", nargs="+", default=list(LAYERS), metavar="LAYER")
    p.add_argument("--backends", nargs="+", default=None, choices=("torch", "cpu", "triton", "cuda"),
                   help="carfast backends (default: torch triton cuda on a GPU; torch cpu triton in a smoke run)")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16", "fp16"))
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole benchmark; rows that do not fit are skipped (default 300; smoke 90)")
    p.add_argument("--naive-filters", type=int, default=None, metavar="M",
                   help="filters the naive run times, extrapolated to all (default 4/4/8; smoke 1; 0 = all)")
    p.add_argument("--naive-batch", type=int, default=None,
                   help="naive batch size (default: the fastest of 512/2048/N on a GPU; 128 on the CPU)")
    p.add_argument("--captum-images", type=int, default=256, help="images Captum runs on (smoke: 16)")
    p.add_argument("--repeat", type=int, default=None, help="timed scores per row, median (default 3; smoke 1)")
    p.add_argument("--repeat-budget", type=float, default=20.0, help="stop repeating a row after S seconds")
    p.add_argument("--warmup-images", type=int, default=None, help="images of the warm-up scores (512; smoke 4)")
    p.add_argument("--min-row-s", type=float, default=5.0, help="start no row with less time left (default 5)")
    p.add_argument("--tie-rel", type=float, default=1e-5,
                   help="a disagreement is a near tie when top-1 - top-2 < this x max(1, max |logit|)")
    p.add_argument("--matmul-size", type=int, default=None, help="bf16 matmul size (default 8192; smoke 1024)")
    args = p.parse_args(argv)
    if args.out is None:
        p.error("give the results folder: --out DIR or CARFAST_GPU_RESULTS=DIR")
    return args


def pick_naive_batch(model, x, device) -> tuple[int, dict]:
    """The naive method's fastest batch for one intact pass over x (GPU), so the baseline is not starved."""
    if device.type != "cuda":
        return 128, {}
    times = {}
    for b in sorted({512, 2048, x.shape[0]}):
        naive_logits(model, {}, x[:b], None, b)                      # warm-up: cuDNN plans for this shape
        times[b] = timed(lambda b=b: naive_logits(model, {}, x, None, b), device)[0]
    return min(times, key=times.get), times


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    signal.signal(signal.SIGTERM, _on_term)
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        log("bench_gpu: no CUDA device visible: running the CPU smoke configuration")
        args.smoke = True
    # an explicit index: LayerScorer compares it with the model's device (cuda != cuda:0 would copy the model)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if args.smoke:
        args.n = args.n or 256
        args.naive_filters = 1 if args.naive_filters is None else args.naive_filters
        args.captum_images = min(args.captum_images, 16)
        args.budget = args.budget or 90.0
    args.backends = args.backends or (["torch", "cpu", "triton"] if args.smoke else ["torch", "triton", "cuda"])
    args.repeat = args.repeat or (1 if args.smoke else 3)
    args.budget = args.budget or 300.0
    args.warmup_images = args.warmup_images or (4 if args.smoke else 512)
    args.matmul_size = args.matmul_size or (1024 if args.smoke else 8192)
    for layer in args.layers:
        consumer_of(layer)
    # float32 means float32: no TF32 in convolutions (PyTorch's GPU default) or matmuls (the naive_tf32 row
    # measures the default). Legacy flags only: mixing them with the fp32_precision API makes torch raise.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    if device.type == "cpu":
        # one thread in a smoke run: on a shared 2-core machine two threads collapse under load
        torch.set_num_threads(1 if args.smoke else (os.cpu_count() or 1))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, txt_path = out_dir / "gpu_bench.json", out_dir / "gpu_bench.txt"

    env = common.environment(str(device))
    try:
        import triton
        env["triton_version"] = triton.__version__
    except Exception as exc:   # noqa: BLE001  (recorded, not needed)
        env["triton_version"] = f"not importable ({type(exc).__name__})"
    env.update(cuda_version=torch.version.cuda, cudnn_version=torch.backends.cudnn.version() if cuda else None,
               gpu_capability=list(torch.cuda.get_device_capability(device)) if cuda else None,
               cudnn_benchmark=torch.backends.cudnn.benchmark, tf32=False,
               triton_interpret=os.environ.get("TRITON_INTERPRET"), engine_has_precision=ENGINE_HAS_PRECISION)
    log("environment: " + common.describe_environment(env))

    data = resolve_data(args.data)
    x, y, src = common.load_cifar10(data, args.n)
    if data is None:
        log("bench_gpu: NOTE: the full CIFAR-10 test set was not found; using the bundled 2,000-image slice")
    model = carfast.models.cifar_resnet(56).eval().to(device)
    x, y = x.to(device), y.to(device)
    nb_times = {}
    if args.naive_batch is None:
        args.naive_batch, nb_times = pick_naive_batch(model, x, device)
    log(f"data: {src}: {y.numel()} images; naive batch {args.naive_batch} {nb_times or ''}")

    budget_end = t_start + args.budget
    bench = Bench(args, device, model, x, y, budget_end)
    bench.peak = bf16_matmul_rate(device, args.matmul_size)
    log(f"bf16 matmul {args.matmul_size}^3: {bench.peak['tflops']:.1f} TFLOP/s")
    results = {"benchmark": "gpu", "environment": env, "config": vars(args).copy(),
               "data": {"source": src, "images": bench.N, "full_test_set": data is not None and bench.N == 10000},
               "naive_batch_times_s": nb_times, "bf16_matmul": bench.peak, "targets": TARGETS,
               "suffix_rate_target": SUFFIX_RATE_TARGET, "complete": False}

    def save(interrupted=None):
        results["layers"] = {k: {"consumer": c.consumer, "filters": c.K, "suffix_macs_per_image": c.macs,
                                 "consumer_macs_per_image": c.consumer_macs, "t_forward_s": c.t_forward,
                                 "base_accuracy": float((c.base_logits.argmax(1) == y).double().mean())}
                             for k, c in bench.cases.items()}
        results["rows"] = [asdict(r) for r in sorted_rows(bench.rows, args.layers)]
        results["interrupted"] = interrupted
        results["elapsed_s"] = time.perf_counter() - t_start
        common.write_json_atomic(json_path, results)

    interrupted = None
    try:
        run_all(bench, args, save)
        results["complete"] = True
    except (Interrupted, KeyboardInterrupt) as exc:
        interrupted = str(exc) or type(exc).__name__
        log(f"bench_gpu: interrupted ({interrupted}); writing what was measured")
    mismatches = sum("MISMATCH" in r.exact for r in bench.rows)
    results["mismatches"], results["row_errors"] = mismatches, bench.errors
    results["summary"] = layout_lines(bench) + target_lines(bench, args)
    save(interrupted)
    text = table(bench, args, env, src, interrupted)
    write_text_atomic(txt_path, text)
    for r in bench.rows:
        if "MISMATCH" in r.exact:
            print(f"!!!!!!!! MISMATCH {r.layer} {r.label()}: {r.exact_detail}")
    print(f"results: {json_path} and {txt_path} ({time.perf_counter() - t_start:.0f} s)\n")
    print(text)
    if interrupted:
        return 2
    return 1 if mismatches or bench.errors else 0


if __name__ == "__main__":
    sys.exit(main())
