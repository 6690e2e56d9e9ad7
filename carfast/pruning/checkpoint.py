"""Checkpoints of a pruning run: the settings and every removal so far, as JSON written atomically after
each removal, so a run started again with the same arguments replays them and goes on to the same result.

A sequential run may also be continued to a smaller ``keep``: the settings may then differ in ``keep``
alone, the recorded removals are replayed as long as the new run would make them in the same order, and
the rest is redone (greedy CAR is deterministic, so what is replayed is what the new run would do).
"""
from __future__ import annotations

import hashlib
import json
import os

import torch
from torch import nn

from carfast.atomic import write_json_atomic
from carfast.batching import as_batches, check_batch

__all__ = ["FORMAT", "digest_model", "digest_data", "read_checkpoint", "write_checkpoint"]

FORMAT = "carfast-prune-checkpoint/1"
_FN = "prune"


def digest_model(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def digest_data(data) -> str:
    h = hashlib.sha256()
    for batch in as_batches(data, _FN):
        for t in check_batch(batch, _FN):
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def read_checkpoint(path, settings: dict) -> list:
    """The recorded removals to replay (history rows), [] when there is no checkpoint yet."""
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{_FN}: checkpoint {path!r} cannot be read ({err}); delete it to start afresh") from None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ValueError(f"{_FN}: {path!r} is not a carfast prune checkpoint; pass another checkpoint path")
    diff = sorted(k for k in set(settings) | set(saved["settings"]) if settings.get(k) != saved["settings"].get(k))
    if diff and not (diff == ["keep"] and settings["schedule"] == "sequential"):
        hint = " (a global schedule cannot be continued to another keep)" if diff == ["keep"] else ""
        raise ValueError(f"{_FN}: checkpoint {path!r} was written by a run with other settings (differ: {diff}){hint}; "
                         "resume with the same model, data and arguments, or delete it / pass another path")
    rows = list(saved["history"])
    # an iteration cut short (killed between the removals of one step) is redone from its start
    while rows and sum(r["iteration"] == rows[-1]["iteration"] for r in rows) < rows[-1]["planned"]:
        last = rows[-1]["iteration"]
        rows = [r for r in rows if r["iteration"] != last]
    return rows


def write_checkpoint(path, settings: dict, history: list) -> None:
    write_json_atomic(path, {"format": FORMAT, "settings": settings, "history": history})
