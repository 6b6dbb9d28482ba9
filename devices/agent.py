"""The on-device agent for serial links: one file, Python 3 standard library only, so it can be
copied to any board that has python3 and run on its console or gadget-serial port:

    python3 agent.py /dev/ttyGS0 --baud 115200      # on the board
    edgesparse profile model.pte --device 'serial:///dev/ttyACM0?baud=115200'   # on the host

Protocol: one request per line, `ES1 ` + base64(JSON), answered by one line in the same form.
Anything else on the line (console echo, kernel messages, a login prompt) is ignored, so the
agent can share a console. Requests:
    {"op": "ping"}                                     -> {"ok": true, "version": 1}
    {"op": "run", "argv": [...], "stdin": b64, "timeout": s}
                                                       -> {"rc": n, "stdout": b64, "stderr": b64}
The argv runs without a shell (no quoting problems); exit status 124 means it timed out.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys

PREFIX = b"ES1 "
VERSION = 1


def encode(message: dict) -> bytes:
    return PREFIX + base64.b64encode(json.dumps(message).encode()) + b"\n"


def decode(line: bytes) -> dict | None:
    """The message on a protocol line, None for any other line."""
    start = line.find(PREFIX)
    if start < 0:
        return None
    try:
        return json.loads(base64.b64decode(line[start + len(PREFIX):].strip(), validate=True))
    except ValueError:
        return None


def handle(request: dict) -> dict:
    if request.get("op") == "ping":
        return {"ok": True, "version": VERSION}
    if request.get("op") != "run" or not isinstance(request.get("argv"), list) or not request["argv"]:
        return {"rc": 127, "stdout": "", "stderr": base64.b64encode(b"agent: bad request").decode()}
    stdin = base64.b64decode(request.get("stdin") or "")
    try:
        proc = subprocess.run(request["argv"], input=stdin, capture_output=True, timeout=request.get("timeout", 600))
        rc, out, err = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired:
        rc, out, err = 124, b"", b"agent: timed out"
    except OSError as exc:
        rc, out, err = 127, b"", f"agent: {exc.strerror}: {request['argv'][0]}".encode()
    return {"rc": rc, "stdout": base64.b64encode(out).decode(), "stderr": base64.b64encode(err).decode()}


def serve(fd: int) -> None:
    buffer = b""
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            request = decode(line)
            if request is not None:
                reply = encode(handle(request))
                while reply:
                    reply = reply[os.write(fd, reply):]


def open_tty(path: str, baud: int) -> int:
    import termios
    import tty

    fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    tty.setraw(fd)
    attrs = termios.tcgetattr(fd)
    speed = getattr(termios, f"B{baud}", None)
    if speed is None:
        raise SystemExit(f"agent: unsupported baud rate {baud}")
    attrs[4] = attrs[5] = speed
    termios.tcsetattr(fd, termios.TCSANOW, attrs)
    return fd


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="edgesparse on-device agent (serial line protocol)")
    parser.add_argument("port", nargs="?", help="serial device, e.g. /dev/ttyGS0")
    parser.add_argument("--baud", type=int, default=115200)
    parser.add_argument("--fd", type=int, help="serve an already open file descriptor instead")
    args = parser.parse_args(argv)
    if args.fd is None and not args.port:
        parser.error("give a serial port or --fd")
    serve(args.fd if args.fd is not None else open_tty(args.port, args.baud))
    return 0


if __name__ == "__main__":
    sys.exit(main())
