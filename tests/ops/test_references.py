"""The plain-PyTorch references of ablated_consumer, closed_form_score and score_reduce against direct
definitions (a conv with the channel zeroed, a loop over pairs), and opcheck of the registered ops
(here their CPU kernels are these references; the GPU kernels are tested in test_triton_ops.py and
test_cuda_ops.py)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from compare import assert_close_verbose

from carfast import extensions
from carfast.ops.ablated_consumer import ablated_consumer_ref
from carfast.ops.closed_form_logits import closed_form_logits_ref
from carfast.ops.closed_form_score import closed_form_score_ref
from carfast.ops.epilogue import epilogue
from carfast.ops.score_reduce import check_score_reduce_args, score_reduce_ref

needs_ops = pytest.mark.skipif(not extensions.has_op("score_reduce"), reason="carfast._C (the op schemas) is not built")


def _case(N=3, K=4, O=5, H=7, W=5, k=3, stride=1, padding=1, dilation=1, C=6, seed=0):
    """Operands of the ops: a consumer conv with bias, its epilogue, an affine tail, logits."""
    g = torch.Generator().manual_seed(seed)
    a = torch.relu(torch.randn(N, K, H, W, generator=g))
    a[0, 1] = 0                                                     # a free zero
    weight = torch.randn(O, K, k, k, generator=g) / math.sqrt(K * k * k)
    bias = torch.randn(O, generator=g)
    z = F.conv2d(a, weight, bias, stride, padding, dilation)
    Ho, Wo = z.shape[2:]
    return dict(a=a, weight=weight, bias=bias, z=z, scale=torch.rand(O, generator=g) + 0.5,
                shift=torch.randn(O, generator=g),
                residual=torch.randn(N, O, Ho, Wo, generator=g), act=1,
                tail=torch.randn(C, O, Ho, Wo, generator=g) / math.sqrt(O * Ho * Wo),
                logits=torch.randn(N, C, generator=g) * 3, stride=(stride, stride), padding=(padding, padding),
                dilation=(dilation, dilation))


@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 0, 1), (1, 2, 2)])
@pytest.mark.parametrize("act", [0, 1, 2])
def test_ablated_consumer_ref_is_the_conv_with_the_channel_zeroed(stride, padding, dilation, act):
    c = _case(stride=stride, padding=padding, dilation=dilation)
    filters, images = torch.tensor([0, 3, 1, 1]), torch.tensor([2, 0, 0, 1])
    out = ablated_consumer_ref(c["a"], c["weight"], c["z"], c["scale"], c["shift"], c["residual"], act, filters,
                               images, c["stride"], c["padding"], c["dilation"])
    assert out.shape == (4,) + tuple(c["z"].shape[1:]) and out.is_contiguous(memory_format=torch.channels_last)
    for p, (k, n) in enumerate(zip(filters.tolist(), images.tolist())):   # the consumer rerun, channel zeroed
        a = c["a"][n:n + 1].clone()
        a[:, k] = 0
        zk = F.conv2d(a, c["weight"], c["bias"], c["stride"], c["padding"], c["dilation"])
        want = epilogue(zk, c["scale"], c["shift"], c["residual"][n:n + 1], act, 2)[0]
        assert_close_verbose(out[p], want, atol=1e-5, rtol=1e-5, what=f"pair {p}")
    half = ablated_consumer_ref(c["a"], c["weight"], c["z"], c["scale"], c["shift"], None, act, filters, images,
                                c["stride"], c["padding"], c["dilation"], out_dtype=torch.float16)
    assert half.dtype == torch.float16


def test_score_reduce_ref_is_a_loop_over_pairs():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(40, 7, generator=g)
    logits[5] = 0                                                   # an exact tie goes to class 0
    labels = torch.randint(0, 7, (40,), generator=g)
    slots = torch.sort(torch.randint(0, 4, (40,), generator=g)).values
    counts, loss, correct = score_reduce_ref(logits, labels, slots, 5)
    want_c = torch.zeros(5, 7, dtype=torch.long)
    want_l = torch.zeros(5, 7, dtype=torch.float64)
    for p in range(40):
        ok = int(logits[p].argmax()) == int(labels[p])
        assert bool(correct[p]) == ok
        want_c[slots[p], labels[p]] += int(ok)
        want_l[slots[p], labels[p]] += -torch.log_softmax(logits[p].double(), 0)[labels[p]]
    assert torch.equal(counts, want_c)
    assert torch.allclose(loss, want_l, rtol=1e-12)
    assert bool(correct[5]) == (int(labels[5]) == 0)


def test_score_reduce_checks_its_arguments():
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match="slots must be non-decreasing"):
        check_score_reduce_args(x, y, torch.tensor([1, 0, 0, 0]), 2)
    with pytest.raises(ValueError, match="num_slots=1"):
        check_score_reduce_args(x, y, torch.tensor([0, 0, 1, 1]), 1)
    with pytest.raises(ValueError, match="labels must be int64"):
        check_score_reduce_args(x, y.int(), torch.tensor([0, 0, 1, 1]), 2)


def test_closed_form_score_ref_reduces_the_closed_form_logits():
    c = _case()
    filters, labels = torch.tensor([2, 0, 1]), torch.tensor([0, 3, 5])
    args = (c["a"], c["weight"], c["z"], c["scale"], c["shift"], c["residual"], c["act"], c["tail"], c["logits"],
            filters)
    abl = closed_form_logits_ref(*args, c["stride"], c["padding"], c["dilation"])          # [J, N, C]
    counts, loss, correct = closed_form_score_ref(*args, labels, c["stride"], c["padding"], c["dilation"])
    assert torch.equal(correct, abl.argmax(2) == labels)
    onehot = F.one_hot(labels, 6)
    assert torch.equal(counts, (correct.long().unsqueeze(2) * onehot).sum(1))
    ce = -torch.log_softmax(abl.double(), 2).gather(2, labels.view(1, -1, 1).expand(3, -1, 1))[..., 0]
    assert torch.allclose(loss, (ce.unsqueeze(2) * onehot).sum(1), rtol=1e-12)


@needs_ops
def test_opcheck_registered_ops_on_cpu():
    c = _case()
    filters, images = torch.tensor([0, 3, 1]), torch.tensor([2, 0, 1])
    torch.library.opcheck(torch.ops.carfast.ablated_consumer.default,
                          (c["a"], c["weight"], c["z"], c["scale"], c["shift"], c["residual"], 1, filters, images,
                           [1, 1], [1, 1], [1, 1], None))
    torch.library.opcheck(torch.ops.carfast.closed_form_score.default,
                          (c["a"], c["weight"], c["z"], c["scale"], c["shift"], None, 2, c["tail"], c["logits"],
                           filters, torch.tensor([0, 3, 5]), [1, 1], [1, 1], [1, 1]))
    torch.library.opcheck(torch.ops.carfast.score_reduce.default,
                          (torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1]), torch.tensor([0, 0, 1, 1, 1, 2]), 3))
