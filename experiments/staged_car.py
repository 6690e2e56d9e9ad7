"""CAR that anticipates retraining: filters chosen stage by stage, the network recovering in between (issue 23).

    python experiments/staged_car.py [--threads 1]     (resumable; writes results/whole_car-loss-staged_ckpt.json)

Greedy CAR scores every filter on the network as it is at that step. Late in a whole-network run that
network is damaged (about 74 % on its selection images when the last layers are chosen), and a filter's
score then says how much it matters to a network that retraining will repair, not to the network that
retraining will produce. The attempt: prune ResNet-56's block conv1s to half one stage at a time (the
layer3 blocks, then layer2, then layer1; deepest layer first within a stage, as ``whole_network.py``),
and between stages let the network recover with a short distilled fine-tune (``RECOVER``: one epoch of
the 5,000 training images of ``retrain_curve.py``'s ``train5000``, its recipe), so every stage's CAR
scores are measured on a repaired network. This is the interleaving of pruning and fine-tuning that
Molchanov et al. (arXiv 1611.06440) and Han et al. (arXiv 1506.02626) use, with CAR as the score.

Only the choice is kept: the removed filters (original indices: each stage's layers are untouched by the
earlier stages' surgery) are cut from the pretrained network, so that ``retrain_curve.py`` retrains it
exactly as it retrains every other criterion (``--run car-loss-staged``), and the recovery fine-tunes,
which the other criteria do not get, do not enter the curve.

CAR here is the raced search with four removals per scoring (``carfast.prune(search="race", step=4)``) on
the same 2,000 selection images as every other run; ``whole_network.py`` measured that setting on 1,000
images within a point of the exact search before retraining (experiments/RESULTS.md).
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from retrain_curve import N_SELECT, OUT, RECIPE, RESULTS, SHARED, MemoTeacher
from whole_network import block_conv1s

import carfast
from carfast.atomic import write_json_atomic
from carfast.finetune import finetune
from carfast.pruning.evaluate import evaluate

RUN = "car-loss-staged"
STAGES = ("layer3", "layer2", "layer1")
STEP = 4
#: the recovery between stages: retrain_curve's recipe for one epoch of its 5,000 training images, seed 0
RECOVER = dict(RECIPE, epochs=1, seed=0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--test", default=str(SHARED / "test.npz"), help="the lossless CIFAR-10 test .npz")
    ap.add_argument("--train", default=str(SHARED / "train_jpegq75.npz"), help="the JPEG-packed training .npz")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    x, y = carfast.data.cifar10_test(path=args.test)
    select, held = (x[:N_SELECT], y[:N_SELECT]), (x[N_SELECT:N_SELECT + 5000], y[N_SELECT:N_SELECT + 5000])
    train = carfast.data.cifar10_train(args.train, 5000, seed=0)
    pretrained = carfast.models.cifar_resnet(56).eval()
    teacher = MemoTeacher(pretrained, OUT / "teacher_logits")
    work = RESULTS / "staged"
    work.mkdir(parents=True, exist_ok=True)
    model, history, stages = pretrained, [], []
    t0 = time.perf_counter()
    for i, stage in enumerate(STAGES):
        layers = [n for n in block_conv1s(model, "reverse") if n.startswith(stage + ".")]
        res = carfast.prune(model, layers, select, keep=0.5, criterion="car", rule="loss", search="race", step=STEP,
                            checkpoint=work / f"stage{i}_ckpt.json", progress=True)
        history += [dict(row, stage=i) for row in res.history]
        row = {"stage": stage, "pruned_selection": evaluate(res.model, select).accuracy,
               "pruned_held_out": evaluate(res.model, held).accuracy}
        model = res.model
        if i + 1 < len(STAGES):
            model = finetune(model, train, RECOVER, teacher=teacher, calibrate=select,
                             checkpoint=work / f"recover{i}_ckpt.pt", progress=True).eval()
            row.update(recovered_selection=evaluate(model, select).accuracy,
                       recovered_held_out=evaluate(model, held).accuracy)
        stages.append(row)
        print(json.dumps(row), flush=True)
    removed: dict[str, list[int]] = {}
    for r in history:
        removed.setdefault(r["layer"], []).append(r["filter"])
    rebuilt = carfast.remove_filters(pretrained, removed).eval()
    write_json_atomic(RESULTS / f"whole_{RUN}_ckpt.json", {
        "settings": {"stages": STAGES, "step": STEP, "search": "race", "rule": "loss", "recover": RECOVER,
                     "n_select": N_SELECT},
        "history": history, "stages": stages, "seconds_this_sitting": time.perf_counter() - t0,
        # the pretrained network with the chosen filters cut: what retrain_curve.py rebuilds and checks
        "rebuilt_correct": evaluate(rebuilt, select).correct})
    print(f"{RUN}: {sum(len(v) for v in removed.values())} filters removed; the pretrained network without them: "
          f"{100 * evaluate(rebuilt, held).accuracy:.2f} % held out", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
