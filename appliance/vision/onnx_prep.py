"""Graph surgery that turns the shipped int8 block-quantized models into files onnxruntime runs well.

Run once by ``edugate models install``, never at daemon start: the result is written to disk and
checksummed, so the daemon only loads and verifies. Every step is a pure function on an
``onnx.ModelProto`` that returns how much it changed, so the install can record what it did.

Why each step exists (checked on YuNet 2023mar / SFace 2021dec int8bq, onnxruntime 1.32, OpenCV 5.0):

* SFace declares 29 weight names as graph inputs that no node reads (left over from the quantizer, which
  renamed the weights); onnxruntime then demands them as feeds and OpenCV's FaceRecognizerSF refuses the
  file. SFace also lists its 145 initializers as graph inputs; that is legal ONNX but it makes them
  overridable, so onnxruntime will not constant-fold them. Both kinds are removed.
* YuNet quantizes its 20 conv biases with a one-element 1-D scale *and* ``block_size=64``; the ONNX
  spec reads that as one block, onnxruntime reads a one-element scale as per-tensor and rejects the
  non-zero block size at run time. Dropping ``block_size``/``axis`` on those nodes means the same thing.
* onnxruntime does not constant-fold DequantizeLinear, so it dequantizes every weight on every run.
  Folding them once into float32 initializers (bit-identical to what onnxruntime computes) removes that.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper


class PrepareError(Exception):
    """The model does not have the structure the preparation expects; the message names the node."""


@dataclass(frozen=True)
class InputCleanup:
    """What :func:`remove_stale_inputs` removed from the graph inputs."""

    unused: list[str]
    initializers: int


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _set_attrs(node: onnx.NodeProto, keep: dict[str, object]) -> None:
    del node.attribute[:]
    for name, value in keep.items():
        node.attribute.append(helper.make_attribute(name, value))


def remove_stale_inputs(model: onnx.ModelProto, keep: set[str] | None = None) -> InputCleanup:
    """Drop graph inputs that no node reads, and inputs that merely repeat an initializer.

    ``keep`` names inputs that must stay even if unused (none in practice). Returns what was removed.
    """
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    consumed = {name for node in graph.node for name in node.input}
    consumed |= {out.name for out in graph.output}
    keep = keep or set()
    unused: list[str] = []
    shadowing = 0
    remaining = []
    for value in graph.input:
        if value.name in keep:
            remaining.append(value)
        elif value.name in initializers:
            shadowing += 1
        elif value.name not in consumed:
            unused.append(value.name)
        else:
            remaining.append(value)
    del graph.input[:]
    graph.input.extend(remaining)
    return InputCleanup(unused=unused, initializers=shadowing)


def fix_single_element_block_scales(model: onnx.ModelProto) -> list[str]:
    """Drop ``block_size``/``axis`` on DequantizeLinear nodes whose scale is a scalar or a 1-element vector.

    Only rank <= 1 scales are touched: onnxruntime treats exactly those as per-tensor. A one-element
    scale of rank 2 (YuNet has six, shape [1, 1]) is a valid one-block quantization there and is left alone.
    """
    initializers = {t.name: t for t in model.graph.initializer}
    fixed = []
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 2:
            continue
        attrs = _attrs(node)
        if not attrs.get("block_size"):
            continue
        scale = initializers.get(node.input[1])
        if scale is None or len(scale.dims) > 1 or int(np.prod(scale.dims)) != 1:
            continue
        _set_attrs(node, {k: v for k, v in attrs.items() if k not in {"block_size", "axis"}})
        fixed.append(node.name or node.output[0])
    return fixed


def dequantize(
    quantized: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray | None,
    axis: int = 1,
    block_size: int = 0,
    out_dtype: np.dtype | None = None,
) -> np.ndarray:
    """DequantizeLinear (opset 21) on constants: ``(q - zero_point) * scale``, per-tensor, per-axis or blocked.

    Computed as onnxruntime's CPU kernel does (integer subtraction, then float multiply in the scale's
    type), so a folded weight is bit-identical to the one onnxruntime would have produced at run time.
    """
    if quantized.dtype.kind not in "iu":
        raise PrepareError(f"cannot fold a DequantizeLinear of {quantized.dtype} data")
    dtype = np.dtype(out_dtype) if out_dtype is not None else scale.dtype
    if zero_point is None:
        zero_point = np.zeros(scale.shape, dtype=quantized.dtype)
    if zero_point.shape != scale.shape:
        raise PrepareError(f"zero point shape {zero_point.shape} differs from scale shape {scale.shape}")
    rank = quantized.ndim
    if scale.size == 1 and scale.ndim <= 1 and not block_size:
        scale_full, zero_full = scale.reshape(()), zero_point.reshape(())
    else:
        if rank == 0:
            raise PrepareError("a scalar cannot be quantized per axis or per block")
        axis = axis + rank if axis < 0 else axis
        if not 0 <= axis < rank:
            raise PrepareError(f"axis {axis} out of range for rank {rank}")
        length = quantized.shape[axis]
        if block_size:
            blocks = -(-length // block_size)
            expected = tuple(blocks if i == axis else d for i, d in enumerate(quantized.shape))
            if scale.shape != expected:
                raise PrepareError(
                    f"blocked scale shape {scale.shape} does not fit data {quantized.shape} "
                    f"(axis {axis}, block {block_size}: expected {expected})"
                )
            index = [slice(None)] * rank
            index[axis] = slice(0, length)
            scale_full = np.repeat(scale, block_size, axis=axis)[tuple(index)]
            zero_full = np.repeat(zero_point, block_size, axis=axis)[tuple(index)]
        else:
            if scale.ndim != 1 or scale.shape[0] != length:
                raise PrepareError(f"per-axis scale shape {scale.shape} does not fit data {quantized.shape}")
            shape = [1] * rank
            shape[axis] = length
            scale_full, zero_full = scale.reshape(shape), zero_point.reshape(shape)
    centred = quantized.astype(np.int32) - zero_full.astype(np.int32)
    return (centred.astype(scale.dtype) * scale_full).astype(dtype)


def fold_constant_dequantize(model: onnx.ModelProto) -> list[str]:
    """Replace every DequantizeLinear whose inputs are all initializers by a float initializer of its output."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    folded: list[str] = []
    keep_nodes = []
    new_tensors = []
    for node in graph.node:
        inputs = [name for name in node.input if name]
        if node.op_type != "DequantizeLinear" or not all(name in initializers for name in inputs):
            keep_nodes.append(node)
            continue
        attrs = _attrs(node)
        arrays = [numpy_helper.to_array(initializers[name]) for name in node.input[:3] if name]
        out_type = attrs.get("output_dtype")
        value = dequantize(
            arrays[0],
            arrays[1],
            arrays[2] if len(arrays) > 2 else None,
            axis=int(attrs.get("axis", 1)),  # type: ignore[call-overload]
            block_size=int(attrs.get("block_size", 0)),  # type: ignore[call-overload]
            out_dtype=helper.tensor_dtype_to_np_dtype(out_type) if out_type else None,  # type: ignore[arg-type]
        )
        new_tensors.append(numpy_helper.from_array(value, node.output[0]))
        folded.append(node.name or node.output[0])
    del graph.node[:]
    graph.node.extend(keep_nodes)
    graph.initializer.extend(new_tensors)
    return folded


def prune_unused_initializers(model: onnx.ModelProto) -> int:
    """Remove initializers nothing reads (the quantized weights, scales and zero points after folding)."""
    graph = model.graph
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    removed = len(graph.initializer) - len(kept)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return removed


def set_dynamic_dims(model: onnx.ModelProto, inputs: dict[int, str], outputs: dict[int, str]) -> None:
    """Name dimensions of the (single) input and of every output as symbolic, and drop stale inner shapes.

    The exported graphs pin e.g. YuNet to 640x640; onnxruntime refuses other feed shapes unless the
    declared dimensions are symbolic. Inner ``value_info`` shapes recorded at export would contradict the
    new sizes, so they are cleared and onnxruntime infers them again.
    """
    graph = model.graph
    if len(graph.input) != 1:
        raise PrepareError(f"expected one graph input, found {len(graph.input)}")
    for index, name in inputs.items():
        graph.input[0].type.tensor_type.shape.dim[index].dim_param = name
    for value in graph.output:
        for index, name in outputs.items():
            dim = value.type.tensor_type.shape.dim[index]
            dim.dim_param = f"{name}_{value.name}" if name == "anchors" else name
    del graph.value_info[:]


def _check(model: onnx.ModelProto, what: str) -> None:
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise PrepareError(f"{what}: the prepared graph is not valid ONNX: {exc}") from None


def prepare_detector(model: onnx.ModelProto, fold: bool = True) -> dict[str, object]:
    """YuNet: fix the one-element block scales, fold the weights, make H/W dynamic. Mutates ``model``."""
    inputs = remove_stale_inputs(model)
    fixed = fix_single_element_block_scales(model)
    folded = fold_constant_dequantize(model) if fold else []
    pruned = prune_unused_initializers(model)
    set_dynamic_dims(model, {2: "height", 3: "width"}, {1: "anchors"})
    _check(model, "detector")
    return {
        "removed_unused_inputs": len(inputs.unused),
        "removed_initializer_inputs": inputs.initializers,
        "fixed_block_size_nodes": len(fixed),
        "folded_dequantize_nodes": len(folded),
        "removed_unused_initializers": pruned,
        "dynamic_dims": ["height", "width"],
    }


def prepare_recognizer(model: onnx.ModelProto, fold: bool = True) -> dict[str, object]:
    """SFace: drop the stale and initializer inputs, fold the weights, make the batch dynamic. Mutates ``model``."""
    inputs = remove_stale_inputs(model)
    fixed = fix_single_element_block_scales(model)
    folded = fold_constant_dequantize(model) if fold else []
    pruned = prune_unused_initializers(model)
    set_dynamic_dims(model, {0: "batch"}, {0: "batch"})
    _check(model, "recognizer")
    return {
        "removed_unused_inputs": len(inputs.unused),
        "removed_initializer_inputs": inputs.initializers,
        "fixed_block_size_nodes": len(fixed),
        "folded_dequantize_nodes": len(folded),
        "removed_unused_initializers": pruned,
        "dynamic_dims": ["batch"],
    }
