"""Race settings compared by the evaluations they make, replayed on recorded per-image losses.

    python benchmarks/bench_race_settings.py [--trajectory experiments/results/whole_car-loss_ckpt.json]
                                             [--every 24] [--n 2000] [--data test.npz] [--threads 1]
                                             [--grid "default;block=64;block=64,strata=32"] [--values FILE]
                                             [--out FILE]

How many candidate-image evaluations a race makes, and which candidate it keeps, depend only on the
per-image values of the candidates, not on the machine. This benchmark therefore measures them once and
replays the race over them for many settings:

1. **Collect** (resumable, saved to ``--values``): at every ``--every``-th removal of a recorded greedy run
   of the bundled ResNet-56 (by default the exact whole-network run of experiments/whole_network.py), the
   state is rebuilt as in ``bench_race_steps.py`` and every remaining candidate is scored on every image
   with its per-image loss: a [K, N] float64 matrix, beside the current model's per-image loss [N] (which
   sets the race's strata).
2. **Replay**: for each setting of ``--grid``, ``carfast.scoring.race.race_values`` races each state's
   matrix with the image order the pruning loop would draw for that step. The replay is the race's own
   decision code; only the per-image losses come from one whole-data scoring instead of one scoring per
   block, which can differ from the block-wise values in the last float32 bits.

For each setting it reports the share of the exact search's evaluations, the share weighted by the exact
search's recorded seconds for each step (what the share of its time would be if the race cost nothing
else: a stage-1 evaluation runs a longer suffix than a stage-3 one), the steps where the race kept a
different best candidate than the exact search, and their regret (the mean loss the race's choice adds).
Per stage as well. Seconds are never measured here: ``bench_race_steps.py`` times the searches.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_race_steps import SHARED_TEST, TRAJECTORY, parse_race, state  # noqa: E402
from common import describe_environment, environment, write_json_atomic  # noqa: E402

from carfast.data import cifar10_test  # noqa: E402
from carfast.scoring.race import race_values  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def collect(history: list[dict], every: int, data, path: Path) -> dict:
    """{removal: {"losses": [K, N] float64, "filters": [K], "base": [N]}} at every ``every``-th removal, read
    from ``path`` where saved before and added to it (atomically) state by state."""
    values = torch.load(path, weights_only=True) if path.is_file() else {}
    for r in range(0, len(history), every):
        if r in values:
            continue
        scorer, _ = state(history, r, data)
        s = scorer.score(image_loss=True)
        values[r] = {"losses": s.image_loss.double(), "filters": s.filters, "base": scorer.image_losses().double()}
        tmp = path.with_suffix(".tmp")
        torch.save(values, tmp)
        tmp.replace(path)
        print(f"collected removal {r:4d} {history[r]['layer']:15s} K={s.filters.numel()}", flush=True)
    return values


def replay(values: dict, settings, history: list[dict]) -> list[dict]:
    """One row per state: the race's evaluations and kept candidate under ``settings``, beside the exact
    search's, with the images visited as the pruning loop visits them in that step."""
    rows = []
    for r, v in sorted(values.items()):
        losses, filters = v["losses"], v["filters"].tolist()
        outcome = race_values(losses, v["base"], settings, str(r + 1))
        sums = losses.sum(1)
        exact = min(range(len(filters)), key=lambda i: (float(sums[i]), filters[i]))
        chosen = min(outcome.survivors, key=lambda i: (float(sums[i]), filters[i]))
        rows.append({"removal": r, "layer": history[r]["layer"], "candidates": len(filters),
                     "survivors": len(outcome.survivors), "evaluations": outcome.evaluations,
                     "exhaustive": outcome.exhaustive, "exact_seconds": history[r]["seconds"],
                     "same_choice": chosen == exact,
                     "regret": float(sums[chosen] - sums[exact]) / losses.shape[1]})
    return rows


def summarize(rows: list[dict]) -> dict:
    """The rows' evaluation share, its exact-time-weighted form, the mean survivors and the disagreements."""
    made = sum(r["evaluations"] for r in rows)
    weighted = sum(r["exact_seconds"] * r["evaluations"] / r["exhaustive"] for r in rows)
    return {"states": len(rows), "evaluation_share": made / sum(r["exhaustive"] for r in rows),
            "time_weighted_share": weighted / sum(r["exact_seconds"] for r in rows),
            "mean_survivors": sum(r["survivors"] for r in rows) / len(rows),
            "different_choice": sum(not r["same_choice"] for r in rows),
            "regret_sum": sum(r["regret"] for r in rows)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trajectory", type=Path, default=TRAJECTORY, help="a carfast.prune checkpoint of ResNet-56")
    ap.add_argument("--every", type=int, default=24, help="collect every this-many-th removal")
    ap.add_argument("--n", type=int, default=2000, help="scoring images: the first ones of the test set")
    ap.add_argument("--data", default=str(SHARED_TEST) if SHARED_TEST.is_file() else None,
                    help="CIFAR-10 test .npz (default: ../shared/data/cifar10/test.npz, else the bundled images)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--grid", default="default;block=64;block=32;strata=32;block=64,strata=32;delta=0.1",
                    help="the race settings to replay, ';'-separated: 'default' or Race keywords")
    ap.add_argument("--values", type=Path, default=None,
                    help="where the per-image losses are kept (default: benchmarks/results/race_values_<n>.pt)")
    ap.add_argument("--out", type=Path, default=RESULTS / "race_settings_resnet56.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    x, y = cifar10_test(path=args.data) if args.data else cifar10_test()
    if args.n > len(y):
        ap.error(f"--n {args.n} exceeds the {len(y)} images of the data")
    history = json.loads(args.trajectory.read_text())["history"]
    env = environment()
    print(describe_environment(env))
    values_path = args.values or RESULTS / f"race_values_{args.n}.pt"
    values_path.parent.mkdir(parents=True, exist_ok=True)
    values = collect(history, args.every, (x[:args.n], y[:args.n]), values_path)
    report = {"environment": env, "args": {k: str(v) for k, v in vars(args).items()}, "settings": {}}
    print(f"{'setting':28s} {'states':>6s} {'share':>6s} {'by time':>7s} {'surv.':>5s} {'differ':>6s}   "
          "stage 3 / 2 / 1 by time")
    for name in args.grid.split(";"):
        rows = replay(values, parse_race(name), history)
        stages = {f"layer{k}": summarize([r for r in rows if r["layer"].startswith(f"layer{k}.")]) for k in (3, 2, 1)
                  if any(r["layer"].startswith(f"layer{k}.") for r in rows)}
        total = summarize(rows)
        report["settings"][name] = {"summary": total, "stages": stages, "rows": rows}
        print(f"{name:28s} {total['states']:6d} {total['evaluation_share']:6.3f} {total['time_weighted_share']:7.3f} "
              f"{total['mean_survivors']:5.2f} {total['different_choice']:6d}   "
              + " / ".join(f"{s['time_weighted_share']:.3f}" for s in stages.values()), flush=True)
    write_json_atomic(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
