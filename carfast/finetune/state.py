"""The fine-tune's checkpoint: everything a resumed run needs to continue bit for bit.

One ``torch.save`` file, written atomically after about ``FinetuneConfig.checkpoint_images`` images and at
the end of every epoch: the network's and the optimizer's state, the step, the epoch and the batch within
it, the epoch's image order, the augmentation generator's and torch's random states, and the config and
data size it belongs to (a run with another config or data refuses it; ``checkpoint_images`` and
``calibrate_passes`` may differ, since the state does not depend on them). Read with ``weights_only=True``.
"""
from __future__ import annotations

import os

import torch

from carfast.atomic import atomic_path
from carfast.finetune.config import FinetuneConfig

__all__ = ["save_state", "load_state"]

_FORMAT = "carfast-finetune-checkpoint/1"
#: config fields the saved state does not depend on: when to save, and how ``calibrate=`` runs after training
_AFTER = ("checkpoint_images", "calibrate_passes")


def save_state(path, cfg: FinetuneConfig, num_images: int, *, step: int, epoch: int, batch: int, order, gen, net,
               opt, done: bool) -> None:
    """Write the state atomically (a run killed while writing leaves the previous checkpoint)."""
    obj = {"format": _FORMAT, "config": cfg.to_dict(), "num_images": num_images, "step": step, "epoch": epoch,
           "batch": batch, "order": order, "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
           "model": net.state_dict(), "optimizer": opt.state_dict(), "done": done}
    with atomic_path(path, ".pt") as tmp:
        torch.save(obj, tmp)


def load_state(path, cfg: FinetuneConfig, num_images: int) -> dict | None:
    """The saved state, or None when ``path`` does not exist; ValueError when it belongs to another run."""
    if not os.path.exists(path):
        return None
    where = os.fspath(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
        raise ValueError(f"finetune: the checkpoint {where!r} cannot be read ({type(err).__name__}: {err}); delete "
                         "it to start over") from None
    if not isinstance(obj, dict) or obj.get("format") != _FORMAT:
        raise ValueError(f"finetune: {where!r} is not a fine-tune checkpoint (format "
                         f"{obj.get('format') if isinstance(obj, dict) else None!r}); pass another path")
    mine = cfg.to_dict()
    theirs = {**FinetuneConfig().to_dict(), **obj["config"]}     # (fields added since: their defaults)
    differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k) and k not in _AFTER)
    if differ:
        raise ValueError(f"finetune: the checkpoint {where!r} was written with another config ("
                         + ", ".join(f"{k}: {theirs.get(k)!r} there, {mine.get(k)!r} now" for k in differ)
                         + "); pass the same config to resume, or delete the checkpoint to start over")
    if obj["num_images"] != num_images:
        raise ValueError(f"finetune: the checkpoint {where!r} was written for {obj['num_images']} training images, "
                         f"data has {num_images}; pass the same data to resume, or delete it to start over")
    return obj
