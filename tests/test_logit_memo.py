"""The logit memo: a removal takes the logits its step's scoring computed instead of a pass over every image,
and leaves the same cached state as the pass (``carfast/scoring/logit_memo.py``)."""
import pytest
import torch

import carfast
import carfast.scoring.suffix_eval as suffix_eval
from carfast.models import cifar_resnet
from carfast.scoring.logit_memo import LogitMemo
from carfast.scoring.pairs import active_pairs, suffix_base_logits

N = 64        # images, in two cached chunks


def _scorers(layer, n=N, chunk=N // 2):
    """(a scorer with the memo, one without it) of the bundled ResNet-20's ``layer``, two cached chunks."""
    model = cifar_resnet(20)
    data = carfast.data.cifar10_test(n=n)
    opts = carfast.ScoreOptions(chunk_images=chunk)
    memo = carfast.LayerScorer(model, layer, data, options=opts).prepare()
    plain = carfast.LayerScorer(model, layer, data, options=opts).prepare()
    plain._memo.budget = 0
    assert memo.method == plain.method == "suffix" and len(memo._cache) == 2
    return memo, plain


def _same_state(a, b):
    """a's and b's caches agree, and their logits are those of a whole pass over the updated tensors."""
    m = a._method
    for ca, cb in zip(a._cache, b._cache):
        assert torch.allclose(ca.logits, cb.logits, rtol=0, atol=1e-5)
        assert torch.equal(ca.base_correct, cb.base_correct)
        for za, zb in zip(ca.Z, cb.Z):
            assert torch.equal(za, zb)
        with torch.no_grad():
            full = suffix_base_logits(m.suffix, ca.Z, ca.B, m.pair_batch, m.channels_last)
        assert torch.allclose(ca.logits, full, rtol=0, atol=1e-5)


def _active(scorer, k) -> int:
    """Images where filter k is not all zero at the consumers (those a removal without the memo re-runs)."""
    return sum(int(active_pairs(c.A, scorer._method.lg.consumers, torch.tensor([k])).sum()) for c in scorer._cache)


@pytest.fixture
def passes(monkeypatch):
    """The images each removal pass of the suffix method ran over, in order."""
    seen = []
    real = suffix_eval.suffix_base_logits

    def spy(suffix, Z, B, *args, **kw):
        seen.append(Z[0].shape[0])
        return real(suffix, Z, B, *args, **kw)
    monkeypatch.setattr(suffix_eval, "suffix_base_logits", spy)
    return seen


@pytest.mark.parametrize("layer", ["layer1.1.conv1", "layer2.2.conv1"])
def test_greedy_with_the_memo_equals_greedy_with_the_pass(layer, passes):
    memo, plain = _scorers(layer)
    for _ in range(4):
        a, b = memo.score(), plain.score()
        assert torch.equal(a.correct, b.correct) and torch.equal(a.loss_sum, b.loss_sum)
        k = a.filters[int(a.loss_sum.argmin())].item()
        active = _active(plain, k)
        del passes[:]
        memo.remove(k)
        assert passes == []                        # every image it changes was scored
        plain.remove(k)
        assert sum(passes) == active               # without the memo: the images where k is not all zero
        _same_state(memo, plain)


def test_blocks_of_images_fill_the_memo_and_unscored_images_take_the_pass(passes):
    memo, plain = _scorers("layer2.1.conv1")
    half = torch.arange(0, N, 2)
    memo.score(images=half)                        # half of each chunk: the rest must be recomputed
    odd = sum(int(active_pairs(c.A, memo._method.lg.consumers, torch.tensor([5]))[0, 1::2].sum())
              for c in memo._cache)
    assert odd > 0
    del passes[:]
    memo.remove(5)
    assert sum(passes) == odd                      # the unscored images where filter 5 is not all zero
    plain.remove(5)
    _same_state(memo, plain)
    memo.score(images=half)
    memo.score(images=torch.arange(1, N, 2))      # every image, in two blocks, as the race scores them
    del passes[:]
    memo.remove(2)
    assert passes == []
    plain.remove(2)
    _same_state(memo, plain)


def test_a_removal_clears_the_memo(passes):
    memo, plain = _scorers("layer2.1.conv1")
    memo.score()
    memo.remove(4)
    plain.remove(4)
    active = _active(memo, 7)
    assert active > 0
    del passes[:]
    memo.remove(7)                                 # not scored since the last removal: the pass
    assert sum(passes) == active
    plain.remove(7)
    _same_state(memo, plain)
    assert torch.equal(memo.score().loss_sum, plain.score().loss_sum)


def test_low_precision_scores_keep_nothing(passes):
    model = cifar_resnet(20)
    scorer = carfast.LayerScorer(model, "layer2.1.conv1", carfast.data.cifar10_test(n=48), precision="bf16")
    scorer.prepare().score()
    active = _active(scorer, 3)
    assert active > 0
    del passes[:]
    scorer.remove(3)
    assert sum(passes) == active                   # bf16 logits are not the pass's float32 ones


def test_memo_budget():
    memo = LogitMemo(budget=2 * 10 * 4 * 10)       # two filters of 10 images x 10 classes
    assert memo.room(0, [0, 1], 10, 10) and not memo.room(0, [0, 1, 2], 10, 10)
    memo.add(0, 10, [0], torch.arange(4), torch.ones(1, 4, 10), torch.tensor([[True, True, False, True]]))
    logits, seen = memo.take(0, 0)
    assert seen.tolist() == [True, True, False, True] + [False] * 6 and torch.equal(logits[[0, 1, 3]],
                                                                                   torch.ones(3, 10))
    assert memo.room(0, [0, 1], 10, 10) and not memo.room(0, [1, 2], 10, 10)
    assert memo.take(0, 1) is None and memo.take(1, 0) is None
    memo.clear()
    assert memo.take(0, 0) is None and memo.bytes == 0
