"""Device transports and remote profiling against real components: an sshd on 127.0.0.1 started
here (throwaway keys, host keys checked), the real ssh client, the C++ runner."""

import glob
import json
import os
import subprocess
import sys

import pytest

from edgesparse.devices import parse_device, profile
from edgesparse.devices.transports import Local, parse_state
from edgesparse.errors import EdgesparseError
from device_lab import (free_port, start_adb_device, start_arm64_board, start_serial_agent, start_sshd, stop,
                        stop_adb_device, stop_arm64_board, stop_serial_agent)

PROFILE_FIELDS = {"load_ms", "first_run_ms", "count", "mean_ms", "std_ms", "min_ms", "p50_ms", "p90_ms", "p95_ms",
                  "p99_ms", "peak_rss_mb", "bytes", "sha256", "device_state", "memory_note", "runtime"}


HOSTILE_NAME = "a b; touch pwned; $(touch pwned2) 'q\""


def check_file_round_trip(device, remote: str, name: str, tmp_path, size: int) -> None:
    """Push `size` bytes to remote/name (a name a shell would split), find exactly that one file
    there, pull it back unchanged."""
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(range(256)) * (size // 256))
    device.push(src, f"{remote}/{name}")
    assert device.run(["ls", "-A", remote], "listing").stdout.splitlines() == [name]
    device.pull(f"{remote}/{name}", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    stop(server.process)


@pytest.fixture(scope="module")
def adb_device():
    device = start_adb_device()
    yield device
    stop_adb_device(device)


@pytest.fixture(scope="module")
def serial_board():
    board = start_serial_agent()
    yield board
    stop_serial_agent(board)


@pytest.fixture(scope="module")
def jetson(tmp_path_factory):
    """An ssh 'board' whose sessions have a (stand-in) tegrastats on their PATH."""
    server = start_sshd(tmp_path_factory.mktemp("jetson"), jetson=True)
    yield server
    stop(server.process)


@pytest.fixture(scope="module")
def pte(tmp_path_factory, digits):
    from edgesparse import Recipe, export_model
    from edgesparse.recipe import PruneConfig

    folder = tmp_path_factory.mktemp("export")
    export_model(digits, Recipe(prune=PruneConfig(sparsity=0.9, pattern="block:4x1")), folder, finetune=False)
    return folder / "model.pte"


def test_device_specs_parse_or_fail_in_one_line():
    assert isinstance(parse_device("local"), Local)
    ssh = parse_device("ssh://nvidia@jetson.local:2222?identity=/k&timeout=3")
    assert (ssh.user, ssh.host, ssh.port, ssh.identity, ssh.connect_timeout) == ("nvidia", "jetson.local", 2222, "/k", 3.0)
    assert parse_device("ssh://board").port == 22
    assert parse_device("serial:///dev/ttyUSB0?baud=921600").baud == 921600
    assert parse_device("adb://R58M1234").serial == "R58M1234"
    assert parse_device("qemu-aarch64:cortex-a53").cpu == "cortex-a53" and parse_device("qemu-aarch64").cpu == "max"
    for bad, why in (("toaster", "unknown device"), ("ssh://h?color=red", "unknown ssh option"), ("ssh://h:x", "bad port"),
                     ("serial:///dev/ttyS0?baud=fast", "bad serial options")):
        with pytest.raises(EdgesparseError, match=why):
            parse_device(bad)


def test_local_profile_of_onnx_and_pte_has_the_fields(digits, tmp_path):
    from edgesparse import Recipe, export_model
    from edgesparse.recipe import PruneConfig

    export_model(digits, Recipe(prune=PruneConfig(sparsity=0.9, pattern="block:4x1")), tmp_path, formats=["pte", "onnx"],
                 finetune=False)
    for name, runtime in (("model.onnx", "onnxruntime"), ("model.pte", "executorch-python")):
        result = profile(tmp_path / name, "local", runs=20, warmup=2)
        assert PROFILE_FIELDS <= result.keys() and result["runtime"] == runtime and result["count"] == 20
    with pytest.raises(EdgesparseError, match="the C\\+\\+ runner runs .pte files"):
        profile(tmp_path / "model.onnx", "local", runtime="cpp")
    # per-operator times: ORT's node profile names our ai.edgesparse nodes; ETDump has XNNPACK's ops
    # and OPERATOR_CALL for the non-delegated edgesparse:: kernels
    onnx_ops = profile(tmp_path / "model.onnx", "local", runs=10, per_op=True)["per_op"]
    assert {"BcsrConv1x1", "Conv"} <= {row["op"] for row in onnx_ops} and all(row["calls"] == 10 for row in onnx_ops)
    pte_ops = profile(tmp_path / "model.pte", "local", runs=10, per_op=True)["per_op"]
    assert {"DELEGATE_CALL", "OPERATOR_CALL"} <= {row["name"] for row in pte_ops} and all(r["median_ms"] >= 0 for r in pte_ops)


def test_bench_runner_reports_profile_and_bare_loop_from_one_run(pte):
    from edgesparse.bench import bench_runner

    result = bench_runner(pte, rounds=2, runs=30, warmup=3)
    assert len(result["per_round"]["profile"]) == len(result["per_round"]["bare"]) == 2
    assert result["profile_p50_ms"] > 0 and result["bare_loop_p50_ms"] > 0
    assert result["overhead_pct"] == pytest.approx(100 * (result["profile_p50_ms"] / result["bare_loop_p50_ms"] - 1))


def test_compare_reports_deltas_and_the_noise_band(tmp_path):
    from edgesparse.devices.compare import compare

    base = {"p50_ms": 1.0, "p90_ms": 1.2, "p99_ms": 1.5, "mean_ms": 1.05, "min_ms": 0.9, "std_ms": 0.1, "count": 100,
            "load_ms": 5.0, "first_run_ms": 2.0, "peak_rss_mb": 50.0}
    fast = dict(base, p50_ms=0.5, peak_rss_mb=40.0)
    same = dict(base, p50_ms=1.01)
    assert compare(base, fast)["verdict"] == "B is faster" and compare(base, fast)["speedup_p50"] == 2.0
    assert compare(base, same)["verdict"] == "within noise"  # 0.01 ms < 2 * 1.2533 * 0.1 / 10 * sqrt(2)
    rss = next(r for r in compare(base, fast)["rows"] if r["metric"] == "peak_rss_mb")
    assert rss["delta"] == -10 and rss["delta_pct"] == -20
    (tmp_path / "a.json").write_text(json.dumps(base))
    (tmp_path / "b.json").write_text(json.dumps(fast))
    (tmp_path / "bad.json").write_text("[1, 2]")
    cli = [sys.executable, "-m", "edgesparse.cli", "compare"]
    proc = subprocess.run([*cli, str(tmp_path / "a.json"), str(tmp_path / "b.json")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "B is faster" in proc.stdout
    proc = subprocess.run([*cli, str(tmp_path / "a.json"), str(tmp_path / "bad.json")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "not an `edgesparse profile --json` result" in proc.stderr


def test_modes_set_floors_and_cpus_pin_the_runner(pte, sshd):
    quick = profile(pte, "local", mode="quick", runs=5, warmup=1, runtime="cpp", cpus=[0])
    assert quick["count"] >= 50 and sum([quick["mean_ms"]] * quick["count"]) >= 900  # >= 1 s of timed runs
    assert quick["mode"] == "quick" and quick["cpus"] == [0]
    remote = profile(pte, sshd.spec, runs=30, warmup=1, cpus=[0])
    assert remote["count"] == 30 and remote["cpus"] == [0]
    with pytest.raises(EdgesparseError, match="unknown mode"):
        profile(pte, "local", mode="forever")
    with pytest.raises(EdgesparseError, match="per-operator times are measured here only"):
        profile(pte, sshd.spec, per_op=True)


def test_devices_lists_local_and_the_configured_ssh_hosts(tmp_path):
    from edgesparse.devices.transports import ssh_config_hosts

    config = tmp_path / "config"
    config.write_text("Host jetson orin-*\n  HostName 10.0.0.5\nHost *\n  ServerAliveInterval 5\nhost pi\n")
    assert ssh_config_hosts(config) == ["jetson", "pi"]
    proc = subprocess.run([sys.executable, "-m", "edgesparse.cli", "devices"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "local" in proc.stdout


def test_device_state_script_runs_here():
    state = Local().info()
    assert state["machine"] and state["cores"] >= 1 and state["mem_total_kb"] > 0
    assert parse_state("temps_milli_c=41000 39500 \ncores=8\ngovernor=\n") == {"temps_c": [41.0, 39.5], "cores": 8}


def test_ssh_transport_quotes_arguments_and_moves_files(sshd, tmp_path):
    device = parse_device(sshd.spec)
    with device.temp_dir() as remote:
        check_file_round_trip(device, remote, HOSTILE_NAME, tmp_path, 25600)
        assert device.run(["sh", "-c", "ls pwned pwned2"], "checking", check=False).returncode != 0  # nothing else ran
        assert device.run(["sh", "-c", "exit 3"], "exiting", check=False).returncode == 3
    assert device.run(["test", "-e", remote], "checking", check=False).returncode == 1  # temp dir removed


@pytest.mark.slow
def test_profile_over_ssh_reports_the_fields_and_cleans_up(sshd, pte, tmp_path):
    before = set(glob.glob("/tmp/edgesparse.*"))
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, "-m", "edgesparse.cli", "profile", str(pte), "--device", sshd.spec,
                           "--runs", "20", "--warmup", "2", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-1500:]
    result = json.loads(out.read_text())
    assert PROFILE_FIELDS <= result.keys()
    assert result["runtime"] == "executorch-cpp" and result["count"] >= 20 and result["device"] == sshd.spec.split("?")[0]
    assert 0 < result["min_ms"] <= result["p50_ms"] <= result["p95_ms"] <= result["p99_ms"]
    assert result["device_state"]["before"]["cores"] >= 1 and "machine" in result["device_state"]["after"]
    assert set(glob.glob("/tmp/edgesparse.*")) == before  # the remote temp dir is gone


def test_adb_transport_against_the_real_client(adb_device, pte, tmp_path):
    """The real adb client and server, our adbd on the other end: shell v2 exit codes and
    stderr, quoting, push/pull of odd names, profile, and a dead device."""
    device = parse_device(adb_device.spec)
    result = device.run(["sh", "-c", "echo out; echo err >&2; exit 3"], "trying", check=False)
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n")
    with device.temp_dir() as remote:
        check_file_round_trip(device, remote, HOSTILE_NAME, tmp_path, 1_024_000)
    assert device.run(["test", "-e", remote], "checking", check=False).returncode == 1
    profiled = profile(pte, adb_device.spec, runs=20, warmup=2)
    assert PROFILE_FIELDS <= profiled.keys() and profiled["count"] >= 20 and profiled["device"] == adb_device.spec
    with pytest.raises(EdgesparseError, match="adb could not reach the device"):
        parse_device(f"adb://127.0.0.1:{free_port()}").run(["true"], "connecting")


@pytest.mark.slow
def test_profile_over_ssh_on_an_arm64_debian_board(pte, tmp_path):
    """The Jetson stand-in: an arm64 Debian rootfs under qemu-user with its own sshd and aarch64
    numpy + onnxruntime; profiling pushes the aarch64 runner (for the .pte) or device_bench.py and
    our aarch64 ORT op library (for the .onnx with ai.edgesparse nodes) over ssh and runs them there."""
    onnx_path = pte.with_suffix(".onnx")
    if not onnx_path.is_file():
        from edgesparse import Recipe, export_model
        from edgesparse.recipe import PruneConfig
        from edgesparse.models import load_model

        export_model(load_model("demo:digits-cnn"), Recipe(prune=PruneConfig(sparsity=0.9, pattern="block:4x1")),
                     tmp_path / "onnx", formats=["onnx"], finetune=False)
        onnx_path = tmp_path / "onnx" / "model.onnx"
    board = start_arm64_board(tmp_path / "board", packages=("numpy", "onnxruntime"))
    try:
        results = [profile(artifact, board.sshd.spec, runs=10, warmup=1) for artifact in (pte, onnx_path)]
    finally:
        stop_arm64_board(board)
    assert [r["runtime"] for r in results] == ["executorch-cpp", "onnxruntime"]
    for result in results:
        assert PROFILE_FIELDS <= result.keys() and result["count"] == 10
        assert result["device_state"]["before"]["machine"] == "aarch64" and result["timing_note"] == "emulated, not a speed"


@pytest.mark.parametrize("cpu", ["cortex-a53", "cortex-a76"])
def test_profile_on_the_emulated_arm64_board(pte, cpu):
    from edgesparse import runtime_kernels

    if not (runtime_kernels.ARM_BUILD_DIR / "edgesparse_runner").is_file():
        if os.environ.get("CI"):
            pytest.fail("CI must build the aarch64 runner (make arm-runner)")
        pytest.skip("the aarch64 runner is not built (make arm-runner)")
    result = profile(pte, f"qemu-aarch64:{cpu}", runs=10, warmup=1)
    assert PROFILE_FIELDS <= result.keys() and result["count"] == 10
    assert result["timing_note"] == "emulated, not a speed"
    assert result["device_state"]["before"]["machine"] == "aarch64" and cpu in result["device_state"]["before"]["cpu"]


def test_serial_transport_runs_and_moves_files(serial_board, tmp_path):
    """pyserial over a pty pair, devices/agent.py on the other end: the same interface as ssh."""
    device = parse_device(serial_board.spec)
    assert device.run(["sh", "-c", "echo hi; exit 4"], "trying", check=False).returncode == 4
    with device.temp_dir() as remote:
        check_file_round_trip(device, remote, "x y;z", tmp_path, 1_024_000)


@pytest.mark.slow
def test_profile_over_serial(serial_board, pte):
    """The runner and its libraries (~15 MB) cross the line base64-encoded: slow by design."""
    result = profile(pte, serial_board.spec, runs=20, warmup=2)
    assert PROFILE_FIELDS <= result.keys() and result["count"] >= 20 and result["device"].startswith("serial://")


def test_serial_with_no_agent_fails_in_one_line(tmp_path):
    import os
    import tty

    from edgesparse.devices.transports import Serial

    master, slave = os.openpty()  # a line with nobody on the other end
    tty.setraw(slave)
    try:
        with pytest.raises(EdgesparseError, match="no answer from the agent within 1 s"):
            Serial(os.ttyname(slave))._ask({"op": "ping"}, 1, "connecting")
        with pytest.raises(EdgesparseError, match="serial link failed"):
            parse_device("serial:///dev/nonexistent-tty").run(["true"], "connecting")
    finally:
        os.close(master)
        os.close(slave)


def test_jetson_energy_per_inference_from_tegrastats(jetson, pte):
    result = profile(pte, jetson.spec, runs=3000, warmup=5)  # long enough for a few 100 ms samples
    energy = result["energy"]
    assert energy["rail"] == "VDD_IN" and energy["samples"] >= 1 and energy["mean_power_mw"] == 5000
    assert energy["energy_per_inference_mj"] == pytest.approx(5000 * result["mean_ms"] / 1000)


def test_tegrastats_lines_of_r32_r35_and_r36_boards():
    from edgesparse.devices.tegrastats import energy_per_inference, parse_line

    orin_nano = ("11-22-2026 11:20:01 RAM 3105/7620MB (lfb 12x4MB) SWAP 0/3810MB (cached 0MB) CPU [12%@1510,3%@1510,off] "
                 "GR3D_FREQ 0% cpu@48.5C soc2@47.25C gpu@47.093C tj@48.5C VDD_IN 5104mW/4987mW VDD_CPU_GPU_CV 842mW/801mW "
                 "VDD_SOC 1457mW/1440mW")
    agx_root = ("11-22-2026 11:20:01 RAM 9000/30536MB (lfb 2x4MB) SWAP 0/15268MB (cached 0MB) CPU [1%@2201,0%@2201] "
                "EMC_FREQ 3%@2133 GR3D_FREQ 41%@[305,305] VIC_FREQ 115 APE 174 CV0@-256C cpu@45.1C "
                "VDD_GPU_SOC 3000mW/2900mW VDD_CPU_CV 800mW/790mW VIN_SYS_5V0 4000mW/3900mW NC 0mW/0mW")
    nano_r32 = ("RAM 1500/3964MB (lfb 300x4MB) SWAP 0/1982MB (cached 0MB) IRAM 0/252kB(lfb 252kB) CPU [5%@102,off] "
                "EMC_FREQ 0%@1600 GR3D_FREQ 0%@76 APE 25 PLL@30C CPU@32.5C thermal@31.75C POM_5V_IN 2130/2130 POM_5V_CPU 205/205")
    a = parse_line(orin_nano)
    assert a["ram_used_mb"] == 3105 and a["cpu"] == [{"load_pct": 12, "mhz": 1510}, {"load_pct": 3, "mhz": 1510}, None]
    assert a["temps_c"]["tj"] == 48.5 and a["rails"]["VDD_SOC"] == {"mw": 1457, "avg_mw": 1440}
    b = parse_line(agx_root)
    assert b["gpu_load_pct"] == 41 and "CV0" not in b["temps_c"] and "NC" not in b["rails"]
    c = parse_line(nano_r32)
    assert c["rails"]["POM_5V_IN"]["mw"] == 2130 and c["temps_c"]["thermal"] == 31.75 and "IRAM" not in c["rails"]
    assert parse_line("tegrastats: command not found") is None
    assert energy_per_inference([orin_nano, orin_nano.replace("VDD_IN 5104", "VDD_IN 5296")], 2.0)["energy_per_inference_mj"] == 10.4
    assert energy_per_inference([agx_root], 1.0)["rail"] == "VIN_SYS_5V0"
    assert energy_per_inference([nano_r32], 1.0)["rail"] == "POM_5V_IN"
    assert energy_per_inference(["garbage"], 1.0) is None


def test_a_model_the_runner_rejects_fails_cleanly_over_ssh(sshd, pte, tmp_path):
    before = set(glob.glob("/tmp/edgesparse.*"))
    truncated = tmp_path / "truncated.pte"
    truncated.write_bytes(pte.read_bytes()[:2000])
    with pytest.raises(EdgesparseError, match=r"could not run truncated.pte on ssh://.*: "):
        profile(truncated, sshd.spec, runs=2)
    assert set(glob.glob("/tmp/edgesparse.*")) == before


def test_profile_on_an_unknown_host_key_or_dead_device_fails_cleanly(sshd, pte, tmp_path):
    untrusted = tmp_path / "empty_known_hosts"
    untrusted.write_text("")
    spec = sshd.spec.replace(str(sshd.known_hosts), str(untrusted))
    with pytest.raises(EdgesparseError, match="ssh could not reach the device: Host key verification failed"):
        profile(pte, spec, runs=2)
    dead = sshd.spec.replace(f":{sshd.port}?", f":{free_port()}?")
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, "-m", "edgesparse.cli", "profile", str(pte), "--device", dead, "--json", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Connection refused" in proc.stderr.strip().splitlines()[-1]
    assert not out.exists() and not list(tmp_path.glob("*.part"))


@pytest.mark.slow
def test_sweep_writes_rows_table_and_plot_and_resumes(tmp_path):
    from edgesparse.devices.sweep import read_rows, sweep

    out = tmp_path / "sweep"
    rows = sweep("demo:digits-cnn", [0.0, 0.9], ["none"], ["pte"], "local", out, runs=5, warmup=1, finetune_steps=0)
    assert [(r["prune"], r["format"]) for r in rows] == [(0.0, "pte"), (0.9, "pte")]
    assert all({"accuracy", "p50_ms", "bytes", "peak_rss_mb"} <= r.keys() for r in rows)
    assert rows[1]["sparse_layers"] > 0 and rows[1]["bytes"] < rows[0]["bytes"]
    png = (out / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    lines = (out / "results.jsonl").read_text().splitlines()
    # a killed run leaves a torn last line: ignored, and the finished cells are not redone
    (out / "results.jsonl").write_text("\n".join(lines[:1]) + "\n" + lines[1][:20])
    again = sweep("demo:digits-cnn", [0.0, 0.9], ["none"], ["pte"], "local", out, runs=5, warmup=1, finetune_steps=0)
    assert [r["key"] for r in again] == [r["key"] for r in rows]
    assert len(read_rows(out / "results.jsonl")) == 2 and (out / "results.jsonl").read_text().count("prune0-") == 1
    assert len((out / "results.jsonl").read_text().splitlines()) == 3  # row, torn line, redone row
