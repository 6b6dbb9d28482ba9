"""`edgesparse report`: a real sweep (plus a per-operator profile) becomes one self-contained page that
headless Chromium renders with no console errors, showing the plots and the table; bad input is one
line and exit code 2."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
HOSTILE = '<img src=x onerror="throw new Error(1)">&phone'


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "edgesparse.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    """A real two-cell sweep on this machine, a per-operator profile of its sparse cell, and the same rows
    recorded once more under a second (hostile) device name, the way a fleet sweep tags each row."""
    out = tmp_path_factory.mktemp("report") / "sweep"
    proc = cli("sweep", "demo:digits-cnn", "--prune", "0,0.9", "--quant", "none", "--format", "pte", "--runs", 5,
               "--finetune-steps", 0, "-o", out)
    assert proc.returncode == 0, proc.stderr
    proc = cli("profile", out / "prune0.9-none/pte/model.pte", "--runs", 20, "--mode", "runs", "--per-op", "--json",
               out / "prune0.9-none/pte/per-op.json")
    assert proc.returncode == 0, proc.stderr
    results = out / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    with open(results, "a") as f:
        for row in rows:
            f.write(json.dumps(dict(row, device=HOSTILE)) + "\n")
    return out


@pytest.mark.slow
def test_report_page_holds_every_section(sweep_dir, tmp_path):
    page_path = tmp_path / "r" / "report.html"
    proc = cli("report", sweep_dir, "-o", page_path)
    assert proc.returncode == 0, proc.stderr
    page = page_path.read_text()
    # self-contained: nothing fetched, no external script or style
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=", page)
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in page
    assert page.count('<svg class="plot"') == 4  # 2 devices x (accuracy, size)
    assert "<h3>local</h3>" in page and "<h3>&lt;img src=x onerror=&quot;throw new Error(1)&quot;&gt;&amp;phone</h3>" in page
    assert HOSTILE not in page
    assert page.count("<tr>") >= 4 + 1  # sweep rows (and more tables)
    # the per-layer decisions of both cells, with their reasons, from the manifests
    manifests = sorted(sweep_dir.glob("*/*/manifest.json"))
    assert len(manifests) == 2
    for manifest in manifests:
        for layer in json.loads(manifest.read_text())["layers"]:
            assert f"<td>{html.escape(layer['reason'])}</td>" in page
    # the per-operator tops of the --per-op profile
    ops = json.loads((sweep_dir / "prune0.9-none/pte/per-op.json").read_text())["per_op"]
    slowest = max(ops, key=lambda o: o["median_ms"])
    assert "top 10 of" in page and slowest["name"] in page
    # compare: the sparse cell against the dense one, on each device, with the noise band
    assert page.count("<td>within sweep</td>") == 2 and "noise band" in page
    # the same folder given twice: every cell and profile file paired with itself, zero delta, within noise
    from edgesparse.report import build_report, collect, compare_pairs

    pairs = compare_pairs(collect([sweep_dir, sweep_dir]))
    across = [p for p in pairs if p["kind"] == "across folders"]
    assert len(across) == 4 + 3  # 4 sweep rows, 3 profile files (2 cells + the per-op one)
    assert all(p["verdict"] == "within noise" and p["rows"][0]["delta"] == 0 for p in across)
    assert build_report([sweep_dir, sweep_dir], tmp_path / "twice.html")["rows"] == 8


@pytest.mark.slow
def test_report_renders_in_chromium(sweep_dir, tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (Debian package `chromium`; `make test` installs it as root)")
    page_path = tmp_path / "report.html"
    assert cli("report", sweep_dir, "-o", page_path).returncode == 0
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
            f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,2400"]
    start = time.perf_counter()
    dom = subprocess.run([*base, "--enable-logging=stderr", "--v=0", "--dump-dom", page_path.as_uri()],
                         capture_output=True, text=True, timeout=120)
    wall_s = time.perf_counter() - start
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    errors = re.search(r'<pre id="page-errors" data-count="(\d+)"[^>]*>(.*?)</pre>', dom.stdout, re.S)
    assert errors and errors.group(1) == "0", errors and errors.group(2)
    timing = re.search(r'<div id="page-timing"[^>]*>', dom.stdout)
    assert timing and "data-load-ms" in timing.group(0), "the page's load handler did not run"
    load_ms = float(re.search(r'data-load-ms="([\d.]+)"', timing.group(0)).group(1))
    boxes = re.search(r'data-boxes="([^"]*)"', timing.group(0)).group(1)
    print(f"\nreport page: navigation start -> load event {load_ms:.1f} ms in headless Chromium "
          f"({page_path.stat().st_size / 1024:.0f} KiB; chromium process {wall_s:.1f} s)")
    laid_out = [b.split(":") for b in boxes.split(";")]
    plots = [tuple(map(int, b.split(","))) for kind, b in laid_out if kind == "svg"]
    sweep_table = [tuple(map(int, b.split(","))) for kind, b in laid_out if kind == "table"]
    assert len(plots) == 4 and all(w > 200 and h > 200 for _, _, w, h in plots)
    assert len(sweep_table) == 1 and sweep_table[0][2] > 400 and sweep_table[0][3] > 80

    # the screenshot: the plot's area and the table's area are drawn (not blank)
    from PIL import Image

    shot = tmp_path / "report.png"
    subprocess.run([*base, f"--screenshot={shot}", page_path.as_uri()], capture_output=True, timeout=120, check=True)
    image = Image.open(shot).convert("RGB")
    for left, top, w, h in (plots[0], sweep_table[0]):
        region = image.crop((left, top, left + w, min(top + h, image.height)))
        inked = sum(1 for px in region.getdata() if sum(px) < 600)
        assert inked > 0.01 * region.width * region.height, (left, top, w, h, inked)
    # the Pareto front is drawn in red somewhere in the first plot
    left, top, w, h = plots[0]
    region = image.crop((left, top, left + w, top + h))
    assert any(r > 150 and g < 90 and b < 90 for r, g, b in region.getdata())


def test_report_bad_input_is_one_line(tmp_path, capsys, monkeypatch):
    from edgesparse import cli as edgesparse_cli

    page = tmp_path / "report.html"
    cases = [(tmp_path / "missing", "no such folder")]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("nothing here")
    cases.append((tmp_path / "empty", "nothing to report"))
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "manifest.json").write_text('{"model": ')
    cases.append((tmp_path / "corrupt", "is not valid JSON"))
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "results.jsonl").write_text('{"key": "a", "format": "pte"}\n{"key": \n{"key": "b", "format": "pte"}\n')
    cases.append((tmp_path / "torn", "results.jsonl:2 is not valid JSON"))
    for folder, needle in cases:
        monkeypatch.setattr(sys, "argv", ["edgesparse", "report", str(folder), "-o", str(page)])
        with pytest.raises(SystemExit) as exit_info:
            edgesparse_cli.main()
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert exit_info.value.code == 2 and len(lines) == 1 and needle in lines[0], lines
        assert not page.exists() and not list(tmp_path.glob(".report.html.*"))


def test_report_escapes_manifest_text_and_skips_what_is_not_ours(tmp_path):
    """A manifest whose strings carry markup is shown as text; other JSON is left alone; a torn last
    sweep line (a killed sweep) is ignored and said."""
    from edgesparse.report import build_report

    folder = tmp_path / "export"
    folder.mkdir()
    layer = {"name": "fc<1>", "shape": [4, 8], "sparsity": 0.5, "pattern": "block:4x1", "dtype": "float32",
             "kernel": "dense-xnnpack", "reason": "</td><script>alert(1)</script> below the crossover"}
    manifest = {"schema_version": 1, "model": "m&m", "recipe": {}, "sparsity_overall": 0.5, "quantization": {},
                "layers": [layer], "metrics": {}, "artifacts": []}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "tokenizer.json").write_text('{"vocab": {}}')
    (folder / "results.jsonl").write_text('{"key": "prune0-none-pte", "format": "pte", "prune": 0, "quant": "none"}\n{"ke')
    found = build_report([folder], tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert found["manifests"] == 1 and found["rows"] == 1 and any("torn last line" in n for n in found["notes"])
    assert "<script>alert(1)</script>" not in page and "&lt;/td&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "fc&lt;1&gt;" in page and "m&amp;m" in page
    assert "No measured sweep rows" in page
