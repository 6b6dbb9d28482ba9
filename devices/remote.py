"""Profiling on a device reached through a transport (ssh today): push the torch-free C++ runner,
the libraries it needs that the device may lack, and the artifact into a fresh temp dir; run;
read the runner's JSON; remove the temp dir whatever happened.

The runner must match the device's architecture: this machine's build for a same-arch device,
a cross-built one for ARM boards (the apps issue builds a static aarch64 runner).
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

from edgesparse.devices.local import check_artifact, finish, parse_runner_output
from edgesparse.devices.tegrastats import energy_per_inference
from edgesparse.devices.transports import Transport
from edgesparse.errors import EdgesparseError

SYSTEM_LIB_DIRS = ("/lib", "/usr/lib", "/lib64", "/usr/lib64")

# sh -c RUN_WITH_TELEMETRY run DIR CMD...: CMD's exit status, with tegrastats (a Jetson) sampling
# every 100 ms into DIR/tegrastats.log while it runs
RUN_WITH_TELEMETRY = ('d="$1"; shift; t=; if command -v tegrastats >/dev/null 2>&1; then '
                      'tegrastats --interval 100 > "$d/tegrastats.log" 2>/dev/null & t=$!; fi; '
                      '"$@"; rc=$?; [ -n "$t" ] && kill "$t" 2>/dev/null; exit $rc')


def runner_bundle() -> list[Path]:
    """The C++ runner and the shared libraries it loads from outside the system directories
    (the ExecuTorch wheel's and our op library), as `ldd` resolves them here."""
    from edgesparse.runtime_kernels import RUNNER

    if not RUNNER.is_file():
        raise EdgesparseError("the C++ runner is not built", hint="run `make kernels`")
    out = subprocess.run(["ldd", str(RUNNER)], capture_output=True, text=True, check=True).stdout
    libs = [Path(parts[2]) for parts in (line.split() for line in out.splitlines())
            if len(parts) >= 3 and parts[1] == "=>" and parts[2].startswith("/") and not parts[2].startswith(SYSTEM_LIB_DIRS)]
    return [RUNNER, *libs]


def profile_remote(transport: Transport, artifact, runs: int = 100, warmup: int = 10, threads: int = 1,
                   min_seconds: float = 0.0, timeout: float = 600, runtime: str = "cpp",
                   cpus: list[int] | None = None) -> dict:
    if runtime != "cpp":
        raise EdgesparseError(f"on {transport.spec} the C++ runner runs the model (--runtime cpp), not {runtime!r}")
    path = check_artifact(artifact, runs, warmup, threads, runtime)
    bundle = runner_bundle()
    before = transport.info()
    here = platform.machine()
    if before.get("machine") != here:
        raise EdgesparseError(f"{transport.spec} is {before.get('machine', 'an unknown architecture')} but the runner "
                              f"built here is {here}", hint="profile with a runner built for the device")
    with transport.temp_dir() as tmp:
        transport.run(["mkdir", "-p", f"{tmp}/lib"], "preparing the temp dir", 60)
        for lib in bundle[1:]:
            transport.push(lib, f"{tmp}/lib/{lib.name}")
        transport.push(bundle[0], f"{tmp}/edgesparse_runner")
        transport.push(path, f"{tmp}/model{path.suffix}")
        transport.run(["chmod", "+x", f"{tmp}/edgesparse_runner"], "preparing the runner", 60)
        pin = ["taskset", "-c", ",".join(map(str, cpus))] if cpus else []
        proc = transport.run(["sh", "-c", RUN_WITH_TELEMETRY, "run", tmp, *pin, "env", f"LD_LIBRARY_PATH={tmp}/lib",
                              f"{tmp}/edgesparse_runner", f"{tmp}/model{path.suffix}", "--runs", str(runs),
                              "--warmup", str(warmup), "--min-seconds", str(min_seconds)], "running the model",
                             timeout, check=False)
        result = parse_runner_output(proc.stdout, proc.stderr, proc.returncode, path.name, f"on {transport.spec}")
        telemetry = transport.run(["sh", "-c", 'cat "$1" 2>/dev/null || true', "read", f"{tmp}/tegrastats.log"],
                                  "reading tegrastats", 60).stdout.splitlines()
    result.update(device=transport.spec, threads="runtime default")
    result = finish(result, path, before, transport.info())
    if energy := energy_per_inference(telemetry, result["mean_ms"]):
        result["energy"] = energy | {"note": "board input power (tegrastats, every 100 ms during the run, static power "
                                             "included) times the mean latency"}
    return result
