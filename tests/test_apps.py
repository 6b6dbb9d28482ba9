"""Sample apps (apps/): the Android bundle of the C++ runner under qemu-aarch64, the Android app's
native layer through its JNI entry point, the Jetson app headless here; on the arm64 board, the
Jetson app over ssh and `profile` over adb with the bundle."""

import copy
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from edgesparse import runtime_kernels

ROOT = Path(__file__).resolve().parent.parent
NATIVE = ROOT / "apps" / "android" / "native"
BUNDLE = NATIVE / "build" / "edgesparse-bench"
APP = ROOT / "apps" / "jetson" / "app.py"
JNI = ROOT / "apps" / "android" / "app" / "app" / "src" / "main" / "cpp" / "bench_jni.cpp"


def missing(what: str, hint: str):
    if os.environ.get("CI"):
        pytest.fail(f"CI must have {what} ({hint})")
    pytest.skip(f"{what} missing ({hint})")


@pytest.fixture(scope="module")
def sparse(tmp_path_factory, digits):
    """demo:digits-cnn pruned to 90% block 4x1 (sparse kernels in both files), one input and the
    eager torch output for it."""
    from edgesparse import Recipe, compress, export_model
    from edgesparse.recipe import PruneConfig

    folder = tmp_path_factory.mktemp("sparse")
    recipe = Recipe(prune=PruneConfig(sparsity=0.9, pattern="block:4x1"))
    record = export_model(digits, recipe, folder, formats=["pte", "onnx"], finetune=False)
    assert any(layer["kernel"].startswith("edgesparse::") for layer in record["layers"])
    x = digits.sample_inputs[3][0]
    with torch.no_grad():
        want = compress(copy.deepcopy(digits.model), recipe).model.eval()(x)
    x.numpy().astype(np.float32).tofile(folder / "x.f32")
    return folder, want


def output(path: Path, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.fromfile(path, dtype=np.float32)).reshape(like.shape)


@pytest.fixture(scope="module")
def bundle():
    if not all(shutil.which(tool) for tool in ("aarch64-linux-gnu-g++", "qemu-aarch64")):
        missing("g++-aarch64-linux-gnu and qemu-user", "make arm-toolchain")
    if not (runtime_kernels.ARM_BUILD_DIR / "edgesparse_runner").is_file() and not os.environ.get("CI"):
        pytest.skip("the aarch64 runner is not built (make arm-runner)")
    proc = subprocess.run(["make", "-C", str(NATIVE)], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return BUNDLE


def test_android_bundle_is_self_contained_and_matches_torch_under_qemu(bundle, sparse, tmp_path):
    """Every library the runner loads comes from the bundle (glibc's loader included), and the
    runner's output on the sparse model equals torch's, started as a phone would start it."""
    folder, want = sparse
    loader, lib = bundle / "lib" / "ld-linux-aarch64.so.1", bundle / "lib"
    listing = subprocess.run(["qemu-aarch64", str(loader), "--list", "--library-path", str(lib),
                              str(bundle / "edgesparse_runner")], capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0, listing.stderr[-1000:]
    resolved = [line.split("=>")[1].split("(")[0].strip() for line in listing.stdout.splitlines() if "=>" in line]
    assert len(resolved) >= 10 and all(path.startswith(str(lib)) for path in resolved), listing.stdout

    runs = [["qemu-aarch64", "-cpu", "cortex-a53", str(loader), "--library-path", str(lib),
             str(bundle / "edgesparse_runner")]]
    if Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():  # the launcher itself, as on a phone
        runs.append(["sh", str(bundle / "edgesparse-bench")])
    for i, command in enumerate(runs):
        proc = subprocess.run([*command, str(folder / "model.pte"), "--runs", "2", "--warmup", "1", "--input",
                               str(folder / "x.f32"), "--output", str(tmp_path / f"y{i}.f32")],
                              capture_output=True, text=True, timeout=300, env={"PATH": os.environ["PATH"]})
        assert proc.returncode == 0, proc.stdout + proc.stderr[-1000:]
        assert json.loads(proc.stdout.splitlines()[-1])["runtime"] == "executorch-cpp"
        torch.testing.assert_close(output(tmp_path / f"y{i}.f32", want), want, rtol=1e-5, atol=1e-5)


def test_adb_aarch64_devices_get_the_bundle_or_a_hint(tmp_path, monkeypatch):
    from edgesparse.devices import remote
    from edgesparse.devices.transports import Adb
    from edgesparse.errors import EdgesparseError

    monkeypatch.setattr(remote, "ANDROID_BUNDLE", tmp_path / "edgesparse-bench")
    with pytest.raises(EdgesparseError, match="Android runner bundle is not built") as error:
        remote.runner_job(Adb("R58M1234"), "aarch64", "m.pte", 10, 1, 0.0)
    assert "make -C apps/android/native" in error.value.hint
    (tmp_path / "edgesparse-bench" / "lib").mkdir(parents=True)
    for name in ("edgesparse-bench", "edgesparse_runner", "lib/libc.so.6"):
        (tmp_path / "edgesparse-bench" / name).write_text("")
    files, command = remote.runner_job(Adb("R58M1234"), "aarch64", "m.pte", 10, 1, 0.0)
    assert sorted(name for _, name in files) == ["edgesparse-bench", "edgesparse_runner", "lib/libc.so.6"]
    assert command[:3] == ["sh", f"{remote.TMP}/edgesparse-bench", "m.pte"]


def test_android_app_native_layer_through_jni_matches_torch(sparse, tmp_path):
    """The app's JNI entry point (bench_jni.cpp) over bench_api.cpp, built for this machine and
    called from Java the way the Kotlin NativeBench object calls it."""
    javac = shutil.which("javac")
    if not (javac and shutil.which("java") and shutil.which("g++")):
        pytest.skip("needs a JDK (javac, java) and g++: apt-get install default-jdk-headless g++")
    folder, want = sparse
    proc = subprocess.run(["make", "-C", str(NATIVE), "host-api"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    jdk = Path(javac).resolve().parent.parent
    jni_lib = tmp_path / "libedgesparse_jni.so"
    subprocess.run(["g++", "-std=c++17", "-O2", "-shared", "-fPIC", "-o", str(jni_lib), str(JNI), f"-I{NATIVE}",
                    f"-I{jdk / 'include'}", f"-I{jdk / 'include' / 'linux'}", f"-L{NATIVE / 'build' / 'host'}",
                    "-ledgesparse_bench", f"-Wl,-rpath,{NATIVE / 'build' / 'host'}"], check=True, timeout=300)
    java = tmp_path / "org" / "edgesparse" / "bench" / "NativeBench.java"
    java.parent.mkdir(parents=True)
    java.write_text("package org.edgesparse.bench;\npublic class NativeBench {\n"
                    "  static native int run(String[] args, String jsonPath);\n"
                    "  public static void main(String[] a) {\n    System.load(a[0]);\n"
                    "    System.exit(run(java.util.Arrays.copyOfRange(a, 2, a.length), a[1]));\n  }\n}\n")
    args = [str(folder / "model.pte"), "--runs", "3", "--input", str(folder / "x.f32"), "--output", str(tmp_path / "y.f32")]
    proc = subprocess.run(["java", str(java), str(jni_lib), str(tmp_path / "out.json"), *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-1000:]
    result = json.loads((tmp_path / "out.json").read_text())
    assert len(result["times_ms"]) == 3 and result["peak_rss_mb"] > 0
    torch.testing.assert_close(output(tmp_path / "y.f32", want), want, rtol=1e-5, atol=1e-5)
    # a bad model: exit code 2 and the reason in the JSON, not a crash of the app's process
    (tmp_path / "bad.pte").write_bytes(b"not a program")
    proc = subprocess.run(["java", str(java), str(jni_lib), str(tmp_path / "bad.json"), str(tmp_path / "bad.pte")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "error" in json.loads((tmp_path / "bad.json").read_text())


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def check_app_result(result: dict, frames: int) -> None:
    assert result["frames"] == frames and result["fps"] > 0
    latency = result["latency_ms"]
    assert 0 < latency["min"] <= latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    assert 10 < result["peak_rss_mb"] < 4096
    assert 0 <= result["prediction"]["class"] < 10 and 0 < result["prediction"]["score"] <= 1


def run_app(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(APP), *args], capture_output=True, text=True, timeout=300, env=env)


def test_jetson_app_headless_onnx_and_pte_with_power(sparse, tmp_path):
    """The synthetic frame source through the sparse .onnx (ONNX Runtime + our op library) and the
    same model's .pte (the C++ runner): the same prediction; power from a stand-in tegrastats."""
    from device_lab import FAKE_TEGRASTATS

    if not runtime_kernels.RUNNER.is_file():
        runtime_kernels.build()
    folder, _ = sparse
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "tegrastats").write_text(FAKE_TEGRASTATS)
    (tmp_path / "bin" / "tegrastats").chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    results = {}
    for suffix, frames in (("onnx", 200), ("pte", 5)):
        proc = run_app(str(folder / f"model.{suffix}"), "--frames", str(frames), "--headless", "--json",
                       str(tmp_path / f"{suffix}.json"), env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        results[suffix] = result = json.loads((tmp_path / f"{suffix}.json").read_text())
        check_app_result(result, frames)
        assert result["source"] == "synthetic" and result["machine"] == os.uname().machine
    onnx = results["onnx"]
    assert onnx["provider"] == "CPUExecutionProvider" and onnx["op_library"].endswith("libedgesparse_ort.so")
    assert onnx["power"]["rail"] == "VDD_IN" and onnx["power"]["mean_power_mw"] == 5000
    assert results["pte"]["runtime"] == "executorch-cpp" and results["pte"]["runner_peak_rss_mb"] > 0
    # the 5th frame through both runtimes
    proc = run_app(str(folder / "model.onnx"), "--frames", "5", "--headless")
    onnx, pte = json.loads(proc.stdout)["prediction"], results["pte"]["prediction"]
    assert onnx["class"] == pte["class"] and onnx["score"] == pytest.approx(pte["score"], abs=1e-4)


def test_jetson_app_errors_are_one_line(tmp_path):
    (tmp_path / "m.tflite").write_bytes(b"")
    for args, message in ((["nope.onnx"], "no such model"), ([str(tmp_path / "m.tflite")], "expected a .onnx or a .pte")):
        proc = run_app(*args, "--headless")
        assert proc.returncode == 2 and proc.stdout == "" and message in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.slow
def test_jetson_app_and_adb_bundle_on_the_arm64_board(bundle, sparse, tmp_path, monkeypatch):
    """The arm64 Debian board (qemu-user): the Jetson app in the board's python3 with aarch64
    numpy + onnxruntime and our aarch64 op library, over ssh; then tests/adbd.py inside the board,
    and `profile --device adb://...` runs the .pte there through the Android bundle."""
    from device_lab import AdbDevice, free_port, start_arm64_board, stop_adb_device, stop_arm64_board

    from edgesparse.devices import parse_device, profile, remote

    folder, _ = sparse
    jobs = []  # what profile chose to push and run
    monkeypatch.setattr(remote, "runner_job", lambda *args, job=remote.runner_job: jobs.append(job(*args)) or jobs[-1])
    op_library = runtime_kernels.ARM_BUILD_DIR / "libedgesparse_ort.so"
    board = start_arm64_board(tmp_path / "board", packages=("numpy", "onnxruntime"))
    adb = None
    try:
        ssh = parse_device(board.sshd.spec)
        with ssh.temp_dir() as where:
            for local in (APP, folder / "model.onnx", op_library):
                ssh.push(local, f"{where}/{local.name}")
            ssh.run(["python3", f"{where}/app.py", f"{where}/model.onnx", "--frames", "5", "--headless", "--json",
                     f"{where}/out.json", "--op-library", f"{where}/{op_library.name}"], "running the app", 600)
            result = json.loads(ssh.run(["cat", f"{where}/out.json"], "reading the result").stdout)
        check_app_result(result, 5)
        assert result["machine"] == "aarch64" and result["op_library"].endswith(op_library.name)

        shutil.copy(ROOT / "tests" / "adbd.py", board.root / "root" / "adbd.py")
        port = free_port()
        daemon = subprocess.Popen(["chroot", str(board.root), "/usr/bin/python3", "/root/adbd.py", "--port", str(port)])
        adb = AdbDevice(port, daemon, free_port())
        os.environ["ANDROID_ADB_SERVER_PORT"] = str(adb.server_port)  # a private adb server
        deadline = time.monotonic() + 60  # python3 starts under emulation
        while time.monotonic() < deadline and not listening(port):
            time.sleep(0.2)
        profiled = profile(folder / "model.pte", adb.spec, runs=5, warmup=1)
    finally:
        if adb:
            stop_adb_device(adb)
        stop_arm64_board(board)
    assert jobs[0][1][:2] == ["sh", f"{remote.TMP}/edgesparse-bench"]  # the bundle, not the glibc-board runner
    assert profiled["runtime"] == "executorch-cpp" and profiled["count"] == 5
    assert profiled["device_state"]["before"]["machine"] == "aarch64" and profiled["timing_note"] == "emulated, not a speed"
