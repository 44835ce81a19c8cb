"""ONNX graphs as model files: the graph's initializers are the weights.

A graph is data, not code: it is checked with `onnx.checker`, may only use the standard operator
domains, and must keep its initializers inside the file (external data would name files on the
server's disk). Its initializers are what aggregation, signatures and downloads work on; an
aggregated model is the same graph with new initializer values.
"""

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from fltraining.weights.codecs import Buffer, Codec, UnsupportedModelFormat, register

# The standard operator sets onnxruntime's CPU provider implements.
STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})
ONNX_DTYPES = frozenset(
    {"float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool"}
)


def looks_like_onnx(data: Buffer) -> bool:
    """Whether the bytes parse as an ONNX model with a graph (ModelProto starts with its ir_version field)."""
    if len(data) < 2 or data[0] != 0x08:
        return False
    try:
        model = onnx.load_model_from_string(bytes(data))
    except Exception:  # noqa: BLE001 (protobuf's DecodeError and its relatives: not an ONNX file)
        return False
    return model.HasField("graph") and model.ir_version > 0


def checked_model(data: Buffer) -> onnx.ModelProto:
    """Parse and check a graph: standard domains, no external data, onnx.checker's rules."""
    model = onnx.load_model_from_string(bytes(data))
    for opset in model.opset_import:
        if opset.domain not in STANDARD_DOMAINS:
            raise UnsupportedModelFormat(f"the ONNX graph uses the custom operator domain {opset.domain!r}")
    for node in model.graph.node:
        if node.domain not in STANDARD_DOMAINS:
            raise UnsupportedModelFormat(f"the ONNX node {node.name!r} uses the custom domain {node.domain!r}")
    for initializer in model.graph.initializer:
        if initializer.data_location == onnx.TensorProto.EXTERNAL or initializer.external_data:
            raise UnsupportedModelFormat(
                f"the ONNX initializer {initializer.name!r} refers to external data; send one self-contained file"
            )
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as error:
        raise UnsupportedModelFormat(f"the ONNX graph is invalid ({str(error).strip().splitlines()[0][:200]})") from None
    return model


def read_onnx(data: Buffer, max_tensor_bytes: int) -> dict[str, np.ndarray]:
    """The graph's initializers by name (the graph is parsed whole: protobuf has no partial reads)."""
    return _initializers(checked_model(data), max_tensor_bytes)


def _initializers(model: onnx.ModelProto, max_tensor_bytes: int) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    total = 0
    for initializer in model.graph.initializer:
        array = numpy_helper.to_array(initializer)
        if array.dtype.name not in ONNX_DTYPES:
            raise UnsupportedModelFormat(f"ONNX initializer {initializer.name!r} has dtype {array.dtype}")
        if initializer.name in tensors:
            raise UnsupportedModelFormat(f"the ONNX initializer {initializer.name!r} appears twice")
        total += array.nbytes
        if total > max_tensor_bytes:
            raise UnsupportedModelFormat(f"the ONNX initializers hold more than {max_tensor_bytes} bytes")
        tensors[initializer.name] = array
    return tensors


def write_onnx(template: Buffer, tensors: Mapping[str, np.ndarray]) -> bytes:
    """The template graph with its initializers replaced by `tensors` (same names, shapes and dtypes)."""
    model = onnx.load_model_from_string(bytes(template))
    replaced: list[Any] = []
    for initializer in model.graph.initializer:
        replaced.append(numpy_helper.from_array(np.ascontiguousarray(tensors[initializer.name]), initializer.name))
    del model.graph.initializer[:]
    model.graph.initializer.extend(replaced)
    return model.SerializeToString()


def graph_digest(model: onnx.ModelProto) -> str:
    """SHA-256 of the computation: nodes, inputs, outputs and the initializers' names, shapes and types,
    not their values (two models with one digest run the same graph with different weights)."""
    structure = onnx.ModelProto()
    structure.CopyFrom(model)
    for initializer in structure.graph.initializer:
        kept = (initializer.name, list(initializer.dims), initializer.data_type)
        initializer.Clear()
        initializer.name, initializer.data_type = kept[0], kept[2]
        initializer.dims.extend(kept[1])
    del structure.metadata_props[:]
    structure.ClearField("doc_string")
    structure.ClearField("producer_name")
    structure.ClearField("producer_version")
    return hashlib.sha256(structure.graph.SerializeToString(deterministic=True)).hexdigest()


def check_runnable(data: Buffer) -> None:
    """onnxruntime's CPU provider can load the graph (every operator and type implemented), else 400."""
    import onnxruntime  # imported on first use: the runtime is large and most requests never need it

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 4  # the reason goes to the client; nothing belongs in the server's log
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    try:
        onnxruntime.InferenceSession(bytes(data), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 (onnxruntime's own classes: Fail, InvalidGraph, NotImplemented)
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise UnsupportedModelFormat(f"onnxruntime's CPU provider cannot run the ONNX graph ({reason})") from None


def describe_onnx(data: Buffer, max_tensor_bytes: int) -> tuple[dict[str, np.ndarray], str]:
    """Check a graph for storing (onnx.checker, standard domains, runnable on the CPU provider) from one
    parse: its initializers and its digest."""
    model = checked_model(data)
    tensors = _initializers(model, max_tensor_bytes)
    check_runnable(data)
    return tensors, graph_digest(model)


def _dump_onnx(arrays: Mapping[str, np.ndarray], template: Buffer | None) -> bytes:
    if template is None:
        raise ValueError("ONNX weights are written into a graph: pass the template")
    return write_onnx(template, arrays)


register(Codec(
    name="onnx",
    description="ONNX graph (its initializers are the weights)",
    read=read_onnx,
    dump=_dump_onnx,
    sniff=looks_like_onnx,
))
