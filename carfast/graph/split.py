"""Split a traced network where a layer's removal takes effect, for scoring (torch.fx).

``analyze(model, name, example)`` runs the channel-flow analysis (``carfast.graph``) and, on the fx
graph, builds:

- the *consumers*: readers of the layer's channels (Conv2d / Linear, modules or functional calls on
  the model's weights) whose input is computed before any other reader's output; unit k owns input
  positions ``index[offsets[k]:offsets[k+1]]`` along ``axis`` (channels of a conv, features of a linear);
- a *prefix* module: the whole network, returning each consumer's owned input positions A_u
  (gathered unit by unit), its output Z_u, the *boundary* values the rest of the network reads besides
  the consumers' outputs (a residual shortcut, a gated tensor), and the logits;
- a *suffix* module: the network from the consumers' outputs (and the boundary values) to the logits.
  Readers deeper in the network (the conv after a squeeze-and-excitation gate), channel-map shortcuts
  and normalisers are in the suffix: each reads its input through a ``UnitMask`` (or computes a
  ``MaskedNorm``) driven by a keep mask [P, U + 1], the suffix's last input (``masked``).

Removing filter k replaces Z_u by Z_u - U_k(A_u[:, owned(k)]) (``ops/consumer_delta.py``), masks unit k
where the suffix reads it, and runs the suffix. ``FlowError`` (a ``ValueError``) says why a layer cannot
be removed on its own; ``TraceError`` that fx cannot trace the model (the full-network method applies).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx, nn

from carfast.graph import Flow, FlowError, Reader, TraceError, from_fx
from carfast.graph import analyze as analyze_flow
from carfast.graph.apply import masked_norm, reader_profile
from carfast.graph.ir import check_runs, trace_fx
from carfast.graph.masking import UnitMask
from carfast.graph.registry import is_registered, layer_filters
from carfast.ops.consumer_delta import LayerSpec

__all__ = ["TraceError", "FlowError", "Consumer", "LayerGraph", "analyze", "split", "trace", "fn_name", "subgraph",
           "suffix_inputs", "descendants", "build_prefix", "target_num_filters", "reader_spec"]


@dataclass(eq=False)
class Consumer:
    """A reader whose output the engine caches (see the module docstring)."""
    name: str
    node: fx.Node
    spec: LayerSpec
    axis: int                     # 1 (a conv's input channels) or -1 (a linear's features)
    index: torch.Tensor           # [L] input positions along axis, unit by unit
    offsets: torch.Tensor         # [U + 1]
    size: int = 0                 # the input's size along axis

    @property
    def width(self) -> int | None:
        """Positions each unit owns, when all own the same number; else None."""
        w = self.offsets.diff()
        return int(w[0]) if w.numel() and bool((w == w[0]).all()) else None

    def owned(self, k: int) -> tuple[int, int]:
        """The range of unit k's positions in the gathered input A [n, L, ...] (along ``axis``)."""
        return int(self.offsets[k]), int(self.offsets[k + 1])

    def identity(self) -> bool:
        """Whether the gathered input is the input itself (the units own every position, in order)."""
        return len(self.index) == self.size and bool(torch.equal(self.index, torch.arange(len(self.index))))


@dataclass
class LayerGraph:
    """The target layer's place in a traced network; see module docstring."""
    layer: str
    module: nn.Module
    num_filters: int              # units (filters of the layer)
    consumers: list[Consumer]
    gm: fx.GraphModule
    prefix: fx.GraphModule        # x -> (A_1..A_u, Z_1..Z_u, B_1..B_b, logits)
    suffix: fx.GraphModule        # (Z_1..Z_u, B_1..B_b[, keep]) -> logits
    boundary: list[fx.Node]
    flow: Flow = field(repr=False)
    masked: bool = False          # the suffix takes a keep mask [P, U + 1] last
    changed: list[fx.Node] = field(repr=False, default_factory=list)  # suffix nodes, topological order


def fn_name(node: fx.Node) -> str:
    """The name of a call_function / call_method node's operation (``relu``, ``view``, ``add``...)."""
    if node.op == "call_method":
        return node.target
    return getattr(node.target, "__name__", str(node.target))


def trace(model: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """``model`` traced by fx with carfast's leaf rules and run once on ``example`` [1, ...] (shapes in
    ``node.meta['tensor_meta']``); ``TraceError`` if fx cannot."""
    check_runs(model, example)      # a one-line error before ShapeProp, which prints a traceback on failure
    gm = trace_fx(model)
    from torch.fx.passes.shape_prop import ShapeProp
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example)
    except Exception as err:  # noqa: BLE001
        raise TraceError(f"the fx graph of {type(model).__name__} does not run: {type(err).__name__}: {err}") from err
    return gm


def target_num_filters(m: nn.Module) -> int:
    """The filters of a layer carfast scores (``registry.layer_filters``)."""
    return layer_filters(m)


def reader_spec(reader: Reader, modules: dict) -> LayerSpec:
    """The arithmetic of a conv / linear reader (module or functional call)."""
    op = reader.op
    if op.kind == "module":
        return LayerSpec.of_module(op.target)
    w = _param(op.args[1] if len(op.args) > 1 else op.kwargs["weight"], modules)
    if reader.kind == "linear":
        return LayerSpec("linear", w)
    a = list(op.args) + [None] * 7

    def get(i, key, default):          # F.conv2d(input, weight, bias, stride, padding, dilation, groups)
        return a[i] if a[i] is not None else op.kwargs.get(key, default)

    def pair(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    padding = get(4, "padding", 0)
    return LayerSpec("conv", w, pair(get(3, "stride", 1)), padding if isinstance(padding, str) else pair(padding),
                     pair(get(5, "dilation", 1)), get(6, "groups", 1))


def _param(op, modules):
    if getattr(op, "kind", None) != "param":
        raise FlowError(f"a functional conv / linear whose weight is computed in forward ({op.label}) cannot be "
                        "removed from; carfast needs the weight to be the model's parameter", "weight")
    return getattr(modules[op.module], op.target)


def descendants(roots) -> set:
    out, stack = set(roots), list(roots)
    while stack:
        for u in stack.pop().users:
            if u not in out:
                out.add(u)
                stack.append(u)
    return out


def _is_shape_value(node: fx.Node) -> bool:
    """A call that returns no tensor (a size, a shape entry, arithmetic on them): recomputed in the suffix,
    whose batch differs from the prefix's."""
    return node.op in ("call_method", "call_function") and "tensor_meta" not in node.meta


def _from_parameters(node: fx.Node, memo: dict) -> bool:
    """A value computed from the model's parameters alone (``self.gamma.reshape(1, -1, 1, 1)``): the same
    for every image, so the suffix computes it itself rather than reading it per image."""
    if node not in memo:
        memo[node] = node.op == "get_attr" or node.op in ("call_function", "call_method", "call_module") and \
            all(_from_parameters(a, memo) for a in node.all_input_nodes) and node.op != "call_module"
    return memo[node]


def suffix_inputs(gm: fx.GraphModule, changed: set, entries) -> tuple[list[fx.Node], set]:
    """What a suffix made of the nodes ``changed`` reads from before the cut: (boundary tensors in graph
    order, shape queries to recompute inside the suffix, whose batch size differs there). ``entries``
    (nodes of ``changed``) become suffix inputs themselves, so their own inputs are not read."""
    boundary, recompute, constant = [], set(), {}
    stack = [a for n in changed if not any(n is e for e in entries) for a in n.all_input_nodes if a not in changed]
    while stack:
        a = stack.pop()
        if a in recompute or a in boundary or a.op == "get_attr":
            continue
        if _is_shape_value(a) or _from_parameters(a, constant):
            recompute.add(a)
            stack.extend(x for x in a.all_input_nodes if x not in changed)
            continue
        boundary.append(a)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    boundary.sort(key=order.__getitem__)
    return boundary, recompute


def subgraph(gm: fx.GraphModule, inputs, body, graph: fx.Graph | None = None, wrap=None, replace=None,
             extra=()) -> fx.GraphModule:
    """A GraphModule over ``gm``'s modules: placeholders for ``inputs`` (pairs (node, name)), then copies
    of ``body`` (nodes of ``gm`` in topological order, ending with its output node); the parameters the
    body reads are fetched as in ``gm``.

    ``graph``: a graph to append to (holding e.g. a placeholder of its own first); ``wrap(node, value)``:
    the value later nodes read in place of ``node``'s copy (inputs and body, not the output), so a caller
    can insert ops after chosen nodes; ``replace(node, g, env)``: the value of a body node the caller builds
    itself (None: copy it); ``extra``: names of more placeholders after the inputs' (``env[name]``)."""
    g = graph if graph is not None else fx.Graph()

    def put(node, value):
        return value if wrap is None else wrap(node, value)

    env = {n: put(n, g.placeholder(name)) for n, name in inputs}
    env.update({name: g.placeholder(name) for name in extra})
    body = [n for n in body if n not in env]
    for n in body:
        for a in n.all_input_nodes:
            if a.op == "get_attr" and a not in env:
                env[a] = g.node_copy(a)
    for n in body:
        made = replace(n, g, env) if replace is not None else None
        copy = made if made is not None else g.node_copy(n, lambda a: env[a])
        env[n] = copy if n.op == "output" else put(n, copy)
    return fx.GraphModule(gm, g)


def build_prefix(gm, capture, gather=None) -> fx.GraphModule:
    """The whole network, also returning a clone of each node in ``capture`` taken when it is made
    (``gather[i] = (axis, index)``: only those positions of capture i, by ``index_select``); a node may be
    captured more than once (a consumer's input that the suffix also reads)."""
    g = fx.Graph()
    env, outs = {}, [None] * len(capture)
    wanted = {}
    for i, n in enumerate(capture):
        wanted.setdefault(n, []).append(i)
    out_value = None
    for n in gm.graph.nodes:
        if n.op == "output":
            out_value = env[n.args[0]]
            continue
        env[n] = g.node_copy(n, lambda a: env[a])
        for i in wanted.get(n, ()):
            sel = gather[i] if gather else None
            outs[i] = g.call_function(torch.clone, (env[n],)) if sel is None else \
                g.call_function(torch.index_select, (env[n], sel[0], g.get_attr(sel[1])))
    g.output(tuple(outs) + (out_value,))
    return fx.GraphModule(gm, g)


def _first_level(readers: list[Reader], nodes: dict) -> tuple[list[Reader], list[Reader]]:
    """(cached consumers: conv / linear readers whose input no reader's output feeds, the other readers)."""
    below = descendants([u for r in readers for u in nodes[r.op].users])      # what any reader's output feeds
    cached = [r for r in readers if r.kind in ("conv", "linear") and nodes[r.op] not in below
              and not (r.op.kind == "module" and is_registered(r.op.target))]    # no LayerSpec: read masked
    return cached, [r for r in readers if r not in cached]


def split(flow: Flow, model: nn.Module, fn: str = "score_layer") -> LayerGraph:
    """The prefix / suffix split of ``flow`` (fx front end)."""
    graph = flow.graph
    if graph.front_end != "fx":
        raise TraceError(f"torch.fx cannot trace {type(model).__name__}")
    gm = graph.gm
    nodes = {op: op.fx_node for op in graph.ops}
    modules = dict(model.named_modules())
    cached, masked = _first_level(flow.readers, nodes)
    if not cached and not masked:
        raise FlowError(f"{fn}: layer {flow.layer!r} has no consumer (Conv2d or Linear) on the path to the output; "
                        "score a layer that feeds one", "output")
    consumers = []
    for r in cached:
        owned = r.owned
        index = torch.cat(owned) if owned else torch.zeros(0, dtype=torch.long)
        offsets = torch.tensor([0] + [len(o) for o in owned]).cumsum(0)
        axis = r.axis if r.kind == "conv" else -1
        consumers.append(Consumer(r.name, nodes[r.op], reader_spec(r, modules), axis, index, offsets,
                                  int(r.codes.shape[axis])))
    cut = [c.node for c in consumers]
    masked_nodes = {nodes[r.op]: r for r in masked}
    changed = descendants(cut) | descendants(list(masked_nodes))
    boundary, recompute = suffix_inputs(gm, changed, cut)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    suffix_nodes = sorted(changed | recompute, key=order.__getitem__)
    suffix = _build_suffix(gm, cut, boundary, suffix_nodes, masked_nodes, flow.walk.rules)
    device = next(iter(gm.parameters()), torch.zeros(())).device
    gather = [None if c.identity() else (c.axis, _attach(gm, "gather", c.index.to(device))) for c in consumers]
    prefix = build_prefix(gm, [c.node.args[0] for c in consumers] + cut + boundary,
                          gather + [None] * (len(cut) + len(boundary)))
    target = gm.get_submodule(flow.layer)
    return LayerGraph(flow.layer, target, flow.num_units, consumers, gm, prefix, suffix, boundary, flow,
                      bool(masked_nodes), [n for n in suffix_nodes if n not in cut])


def _build_suffix(gm, cut, boundary, suffix_nodes, masked: dict, rules: dict) -> fx.GraphModule:
    """The suffix; readers in ``masked`` ({node: Reader}) read through a mask (see the module docstring)."""
    inputs = [(n, f"z{i}") for i, n in enumerate(cut)] + [(n, f"b{i}") for i, n in enumerate(boundary)]

    def replace(n, g, env):
        r = masked.get(n)
        if r is None:
            return None
        keep, x = env["keep"], env[n.args[0]]
        if r.kind == "norm":
            module, w, b = _masked_norm(n, r, rules[r.op], g, env)
            return g.call_module(_attach(gm, "mask", module), (x, keep, w, b))
        prof, axis = reader_profile(r)
        xm = g.call_module(_attach(gm, "mask", UnitMask(prof, axis)), (x, keep))
        return g.node_copy(n, lambda a: xm if a is n.args[0] else env[a])

    return subgraph(gm, inputs, suffix_nodes, replace=replace, extra=("keep",) if masked else ())


def _attach(gm: fx.GraphModule, kind: str, obj) -> str:
    """Register ``obj`` (a module or a tensor) on carfast's traced copy ``gm`` under a fresh name."""
    i = 0
    while hasattr(gm, f"_carfast_{kind}_{i}"):
        i += 1
    name = f"_carfast_{kind}_{i}"
    if isinstance(obj, nn.Module):
        gm.add_submodule(name, obj)
    else:
        gm.register_buffer(name, obj, persistent=False)
    return name


def _masked_norm(n: fx.Node, r: Reader, rule, g: fx.Graph, env):
    """(MaskedNorm, weight node, bias node) replacing the norm call ``n`` in the suffix."""
    norm = masked_norm(r, rule)
    if n.op == "call_module":
        m = r.op.target
        w = g.get_attr(f"{n.target}.weight") if getattr(m, "weight", None) is not None else None
        b = g.get_attr(f"{n.target}.bias") if getattr(m, "bias", None) is not None else None
        return norm, w, b
    a = list(n.args) + [None] * 4                 # layer_norm(x, shape, w, b, eps) / group_norm(x, G, w, b, eps)
    w = a[2] if a[2] is not None else n.kwargs.get("weight")
    b = a[3] if a[3] is not None else n.kwargs.get("bias")
    return norm, (env[w] if isinstance(w, fx.Node) else w), (env[b] if isinstance(b, fx.Node) else b)


def analyze(model: nn.Module, name: str, example: torch.Tensor, fn: str = "score_layer",
            group: bool = False) -> LayerGraph:
    """Trace ``model`` and split it where removing layer ``name``'s filters (``group``: its coupling group's
    channels) takes effect; ``example`` is [1, ...]; ``fn`` names the calling function in error messages."""
    graph = from_fx(model, example)
    flow = analyze_flow(model, name, example, fn, group=group, graph=graph)
    return split(flow, model, fn)
