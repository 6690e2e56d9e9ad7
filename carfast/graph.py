"""Find where a layer's filters are consumed, and split the network there (torch.fx).

``analyze(model, name, example)`` traces the model, follows the target's output through the
channel-preserving chain (BN, activations, pooling, dropout, depthwise convs, flatten) to its
consumers, and builds:

- a *prefix* module: the whole network, returning (cloned at production, so later in-place ops
  cannot alter them) each consumer's input A_u and output Z_u, the *boundary* values the rest of the
  network reads besides the consumers' outputs (e.g. a residual shortcut), and the logits;
- a *suffix* module: the network from the consumers' outputs (and the boundary values) to the logits.

Removing filter k replaces Z_u by Z_u - U_k(A_u[:, owned(k)]) (``ops/consumer_delta.py``) and runs
the suffix. Raises ``ValueError`` with the reason when the target cannot be removed on its own
(its channels enter a residual add: coupled) and ``TraceError`` when fx cannot trace the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .ops_catalog import classify_function, classify_module, is_channel_map

__all__ = ["TraceError", "Consumer", "LayerGraph", "analyze", "trace", "walk_chain", "fn_name", "subgraph",
           "suffix_inputs", "descendants", "build_prefix"]


class TraceError(RuntimeError):
    """torch.fx could not trace or run the model symbolically (the slower full-network path applies)."""


@dataclass
class Consumer:
    """A layer that mixes the target's channels; filter k owns input slice [k*width, (k+1)*width)."""
    name: str
    module: nn.Module
    node: fx.Node
    width: int


@dataclass
class LayerGraph:
    """The target layer's place in a traced network; see module docstring."""
    layer: str
    module: nn.Module
    num_filters: int
    consumers: list[Consumer]
    gm: fx.GraphModule
    prefix: fx.GraphModule          # x -> (A_1..A_u, Z_1..Z_u, B_1..B_b, logits)
    suffix: fx.GraphModule          # (Z_1..Z_u, B_1..B_b) -> logits
    boundary: list[fx.Node]
    changed: list[fx.Node] = field(repr=False, default_factory=list)  # suffix nodes, topological order


def fn_name(node: fx.Node) -> str:
    """The name of a call_function / call_method node's operation (``relu``, ``view``, ``add``...)."""
    if node.op == "call_method":
        return node.target
    return getattr(node.target, "__name__", str(node.target))


def _shape(node) -> tuple | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


class _Tracer(fx.Tracer):
    """fx's tracer, keeping channel-map shortcuts (modules with ``carfast_channel_map()``, such as
    ``models.OptionAShortcut``) as one call each, so the graph code can read their channel map."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_channel_map(m) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """Symbolically trace ``model`` and propagate shapes of ``example`` [1, ...]; ``TraceError`` if fx cannot."""
    try:
        gm = fx.GraphModule(model, _Tracer().trace(model), type(model).__name__)
    except Exception as err:  # noqa: BLE001 - any tracing failure means: use the full-network path
        raise TraceError(f"torch.fx cannot trace {type(model).__name__}: {type(err).__name__}: {err}") from err
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example)
    except Exception as err:  # noqa: BLE001
        raise TraceError(f"the fx graph of {type(model).__name__} does not run: {type(err).__name__}: {err}") from err
    return gm


def walk_chain(gm: fx.GraphModule, target: fx.Node, name: str, fn: str = "score_layer"):
    """Follow the target's channels to their consumers. Returns (chain nodes, consumers).

    ``fn`` names the calling function in error messages."""
    modules = dict(gm.named_modules())
    chain, consumers = [target], []
    frontier = [(target, 1)]
    seen = {target}
    while frontier:
        node, width = frontier.pop()
        for user in node.users:
            if user.op == "output":
                raise ValueError(f"{fn}: layer {name!r} has no consumer on the path to the output: its "
                                 f"channels reach the model's output through {node.name!r} without passing a "
                                 "Conv2d or Linear; score a layer that feeds one")
            if user.op == "call_module":
                kind, info = classify_module(modules[user.target], _shape(node), _shape(user))
                label = user.target
            else:
                kind, info = classify_function(fn_name(user), _shape(node), _shape(user))
                label = user.name
            if kind == "shape":
                continue
            if kind == "coupled":
                raise ValueError(
                    f"{fn}: layer {name!r} cannot be scored on its own: its channels enter "
                    f"{info!r} ({label}), a residual add / concat that couples them with another layer's "
                    "channels (removing one means removing it from every member of the coupling group). "
                    "Score the whole group with carfast.score_group (carfast score --group), or a layer whose "
                    "output feeds only convolutions or linears, such as a ResNet block's first conv (e.g. "
                    "'layer1.0.conv1')")
            if kind == "unsupported":
                raise ValueError(f"{fn}: layer {name!r}: its channels reach {label!r}, {info}; carfast "
                                 "follows BN, activations, pooling, dropout, depthwise convs and flatten into "
                                 "Conv2d/Linear consumers")
            if user.args[:1] != (node,) or node in user.args[1:] or node in user.kwargs.values():
                raise ValueError(f"{fn}: layer {name!r}: its channels reach {label!r} as other than its "
                                 "only input; carfast follows chains of per-channel ops into Conv2d/Linear")
            if kind == "consumer":
                mod = modules[user.target]
                if any(c.node is user for c in consumers):
                    raise ValueError(f"{fn}: layer {name!r} reaches consumer {label!r} twice")
                consumers.append(Consumer(user.target, mod, user, width))
                continue
            if user not in seen:
                seen.add(user)
                chain.append(user)
                frontier.append((user, width * info))
    return chain, consumers


def descendants(roots) -> set:
    out, stack = set(roots), list(roots)
    while stack:
        for u in stack.pop().users:
            if u not in out:
                out.add(u)
                stack.append(u)
    return out


def _is_shape_value(node: fx.Node) -> bool:
    return node.op in ("call_method", "call_function") and fn_name(node) in ("size", "getattr", "getitem", "dim")


def analyze(model: nn.Module, name: str, example: torch.Tensor, fn: str = "score_layer") -> LayerGraph:
    """Trace ``model`` and split it at the consumers of layer ``name``; ``example`` is [1, ...] input;
    ``fn`` names the calling function in error messages."""
    gm = trace(model, example)
    targets = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == name]
    if not targets:
        raise ValueError(f"{fn}: layer {name!r} is never called in the model's forward; score a layer "
                         "that runs")
    if len(targets) > 1:
        raise ValueError(f"{fn}: layer {name!r} is called {len(targets)} times in forward (shared "
                         "weights); its filters cannot be removed at one place")
    target = targets[0]
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    if not isinstance(out_node.args[0], fx.Node) or _shape(out_node.args[0]) is None \
            or len(_shape(out_node.args[0])) != 2:
        raise ValueError(f"{fn}: the model must return one tensor of logits [N, classes]; wrap it so "
                         "forward returns that tensor")
    chain, consumers = walk_chain(gm, target, name, fn)
    if not consumers:
        raise ValueError(f"{fn}: layer {name!r} has no consumer (Conv2d or Linear) on the path to the "
                         "output; score a layer that feeds one")
    chain_set = set(chain)
    changed = descendants([c.node for c in consumers])
    boundary, recompute = suffix_inputs(gm, changed, [c.node for c in consumers])
    bad = next((a for a in boundary if a in chain_set), None)
    if bad is not None:
        raise ValueError(f"{fn}: layer {name!r}: the network after the consumers reads {bad.name!r}, "
                         "a value on the target's chain, other than through the consumers; not supported")
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    suffix_nodes = sorted(changed | recompute, key=order.__getitem__)
    consumer_nodes = [c.node for c in consumers]
    suffix = _build_suffix(gm, consumer_nodes, boundary, suffix_nodes)
    prefix = build_prefix(gm, [c.node.args[0] for c in consumers] + consumer_nodes + boundary)
    num = target_num_filters(gm.get_submodule(name))
    return LayerGraph(name, gm.get_submodule(name), num, consumers, gm, prefix, suffix, boundary,
                      [n for n in suffix_nodes if n not in consumer_nodes])


def suffix_inputs(gm: fx.GraphModule, changed: set, entries) -> tuple[list[fx.Node], set]:
    """What a suffix made of the nodes ``changed`` reads from before the cut: (boundary tensors in graph
    order, shape queries to recompute inside the suffix, whose batch size differs there). ``entries``
    (nodes of ``changed``) become suffix inputs themselves, so their own inputs are not read."""
    boundary, recompute = [], set()
    stack = [a for n in changed if not any(n is e for e in entries) for a in n.all_input_nodes if a not in changed]
    while stack:
        a = stack.pop()
        if a in recompute or a in boundary or a.op == "get_attr":
            continue
        if _is_shape_value(a):
            recompute.add(a)
            stack.extend(x for x in a.all_input_nodes if x not in changed)
            continue
        boundary.append(a)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    boundary.sort(key=order.__getitem__)
    return boundary, recompute


def target_num_filters(m: nn.Module) -> int:
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features


def subgraph(gm: fx.GraphModule, inputs, body, graph: fx.Graph | None = None, wrap=None) -> fx.GraphModule:
    """A GraphModule over ``gm``'s modules: placeholders for ``inputs`` (pairs (node, name)), then copies
    of ``body`` (nodes of ``gm`` in topological order, ending with its output node); the parameters the
    body reads are fetched as in ``gm``.

    ``graph``: a graph to append to (holding e.g. a placeholder of its own first); ``wrap(node, value)``:
    the value later nodes read in place of ``node``'s copy (inputs and body, not the output), so a caller
    can insert ops after chosen nodes."""
    g = graph if graph is not None else fx.Graph()

    def put(node, value):
        return value if wrap is None else wrap(node, value)

    env = {n: put(n, g.placeholder(name)) for n, name in inputs}
    body = [n for n in body if n not in env]
    for n in body:
        for a in n.all_input_nodes:
            if a.op == "get_attr" and a not in env:
                env[a] = g.node_copy(a)
    for n in body:
        copy = g.node_copy(n, lambda a: env[a])
        env[n] = copy if n.op == "output" else put(n, copy)
    return fx.GraphModule(gm, g)


def _build_suffix(gm, consumer_nodes, boundary, suffix_nodes) -> fx.GraphModule:
    inputs = [(n, f"z{i}") for i, n in enumerate(consumer_nodes)] + [(n, f"b{i}") for i, n in enumerate(boundary)]
    return subgraph(gm, inputs, suffix_nodes)


def build_prefix(gm, capture) -> fx.GraphModule:
    """The whole network, also returning a clone of each node in ``capture`` taken when it is made."""
    g = fx.Graph()
    env, clones = {}, {}
    wanted = {n: i for i, n in enumerate(capture)}
    out_value = None
    for n in gm.graph.nodes:
        if n.op == "output":
            out_value = env[n.args[0]]
            continue
        env[n] = g.node_copy(n, lambda a: env[a])
        if n in wanted:
            clones[n] = g.call_function(torch.clone, (env[n],))
    g.output(tuple(clones[n] for n in capture) + (out_value,))
    return fx.GraphModule(gm, g)
