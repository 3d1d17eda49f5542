"""Delta artifacts: one file rebuilt from another the device already holds.

The method is zstd's patch-from (`zstd --patch-from`): the target compressed with the whole base
as a raw-content dictionary, in a window that reaches back over all of it, so every unchanged
tensor becomes a long match into the base. benchmarks/deltas.py measured it against bsdiff and
plain compression (README, "Delta updates"). The server builds deltas with `delta_build`, the
agent applies them with `delta_apply`; both live here so the format is defined once.

`zstandard` is in the `runtime` extra, not the bare install: an agent without it takes the full
artifact (`available()` is False), which is always correct, only bigger.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

METHOD = "zstd-patch-from"
CHUNK = 1 << 20
LEVEL = 9  # level 9 with large hash tables found the matches level 19 found, 6x faster (benchmark)
MAX_WINDOW_LOG = 31
# The server offers a delta only under this share of the full artifact: one this close saves too
# little to be worth a second code path on the device (a re-quantised or fully fine-tuned model
# compresses no better from its base). Here so the server and benchmarks/deltas.py share it.
MAX_DELTA_RATIO = 0.9


class DeltaError(Exception):
    """The delta could not be built or applied (bad bytes, wrong base, too long a result)."""


def available() -> bool:
    try:
        import zstandard  # noqa: F401
    except ImportError:
        return False
    return True


def _window_log(base_length: int, target_length: int) -> int:
    """A window reaching from the end of the target back to the start of the base."""
    return min(MAX_WINDOW_LOG, max(10, math.ceil(math.log2(max(2, base_length + target_length)))))


def _dictionary(base: Path):
    import zstandard

    return zstandard.ZstdCompressionDict(base.read_bytes(), dict_type=zstandard.DICT_TYPE_RAWCONTENT)


def delta_build(*, base: Path, target: Path, out: Path) -> tuple[int, str]:
    """Write the delta turning `base` into `target` to `out`; return its (length, sha256)."""
    import zstandard

    base_length, target_length = base.stat().st_size, target.stat().st_size
    window = _window_log(base_length, target_length)
    # The match finder's tables sized to the base: at the level's default sizes they forget
    # most of a 20 MB base and the delta comes out as large as plain compression.
    tables = min(26, max(17, math.ceil(math.log2(max(2, base_length)))))
    params = zstandard.ZstdCompressionParameters.from_level(
        LEVEL, window_log=window, hash_log=tables, chain_log=tables, enable_ldm=True,
        write_content_size=True, write_checksum=True, source_size=target_length,
    )
    compressor = zstandard.ZstdCompressor(dict_data=_dictionary(base), compression_params=params)
    with open(target, "rb") as src, open(out, "wb") as dst:
        compressor.copy_stream(src, dst, size=target_length, read_size=CHUNK, write_size=CHUNK)
    digest, length = hashlib.sha256(), 0
    with open(out, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            length += len(chunk)
    return length, digest.hexdigest()


def delta_apply(*, base: Path, delta: Path, out: Path, length: int) -> str:
    """Rebuild the target from `base` and `delta` into `out`, at most `length` bytes; return the
    sha256 of what was written. Raises DeltaError on any bad input (the caller falls back)."""
    try:
        import zstandard
    except ImportError:
        raise DeltaError("the zstandard module is not installed") from None
    digest, written = hashlib.sha256(), 0
    try:
        decompressor = zstandard.ZstdDecompressor(
            dict_data=_dictionary(base),
            max_window_size=2 ** _window_log(base.stat().st_size, length),
        )
        with open(delta, "rb") as src, open(out, "wb") as dst:
            reader = decompressor.stream_reader(src, read_size=CHUNK)
            while chunk := reader.read(CHUNK):
                written += len(chunk)
                if written > length:
                    raise DeltaError(f"the delta rebuilds more than the signed {length} bytes")
                dst.write(chunk)
                digest.update(chunk)
    except zstandard.ZstdError as exc:
        raise DeltaError(f"the delta does not apply: {exc}") from None
    return digest.hexdigest()
