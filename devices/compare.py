"""`edgesparse compare A.json B.json`: what changed between two profiles, and whether it is more
than noise.

The noise band of a median: its standard error is about 1.2533 * std / sqrt(n) for a run of n
timings; the difference of two medians is called real when it exceeds twice the combined error
(about 95%). Memory and load time are single numbers: their deltas are reported as measured.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from edgesparse.errors import EdgesparseError

METRICS = ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms", "load_ms", "first_run_ms", "peak_rss_mb")


def load_profile(path: str | Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise EdgesparseError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError:
        raise EdgesparseError(f"{path} is not JSON") from None
    if not isinstance(data, dict) or not {"p50_ms", "std_ms", "count"} <= data.keys():
        raise EdgesparseError(f"{path} is not an `edgesparse profile --json` result")
    return data


def median_noise_ms(a: dict, b: dict) -> float:
    """Twice the standard error of the difference of the two medians."""
    se = [1.2533 * r["std_ms"] / math.sqrt(max(r["count"], 1)) for r in (a, b)]
    return 2 * math.hypot(*se)


def compare(a: dict, b: dict) -> dict:
    rows = []
    for metric in METRICS:
        if metric not in a or metric not in b:
            continue
        delta = b[metric] - a[metric]
        rows.append({"metric": metric, "a": a[metric], "b": b[metric], "delta": delta,
                     "delta_pct": 100 * delta / a[metric] if a[metric] else float("nan")})
    noise = median_noise_ms(a, b)
    delta = b["p50_ms"] - a["p50_ms"]
    verdict = "within noise" if abs(delta) <= noise else ("B is faster" if delta < 0 else "B is slower")
    return {"rows": rows, "p50_noise_ms": noise, "verdict": verdict, "speedup_p50": a["p50_ms"] / b["p50_ms"]}
