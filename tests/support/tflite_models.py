"""Real TFLite models built in the test process, without TensorFlow: the flatbuffer is written
with the `flatbuffers` builder and the schema's generated bindings from the `tflite` package
(the same bytes TensorFlow's converter would write for this graph), and ai-edge-litert's
interpreter loads and runs it."""

from __future__ import annotations

import importlib
from pathlib import Path

import flatbuffers
import numpy as np
from tflite import ActivationFunctionType, BuiltinOperator, BuiltinOptions, TensorType


def _bindings(name: str):
    # The package's __init__ re-exports each table's class under its module's name; the builder
    # functions (BufferStart, ...) live in the module itself.
    return importlib.import_module(f"tflite.{name}")


AddOptions, Buffer, Model, MulOptions, Operator, OperatorCode, SubGraph, Tensor = (
    _bindings(n)
    for n in ("AddOptions", "Buffer", "Model", "MulOptions", "Operator", "OperatorCode", "SubGraph", "Tensor")
)


def _ints(builder: flatbuffers.Builder, values) -> int:
    return builder.CreateNumpyVector(np.asarray(values, dtype=np.int32))


def _tensor(builder: flatbuffers.Builder, name: str, shape: list[int], buffer: int) -> int:
    name_off = builder.CreateString(name)
    shape_off = _ints(builder, shape)
    Tensor.TensorStart(builder)
    Tensor.TensorAddShape(builder, shape_off)
    Tensor.TensorAddType(builder, TensorType.FLOAT32)
    Tensor.TensorAddBuffer(builder, buffer)
    Tensor.TensorAddName(builder, name_off)
    return Tensor.TensorEnd(builder)


def _buffer(builder: flatbuffers.Builder, data: bytes | None) -> int:
    data_off = builder.CreateNumpyVector(np.frombuffer(data, dtype=np.uint8)) if data else None
    Buffer.BufferStart(builder)
    if data_off is not None:
        Buffer.BufferAddData(builder, data_off)
    return Buffer.BufferEnd(builder)


def _opcode(builder: flatbuffers.Builder, code: int, custom: str | None = None) -> int:
    custom_off = builder.CreateString(custom) if custom else None
    OperatorCode.OperatorCodeStart(builder)
    if custom_off is not None:
        OperatorCode.OperatorCodeAddCustomCode(builder, custom_off)
    OperatorCode.OperatorCodeAddDeprecatedBuiltinCode(builder, code)  # codes < 127 go in both fields
    OperatorCode.OperatorCodeAddBuiltinCode(builder, code)
    OperatorCode.OperatorCodeAddVersion(builder, 1)
    return OperatorCode.OperatorCodeEnd(builder)


def _operator(builder: flatbuffers.Builder, opcode_index: int, inputs, outputs, options_type: int) -> int:
    if options_type == BuiltinOptions.NONE:
        options = None
    elif options_type == BuiltinOptions.MulOptions:
        MulOptions.MulOptionsStart(builder)
        MulOptions.MulOptionsAddFusedActivationFunction(builder, ActivationFunctionType.NONE)
        options = MulOptions.MulOptionsEnd(builder)
    else:
        AddOptions.AddOptionsStart(builder)
        AddOptions.AddOptionsAddFusedActivationFunction(builder, ActivationFunctionType.NONE)
        options = AddOptions.AddOptionsEnd(builder)
    inputs_off, outputs_off = _ints(builder, inputs), _ints(builder, outputs)
    Operator.OperatorStart(builder)
    Operator.OperatorAddOpcodeIndex(builder, opcode_index)
    Operator.OperatorAddInputs(builder, inputs_off)
    Operator.OperatorAddOutputs(builder, outputs_off)
    Operator.OperatorAddBuiltinOptionsType(builder, options_type)
    if options is not None:
        Operator.OperatorAddBuiltinOptions(builder, options)
    return Operator.OperatorEnd(builder)


def _vector(builder: flatbuffers.Builder, start, offsets: list[int]) -> int:
    start(builder, len(offsets))
    for offset in reversed(offsets):
        builder.PrependUOffsetTRelative(offset)
    return builder.EndVector()


def tflite_linear_model(*, scale: float = 2.0, bias: float = 1.0, features: int = 4,
                        input_name: str = "x", output_name: str = "y", custom_op: str | None = None) -> bytes:
    """y = x * scale + bias over a [1, features] float32 input: a MUL and an ADD with constant
    [features] operands, as a TFLite flatbuffer (file identifier TFL3, schema version 3).

    `custom_op` makes the MUL a custom operator of that name: a well-formed file no interpreter
    without that operator can load."""
    builder = flatbuffers.Builder(1024)
    # Buffer 0 is the schema's empty sentinel; 1 and 2 hold the constants.
    buffers = [
        _buffer(builder, None),
        _buffer(builder, np.full([features], scale, dtype="<f4").tobytes()),
        _buffer(builder, np.full([features], bias, dtype="<f4").tobytes()),
    ]
    tensors = [
        _tensor(builder, input_name, [1, features], 0),  # 0
        _tensor(builder, "scale", [features], 1),  # 1
        _tensor(builder, "scaled", [1, features], 0),  # 2
        _tensor(builder, "bias", [features], 2),  # 3
        _tensor(builder, output_name, [1, features], 0),  # 4
    ]
    operators = [
        _operator(builder, 0, [0, 1], [2], BuiltinOptions.NONE if custom_op else BuiltinOptions.MulOptions),
        _operator(builder, 1, [2, 3], [4], BuiltinOptions.AddOptions),
    ]
    tensors_off = _vector(builder, SubGraph.SubGraphStartTensorsVector, tensors)
    operators_off = _vector(builder, SubGraph.SubGraphStartOperatorsVector, operators)
    inputs_off, outputs_off = _ints(builder, [0]), _ints(builder, [4])
    name_off = builder.CreateString("main")
    SubGraph.SubGraphStart(builder)
    SubGraph.SubGraphAddTensors(builder, tensors_off)
    SubGraph.SubGraphAddInputs(builder, inputs_off)
    SubGraph.SubGraphAddOutputs(builder, outputs_off)
    SubGraph.SubGraphAddOperators(builder, operators_off)
    SubGraph.SubGraphAddName(builder, name_off)
    subgraph = SubGraph.SubGraphEnd(builder)

    mul = _opcode(builder, BuiltinOperator.CUSTOM, custom_op) if custom_op else _opcode(builder, BuiltinOperator.MUL)
    codes = [mul, _opcode(builder, BuiltinOperator.ADD)]
    codes_off = _vector(builder, Model.ModelStartOperatorCodesVector, codes)
    subgraphs_off = _vector(builder, Model.ModelStartSubgraphsVector, [subgraph])
    buffers_off = _vector(builder, Model.ModelStartBuffersVector, buffers)
    description = builder.CreateString("modelfleet-tests linear")
    Model.ModelStart(builder)
    Model.ModelAddVersion(builder, 3)
    Model.ModelAddOperatorCodes(builder, codes_off)
    Model.ModelAddSubgraphs(builder, subgraphs_off)
    Model.ModelAddDescription(builder, description)
    Model.ModelAddBuffers(builder, buffers_off)
    builder.Finish(Model.ModelEnd(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def tflite_linear_contract(*, scale: float = 2.0, bias: float = 1.0, features: int = 4,
                           inputs: list[float] | None = None) -> dict:
    """A health contract with golden inputs and the outputs `tflite_linear_model` gives for them."""
    x = inputs or [float(i) for i in range(features)]
    y = [v * scale + bias for v in x]
    return {
        "inputs": {"x": {"dtype": "float32", "shape": [1, features], "data": x}},
        "outputs": {"y": {"dtype": "float32", "shape": [1, features], "data": y}},
    }


def write_tflite_linear_model(path: Path, **kwargs) -> Path:
    path.write_bytes(tflite_linear_model(**kwargs))
    return path
