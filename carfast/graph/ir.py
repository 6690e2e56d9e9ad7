"""The network as a list of calls, from either front end: a torch.fx trace or one recorded forward pass.

Every call the forward makes becomes an ``Op``: the module or function called, its arguments (with an
``Op`` standing for each tensor the network computed, a parameter or the input), and a description of
what it returned on one example input (``TensorMeta`` for tensors, the value itself for ints, sizes
and other plain values). The channel-flow walker (``walker.py``) reads only this, so the fx graph and
the recorded pass are analysed by the same rules.

- ``from_fx(model, example)``: ``torch.fx`` symbolic trace (modules defined in ``torch.nn`` and
  channel-map modules are single calls; anything else is traced through, so a subclass is judged by
  what its forward computes), run once on the example by an interpreter to learn every value.
- ``from_recording(model, example)``: for models fx cannot trace, one forward pass under a
  ``TorchFunctionMode`` with hooks on the same leaf modules; tuples returned by a call (``split``)
  get one ``getitem`` op per element, so every reference is to a single tensor.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from carfast.errors import TraceError, run_failure
from carfast.graph.registry import is_registered

__all__ = ["TensorMeta", "Op", "FlowGraph", "TraceError", "is_leaf_module", "is_channel_map", "from_fx",
           "from_recording", "op_name"]

#: int / bool tensors up to this many elements keep their values (index tensors of ``x[:, idx]``)
_KEEP_INDEX = 1 << 16


@dataclass(frozen=True)
class TensorMeta:
    """What a tensor looked like on the example: shape (batch 1 first), dtype, and for small integer
    or bool tensors the values (index tensors)."""
    shape: tuple
    dtype: torch.dtype
    value: torch.Tensor | None = None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n


def _meta(obj):
    def one(t):
        if not isinstance(t, torch.Tensor):
            return t
        keep = not t.dtype.is_floating_point and not t.is_complex() and t.numel() <= _KEEP_INDEX
        return TensorMeta(tuple(t.shape), t.dtype, t.detach().cpu().clone() if keep else None)
    return tree_map(one, obj)


@dataclass(eq=False)
class Op:
    """One call of the forward (or the input, a parameter, a constant, the output).

    kind: "input", "param" (a parameter or buffer of ``module``: ``target`` is the attribute name),
    "const" (a tensor the walker cannot trace to a parameter), "module" (``target`` the module),
    "function" (``target`` the callable; ``method`` True when it is a method name called on args[0]),
    "output". ``name`` labels the op in messages (a module path or the fx node's name); ``module`` is
    the path of the module called, of the parameter's owner, or of the module whose forward made the call.
    """
    index: int
    kind: str
    target: Any
    name: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    meta: Any = None
    module: str = ""
    method: bool = False
    fx_node: fx.Node | None = field(default=None, repr=False)
    users: list = field(default_factory=list, repr=False)
    synthetic: bool = False   # an element of a returned tuple (recorded front end), not a call

    def inputs(self) -> list:
        """The ops this op reads, in argument order (each once)."""
        out = []
        for a in tree_flatten((self.args, self.kwargs))[0]:
            if isinstance(a, Op) and all(a is not b for b in out):
                out.append(a)
        return out

    def call(self, fn_args: tuple, fn_kwargs: dict):
        """Apply this op's operation to other arguments (the walker pushes position codes through it)."""
        if self.kind == "module":
            return self.target(*fn_args, **fn_kwargs)
        if self.method:
            return getattr(fn_args[0], self.target)(*fn_args[1:], **fn_kwargs)
        return self.target(*fn_args, **fn_kwargs)

    @property
    def label(self) -> str:
        """A name for messages: the module path for module calls, else the call with its module."""
        if self.kind in ("module", "param"):
            return self.name
        return f"{self.name} (in {self.module})" if self.module else self.name


def op_name(op: Op) -> str:
    """The canonical operation name of a function op: ``add`` for ``operator.add``, ``Tensor.__iadd__``,
    ``torch.add`` and ``x.add_``; ``getitem`` for indexing; the function's or method's name otherwise."""
    if op.kind != "function":
        return ""
    raw = op.target if op.method else getattr(op.target, "__name__", str(op.target))
    name = raw.strip("_")
    if raw.startswith("__") and raw.endswith("__"):
        name = raw[2:-2]
        if name.startswith("i") and name[1:] in _INPLACE_OPERATORS:
            name = name[1:]
        elif name.startswith("r") and name[1:] in _INPLACE_OPERATORS:
            name = "r" + name[1:]
    elif op.target in _OPERATORS:
        name = _OPERATORS[op.target]
    return {"truediv": "div", "true_divide": "div", "rtruediv": "rdiv", "concat": "cat", "concatenate": "cat",
            "radd": "add", "rmul": "mul", "multiply": "mul", "subtract": "sub", "divide": "div"}.get(name, name)


_INPLACE_OPERATORS = {"add", "sub", "mul", "truediv", "floordiv", "and", "or", "pow", "matmul"}
_OPERATORS = {operator.add: "add", operator.iadd: "add", operator.sub: "sub", operator.isub: "sub",
              operator.mul: "mul", operator.imul: "mul", operator.truediv: "div", operator.itruediv: "div",
              operator.getitem: "getitem", operator.matmul: "matmul", operator.neg: "neg",
              operator.floordiv: "floordiv", operator.pow: "pow"}


@dataclass(eq=False)
class FlowGraph:
    """The ops of one forward in call order, and the output op; ``gm`` is the fx graph (fx front end)."""
    ops: list[Op]
    output: Op
    front_end: str
    gm: fx.GraphModule | None = field(default=None, repr=False)

    def module_calls(self, path: str) -> list[Op]:
        return [o for o in self.ops if o.kind == "module" and o.name == path]


def is_channel_map(m: nn.Module) -> bool:
    """A parameter-free shortcut that moves channels from one residual stream to another (it has
    ``carfast_channel_map() -> (in_channels, out_channels, src, dst)``, e.g. ``models.OptionAShortcut``)."""
    return callable(getattr(m, "carfast_channel_map", None))


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def is_leaf_module(m: nn.Module) -> bool:
    """Called as one op: modules defined in ``torch.nn`` (whose forward carfast knows by class),
    channel-map modules and types registered with ``carfast.register_module``; any other module's
    forward is followed call by call, so a subclass such as timm's ``BatchNormAct2d`` is judged by what
    it computes, not by the class it extends."""
    if is_channel_map(m) or is_registered(m):
        return True
    mod = type(m).__module__
    return (mod.startswith("torch.nn") or mod.startswith("torch.ao.nn")) and not isinstance(m, _CONTAINERS)


# ---- the fx front end -------------------------------------------------------------------------------------
class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_leaf_module(m)


def trace_fx(model: nn.Module) -> fx.GraphModule:
    """``model`` symbolically traced with carfast's leaf rules; ``TraceError`` if fx cannot."""
    try:
        return fx.GraphModule(model, _Tracer().trace(model), type(model).__name__)
    except Exception as err:  # noqa: BLE001 - any tracing failure means: use the recorded pass
        raise TraceError(f"torch.fx cannot trace {type(model).__name__}: {type(err).__name__}: {err}") from err


class _Run(ShapeProp):
    """Runs the graph once, keeping what every node returned (and fx's ``tensor_meta`` on each node)."""

    def __init__(self, gm):
        super().__init__(gm)
        self.metas = {}

    def run_node(self, n):
        out = super().run_node(n)
        self.metas[n] = _meta(out)
        return out


def _scope(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack)) if stack else ""


def check_runs(model: nn.Module, example: torch.Tensor) -> None:
    """ValueError in one line (``errors.run_failure``: which layer does not fit the input, and the fix) when
    ``model`` does not run on ``example``; runs it once in eval mode without gradients, flags restored."""
    from carfast.batching import eval_mode
    try:
        with eval_mode(model), torch.no_grad():
            model(example)
    except Exception as err:  # noqa: BLE001 - any failure is the user's model not taking this input
        raise ValueError(run_failure(model, example, err)) from err


def from_fx(model: nn.Module, example: torch.Tensor, gm: fx.GraphModule | None = None) -> FlowGraph:
    """The ops of ``model`` (traced, or ``gm`` already traced from it) on ``example`` [1, ...]."""
    check_runs(model, example)      # before fx's ShapeProp, which prints a traceback on failure
    gm = gm if gm is not None else trace_fx(model)
    run = _Run(gm)
    try:
        with torch.no_grad():
            run.run(example)
    except Exception as err:  # noqa: BLE001
        raise TraceError(f"the fx graph of {type(model).__name__} does not run: {type(err).__name__}: {err}") from err
    ops, of = [], {}
    for i, n in enumerate(gm.graph.nodes):
        args = fx.node.map_arg(n.args, lambda a: of[a])
        kwargs = fx.node.map_arg(n.kwargs, lambda a: of[a])
        meta = run.metas.get(n)
        if n.op == "placeholder":
            op = Op(i, "input", None, n.name, meta=meta)
        elif n.op == "get_attr":
            path, _, attr = n.target.rpartition(".")
            op = Op(i, "param", attr, n.target, meta=meta, module=path)
        elif n.op == "call_module":
            op = Op(i, "module", gm.get_submodule(n.target), n.target, args, kwargs, meta, module=n.target)
        elif n.op in ("call_function", "call_method"):
            op = Op(i, "function", n.target, n.name, args, kwargs, meta, module=_scope(n), method=n.op == "call_method")
        else:
            op = Op(i, "output", None, "output", args, kwargs)
        op.fx_node = n
        of[n] = op
        ops.append(op)
    return _link(FlowGraph(ops[:-1] if ops[-1].kind == "output" else ops, ops[-1], "fx", gm))


def _link(g: FlowGraph) -> FlowGraph:
    for op in g.ops + [g.output]:
        for a in op.inputs():
            a.users.append(op)
    return g


# ---- the recorded front end -------------------------------------------------------------------------------
class _Recorder(TorchFunctionMode):
    """Records every torch function called outside leaf modules, with its arguments as ops."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.ops: list[Op] = []
        self.of: dict[int, Op] = {}          # id(tensor) -> the op that made it (latest, for in-place ops)
        self.keep: list = []                 # tensors kept alive so their ids stay unique
        self.params = {id(t): name for name, t in list(model.named_parameters()) + list(model.named_buffers())}
        self.depth = 0
        self.scope: list[str] = []

    def ref(self, t):
        if not isinstance(t, torch.Tensor):
            return t
        op = self.of.get(id(t))
        if op is None:
            name = self.params.get(id(t))
            if name is not None:
                path, _, attr = name.rpartition(".")
                op = self.new("param", attr, name, meta=_meta(t), module=path)
            else:
                op = self.new("const", None, f"constant {tuple(t.shape)}", meta=_meta(t))
            self.bind(t, op)
        return op

    def new(self, kind, target, name, args=(), kwargs=None, meta=None, module="", method=False) -> Op:
        op = Op(len(self.ops), kind, target, name, args, kwargs or {}, meta, module, method)
        self.ops.append(op)
        return op

    def bind(self, t: torch.Tensor, op: Op) -> None:
        self.of[id(t)] = op
        self.keep.append(t)

    def record(self, kind, target, name, args, kwargs, out, module="", method=False) -> None:
        a, k = tree_map(self.ref, (args, kwargs))
        op = self.new(kind, target, name, a, k, _meta(out), module or (self.scope[-1] if self.scope else ""), method)
        if isinstance(out, torch.Tensor):
            self.bind(out, op)
        elif isinstance(out, (tuple, list)):
            for i, t in enumerate(out):
                if isinstance(t, torch.Tensor):
                    item = self.new("function", operator.getitem, f"{name}[{i}]", (op, i), {}, _meta(t), op.module)
                    item.synthetic = True
                    self.bind(t, item)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth == 0 and any(isinstance(t, torch.Tensor) for t in tree_flatten(out)[0]):
            name = getattr(func, "__name__", str(func))
            self.record("function", func, name, args, kwargs, out)
        return out


def from_recording(model: nn.Module, example: torch.Tensor) -> FlowGraph:
    """The ops of one forward pass of ``model`` on ``example`` [1, ...], recorded."""
    rec = _Recorder(model)
    handles = []
    leaf_ids = {id(m) for m in model.modules() if is_leaf_module(m)}

    def pre(m, _args):
        if id(m) in leaf_ids:
            rec.depth += 1
        else:
            rec.scope.append(paths[id(m)])

    def post(m, args, kwargs, out):
        if id(m) in leaf_ids:
            rec.depth -= 1
            if rec.depth == 0:
                rec.record("module", m, paths[id(m)], args, kwargs, out, module=paths[id(m)])
        else:
            rec.scope.pop()

    paths = {}
    for name, m in model.named_modules():
        paths.setdefault(id(m), name)
        if name:
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post, with_kwargs=True))
    rec.bind(example, rec.new("input", None, "input", meta=_meta(example)))
    try:
        with torch.no_grad(), rec:
            out = model(example)
    except Exception as err:
        failure = err
    else:
        failure = None
    finally:
        for h in handles:
            h.remove()
    if failure is not None:     # explained after the hooks are gone (run_failure runs the model again)
        raise ValueError(run_failure(model, example, failure)) from failure
    output = Op(len(rec.ops), "output", None, "output", (tree_map(rec.ref, out),), {})
    return _link(FlowGraph(rec.ops, output, "recorded"))
