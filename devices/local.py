"""Profiling on this machine: each artifact is timed in a fresh child process (so load time and
peak memory are the model's own), after warm-up, with a fixed thread count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from edgesparse._io import sha256_file
from edgesparse.errors import EdgesparseError

RUNNERS = {".pte": "edgesparse.devices.child", ".onnx": "edgesparse.devices.child", ".tflite": "edgesparse.devices.child"}
RUNTIMES = ("python", "cpp")


def summarize(times_ms: list[float]) -> dict:
    t = np.asarray(times_ms)
    return {
        "count": int(t.size), "mean_ms": float(t.mean()), "std_ms": float(t.std()), "min_ms": float(t.min()),
        **{f"p{q}_ms": float(np.percentile(t, q)) for q in (50, 90, 95, 99)},
    }


def parse_runner_output(stdout: str, stderr: str, returncode: int, name: str, where: str) -> dict:
    """The runner's last JSON line, or a one-line error saying why there is none."""
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    try:
        result = json.loads(lines[-1]) if lines else {}
    except ValueError:
        result = {}
    if "error" in result:
        raise EdgesparseError(f"could not run {name} {where}: {result['error']}")
    if returncode or "times_ms" not in result:
        why = f"killed by signal {returncode - 128}" if returncode > 128 else f"exit code {returncode}"
        last = stderr.strip().splitlines()[-1] if stderr.strip() else "no output"
        raise EdgesparseError(f"the runner for {name} {where} failed ({why}): {last}")
    return result


def check_threads(result: dict, threads: int, name: str, where: str) -> None:
    """Every runner reports the thread count its runtime actually uses; a run at any other count
    than the one asked for is an error, never a result."""
    got = result.get("threads")
    if got is None:
        raise EdgesparseError(f"the runner for {name} {where} did not report its thread count",
                              hint="rebuild it (`make kernels`, `make arm-runner`)")
    if got != threads:
        raise EdgesparseError(f"{name} {where} ran on {got} threads, not the {threads} asked for")


def finish(result: dict, path: Path, state_before: dict, state_after: dict) -> dict:
    """Add the statistics, the artifact's identity and the device state around the run."""
    result.update(summarize(result.pop("times_ms")))
    result.update(artifact=str(path), bytes=path.stat().st_size, sha256=sha256_file(path),
                  device_state={"before": state_before, "after": state_after})
    result["memory_note"] = ("peak_rss_mb is the runner process's VmHWM (runtime + model, mmapped weights counted once "
                             "touched; with the python runtime it includes the interpreter and torch, and "
                             "rss_before_load_mb is the level before the model was loaded)")
    return result


def check_artifact(artifact: str | Path, runs: int, warmup: int, threads: int, runtime: str) -> Path:
    path = Path(artifact)
    if not path.is_file():
        raise EdgesparseError(f"artifact not found: {path}")
    if path.suffix not in RUNNERS:
        raise EdgesparseError(f"cannot profile {path.name}: unsupported artifact type (supported: {', '.join(RUNNERS)})")
    if runs < 1 or warmup < 0 or threads < 1:
        raise EdgesparseError("--runs and --threads must be >= 1 and --warmup >= 0")
    if runtime not in RUNTIMES:
        raise EdgesparseError(f"unknown runtime {runtime!r} (available: {', '.join(RUNTIMES)})")
    if runtime == "cpp" and path.suffix != ".pte":
        raise EdgesparseError(f"the C++ runner runs .pte files, not {path.name}", hint=f"profile {path.suffix} with --runtime python")
    return path


def _command(path: Path, runtime: str, runs: int, warmup: int, threads: int, min_seconds: float, per_op: bool) -> list[str]:
    if runtime == "cpp":  # the torch-free C++ runner (runtime_kernels/runner), its pool sized by --threads
        from edgesparse.runtime_kernels import RUNNER

        if not RUNNER.is_file():
            raise EdgesparseError("the C++ runner is not built", hint="run `make kernels`")
        return [str(RUNNER), str(path), "--runs", str(runs), "--warmup", str(warmup), "--min-seconds", str(min_seconds),
                "--threads", str(threads)]
    return [sys.executable, "-m", RUNNERS[path.suffix], str(path), "--runs", str(runs), "--warmup", str(warmup),
            "--threads", str(threads), "--min-seconds", str(min_seconds)] + (["--per-op"] if per_op else [])


def profile_local(artifact: str | Path, runs: int = 100, warmup: int = 10, threads: int = 1,
                  min_seconds: float = 0.0, timeout: float = 600, runtime: str = "python",
                  cpus: list[int] | None = None, per_op: bool = False) -> dict:
    from edgesparse.devices.transports import Local

    path = check_artifact(artifact, runs, warmup, threads, runtime)
    if per_op and runtime == "cpp":
        raise EdgesparseError("per-operator times come from the python runtime (ETDump) or ONNX Runtime, not the C++ runner")
    if per_op and path.suffix == ".tflite":
        raise EdgesparseError("per-operator times are not available for .tflite (LiteRT's Python API has no profiler)",
                              hint="profile the .pte or .onnx with --per-op")
    cmd = _command(path, runtime, runs, warmup, threads, min_seconds, per_op)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    before = Local().info()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, preexec_fn=pin)
    except subprocess.TimeoutExpired:
        raise EdgesparseError(f"profiling {path.name} timed out after {timeout:.0f} s") from None
    except subprocess.SubprocessError as exc:  # the affinity could not be set
        raise EdgesparseError(f"cannot pin the runner to CPUs {cpus}: {exc}") from None
    where = {".onnx": "in ONNX Runtime", ".tflite": "in LiteRT"}.get(path.suffix, "in ExecuTorch")
    result = parse_runner_output(proc.stdout, proc.stderr, proc.returncode, path.name, where)
    check_threads(result, threads, path.name, where)
    return finish(result, path, before, Local().info())
