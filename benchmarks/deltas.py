"""Delta updates on realistic model changes: which method, how many bytes, how long, how much memory.

A real ONNX model of ~25 MB (six dense float32 layers, 1024 wide) and three changes to it:
  (a) head   - the last layer re-trained (new weights), everything else as it was;
  (b) nudge  - every weight nudged slightly, w * (1 + 1e-3 * noise): a full fine-tune;
  (c) fp16   - the same model converted to float16.
For each: the full size, the delta size of zstd's patch-from (agent/deltas.py, what ships), of
bsdiff4 and of content-defined chunking (~64 KiB chunks, as Xet storage; the bytes a chunk
store would send: the missing chunks and the index) for comparison, and of plain zstd of the
whole file; whether the server offers the delta
(under agent.deltas.MAX_DELTA_RATIO of the full artifact); the bytes actually transferred,
fetched through the agent's own download code (agent.download.fetch) from a local HTTP server;
the seconds to build the delta (server) and to apply it (agent), and the peak RSS of a fresh
subprocess applying it, beside the RSS of the same subprocess doing nothing (its floor).
Goals (issue 15): (a) transfers at most 1.2 x the bytes of the changed tensors; no case more
than the full artifact plus 1 %.

    .venv/bin/python benchmarks/deltas.py [--no-bsdiff] [--no-write]

Writes benchmarks/results/deltas.json.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import platform as pyplatform
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "deltas.json"

from agent import deltas  # noqa: E402
from agent.download import fetch  # noqa: E402

WIDTH, LAYERS = 1024, 6


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def dense_model(weights: list[np.ndarray]) -> bytes:
    """x -> relu(x @ W1) -> ... -> x @ Wn, in the weights' dtype."""
    elem = TensorProto.FLOAT16 if weights[0].dtype == np.float16 else TensorProto.FLOAT
    nodes, inits, current = [], [], "x"
    for i, w in enumerate(weights):
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"h{i}"]))
        current = f"h{i}"
        if i < len(weights) - 1:
            nodes.append(helper.make_node("Relu", [current], [f"r{i}"]))
            current = f"r{i}"
    nodes.append(helper.make_node("Identity", [current], ["y"]))
    graph = helper.make_graph(
        nodes, "dense", [helper.make_tensor_value_info("x", elem, [None, WIDTH])],
        [helper.make_tensor_value_info("y", elem, [None, WIDTH])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="modelfleet-bench")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def cases() -> tuple[bytes, dict[str, tuple[bytes, int]]]:
    """The base model and, per case, (the changed model, bytes of the tensors that changed)."""
    rng = np.random.default_rng(2026)
    base = [(rng.standard_normal((WIDTH, WIDTH)) / 32).astype(np.float32) for _ in range(LAYERS)]
    head = [*base[:-1], (rng.standard_normal((WIDTH, WIDTH)) / 32).astype(np.float32)]
    nudged = [(w * (1 + 1e-3 * rng.standard_normal(w.shape))).astype(np.float32) for w in base]
    fp16 = [w.astype(np.float16) for w in base]
    return dense_model(base), {
        "a_head_retrained": (dense_model(head), base[-1].nbytes),
        "b_all_weights_nudged": (dense_model(nudged), sum(w.nbytes for w in nudged)),
        "c_fp32_to_fp16": (dense_model(fp16), sum(w.nbytes for w in fp16)),
    }


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve(directory: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(_Quiet, directory=str(directory))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


# Peak RSS from VmHWM: the new process's own high-water mark (ru_maxrss survives execve on
# Linux, so it would report this script's own numpy arrays).
APPLY = """
import sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from agent import deltas
if {apply!r}:
    t = time.perf_counter()
    deltas.delta_apply(base=Path({base!r}), delta=Path({delta!r}), out=Path({out!r}), length={length})
    seconds = time.perf_counter() - t
else:
    import zstandard
    seconds = 0
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(seconds, hwm.split()[1])
"""


def apply_in_child(base: Path, delta: Path, out: Path, length: int, *,
                   apply: bool = True) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of a fresh interpreter applying the delta (or only importing)."""
    code = APPLY.format(root=str(ROOT), base=str(base), delta=str(delta), out=str(out), length=length,
                        apply=apply)
    seconds, rss_kib = subprocess.check_output([sys.executable, "-c", code], text=True).split()
    return float(seconds), int(rss_kib) / 1024


def bsdiff_size(base: bytes, target: bytes) -> tuple[int, float]:
    import bsdiff4

    started = time.perf_counter()
    patch = bsdiff4.diff(base, target)
    return len(patch), time.perf_counter() - started


def cdc_chunks(data: bytes, *, mask_bits: int = 16, window: int = 32,
               min_size: int = 16 << 10) -> list[bytes]:
    """Content-defined chunks (~64 KiB average, as Xet storage): a boundary where a rolling sum of
    random per-byte values over the last `window` bytes has its low `mask_bits` bits zero."""
    table = np.random.default_rng(64).integers(0, 2**32, 256, dtype=np.uint64)
    values = np.cumsum(table[np.frombuffer(data, dtype=np.uint8)], dtype=np.uint64)
    rolling = values[window:] - values[:-window]
    candidates = np.flatnonzero((rolling & np.uint64((1 << mask_bits) - 1)) == 0) + window + 1
    chunks, start = [], 0
    for cut in candidates.tolist():
        if cut - start >= min_size:
            chunks.append(data[start:cut])
            start = cut
    chunks.append(data[start:])
    return chunks


def cdc_transfer(base: bytes, target: bytes) -> int:
    """Bytes a chunk-store client fetches: the target's chunk index (32-byte sha256 and an 8-byte
    length per chunk) and every chunk the base does not hold."""
    import hashlib

    have = {hashlib.sha256(c).digest() for c in cdc_chunks(base)}
    chunks = cdc_chunks(target)
    return 40 * len(chunks) + sum(len(c) for c in chunks if hashlib.sha256(c).digest() not in have)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-bsdiff", action="store_true",
                        help="skip the bsdiff4 comparison (slow: 20-80 s a case)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    import zstandard

    base_bytes, changed = cases()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-deltas-") as tmp:
        tmp = Path(tmp)
        (tmp / "base.onnx").write_bytes(base_bytes)
        httpd, url = serve(tmp)
        _, floor_rss = apply_in_child(tmp / "base.onnx", tmp / "base.onnx", tmp / "x", 0, apply=False)
        try:
            for name, (target_bytes, changed_bytes) in changed.items():
                target = tmp / f"{name}.onnx"
                target.write_bytes(target_bytes)
                full = len(target_bytes)
                started = time.perf_counter()
                length, digest = deltas.delta_build(base=tmp / "base.onnx", target=target,
                                                    out=tmp / f"{name}.delta")
                build_seconds = time.perf_counter() - started
                offered = length <= deltas.MAX_DELTA_RATIO * full
                apply_seconds, apply_rss = apply_in_child(tmp / "base.onnx", tmp / f"{name}.delta",
                                                          tmp / f"{name}.rebuilt", full)
                exact = (tmp / f"{name}.rebuilt").read_bytes() == target_bytes
                # What the device fetches: the delta when offered, else the full artifact.
                fetched = fetch(f"{url}/{name}.delta" if offered else f"{url}/{name}.onnx",
                                tmp / f"{name}.part", length=length if offered else full)
                (tmp / f"{name}.part").unlink()
                row = {
                    "full_bytes": full,
                    "changed_tensor_bytes": changed_bytes,
                    "delta_bytes": length,
                    "delta_sha256": digest,
                    "delta_ratio_of_full": round(length / full, 4),
                    "offered": offered,
                    "bytes_transferred": fetched.bytes_received,
                    "transferred_ratio_of_full": round(fetched.bytes_received / full, 4),
                    "transferred_ratio_of_changed": round(fetched.bytes_received / changed_bytes, 4),
                    "build_seconds": round(build_seconds, 3),
                    "apply_seconds": round(apply_seconds, 3),
                    "apply_peak_rss_mib": round(apply_rss, 1),
                    "apply_rss_floor_mib": round(floor_rss, 1),
                    "rebuilt_exact": exact,
                    "zstd_whole_file_bytes": len(
                        zstandard.ZstdCompressor(level=deltas.LEVEL).compress(target_bytes)),
                }
                row["cdc_64k_transfer_bytes"] = cdc_transfer(base_bytes, target_bytes)
                if not args.no_bsdiff:
                    row["bsdiff4_bytes"], seconds = bsdiff_size(base_bytes, target_bytes)
                    row["bsdiff4_build_seconds"] = round(seconds, 2)
                results[name] = row
                log(f"{name}: full {full:,} B, changed {changed_bytes:,} B, delta {length:,} B "
                    f"({row['delta_ratio_of_full']:.1%}, offered={offered}), "
                    f"transferred {fetched.bytes_received:,} B; build {build_seconds:.2f} s, "
                    f"apply {apply_seconds:.2f} s at {apply_rss:.0f} MiB peak RSS "
                    f"(floor {floor_rss:.0f}); exact={exact}"
                    + f"; CDC {row['cdc_64k_transfer_bytes']:,} B"
                    + (f"; bsdiff4 {row['bsdiff4_bytes']:,} B in {row['bsdiff4_build_seconds']} s"
                       if "bsdiff4_bytes" in row else ""))
        finally:
            httpd.shutdown()
    goals = {
        "a_transfers_at_most_1.2x_changed":
            results["a_head_retrained"]["transferred_ratio_of_changed"] <= 1.2,
        "no_case_over_full_plus_1_percent": all(r["bytes_transferred"] <= 1.01 * r["full_bytes"]
                                                for r in results.values()),
        "all_rebuilt_exact": all(r["rebuilt_exact"] for r in results.values()),
    }
    out = {
        "benchmark": "deltas",
        "when": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {"python": pyplatform.python_version(), "cpus": os.cpu_count(),
                    "platform": pyplatform.platform()},
        "method": deltas.METHOD,
        "zstd_level": deltas.LEVEL,
        "zstandard": zstandard.__version__,
        "max_delta_ratio": deltas.MAX_DELTA_RATIO,
        "cases": results,
        "goals": goals,
    }
    print(json.dumps(out, indent=2))
    if not args.no_write:
        RESULTS.write_text(json.dumps(out, indent=2) + "\n")
        log(f"wrote {RESULTS.relative_to(ROOT)}")
    if not all(goals.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
