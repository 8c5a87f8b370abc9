"""Layer tables: the named outputs a user may ask for, derived from a network's traced graph.

A `Layer` names a node of the traced graph, the shape of its output for one image and how that
output becomes one vector per image (`reduce`). `derive_layers` finds, for any classifier, the
outputs of its stages (the last block output at each spatial resolution, or every transformer
block), its global pool, the input of its last linear layer and its logits, with shapes from
propagating a tensor on the meta device: no weights, no real compute.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

REDUCTIONS = ("flatten", "avgpool", "avgpool_nhwc", "cls_token", "mean_tokens")


@dataclass(frozen=True)
class Layer:
    """A named graph node, the shape of its output for one image, and how it becomes a vector:
    flattened, global-average-pooled (channels first or last), the class token or the mean of
    the patch tokens."""

    name: str
    node: str
    shape: tuple[int, ...]
    reduce: str = "flatten"
    description: str = ""
    prefix_tokens: int = 1  # tokens before the patch tokens (class, registers): not in their mean

    def __post_init__(self) -> None:
        if self.reduce not in REDUCTIONS:
            raise ValueError(f"layer {self.name}: unknown reduction {self.reduce!r}")
        if self.reduce in ("cls_token", "mean_tokens") and len(self.shape) != 2:
            raise ValueError(f"layer {self.name}: {self.reduce} needs a (tokens, width) output, "
                             f"not {self.shape}")
        if self.reduce == "flatten" and len(self.shape) == 2:
            raise ValueError(f"layer {self.name}: a token output {self.shape} is reduced by "
                             "cls_token or mean_tokens, never flattened")
        if self.reduce.startswith("avgpool") and len(self.shape) != 3:
            raise ValueError(f"layer {self.name}: avgpool needs a spatial output, not {self.shape}")

    @property
    def dim(self) -> int:
        """Length of the vector one image gives."""
        if self.reduce == "avgpool":
            return self.shape[0]
        if self.reduce in ("avgpool_nhwc", "cls_token", "mean_tokens"):
            return self.shape[-1]
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def spatial(self) -> bool:
        """Whether the output is a (channels, height, width) map (for activation grids)."""
        return self.reduce == "flatten" and len(self.shape) == 3

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> Layer:
        return cls(**{**data, "shape": tuple(data["shape"])})

    def describe_shape(self) -> str:
        how = {"flatten": "", "avgpool": " -> avg pool", "avgpool_nhwc": " (HxWxC) -> avg pool",
               "cls_token": " -> class token", "mean_tokens": " -> mean of patch tokens"}
        return "x".join(map(str, self.shape)) + how[self.reduce]


@dataclass(frozen=True)
class GraphNode:
    """One traced operation: its name for create_feature_extractor, the module it runs in, its
    output shape for one image (None when it is not a tensor) and the module's class."""

    name: str
    module: str
    shape: tuple[int, ...] | None
    kind: str
    inputs: tuple[str, ...] = ()


def trace_graph(module, input_size: int, tracer_kwargs: dict | None = None,
                ) -> tuple[list[GraphNode], str]:
    """The eval-mode graph of `module` in execution order, with output shapes propagated from a
    (1, 3, size, size) tensor on the meta device (`module` may itself live there), and the name
    of the node the network returns."""
    import torch
    from torch.fx.passes.shape_prop import ShapeProp

    module = module.to("meta")
    from torchvision.models.feature_extraction import NodePathTracer, _set_default_tracer_kwargs

    tracer = NodePathTracer(**_set_default_tracer_kwargs(tracer_kwargs))
    graph = tracer.trace(module.eval())
    graph_module = torch.fx.GraphModule(tracer.root, graph)
    ShapeProp(graph_module).propagate(torch.empty(1, 3, input_size, input_size, device="meta"))
    modules = dict(module.named_modules())
    nodes, output = [], ""
    for node in graph.nodes:
        if node.op == "output":
            returned = node.args[0]
            output = tracer.node_to_qualname.get(returned, "") if hasattr(returned, "op") else ""
        name = tracer.node_to_qualname.get(node)
        if name is None or node.op in ("placeholder", "output"):
            continue
        meta = node.meta.get("tensor_meta")
        shape = tuple(meta.shape)[1:] if hasattr(meta, "shape") and len(meta.shape) else None
        owner = name if node.op == "call_module" else name.rpartition(".")[0]
        kind = (type(modules[node.target]).__name__ if node.op == "call_module"
                else getattr(node.target, "__name__", str(node.target)))
        inputs = tuple(tracer.node_to_qualname[a] for a in node.all_input_nodes
                       if a in tracer.node_to_qualname)
        nodes.append(GraphNode(name, owner, shape, kind, inputs))
    return nodes, output


def _blocks(module) -> list[str]:
    """Module paths of the units a stage is made of: the root's children, with a plain container
    (Sequential, ModuleList) under the root opened into its children, and a child of the root
    that holds a stack of alike blocks opened down to them; e.g. resnet's layer1.0, convnext's
    features.1, vit's encoder.layers.encoder_layer_0."""
    from torch import nn

    plain = (nn.Sequential, nn.ModuleList, nn.ModuleDict)

    def is_stack(container) -> bool:
        kinds = {type(k) for k in container.children()}
        return type(container) in plain and len(list(container.children())) >= 3 and len(kinds) == 1

    paths: list[str] = []
    for name, child in module.named_children():
        if type(child) in plain:
            paths += [f"{name}.{k}" for k, _ in child.named_children()]
        elif any(is_stack(k) for k in child.children()):
            for k, grandchild in child.named_children():
                if is_stack(grandchild):
                    paths += [f"{name}.{k}.{g}" for g, _ in grandchild.named_children()]
                else:
                    paths.append(f"{name}.{k}")
        else:
            paths.append(name)
    return paths


_LAYOUT_MODULES = {"Flatten", "Permute", "Dropout", "Identity"}
_LAYOUT_OPS = _LAYOUT_MODULES | {"permute", "flatten", "reshape", "view", "contiguous", "transpose"}
_POOL_OPS = _LAYOUT_OPS | {"AdaptiveAvgPool2d", "AvgPool2d", "adaptive_avg_pool2d", "mean", "squeeze"}


def _resolution(shape: tuple[int, ...]) -> tuple[int, bool]:
    """Spatial size of a 3-d output for one image and whether its channels come last."""
    if shape[1] == shape[2]:
        return shape[1], False
    if shape[0] == shape[1]:
        return shape[0], True
    return 0, False


def _short_names(paths: list[str]) -> dict[str, str]:
    """The shortest trailing part of each path that is unique and not a bare number."""
    names = {}
    for path in paths:
        parts = path.split(".")
        for k in range(1, len(parts) + 1):
            tail = ".".join(parts[-k:])
            if parts[-k].isdigit() or any(p != path and (p == tail or p.endswith("." + tail))
                                          for p in paths):
                continue
            names[path] = tail
            break
        else:
            names[path] = path
    return names


def derive_layers(module, input_size: int, prefix_tokens: int = 1, *, tracer_kwargs: dict | None = None,
                  ) -> tuple[list[Layer], list[str]]:
    """The layer table of any classifier and its default layers, from its traced graph: each
    stage output (flattened, and average-pooled), or each transformer block (class token, mean
    of patch tokens), then the global pool, the input of a hidden classifier layer, the logits."""
    nodes, output = trace_graph(module, input_size, tracer_kwargs)
    blocks = _blocks(module)
    last = _block_outputs(nodes, blocks)
    outputs = [(block, node) for block, node in last.items() if node.shape and node.name != output
               and node.kind not in (_LAYOUT_MODULES if block in blocks else _LAYOUT_OPS)]
    spatial = [(b, n) for b, n in outputs if len(n.shape) == 3 and _resolution(n.shape)[0] > 1]
    tokens = [(b, n) for b, n in outputs if len(n.shape) == 2 and b in blocks]
    transformer = bool(tokens) and len(tokens) >= len(spatial)
    stages = tokens if transformer else [  # the last block output at each spatial resolution
        (b, n) for i, (b, n) in enumerate(spatial)
        if i + 1 == len(spatial) or _resolution(spatial[i + 1][1].shape)[0] < _resolution(n.shape)[0]]
    places = [_stage_place(block, node, blocks, last=last) for block, node in stages]
    names = _short_names(places)
    layers = [layer for place, (_, node) in zip(places, stages)
              for layer in stage_layers(names[place], place, node.shape, prefix_tokens=prefix_tokens)]
    head, pooled_last = _head_layers(nodes, output, stages, layers=layers, transformer=transformer)
    return layers + head, _defaults(layers + head, transformer, pooled_last)


def _block_outputs(nodes: list[GraphNode], blocks: list[str]) -> dict[str, GraphNode]:
    """{block: its last node}, in execution order; an operation of the root's own forward is a
    block of its own."""
    def block_of(node: GraphNode) -> str:
        for block in blocks:
            if node.module == block or node.module.startswith(block + ".") or node.name == block:
                return block
        return node.name

    last: dict[str, GraphNode] = {}
    for node in nodes:
        last[block_of(node)] = node
    order = {node.name: i for i, node in enumerate(nodes)}
    return dict(sorted(last.items(), key=lambda item: order[item[1].name]))


def _stage_place(block: str, node: GraphNode, blocks: list[str], *, last: dict[str, GraphNode]) -> str:
    """The container a stage is all of (resnet's layer1), else its last block (features.3)."""
    container = block.rpartition(".")[0]
    members = [b for b in blocks if b.startswith(container + ".")]
    if container and "." not in container and members[-1] == block and all(
            _same_resolution(last.get(b), node) for b in members):
        return container
    return block


def _same_resolution(a: GraphNode | None, b: GraphNode) -> bool:
    if a is None or not a.shape:
        return True
    return len(a.shape) == len(b.shape) == 3 and _resolution(a.shape)[0] == _resolution(b.shape)[0]


def stage_layers(name: str, place: str, shape: tuple[int, ...], *, prefix_tokens: int) -> list[Layer]:
    """A token stage as its class token (when it has one) and token mean; a spatial one
    flattened and average-pooled (over the right axes when channels come last)."""
    if len(shape) == 2:
        mean = Layer(f"{name}_mean", place, shape, "mean_tokens", f"mean of the patch tokens of {place}",
                     prefix_tokens)
        if not prefix_tokens:
            return [mean]
        return [Layer(f"{name}_cls", place, shape, "cls_token", f"class token of {place}", prefix_tokens),
                mean]
    pooled = "avgpool_nhwc" if _resolution(shape)[1] else "avgpool"
    return [Layer(name, place, shape, "flatten", f"output of {place}"),
            Layer(f"{name}_pool", place, shape, pooled, f"global average pool of {place}")]


def _head_layers(nodes: list[GraphNode], output: str, stages: list[tuple[str, GraphNode]],
                 *, layers: list[Layer], transformer: bool) -> tuple[list[Layer], bool]:
    """pool (the first vector as wide as the last stage), pre_logits (the input of a last linear
    layer that follows a hidden one) and logits; and whether the last stage keeps its own pool
    (it does not when `pool` is that very average)."""
    by_name = {node.name: node for node in nodes}
    after = nodes.index(stages[-1][1]) + 1 if stages else 0
    last_shape = stages[-1][1].shape if stages else ()
    width = last_shape[-1] if len(last_shape) == 2 or (last_shape and _resolution(last_shape)[1]) \
        else (last_shape[0] if last_shape else None)
    pool = next((n for n in nodes[after:] if n.shape and len(n.shape) == 1 and n.shape[0] == width
                 and n.name != output), None)
    head: list[Layer] = []
    pooled_last = True
    if pool and not transformer:
        if _through(pool, by_name, _POOL_OPS).name == stages[-1][1].name:
            layers.pop()  # the last stage's own average pool is the global pool
            pooled_last = False
        head.append(Layer("pool", pool.name, pool.shape, "flatten", "global average pool"))
    logits = by_name.get(output)
    if logits and logits.kind == "Linear" and logits.inputs:
        hidden = _through(by_name[logits.inputs[0]], by_name, {"Dropout", "Identity"})
        if hidden.shape and len(hidden.shape) == 1 and (not pool or hidden.name != pool.name) \
                and any(n.kind == "Linear" for n in nodes[after:nodes.index(logits)]):
            head.append(Layer("pre_logits", hidden.name, hidden.shape, "flatten",
                              "input of the last linear layer"))
    if logits and logits.shape and len(logits.shape) == 1:
        head.append(Layer("logits", logits.name, logits.shape, "flatten", "class scores"))
    return head, pooled_last


def _through(node: GraphNode, by_name: dict[str, GraphNode], kinds: set[str]) -> GraphNode:
    """Walk back from `node` through operations of the given kinds."""
    while node.kind in kinds and node.inputs and node.inputs[0] in by_name:
        node = by_name[node.inputs[0]]
    return node


def _defaults(layers: list[Layer], tokens: bool, pooled_last: bool) -> list[str]:
    """Compact layers worth a first table: the last two pooled stages (or for transformers a
    middle and the last block), the global pool, a hidden classifier layer and the logits."""
    if tokens:
        cls = [layer.name for layer in layers if layer.reduce == "cls_token"]
        picked = [cls[len(cls) // 2], cls[-1], cls[-1].removesuffix("_cls") + "_mean"]
    else:
        pooled = [layer.name for layer in layers if layer.reduce.startswith("avgpool")]
        picked = pooled[-2 if pooled_last else -1:]
    picked += [n for n in ("pool", "pre_logits", "logits") if any(layer.name == n for layer in layers)]
    return list(dict.fromkeys(picked))
