"""Where artifacts run and get measured. `profile(artifact, device)` is the one entry point; a
device spec (`local`, `ssh://user@host[:port]`) becomes a transport (transports.py) with one small
interface: run, push, pull, info."""

from __future__ import annotations

from edgesparse.devices.transports import DEVICE_FORMS, parse_device

__all__ = ["DEVICE_FORMS", "parse_device", "profile"]


# Steady-state floors: benchmark_model-like quick runs, MLPerf single-stream-like report runs.
MODES = {"quick": (50, 1.0), "report": (1024, 60.0)}


def profile(artifact, device: str = "local", mode: str | None = None, **options) -> dict:
    """Time `artifact` on `device`. mode "quick" (>= 50 runs and >= 1 s) or "report" (>= 1024
    runs and >= 60 s) raises `runs` / `min_seconds` to its floors; None times exactly `runs`."""
    from edgesparse.errors import EdgesparseError

    if mode is not None:
        if mode not in MODES:
            raise EdgesparseError(f"unknown mode {mode!r} (available: {', '.join(MODES)})")
        floor_runs, floor_seconds = MODES[mode]
        options["runs"] = max(options.get("runs", 100), floor_runs)
        options["min_seconds"] = max(options.get("min_seconds", 0.0), floor_seconds)
    transport = parse_device(device)
    if transport.remote:
        from edgesparse.devices.remote import profile_remote

        result = profile_remote(transport, artifact, **options)
    else:
        from edgesparse.devices.local import profile_local

        result = profile_local(artifact, **options)
    result.update(mode=mode or "runs", cpus=options.get("cpus") or "all")
    return result
