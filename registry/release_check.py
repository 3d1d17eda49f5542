"""Before a release is signed, each artifact is checked as a device will check it, so a
release that would fail on every canary is refused here, with the reason, instead:

0. every artifact's format has a precheck runtime (agent.runtimes: onnx, tflite), unless the
   health contract says `"precheck": "none"`: a device would refuse it with NO_PRECHECK_RUNTIME,
   so it is refused here with 400 `no_precheck_runtime`, naming the artifact and its format;
1. the model's declared inputs and outputs (ONNX: registry.onnx_check; TFLite: the main
   subgraph's, registry.tflite_check) against the health contract (names, dtypes, shapes;
   registry.health.health_contract_check_model), for artifacts uploaded before the contract was
   checked at upload;
2. the agent's own precheck (agent.precheck.run_precheck: a child process with the agent's
   default time and memory limits, the runtime of the artifact's format) on the contract's
   golden inputs, or, without them, on the inputs the precheck generates from the model's
   declared ones; skipped with `"precheck": "none"`. Golden outputs and the latency budget are
   left to the devices: they are judged on the devices' hardware.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from django.conf import settings

from agent.config import UpdateConfig
from agent.precheck import run_precheck
from agent.runtimes import RUNTIMES, precheck_skipped
from registry.artifacts import artifact_storage
from registry.errors import ApiError
from registry.health import health_contract_check_model
from registry.models import Artifact, ModelVersion

PRECHECK_TIMEOUT_SECONDS = UpdateConfig.precheck_timeout_seconds
PRECHECK_MEMORY_MB = UpdateConfig.precheck_memory_mb


def _fetch(artifact: Artifact, directory: Path) -> Path:
    """Copy a stored artifact to a local file (S3 or filesystem alike), streamed."""
    path = directory / (Path(artifact.file_name).name or "model.onnx")
    with artifact_storage().open(artifact.storage_key, "rb") as source, path.open("wb") as target:
        shutil.copyfileobj(source, target, 1024 * 1024)
    return path


def release_check(version: ModelVersion, artifacts: list[Artifact]) -> None:
    """Raise ApiError (400) unless every artifact passes the checks above."""
    # Imported here: onnx costs ~25 MB that processes not releasing never need.
    from registry.onnx_check import OnnxInvalid, onnx_io, onnx_validate
    from registry.tflite_check import TfliteInvalid, tflite_validate

    health = version.health or {}
    skipped = precheck_skipped(health)
    golden = {"inputs": health["inputs"]} if health.get("inputs") else None
    for artifact in artifacts:
        if artifact.format not in RUNTIMES and not skipped:
            raise ApiError(
                f"{version} is not released: the artifact for hardware '{artifact.hardware_id}' "
                f"({artifact.file_name}) has format '{artifact.format}', which no precheck runtime can load "
                f"(runtimes: {', '.join(RUNTIMES)}), so every device would refuse it (NO_PRECHECK_RUNTIME). "
                'To let the trial decide alone, give the version the health contract {"precheck": "none"}.',
                code="no_precheck_runtime",
                hardware=artifact.hardware_id,
                format=artifact.format,
                file_name=artifact.file_name,
            )
    for artifact in artifacts:
        if artifact.format not in (Artifact.Format.ONNX, Artifact.Format.TFLITE):
            continue
        label = f"hardware '{artifact.hardware_id}' ({artifact.file_name})"
        with tempfile.TemporaryDirectory(dir=settings.FILE_UPLOAD_TEMP_DIR, prefix="release-check-") as tmp:
            path = _fetch(artifact, Path(tmp))
            if artifact.format == Artifact.Format.ONNX:
                try:
                    skeleton = onnx_validate(path)
                except OnnxInvalid as exc:
                    raise ApiError(
                        f"The artifact for {label} is not a valid ONNX model: {exc}", code="invalid_onnx"
                    ) from None
                health_contract_check_model(health, *onnx_io(skeleton), where=f"for {label}")
            else:
                try:
                    declared = tflite_validate(path)
                except TfliteInvalid as exc:
                    raise ApiError(
                        f"The artifact for {label} is not a TFLite model: {exc}", code="invalid_tflite"
                    ) from None
                health_contract_check_model(health, *declared, where=f"for {label}")
            if skipped:
                continue
            result = run_precheck(path, golden, timeout=PRECHECK_TIMEOUT_SECONDS, memory_mb=PRECHECK_MEMORY_MB,
                                  format=artifact.format)
        if not result.ok:
            on = "the health contract's golden inputs" if golden else "inputs generated from its declared ones"
            raise ApiError(
                f"{version} is not released: the device precheck fails for {label} on {on}, so it would "
                f"fail on every device: {result.detail}",
                code="precheck_failed",
                hardware=artifact.hardware_id,
                detail=result.detail,
            )
