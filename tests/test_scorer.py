"""LayerScorer: the prefix cache gives the same counts as streaming, across repeated scores."""
import pytest
import torch

import carfast
from carfast.models import cifar_resnet


def test_cached_and_streamed_scores_agree():
    model = cifar_resnet(20)
    x, y = carfast.data.cifar10_test(n=60)
    batches = list(zip(x.split(16), y.split(16)))
    cached = carfast.LayerScorer(model, "layer2.1.conv1", batches).prepare()
    assert cached.cached
    streamed = carfast.LayerScorer(model, "layer2.1.conv1", batches, memory_budget=6 << 20,
                                   options=carfast.ScoreOptions(chunk_images=8))
    a, b = cached.score(filters=[4, 1, 9]), streamed.score(filters=[4, 1, 9])
    assert not streamed.cached
    again = streamed.score(filters=[9, 4])   # a second pass re-reads the data
    assert torch.equal(a.correct, b.correct) and torch.allclose(a.loss_sum, b.loss_sum)
    assert torch.equal(again.correct, a.correct[[2, 0]])
    assert a.filters.tolist() == [4, 1, 9]


def test_one_shot_iterator_cannot_be_streamed_twice():
    model = cifar_resnet(20)
    x, y = carfast.data.cifar10_test(n=20)
    scorer = carfast.LayerScorer(model, "layer3.0.conv1", iter(list(zip(x.split(8), y.split(8)))),
                                 options=carfast.ScoreOptions(cache=False))
    scorer.score(filters=[0])
    assert not scorer.cached
    with pytest.raises(ValueError, match="one-shot iterator"):
        scorer.score(filters=[1])


def test_progress_callback_counts_every_pair():
    model = cifar_resnet(20)
    x, y = carfast.data.cifar10_test(n=30)
    for layer in ("layer2.2.conv1", "layer3.2.conv1"):          # suffix and closed-form paths
        calls = []
        carfast.score_layer(model, layer, (x, y), filters=[0, 3, 5],
                            progress=lambda done, total, calls=calls: calls.append((done, total)))
        assert calls and calls[-1] == (3 * 30, 3 * 30)
        assert all(b[0] >= a[0] for a, b in zip(calls, calls[1:]))


@pytest.mark.parametrize("layer", ["layer2.1.conv1", "layer3.2.conv1"])      # suffix and closed form
def test_remove_updates_cached_and_streamed_state_alike(layer):
    """After remove(), scores equal those of the model with the filters zeroed (a fresh scorer with a
    hook), whether the prefix is cached (updated in place) or streamed (updated per chunk)."""
    model = cifar_resnet(20)
    x, y = carfast.data.cifar10_test(n=48)
    consumer = layer.replace("conv1", "conv2")
    cached = carfast.LayerScorer(model, layer, (x, y)).prepare()
    streamed = carfast.LayerScorer(model, layer, (x, y), memory_budget=6 << 20,
                                   options=carfast.ScoreOptions(chunk_images=16))
    for k in (3, 0):
        cached.remove(k)
        streamed.remove(k)
    assert cached.remaining == streamed.remaining == [k for k in range(cached.num_filters) if k not in (3, 0)]
    a, b = cached.score(), streamed.score()
    assert not streamed.cached and a.filters.tolist() == cached.remaining
    assert torch.equal(a.correct, b.correct) and torch.allclose(a.loss_sum, b.loss_sum)
    def zero_3_and_0(_module, args):
        x = args[0].clone()
        x[:, [3, 0]] = 0
        return (x,) + tuple(args[1:])
    hook = model.get_submodule(consumer).register_forward_pre_hook(zero_3_and_0)
    try:
        with torch.no_grad():
            masked = model(x)
        ref = carfast.score_layer(model, layer, (x, y), filters=a.filters[:6])
    finally:
        hook.remove()
    assert int(a.base_correct.sum()) == int((masked.argmax(1) == y).sum())
    assert torch.equal(a.correct[:6], ref.correct)


def test_remove_bad_input():
    scorer = carfast.LayerScorer(cifar_resnet(20), "layer1.0.conv1", carfast.data.cifar10_test(n=8))
    scorer.remove(2)
    with pytest.raises(ValueError, match="already removed"):
        scorer.remove(2)
    with pytest.raises(ValueError, match="out of range"):
        scorer.remove(16)
    with pytest.raises(TypeError, match="one int"):
        scorer.remove([1, 2])
    with pytest.raises(ValueError, match=r"filters \[2\].*were removed"):
        scorer.score(filters=[1, 2])
