"""The raced search against the exact one, step by step, on the states of a whole-network greedy run.

    python benchmarks/bench_race_steps.py [--trajectory experiments/results/whole_car-loss_ckpt.json]
                                          [--races "default;block=64"] [--every 12] [--n 2000]
                                          [--race-n 5000] [--removals A:B] [--data test.npz] [--threads 1]
                                          [--out FILE]
    python benchmarks/bench_race_steps.py --every 24 --summarize FIRST.json RETIMED.json --out MERGED.json

A long run's wall time mixes whatever else the machine was doing; this benchmark times the two searches
side by side instead. It replays a recorded greedy run of the bundled ResNet-56 (a ``carfast.prune``
checkpoint; by default the exact search's whole-network run of experiments/whole_network.py: its 27
block conv1s to half, deepest first, on the first 2,000 CIFAR-10 test images) and at every ``--every``-th
removal rebuilds that state (the finished layers cut, the current one's earlier removals made in its
scorer) and times, in one process, back to back and in alternating order:

- ``exact``: scoring every remaining filter on every image and ranking them (``score_by_rule``, loss rule);
- ``race``: the raced search of that step for each ``--races`` setting (the step's seed as the pruning
  loop draws it);
- ``removal``: making the exact choice's removal in the scorer's cache, which both searches do once per
  step (with the logit memo: the pass over the images whose logits the scoring did not keep), beside
  ``pass``: a whole pass of the network after the layer over every image (a removal without the memo),
  and ``prefix``: the state's prefix pass (once per layer for both).

It records each race's choice (and its regret: the mean loss it adds over the exact choice's), its
candidate-image evaluations, and the estimated whole-run seconds of each search, with and without the
memo: the sampled steps' times times the sampling interval, plus one prefix pass per layer at the
measured mean. Evaluation counts do not depend on the machine; seconds do, so both searches are timed
within the same minute.

``--summarize`` writes the summary of earlier outputs instead of timing anything: the rows of a later
file replace the same removals' rows of an earlier one (a part of the run re-timed with ``--removals``).

``--race-n`` races on more images than the exact search scores (the first ``--race-n`` of the test set,
in a second scorer of the same state with its own prefix pass and removal): what the same time buys.
The choices then may differ legitimately, and no regret is computed.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import describe_environment, environment, write_json_atomic  # noqa: E402

import carfast  # noqa: E402
from carfast.data import cifar10_test  # noqa: E402
from carfast.scoring.pairs import suffix_base_logits  # noqa: E402
from carfast.scoring.race import Race, race_scores  # noqa: E402
from carfast.scoring.selection import score_by_rule, settled_keys  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHARED_TEST = REPO.parent / "shared" / "data" / "cifar10" / "test.npz"
TRAJECTORY = REPO / "experiments" / "results" / "whole_car-loss_ckpt.json"


def state(history: list[dict], r: int, data):
    """(scorer, seconds of its prefix pass) at removal ``r`` of ``history``: the layers finished before it
    cut from a fresh ResNet-56, the current layer's earlier removals made in the scorer."""
    layer = history[r]["layer"]
    done: dict[str, list[int]] = {}
    for row in history[:r]:
        done.setdefault(row["layer"], []).append(row["filter"])
    current = done.pop(layer, [])
    model = carfast.models.cifar_resnet(56)
    if done:
        model = carfast.remove_filters(model, done, example=data[0][:2])
    scorer = carfast.LayerScorer(model, layer, data, progress=False)
    t = time.perf_counter()
    scorer.prepare()
    prefix = time.perf_counter() - t
    for f in current:                      # this layer is still whole: scorer index = original index
        scorer.remove(f)
    return scorer, prefix


def pass_seconds(scorer) -> float:
    """Seconds of a removal's pass over every cached image (what a removal costs without the logit memo)."""
    m = scorer._method
    if m.name != "suffix":
        return float("nan")
    t = time.perf_counter()
    with torch.no_grad():
        for chunk in scorer._cache:
            suffix_base_logits(m.suffix, chunk.Z, chunk.B, m.pair_batch, m.channels_last)
    return time.perf_counter() - t


def exact_step(scorer) -> tuple[int, float, dict]:
    """(the exact choice, seconds, {filter: its loss sum over the images})."""
    t = time.perf_counter()
    s, keys = score_by_rule(scorer, "loss", None)
    filters = s.filters.tolist()
    best = min(range(len(filters)), key=lambda i: (keys[i], filters[i]))
    return filters[best], time.perf_counter() - t, dict(zip(filters, s.loss_sum.tolist()))


def race_step(scorer, step_key: str, settings: Race) -> tuple[int, float, tuple[int, int]]:
    t = time.perf_counter()
    (s,), outcome = race_scores([(scorer, scorer.remaining)], "loss", settings, None, step_key)
    keys = settled_keys(scorer, s, "loss")
    filters = s.filters.tolist()
    best = min(range(len(filters)), key=lambda i: (keys[i], filters[i]))
    return filters[best], time.perf_counter() - t, (outcome.evaluations, outcome.exhaustive)


def parse_race(text: str) -> Race:
    """'default' -> Race(); 'block=64,epsilon=1e-4' -> Race(block=64, epsilon=1e-4)."""
    if text == "default":
        return Race()
    kw = {}
    for part in text.split(","):
        key, value = part.split("=")
        kw[key] = int(value) if key in ("block", "strata", "seed") else float(value)
    return Race(**kw)


def summarize(rows: list[dict], name: str, every: int, layers: int) -> dict:
    """Whole-run estimates for race setting ``name``: the sampled steps times ``every``, plus ``layers``
    prefix passes at the sampled mean (each search its own: they differ with ``--race-n``)."""
    prefix = layers * statistics.mean(r["prefix_seconds"] for r in rows)
    race_prefix = layers * statistics.mean(r["race_prefix_seconds"] for r in rows)
    exact = every * sum(r["exact_seconds"] + r["removal_seconds"] for r in rows) + prefix
    race = every * sum(r["races"][name]["seconds"] + r["race_removal_seconds"] for r in rows) + race_prefix
    # the same with every removal a whole pass (no logit memo; the closed form's removal is its own)
    def passes(key, removal):
        return [r[key] if r[key] == r[key] else r[removal] for r in rows]
    exact_pass = every * sum(r["exact_seconds"] + p for r, p in zip(rows, passes("pass_seconds", "removal_seconds"))
                             ) + prefix
    race_pass = every * sum(r["races"][name]["seconds"] + p for r, p in
                            zip(rows, passes("race_pass_seconds", "race_removal_seconds"))) + race_prefix
    same = sum(r["races"][name]["choice"] == r["exact_choice"] for r in rows)
    return {"sampled_steps": len(rows), "same_choice": same,
            "estimated_exact_seconds": exact, "estimated_race_seconds": race, "time_ratio": race / exact,
            "search_time_ratio": sum(r["races"][name]["seconds"] for r in rows) / sum(r["exact_seconds"] for r in rows),
            "evaluation_share": sum(r["races"][name]["evaluations"] for r in rows) / sum(r["exact_evaluations"]
                                                                                        for r in rows),
            "regret_sum": (None if rows[0]["races"][name]["regret"] is None
                           else sum(r["races"][name]["regret"] for r in rows)),
            "without_memo": {"estimated_exact_seconds": exact_pass, "estimated_race_seconds": race_pass,
                             "time_ratio": race_pass / exact_pass}}


def merged(paths: list[Path], every: int, trajectory: Path, out: Path) -> int:
    """Summarize the rows of earlier outputs, a later file's rows replacing an earlier one's of the same removal."""
    outputs = [json.loads(p.read_text()) for p in paths]
    rows = {}
    for o in outputs:
        rows.update({r["removal"]: r for r in o["rows"]})
    rows = [rows[r] for r in sorted(rows)]
    layers = len({row["layer"] for row in json.loads(trajectory.read_text())["history"]})
    summary = {name: summarize(rows, name, every, layers) for name in rows[0]["races"]}
    write_json_atomic(out, {"environment": [o["environment"] for o in outputs], "merged_from": [str(p) for p in paths],
                            "rows": rows, "summary": summary})
    print(json.dumps(summary, indent=1))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trajectory", type=Path, default=TRAJECTORY, help="a carfast.prune checkpoint of ResNet-56")
    ap.add_argument("--races", default="default", help="the race settings to time, ';'-separated: 'default' "
                    "or Race keywords, e.g. 'default;block=64;epsilon=1e-4'")
    ap.add_argument("--every", type=int, default=12, help="time every this-many-th removal")
    ap.add_argument("--removals", default=None, metavar="A:B",
                    help="only the sampled removals in [A, B) (to re-time part of a run; the summary covers them only)")
    ap.add_argument("--summarize", type=Path, nargs="+", default=None, metavar="JSON",
                    help="summarize these outputs (later rows replace earlier ones of the same removal) into --out")
    ap.add_argument("--n", type=int, default=2000, help="scoring images: the first ones of the test set")
    ap.add_argument("--race-n", type=int, default=None,
                    help="the race's scoring images, when more or fewer than the exact search's --n")
    ap.add_argument("--data", default=str(SHARED_TEST) if SHARED_TEST.is_file() else None,
                    help="CIFAR-10 test .npz (default: ../shared/data/cifar10/test.npz, else the bundled images)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "race_steps_resnet56.json")
    args = ap.parse_args(argv)
    if args.summarize:
        return merged(args.summarize, args.every, args.trajectory, args.out)
    torch.set_num_threads(args.threads)
    x, y = cifar10_test(path=args.data) if args.data else cifar10_test()
    race_n = args.race_n or args.n
    if max(args.n, race_n) > len(y):
        ap.error(f"--n {args.n} / --race-n {race_n} exceeds the {len(y)} images of the data")
    data = (x[:args.n], y[:args.n])
    history = json.loads(args.trajectory.read_text())["history"]
    env = environment()
    print(describe_environment(env))
    races = {name: parse_race(name) for name in args.races.split(";")}
    rows = []
    lo, hi = (int(v) for v in args.removals.split(":")) if args.removals else (0, len(history))
    for i, r in enumerate(r for r in range(0, len(history), args.every) if lo <= r < hi):
        scorer, prefix = state(history, r, data)
        rscorer, race_prefix = (scorer, prefix) if race_n == args.n else state(history, r, (x[:race_n], y[:race_n]))
        step_key = str(r + 1)
        if i % 2 == 0:       # alternate which search runs first
            exact, t_exact, loss = exact_step(scorer)
        raced = {name: race_step(rscorer, step_key, settings) for name, settings in races.items()}
        if i % 2 == 1:
            exact, t_exact, loss = exact_step(scorer)
        t_pass = pass_seconds(scorer)
        t = time.perf_counter()
        scorer.remove(exact)
        t_removal = time.perf_counter() - t
        race_pass, race_removal = t_pass, t_removal
        if rscorer is not scorer:     # the race removes its own first setting's choice from its own cache
            race_pass = pass_seconds(rscorer)
            t = time.perf_counter()
            rscorer.remove(next(iter(raced.values()))[0])
            race_removal = time.perf_counter() - t
        row = {"removal": r, "layer": history[r]["layer"], "candidates": len(loss), "exact_choice": exact,
               "recorded_choice": history[r]["filter"], "exact_seconds": t_exact, "removal_seconds": t_removal,
               "pass_seconds": t_pass, "prefix_seconds": prefix, "exact_evaluations": len(loss) * args.n,
               "race_images": race_n, "race_prefix_seconds": race_prefix, "race_removal_seconds": race_removal,
               "race_pass_seconds": race_pass, "races": {}}
        line = (f"{r:4d} {history[r]['layer']:15s} K={len(loss):2d} exact {t_exact:6.2f} s  removal {t_removal:.2f} s "
                f"(a whole pass {t_pass:.2f} s)")
        for name, (choice, seconds, (made, _)) in raced.items():
            # the mean loss the race's choice adds over exact's, on the same images
            regret = (loss[choice] - loss[exact]) / args.n if race_n == args.n else None
            row["races"][name] = {"choice": choice, "seconds": seconds, "evaluations": made, "regret": regret}
            line += f" | {name}: {seconds:5.2f} s {made / row['exact_evaluations']:.3f}" + (
                "" if choice == exact else " other choice" if regret is None else f" regret {regret:.1e}")
        rows.append(row)
        print(line, flush=True)
        write_json_atomic(args.out, {"environment": env, "args": {k: str(v) for k, v in vars(args).items()},
                                     "rows": rows})
    summary = {name: summarize(rows, name, args.every, len({row["layer"] for row in history})) for name in races}
    write_json_atomic(args.out, {"environment": env, "args": {k: str(v) for k, v in vars(args).items()},
                                 "rows": rows, "summary": summary})
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
