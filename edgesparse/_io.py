"""Atomic file output: every artifact is written to a temp file and renamed into place, so a
failure never leaves a half-written file behind."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `dest`; it is renamed onto `dest` only if the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts get normal modes
        os.replace(tmp_path, dest)
    finally:
        tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(dest: str | os.PathLike, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(dest: str | os.PathLike, obj) -> None:
    write_bytes_atomic(dest, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


@contextlib.contextmanager
def staging_dir(final_dir: str | os.PathLike) -> Iterator[Path]:
    """A temp folder beside `final_dir` whose files move into `final_dir` only on success.

    Files are moved one by one with os.replace, so an existing output folder keeps files that
    this run does not produce, and a failed run leaves the folder exactly as it was.
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.", suffix=".staging", dir=final_dir.parent))
    try:
        yield stage
        final_dir.mkdir(parents=True, exist_ok=True)
        for item in sorted(stage.iterdir()):
            os.replace(item, final_dir / item.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


@contextlib.contextmanager
def native_stderr(lines: list[str] | None = None) -> Iterator[None]:
    """Collect what native code writes to fd 2 into `lines` (ExecuTorch's runtime logs its
    cpuinfo probing and threadpool resets there on every process start)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if lines is not None:
                sink.seek(0)
                lines.extend(sink.read().decode(errors="replace").splitlines())


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_dir() -> Path:
    """Where trained demo weights and other derived files are cached ($EDGESPARSE_CACHE)."""
    root = os.environ.get("EDGESPARSE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "edgesparse"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
