"""A real model with dynamic input sizes: silero-vad (voice activity detection) as its PyPI wheel
ships it. Not a dependency (the package requires torch): the wheel is fetched once with
`pip download --no-deps` into pytest's cache directory and the ONNX file read from the zip.

silero_vad.onnx takes input float32 [batch, samples] (512 samples at 16 kHz, 256 at 8 kHz),
state float32 [2, batch, 128] and sr int64 [] (the sample rate); it returns output float32
[batch, 1] (the speech probability) and stateN float32 [2, batch, 128].
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

VERSION = "6.2.3"
MEMBER = "silero_vad/data/silero_vad.onnx"


def _cache_dir(config) -> Path:
    cache = getattr(config, "cache", None)
    if cache is not None:
        return Path(cache.mkdir("silero-vad"))
    directory = Path(tempfile.gettempdir()) / "modelfleet-test-silero-vad"
    directory.mkdir(exist_ok=True)
    return directory


def silero_vad_onnx(config) -> bytes:
    """silero_vad.onnx's bytes; `config` is pytest's (its cache directory keeps the wheel)."""
    directory = _cache_dir(config)
    wheel = next(iter(sorted(directory.glob(f"silero_vad-{VERSION}-*.whl"))), None)
    if wheel is None:
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            proc = subprocess.run(
                [sys.executable, "-m", "pip", "download", f"silero-vad=={VERSION}", "--no-deps", "-d", tmp],
                capture_output=True, text=True, timeout=600, check=False,
            )  # fmt: skip
            found = sorted(Path(tmp).glob("silero_vad-*.whl"))
            if proc.returncode != 0 or not found:
                pytest.fail(f"could not download the silero-vad {VERSION} wheel (network?): {proc.stderr[-2000:]}")
            wheel = directory / found[0].name
            os.replace(found[0], wheel)  # atomic: a concurrent run sees the whole wheel or none
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(MEMBER)


def speech_like_samples(samples: int = 512, rate: int = 16000) -> dict[str, np.ndarray]:
    """One chunk of a voiced-sounding signal with the model's initial state: the .npz a user saves."""
    t = np.arange(samples) / rate
    rng = np.random.default_rng(7)
    chunk = 0.3 * np.sin(2 * np.pi * 180 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t)) + 0.02 * rng.standard_normal(samples)
    return {
        "input": chunk.astype(np.float32)[None, :],
        "state": np.zeros((2, 1, 128), dtype=np.float32),
        "sr": np.array(rate, dtype=np.int64),
    }
