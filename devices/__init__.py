"""Where artifacts run and get measured. `profile(artifact, device)` is the one entry point;
each device kind (local today; ssh, adb, serial later) implements the same small interface."""

from __future__ import annotations

from edgesparse.errors import EdgesparseError

DEVICES = ("local",)


def profile(artifact, device: str = "local", **options) -> dict:
    if device == "local":
        from edgesparse.devices.local import profile_local

        return profile_local(artifact, **options)
    raise EdgesparseError(f"unknown device {device!r} (available: {', '.join(DEVICES)})")
