"""ONNX graphs for the simulated clients' model (`layer.weight` 3×2, `layer.bias` 3), built with onnx.helper."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from tests.fl_clients import GLOBAL_TENSORS

DROPOUT_RATIO = 0.5


def graph(weights: dict[str, np.ndarray] | None = None, domain: str = "", external: bool = False,
          dropout: bool = False, softmax: bool = False, opset: int = 17, batch: int | None = None,
          dropout_seed: int | None = None) -> bytes:
    """Y = X·Wᵀ + b (after Dropout on X, and through Softmax, if asked) as an ONNX model file."""
    tensors = weights or GLOBAL_TENSORS
    initializers = [numpy_helper.from_array(tensors[name], name) for name in ("layer.weight", "layer.bias")]
    if external:
        initializers[0].data_location = TensorProto.EXTERNAL
        initializers[0].ClearField("raw_data")
        entry = initializers[0].external_data.add()
        entry.key, entry.value = "location", "/etc/passwd"
    nodes, features = [], "X"
    if dropout:
        initializers.append(numpy_helper.from_array(np.array(DROPOUT_RATIO, np.float32), "dropout.ratio"))
        seeded = {} if dropout_seed is None else {"seed": dropout_seed}
        nodes.append(helper.make_node("Dropout", ["X", "dropout.ratio"], ["X_dropped"], **seeded))
        features = "X_dropped"
    logits = "logits" if softmax else "Y"
    nodes.append(helper.make_node("Gemm", [features, "layer.weight", "layer.bias"], [logits], transB=1, domain=domain))
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], ["Y"], axis=1))
    body = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [batch, 2])],
                             [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [batch, 3])], initializers)
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(body, opset_imports=opsets, ir_version=9).SerializeToString()


def hidden_dropout_graph(weights: dict[str, np.ndarray]) -> bytes:
    """Y = Dropout(Relu(X·W1ᵀ + b1))·W2ᵀ + b2: a Dropout after other nodes, as in real networks (onnxruntime's
    optimizer removes such a node unless told not to)."""
    initializers = [numpy_helper.from_array(value, name) for name, value in weights.items()]
    initializers.append(numpy_helper.from_array(np.array(DROPOUT_RATIO, np.float32), "dropout.ratio"))
    nodes = [
        helper.make_node("Gemm", ["X", "hidden.weight", "hidden.bias"], ["H"], transB=1),
        helper.make_node("Relu", ["H"], ["R"]),
        helper.make_node("Dropout", ["R", "dropout.ratio"], ["D"]),
        helper.make_node("Gemm", ["D", "out.weight", "out.bias"], ["Y"], transB=1),
    ]
    body = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 2])],
                             [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 1])], initializers)
    return helper.make_model(body, opset_imports=[helper.make_opsetid("", 17)], ir_version=9).SerializeToString()


def relu_int16_graph() -> bytes:
    """A graph onnx.checker accepts and onnxruntime's CPU provider cannot run (no int16 Relu kernel)."""
    node = helper.make_node("Relu", ["X"], ["Y"])
    body = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.INT16, [2])],
                             [helper.make_tensor_value_info("Y", TensorProto.INT16, [2])],
                             [numpy_helper.from_array(np.zeros(2, np.int16), "unused")])
    return helper.make_model(body, opset_imports=[helper.make_opsetid("", 17)], ir_version=9).SerializeToString()
