"""The fine-tune itself: ``finetune(model, data, config, teacher=, calibrate=, checkpoint=)``."""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from carfast.batching import as_batches, check_batch, check_labels
from carfast.finetune.augment import random_crop_flip
from carfast.finetune.batchnorm import recalibrate
from carfast.finetune.config import FinetuneConfig
from carfast.finetune.state import load_state, save_state
from carfast.progress import Progress

__all__ = ["finetune"]


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _spans(n: int, batch_size: int) -> list[tuple[int, int]]:
    """Batch bounds for ``n`` images; a last batch of a single image is dropped when batches are larger
    (BatchNorm after global pooling cannot train on one image)."""
    spans = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    if batch_size > 1 and len(spans) > 1 and spans[-1][1] - spans[-1][0] == 1:
        spans.pop()
    return spans


def _iter_epoch(data, cfg: FinetuneConfig):
    seen = 0
    for batch in as_batches(data, "finetune"):
        x, y = check_batch(batch, "finetune")
        if cfg.max_images is not None:
            if seen >= cfg.max_images:
                return
            x, y = x[:cfg.max_images - seen], y[:cfg.max_images - seen]
        seen += x.shape[0]
        yield x, y


def _loss(net, teacher, x, y, cfg: FinetuneConfig, labels_to_check) -> torch.Tensor:
    """The batch's loss: cross-entropy, mixed with distillation from ``teacher`` when there is one;
    ``labels_to_check`` (or None) are range-checked against the model's output size first."""
    logits = net(x)
    if labels_to_check is not None:
        check_labels(labels_to_check, logits.shape[-1], "finetune")
    loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
    if teacher is None:
        return loss
    with torch.no_grad():
        target = teacher(x)
    t = cfg.temperature
    kd = F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(target / t, 1), log_target=True,
                  reduction="batchmean") * (t * t)
    return (1 - cfg.distill) * loss + cfg.distill * kd


def _sgd_step(net, opt, loss, cfg: FinetuneConfig, where: str) -> None:
    if not torch.isfinite(loss):
        raise RuntimeError(f"finetune: the loss became {loss.item()} at {where}; lower the learning rate "
                           f"(lr={cfg.lr}) or check the data for NaN/inf")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _teacher(teacher, cfg: FinetuneConfig, device):
    """The teacher's copy in eval mode on ``device``, or None; ``distill`` and ``teacher`` must go together."""
    if teacher is None:
        if cfg.distill > 0:
            raise ValueError(f"finetune: distill={cfg.distill} needs teacher=, the network to distil from (e.g. the "
                             "unpruned model); pass it, or set distill=0")
        return None
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"finetune: teacher must be an nn.Module, got {type(teacher).__name__}")
    if cfg.distill == 0:
        raise ValueError("finetune: teacher= is given but distill=0 would not use it; set distill in (0, 1] "
                         "(e.g. 0.9) or drop teacher")
    t = copy.deepcopy(teacher).to(device).eval()
    for p in t.parameters():
        p.requires_grad_(False)
    return t


def finetune(model: nn.Module, data, config: FinetuneConfig | dict | None = None, *, teacher: nn.Module | None = None,
             calibrate=None, checkpoint=None, device=None, progress=None) -> nn.Module:
    """Train a copy of ``model`` with SGD and return it in eval mode; ``model`` itself is never changed.

    Args:
        model: an ``nn.Module`` returning logits [N, classes].
        data: ``(inputs [N, ...], labels [N] int)`` tensors, shuffled every epoch and cut into batches of
            ``config.batch_size``; or an iterable of ``(inputs, labels)`` batches (e.g. a DataLoader),
            taken as they come (its own batch size and order) and iterated once per epoch; the cosine
            schedule then spans ``epochs * len(data)`` steps.
        config: a ``FinetuneConfig`` or a dict of its fields (unknown keys raise ValueError).
        teacher: a network to distil from (``config.distill`` > 0), e.g. the model before pruning; copied,
            run in eval mode, never changed.
        calibrate: images of the test distribution (tensors or batches, as ``recalibrate_bn`` takes) on
            which every BatchNorm's statistics are re-estimated after training, augmented as the training
            batches are (``config.augment``, ``pad_fill``) over ``config.calibrate_passes`` passes; None
            keeps those training left (``config.bn_stats``).
        checkpoint: a file path: the state is saved there as training goes (``state.py``); a run given the
            path of an unfinished run's checkpoint, with the same model, data and config, resumes it and
            ends with the weights the uninterrupted run gives; a finished one returns its result at
            once. Needs tensor data.
        device: where to train (default: where the model's parameters are); the copy stays there.
        progress: None (a bar when stderr is a terminal), True/False, or a callable ``(done, total)``
            counting images; ``total`` is None for an iterable without ``len()``.
    Returns:
        the trained copy, in eval mode, on ``device``.
    """
    cfg = FinetuneConfig.from_any(config)
    if not isinstance(model, nn.Module):
        raise TypeError(f"finetune: model must be an nn.Module, got {type(model).__name__}")
    device = torch.device(device) if device is not None else _model_device(model)
    tensors = isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)
    x_all = y_all = None
    if tensors:
        x_all, y_all = check_batch(data, "finetune")
        if x_all.shape[0] == 0:
            raise ValueError("finetune: data holds no images; pass at least one (inputs, labels) pair")
        spans = _spans(min(x_all.shape[0], cfg.max_images or x_all.shape[0]), cfg.batch_size)
        steps_epoch = len(spans)
    else:
        as_batches(data, "finetune")        # type check now, not at the first batch
        steps_epoch = len(data) if hasattr(data, "__len__") else None
        if checkpoint is not None:
            raise ValueError("finetune: checkpoint= needs (inputs, labels) tensors as data, whose order a resumed "
                             "run can repeat; pass tensors or drop checkpoint")
    if cfg.schedule == "cosine" and steps_epoch is None:
        raise ValueError("finetune: the cosine schedule needs the number of batches per epoch, but data has no "
                         "len(); pass (inputs, labels) tensors, a DataLoader, or schedule='constant'")
    run = _Run(model, cfg, device, _teacher(teacher, cfg, device), steps_epoch)
    if tensors:
        run.train_tensors(x_all, y_all, checkpoint, progress)
    else:
        run.train_batches(data, progress)
    if calibrate is not None:     # on the images augmented as the training batches were, seeded apart from them
        gen = torch.Generator().manual_seed(cfg.seed)
        augment = (lambda x: random_crop_flip(x, 4, gen, cfg.pad_fill)) if cfg.augment else None
        recalibrate(run.net, calibrate, cfg.batch_size, device, "finetune", augment,
                    cfg.calibrate_passes if cfg.augment else 1)
    return run.net.to(memory_format=torch.contiguous_format).eval()


class _Run:
    """One fine-tune: the network's copy, its optimizer, the schedule and the random state."""

    def __init__(self, model, cfg: FinetuneConfig, device, teacher, steps_epoch):
        self.cfg, self.device, self.teacher = cfg, device, teacher
        self.net = copy.deepcopy(model).to(device).train()
        self.memory = torch.channels_last if cfg.channels_last else torch.contiguous_format
        if cfg.channels_last:
            self.net.to(memory_format=torch.channels_last)
        if cfg.bn_stats == "freeze":
            for m in self.net.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        params = [p for p in self.net.parameters() if p.requires_grad]
        if not params:
            raise ValueError("finetune: the model has no trainable parameters (all requires_grad=False)")
        self.opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                   weight_decay=cfg.weight_decay)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.total_steps = cfg.epochs * steps_epoch if steps_epoch else None
        self.step = 0

    def _update(self, x, y, epoch: int, labels_to_check) -> None:
        """One SGD step on the batch (augmented here) at the schedule's learning rate."""
        cfg = self.cfg
        x, y = x.to(self.device, non_blocking=True), y.to(device=self.device, dtype=torch.long)
        if cfg.schedule == "cosine":
            frac = min(self.step / max(self.total_steps, 1), 1.0)
            for group in self.opt.param_groups:
                group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * frac))
        x = random_crop_flip(x, 4, self.gen, cfg.pad_fill) if cfg.augment else x
        if x.dim() == 4:
            x = x.contiguous(memory_format=self.memory)
        loss = _loss(self.net, self.teacher, x, y, cfg, labels_to_check)
        _sgd_step(self.net, self.opt, loss, cfg, f"step {self.step} (epoch {epoch})")
        self.step += 1

    def _rng(self):
        """torch's global random state, seeded (dropout) and given back to the caller afterwards."""
        return torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])

    def train_batches(self, data, progress) -> None:
        bar = Progress(progress, None, "finetune", unit="images")
        try:
            with self._rng():
                torch.manual_seed(self.cfg.seed)
                for epoch in range(self.cfg.epochs):
                    seen = 0
                    for x, y in _iter_epoch(data, self.cfg):
                        self._update(x, y, epoch, y)
                        seen += x.shape[0]
                        bar.update(x.shape[0])
                    if seen == 0:
                        raise ValueError(f"finetune: epoch {epoch} got no batches; pass a re-iterable data source (a "
                                         "list or DataLoader, not a one-shot generator) or (inputs, labels) tensors")
        finally:
            bar.close()

    def train_tensors(self, x_all, y_all, checkpoint, progress) -> None:
        cfg, n = self.cfg, x_all.shape[0]
        per_epoch = min(n, cfg.max_images or n)
        spans = _spans(per_epoch, cfg.batch_size)
        epoch_images = sum(e - s for s, e in spans)
        state = load_state(checkpoint, cfg, n) if checkpoint is not None else None
        epoch0, batch0, order = 0, 0, None
        if state is not None:
            try:
                self.net.load_state_dict(state["model"])
            except RuntimeError as err:
                raise ValueError(f"finetune: the checkpoint {str(checkpoint)!r} was written for another model "
                                 f"({str(err).splitlines()[0]}); pass the same model to resume, or delete it to start "
                                 "over") from None
            self.opt.load_state_dict(state["optimizer"])
            self.gen.set_state(state["generator"])
            self.step, epoch0, batch0, order = state["step"], state["epoch"], state["batch"], state["order"]
            if state["done"]:
                return
        done_images = epoch0 * epoch_images + sum(e - s for s, e in spans[:batch0])
        bar = Progress(progress, cfg.epochs * epoch_images - done_images, "finetune", unit="images")

        def save(epoch, batch, order, done=False):
            if checkpoint is not None:
                save_state(checkpoint, cfg, n, step=self.step, epoch=epoch, batch=batch, order=order, gen=self.gen,
                           net=self.net, opt=self.opt, done=done)
        try:
            with self._rng():
                torch.manual_seed(cfg.seed)
                if state is not None:
                    torch.set_rng_state(state["torch_rng"])
                since = 0
                for epoch in range(epoch0, cfg.epochs):
                    if not (epoch == epoch0 and batch0 > 0):
                        order = torch.randperm(n, generator=self.gen)[:cfg.max_images]
                    first = batch0 if epoch == epoch0 else 0
                    for b in range(first, len(spans)):
                        idx = order[spans[b][0]:spans[b][1]].to(x_all.device)
                        self._update(x_all[idx], y_all[idx], epoch, y_all if self.step == 0 else None)
                        bar.update(len(idx))
                        since += len(idx)
                        if since >= cfg.checkpoint_images and b + 1 < len(spans):
                            save(epoch, b + 1, order)
                            since = 0
                    save(epoch + 1, 0, order, done=epoch + 1 == cfg.epochs)
                    since = 0
        finally:
            bar.close()
