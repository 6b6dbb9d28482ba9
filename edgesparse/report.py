"""`edgesparse report DIR... -o report.html`: one static page from what sweeps, exports and profiles
left on disk.

Under each DIR it reads sweep rows (`*.jsonl`), `manifest.json` files (each layer's sparse/dense
decision and its reason) and `edgesparse profile --json` results (per-operator tops), and pairs
measurements for `compare` deltas (devices/compare.py's noise band). The page is self-contained: the
Pareto plots are SVG drawn here, the style and the table-sorting script are inline, nothing is
fetched. Every string that comes from a file is HTML-escaped.
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path

from edgesparse.errors import EdgesparseError

MAX_JSON_BYTES = 32 << 20  # a bigger .json is not one of ours (e.g. a raw ORT trace): skipped, and said so
FORMAT_MARKERS = {"pte": "circle", "onnx": "square", "tflite": "triangle"}


def esc(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def num(value) -> float | None:
    """A finite number from a file, or None (a field of the wrong type is shown as missing, not trusted)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


# ---------------------------------------------------------------- reading what is there

def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise EdgesparseError(f"cannot read {path}: {exc.strerror}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise EdgesparseError(f"{path} is not valid JSON: {exc}") from None


def _read_jsonl(path: Path) -> tuple[list, bool]:
    """The rows; a torn last line (a killed sweep) is dropped and reported, a bad line elsewhere is an error."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgesparseError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    rows, torn = [], False
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            if i == len(lines) - 1:
                torn = True
                continue
            raise EdgesparseError(f"{path}:{i + 1} is not valid JSON") from None
    return rows, torn


def is_profile(data) -> bool:
    return isinstance(data, dict) and {"p50_ms", "std_ms", "count"} <= data.keys()


def is_sweep_row(row) -> bool:
    return isinstance(row, dict) and isinstance(row.get("key"), str) and "format" in row


def collect(dirs: list[Path]) -> dict:
    """Everything reportable under `dirs`, plus notes on what was skipped and why."""
    from edgesparse.manifest import validate

    found = {"dirs": [], "sweeps": [], "manifests": [], "profiles": [], "notes": []}
    for index, root in enumerate(dirs):
        root = Path(root)
        if not root.is_dir():
            raise EdgesparseError(f"no such folder: {root}", hint="pass sweep output or export folders")
        label = f"[{index + 1}] {root}"
        found["dirs"].append(label)
        for path in _walk(root):
            rel = path.relative_to(root).as_posix()
            if path.suffix == ".jsonl":
                rows, torn = _read_jsonl(path)
                sweep_rows = [r for r in rows if is_sweep_row(r)]
                if not sweep_rows:
                    found["notes"].append(f"{label} {rel}: no sweep rows, not used")
                    continue
                if torn:
                    found["notes"].append(f"{label} {rel}: torn last line (an interrupted sweep) ignored")
                if len(sweep_rows) < len(rows):
                    found["notes"].append(f"{label} {rel}: {len(rows) - len(sweep_rows)} line(s) that are not sweep rows ignored")
                found["sweeps"].append({"dir": index, "label": label, "rel": rel, "folder": path.parent, "rows": sweep_rows})
            elif path.suffix == ".json":
                if path.stat().st_size > MAX_JSON_BYTES:
                    found["notes"].append(f"{label} {rel}: {path.stat().st_size >> 20} MiB, too big for one of ours, not read")
                    continue
                data = _read_json(path)
                if path.name == "manifest.json":
                    try:
                        validate(data if isinstance(data, dict) else {})
                    except EdgesparseError as exc:
                        found["notes"].append(f"{label} {rel}: not a valid manifest ({exc.message}), not used")
                        continue
                    found["manifests"].append({"dir": index, "label": label, "rel": rel, "data": data})
                elif is_profile(data):
                    found["profiles"].append({"dir": index, "label": label, "rel": rel, "data": data})
    if not (found["sweeps"] or found["manifests"] or found["profiles"]):
        raise EdgesparseError(f"nothing to report under {', '.join(str(d) for d in dirs)}",
                              hint="expected sweep results (*.jsonl), manifest.json or `edgesparse profile --json` files")
    return found


def _walk(root: Path):
    """Files under root in a stable order; hidden entries (staging folders, temp files) are skipped."""
    for parent, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and name.endswith((".json", ".jsonl")):
                yield Path(parent) / name


# ---------------------------------------------------------------- derived numbers

def device_of(row: dict) -> str:
    return str(row.get("device") or "unknown device")


def measured(row: dict) -> bool:
    return num(row.get("p50_ms")) is not None


def pareto_keys(rows: list[dict]) -> set[int]:
    """Indices (into rows) no other row beats on latency, accuracy and size together; rows without an
    accuracy compete on latency and size only (the sweep's own plot leaves them out)."""
    def point(r):
        return (num(r.get("p50_ms")), -(num(r.get("accuracy")) or 0.0), num(r.get("bytes")) or 0.0)

    pts = {i: point(r) for i, r in enumerate(rows) if measured(r)}
    front = set()
    for i, p in pts.items():
        if not any(all(a <= b for a, b in zip(q, p)) and q != p for j, q in pts.items() if j != i):
            front.add(i)
    return front


def compare_pairs(found: dict) -> list[dict]:
    """compare() on (baseline, candidate) pairs: within a sweep each cell against the dense fp32 cell of
    its device and format; across DIRs the same cell / the same profile file against the first DIR's."""
    from edgesparse.devices.compare import compare

    pairs, unpaired = [], []

    def add(kind, base_label, cand_label, a, b):
        if not (is_profile(a) and is_profile(b)) or not all(num(x.get(k)) is not None for x in (a, b)
                                                            for k in ("p50_ms", "std_ms", "count")):
            unpaired.append(f"{cand_label} vs {base_label}")
            return
        if num(b["p50_ms"]) <= 0:
            return
        # only the numeric fields: a row or file with a null or text metric loses that metric, not the page
        result = compare({k: v for k, v in a.items() if num(v) is not None}, {k: v for k, v in b.items() if num(v) is not None})
        pairs.append({"kind": kind, "a": base_label, "b": cand_label, **result})

    for sweep in found["sweeps"]:
        rows = sweep["rows"]
        for row in rows:
            if not measured(row) or (row.get("prune") == 0 and row.get("quant") == "none"):
                continue
            base = next((r for r in rows if measured(r) and r.get("prune") == 0 and r.get("quant") == "none"
                         and r.get("format") == row.get("format") and device_of(r) == device_of(row)), None)
            if base is not None:
                add("within sweep", f"{device_of(base)}: {base['key']}", f"{device_of(row)}: {row['key']}", base, row)
    firsts = [s for s in found["sweeps"] if s["dir"] == 0]
    for sweep in found["sweeps"]:
        if sweep["dir"] == 0:
            continue
        for first in (f for f in firsts if f["rel"] == sweep["rel"]):
            index = {(r["key"], device_of(r)): r for r in first["rows"] if measured(r)}
            for row in sweep["rows"]:
                base = index.get((row["key"], device_of(row)))
                if base is not None and measured(row):
                    add("across folders", f"{first['label']} {base['key']} ({device_of(base)})",
                        f"{sweep['label']} {row['key']} ({device_of(row)})", base, row)
    first_profiles = {p["rel"]: p for p in found["profiles"] if p["dir"] == 0}
    for prof in found["profiles"]:
        base = first_profiles.get(prof["rel"])
        if prof["dir"] != 0 and base is not None:
            add("across folders", f"{base['label']} {base['rel']}", f"{prof['label']} {prof['rel']}", base["data"], prof["data"])
    if unpaired:
        found["notes"].append(f"{len(unpaired)} pair(s) not compared: no std_ms / count to give a noise band (rows "
                              f"from a sweep that did not record them), e.g. {unpaired[0]}")
    return pairs


# ---------------------------------------------------------------- SVG plots

def _ticks(lo: float, hi: float, n: int = 5, cap: float | None = None) -> list[float]:
    """Round axis ticks around [lo, hi], padded so markers sit inside the frame; none past `cap`."""
    pad = max((hi - lo) * 0.08, abs(hi) * 0.02, 1e-9)  # near-equal values still get readable ticks
    lo, hi = (lo - pad if lo - pad >= 0 or lo < 0 else 0.0), hi + pad  # latency and size stay >= 0
    if cap is not None and lo < cap:
        hi = min(hi, cap)
    hi = hi if hi > lo else lo + pad
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(int(math.ceil((hi - start) / step)) + 1)]


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def scatter_svg(points: list[dict], xlabel: str, ylabel: str, title: str, y_cap: float | None = None) -> str:
    """points: x, y, r (marker radius), shape, front (bool), label, tip. A plain SVG scatter with axes."""
    w, h, left, right, top, bottom = 520, 340, 64, 16, 28, 46
    xs, ys = [p["x"] for p in points], [p["y"] for p in points]
    xt, yt = _ticks(min(xs), max(xs)), _ticks(min(ys), max(ys), cap=y_cap)
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]

    def sx(v):
        return left + (v - x0) / ((x1 - x0) or 1) * (w - left - right)

    def sy(v):
        return h - bottom - (v - y0) / ((y1 - y0) or 1) * (h - top - bottom)

    out = [f'<svg class="plot" role="img" width="{w}" height="{h}" viewBox="0 0 {w} {h}" xmlns="http://www.w3.org/2000/svg">',
           f'<title>{esc(title)}</title>',
           f'<text x="{w / 2}" y="16" text-anchor="middle" class="ptitle">{esc(title)}</text>']
    for v in xt:
        out.append(f'<line x1="{sx(v):.1f}" x2="{sx(v):.1f}" y1="{top}" y2="{h - bottom}" class="grid"/>'
                   f'<text x="{sx(v):.1f}" y="{h - bottom + 14}" text-anchor="middle">{_fmt(v)}</text>')
    for v in yt:
        out.append(f'<line x1="{left}" x2="{w - right}" y1="{sy(v):.1f}" y2="{sy(v):.1f}" class="grid"/>'
                   f'<text x="{left - 6}" y="{sy(v) + 4:.1f}" text-anchor="end">{_fmt(v)}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{w - left - right}" height="{h - top - bottom}" class="frame"/>')
    out.append(f'<text x="{(left + w - right) / 2}" y="{h - 8}" text-anchor="middle">{esc(xlabel)}</text>')
    out.append(f'<text transform="translate(14 {(top + h - bottom) / 2}) rotate(-90)" text-anchor="middle">{esc(ylabel)}</text>')
    for p in sorted(points, key=lambda p: p["front"]):  # the front drawn last, on top
        cx, cy, r = sx(p["x"]), sy(p["y"]), p["r"]
        cls = "pt front" if p["front"] else "pt"
        tip = f"<title>{esc(p['tip'])}</title>"
        if p["shape"] == "square":
            out.append(f'<rect class="{cls}" x="{cx - r:.1f}" y="{cy - r:.1f}" width="{2 * r:.1f}" height="{2 * r:.1f}">{tip}</rect>')
        elif p["shape"] == "triangle":
            out.append(f'<polygon class="{cls}" points="{cx:.1f},{cy - r:.1f} {cx - r:.1f},{cy + r:.1f} {cx + r:.1f},{cy + r:.1f}">{tip}</polygon>')
        else:
            out.append(f'<circle class="{cls}" cx="{cx:.1f}" cy="{cy:.1f}" r="{r:.1f}">{tip}</circle>')
        out.append(f'<text class="plabel" x="{cx + r + 2:.1f}" y="{cy - 2:.1f}">{esc(p["label"])}</text>')
    out.append("</svg>")
    return "".join(out)


def pareto_section(found: dict) -> str:
    """Per device: latency vs accuracy (area ~ size) and latency vs size, Pareto front in red."""
    by_device: dict[str, list[dict]] = {}
    for sweep in found["sweeps"]:
        for row in sweep["rows"]:
            if measured(row):
                by_device.setdefault(device_of(row), []).append(dict(row, _src=sweep["label"]))
    if not by_device:
        return '<p class="none">No measured sweep rows: no Pareto plot.</p>'
    parts = []
    for device, rows in sorted(by_device.items()):
        front = pareto_keys(rows)
        biggest = max(num(r.get("bytes")) or 0 for r in rows) or 1
        multi = len({r["_src"] for r in rows}) > 1
        accuracy_pts, size_pts = [], []
        for i, r in enumerate(rows):
            size = num(r.get("bytes"))
            acc = num(r.get("accuracy"))
            label = f"{_g(r.get('prune'))}/{r.get('quant', '?')}/{r.get('format', '?')}" + (f" {r['_src'].split(']')[0]}]" if multi else "")
            tip = (f"{r['key']} on {device}: p50 {1e3 * num(r['p50_ms']):.1f} us"
                   + (f", accuracy {100 * acc:.2f}%" if acc is not None else "")
                   + (f", {size / 1024:.1f} KiB" if size is not None else "") + (", Pareto front" if i in front else ""))
            base = {"shape": FORMAT_MARKERS.get(str(r.get("format")), "circle"), "front": i in front, "label": label, "tip": tip,
                    "x": 1e3 * num(r["p50_ms"])}
            if acc is not None:
                accuracy_pts.append(base | {"y": 100 * acc, "r": 3 + 9 * math.sqrt((size or 0) / biggest)})
            if size is not None:
                size_pts.append(base | {"y": size / 1024, "r": 4.5})
        plots = []
        if accuracy_pts:
            plots.append(scatter_svg(accuracy_pts, "p50 latency (us)", "accuracy (%)", "latency vs accuracy (area ~ size)", y_cap=100.0))
        if size_pts:
            plots.append(scatter_svg(size_pts, "p50 latency (us)", "file size (KiB)", "latency vs size"))
        parts.append(f'<div class="device"><h3>{esc(device)}</h3><div class="plots">{"".join(plots)}</div></div>')
    legend = ('<p class="legend"><span class="sw front"></span> Pareto front (no other cell is at least as fast, as accurate '
              'and as small, and better in one) <span class="sw"></span> dominated. Marker: circle .pte, square .onnx, '
              'triangle .tflite. Hover a marker for its numbers.</p>')
    return legend + "".join(parts)


def _g(v) -> str:
    return f"{v:g}" if num(v) is not None else esc(v)


# ---------------------------------------------------------------- tables

def table(headers: list[str], rows: list[list], sortable: bool = True, cls: str = "") -> str:
    """rows: cells as (text, sort_value) or text; text is escaped here."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for cell in row:
            text, key = cell if isinstance(cell, tuple) else (cell, None)
            attr = f' data-v="{key:.9g}"' if num(key) is not None else ""
            cells.append(f"<td{attr}>{esc(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<table class="{"sortable " if sortable else ""}{cls}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


def _n(v, scale: float = 1.0, fmt: str = "{:.1f}", suffix: str = ""):
    x = num(v)
    return ("-", None) if x is None else (fmt.format(x * scale) + suffix, x * scale)


def sweep_section(found: dict) -> str:
    if not found["sweeps"]:
        return '<p class="none">No sweep results (*.jsonl) found.</p>'
    headers = ["source", "device", "prune", "quant", "format", "pattern", "accuracy", "p50 us", "p50 noise +- us", "p90 us",
               "size KiB", "peak RSS MB", "sparse layers", "Pareto", "status"]
    rows = []
    for sweep in found["sweeps"]:
        by_device: dict[str, list[int]] = {}
        for i, r in enumerate(sweep["rows"]):
            by_device.setdefault(device_of(r), []).append(i)
        front = set()
        for idx in by_device.values():
            front |= {idx[j] for j in pareto_keys([sweep["rows"][i] for i in idx])}
        for i, r in enumerate(sweep["rows"]):
            std, count = num(r.get("std_ms")), num(r.get("count"))
            noise = _n(1.2533 * std / math.sqrt(max(count, 1)) if std is not None and count else None, 1e3, "{:.2f}")
            status = r.get("skipped") or r.get("failed") or r.get("error") or ("ok" if measured(r) else "not measured")
            rows.append([f"{sweep['label']} {sweep['rel']}", device_of(r), _n(r.get("prune"), 1, "{:g}"), str(r.get("quant", "")),
                         str(r.get("format", "")), str(r.get("pattern", "")), _n(r.get("accuracy"), 100, "{:.2f}", "%"),
                         _n(r.get("p50_ms"), 1e3), noise, _n(r.get("p90_ms"), 1e3), _n(r.get("bytes"), 1 / 1024),
                         _n(r.get("peak_rss_mb")), _n(r.get("sparse_layers"), 1, "{:.0f}"),
                         "yes" if i in front else "", str(status)])
    return ('<p>Click a column header to sort. The noise band is the standard error of the median '
            '(1.2533 std / sqrt(n)), as `compare` uses it.</p>' + table(headers, rows, cls="sweep"))


def layers_section(found: dict) -> str:
    if not found["manifests"]:
        return '<p class="none">No manifest.json found.</p>'
    known = ["name", "shape", "sparsity", "pattern", "dtype", "kernel", "reason"]
    parts = []
    for n, m in enumerate(found["manifests"]):
        data = m["data"]
        layers = data["layers"]
        sparse = sum(1 for layer in layers if layer.get("kernel") != "dense-xnnpack")
        extras = sorted({k for layer in layers for k, v in layer.items() if k not in known and isinstance(v, (str, int, float))})
        rows = [[str(layer["name"]), "x".join(str(d) for d in layer["shape"]), _n(layer["sparsity"], 100, "{:.1f}", "%"),
                 str(layer["pattern"] or "-"), str(layer["dtype"]), str(layer["kernel"]), str(layer["reason"])]
                + [str(layer.get(k, "")) for k in extras] for layer in layers]
        arts = ", ".join(f"{a['format']} {a['bytes'] / 1024:.1f} KiB ({'verified' if a['verified'] else 'NOT verified'}"
                         + (f", accuracy {100 * a['accuracy']:.2f}%" if num(a.get("accuracy")) is not None else "") + ")"
                         for a in data["artifacts"])
        recipe = json.dumps(data["recipe"], sort_keys=True)
        warnings = "".join(f'<p class="warn">{esc(w)}</p>' for w in data.get("warnings", []) if isinstance(w, str))
        parts.append(f'<details{" open" if n == 0 else ""}><summary>{esc(m["label"])} {esc(m["rel"])}: {esc(data["model"])}, '
                     f'{sparse} of {len(layers)} layers on sparse kernels, overall sparsity {100 * data["sparsity_overall"]:.1f}%'
                     f'</summary><p class="meta">recipe {esc(recipe)}<br>artifacts: {esc(arts or "none")}</p>{warnings}'
                     + table(known + extras, rows, cls="layers") + "</details>")
    return "".join(parts)


def per_op_section(found: dict, top: int = 10) -> str:
    if not found["profiles"]:
        return '<p class="none">No `edgesparse profile --json` results found.</p>'
    summary = []
    for p in found["profiles"]:
        d = p["data"]
        summary.append([f"{p['label']} {p['rel']}", str(d.get("device", "local")), str(d.get("runtime", "")),
                        str(d.get("threads", "")), _n(d.get("p50_ms"), 1e3), _n(d.get("p90_ms"), 1e3),
                        _n(d.get("count"), 1, "{:.0f}"), _n(d.get("load_ms"), 1, "{:.1f}"), _n(d.get("peak_rss_mb")),
                        str(d.get("timing_note", ""))])
    parts = [table(["profile", "device", "runtime", "threads", "p50 us", "p90 us", "runs", "load ms", "peak RSS MB", "note"],
                   summary, cls="profiles")]
    with_ops = [p for p in found["profiles"] if isinstance(p["data"].get("per_op"), list) and p["data"]["per_op"]]
    if not with_ops:
        parts.append('<p class="none">No profile has per-operator rows (`edgesparse profile --per-op`).</p>')
    for p in with_ops:
        ops = [o for o in p["data"]["per_op"] if isinstance(o, dict) and num(o.get("median_ms")) is not None]
        ops.sort(key=lambda o: -num(o["median_ms"]))
        rows = [[str(o.get("name", "")), str(o.get("op", "")), _n(o.get("calls"), 1, "{:.0f}"), _n(o["median_ms"], 1e3)]
                for o in ops[:top]]
        parts.append(f'<h3>{esc(p["label"])} {esc(p["rel"])}: top {len(rows)} of {len(ops)} operators</h3>'
                     + table(["operator", "kind", "calls", "median us / call"], rows, cls="ops"))
    return "".join(parts)


def compare_section(pairs: list[dict]) -> str:
    if not pairs:
        return ('<p class="none">No pairs to compare (a sweep with a dense fp32 cell, or the same sweep / profile '
                'file under two folders, gives some).</p>')
    rows = []
    for c in pairs:
        p50 = next(r for r in c["rows"] if r["metric"] == "p50_ms")
        rss = next((r for r in c["rows"] if r["metric"] == "peak_rss_mb"), None)
        rows.append([c["kind"], c["a"], c["b"], _n(p50["a"], 1e3), _n(p50["b"], 1e3), _n(p50["delta"], 1e3, "{:+.1f}"),
                     _n(p50["delta_pct"], 1, "{:+.1f}", "%"), _n(c["p50_noise_ms"], 1e3, "{:.2f}"), c["verdict"],
                     _n(c["speedup_p50"], 1, "{:.2f}", "x"), _n(rss["delta"] if rss else None, 1, "{:+.1f}")])
    return ('<p>Within a sweep each cell is compared with the dense fp32 cell (prune 0, quant none) of its device and '
            'format; across folders, the same cell or profile file with the first folder\'s. "within noise": the p50 '
            'delta is under twice the combined standard error of the two medians.</p>'
            + table(["pair", "A (baseline)", "B", "A p50 us", "B p50 us", "delta us", "delta %", "noise band +- us",
                     "verdict", "speedup", "peak RSS delta MB"], rows, cls="compare"))


# ---------------------------------------------------------------- the page

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:20px;color:#222;max-width:1400px}
h1{font-size:22px;margin:0 0 6px} h2{font-size:18px;margin:26px 0 8px;border-bottom:1px solid #ccc}
h3{font-size:15px;margin:14px 0 6px}
table{border-collapse:collapse;margin:6px 0 12px;font-size:12.5px}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:left;vertical-align:top}
td[data-v]{text-align:right;font-variant-numeric:tabular-nums}
th{background:#f3f3f3} table.sortable th{cursor:pointer} th.asc:after{content:" \\25B2"} th.desc:after{content:" \\25BC"}
table.layers td:last-child{max-width:560px}
.plots{display:flex;flex-wrap:wrap;gap:12px}
svg.plot{background:#fff;border:1px solid #ddd} svg.plot text{font-size:11px;fill:#333}
svg.plot .ptitle{font-size:12px;font-weight:600} svg.plot .plabel{font-size:9.5px;fill:#555}
.grid{stroke:#eee} .frame{fill:none;stroke:#999}
.pt{fill:#1f77b4;fill-opacity:.65;stroke:#124;stroke-width:.6} .pt.front{fill:#d62728;stroke:#611}
.sw{display:inline-block;width:10px;height:10px;border-radius:5px;background:#1f77b4;margin:0 3px 0 8px}
.sw.front{background:#d62728}
.none,.meta,.legend{color:#555} .warn{color:#a40} ul.notes{color:#555;font-size:12.5px}
details{margin:4px 0} summary{cursor:pointer}
section{content-visibility:auto;contain-intrinsic-size:auto 900px}
"""

# Sections off screen are not laid out until scrolled to (content-visibility), which keeps a page of
# hundreds of rows quick to open. Clicking a header sorts by data-v (numbers) or text; errors and the load time are written into the
# page so a headless browser's DOM dump shows them.
SCRIPT = """
(function(){
var errs=[];
window.addEventListener('error',function(e){errs.push(String(e.message));show();});
function show(){var el=document.getElementById('page-errors');if(el){el.textContent=errs.join('\\n');el.dataset.count=errs.length;}}
function key(td){var v=td.getAttribute('data-v');return v===null?td.textContent:parseFloat(v);}
document.querySelectorAll('table.sortable th').forEach(function(th){th.addEventListener('click',function(){
  var table=th.closest('table'),body=table.tBodies[0],i=Array.prototype.indexOf.call(th.parentNode.children,th);
  var asc=!th.classList.contains('asc');
  th.parentNode.querySelectorAll('th').forEach(function(h){h.classList.remove('asc','desc');});
  th.classList.add(asc?'asc':'desc');
  var rows=Array.prototype.slice.call(body.rows);
  rows.sort(function(a,b){var x=key(a.cells[i]),y=key(b.cells[i]);
    if(typeof x===typeof y){return (x<y?-1:x>y?1:0)*(asc?1:-1);} return typeof x==='number'?-1:1;});
  rows.forEach(function(r){body.appendChild(r);});
});});
window.addEventListener('load',function(){
  var t=document.getElementById('page-timing');
  t.dataset.loadMs=performance.now().toFixed(1);
  var boxes=[];
  document.querySelectorAll('svg.plot, table.sweep').forEach(function(el){var r=el.getBoundingClientRect();
    boxes.push(el.tagName.toLowerCase()+':'+[r.left,r.top,r.width,r.height].map(Math.round).join(','));});
  t.dataset.boxes=boxes.join(';');
  show();
});
})();
"""


def render(found: dict, title: str = "edgesparse report") -> str:
    pairs = compare_pairs(found)
    n_rows = sum(len(s["rows"]) for s in found["sweeps"])
    summary = (f"{len(found['sweeps'])} sweep result file(s) with {n_rows} row(s), {len(found['manifests'])} manifest(s), "
               f"{len(found['profiles'])} profile(s) "
               f"({sum(1 for p in found['profiles'] if p['data'].get('per_op'))} with per-operator times), "
               f"{len(pairs)} comparison(s)")
    notes = "".join(f"<li>{esc(n)}</li>" for n in found["notes"])
    dirs = "".join(f"<li>{esc(d)}</li>" for d in found["dirs"])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{STYLE}</style></head>
<body>
<h1>{esc(title)}</h1>
<p>Found: {esc(summary)}.</p>
<ul class="dirs">{dirs}</ul>
{f'<p>Not used, and why:</p><ul class="notes">{notes}</ul>' if notes else ''}
<section><h2 id="pareto">Pareto front per device</h2>
{pareto_section(found)}</section>
<section><h2 id="sweep">Sweep table</h2>
{sweep_section(found)}</section>
<section><h2 id="compare">Compare: deltas and their noise band</h2>
{compare_section(pairs)}</section>
<section><h2 id="profiles">Profiles and per-operator tops</h2>
{per_op_section(found)}</section>
<section><h2 id="layers">Per-layer sparse / dense decisions</h2>
{layers_section(found)}</section>
<pre id="page-errors" data-count="0" hidden></pre><div id="page-timing" hidden></div>
<script>{SCRIPT}</script>
</body></html>
"""


def build_report(dirs: list[Path], output: Path) -> dict:
    """Write the page atomically; returns what was found (counts) for the CLI to print."""
    from edgesparse._io import write_bytes_atomic

    if not dirs:
        raise EdgesparseError("no folders given", hint="edgesparse report DIR... -o report.html")
    found = collect([Path(d) for d in dirs])
    page = render(found)
    write_bytes_atomic(output, page.encode())
    return {"sweeps": len(found["sweeps"]), "rows": sum(len(s["rows"]) for s in found["sweeps"]),
            "manifests": len(found["manifests"]), "profiles": len(found["profiles"]), "notes": found["notes"],
            "bytes": len(page.encode())}
