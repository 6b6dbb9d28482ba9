"""Where artifacts run and get measured. `profile(artifact, device)` is the one entry point; a
device spec (`local`, `ssh://user@host[:port]`) becomes a transport (transports.py) with one small
interface: run, push, pull, info."""

from __future__ import annotations

from edgesparse.devices.transports import DEVICE_FORMS, parse_device

__all__ = ["DEVICE_FORMS", "parse_device", "profile"]


def profile(artifact, device: str = "local", **options) -> dict:
    transport = parse_device(device)
    if transport.remote:
        from edgesparse.devices.remote import profile_remote

        return profile_remote(transport, artifact, **options)
    from edgesparse.devices.local import profile_local

    return profile_local(artifact, **options)
