"""A device-side adb daemon for tests (Debian has no adbd): TCP, the real adb wire protocol, run
against the real `adb` client and server.

Implemented from the protocol documents that ship with Debian's adb (OVERVIEW.TXT, SERVICES.TXT,
SYNC.TXT): CNXN (no AUTH), OPEN / OKAY / WRTE / CLSE with one outstanding WRTE per stream,
`shell,v2,...:` with separate stdout / stderr and the exit code (and the client's stdin), and
`sync:` with STAT, LIST, SEND, RECV and QUIT. Commands run on this machine with `sh -c`.

    python tests/adbd.py --port 15555     # then: adb connect 127.0.0.1:15555
"""

from __future__ import annotations

import argparse
import os
import socket
import stat
import struct
import subprocess
import threading

A_CNXN, A_OPEN, A_OKAY, A_CLSE, A_WRTE = (int.from_bytes(c, "little") for c in (b"CNXN", b"OPEN", b"OKAY", b"CLSE", b"WRTE"))
VERSION = 0x01000001  # >= this, peers skip the payload checksum
MAX_PAYLOAD = 256 * 1024
BANNER = b"device::ro.product.name=edgesparse_test;ro.product.model=EdgesparseTest;ro.product.device=test;features=shell_v2"
# shell v2 packet ids
STDIN, STDOUT, STDERR, EXIT, CLOSE_STDIN = 0, 1, 2, 3, 4


def message(command: int, arg0: int, arg1: int, data: bytes = b"") -> bytes:
    return struct.pack("<6I", command, arg0, arg1, len(data), sum(data) & 0xFFFFFFFF, command ^ 0xFFFFFFFF) + data


class Stream:
    """One OPENed service: device-side id, the host's id, and an OKAY gate for our WRTEs."""

    def __init__(self, conn: "Connection", local: int, remote: int):
        self.conn, self.local, self.remote = conn, local, remote
        self.acked = threading.Semaphore(1)
        self.incoming: list[bytes] = []
        self.ready = threading.Condition()
        self.closed = False

    def write(self, data: bytes) -> None:
        for start in range(0, len(data), self.conn.max_payload):
            self.acked.acquire()  # the host must OKAY each WRTE before the next
            if self.closed:
                return
            self.conn.send(message(A_WRTE, self.local, self.remote, data[start:start + self.conn.max_payload]))

    def read(self) -> bytes | None:
        """The next WRTE payload from the host, None once it closed the stream."""
        with self.ready:
            while not self.incoming and not self.closed:
                self.ready.wait()
            return self.incoming.pop(0) if self.incoming else None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.conn.send(message(A_CLSE, self.local, self.remote))
        with self.ready:
            self.ready.notify_all()
        self.acked.release()


class Connection:
    def __init__(self, sock: socket.socket):
        self.sock, self.lock = sock, threading.Lock()
        self.streams: dict[int, Stream] = {}
        self.next_id = 1
        self.max_payload = MAX_PAYLOAD

    def send(self, data: bytes) -> None:
        with self.lock:
            self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("host closed the connection")
            data += chunk
        return data

    def serve(self) -> None:
        try:
            while True:
                command, arg0, arg1, length, _, magic = struct.unpack("<6I", self.recv_exact(24))
                if magic != command ^ 0xFFFFFFFF:
                    return
                data = self.recv_exact(length) if length else b""
                self.dispatch(command, arg0, arg1, data)
        except (ConnectionError, OSError):
            pass
        finally:
            for stream in list(self.streams.values()):
                stream.closed = True
                with stream.ready:
                    stream.ready.notify_all()
                stream.acked.release()
            self.sock.close()

    def dispatch(self, command: int, arg0: int, arg1: int, data: bytes) -> None:
        if command == A_CNXN:
            self.max_payload = min(MAX_PAYLOAD, arg1 or MAX_PAYLOAD)
            self.send(message(A_CNXN, VERSION, MAX_PAYLOAD, BANNER))
        elif command == A_OPEN:
            stream = Stream(self, self.next_id, arg0)
            self.next_id += 1
            self.streams[stream.local] = stream
            self.send(message(A_OKAY, stream.local, stream.remote))
            service = data.rstrip(b"\0").decode()
            threading.Thread(target=self.run_service, args=(stream, service), daemon=True).start()
        elif command == A_OKAY and (stream := self.streams.get(arg1)):
            stream.acked.release()
        elif command == A_WRTE and (stream := self.streams.get(arg1)):
            with stream.ready:
                stream.incoming.append(data)
                stream.ready.notify_all()
            self.send(message(A_OKAY, stream.local, stream.remote))
        elif command == A_CLSE and (stream := self.streams.pop(arg1, None)):
            stream.closed = True
            with stream.ready:
                stream.ready.notify_all()
            stream.acked.release()

    def run_service(self, stream: Stream, service: str) -> None:
        try:
            if service.startswith("shell"):
                options, _, command = service.partition(":")
                if "v2" in options.split(","):
                    shell_v2(stream, command)
                else:  # legacy shell: output only, merged
                    stream.write(subprocess.run(["sh", "-c", command], stdin=subprocess.DEVNULL,
                                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT).stdout)
            elif service == "sync:":
                sync(stream)
        finally:
            stream.close()
            self.streams.pop(stream.local, None)


def packet(kind: int, data: bytes) -> bytes:
    return struct.pack("<BI", kind, len(data)) + data


def shell_v2(stream: Stream, command: str) -> None:
    proc = subprocess.Popen(["sh", "-c", command], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def feed():  # the client's stdin packets, until CLOSE_STDIN or the stream ends
        buffer = b""
        while (data := stream.read()) is not None:
            buffer += data
            while len(buffer) >= 5 and len(buffer) >= 5 + struct.unpack_from("<I", buffer, 1)[0]:
                kind, length = struct.unpack_from("<BI", buffer)
                payload, buffer = buffer[5:5 + length], buffer[5 + length:]
                try:
                    if kind == STDIN:
                        proc.stdin.write(payload)
                        proc.stdin.flush()
                    elif kind == CLOSE_STDIN:
                        proc.stdin.close()
                        return
                except (BrokenPipeError, ValueError):
                    return

    def pump(pipe, kind):
        while chunk := pipe.read1(65536):
            stream.write(packet(kind, chunk))

    threading.Thread(target=feed, daemon=True).start()
    err = threading.Thread(target=pump, args=(proc.stderr, STDERR), daemon=True)
    err.start()
    pump(proc.stdout, STDOUT)
    err.join()
    stream.write(packet(EXIT, bytes([proc.wait() & 0xFF])))


def sync(stream: Stream) -> None:
    buffer = b""

    def take(n: int) -> bytes | None:
        nonlocal buffer
        while len(buffer) < n:
            data = stream.read()
            if data is None:
                return None
            buffer += data
        out, buffer = buffer[:n], buffer[n:]
        return out

    def fail(text: str) -> None:
        stream.write(b"FAIL" + struct.pack("<I", len(text)) + text.encode())

    while (header := take(8)) is not None:
        request, length = header[:4], struct.unpack("<I", header[4:])[0]
        arg = take(length) if length else b""
        if arg is None:
            return
        path = arg.decode(errors="surrogateescape")
        if request == b"STAT":
            try:
                st = os.stat(path)
                stream.write(b"STAT" + struct.pack("<III", st.st_mode, st.st_size & 0xFFFFFFFF, int(st.st_mtime)))
            except OSError:
                stream.write(b"STAT" + struct.pack("<III", 0, 0, 0))
        elif request == b"LIST":
            entries = os.listdir(path) if os.path.isdir(path) else []
            for name in entries:
                st = os.lstat(os.path.join(path, name))
                raw = name.encode(errors="surrogateescape")
                stream.write(b"DENT" + struct.pack("<IIII", st.st_mode, st.st_size & 0xFFFFFFFF, int(st.st_mtime), len(raw)) + raw)
            stream.write(b"DONE" + struct.pack("<IIII", 0, 0, 0, 0))
        elif request == b"SEND":
            target, _, mode = path.rpartition(",")
            data, ok = [], True
            while (chunk := take(8)) is not None:
                kind, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
                if kind == b"DONE":  # size is the mtime
                    break
                if kind != b"DATA" or (payload := take(size)) is None:
                    ok = False
                    break
                data.append(payload)
            try:
                if not ok:
                    raise OSError("bad SEND data")
                tmp = f"{target}.adbd-part"
                with open(tmp, "wb") as f:
                    f.write(b"".join(data))
                os.chmod(tmp, stat.S_IMODE(int(mode)) if mode.isdigit() else 0o644)  # mode: st_mode in decimal
                os.replace(tmp, target)
                stream.write(b"OKAY" + struct.pack("<I", 0))
            except (OSError, ValueError) as exc:
                fail(f"couldn't create file: {exc}")
        elif request == b"RECV":
            try:
                with open(path, "rb") as f:
                    while chunk := f.read(64 * 1024):
                        stream.write(b"DATA" + struct.pack("<I", len(chunk)) + chunk)
                stream.write(b"DONE" + struct.pack("<I", 0))
            except OSError as exc:
                fail(f"{exc.strerror}: {path}")
        elif request == b"QUIT":
            return
        else:
            fail(f"unknown sync request {request!r}")
            return


def serve(port: int, ready: threading.Event | None = None) -> None:
    server = socket.create_server(("127.0.0.1", port))
    if ready:
        ready.set()
    while True:
        sock, _ = server.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=Connection(sock).serve, daemon=True).start()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=15555)
    serve(parser.parse_args().port)
