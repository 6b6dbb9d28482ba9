"""Times one .onnx in ONNX Runtime on a device and prints one JSON line, like the C++ runner.
Standalone: Python 3, numpy and onnxruntime only, so it can be pushed to any board that has them
(edgesparse itself need not be installed there); the edgesparse op library is registered when
given. (.tflite through LiteRT comes with the TFLite exporter.)

    python3 device_bench.py model.onnx --runs 100 --warmup 10 [--threads 1] [--min-seconds 1] [--op-library libedgesparse_ort.so]
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def status_mb(key: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def time_calls(call, runs: int, warmup: int, min_seconds: float) -> tuple[float, list[float]]:
    """(first call ms, steady-state times ms after `warmup` untimed calls): at least `runs` calls
    and `min_seconds` of them."""
    t0 = time.perf_counter()
    call()
    first_ms = (time.perf_counter() - t0) * 1e3
    for _ in range(warmup):
        call()
    times = []
    started = time.perf_counter()
    while len(times) < runs or time.perf_counter() - started < min_seconds:
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
    return first_ms, times


def random_feed(session) -> dict:
    """Seeded inputs for every input of an ONNX Runtime session (symbolic dimensions: 1)."""
    import numpy as np

    rng = np.random.default_rng(0)
    feed = {}
    for arg in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in arg.shape]
        feed[arg.name] = (rng.standard_normal(shape).astype(np.float32) if "float" in arg.type
                          else rng.integers(0, 8, shape).astype(np.int64))
    return feed


def session_threads(session) -> int:
    """The intra-op thread count an ONNX Runtime session runs with, read back from the session
    (0 would mean ORT's own default: always set it explicitly, as load_onnx and ort_session do)."""
    used = int(session.get_session_options().intra_op_num_threads)
    if used < 1:
        raise RuntimeError("the ONNX Runtime session has no explicit intra-op thread count")
    return used


def load_onnx(path: str, threads: int, op_library: str | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if op_library:
        options.register_custom_ops_library(op_library)
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = random_feed(session)
    return "onnxruntime", lambda: session.run(None, feed), session_threads(session)


def timing_parser() -> argparse.ArgumentParser:
    """The arguments every runner child takes (this script's, and edgesparse.devices.child's)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-seconds", type=float, default=0.0)
    return parser


def print_result(measure) -> int:
    """Print measure()'s dict as one JSON line, or its exception as a one-line {"error": ...}."""
    try:
        result = measure()
    except Exception as exc:  # reported to the host as one line
        print(json.dumps({"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}))
        return 2
    print(json.dumps(result))
    return 0


def measure_onnx(path: str, runs: int, warmup: int, threads: int, min_seconds: float, op_library: str | None) -> dict:
    rss_before = status_mb("VmRSS")
    t0 = time.perf_counter()
    runtime, call, used = load_onnx(path, threads, op_library)
    load_ms = (time.perf_counter() - t0) * 1e3
    first_ms, times = time_calls(call, runs, warmup, min_seconds)
    return {"runtime": runtime, "threads": used, "load_ms": load_ms, "first_run_ms": first_ms, "times_ms": times,
            "rss_before_load_mb": rss_before, "peak_rss_mb": status_mb("VmHWM")}


def main(argv=None) -> int:
    parser = timing_parser()
    parser.add_argument("--op-library", help="an ONNX Runtime custom-op library to register (ai.edgesparse)")
    args = parser.parse_args(argv)
    return print_result(lambda: measure_onnx(args.path, args.runs, args.warmup, args.threads, args.min_seconds,
                                             args.op_library))


if __name__ == "__main__":
    sys.exit(main())
