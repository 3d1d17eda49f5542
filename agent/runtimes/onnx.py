"""The ONNX precheck runtime: onnxruntime on the CPU, one thread."""

from __future__ import annotations

from typing import Any


class OnnxSession:
    def __init__(self, path: str) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self._ort = ort
        self._session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self._outputs = [o.name for o in self._session.get_outputs()]

    def inputs(self) -> list[tuple[str, str, list]]:
        return [(i.name, i.type, list(i.shape)) for i in self._session.get_inputs()]

    def output_names(self) -> list[str]:
        return list(self._outputs)

    def run(self, feeds: dict[str, Any], *, quiet: bool = False) -> list[Any]:
        if not quiet:
            return self._session.run(self._outputs, feeds)
        options = self._ort.RunOptions()
        options.log_severity_level = 4  # an attempt that fails is expected; the caller reports it
        return self._session.run(self._outputs, feeds, options)


def load(path: str) -> OnnxSession:
    return OnnxSession(path)
