"""Real ONNX models built in the test process with the `onnx` package."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def linear_model(
    *, scale: float = 2.0, bias: float = 1.0, features: int = 4, padding_bytes: int = 0, opset: int = 17
) -> bytes:
    """y = x * scale + bias over a [N, features] float32 input.

    `padding_bytes` adds an unused initializer so tests can make models of a realistic size
    (a 2 MB model that is still a valid, loadable, runnable ONNX graph).
    """
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, features])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, features])
    initializers = [
        numpy_helper.from_array(np.full([features], scale, dtype=np.float32), "scale"),
        numpy_helper.from_array(np.full([features], bias, dtype=np.float32), "bias"),
    ]
    nodes = [helper.make_node("Mul", ["x", "scale"], ["xs"]), helper.make_node("Add", ["xs", "bias"], ["y"])]
    if padding_bytes:
        count = max(1, padding_bytes // 4)
        rng = np.random.default_rng(int(scale * 1000 + bias))
        initializers.append(numpy_helper.from_array(rng.random(count, dtype=np.float32), "padding"))
    graph = helper.make_graph(nodes, "linear", [x], [y], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="modelfleet-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def write_linear_model(path: Path, **kwargs) -> Path:
    path.write_bytes(linear_model(**kwargs))
    return path


def fixed_length_model(*, length: int = 100) -> bytes:
    """A model with a dynamic input x [N, M] that runs only when N * M == `length` (it reshapes x
    to [10, length // 10]): no generated input size fits, only real sample inputs do."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [10, length // 10])
    shape = numpy_helper.from_array(np.array([10, length // 10], dtype=np.int64), "shape")
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"])], "fixed", [x], [y], [shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="modelfleet-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()
