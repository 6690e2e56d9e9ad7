"""Save and load physically pruned networks as plain data (no pickled code).

A pruned network has the class of the original but smaller layers, so its state dict alone does not
load into a fresh instance. ``save_pruned`` writes, with ``torch.save``, a dict of plain data that
``torch.load(..., weights_only=True)`` reads:

    {"format": "carfast.pruned_model", "version": 1,
     "arch": model.carfast_arch or None,      # how to rebuild the unpruned network (carfast.models)
     "modules": {name: {"type": "Conv2d", "in_channels": 8, "out_channels": 5, "groups": 1}, ...},
     "rewrites": [[fx node name, module path], ...] or None,
     "state_dict": {...}, "extra": {...}}

recording the sizes of every Conv, Linear, BatchNorm, LayerNorm, GroupNorm, InstanceNorm and PReLU module,
the channel map of every channel-map shortcut (``models.OptionAShortcut``) and the ``sizes`` of every
module of a registered type (``graph.registry.ModuleHandler``). ``load_pruned_model``
builds the unpruned network (from ``arch`` through an allow-list of carfast builders, or a deep copy of
the ``model=`` the caller passes), traces it and makes the recorded functional calls ``ChannelMap``
modules again where surgery had (``rewrites``; ``channel_map.py``), gives each recorded module its
recorded sizes and every parameter and buffer its saved shape (a layer scale too), and loads the state
dict strictly.
"""
from __future__ import annotations

import copy
import os

import torch
from torch import nn

from carfast.atomic import atomic_path
from carfast.errors import state_dict_mismatch
from carfast.graph import is_channel_map
from carfast.graph.registry import user_handler
from carfast.models import cifar as models
from carfast.surgery.channel_map import rebuild_rewrites

__all__ = ["save_pruned", "load_pruned_model", "read_saved", "read_pruned"]

_FORMAT, _VERSION = "carfast.pruned_model", 1
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_SIZES = ((_CONVS, ("in_channels", "out_channels", "groups")), ((nn.Linear,), ("in_features", "out_features")),
          (_BATCHNORMS, ("num_features",)), ((nn.LayerNorm,), ("normalized_shape",)),
          ((nn.GroupNorm,), ("num_groups", "num_channels")), ((nn.PReLU,), ("num_parameters",)),
          ((nn.modules.instancenorm._InstanceNorm,), ("num_features",)))
#: builders load_pruned_model may call to rebuild an architecture: name -> (function, allowed kwargs, fixed kwargs)
_BUILDERS = {
    "cifar_resnet": (models.cifar_resnet, {"depth"}, {"pretrained": False}),
    "alexnet_cifar": (models.alexnet_cifar, set(), {"pretrained": False}),
}


def _check_plain(obj, where: str, fn: str) -> None:
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{fn}: {where} has a key of type {type(k).__name__}; keys must be str or int")
            _check_plain(v, f"{where}[{k!r}]", fn)
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]", fn)
        return
    raise TypeError(f"{fn}: {where} is a {type(obj).__name__}; only plain data (dict, list, tuple, str, int, "
                    "float, bool, None, tensors) is stored, so the file loads with weights_only=True")


def _sizes(m: nn.Module) -> dict | None:
    handler = user_handler(m)
    if handler is not None:
        sizes = handler.sizes(m)
        return {"type": type(m).__name__, **{a: _plain_size(v) for a, v in sizes.items()}} if sizes else None
    for types, attrs in _SIZES:
        if isinstance(m, types):
            return {"type": type(m).__name__, **{a: _plain_size(getattr(m, a)) for a in attrs}}
    if is_channel_map(m) and callable(getattr(m, "set_channel_map", None)):   # e.g. models.OptionAShortcut
        try:
            n_in, n_out, src, dst = m.carfast_channel_map()
        except ValueError:        # sizes unknown (built without in_channels): never remapped, nothing to record
            return None
        return {"type": type(m).__name__, "channel_map": [n_in, n_out, list(src), list(dst)]}
    return None


def _plain_size(v):
    return [int(s) for s in v] if isinstance(v, (tuple, list)) else int(v)


def save_pruned(model: nn.Module, path: str | os.PathLike, *, extra: dict | None = None) -> None:
    """Write ``model`` (pruned or not) to ``path`` atomically, with ``extra`` (plain data) stored beside it.

    The file holds only tensors and plain data; ``load_pruned_model(path)`` rebuilds carfast's own
    networks from ``model.carfast_arch``; other networks need ``load_pruned_model(path, model=...)``.
    """
    fn = "save_pruned"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}")
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"{fn}: extra must be a dict of plain data or None, got {type(extra).__name__}")
    arch = getattr(model, "carfast_arch", None)
    _check_plain(arch, "model.carfast_arch", fn)
    _check_plain(extra, "extra", fn)
    sizes = {name: s for name, m in model.named_modules() if (s := _sizes(m)) is not None}
    rewrites = getattr(model, "carfast_rewrites", None)
    payload = {"format": _FORMAT, "version": _VERSION, "arch": copy.deepcopy(arch), "modules": sizes,
               "rewrites": [list(r) for r in rewrites] if isinstance(rewrites, list) else None,
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "extra": extra,
               "torch_version": str(torch.__version__)}
    with atomic_path(path, ".pt") as tmp:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())


def _factory_hint(extra) -> str:
    """``mynet.make_net()`` when the file's record names the ``carfast prune --model`` factory, else a stand-in."""
    cli = ((extra or {}).get("settings") or {}).get("cli_model") if isinstance(extra, dict) else None
    spec = cli.get("model") if isinstance(cli, dict) else None
    if isinstance(spec, str) and ":" in spec:
        module, _, attr = spec.partition(":")
        return f"{module}.{attr}()"
    return "YourNet()"


def _rebuild(arch, path, fn: str, extra=None) -> nn.Module:
    if arch is None:
        raise ValueError(f"{fn}: {path} holds a pruned network of your own (not one of carfast.models), which "
                         f"carfast rebuilds from an unpruned instance of its architecture: pass model=, e.g. "
                         f"{fn}({path!r}, model={_factory_hint(extra)}) (its weights are not used)")
    if not isinstance(arch, dict) or arch.get("builder") not in _BUILDERS or not isinstance(arch.get("kwargs"), dict):
        raise ValueError(f"{fn}: {path} records architecture {arch!r}, which is not one carfast can rebuild "
                         f"(builders: {sorted(_BUILDERS)}); pass model=, an unpruned instance of it")
    builder, allowed, fixed = _BUILDERS[arch["builder"]]
    kwargs = arch["kwargs"]
    if set(kwargs) - allowed or not all(isinstance(v, int) and not isinstance(v, bool) for v in kwargs.values()):
        raise ValueError(f"{fn}: {path} records arguments {kwargs!r} for {arch['builder']}; allowed: int "
                         f"{sorted(allowed)}. Pass model= to rebuild it yourself")
    return builder(**kwargs, **fixed)


def _reshape(model: nn.Module, sizes: dict, state: dict, path, fn: str) -> None:
    """Give every recorded module its recorded sizes and parameters/buffers of the saved shapes."""
    modules = dict(model.named_modules())
    for name, rec in sizes.items():
        m = modules.get(name)
        if m is None or type(m).__name__ != rec.get("type"):
            found = "no such module" if m is None else f"a {type(m).__name__}"
            raise ValueError(f"{fn}: {path} records a {rec.get('type')} at {name!r}, the model has {found}; pass "
                             "model=, an unpruned instance of the architecture that was saved")
        for attr, value in rec.items():
            if attr == "channel_map":
                m.set_channel_map(*value)
            elif attr != "type":
                setattr(m, attr, tuple(value) if isinstance(value, list) else value)
    for name, m in modules.items():       # every tensor to its saved shape (layer scales, norms' entries...)
        for attr, old in [*m._parameters.items(), *m._buffers.items()]:
            saved = state.get(f"{name}.{attr}" if name else attr)
            if old is None or saved is None or saved.shape == old.shape:
                continue
            new = torch.empty(saved.shape, dtype=old.dtype, device=old.device)
            setattr(m, attr, nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter)
                    else new)


def read_saved(path: str | os.PathLike, fn: str = "load_pruned_model") -> dict:
    """The plain-data dict a ``save_pruned`` file holds (``arch``, ``modules``, ``state_dict``, ``extra``),
    read with ``torch.load(..., weights_only=True)`` onto the CPU and its format checked; ValueError (named
    ``fn``) for a file that is not one."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{fn}: no file at {os.fspath(path)!r}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle, zip and EOF errors all mean "not a saved result"
        raise ValueError(f"{fn}: {os.fspath(path)!r} is not a file carfast wrote (torch.load cannot read it: "
                         f"{type(err).__name__}); pass a file written by carfast prune, PruneResult.save or "
                         "save_pruned") from None
    if not isinstance(obj, dict) or obj.get("format") != _FORMAT:
        raise ValueError(f"{fn}: {os.fspath(path)!r} is not a carfast pruned model; write it with save_pruned")
    if obj.get("version") != _VERSION:
        raise ValueError(f"{fn}: {os.fspath(path)!r} has format version {obj.get('version')}, this carfast reads "
                         f"{_VERSION}; load it with the carfast that wrote it")
    return obj


def read_pruned(path: str | os.PathLike, model: nn.Module | None, fn: str) -> tuple[nn.Module, dict | None]:
    """``load_pruned_model`` with errors named ``fn`` (the public function the caller called)."""
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be a torch.nn.Module or None, got {type(model).__name__}")
    obj = read_saved(path, fn)
    net = copy.deepcopy(model) if model is not None else _rebuild(obj["arch"], os.fspath(path), fn, obj.get("extra"))
    if obj.get("rewrites"):
        net = rebuild_rewrites(net, obj["rewrites"], fn)
    state = obj["state_dict"]
    _reshape(net, obj["modules"], state, os.fspath(path), fn)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{fn}: the saved weights do not fit the network ({state_dict_mismatch(net, state)}); pass "
                         "model=, an unpruned instance of the architecture that was saved") from err
    return net, obj["extra"]


def load_pruned_model(path: str | os.PathLike, model: nn.Module | None = None) -> tuple[nn.Module, dict | None]:
    """``(network, extra)`` from a file written by ``save_pruned`` (a whole prune record, written by
    ``PruneResult.save``, loads with ``carfast.load_pruned``; this reads its network too).

    Args:
        path: the file; read with ``torch.load(..., weights_only=True)`` onto the CPU.
        model: an unpruned instance of the saved architecture, needed unless the network was one of
            carfast's own (``carfast.models``); it is deep-copied, never changed.
    Returns:
        The pruned network (with the training flags of the rebuilt network: eval for carfast's
        builders, those of ``model`` otherwise) and the ``extra`` saved with it.
    """
    return read_pruned(path, model, "load_pruned_model")
