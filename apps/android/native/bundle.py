"""Assemble edgesparse-bench: the aarch64 C++ runner, every library it loads (ours, the executorch
wheel's, and glibc with its own dynamic loader from the cross sysroot) and a launcher that starts it
through that loader, so it runs on Android (whose bionic loader cannot load glibc programs) and on
any aarch64 Linux without touching the system's loader or libraries.

    python bundle.py OUT_DIR [--sysroot /usr/aarch64-linux-gnu/lib]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from edgesparse.devices.remote import runner_bundle

LOADER = "ld-linux-aarch64.so.1"
# `sh edgesparse-bench ...`: sh, not a #! line, is what Android and Linux both have (/system/bin/sh)
LAUNCHER = f"""#!/bin/sh
# edgesparse-bench MODEL.pte [--runs N] [--warmup W] [--min-seconds S] [--threads T] [--input F.f32] [--output F.f32]
# glibc's loader from this folder loads the runner and every library from this folder: the
# system's loader (bionic on Android) and libraries are never used.
d=$(cd "$(dirname "$0")" && pwd)
exec "$d/lib/{LOADER}" --library-path "$d/lib" "$d/edgesparse_runner" "$@"
"""


def assemble(out: Path, sysroot: Path) -> list[Path]:
    """Write the bundle into `out` (replaced whole); return its files."""
    runner, *libs = runner_bundle("aarch64", system=sysroot)
    if LOADER not in {lib.name for lib in libs}:
        raise SystemExit(f"{LOADER} not found in {sysroot} (install libc6-dev-arm64-cross)")
    staging = out.with_name(out.name + ".part")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "lib").mkdir(parents=True)
    shutil.copy(runner, staging / "edgesparse_runner")  # copy follows symlinks: plain files only
    for lib in libs:
        shutil.copy(lib, staging / "lib" / lib.name)
    (staging / "edgesparse-bench").write_text(LAUNCHER)
    for path in staging.rglob("*"):
        if path.is_file():
            path.chmod(0o755)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return sorted(p for p in out.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--sysroot", type=Path, default=Path("/usr/aarch64-linux-gnu/lib"))
    args = parser.parse_args()
    files = assemble(args.out, args.sysroot)
    size = sum(p.stat().st_size for p in files) / 2**20
    print(f"{args.out}: {len(files)} files, {size:.1f} MiB; run: sh {args.out}/edgesparse-bench MODEL.pte")


if __name__ == "__main__":
    main()
