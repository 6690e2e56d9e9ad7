"""The fine-tune recipe of the retraining study: distillation from a teacher, BatchNorm statistics re-estimated
on other images, and a checkpoint that resumes an interrupted run bit for bit."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from carfast.finetune import FinetuneConfig, finetune, random_crop_flip, recalibrate_bn


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Dropout(0.1), nn.Linear(8, 3)).eval()


def _data(n=96, seed=1):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, 3, 8, 8, generator=g)
    x[torch.arange(n), y] += 1.0
    return x, y


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


CFG = dict(epochs=3, lr=0.05, batch_size=16, seed=3, bn_stats="update", checkpoint_images=32)


def test_distillation_is_the_mixed_loss_by_hand():
    """One full-batch step of plain SGD on (1 - a) CE + a T^2 KL equals ``finetune`` with that teacher."""
    torch.manual_seed(0)
    student, teacher = nn.Linear(4, 3), nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.arange(8) % 3
    cfg = dict(epochs=1, lr=0.1, batch_size=8, momentum=0.0, nesterov=False, weight_decay=0.0, augment=False,
               schedule="constant", distill=0.75, temperature=2.0)
    out = finetune(student, (x, y), cfg, teacher=teacher, progress=False)
    ref = nn.Linear(4, 3)
    ref.load_state_dict(student.state_dict())
    s, t = ref(x), teacher(x).detach()
    kd = F.kl_div(F.log_softmax(s / 2, 1), F.softmax(t / 2, 1), reduction="batchmean") * 4
    loss = 0.25 * F.cross_entropy(s, y) + 0.75 * kd
    loss.backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= 0.1 * p.grad
    assert torch.allclose(out.weight, ref.weight, atol=1e-6) and torch.allclose(out.bias, ref.bias, atol=1e-6)
    assert not torch.equal(out.weight, finetune(student, (x, y), dict(cfg, distill=0.0), progress=False).weight)


def test_full_distillation_pulls_the_student_to_the_teacher():
    x, y = _data()
    teacher = finetune(_net(1), (x, y), dict(epochs=4, lr=0.05, batch_size=16), progress=False)
    wrong = (y + 1) % 3              # labels that disagree: with distill=1 only the teacher counts
    student = finetune(_net(2), (x, wrong), dict(epochs=6, lr=0.05, batch_size=16, distill=1.0), teacher=teacher,
                       progress=False)
    with torch.no_grad():
        agree = (student(x).argmax(1) == teacher(x).argmax(1)).float().mean()
    assert agree > 0.8


def test_teacher_and_distill_go_together():
    x, y = _data(32)
    with pytest.raises(ValueError, match="distill=0.5 needs teacher="):
        finetune(_net(), (x, y), dict(distill=0.5), progress=False)
    with pytest.raises(ValueError, match="distill=0 would not use it"):
        finetune(_net(), (x, y), None, teacher=_net(), progress=False)
    with pytest.raises(ValueError, match="distill must be a number in"):
        FinetuneConfig(distill=1.5)


def test_recalibrate_bn_is_the_statistics_of_the_images():
    """With one batch, the running mean is the batch mean of the conv's output, the running variance its
    unbiased variance; the weights and the model passed in do not change."""
    model, (x, y) = _net(), _data(64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = recalibrate_bn(model, (x, y), batch_size=64)
    with torch.no_grad():
        z = model[0](x)
    assert torch.allclose(out[1].running_mean, z.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(out[1].running_var, z.var((0, 2, 3), unbiased=True), rtol=1e-4)
    assert torch.equal(out[0].weight, model[0].weight) and out[1].momentum == model[1].momentum
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="no BatchNorm"):
        recalibrate_bn(nn.Linear(3, 2), (torch.randn(4, 3), torch.zeros(4, dtype=torch.long)))


@pytest.mark.parametrize("pad_fill", [None, -1.0])
def test_finetune_calibrate_equals_recalibrating_after(pad_fill):
    """calibrate= re-estimates on the images augmented as the training batches are (seeded with the
    config's seed), over calibrate_passes passes; without augmentation, on the images as they are."""
    x, y = _data()
    clean = _data(64, seed=5)
    cfg = dict(CFG, pad_fill=pad_fill, calibrate_passes=3)
    a = finetune(_net(), (x, y), cfg, calibrate=clean, progress=False)
    gen = torch.Generator().manual_seed(cfg["seed"])
    b = recalibrate_bn(finetune(_net(), (x, y), cfg, progress=False), clean, batch_size=CFG["batch_size"],
                       transform=lambda t: random_crop_flip(t, 4, gen, pad_fill), passes=3)
    assert _same(a, b)
    plain = dict(cfg, augment=False)
    a = finetune(_net(), (x, y), plain, calibrate=clean, progress=False)
    b = recalibrate_bn(finetune(_net(), (x, y), plain, progress=False), clean, batch_size=CFG["batch_size"])
    assert _same(a, b)


def test_recalibrate_bn_transform_and_passes():
    """Passes of the same images leave the statistics as one pass does; ``transform`` applies to every
    batch; bad values are refused."""
    model, data = _net(), _data(64)
    one = recalibrate_bn(model, data, batch_size=32)
    three = recalibrate_bn(model, data, batch_size=32, passes=3)
    assert torch.allclose(one[1].running_mean, three[1].running_mean, atol=1e-6)
    assert torch.allclose(one[1].running_var, three[1].running_var, rtol=1e-5)
    doubled = recalibrate_bn(model, data, batch_size=32, transform=lambda t: 2 * t)
    direct = recalibrate_bn(model, (2 * data[0], data[1]), batch_size=32)
    assert torch.equal(doubled[1].running_mean, direct[1].running_mean)
    with pytest.raises(ValueError, match="passes must be a positive int"):
        recalibrate_bn(model, data, passes=0)
    with pytest.raises(TypeError, match="transform must be callable"):
        recalibrate_bn(model, data, transform=3)


def test_pad_fill_is_checked_and_old_checkpoints_resume(tmp_path):
    """pad_fill takes None, a number or one per channel (a list becomes a tuple); a checkpoint written
    before a config field existed resumes when the field has its default."""
    assert FinetuneConfig(pad_fill=[-1, 0.5, 2.0]).pad_fill == (-1, 0.5, 2.0)
    for bad in ("black", (), (1.0, float("nan")), True):
        with pytest.raises(ValueError, match="pad_fill must be None"):
            FinetuneConfig(pad_fill=bad)
    x, y = _data()
    ckpt = tmp_path / "ft.pt"
    done = finetune(_net(), (x, y), CFG, checkpoint=ckpt, progress=False)
    state = torch.load(ckpt, weights_only=True)
    for key in ("pad_fill", "calibrate_passes"):
        del state["config"][key]
    torch.save(state, ckpt)
    assert _same(finetune(_net(), (x, y), CFG, checkpoint=ckpt, progress=False), done)
    with pytest.raises(ValueError, match="pad_fill: None there, -1.0 now"):
        finetune(_net(), (x, y), dict(CFG, pad_fill=-1.0), checkpoint=ckpt, progress=False)


def test_a_finished_checkpoint_serves_another_calibration(tmp_path):
    """calibrate_passes acts after training: a finished run's checkpoint resumes with other passes and
    gives what a fresh run with those passes gives."""
    x, y = _data()
    ckpt = tmp_path / "ft.pt"
    finetune(_net(), (x, y), dict(CFG, calibrate_passes=1), calibrate=(x, y), checkpoint=ckpt, progress=False)
    fresh = finetune(_net(), (x, y), dict(CFG, calibrate_passes=3), calibrate=(x, y), progress=False)
    resumed = finetune(_net(), (x, y), dict(CFG, calibrate_passes=3), calibrate=(x, y), checkpoint=ckpt,
                       progress=_interrupt_after(0))     # raises if it trains again
    assert _same(resumed, fresh)
    one = finetune(_net(), (x, y), dict(CFG, calibrate_passes=1), calibrate=(x, y), progress=False)
    assert not _same(one, fresh)      # the passes do change the statistics


class _Stop(Exception):
    pass


def _interrupt_after(images):
    def progress(done, total):
        if done >= images:
            raise _Stop
    return progress


@pytest.mark.parametrize("stop_at", [48, 96, 200])     # mid-epoch, at an epoch's end, in the last epoch
def test_checkpoint_resumes_bit_for_bit(tmp_path, stop_at):
    x, y = _data()
    whole = finetune(_net(), (x, y), CFG, progress=False)
    path = tmp_path / "ft.pt"
    with pytest.raises(_Stop):
        finetune(_net(), (x, y), CFG, checkpoint=path, progress=_interrupt_after(stop_at))
    assert path.exists()
    resumed = finetune(_net(), (x, y), CFG, checkpoint=path, progress=False)
    assert _same(whole, resumed)
    again = finetune(_net(), (x, y), CFG, checkpoint=path, progress=_interrupt_after(0))   # done: no training
    assert _same(whole, again)


def test_checkpoint_of_another_run_is_refused(tmp_path):
    x, y = _data()
    path = tmp_path / "ft.pt"
    finetune(_net(), (x, y), dict(CFG, epochs=1), checkpoint=path, progress=False)
    with pytest.raises(ValueError, match="another config .*epochs: 1 there, 2 now"):
        finetune(_net(), (x, y), dict(CFG, epochs=2), checkpoint=path, progress=False)
    with pytest.raises(ValueError, match="written for 96 training images, data has 48"):
        finetune(_net(), (x[:48], y[:48]), dict(CFG, epochs=1), checkpoint=path, progress=False)
    finetune(_net(), (x, y), dict(CFG, epochs=1, checkpoint_images=64), checkpoint=path, progress=False)  # fine
    wider = nn.Sequential(nn.Conv2d(3, 9, 3, padding=1), nn.BatchNorm2d(9), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Dropout(0.1), nn.Linear(9, 3))
    with pytest.raises(ValueError, match="written for another model"):
        finetune(wider, (x, y), dict(CFG, epochs=1), checkpoint=path, progress=False)
    with pytest.raises(ValueError, match="needs \\(inputs, labels\\) tensors"):
        finetune(_net(), [(x, y)], dict(CFG, epochs=1), checkpoint=tmp_path / "b.pt", progress=False)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read"):
        finetune(_net(), (x, y), dict(CFG, epochs=1), checkpoint=tmp_path / "junk.pt", progress=False)


def test_channels_last_trains_the_same_network():
    x, y = _data()
    a = finetune(_net(), (x, y), dict(CFG, epochs=1), progress=False)
    b = finetune(_net(), (x, y), dict(CFG, epochs=1, channels_last=True), progress=False)
    assert b[0].weight.is_contiguous()
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.allclose(sa[k].float(), sb[k].float(), atol=1e-4) for k in sa)


def test_prune_finetune_distils_from_the_model_before_pruning(tmp_path):
    import carfast
    model, (x, y) = _net(), _data()
    cfg = dict(CFG, epochs=1, distill=0.9)
    plain = carfast.prune(model, "0", (x, y), keep=6, progress=False)
    tuned = carfast.prune(model, "0", (x, y), keep=6, progress=False,
                          finetune=dict(cfg, data=(x, y), calibrate=(x, y), checkpoint=str(tmp_path / "ft.pt")))
    ref = finetune(plain.model, (x, y), cfg, teacher=model, calibrate=(x, y), progress=False)
    assert _same(tuned.model, ref)
    assert tuned.settings["finetune"]["distill"] == 0.9 and "calibrate" not in tuned.settings["finetune"]
    assert (tmp_path / "ft.pt").exists()
