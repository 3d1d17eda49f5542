"""Check that a file claiming format tflite is a TFLite flatbuffer, and read its declared inputs
and outputs, without loading it.

A TFLite model is a FlatBuffer whose first four bytes are the little-endian offset of the root
table (a `Model`) and whose next four are the schema's file identifier, "TFL3". A file without
them (an ONNX model, a zip, a SavedModel archive) would fail the precheck on every device;
refusing it at upload names the problem at once. The main subgraph's input and output tensors
(name, type, shape) are read from the memory-mapped file with a few bounds-checked reads of the
schema's tables (tensorflow/compiler/mlir/lite/schema/schema.fbs: Model.subgraphs is field 2,
SubGraph.tensors/inputs/outputs 0/1/2, Tensor.shape/type/name 0/1/3, shape_signature 7,
has_rank 8), so a 200 MB model costs the web process no memory for its weights; the health
contract is held against them as for ONNX (registry.health.health_contract_check_model).
Whether the graph loads and runs is the release check's job (registry.release_check runs the
agent's precheck with the TFLite interpreter).
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

from registry.onnx_check import TensorSpec

TFLITE_IDENTIFIER = b"TFL3"

# schema.fbs TensorType, as numpy names where numpy has the type.
_TENSOR_TYPES = {
    0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 5: "STRING", 6: "bool", 7: "int16",
    8: "complex64", 9: "int8", 10: "float64", 11: "complex128", 12: "uint64", 13: "RESOURCE", 14: "VARIANT",
    15: "uint32", 16: "uint16", 17: "INT4", 18: "BFLOAT16",
}


class TfliteInvalid(Exception):
    pass


class _Reader:
    """Bounds-checked reads of flatbuffer tables in `buf` (any out-of-range offset: TfliteInvalid)."""

    def __init__(self, buf) -> None:
        self.buf = buf
        self.size = len(buf)

    def _unpack(self, fmt: str, pos: int) -> int:
        if pos < 0 or pos + struct.calcsize(fmt) > self.size:
            raise TfliteInvalid(f"an offset points outside the {self.size}-byte file")
        return struct.unpack_from(fmt, self.buf, pos)[0]

    def ref(self, pos: int) -> int:
        return pos + self._unpack("<I", pos)

    def field(self, table: int, index: int) -> int | None:
        """Where field `index` of the table at `table` is stored, or None when it is absent."""
        vtable = table - self._unpack("<i", table)
        slot = 4 + 2 * index
        if slot >= self._unpack("<H", vtable):
            return None
        offset = self._unpack("<H", vtable + slot)
        return table + offset if offset else None

    def vector(self, table: int, index: int, width: int) -> tuple[int, int]:
        """(start, length) of a vector field; (0, 0) when absent."""
        pos = self.field(table, index)
        if pos is None:
            return 0, 0
        at = self.ref(pos)
        length = self._unpack("<I", at)
        if at + 4 + length * width > self.size:
            raise TfliteInvalid(f"a vector of {length} items runs past the end of the {self.size}-byte file")
        return at + 4, length

    def ints(self, table: int, index: int) -> list[int] | None:
        """An int32 vector field; None when absent."""
        if self.field(table, index) is None:
            return None
        start, length = self.vector(table, index, 4)
        return list(struct.unpack_from(f"<{length}i", self.buf, start))

    def table_at(self, vector: tuple[int, int], item: int) -> int:
        """The table item `item` of a vector of tables refers to."""
        start, length = vector
        if not 0 <= item < length:
            raise TfliteInvalid(f"table {item} of a vector of {length} is named")
        return self.ref(start + 4 * item)

    def string(self, table: int, index: int) -> str:
        start, length = self.vector(table, index, 1)
        return bytes(self.buf[start:start + length]).decode("utf-8", "replace")

    def byte(self, table: int, index: int, default: int = 0) -> int:
        pos = self.field(table, index)
        return default if pos is None else self._unpack("<B", pos)


def _spec(reader: _Reader, tensor: int) -> TensorSpec:
    shape = reader.ints(tensor, 0) or []
    signature = reader.ints(tensor, 7)
    type_ = reader.byte(tensor, 1)
    dtype = _TENSOR_TYPES.get(type_, f"TensorType {type_}")
    if signature is not None:
        dims = tuple(d if d >= 0 else None for d in signature)
    elif shape or reader.byte(tensor, 8):  # has_rank: an empty shape is a scalar, not unknown
        dims = tuple(shape)
    else:
        dims = None
    return TensorSpec(name=reader.string(tensor, 3), dtype=dtype, dims=dims)


def _read(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    size = path.stat().st_size
    if size < 8:
        raise TfliteInvalid(f"the file is {size} bytes; a TFLite flatbuffer has at least an 8-byte header")
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[4:8] != TFLITE_IDENTIFIER:
            raise TfliteInvalid(f"bytes 4..8 are {buf[4:8]!r}, not the TFLite file identifier {TFLITE_IDENTIFIER!r}")
        reader = _Reader(buf)
        try:
            model = reader.ref(0)
            subgraphs = reader.vector(model, 2, 4)
            if not subgraphs[1]:
                raise TfliteInvalid("the model has no subgraph")
            main = reader.table_at(subgraphs, 0)
            tensors = reader.vector(main, 0, 4)

            def specs(index: int) -> list[TensorSpec]:
                return [_spec(reader, reader.table_at(tensors, i)) for i in reader.ints(main, index) or []]

            return specs(1), specs(2)
        except (struct.error, ValueError, OverflowError) as exc:  # offsets that make no sense
            raise TfliteInvalid(f"the flatbuffer does not parse: {exc}") from None


def tflite_validate(path: str | Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Raise TfliteInvalid unless `path` is a TFLite flatbuffer whose main subgraph reads; return
    its declared inputs and outputs (as registry.onnx_check.onnx_io does for ONNX)."""
    return _read(Path(path))
