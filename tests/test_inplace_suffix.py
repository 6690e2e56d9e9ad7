"""A network that computes in place right after the consumer (AlexNet's classifier: Linear ->
ReLU(inplace=True)) must not corrupt the scorer's cache: every greedy step's recorded accuracy and loss
equal the physically pruned network's. (The suffix once ran on views of the cached consumer outputs, so
the in-place ReLU clamped them and the greedy drifted after its first removal.)"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import carfast
from carfast.pruning.evaluate import evaluate


class InplaceHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                                      nn.Conv2d(12, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(8 * 4 * 4, 24), nn.ReLU(inplace=True),
                                        nn.Linear(24, 24), nn.ReLU(inplace=True), nn.Linear(24, 5))

    def forward(self, x):
        return self.classifier(self.features(x))


@pytest.mark.parametrize("layer", ["features.3", "features.0"])
def test_greedy_steps_equal_the_pruned_network(layer):
    torch.manual_seed(0)
    model = InplaceHead().eval()
    x = torch.randn(96, 3, 16, 16)
    with torch.no_grad():
        logits = model(x)
    y = torch.where(torch.rand(96) < 0.7, logits.argmax(1), torch.randint(0, 5, (96,)))
    width = model.get_submodule(layer).out_channels
    res = carfast.prune(model, layer, (x, y), keep=width // 2, progress=False)
    for i, row in enumerate(res.history):
        pruned = carfast.remove_filters(model, {layer: res.removed[layer][:i + 1]})
        ev = evaluate(pruned, (x, y))
        assert row["correct"] == ev.correct, (layer, i)
        assert row["loss"] == pytest.approx(ev.loss, rel=1e-5, abs=1e-6), (layer, i)
