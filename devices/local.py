"""Profiling on this machine: each artifact is timed in a fresh child process (so load time and
peak memory are the model's own), after warm-up, with a fixed thread count."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

from edgesparse._io import sha256_file
from edgesparse.errors import EdgesparseError

RUNNERS = {".pte": "edgesparse.devices.pte_bench"}
RUNTIMES = ("python", "cpp")


def describe() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"device": "local", "cpu": cpu, "cores": os.cpu_count(), "machine": platform.machine(), "os": platform.platform()}


def summarize(times_ms: list[float]) -> dict:
    t = np.asarray(times_ms)
    return {
        "count": int(t.size), "mean_ms": float(t.mean()), "std_ms": float(t.std()), "min_ms": float(t.min()),
        "p50_ms": float(np.percentile(t, 50)), "p90_ms": float(np.percentile(t, 90)), "p99_ms": float(np.percentile(t, 99)),
    }


def _command(path: Path, runtime: str, runs: int, warmup: int, threads: int, min_seconds: float) -> list[str]:
    if runtime == "cpp":  # the torch-free C++ runner (runtime_kernels/runner), its own thread pool
        from edgesparse.runtime_kernels import RUNNER

        if not RUNNER.is_file():
            raise EdgesparseError("the C++ runner is not built", hint="run `make kernels`")
        return [str(RUNNER), str(path), "--runs", str(runs), "--warmup", str(warmup)]
    return [sys.executable, "-m", RUNNERS[path.suffix], str(path), "--runs", str(runs), "--warmup", str(warmup),
            "--threads", str(threads), "--min-seconds", str(min_seconds)]


def profile_local(artifact: str | Path, runs: int = 100, warmup: int = 10, threads: int = 1,
                  min_seconds: float = 0.0, timeout: float = 600, runtime: str = "python") -> dict:
    path = Path(artifact)
    if not path.is_file():
        raise EdgesparseError(f"artifact not found: {path}")
    runner = RUNNERS.get(path.suffix)
    if runner is None:
        raise EdgesparseError(f"cannot profile {path.name}: unsupported artifact type (supported: {', '.join(RUNNERS)})")
    if runs < 1 or warmup < 0 or threads < 1:
        raise EdgesparseError("--runs and --threads must be >= 1 and --warmup >= 0")
    if runtime not in RUNTIMES:
        raise EdgesparseError(f"unknown runtime {runtime!r} (available: {', '.join(RUNTIMES)})")
    cmd = _command(path, runtime, runs, warmup, threads, min_seconds)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise EdgesparseError(f"profiling {path.name} timed out after {timeout:.0f} s") from None
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if lines else {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    if "error" in result or proc.returncode:
        raise EdgesparseError(f"could not run {path.name} in ExecuTorch: {result.get('error', f'exit code {proc.returncode}')}")
    result.setdefault("threads", "runtime default" if runtime == "cpp" else threads)
    times = result.pop("times_ms")
    result.update(summarize(times))
    result.update(artifact=str(path), bytes=path.stat().st_size, sha256=sha256_file(path), device_info=describe())
    result["memory_note"] = ("peak_rss_mb is the runner process's VmHWM (runtime + model, mmapped weights counted once "
                             "touched; with the python runtime it includes the interpreter and torch, and "
                             "rss_before_load_mb is the level before the model was loaded)")
    return result
