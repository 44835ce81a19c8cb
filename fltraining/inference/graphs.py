"""Turning a stored ONNX graph into onnxruntime sessions bound to a model's weights.

Fixed weights are bound at session creation (`SessionOptions.add_initializer`): measured on a
1 M-parameter MLP, runs then cost what the graph with baked-in initializers costs, while feeding
the weights as inputs on every run cost 20–40 % more at batch 1–64. SWAG needs new weights on
every pass, and a session per sample would cost a session creation (17 ms for that MLP) per pass,
so its graph takes the weights as inputs instead.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime
from onnx import helper

from fltraining.errors import Conflict
from fltraining.weights.formats import Buffer
from fltraining.weights.onnx_files import checked_model

type Variant = Literal["eval", "dropout", "weights_as_inputs"]

DROPOUT_TRAINING_NAME = "fltraining.dropout_training_mode"
# Dropout's `training_mode` input exists from opset 12 on.
DROPOUT_TRAINING_OPSET = 12


@dataclass(frozen=True)
class InputSpec:
    """The graph's one data input: its name, element type and shape (None for a free dimension)."""

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int | None, ...] | None

    @property
    def batch_is_free(self) -> bool:
        """Whether passes can be stacked along the first dimension."""
        return self.shape is not None and len(self.shape) >= 1 and self.shape[0] is None


@dataclass
class BoundSession:
    """An onnxruntime session with what it needs kept alive (the weights it was given by reference)."""

    session: onnxruntime.InferenceSession
    data_input: InputSpec
    weight_names: tuple[str, ...]
    variant: Variant
    keep_alive: list[Any] = field(default_factory=list)


def _data_input(model: onnx.ModelProto) -> InputSpec:
    """The graph input that is not an initializer; inference feeds exactly one."""
    initializers = {initializer.name for initializer in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in initializers]
    if len(inputs) != 1:
        raise Conflict(f"Inference feeds one input; the model's graph has {len(inputs)} "
                       f"({', '.join(repr(value.name) for value in inputs) or 'none'}).")
    value = inputs[0]
    tensor_type = value.type.tensor_type
    if not value.type.HasField("tensor_type"):
        raise Conflict(f"The graph input {value.name!r} is not a tensor.")
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
    shape = None
    if tensor_type.HasField("shape"):
        shape = tuple(dim.dim_value if dim.HasField("dim_value") else None for dim in tensor_type.shape.dim)
    return InputSpec(value.name, dtype, shape)


def _opset(model: onnx.ModelProto) -> int:
    return max((opset.version for opset in model.opset_import if opset.domain in ("", "ai.onnx")), default=0)


def _with_dropout_on(model: onnx.ModelProto) -> None:
    """Run every Dropout node in training mode (MC dropout); 409 when the graph has none or is too old."""
    dropouts = [node for node in model.graph.node if node.op_type == "Dropout" and node.domain in ("", "ai.onnx")]
    if not dropouts:
        raise Conflict("MC_DROPOUT needs Dropout nodes in the model's graph; it has none.")
    if _opset(model) < DROPOUT_TRAINING_OPSET:
        raise Conflict(f"MC_DROPOUT needs a graph of opset {DROPOUT_TRAINING_OPSET} or later "
                       "(Dropout's training_mode input); convert the graph to a newer opset.")
    model.graph.initializer.append(helper.make_tensor(DROPOUT_TRAINING_NAME, onnx.TensorProto.BOOL, [], [True]))
    for node in dropouts:
        ratio = node.input[1] if len(node.input) > 1 else ""
        del node.input[1:]
        node.input.extend([ratio, DROPOUT_TRAINING_NAME])
        # A seeded Dropout draws the same masks on every run: passes split over runs would be copies.
        kept = [attribute for attribute in node.attribute if attribute.name != "seed"]
        del node.attribute[:]
        node.attribute.extend(kept)


def _with_weights_as_inputs(model: onnx.ModelProto, names: tuple[str, ...]) -> None:
    """Turn the named initializers into graph inputs of their type and shape."""
    moved = {initializer.name: initializer for initializer in model.graph.initializer if initializer.name in names}
    kept = [initializer for initializer in model.graph.initializer if initializer.name not in moved]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    declared = {value.name for value in model.graph.input}
    for name, initializer in moved.items():
        if name not in declared:
            model.graph.input.append(helper.make_tensor_value_info(name, initializer.data_type, list(initializer.dims)))


def check_weights(names: tuple[str, ...], weights: Mapping[str, np.ndarray]) -> None:
    """Every initializer of the graph has a tensor among the model's weights (409 naming the first without)."""
    for name in names:
        if name not in weights:
            raise Conflict(f"The model has no tensor for the graph's initializer {name!r}.")


def session_options(threads: int) -> onnxruntime.SessionOptions:
    """Options shared by every inference session."""
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return options


def build_session(graph: Buffer, weights: Mapping[str, np.ndarray] | None, variant: Variant,
                  threads: int) -> BoundSession:
    """A session running `graph` with `weights` bound by name (None: SWAG's variant, fed on every run)."""
    model = checked_model(graph)
    names = tuple(initializer.name for initializer in model.graph.initializer)
    if weights is not None:
        check_weights(names, weights)
    spec = _data_input(model)
    if variant == "dropout":
        _with_dropout_on(model)
    options = session_options(threads)
    keep: list[Any] = []
    if weights is None:
        _with_weights_as_inputs(model, names)
    else:
        for name in names:
            value = onnxruntime.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(weights[name]))
            options.add_initializer(name, value)
            keep.append(value)
    # onnxruntime's EliminateDropout removes every Dropout whose mask output is unused, training_mode or not.
    disabled = ["EliminateDropout"] if variant == "dropout" else None
    try:
        session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"],
                                               disabled_optimizers=disabled)
    except Exception as error:  # onnxruntime's own exception classes
        reason = str(error).strip()[:200]
        raise Conflict(f"onnxruntime cannot run the model's graph with its weights ({reason}).") from None
    return BoundSession(session, spec, names, variant, keep)
