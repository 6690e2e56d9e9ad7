"""The public entry points on small real inputs, each beside the naive rerun in the same run.

The bundled pretrained ResNet-20 and the first ``CARFAST_BENCH_N`` (200) images of the bundled CIFAR-10
slice. Each group holds carfast's row and the naive row (``tests/naive.py``: one full network run per
removed filter or channel, the filter zeroed at its consumer, a group's channel on its stream); the
carfast row is checked against the naive answer (image by image, near ties aside) before it is timed.

- ``score_layer`` per method: the suffix (layer1.0.conv1), the closed form (layer3.2.conv1), the full
  network (layer2.0.conv1 of a ResNet-20 whose forward torch.fx cannot trace).
- ``score_group``: the stage-2 residual group (layer2.1.conv2's, 32 channels).
- ``prune``: greedy CAR, layer1.0.conv1 16 -> 13 (three re-scorings), against the naive greedy loop.
- surgery: ``remove_filters`` (half of every block's first conv) and ``remove_groups`` (half of the
  stage-3 stream); no naive counterpart (the naive method zeroes, it does not cut): carfast rows only.
"""
from __future__ import annotations

import pytest
import torch
from conftest import cifar, resnet20
from naive import (
    RESNET20_STREAMS,
    naive_greedy,
    naive_scores,
    naive_stream_scores,
)
from torch import nn

import carfast
from carfast.scoring.selection import DEFAULT_RULE

ROUNDS = {"carfast": 3, "naive": 1}
NAIVE = {}      # group -> the naive answer, from the naive row (run first)


class Untraceable(nn.Module):
    """The pretrained ResNet-20 behind a data-dependent branch torch.fx cannot trace: score_layer falls
    back to its full-network method."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        if float(x.abs().sum()) >= 0:
            return self.net(x)
        return -self.net(x)


LAYERS = {   # method -> (model, layer, consumers of the naive run)
    "suffix": (resnet20, "layer1.0.conv1", {"layer1.0.conv2": 1}),
    "closed_form": (resnet20, "layer3.2.conv1", {"layer3.2.conv2": 1}),
    "full_network": (lambda: Untraceable(resnet20()), "net.layer2.0.conv1", {"net.layer2.0.conv2": 1}),
}


def _matches(res, ref):
    diff = res.image_correct != ref.correct
    assert not bool((diff & ~ref.near_ties()).any()), f"{int(diff.sum())} images differ from the naive run"


def _time(benchmark, group, who, fn):
    benchmark.group = group
    benchmark.extra_info.update(images=len(cifar()[1]), threads=torch.get_num_threads(), provider=who)
    return benchmark.pedantic(fn, rounds=ROUNDS[who], warmup_rounds=0, iterations=1)


@pytest.mark.parametrize("who", ["naive", "carfast"])
@pytest.mark.parametrize("method", list(LAYERS))
def test_score_layer(benchmark, method, who):
    make, layer, consumers = LAYERS[method]
    model, (x, y) = make(), cifar()
    group = f"score_layer {method}: resnet20 {layer.removeprefix('net.')}, {len(y)} images"
    if who == "naive":
        num = model.get_submodule(layer).out_channels
        NAIVE[group] = _time(benchmark, group, who, lambda: naive_scores(model, consumers, x, y, range(num)))
        return
    res = _time(benchmark, group, who, lambda: carfast.score_layer(model, layer, (x, y), per_image=True,
                                                                  progress=False))
    assert res.method == method
    _matches(res, NAIVE.get(group) or naive_scores(model, consumers, x, y, range(len(res.filters))))


@pytest.mark.parametrize("who", ["naive", "carfast"])
def test_score_group(benchmark, who):
    model, (x, y), layer = resnet20(), cifar(), "layer2.1.conv2"
    group = f"score_group: resnet20 stage 2 (32 channels), {len(y)} images"
    stream = RESNET20_STREAMS[layer]
    if who == "naive":
        NAIVE[group] = _time(benchmark, group, who, lambda: naive_stream_scores(model, stream, x, y, range(32)))
        return
    res = _time(benchmark, group, who, lambda: carfast.score_group(model, layer, (x, y), per_image=True,
                                                                  progress=False))
    _matches(res, NAIVE.get(group) or naive_stream_scores(model, stream, x, y, range(32)))


@pytest.mark.parametrize("who", ["naive", "carfast"])
def test_prune(benchmark, who):
    model, (x, y), layer = resnet20(), cifar(), "layer1.0.conv1"
    group = f"prune: resnet20 {layer} 16 -> 13 greedy, {len(y)} images"
    if who == "naive":
        NAIVE[group] = _time(benchmark, group, who,
                             lambda: naive_greedy(model, {"layer1.0.conv2": 1}, x, y, 16, 3, rule=DEFAULT_RULE))
        return
    res = _time(benchmark, group, who, lambda: carfast.prune(model, layer, (x, y), keep=13, progress=False))
    ref = NAIVE.get(group) or naive_greedy(model, {"layer1.0.conv2": 1}, x, y, 16, 3, rule=DEFAULT_RULE)
    assert res.removed[layer] == [r["filter"] for r in ref]


@pytest.mark.parametrize("what", ["remove_filters", "remove_groups"])
def test_surgery(benchmark, what):
    model = resnet20()
    example = cifar()[0][:1]
    if what == "remove_filters":
        removals = {n: list(range(0, m.out_channels, 2)) for n, m in model.named_modules() if n.endswith("conv1")
                    and n.startswith("layer")}
        fn = carfast.remove_filters
    else:
        removals = {"layer3.2.conv2": list(range(0, 64, 2))}
        fn = carfast.remove_groups
    benchmark.group = "surgery: resnet20"
    benchmark.extra_info.update(layers=len(removals), threads=torch.get_num_threads())
    pruned = benchmark.pedantic(lambda: fn(model, removals, example=example), rounds=3, warmup_rounds=1,
                                iterations=1)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
