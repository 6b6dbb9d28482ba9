"""Profiling on a device reached through a transport (ssh, adb, serial, emulated): push what runs
the artifact (.pte: the torch-free C++ runner and the libraries it needs that the device may lack;
.onnx: device_bench.py and our ONNX Runtime op library) and the artifact into a fresh temp dir;
run; read the JSON; remove the temp dir whatever happened.

The runner is picked by the device's architecture: this machine's build for a same-arch device,
the cross-built aarch64 one (`make arm-runner`, dynamic against glibc: Jetson, Raspberry Pi OS,
Debian boards) for aarch64 Linux. An aarch64 adb device (Android: bionic cannot load glibc programs)
gets the self-contained bundle of apps/android/native, glibc's own loader and libraries included.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from edgesparse.devices.local import check_artifact, check_threads, finish, parse_runner_output
from edgesparse.devices.tegrastats import energy_per_inference
from edgesparse.devices.transports import Adb, Transport
from edgesparse.errors import EdgesparseError

# sh -c RUN_WITH_TELEMETRY run DIR CMD...: CMD's exit status, with tegrastats (a Jetson) sampling
# every 100 ms into DIR/tegrastats.log while it runs
RUN_WITH_TELEMETRY = ('d="$1"; shift; t=; if command -v tegrastats >/dev/null 2>&1; then '
                      'tegrastats --interval 100 > "$d/tegrastats.log" 2>/dev/null & t=$!; fi; '
                      '"$@"; rc=$?; [ -n "$t" ] && kill "$t" 2>/dev/null; exit $rc')


def _needed(binary: Path) -> list[str]:
    out = subprocess.run(["readelf", "-d", str(binary)], capture_output=True, text=True, check=True).stdout
    return [line.split("[", 1)[1].split("]", 1)[0] for line in out.splitlines() if "(NEEDED)" in line]


def runner_bundle(machine: str, system: Path | None = None) -> list[Path]:
    """The C++ runner for `machine` and the shared libraries it needs from its build (our op
    library, the executorch wheel's), found by following ELF NEEDED entries; anything else is
    expected from the device's system (libc, libstdc++), or taken from `system` (a sysroot's lib
    folder, glibc's loader included) when given."""
    import platform

    from edgesparse import runtime_kernels as rk

    if machine == platform.machine():
        import executorch

        runner, search = rk.RUNNER, [rk.BUILD_DIR, Path(list(executorch.__path__)[0]) / "lib"]
        hint = "run `make kernels`"
    elif machine == "aarch64":
        runner, search = rk.ARM_BUILD_DIR / "edgesparse_runner", [rk.ARM_BUILD_DIR, rk.ARM_ET_ROOT / "lib"]
        hint = "run `make arm-runner`"
    else:
        raise EdgesparseError(f"no C++ runner for {machine} devices (this machine builds {platform.machine()} and aarch64)")
    if not runner.is_file():
        raise EdgesparseError(f"the {machine} C++ runner is not built", hint=hint)
    search += [system] if system else []
    libs: dict[str, Path] = {}
    todo = [runner]
    while todo:
        for name in _needed(todo.pop()):
            found = next((d / name for d in search if (d / name).is_file()), None)
            if found and name not in libs:
                libs[name] = found
                todo.append(found)
    return [runner, *libs.values()]


def looks_emulated(state: dict) -> bool:
    """An ARM userland on an x86 CPU: qemu-user (binfmt) passes the host's /proc/cpuinfo through."""
    import re

    return state.get("machine", "").startswith(("aarch64", "arm")) and bool(re.search(r"Intel|AMD|x86", state.get("cpu", "")))


def ort_library(machine: str) -> Path | None:
    """Our ONNX Runtime op library built for `machine`, if it is built."""
    import platform

    from edgesparse import runtime_kernels as rk

    library = rk.ORT_LIBRARY if machine == platform.machine() else rk.ARM_BUILD_DIR / "libedgesparse_ort.so"
    return library if machine in (platform.machine(), "aarch64") and library.is_file() else None


TMP = "{tmp}"  # stands for the device's temp dir in the file lists and commands below
# `make -C apps/android/native`: the aarch64 runner with every library it loads and a launcher
ANDROID_BUNDLE = Path(__file__).resolve().parent.parent / "apps" / "android" / "native" / "build" / "edgesparse-bench"


def runner_job(transport: Transport, machine: str, model: str, runs: int, warmup: int, min_seconds: float,
               threads: int = 1) -> tuple[list[tuple[Path, str]], list[str]]:
    """.pte: the C++ runner and its libraries (files to push, command); on an aarch64 adb device,
    the Android bundle (its launcher passes every argument on), which never touches the system's
    loader or libraries. --threads sizes the runner's ExecuTorch thread pool."""
    args = [model, "--runs", str(runs), "--warmup", str(warmup), "--min-seconds", str(min_seconds),
            "--threads", str(threads)]
    if isinstance(transport, Adb) and machine == "aarch64":
        if not (ANDROID_BUNDLE / "edgesparse-bench").is_file():
            raise EdgesparseError("the Android runner bundle is not built", hint="run `make -C apps/android/native`")
        files = [(p, p.relative_to(ANDROID_BUNDLE).as_posix()) for p in sorted(ANDROID_BUNDLE.rglob("*")) if p.is_file()]
        return files, ["sh", f"{TMP}/edgesparse-bench", *args]
    bundle = runner_bundle(machine)
    files = [(bundle[0], "edgesparse_runner"), *((lib, f"lib/{lib.name}") for lib in bundle[1:])]
    return files, ["env", f"LD_LIBRARY_PATH={TMP}/lib", *transport.runner_prefix(), f"{TMP}/edgesparse_runner", *args]


def python_job(transport: Transport, machine: str, model: str, runs: int, warmup: int, min_seconds: float,
               threads: int = 1) -> tuple[list[tuple[Path, str]], list[str]]:
    """.onnx: device_bench.py, run by the device's python3 with its onnxruntime, and our op library
    for the device's architecture when it is built (files to push, command)."""
    probe = transport.run(["python3", "-c", "import numpy, onnxruntime"], "looking for python3 with onnxruntime",
                          120, check=False)
    if probe.returncode:
        raise EdgesparseError(f"{transport.spec} has no python3 with numpy and onnxruntime to run {Path(model).name}",
                              hint="pip install onnxruntime on the device")
    files = [(Path(__file__).with_name("device_bench.py"), "device_bench.py")]
    command = ["python3", f"{TMP}/device_bench.py", model, "--runs", str(runs), "--warmup", str(warmup),
               "--threads", str(threads), "--min-seconds", str(min_seconds)]
    if library := ort_library(machine):
        files.append((library, library.name))
        command += ["--op-library", f"{TMP}/{library.name}"]
    return files, command


def profile_remote(transport: Transport, artifact, runs: int = 100, warmup: int = 10, threads: int = 1,
                   min_seconds: float = 0.0, timeout: float = 600, runtime: str | None = None,
                   cpus: list[int] | None = None, per_op: bool = False) -> dict:
    """.pte: the C++ runner; .onnx: device_bench.py in the device's python3 with onnxruntime."""
    if per_op:
        raise EdgesparseError(f"per-operator times are measured here only (--device local), not on {transport.spec}")
    if str(artifact).endswith(".tflite"):
        raise EdgesparseError(f"no .tflite runner for {transport.spec} yet (the C++ runner and the device bundle run .pte)",
                              hint="profile the .tflite here (--device local), or the .pte / .onnx on the device")
    onnx = str(artifact).endswith(".onnx")
    runtime = runtime or ("python" if onnx else "cpp")
    if runtime != ("python" if onnx else "cpp"):
        raise EdgesparseError(f"on {transport.spec}, .pte files run in the C++ runner and .onnx files in python3 "
                              f"(got --runtime {runtime})")
    path = check_artifact(artifact, runs, warmup, threads, runtime)
    before = transport.info()
    machine, model = before.get("machine", "unknown"), f"{TMP}/model{path.suffix}"
    files, command = (python_job(transport, machine, model, runs, warmup, min_seconds, threads) if onnx
                      else runner_job(transport, machine, model, runs, warmup, min_seconds, threads))
    with transport.temp_dir() as tmp:
        transport.run(["mkdir", "-p", f"{tmp}/lib"], "preparing the temp dir", 60)
        for local, name in [*files, (path, f"model{path.suffix}")]:
            transport.push(local, f"{tmp}/{name}")
        transport.run(["chmod", "+x", *(f"{tmp}/{name}" for _, name in files)], "preparing the runner", 60)
        pin = ["taskset", "-c", ",".join(map(str, cpus))] if cpus else []
        proc = transport.run(["sh", "-c", RUN_WITH_TELEMETRY, "run", tmp, *pin, *(a.replace(TMP, tmp) for a in command)],
                             "running the model", timeout, check=False)
        result = parse_runner_output(proc.stdout, proc.stderr, proc.returncode, path.name, f"on {transport.spec}")
        telemetry = transport.run(["sh", "-c", 'cat "$1" 2>/dev/null || true', "read", f"{tmp}/tegrastats.log"],
                                  "reading tegrastats", 60).stdout.splitlines()
    check_threads(result, threads, path.name, f"on {transport.spec}")
    result["device"] = transport.spec
    if transport.emulated or looks_emulated(before):
        result["timing_note"] = "emulated, not a speed"
    result = finish(result, path, before, transport.info())
    if energy := energy_per_inference(telemetry, result["mean_ms"]):
        result["energy"] = energy | {"note": "board input power (tegrastats, every 100 ms during the run, static power "
                                             "included) times the mean latency"}
    return result
