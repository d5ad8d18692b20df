"""The graph side of forward-only adaptation: which parameters of an export adapt, the private graph that
takes them as inputs, and the file written back.

Torch-free (``onnx`` edits the graph, numpy holds the values).  A *layer* is a Conv or Gemm node; its
weight is either a float32 initializer (fp32 exports) or the output of a DequantizeLinear of int8 values
(``subgrad quantize``'s INT8 export), whose weights stay as they are.

Parameter sets (``--params``; a comma-separated list is their union):

* ``head``: the last layer's weight and bias;
* ``affine``: a per-output-channel scale and shift inserted after every layer, ``y * s + t``, starting at
  ``s = 1, t = 0``: the role BatchNorm's affine plays in TENT, available although the exporter folded
  BatchNorm into the convolutions.  Written back folded into float weights (``W s``, ``b s + t``), or as
  explicit Mul and Add nodes where the weights are int8;
* ``last:K``: the weights and biases of the last K layers;
* ``all``: every float weight and bias of every layer;
* anything else: a glob over float initializer names (``layers.2.*``), which must select at least one.

The private graph also reports, for every layer but the last, the per-channel mean and mean square of
its output over the batch (ReduceMean nodes, so the session returns vectors, not activations): the
statistics an unlabelled objective aligns with the training data's (``source_statistics``).
"""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

AFFINE_PREFIX = "adapt.affine."
STATS_PREFIX = "adapt.stats."


class SelectionError(ValueError):
    """A parameter set that selects nothing or cannot be adapted in this export (the message says why)."""


@dataclass(frozen=True)
class Layer:
    """A Conv or Gemm node and where its output channels lie."""

    index: int  # position in graph.node
    output: str  # the node's output tensor
    weight: str  # the weight input (an initializer, or a DequantizeLinear output for int8 weights)
    bias: str | None  # the bias input, or None
    channels: int  # output channels
    weight_axis: int  # the weight's output-channel axis (0 for Conv and Gemm with transB=1, else 1)
    conv: bool  # Conv (NCHW output, channels on axis 1) or Gemm ([N, C] output)
    float_weight: bool  # the weight is a float32 initializer (False: int8 behind DequantizeLinear)


@dataclass(frozen=True)
class Param:
    """One adapted tensor: a graph input of the private graph, a slice of the flat buffer."""

    name: str  # graph input name (the initializer's own name for weights and biases)
    shape: tuple[int, ...]
    initial: np.ndarray  # float32 starting values
    layer: int  # index into layers() of the layer it belongs to
    role: str  # "weight", "bias", "scale" or "shift"


def _initializers(graph) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in graph.initializer}


def layers(model: onnx.ModelProto) -> list[Layer]:
    """The Conv and Gemm nodes in graph order (the exporter writes them topologically sorted)."""
    graph = model.graph
    inits = _initializers(graph)
    producers = {out: node for node in graph.node for out in node.output}
    found = []
    for index, node in enumerate(graph.node):
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2:
            continue
        weight = node.input[1]
        if weight in inits:
            dims, float_weight = list(inits[weight].dims), inits[weight].data_type == TensorProto.FLOAT
        elif weight in producers and producers[weight].op_type == "DequantizeLinear":
            source = producers[weight].input[0]
            if source not in inits:
                continue
            dims, float_weight = list(inits[source].dims), False
        else:
            continue  # a computed weight: not a parameter
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        axis = 0 if node.op_type == "Conv" or trans_b else 1
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        found.append(
            Layer(index, node.output[0], weight, bias, int(dims[axis]), axis, node.op_type == "Conv", float_weight)
        )
    if not found:
        raise SelectionError("the model has no Conv or Gemm layer with stored weights: nothing to adapt")
    return found


def _float_tensor(inits, name) -> np.ndarray | None:
    tensor = inits.get(name)
    if tensor is None or tensor.data_type != TensorProto.FLOAT:
        return None
    return numpy_helper.to_array(tensor).astype(np.float32, copy=True)


def select(model: onnx.ModelProto, spec: str) -> list[Param]:
    """The parameters ``spec`` names (module docstring), in graph order; :class:`SelectionError` when a part
    selects nothing or asks for int8 weights."""
    found = layers(model)
    inits = _initializers(model.graph)
    chosen: dict[str, Param] = {}

    def add_layer(i: int, what: str) -> None:
        layer = found[i]
        if not layer.float_weight:
            raise SelectionError(
                f"--params {what}: layer {layer.weight} has int8 weights (an INT8 export), which stay as they are; "
                "adapt --params affine instead"
            )
        for role, name in (("weight", layer.weight), ("bias", layer.bias)):
            values = _float_tensor(inits, name) if name else None
            if values is not None:
                chosen.setdefault(name, Param(name, values.shape, values, i, role))

    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise SelectionError("--params is empty; give head, affine, last:K, all or a glob over weight names")
    for part in parts:
        before = len(chosen)
        if part == "head":
            add_layer(len(found) - 1, part)
        elif part == "affine":
            for i, layer in enumerate(found):
                shape = (layer.channels, 1, 1) if layer.conv else (layer.channels,)
                for role, start in (("scale", 1.0), ("shift", 0.0)):
                    name = f"{AFFINE_PREFIX}{i}.{role}"
                    chosen[name] = Param(name, shape, np.full(shape, start, np.float32), i, role)
        elif part.startswith("last:"):
            count = part[5:]
            if not count.isdigit() or int(count) < 1:
                raise SelectionError(f"--params {part}: K must be a whole number >= 1 (last:2)")
            for i in range(max(0, len(found) - int(count)), len(found)):
                add_layer(i, part)
        elif part == "all":
            for i in range(len(found)):
                if found[i].float_weight:
                    add_layer(i, part)
        else:
            owners = {name: i for i, layer in enumerate(found) for name in (layer.weight, layer.bias) if name}
            for name in sorted(owners):
                values = _float_tensor(inits, name)
                if values is not None and fnmatch.fnmatchcase(name, part):
                    chosen.setdefault(name, Param(name, values.shape, values, owners[name], "weight"))
        if len(chosen) == before and part != "affine":
            names = ", ".join(n for layer in found for n in (layer.weight, layer.bias) if n and n in inits)
            raise SelectionError(
                f"--params {part} selects no float parameter of this model; its layers' parameters are: {names[:300]}"
            )
    order = {name: k for k, name in enumerate(t.name for t in model.graph.initializer)}
    return sorted(chosen.values(), key=lambda p: (p.layer, p.role in ("scale", "shift"), order.get(p.name, 0)))


def _affine_nodes(layer: Layer, index: int, scale: str, shift: str) -> tuple[list, str]:
    """Mul and Add after ``layer``: the layer now writes ``<output>.pre_affine``; returns (nodes, that name)."""
    pre = f"{layer.output}.pre_affine"
    scaled = f"{layer.output}.scaled"
    return [
        helper.make_node("Mul", [pre, scale], [scaled], name=f"{AFFINE_PREFIX}{index}.mul"),
        helper.make_node("Add", [scaled, shift], [layer.output], name=f"{AFFINE_PREFIX}{index}.add"),
    ], pre


def _insert_affine(graph, found: list[Layer], tensors: dict[int, tuple[str, str]]) -> None:
    """Put ``y * scale + shift`` after each layer in ``tensors`` ({layer index: (scale name, shift name)})."""
    nodes = list(graph.node)
    out = []
    by_node = {layer.index: (i, layer) for i, layer in enumerate(found)}
    for position, node in enumerate(nodes):
        if position in by_node and by_node[position][0] in tensors:
            i, layer = by_node[position]
            extra, pre = _affine_nodes(layer, i, *tensors[i])
            node = copy.deepcopy(node)
            node.output[0] = pre
            out.extend([node, *extra])
        else:
            out.append(node)
    del graph.node[:]
    graph.node.extend(out)


def _value_info(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def statistics_outputs(model: onnx.ModelProto, found: list[Layer]) -> list[str]:
    """Add per-channel mean and mean-square outputs of every layer but the last to ``model`` (in place):
    ``adapt.stats.<i>.mean`` and ``.sqmean``, each [C]; returns the layer outputs they describe."""
    graph = model.graph
    described = []
    for i, layer in enumerate(found[:-1]):
        axes_name = f"{STATS_PREFIX}{i}.axes"
        axes = [0, 2, 3] if layer.conv else [0]
        graph.initializer.append(numpy_helper.from_array(np.asarray(axes, np.int64), axes_name))
        square = f"{STATS_PREFIX}{i}.square"
        graph.node.extend(
            [
                helper.make_node("ReduceMean", [layer.output, axes_name], [f"{STATS_PREFIX}{i}.mean"], keepdims=0),
                helper.make_node("Mul", [layer.output, layer.output], [square]),
                helper.make_node("ReduceMean", [square, axes_name], [f"{STATS_PREFIX}{i}.sqmean"], keepdims=0),
            ]
        )
        graph.output.extend(
            [
                _value_info(f"{STATS_PREFIX}{i}.mean", [layer.channels]),
                _value_info(f"{STATS_PREFIX}{i}.sqmean", [layer.channels]),
            ]
        )
        described.append(layer.output)
    return described


def private_graph(model: onnx.ModelProto, params: list[Param], statistics: bool = False) -> onnx.ModelProto:
    """A copy of ``model`` whose ``params`` are graph inputs (and, with ``statistics``, whose outputs
    include the layers' channel statistics).  The file the model came from is not touched."""
    private = copy.deepcopy(model)
    graph = private.graph
    found = layers(private)
    taken = {p.name for p in params if p.role in ("weight", "bias")}
    kept = [t for t in graph.initializer if t.name not in taken]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    existing_inputs = {i.name for i in graph.input}
    affine: dict[int, dict[str, str]] = {}
    for p in params:
        if p.role in ("scale", "shift"):
            affine.setdefault(p.layer, {})[p.role] = p.name
        if p.name not in existing_inputs:
            graph.input.append(_value_info(p.name, p.shape))
    _insert_affine(graph, found, {i: (names["scale"], names["shift"]) for i, names in affine.items()})
    if statistics:
        statistics_outputs(private, layers(private))
    return private


def _dequantized_source(graph, weight: str) -> bool:
    return any(node.op_type == "DequantizeLinear" and weight in node.output for node in graph.node)


def written_model(model: onnx.ModelProto, params: list[Param], values: dict[str, np.ndarray]) -> onnx.ModelProto:
    """``model`` with the adapted ``values`` ({param name: array}): weights and biases replaced; each
    layer's scale and shift folded into its float weight and bias, or kept as Mul and Add nodes where the
    weight is int8.  Same inputs, outputs and metadata as ``model``."""
    out = copy.deepcopy(model)
    graph = out.graph
    inits = _initializers(graph)
    found = layers(out)
    for p in params:
        if p.role in ("weight", "bias"):
            inits[p.name].CopyFrom(numpy_helper.from_array(values[p.name].astype(np.float32), p.name))
    kept_affine: dict[int, tuple[str, str]] = {}
    for i, layer in enumerate(found):
        scale_name, shift_name = f"{AFFINE_PREFIX}{i}.scale", f"{AFFINE_PREFIX}{i}.shift"
        if scale_name not in values:
            continue
        scale = values[scale_name].reshape(-1).astype(np.float32)
        shift = values[shift_name].reshape(-1).astype(np.float32)
        node = graph.node[layer.index]
        if not layer.float_weight:
            for name, array in ((scale_name, values[scale_name]), (shift_name, values[shift_name])):
                graph.initializer.append(numpy_helper.from_array(array.astype(np.float32), name))
            kept_affine[i] = (scale_name, shift_name)
            continue
        weight = numpy_helper.to_array(inits[layer.weight]).astype(np.float32)
        view = [1] * weight.ndim
        view[layer.weight_axis] = -1
        inits[layer.weight].CopyFrom(numpy_helper.from_array(weight * scale.reshape(view), layer.weight))
        beta = next((a.f for a in node.attribute if a.name == "beta"), 1.0) if not layer.conv else 1.0
        if layer.bias is not None and layer.bias in inits:
            bias = numpy_helper.to_array(inits[layer.bias]).astype(np.float32)
            inits[layer.bias].CopyFrom(numpy_helper.from_array(bias * scale + shift / np.float32(beta), layer.bias))
        else:
            name = f"{layer.weight}.adapted_bias"
            graph.initializer.append(numpy_helper.from_array(shift / np.float32(beta), name))
            while len(node.input) < 3:
                node.input.append("")
            node.input[2] = name
    _insert_affine(graph, found, kept_affine)
    return out
