"""Sparse or dense, by measurement: the crossover table written by
`edgesparse bench kernels --crossover runtime_kernels/crossover.json`.

For a layer, the nearest measured shape (same op, pattern and dtype; nearest activation rows, then
nearest weight size, in log scale) gives the lowest sparsity from which our kernel beat dense
XNNPACK by the bench's margin (fp32 against fp32; int8 entries, "dtype": "int8", against int8). Without a measurement, DEFAULT_MIN_SPARSITY applies.
`use_table(path)` (export --target) makes another table decide, e.g. one measured on the target
device, and each layer's reason then names that table.
"""

from __future__ import annotations

import contextlib
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


# `export --target`: another table (measured on the target device) decides while it is active
_active: tuple[str, list[dict]] | None = None


def load_table(path) -> dict:
    """A crossover table file (bench kernels --crossover / --device), checked; one-line errors."""
    from pathlib import Path

    from edgesparse.errors import EdgesparseError

    try:
        table = json.loads(Path(path).read_text())
        if not isinstance(table.get("table"), list) or not all({"op", "pattern", "rows", "in", "out", "min_sparsity"} <= e.keys()
                                                               for e in table["table"]):
            raise ValueError("no valid 'table' list")
    except (OSError, ValueError, AttributeError) as exc:
        raise EdgesparseError(f"{path} is not a crossover table: {exc}",
                              hint="write one with `edgesparse bench kernels --crossover FILE` or `--device URL`") from None
    return table


def check_architecture(table: dict, name: str, machine: str) -> None:
    """Refuse a table measured on another architecture than the target's (its crossovers are
    another SIMD width's, cache's and kernel's)."""
    from edgesparse.errors import EdgesparseError

    measured = table.get("machine")
    if measured and measured != machine:
        raise EdgesparseError(f"{name} was measured on {measured}, not on the target's {machine}: its crossovers "
                              f"would decide this export with another architecture's kernels",
                              hint=f"measure on the target: edgesparse bench kernels --device URL")


@contextlib.contextmanager
def use_table(path, name: str | None = None):
    """Decide sparse or dense with the table at `path` (named `name` in each layer's reason)."""
    global _active
    table = load_table(path)
    saved, _active = _active, (name or str(path), table["table"])
    try:
        yield table
    finally:
        _active = saved


def min_sparsity(op: str, pattern: str, rows: int | None, inp: int, out: int, dtype: str = "float32") -> tuple[float | None, str]:
    """(lowest sparsity worth running sparse, or None if never; where that number comes from,
    naming the table when it is not the built-in one). dtype "int8": our int8 kernel against dense
    XNNPACK int8 (entries with "dtype": "int8"; entries without one are fp32)."""
    name, table = _active if _active else (None, _table())
    where = f" in {name}" if name else ""
    entries = [e for e in table if e["op"] == op and e["pattern"] == pattern and e.get("dtype", "float32") == dtype]
    if not entries or rows is None:
        return DEFAULT_MIN_SPARSITY, f"default threshold (no {dtype} measurement for this op/pattern{where})"
    nearest = min(entries, key=lambda e: (abs(math.log(e["rows"] / rows)), abs(math.log(e["in"] * e["out"] / (inp * out)))))
    return nearest["min_sparsity"], f"measured at {nearest['op']} {nearest['shape']}{where}"
