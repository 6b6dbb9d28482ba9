"""Child process that times one artifact and prints a JSON line: a .pte in ExecuTorch's Python
runtime, a .onnx in ONNX Runtime, a .tflite in ai-edge-litert's interpreter (XNNPACK delegate;
the edgesparse op libraries registered in both).

Run in its own process so its peak RSS (VmHWM) belongs to this model alone:
    python -m edgesparse.devices.child model.pte --runs 100 --warmup 10 --threads 1
"""

from __future__ import annotations

import json
import sys
import time

from edgesparse.devices.device_bench import print_result, random_feed, status_mb as _status_mb, time_calls, timing_parser

# ExecuTorch ScalarType codes (runtime/core/portable_type/scalar_type.h)
_DTYPES = {0: "uint8", 1: "int8", 2: "int16", 3: "int32", 4: "int64", 6: "float32", 7: "float64", 11: "bool"}


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


def set_pte_threads(threads: int) -> int:
    """Size ExecuTorch's thread pool (XNNPACK's and our ops') and return its size as read back."""
    import torch
    from executorch.extension.pybindings import portable_lib

    torch.set_num_threads(threads)
    portable_lib._unsafe_reset_threadpool(threads)
    used = int(portable_lib._threadpool_get_thread_count())
    if used != threads:
        raise RuntimeError(f"ExecuTorch's thread pool could not be set to {threads} threads (it has {used})")
    return used


def bench_pte(path: str, threads: int) -> tuple[str, float, object, list, int]:
    from executorch.runtime import Runtime

    from edgesparse.runtime_kernels import load_executorch_ops

    load_executorch_ops()
    used = set_pte_threads(threads)  # before loading: XNNPACK's delegate takes the pool at init
    t0 = time.perf_counter()
    program = Runtime.get().load_program(path)
    method = program.load_method("forward")
    load_ms = (time.perf_counter() - t0) * 1e3
    inputs = _inputs(program.metadata("forward"))
    return "executorch-python", load_ms, lambda: method.execute(inputs), [list(t.shape) for t in inputs], used


def bench_onnx(path: str, threads: int) -> tuple[str, float, object, list, int]:
    from edgesparse.devices.device_bench import session_threads
    from edgesparse.runtime_kernels import ort_session

    t0 = time.perf_counter()
    session = ort_session(path, threads=threads)
    load_ms = (time.perf_counter() - t0) * 1e3
    feed = random_feed(session)

    def call():
        return session.run(None, feed)

    call.feed = feed  # the per-op pass reuses the same inputs
    return "onnxruntime", load_ms, call, [list(v.shape) for v in feed.values()], session_threads(session)


def bench_tflite(path: str, threads: int) -> tuple[str, float, object, list, int]:
    import numpy as np

    from edgesparse.converters.tflite import interpreter

    t0 = time.perf_counter()
    runner = interpreter(path, xnnpack=True, threads=threads)
    load_ms = (time.perf_counter() - t0) * 1e3
    rng = np.random.default_rng(0)
    details = runner.get_input_details()
    for detail in details:
        shape = [int(d) for d in detail["shape"]]
        value = (rng.standard_normal(shape) if np.issubdtype(detail["dtype"], np.floating) else rng.integers(0, 8, shape))
        runner.set_tensor(detail["index"], value.astype(detail["dtype"]))
    # the interpreter's num_threads sizes XNNPACK's pool and our ops' pool alike (no read-back API)
    return "ai-edge-litert", load_ms, runner.invoke, [[int(d) for d in detail["shape"]] for detail in details], threads


def per_op_pte(path: str, runs: int) -> list[dict]:
    """Per-event medians from ExecuTorch's ETDump over `runs` calls (a separate, instrumented load,
    after the timed runs): XNNPACK's ops inside each delegate call, DELEGATE_CALL and OPERATOR_CALL
    (a non-delegated op, e.g. an edgesparse:: kernel)."""
    import tempfile

    import torch
    from executorch.devtools import Inspector
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime

    module = portable_lib._load_for_executorch(path, enable_etdump=True, debug_buffer_size=0)
    program = Runtime.get().load_program(path)  # for the input metadata
    inputs = _inputs(program.metadata("forward"))
    for _ in range(runs + 1):
        module.forward(inputs)
    with tempfile.TemporaryDirectory() as tmp:
        module.write_etdump_result_to_file(f"{tmp}/run.etdp")
        frame = Inspector(etdump_path=f"{tmp}/run.etdp").to_dataframe()
    rows = []
    for name, raw in zip(frame["event_name"], frame["raw"]):
        if name in ("Method::init", "Program::load_method") or len(raw) < 2:
            continue
        rows.append({"name": name, "calls": len(raw) - 1, "median_ms": float(torch.tensor(raw[1:]).median())})
    return rows


def per_op_summary(rows: list[dict]) -> dict:
    """Per inference, from per_op_pte's rows (one row per event of one inference): the XNNPACK
    delegate calls (partitions entered), the transposes inside them (NCHW <-> NHWC at partition
    edges) and the ops run outside XNNPACK."""
    def count(test):
        return sum(1 for row in rows if test(row["name"]))

    return {"delegate_calls": count(lambda name: name == "DELEGATE_CALL"),
            "transposes": count(lambda name: name.startswith("Transpose")),
            "operator_calls": count(lambda name: name == "OPERATOR_CALL")}


def per_op_onnx(path: str, runs: int, threads: int, feed: dict) -> list[dict]:
    """Per-node medians from ONNX Runtime's session profiling (a separate session)."""
    import tempfile

    from edgesparse.runtime_kernels import ort_session

    with tempfile.TemporaryDirectory() as tmp:
        session = ort_session(path, threads=threads, profile_prefix=f"{tmp}/ort")
        for _ in range(runs + 1):
            session.run(None, feed)
        with open(session.end_profiling()) as f:
            events = json.load(f)
    by_node: dict[str, dict] = {}
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        node = event["name"][: -len("_kernel_time")]
        entry = by_node.setdefault(node, {"name": node, "op": event.get("args", {}).get("op_name", ""), "us": []})
        entry["us"].append(event["dur"])
    rows = []
    for entry in by_node.values():
        us = sorted(entry.pop("us")[1:]) or [0]
        rows.append(entry | {"calls": len(us), "median_ms": us[len(us) // 2] / 1e3})
    return rows


def bench(path: str, runs: int, warmup: int, threads: int, min_seconds: float, per_op: bool = False) -> dict:
    rss_before = _status_mb("VmRSS")
    bench_for = bench_onnx if path.endswith(".onnx") else bench_tflite if path.endswith(".tflite") else bench_pte
    runtime, load_ms, call, shapes, used = bench_for(path, threads)
    first_ms, times = time_calls(call, runs, warmup, min_seconds)
    extra = {}
    if path.endswith(".tflite"):
        from edgesparse.converters import tflite

        with open(path, "rb") as f:
            ours = len(tflite.edgesparse_ops(tflite.load(f.read())))
        if ours:
            extra["threads_note"] = f"{ours} edgesparse TFLite ops split across the interpreter's {threads} thread(s), as XNNPACK does"
    if per_op:
        ops_runs = min(runs, 100)
        extra["per_op"] = (per_op_onnx(path, ops_runs, threads, call.feed) if path.endswith(".onnx")
                           else per_op_pte(path, ops_runs))
        if not path.endswith(".onnx"):
            extra["per_op_summary"] = per_op_summary(extra["per_op"])
    return {
        "runtime": runtime,
        "threads": used,
        "load_ms": load_ms,
        "first_run_ms": first_ms,
        "times_ms": times,
        "rss_before_load_mb": rss_before,
        "peak_rss_mb": _status_mb("VmHWM"),
        "input_shapes": shapes,
        **extra,
    }


def main(argv=None) -> int:
    parser = timing_parser()
    parser.add_argument("--per-op", action="store_true", help="then per-operator times (ETDump / ORT profiling)")
    args = parser.parse_args(argv)
    return print_result(lambda: bench(args.path, args.runs, args.warmup, args.threads, args.min_seconds, args.per_op))


if __name__ == "__main__":
    sys.exit(main())
