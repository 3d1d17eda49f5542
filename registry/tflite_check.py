"""Check that a file claiming format tflite is a TFLite flatbuffer, without loading it.

A TFLite model is a FlatBuffer whose first four bytes are the little-endian offset of the root
table (a `Model`) and whose next four are the schema's file identifier, "TFL3". A file without
them (an ONNX model, a zip, a SavedModel directory archive) would fail the precheck on every
device; refusing it at upload names the problem at once. Whether the graph itself loads and runs
is the release check's job (registry.release_check runs the agent's precheck with the TFLite
interpreter).
"""

from __future__ import annotations

import struct
from pathlib import Path

TFLITE_IDENTIFIER = b"TFL3"


class TfliteInvalid(Exception):
    pass


def tflite_validate(path: str | Path) -> None:
    """Raise TfliteInvalid unless `path` starts like a TFLite flatbuffer (identifier and root)."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise TfliteInvalid(f"the file is {size} bytes; a TFLite flatbuffer has at least an 8-byte header")
    if head[4:8] != TFLITE_IDENTIFIER:
        raise TfliteInvalid(
            f"bytes 4..8 are {head[4:8]!r}, not the TFLite file identifier {TFLITE_IDENTIFIER!r}"
        )
    (root,) = struct.unpack("<I", head[:4])
    if root < 8 or root + 4 > size:
        raise TfliteInvalid(f"the root table offset {root} lies outside the {size}-byte file")
