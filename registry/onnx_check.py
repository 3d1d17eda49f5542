"""Validate an ONNX file with the `onnx` checker without loading its weights into memory.

`onnx.load` (and `onnx.checker.check_model(path)`) parse the whole protobuf, so a 200 MB model
costs the web process several hundred MB. Weights almost always sit in the `raw_data` of graph
initializers, so we stream the protobuf wire format, leave every large `raw_data` on disk
(recording only its offset and length), and hand the remaining skeleton — graph, nodes, types,
opsets and small tensors — to the real `onnx.checker`. The skipped tensors are checked for the
exact byte count their dtype and dims demand, so a truncated or padded weight is still refused.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

# raw_data larger than this stays on disk; smaller tensors go to the checker in full.
INLINE_LIMIT = 64 * 1024

_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_TENSOR_RAW_DATA = 9
_TENSOR_EXTERNAL_DATA = 13
_TENSOR_DATA_LOCATION = 14
_EXTERNAL = 1


class OnnxInvalid(Exception):
    pass


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output as the model declares it.

    dtype: numpy's name ("float32", "int64", ...) or, for what numpy has no plain type for, the
    ONNX type name ("STRING", "BFLOAT16", "sequence", ...). dims: None when the model declares no
    shape; else per dimension an int (fixed), a str (a named dynamic dimension) or None (dynamic).
    optional: an input with an initializer as its default value.
    """

    name: str
    dtype: str
    dims: tuple | None
    optional: bool = False

    def describe(self) -> str:
        if self.dims is None:
            return f"{self.dtype} (shape not declared)"
        return f"{self.dtype} [{', '.join('?' if d is None else str(d) for d in self.dims)}]"


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint_bytes(field << 3 | wire_type)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint_bytes(len(payload)) + payload


class _Reader:
    def __init__(self, handle, size: int, location: str):
        self.f = handle
        self.location = location
        self.size = size
        self.stripped: list[tuple[int, int]] = []  # (offset, length) of raw_data left on disk

    def varint(self) -> int:
        result = shift = 0
        while True:
            byte = self.f.read(1)
            if not byte:
                raise OnnxInvalid("file ends inside a varint (truncated?)")
            result |= (byte[0] & 0x7F) << shift
            if not byte[0] & 0x80:
                return result
            shift += 7
            if shift > 63:
                raise OnnxInvalid("malformed protobuf varint")

    def exact(self, count: int) -> bytes:
        data = self.f.read(count)
        if len(data) != count:
            raise OnnxInvalid("file is truncated")
        return data

    def message(self, end: int, kind: str) -> bytes:
        """Copy the fields of one message up to `end`, descending where weights may hide."""
        out = bytearray()
        external_tensor = False
        stripped_here: tuple[int, int] | None = None
        while self.f.tell() < end:
            tag = self.varint()
            field, wire_type = tag >> 3, tag & 7
            if field == 0:
                raise OnnxInvalid("not a protobuf message (field number 0)")
            if wire_type == 0:
                value = self.varint()
                if kind == "tensor" and field == _TENSOR_DATA_LOCATION and value == _EXTERNAL:
                    external_tensor = True
                out += _key(field, 0) + _varint_bytes(value)
            elif wire_type == 1:
                out += _key(field, 1) + self.exact(8)
            elif wire_type == 5:
                out += _key(field, 5) + self.exact(4)
            elif wire_type == 2:
                length = self.varint()
                start = self.f.tell()
                if start + length > end:
                    raise OnnxInvalid("a protobuf field runs past the end of its message (truncated?)")
                if kind == "model" and field == _MODEL_GRAPH:
                    out += _length_delimited(field, self.message(start + length, "graph"))
                elif kind == "graph" and field == _GRAPH_INITIALIZER:
                    out += _length_delimited(field, self.message(start + length, "tensor"))
                elif kind == "tensor" and field == _TENSOR_RAW_DATA and length > INLINE_LIMIT:
                    stripped_here = (start, length)
                    self.f.seek(length, 1)
                else:
                    out += _key(field, 2) + _varint_bytes(length) + self.exact(length)
            else:
                raise OnnxInvalid(f"not a protobuf message (wire type {wire_type})")
        if self.f.tell() != end:
            raise OnnxInvalid("a protobuf message runs past its declared length")
        if external_tensor:
            raise OnnxInvalid(
                "the model references external data files; upload a single self-contained .onnx file"
            )
        if stripped_here:
            # Point the tensor at its own bytes inside the uploaded file, as ONNX external data,
            # so the checker sees a complete model without the weights being read.
            offset, length = stripped_here
            for k, v in (("location", self.location), ("offset", str(offset)), ("length", str(length))):
                entry = _length_delimited(1, k.encode()) + _length_delimited(2, v.encode())
                out += _length_delimited(_TENSOR_EXTERNAL_DATA, entry)
            out += _key(_TENSOR_DATA_LOCATION, 0) + _varint_bytes(_EXTERNAL)
            self.stripped.append(stripped_here)
        return bytes(out)


def onnx_validate(path: str | Path) -> onnx.ModelProto:
    """Raise OnnxInvalid with a readable reason unless `path` is a valid self-contained ONNX model.

    Returns the model skeleton (weights stripped), which is enough to read opsets and I/O.
    """
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise OnnxInvalid("the file is empty")
    with path.open("rb", buffering=1024 * 1024) as handle:
        reader = _Reader(handle, size, location=path.name)
        skeleton_bytes = reader.message(size, "model")
    try:
        skeleton = onnx.ModelProto.FromString(skeleton_bytes)
    except DecodeError as exc:
        raise OnnxInvalid(f"not an ONNX protobuf: {exc}") from None
    if not skeleton.HasField("graph"):
        raise OnnxInvalid("the file has no ONNX graph")
    # The path-based checker resolves external data relative to the skeleton's directory, so the
    # skeleton is written next to the upload and its tensors point into the upload itself.
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".skeleton-", suffix=".onnx") as tmp:
        tmp.write(skeleton_bytes)
        tmp.flush()
        try:
            onnx.checker.check_model(tmp.name)
        except onnx.checker.ValidationError as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise OnnxInvalid(f"onnx.checker refused the model: {first_line}") from None
    for tensor in skeleton.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entries = {e.key: e.value for e in tensor.external_data}
        try:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        except (KeyError, TypeError):
            raise OnnxInvalid(f"initializer {tensor.name!r} has unsupported data type {tensor.data_type}")
        expected = math.prod(tensor.dims) * itemsize
        if int(entries["length"]) != expected:
            raise OnnxInvalid(
                f"initializer {tensor.name!r} holds {entries['length']} bytes of data, "
                f"its type and shape need {expected}"
            )
    return skeleton


_NUMPY_NAMES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16",
                "uint32", "uint64", "bool")


def _tensor_spec(value_info, optional: bool = False) -> TensorSpec:
    kind = value_info.type.WhichOneof("value")
    if kind != "tensor_type":
        return TensorSpec(value_info.name, (kind or "unknown").replace("_type", ""), None, optional)
    tensor = value_info.type.tensor_type
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
    except (KeyError, TypeError):
        dtype = ""
    if dtype not in _NUMPY_NAMES:
        dtype = onnx.TensorProto.DataType.Name(tensor.elem_type) if tensor.elem_type else "unknown"
    dims = None
    if tensor.HasField("shape"):
        dims = tuple(
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None)
            for d in tensor.shape.dim
        )
    return TensorSpec(value_info.name, dtype, dims, optional)


def onnx_io(skeleton: onnx.ModelProto) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The graph's declared inputs and outputs (as onnx_validate returns the model: weights need
    not be loaded). Inputs that an initializer also names are optional: they have a default."""
    defaults = {tensor.name for tensor in skeleton.graph.initializer}
    inputs = [_tensor_spec(v, optional=v.name in defaults) for v in skeleton.graph.input]
    return inputs, [_tensor_spec(v) for v in skeleton.graph.output]
