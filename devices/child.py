"""Child process that times one artifact and prints a JSON line: a .pte in ExecuTorch's Python
runtime, a .onnx in ONNX Runtime (with the edgesparse op library registered).

Run in its own process so its peak RSS (VmHWM) belongs to this model alone:
    python -m edgesparse.devices.child model.pte --runs 100 --warmup 10 --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time

# ExecuTorch ScalarType codes (runtime/core/portable_type/scalar_type.h)
_DTYPES = {0: "uint8", 1: "int8", 2: "int16", 3: "int32", 4: "int64", 6: "float32", 7: "float64", 11: "bool"}


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _inputs(meta):
    import torch

    tensors = []
    gen = torch.Generator().manual_seed(0)
    for i in range(meta.num_inputs()):
        info = meta.input_tensor_meta(i)
        dtype = getattr(torch, _DTYPES.get(info.dtype(), "float32"))
        shape = tuple(info.sizes())
        if dtype.is_floating_point:
            tensors.append(torch.randn(shape, generator=gen, dtype=dtype))
        else:
            tensors.append(torch.randint(0, 8, shape, generator=gen, dtype=dtype))
    return tensors


def _time(call, runs: int, warmup: int, min_seconds: float) -> tuple[float, list[float]]:
    """(first call ms, steady-state times ms after `warmup` untimed calls)."""
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


def bench_pte(path: str, threads: int) -> tuple[str, float, object, list]:
    import torch
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime

    from edgesparse.runtime_kernels import load_executorch_ops

    load_executorch_ops()
    torch.set_num_threads(threads)
    portable_lib._unsafe_reset_threadpool(threads)
    t0 = time.perf_counter()
    program = Runtime.get().load_program(path)
    method = program.load_method("forward")
    load_ms = (time.perf_counter() - t0) * 1e3
    inputs = _inputs(program.metadata("forward"))
    return "executorch-python", load_ms, lambda: method.execute(inputs), [list(t.shape) for t in inputs]


def bench_onnx(path: str, threads: int) -> tuple[str, float, object, list]:
    import numpy as np

    from edgesparse.runtime_kernels import ort_session

    t0 = time.perf_counter()
    session = ort_session(path, threads=threads)
    load_ms = (time.perf_counter() - t0) * 1e3
    rng = np.random.default_rng(0)
    feed = {}
    for arg in session.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in arg.shape]  # symbolic dims: 1
        feed[arg.name] = (rng.standard_normal(shape).astype(np.float32) if "float" in arg.type
                          else rng.integers(0, 8, shape).astype(np.int64))
    return "onnxruntime", load_ms, lambda: session.run(None, feed), [list(v.shape) for v in feed.values()]


def bench(path: str, runs: int, warmup: int, threads: int, min_seconds: float) -> dict:
    rss_before = _status_mb("VmRSS")
    runtime, load_ms, call, shapes = (bench_onnx if path.endswith(".onnx") else bench_pte)(path, threads)
    first_ms, times = _time(call, runs, warmup, min_seconds)
    return {
        "runtime": runtime,
        "threads": threads,
        "load_ms": load_ms,
        "first_run_ms": first_ms,
        "times_ms": times,
        "rss_before_load_mb": rss_before,
        "peak_rss_mb": _status_mb("VmHWM"),
        "input_shapes": shapes,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-seconds", type=float, default=0.0)
    args = parser.parse_args(argv)
    try:
        result = bench(args.path, args.runs, args.warmup, args.threads, args.min_seconds)
    except Exception as exc:  # reported to the parent as one line
        print(json.dumps({"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}))
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
