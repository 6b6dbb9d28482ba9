"""Fleet sweeps on Ray (edgesparse/fleet.py) against real pieces: a private Ray instance on
127.0.0.1, this machine, an OpenSSH sshd on 127.0.0.1 (tests/device_lab.py) and the emulated
aarch64 device; the sshd is killed mid-sweep and every cell must still be recorded exactly once."""

import collections
import os
import sys
import threading
import time

import pytest

from device_lab import free_port, start_sshd, stop

ray = pytest.importorskip("ray", reason="the [fleet] extra (Ray) is not installed")


def keys_once(out) -> dict:
    """results.jsonl's rows by key, asserting no key is there twice."""
    from edgesparse.devices.sweep import read_rows

    rows = read_rows(out / "results.jsonl")
    counts = collections.Counter(r["key"] for r in rows)
    assert max(counts.values()) == 1, counts
    return {r["key"]: r for r in rows}


def cli(*args: str, without_ray: bool = False):
    """`edgesparse ARGS` in a fresh process (exit code and one-line errors as a user sees them);
    without_ray: `import ray` fails there as it does when Ray is not installed."""
    import subprocess

    hide = "import sys; sys.modules['ray'] = None; " if without_ray else "import sys; "
    code = hide + "sys.argv = ['edgesparse', *sys.argv[1:]]; from edgesparse.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


def test_without_ray_the_fleet_says_how_to_install_it(tmp_path):
    result = cli("sweep", "demo:digits-cnn", "--devices", "local", "--ray", "local", "-o", str(tmp_path / "s"),
                 without_ray=True)
    assert result.returncode == 2, result.stderr
    assert "pip install 'edgesparse[fleet]'" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()


def test_an_unreachable_ray_address_fails_in_one_line(tmp_path):
    started = time.monotonic()
    result = cli("sweep", "demo:digits-cnn", "--devices", "local", "--ray", f"127.0.0.1:{free_port()}",
                 "-o", str(tmp_path / "s"), "--prune", "0", "--quant", "none", "--format", "pte")
    assert result.returncode == 2, result.stderr
    assert "cannot reach the Ray cluster at 127.0.0.1:" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and time.monotonic() - started < 60


def listening_here() -> list[str]:
    """Local addresses of the listening TCP sockets of this process and all its descendants (the
    Ray instance it started: GCS, raylet, workers), from `ss`."""
    import re
    import subprocess

    parents = {}
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                parents[int(stat)] = int(open(f"/proc/{stat}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    mine, grew = {os.getpid()}, True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in mine} - mine
        mine, grew = mine | more, bool(more)
    listening = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout.splitlines()
    return [line.split()[3] for line in listening if {int(p) for p in re.findall(r"pid=(\d+)", line)} & mine]


@pytest.mark.slow  # two Ray start-ups, an export and a profile
def test_an_unreachable_device_fails_its_cells_and_a_rerun_retries_only_them(tmp_path):
    from edgesparse.fleet import fleet_key, fleet_sweep

    out, dead = tmp_path / "fleet", f"ssh://root@127.0.0.1:{free_port()}?timeout=3"
    lines, listening = [], []

    def log(line):  # called while the Ray instance is up: what does it listen on?
        lines.append(line)
        listening.extend(listening_here())

    fleet_sweep("demo:digits-cnn", [0.0], ["none"], ["pte"], ["local", dead], out, runs=5, warmup=1, finetune_steps=0,
                log=log)
    # --ray local: the GCS, raylet and workers listen on loopback only
    assert len(listening) >= 3 and all(a.startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:")) for a in listening), listening
    rows = keys_once(out)
    ok, failed = rows[fleet_key("prune0-none-pte", "local")], rows[fleet_key("prune0-none-pte", dead)]
    assert ok["p50_ms"] > 0 and ok["device"] == "local" and ok["cell"] == "prune0-none-pte" and "failed" not in ok
    assert "could not reach" in failed["failed"] and "\n" not in failed["failed"] and "p50_ms" not in failed
    assert len(lines) == 1 and dead in lines[0]
    # the rerun keeps the finished cell as it was and retries the failed one (still one row per key)
    fleet_sweep("demo:digits-cnn", [0.0], ["none"], ["pte"], ["local", dead], out, runs=5, warmup=1, finetune_steps=0,
                log=lines.append)
    again = keys_once(out)
    assert again[fleet_key("prune0-none-pte", "local")] == ok and "failed" in again[fleet_key("prune0-none-pte", dead)]


GRID = ([0.0, 0.5, 0.8, 0.9], ["none", "int8"])  # 8 variants x 3 devices = 24 cells


@pytest.mark.bench
def test_fleet_of_three_devices_survives_a_device_killed_mid_sweep(tmp_path):
    """3 devices x 8 variants on a private Ray on 127.0.0.1; the ssh board's sshd is killed once the
    first cells are recorded: its later cells fail with a reason, the others finish, each cell is
    recorded exactly once."""
    from edgesparse import runtime_kernels
    from edgesparse.fleet import fleet_key, fleet_sweep

    if not (runtime_kernels.ARM_BUILD_DIR / "edgesparse_runner").is_file() or not runtime_kernels.RUNNER.is_file():
        if os.environ.get("CI"):
            pytest.fail("CI must build the runners (make kernels arm-runner)")
        pytest.skip("the C++ runners are not built (make kernels arm-runner)")
    sshd = start_sshd(tmp_path / "sshd")
    devices = ["local", sshd.spec, "qemu-aarch64:cortex-a76"]
    out = tmp_path / "fleet"
    results = out / "results.jsonl"
    killed = threading.Event()

    def kill_after_first_rows():
        while not killed.is_set():
            if results.is_file() and '"device": "ssh://' in results.read_text():
                stop(sshd.process)
                killed.set()
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_after_first_rows, daemon=True)
    watcher.start()
    try:
        prunes, quants = GRID
        fleet_sweep("demo:digits-cnn", prunes, quants, ["pte"], devices, out, runs=5, warmup=1, finetune_steps=0,
                    log=lambda line: None)
    finally:
        killed.set()
        stop(sshd.process)
    rows = keys_once(out)
    cells = [f"prune{p:g}-{q}-pte" for p in prunes for q in quants]
    assert len(cells) * len(devices) == len(rows)
    assert set(rows) == {fleet_key(c, d) for c in cells for d in devices}
    for cell in cells:
        local, emulated = rows[fleet_key(cell, "local")], rows[fleet_key(cell, devices[2])]
        assert local["p50_ms"] > 0 and "timing_note" not in local
        assert emulated["p50_ms"] > 0 and emulated["timing_note"] == "emulated, not a speed"
    ssh_rows = [rows[fleet_key(c, sshd.spec)] for c in cells]
    assert "failed" in ssh_rows[-1] and all("\n" not in r.get("failed", "") for r in ssh_rows)
    assert all(r["failed"].startswith(sshd.spec) or "ssh" in r["failed"] for r in ssh_rows if "failed" in r)
    assert any("p50_ms" in r for r in ssh_rows)  # it was alive for the first cells
    for device in devices:  # one Pareto plot per device
        from edgesparse.fleet import device_resource

        assert (out / f"pareto-{device_resource(device)}.png").read_bytes()[:4] == b"\x89PNG"
