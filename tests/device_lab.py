"""Real device stand-ins for tests, started by the tests themselves and stopped by PID.

sshd: OpenSSH's daemon on 127.0.0.1 at a free port, from a temp dir, with throwaway host and
client keys; the client trusts exactly that host key (known_hosts written here), nothing else.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require(tool: str, path: str, package: str) -> None:
    if not os.path.exists(path):
        if os.environ.get("CI"):
            pytest.fail(f"CI must have {tool} ({package}; `make device-lab` installs it)")
        pytest.skip(f"{tool} not installed (make device-lab)")


@dataclass
class Sshd:
    port: int
    key: Path
    known_hosts: Path
    process: subprocess.Popen

    @property
    def spec(self) -> str:
        user = os.environ.get("USER") or "root"
        return f"ssh://{user}@127.0.0.1:{self.port}?identity={self.key}&known_hosts={self.known_hosts}"


# A stand-in for NVIDIA's tegrastats on the test "board": r36-format lines every 100 ms.
FAKE_TEGRASTATS = """#!/bin/sh
while :; do
  echo "$(date '+%m-%d-%Y %H:%M:%S') RAM 3105/7620MB (lfb 12x4MB) SWAP 0/3810MB (cached 0MB) CPU [12%@1510,off] \
GR3D_FREQ 0% cpu@48.5C CV0@-256C VDD_IN 5000mW/4987mW VDD_CPU_GPU_CV 842mW/801mW VDD_SOC 1457mW/1440mW"
  sleep 0.1
done
"""


def start_sshd(folder: Path, jetson: bool = False) -> Sshd:
    """jetson=True: sessions find a fake `tegrastats` on their PATH (sshd's SetEnv)."""
    require("sshd", SSHD, "openssh-server")
    folder.mkdir(parents=True, exist_ok=True)
    setenv = ""
    if jetson:
        (folder / "bin").mkdir(exist_ok=True)
        (folder / "bin" / "tegrastats").write_text(FAKE_TEGRASTATS)
        os.chmod(folder / "bin" / "tegrastats", 0o755)
        setenv = f"SetEnv PATH={folder / 'bin'}:/usr/local/bin:/usr/bin:/bin\n"
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / name)], check=True)
    (folder / "authorized_keys").write_text((folder / "client.pub").read_text())
    os.chmod(folder / "authorized_keys", 0o600)
    port = free_port()
    (folder / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {folder / 'host'}\nPidFile {folder / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {folder / 'authorized_keys'}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PubkeyAuthentication yes\nPermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n" + setenv)
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(folder / "sshd_config")],
                               stdout=subprocess.DEVNULL, stderr=open(folder / "sshd.log", "w"))
    host_key = (folder / "host.pub").read_text().split()[:2]
    (folder / "known_hosts").write_text(f"[127.0.0.1]:{port} {' '.join(host_key)}\n")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"sshd exited: {(folder / 'sshd.log').read_text()[-500:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return Sshd(port, folder / "client", folder / "known_hosts", process)
        time.sleep(0.05)
    process.kill()
    raise RuntimeError("sshd did not start listening within 10 s")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass
class SerialBoard:
    """A pty pair: the host opens `port`; the agent serves the other end, like a board's console."""

    port: str
    agent: subprocess.Popen
    fds: tuple[int, int]

    @property
    def spec(self) -> str:
        return f"serial://{self.port}?baud=115200"


def start_serial_agent() -> SerialBoard:
    import sys
    import tty

    master, slave = os.openpty()
    tty.setraw(slave)  # a raw line, as a real serial port is configured
    agent = subprocess.Popen([sys.executable, "-m", "edgesparse.devices.agent", "--fd", str(master)], pass_fds=[master])
    return SerialBoard(os.ttyname(slave), agent, (master, slave))


def stop_serial_agent(board: SerialBoard) -> None:
    stop(board.agent)
    for fd in board.fds:
        os.close(fd)


@dataclass
class AdbDevice:
    """tests/adbd.py on a free port, seen through a private adb server (ANDROID_ADB_SERVER_PORT)."""

    port: int
    daemon: subprocess.Popen
    server_port: int

    @property
    def spec(self) -> str:
        return f"adb://127.0.0.1:{self.port}"


def start_adb_device() -> AdbDevice:
    import sys

    require("adb", shutil.which("adb") or "/usr/bin/adb", "adb")
    port, server_port = free_port(), free_port()
    daemon = subprocess.Popen([sys.executable, str(Path(__file__).with_name("adbd.py")), "--port", str(port)])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.05)
    os.environ["ANDROID_ADB_SERVER_PORT"] = str(server_port)  # a private adb server, not the user's
    return AdbDevice(port, daemon, server_port)


def stop_adb_device(device: AdbDevice) -> None:
    subprocess.run(["adb", "kill-server"], capture_output=True, timeout=30)
    os.environ.pop("ANDROID_ADB_SERVER_PORT", None)
    stop(device.daemon)


ROOTFS_TARBALL = Path(os.environ.get("EDGESPARSE_CACHE", Path.home() / ".cache" / "edgesparse")) / "rootfs-arm64.tar"


@dataclass
class Arm64Board:
    """An arm64 Debian rootfs (mmdebstrap, cached tarball) run through binfmt + qemu-user, with its
    own sshd: a Jetson stand-in you ssh into. Needs root (chroot, mounts)."""

    root: Path
    sshd: Sshd | None
    mounts: list[Path]


AARCH64_WHEELS = ROOTFS_TARBALL.parent / "wheels-aarch64"


def aarch64_wheels(*packages: str) -> list[Path]:
    """cp311 aarch64 wheels of `packages` (no dependencies), downloaded once into the cache."""
    import sys

    AARCH64_WHEELS.mkdir(parents=True, exist_ok=True)
    found = [next(AARCH64_WHEELS.glob(f"{p}-*.whl"), None) for p in packages]
    if None in found:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", *packages, "--platform", "manylinux_2_28_aarch64",
                        "--python-version", "3.11", "--only-binary=:all:", "--no-deps", "-d", str(AARCH64_WHEELS)],
                       check=True, capture_output=True)
        found = [next(AARCH64_WHEELS.glob(f"{p}-*.whl")) for p in packages]
    return found


def start_arm64_board(folder: Path, packages: tuple[str, ...] = ()) -> Arm64Board:
    """Unpack the cached rootfs (`make arm64-rootfs` builds it), unpack aarch64 wheels of
    `packages` into its python3, mount what runtimes need, and start its sshd (an aarch64 binary
    under qemu) on a free port of 127.0.0.1."""
    import zipfile

    if os.geteuid() != 0 or not ROOTFS_TARBALL.is_file() or not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
        if os.environ.get("CI"):
            pytest.fail("CI must have the arm64 rootfs and binfmt (make arm64-rootfs, as root)")
        pytest.skip("needs root, binfmt for aarch64 and the cached rootfs (make arm64-rootfs)")
    root = folder / "rootfs"
    root.mkdir(parents=True)
    subprocess.run(["tar", "-xf", str(ROOTFS_TARBALL), "-C", str(root)], check=True)
    for wheel in aarch64_wheels(*packages) if packages else []:
        zipfile.ZipFile(wheel).extractall(root / "usr/local/lib/python3.11/dist-packages")
    board = Arm64Board(root, None, [])
    try:
        for kind, source, target in (("proc", "proc", "proc"), ("bind", "/dev", "dev"), ("bind", "/dev/pts", "dev/pts"),
                                     ("tmpfs", "tmpfs", "sys")):
            args = ["mount", "--bind", source] if kind == "bind" else ["mount", "-t", kind, source]
            subprocess.run([*args, str(root / target)], check=True)
            board.mounts.append(root / target)
        # cpuinfo (XNNPACK's CPU detection) needs these; the host's /sys crashes ORT under qemu
        cpu = root / "sys/devices/system/cpu"
        cpu.mkdir(parents=True)
        for name in ("possible", "present", "online"):
            (cpu / name).write_text("0-1\n")
        for name in ("host", "client"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / name)], check=True)
        (root / "root/.ssh").mkdir(parents=True, exist_ok=True)
        (root / "root/.ssh/authorized_keys").write_text((folder / "client.pub").read_text())
        shutil.copy(folder / "host", root / "etc/ssh/edgesparse_test_host_key")
        port = free_port()
        (root / "etc/ssh/edgesparse_test_config").write_text(
            f"Port {port}\nListenAddress 127.0.0.1\nHostKey /etc/ssh/edgesparse_test_host_key\nPasswordAuthentication no\n"
            "PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n")
        (root / "run/sshd").mkdir(parents=True, exist_ok=True)
        process = subprocess.Popen(["chroot", str(root), "/usr/sbin/sshd", "-D", "-e", "-f", "/etc/ssh/edgesparse_test_config"],
                                   stdout=subprocess.DEVNULL, stderr=open(folder / "sshd.log", "w"))
        (folder / "known_hosts").write_text(f"[127.0.0.1]:{port} {' '.join((folder / 'host.pub').read_text().split()[:2])}\n")
        board.sshd = Sshd(port, folder / "client", folder / "known_hosts", process)
        deadline = time.monotonic() + 60  # sshd starts under emulation
        while time.monotonic() < deadline and process.poll() is None:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return board
            time.sleep(0.1)
        raise RuntimeError(f"the arm64 board's sshd did not start: {(folder / 'sshd.log').read_text()[-500:]}")
    except BaseException:
        stop_arm64_board(board)
        raise


def stop_arm64_board(board: Arm64Board) -> None:
    if board.sshd:
        stop(board.sshd.process)
    for mount in reversed(board.mounts):
        subprocess.run(["umount", str(mount)], capture_output=True)
    # never delete through a mount that is still there (/dev is bound in)
    if not any(os.path.ismount(mount) for mount in board.mounts):
        shutil.rmtree(board.root, ignore_errors=True)
