"""How edgesparse reaches a device: one small interface (run, push, pull, info), one class per kind.

    local                          this machine
    ssh://user@host[:port]         a Jetson or any Linux board, through the system `ssh` client:
                                   keys, config and known_hosts from the usual places, host keys
                                   checked (an unknown host is refused, never trusted on first use).
                                   Query options for what ~/.ssh/config would otherwise say:
                                   ?identity=PATH&known_hosts=PATH&timeout=SECONDS
    adb://SERIAL, adb://host:port  an Android phone (or anything running adbd) through the `adb`
                                   client: shell v2 for exit codes, adb push / pull for files
    serial:///dev/ttyX[?baud=N]    a board on a serial line running devices/agent.py (pyserial)
    qemu-aarch64[:CPU]             an aarch64 Linux board emulated here by qemu-user (CPU: a qemu
                                   model such as cortex-a53 / cortex-a76 / max); for development:
                                   its timings are emulated, not a speed

Every remote command is an argv list, quoted with shlex for the remote shell, so paths with spaces
or `;` stay one argument. Files move through the same ssh channel (`cat`), so there is one code
path to get right.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from edgesparse.errors import EdgesparseError

DEVICE_FORMS = ("local, ssh://user@host[:port], adb://SERIAL, adb://host:port, serial:///dev/ttyX?baud=N, "
                "qemu-aarch64[:CPU]")

# Device state in `key=value` lines: one POSIX sh script for Linux boards, Jetsons and Android.
STATE_SCRIPT = r"""
echo "machine=$(uname -m)"
echo "kernel=$(uname -r)"
echo "cores=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN)"
echo "cpu=$(grep -m1 -E '^(model name|Hardware|Model)' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//')"
echo "governor=$(cat /sys/devices/system/cpu/cpu0/cpufreq/scaling_governor 2>/dev/null)"
echo "cpu0_khz=$(cat /sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq 2>/dev/null)"
echo "temps_milli_c=$(cat /sys/class/thermal/thermal_zone*/temp 2>/dev/null | tr '\n' ' ')"
echo "android_model=$(getprop ro.product.model 2>/dev/null)"
echo "android_thermal=$(getprop sys.thermal.status 2>/dev/null)"
echo "nvpmodel=$(nvpmodel -q 2>/dev/null | tr '\n' ' ')"
echo "mem_total_kb=$(grep -m1 MemTotal /proc/meminfo 2>/dev/null | tr -s ' ' | cut -d' ' -f2)"
"""


def parse_state(text: str) -> dict:
    """The state script's output as a dict: empty values dropped, numbers as numbers."""
    state: dict = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        value = value.strip()
        if not sep or not value:
            continue
        if key == "temps_milli_c":
            state["temps_c"] = [int(v) / 1000 for v in value.split() if v.lstrip("-").isdigit()]
        elif key in ("cores", "cpu0_khz", "mem_total_kb") and value.isdigit():
            state[key] = int(value)
        else:
            state[key] = value
    return state


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


class Transport:
    """run an argv, move files, describe the device. Errors name the device and the stage.
    A kind implements `_call`: run argv there, return (exit status, stdout bytes, stderr text),
    raising only when the device itself could not be reached."""

    spec = "local"
    remote = False
    emulated = False

    def runner_prefix(self) -> list[str]:
        """What the runner's command line starts with on this device (an emulator, or nothing)."""
        return []

    def _call(self, argv: list[str], stdin: bytes | None, timeout: float, stage: str) -> tuple[int, bytes, str]:
        raise NotImplementedError

    def _exec(self, argv: list[str], stage: str, timeout: float, stdin: bytes | None = None,
              check: bool = True) -> tuple[int, bytes, str]:
        code, out, err = self._call(argv, stdin, timeout, stage)
        if check and code:
            last = (err.strip() or out.decode(errors="replace").strip() or "no output").splitlines()[-1]
            raise EdgesparseError(f"{self.spec}: {stage} failed (exit {code}): {last.strip()}")
        return code, out, err

    def run(self, argv: list[str], stage: str, timeout: float = 600, check: bool = True) -> Result:
        code, out, err = self._exec(argv, stage, timeout, check=check)
        return Result(code, out.decode(errors="replace"), err)

    def push(self, local: Path, remote: str, timeout: float = 600) -> None:
        self._exec(["sh", "-c", 'cat > "$1"', "push", remote], f"copying {Path(local).name} to the device", timeout,
                   stdin=Path(local).read_bytes())

    def pull(self, remote: str, local: Path, timeout: float = 600) -> None:
        """Into a temp file next to `local`, then renamed: never a half-written file."""
        _, data, _ = self._exec(["cat", remote], f"copying {remote} from the device", timeout)
        tmp = Path(f"{local}.part")
        tmp.write_bytes(data)
        os.replace(tmp, local)

    def info(self) -> dict:
        return parse_state(self.run(["sh", "-c", STATE_SCRIPT], "reading the device state", 60).stdout)

    def temp_base(self) -> str:
        return "/tmp"

    @contextlib.contextmanager
    def temp_dir(self):
        """A fresh directory on the device, removed afterwards whatever happens in between."""
        path = self.run(["mktemp", "-d", f"{self.temp_base()}/edgesparse.XXXXXX"], "creating a temp dir", 60).stdout.strip()
        try:
            yield path
        finally:
            with contextlib.suppress(EdgesparseError):
                self.run(["rm", "-rf", path], "removing the temp dir", 60, check=False)


class _Process(Transport):
    """A kind whose commands are local processes (`shell` turns a device argv into one)."""

    def shell(self, argv: list[str]) -> list[str]:
        raise NotImplementedError

    def check_connection(self, returncode: int, stderr: str, stage: str) -> None:
        """Raise if the device was never reached (as opposed to: the command failed on it)."""

    def _call(self, argv: list[str], stdin: bytes | None, timeout: float, stage: str) -> tuple[int, bytes, str]:
        try:
            proc = subprocess.run(self.shell(argv), input=stdin, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise EdgesparseError(f"{self.spec}: {stage} timed out after {timeout:.0f} s") from None
        except OSError as exc:
            raise EdgesparseError(f"{self.spec}: {stage} failed: {exc.strerror}") from None
        stderr = proc.stderr.decode(errors="replace")
        self.check_connection(proc.returncode, stderr, stage)
        return proc.returncode, proc.stdout, stderr


class Local(_Process):
    def shell(self, argv: list[str]) -> list[str]:
        return list(argv)


@dataclass
class Ssh(_Process):
    user: str | None
    host: str
    port: int = 22
    identity: str | None = None
    known_hosts: str | None = None
    connect_timeout: float = 10
    spec: str = field(default="")
    remote = True

    def __post_init__(self):
        self.spec = self.spec or f"ssh://{self.user + '@' if self.user else ''}{self.host}:{self.port}"

    def shell(self, argv: list[str]) -> list[str]:
        cmd = ["ssh", "-p", str(self.port), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
               "-o", f"ConnectTimeout={self.connect_timeout:g}", "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"]
        if self.identity:
            cmd += ["-i", self.identity, "-o", "IdentitiesOnly=yes"]
        if self.known_hosts:
            cmd += ["-o", f"UserKnownHostsFile={self.known_hosts}"]
        target = f"{self.user}@{self.host}" if self.user else self.host
        return cmd + [target, "--", shlex.join(argv)]

    def check_connection(self, returncode: int, stderr: str, stage: str) -> None:
        # ssh exits 255 for its own errors (refused, unreachable, host key, auth); otherwise it
        # passes the remote command's exit status through
        if returncode == 255:
            why = (stderr.strip() or "no reason given").splitlines()[-1].strip()
            raise EdgesparseError(f"{self.spec}: {stage}: ssh could not reach the device: {why}")


@dataclass
class Adb(_Process):
    """The `adb` client (its server and ANDROID_ADB_SERVER_PORT as usual); `host:port` serials
    are `adb connect`ed first. Remote files live under /data/local/tmp on Android."""

    serial: str
    spec: str = field(default="")
    remote = True

    def __post_init__(self):
        self.spec = self.spec or f"adb://{self.serial}"
        self._connected = ":" not in self.serial

    def _adb(self, *args: str) -> list[str]:
        return ["adb", "-s", self.serial, *args]

    def shell(self, argv: list[str]) -> list[str]:
        self._connect()
        return self._adb("shell", "-n", shlex.join(argv))  # -n: adb reads no stdin

    def check_connection(self, returncode: int, stderr: str, stage: str) -> None:
        last = (stderr.strip().splitlines() or [""])[-1]
        if returncode and (last.startswith(("error:", "adb: error:")) or "device offline" in last or "not found" in last):
            raise EdgesparseError(f"{self.spec}: {stage}: adb could not reach the device: {last}")

    def _connect(self) -> None:
        if self._connected:
            return
        try:
            out = subprocess.run(["adb", "connect", self.serial], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise EdgesparseError(f"{self.spec}: adb connect failed: {exc}") from None
        if not out.startswith(("connected to", "already connected")):
            raise EdgesparseError(f"{self.spec}: adb could not reach the device: {out.strip() or 'no answer'}")
        self._connected = True

    def _file(self, args: list[str], stage: str, timeout: float) -> None:
        self._connect()
        try:
            proc = subprocess.run(self._adb(*args), capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise EdgesparseError(f"{self.spec}: {stage} timed out after {timeout:.0f} s") from None
        if proc.returncode:
            self.check_connection(proc.returncode, proc.stderr, stage)
            raise EdgesparseError(f"{self.spec}: {stage} failed: {(proc.stderr.strip() or 'no output').splitlines()[-1]}")

    def push(self, local: Path, remote: str, timeout: float = 600) -> None:
        self._file(["push", str(local), remote], f"copying {Path(local).name} to the device", timeout)

    def pull(self, remote: str, local: Path, timeout: float = 600) -> None:
        tmp = Path(f"{local}.part")
        self._file(["pull", remote, str(tmp)], f"copying {remote} from the device", timeout)
        os.replace(tmp, local)

    def temp_base(self) -> str:
        """/data/local/tmp on Android (the one place a shell user may write), else /tmp."""
        return self.run(["sh", "-c", "[ -d /data/local/tmp ] && echo /data/local/tmp || echo /tmp"], "finding a temp dir",
                        60).stdout.strip()


@dataclass
class Serial(Transport):
    """A serial line to devices/agent.py (one request line, one answer line; see agent.py)."""

    port: str
    baud: int = 115200
    spec: str = field(default="")
    remote = True

    def __post_init__(self):
        self.spec = self.spec or f"serial://{self.port}?baud={self.baud}"
        self._link = None

    def _ask(self, request: dict, timeout: float, stage: str) -> dict:
        import time

        import serial

        from edgesparse.devices.agent import decode, encode

        try:
            if self._link is None:
                self._link = serial.serial_for_url(self.port, baudrate=self.baud, timeout=0.05)
            self._link.reset_input_buffer()  # nothing stale from an earlier, abandoned request
            self._link.write(encode(request))
            self._link.flush()
            buffer, deadline = b"", time.monotonic() + timeout
            while time.monotonic() < deadline:
                buffer += self._link.read(max(1, self._link.in_waiting))
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if (reply := decode(line)) is not None:
                        return reply
        except (serial.SerialException, OSError) as exc:
            raise EdgesparseError(f"{self.spec}: {stage}: the serial link failed: {exc}") from None
        raise EdgesparseError(f"{self.spec}: {stage}: no answer from the agent within {timeout:.0f} s",
                              hint="is `python3 agent.py PORT` running on the device?")

    def _call(self, argv: list[str], stdin: bytes | None, timeout: float, stage: str) -> tuple[int, bytes, str]:
        import base64

        request = {"op": "run", "argv": list(argv), "stdin": base64.b64encode(stdin or b"").decode(), "timeout": timeout}
        reply = self._ask(request, timeout + 30, stage)
        return reply["rc"], base64.b64decode(reply["stdout"]), base64.b64decode(reply["stderr"]).decode(errors="replace")


AARCH64_SYSROOT = "/usr/aarch64-linux-gnu"  # Debian's cross libc: the emulated board's /lib


@dataclass
class Emulated(_Process):
    """An aarch64 Linux board emulated by qemu-user: commands run on this machine, aarch64
    programs (the runner) run under `qemu-aarch64 -cpu CPU` with the cross sysroot. For
    development and correctness only: its timings are emulated, not a speed."""

    cpu: str = "max"
    spec: str = field(default="")
    remote = True
    emulated = True

    def __post_init__(self):
        self.spec = self.spec or f"qemu-aarch64:{self.cpu}"

    def shell(self, argv: list[str]) -> list[str]:
        return list(argv)

    def runner_prefix(self) -> list[str]:
        return ["qemu-aarch64", "-cpu", self.cpu, "-L", AARCH64_SYSROOT]

    def info(self) -> dict:
        state = super().info()
        return state | {"machine": "aarch64", "emulated_on": state.get("machine"), "cpu": f"qemu-aarch64 -cpu {self.cpu}"}


def parse_device(spec: str) -> Transport:
    spec = str(spec).strip()
    if spec == "local":
        return Local()
    url = urllib.parse.urlsplit(spec)
    if url.scheme == "ssh" and url.hostname:
        query = dict(urllib.parse.parse_qsl(url.query))
        unknown = set(query) - {"identity", "known_hosts", "timeout"}
        if unknown:
            raise EdgesparseError(f"unknown ssh option(s) {', '.join(sorted(unknown))} in {spec!r}",
                                  hint="use identity=, known_hosts= or timeout=")
        try:
            port = url.port or 22
            timeout = float(query.get("timeout", 10))
        except ValueError:
            raise EdgesparseError(f"bad port or timeout in {spec!r}") from None
        return Ssh(url.username, url.hostname, port, query.get("identity"), query.get("known_hosts"), timeout,
                   spec=spec.split("?")[0])
    if spec == "qemu-aarch64" or spec.startswith("qemu-aarch64:"):
        import shutil

        if not shutil.which("qemu-aarch64"):
            raise EdgesparseError("the emulated device needs qemu-aarch64", hint="make arm-toolchain")
        return Emulated(spec.partition(":")[2] or "max")
    if url.scheme == "adb" and url.netloc:
        return Adb(url.netloc)
    if url.scheme == "serial" and url.path:
        query = dict(urllib.parse.parse_qsl(url.query))
        if set(query) - {"baud"} or not query.get("baud", "1").isdigit():
            raise EdgesparseError(f"bad serial options in {spec!r}", hint="only ?baud=N")
        return Serial(url.path, int(query.get("baud", 115200)))
    raise EdgesparseError(f"unknown device {spec!r} (available: {DEVICE_FORMS})")


def ssh_config_hosts(config: Path | None = None) -> list[str]:
    """The concrete `Host` names in an ssh config (default ~/.ssh/config; patterns skipped)."""
    config = config or Path.home() / ".ssh" / "config"
    try:
        lines = config.read_text().splitlines()
    except OSError:
        return []
    hosts = []
    for line in lines:
        words = line.split()
        if len(words) >= 2 and words[0].lower() == "host":
            hosts += [h for h in words[1:] if not any(c in h for c in "*?!")]
    return list(dict.fromkeys(hosts))


def list_devices() -> list[dict]:
    """What `edgesparse devices` shows: this machine and the configured ssh hosts (as specs)."""
    rows = [{"spec": "local", "kind": "local", "note": "this machine"}]
    rows += [{"spec": f"ssh://{host}", "kind": "ssh", "note": "from ~/.ssh/config"} for host in ssh_config_hosts()]
    rows += [{"spec": f"adb://{serial}", "kind": "adb", "note": state} for serial, state in adb_devices()]
    rows += [{"spec": f"serial://{port}", "kind": "serial", "note": "needs devices/agent.py on the board"} for port in serial_ports()]
    return rows


def adb_devices() -> list[tuple[str, str]]:
    """(serial, state) from `adb devices` (empty without adb or its server)."""
    try:
        out = subprocess.run(["adb", "devices"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [tuple(line.split("\t")[:2]) for line in out.splitlines()[1:] if "\t" in line]


def serial_ports() -> list[str]:
    try:
        from serial.tools import list_ports
    except ImportError:
        return []
    return [port.device for port in list_ports.comports()]
