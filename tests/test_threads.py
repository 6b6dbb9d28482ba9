"""Threads honoured everywhere: each runtime (the C++ runner, ExecuTorch's Python runtime, ONNX
Runtime) reports the thread count it runs with, equal to the one asked for; a large sparse op at
2 threads has its work done by 2 threads, a small one stays on one, and the output is the same
bytes at 1 and 2 threads."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch
from torch import nn

from edgesparse import runtime_kernels
from edgesparse.patterns import make_mask
from edgesparse.recipe import Pattern
from edgesparse.runtime_kernels.modules import sparse_module

pytestmark = pytest.mark.skipif(not runtime_kernels.RUNNER.is_file(), reason="run `make kernels`")


def _sparse_linear(inp: int, out: int) -> nn.Module:
    """A Linear pruned to 90% in 4x1 blocks, on our BCSR kernel."""
    torch.manual_seed(0)
    layer = nn.Linear(inp, out)
    pattern = Pattern.parse("block:4x1")
    with torch.no_grad():
        layer.weight.mul_(make_mask(layer.weight, pattern, 0.9))
    return sparse_module("linear", pattern, layer.weight, layer.bias).eval()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """One large sparse linear (1024 -> 4096, batch 16: 6.7M multiply-adds a call) as .pte and
    .onnx, and one small one (256 -> 256, batch 1: 6.6k) as .pte; with their inputs."""
    from edgesparse.converters.executorch import lower
    from edgesparse.converters.onnx import to_onnx

    folder = tmp_path_factory.mktemp("threads")
    made = {}
    for name, (inp, out, rows) in {"large": (1024, 4096, 16), "small": (256, 256, 1)}.items():
        module = _sparse_linear(inp, out)
        x = torch.randn(rows, inp, generator=torch.Generator().manual_seed(1))
        (folder / f"{name}.pte").write_bytes(lower(module, (x,)).buffer)
        x.numpy().tofile(folder / f"{name}.f32")
        with torch.no_grad():
            made[name] = {"pte": folder / f"{name}.pte", "x": folder / f"{name}.f32", "want": module(x)}
        if name == "large":
            (folder / "large.onnx").write_bytes(to_onnx(module, (x,)).SerializeToString())
            made[name]["onnx"] = folder / "large.onnx"
    return made


def _run(artifact: dict, threads: int, out, seconds: float = 0.3) -> dict:
    proc = subprocess.run([str(runtime_kernels.RUNNER), str(artifact["pte"]), "--runs", "20", "--warmup", "5",
                           "--min-seconds", str(seconds), "--threads", str(threads), "--input", str(artifact["x"]),
                           "--output", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-1000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


RUNTIMES = {("cpp", "pte"): "executorch-cpp", ("python", "pte"): "executorch-python", ("python", "onnx"): "onnxruntime"}


def _check_profile(artifacts, runtime: str, suffix: str, threads: int) -> None:
    from edgesparse.devices.local import profile_local

    result = profile_local(artifacts["large"][suffix], runs=3, warmup=1, threads=threads, runtime=runtime)
    assert result["threads"] == threads and result["runtime"] == RUNTIMES[runtime, suffix], result


@pytest.mark.parametrize("runtime,suffix,threads", [("cpp", "pte", 1), ("cpp", "pte", 2), ("python", "pte", 2),
                                                    ("python", "onnx", 2)])
def test_each_runtime_reports_the_thread_count_asked_for(artifacts, runtime, suffix, threads):
    """profile's "threads" is what the runtime reports: the runner's pool size read back after
    setting it, ExecuTorch's pool size in Python, the ORT session's intra-op count."""
    _check_profile(artifacts, runtime, suffix, threads)


@pytest.mark.slow
@pytest.mark.parametrize("runtime,suffix", [("python", "pte"), ("python", "onnx")])
def test_the_python_runtimes_report_one_thread_too(artifacts, runtime, suffix):
    """(1 thread, the default, is also asserted by test_cli's profile test for the python .pte runtime.)"""
    _check_profile(artifacts, runtime, suffix, 1)


def test_a_large_sparse_op_uses_both_threads_with_the_same_bytes(artifacts, tmp_path):
    """thread_cpu_ms is each thread's CPU time over the timed runs: at 1 thread the runner's only
    busy thread is the caller; at 2, the pool's second thread does a real share of the work (on
    this shared machine a descheduled thread loses pieces to the other, hence no more than a
    fifth asked for). The output is the same bytes either way, and equals torch."""
    one, two = _run(artifacts["large"], 1, tmp_path / "y1.f32"), _run(artifacts["large"], 2, tmp_path / "y2.f32")
    assert one["threads"] == 1 and two["threads"] == 2
    assert len(one["thread_cpu_ms"]) == 1, one["thread_cpu_ms"]
    busiest, second = two["thread_cpu_ms"][:2]
    assert second >= 0.2 * busiest, two["thread_cpu_ms"]
    assert (tmp_path / "y1.f32").read_bytes() == (tmp_path / "y2.f32").read_bytes()
    want = artifacts["large"]["want"]
    got = torch.from_numpy(np.fromfile(tmp_path / "y2.f32", dtype=np.float32)).reshape(want.shape)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_small_sparse_op_stays_on_one_thread(artifacts, tmp_path):
    """Below the minimum work per thread, waking the pool costs more than it gains: the op runs on
    the calling thread even with 2 in the pool (whose second thread then stays asleep)."""
    two = _run(artifacts["small"], 2, tmp_path / "y2.f32", seconds=0.2)
    busiest, second = two["thread_cpu_ms"][:2]
    assert two["threads"] == 2 and second < 0.05 * busiest, two["thread_cpu_ms"]
    _run(artifacts["small"], 1, tmp_path / "y1.f32", seconds=0.0)
    assert (tmp_path / "y1.f32").read_bytes() == (tmp_path / "y2.f32").read_bytes()


def test_the_ort_and_python_pte_outputs_are_the_same_at_1_and_2_threads(artifacts):
    from executorch.extension.pybindings import portable_lib

    from edgesparse.converters.executorch import load_method, run_pte

    x = torch.from_numpy(np.fromfile(artifacts["large"]["x"], dtype=np.float32)).reshape(16, 1024)
    session = {t: runtime_kernels.ort_session(artifacts["large"]["onnx"], threads=t) for t in (1, 2)}
    feed = {session[1].get_inputs()[0].name: x.numpy()}
    ort = [session[t].run(None, feed)[0] for t in (1, 2)]
    assert ort[0].tobytes() == ort[1].tobytes()
    before = portable_lib._threadpool_get_thread_count()
    try:
        pte = []
        for threads in (1, 2):
            portable_lib._unsafe_reset_threadpool(threads)
            assert portable_lib._threadpool_get_thread_count() == threads
            pte.append(run_pte(load_method(artifacts["large"]["pte"]), (x,)).numpy())
    finally:
        portable_lib._unsafe_reset_threadpool(before)
    assert pte[0].tobytes() == pte[1].tobytes()
    torch.testing.assert_close(torch.from_numpy(pte[1]), artifacts["large"]["want"], rtol=1e-4, atol=1e-4)


def test_the_runner_refuses_a_thread_count_it_cannot_set(artifacts):
    for bad in ("0", "-3", "two"):
        proc = subprocess.run([str(runtime_kernels.RUNNER), str(artifacts["small"]["pte"]), "--threads", bad],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "--threads" in json.loads(proc.stdout.strip().splitlines()[-1])["error"]
