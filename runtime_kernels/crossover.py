"""Sparse or dense, by measurement: the crossover table written by
`edgesparse bench kernels --crossover runtime_kernels/crossover.json`.

For a layer, the nearest measured shape (same op and pattern; nearest activation rows, then
nearest weight size, in log scale) gives the lowest sparsity from which our kernel beat dense
XNNPACK fp32 by the bench's margin. Without a measurement, DEFAULT_MIN_SPARSITY applies.
"""

from __future__ import annotations

import functools
import json
import math

from edgesparse.runtime_kernels import SOURCE_DIR

TABLE = SOURCE_DIR / "crossover.json"
DEFAULT_MIN_SPARSITY = 0.5


@functools.lru_cache(maxsize=1)
def _table() -> list[dict]:
    try:
        return json.loads(TABLE.read_text())["table"]
    except (OSError, ValueError, KeyError):
        return []


def min_sparsity(op: str, pattern: str, rows: int | None, inp: int, out: int) -> tuple[float | None, str]:
    """(lowest sparsity worth running sparse, or None if never; where that number comes from)."""
    entries = [e for e in _table() if e["op"] == op and e["pattern"] == pattern]
    if not entries or rows is None:
        return DEFAULT_MIN_SPARSITY, "default threshold (no measurement for this op/pattern)"
    nearest = min(entries, key=lambda e: (abs(math.log(e["rows"] / rows)), abs(math.log(e["in"] * e["out"] / (inp * out)))))
    return nearest["min_sparsity"], f"measured at {nearest['op']} {nearest['shape']}"
