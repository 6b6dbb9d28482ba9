"""The manifest: one JSON record per export that every later stage (profile, inspect, sweep) reads.

`validate` checks the fields other tools rely on, so a schema change breaks a test, not a user.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from edgesparse.errors import EdgesparseError

SCHEMA_VERSION = 1
REQUIRED = {
    "schema_version": int, "model": str, "recipe": dict, "sparsity_overall": float, "quantization": dict,
    "layers": list, "metrics": dict, "artifacts": list,
}
LAYER_REQUIRED = {"name": str, "shape": list, "sparsity": float, "pattern": (str, type(None)), "dtype": str, "kernel": str,
                  "reason": str}
ARTIFACT_REQUIRED = {"format": str, "path": str, "bytes": int, "sha256": str, "verified": bool}


def new(model: str, recipe: dict, sparsity_overall: float, quantization: dict, layers: list[dict], metrics: dict) -> dict:
    from edgesparse import __version__

    return {
        "schema_version": SCHEMA_VERSION,
        "edgesparse_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": model,
        "recipe": recipe,
        "sparsity_overall": float(sparsity_overall),
        "quantization": quantization,
        "layers": layers,
        "metrics": metrics,
        "artifacts": [],
    }


def _check(obj: dict, required: dict, where: str) -> None:
    for key, kind in required.items():
        if key not in obj:
            raise EdgesparseError(f"manifest {where}: missing {key!r}")
        if not isinstance(obj[key], kind) or (kind is float and isinstance(obj[key], bool)):
            raise EdgesparseError(f"manifest {where}: {key!r} has type {type(obj[key]).__name__}")


def validate(manifest: dict) -> dict:
    _check(manifest, REQUIRED, "")
    for layer in manifest["layers"]:
        _check(layer, LAYER_REQUIRED, f"layer {layer.get('name')}")
        if not layer["reason"].strip():
            raise EdgesparseError(f"manifest layer {layer['name']}: no reason for its kernel choice")
    for artifact in manifest["artifacts"]:
        _check(artifact, ARTIFACT_REQUIRED, f"artifact {artifact.get('path')}")
        if not any(k in artifact for k in ("max_abs_error", "cosine")):
            raise EdgesparseError(f"manifest artifact {artifact['path']}: no error metric")
    return manifest


def load(path: str | Path) -> dict:
    path = Path(path)
    try:
        return validate(json.loads(path.read_text()))
    except FileNotFoundError:
        raise EdgesparseError(f"manifest not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise EdgesparseError(f"{path} is not valid JSON: {exc}") from None
