"""The private parts of other libraries that carfast uses, each behind one module of its own, checked here
against the installed versions: a release that changes one fails here, by name."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from carfast.ops import onednn


@pytest.mark.skipif(not onednn.available(), reason="this torch has no oneDNN fused convolution")
def test_onednn_private_ops_have_the_schemas_carfast_calls():
    schema = str(torch.ops.mkldnn._convolution_pointwise.default._schema)
    assert "(Tensor X, Tensor W, Tensor? B, int[] padding, int[] stride, int[] dilation, int groups, str attr, " \
           "Scalar?[] scalars, str? algorithm)" in schema, schema
    binary = str(torch.ops.mkldnn._convolution_pointwise.binary._schema)
    assert "(Tensor X, Tensor other, Tensor W, Tensor? B, int[] padding, int[] stride, int[] dilation, int groups, " \
           "str binary_attr, Scalar? alpha, str? unary_attr, Scalar?[] unary_scalars, str? unary_algorithm)" in binary
    assert onednn.supports(torch.float32)
    assert isinstance(onednn.supports(torch.bfloat16), bool) and isinstance(onednn.supports(torch.float16), bool)


@pytest.mark.skipif(not onednn.available(), reason="this torch has no oneDNN fused convolution")
def test_onednn_fused_convolutions_compute_what_plain_pytorch_does():
    g = torch.Generator().manual_seed(0)
    x, other = torch.randn(2, 3, 9, 9, generator=g), torch.randn(2, 4, 5, 5, generator=g)
    w, b = torch.randn(4, 3, 3, 3, generator=g), torch.randn(4, generator=g)
    args = ([1, 1], [2, 2], [1, 1], 1)                      # padding, stride, dilation, groups
    want = F.conv2d(x, w, b, stride=2, padding=1)
    assert torch.allclose(onednn.conv_relu(x, w, b, *args), want.relu(), atol=1e-5)
    assert torch.allclose(onednn.conv_add_relu(x, other, w, b, *args), (want + other).relu(), atol=1e-5)


def test_torch_pruning_private_attributes_carfast_reads():
    tp = pytest.importorskip("torch_pruning")
    from carfast.integrations import tp_internals

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.Flatten(), nn.LazyLinear(2))
    example = torch.randn(1, 3, 8, 8)
    model(example)
    pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=0.5, ignored_layers=[model[4]])
    assert hasattr(pruner, "_check_pruning_ratio"), "Torch-Pruning renamed BasePruner._check_pruning_ratio"
    groups = list(pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                           root_module_types=pruner.root_module_types))
    assert groups
    for group in groups:
        graph = tp_internals.graph_of(group)
        assert graph is pruner.DG
        assert tp_internals.layer_name(graph, group[0].dep.target.module) in ("0", "2")
        assert tp_internals.asked(pruner, group) is True
    assert tp_internals.layer_name(pruner.DG, nn.Conv2d(1, 1, 1)) is None
