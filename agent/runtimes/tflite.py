"""The TFLite precheck runtime: ai-edge-litert's interpreter (the successor of tflite-runtime),
one thread, its default delegates (XNNPACK on the CPU) as the app on the device would get them."""

from __future__ import annotations

from typing import Any

# numpy dtype name -> the ONNX type notation agent.precheck's generated inputs speak.
_TYPES = {
    "float32": "tensor(float)", "float64": "tensor(double)", "float16": "tensor(float16)",
    "int64": "tensor(int64)", "int32": "tensor(int32)", "int16": "tensor(int16)",
    "int8": "tensor(int8)", "uint8": "tensor(uint8)", "bool": "tensor(bool)",
}


class TfliteSession:
    def __init__(self, path: str) -> None:
        import numpy as np
        from ai_edge_litert.interpreter import Interpreter

        self._np = np
        self._interpreter = Interpreter(model_path=path, num_threads=1)
        self._interpreter.allocate_tensors()
        self._inputs = self._interpreter.get_input_details()
        self._outputs = self._interpreter.get_output_details()
        self._shapes = {d["index"]: list(d["shape"]) for d in self._inputs}

    def inputs(self) -> list[tuple[str, str, list]]:
        declared = []
        for d in self._inputs:
            dtype = self._np.dtype(d["dtype"]).name
            # shape_signature marks a dynamic dimension -1; `shape` holds its placeholder size.
            dims = [int(s) if s >= 0 else None for s in d.get("shape_signature", d["shape"])]
            declared.append((d["name"], _TYPES.get(dtype, f"tensor({dtype})"), dims))
        return declared

    def output_names(self) -> list[str]:
        return [d["name"] for d in self._outputs]

    def run(self, feeds: dict[str, Any], *, quiet: bool = False) -> list[Any]:
        np, it = self._np, self._interpreter
        by_name = {d["name"]: d for d in self._inputs}
        unknown = sorted(set(feeds) - set(by_name))
        if unknown:
            raise ValueError(f"no model inputs named {unknown} (inputs: {sorted(by_name)})")
        resized = False
        for name, value in feeds.items():
            index = by_name[name]["index"]
            shape = list(np.shape(value))
            if shape != self._shapes[index]:
                it.resize_tensor_input(index, shape, strict=True)
                self._shapes[index] = shape
                resized = True
        if resized:
            it.allocate_tensors()
        for name, value in feeds.items():
            # No cast: golden data of another dtype than the model's is refused, as onnxruntime does.
            it.set_tensor(by_name[name]["index"], np.asarray(value))
        it.invoke()
        return [it.get_tensor(d["index"]) for d in self._outputs]


def load(path: str) -> TfliteSession:
    return TfliteSession(path)
