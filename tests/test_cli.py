"""The CLI: every bad input is one line on stderr, exit code 2, and no files left behind."""

import json
import subprocess
import sys
import textwrap

import pytest

from edgesparse import cli


def run_cli(args, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["edgesparse", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def assert_user_error(code, err, needle, out_dir=None):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("edgesparse: error:") and needle in lines[0], lines[0]
    if out_dir is not None:
        assert not out_dir.exists() or not any(out_dir.iterdir())
        assert not [p for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}.")], "staging left behind"


@pytest.mark.parametrize("args,needle", [
    (["--prune", "1.0"], "[0, 1)"),
    (["--prune", "-0.2"], "[0, 1)"),
    (["--pattern", "nm:4:4"], "1 <= N < M"),
    (["--pattern", "nm:6:4"], "1 <= N < M"),
    (["--pattern", "diagonal"], "unknown pattern"),
    (["--format", "pte,xml"], "unknown format"),
    (["--quant", "int2"], "unknown quantization"),
    (["--act-sparsity", "1.2"], "act_sparsity.target"),
    (["--act-sparsity", "0.5", "--act-method", "relu"], "unknown activation-sparsity method"),
    (["--prune", "0.5", "--prune-method", "obs"], "unknown prune method"),
    (["--prune", "0.5", "--pattern", "channel", "--prune-method", "wanda"], "chooses weights, not channels"),
])
def test_bad_options(tmp_path, capsys, monkeypatch, args, needle):
    out_dir = tmp_path / "out"
    code, _, err = run_cli(["export", "demo:digits-cnn", *args, "-o", out_dir], capsys, monkeypatch)
    assert_user_error(code, err, needle, out_dir)


def test_bad_models(tmp_path, capsys, monkeypatch):
    out_dir = tmp_path / "out"
    broken_py = tmp_path / "broken.py"
    broken_py.write_text("def make(:\n")
    corrupt = tmp_path / "model.pt2"
    corrupt.write_bytes(b"PK\x03\x04 this is not a real archive")
    truncated = tmp_path / "empty.pt2"
    truncated.write_bytes(b"")
    nofactory = tmp_path / "nofactory.py"
    nofactory.write_text("x = 1\n")
    cases = [
        ("missing.pt2", "not found"),
        (f"{tmp_path}/missing.py:make", "not found"),
        (f"{broken_py}:make", "could not import"),
        (f"{nofactory}:make", "no function"),
        (str(corrupt), "not a readable ExportedProgram"),
        (str(truncated), "not a readable ExportedProgram"),
        ("model.onnx", "unsupported model"),
        ("demo:resnet", "unknown demo model"),
    ]
    for spec, needle in cases:
        code, _, err = run_cli(["export", spec, "-o", out_dir], capsys, monkeypatch)
        assert_user_error(code, err, needle, out_dir)


def test_uncapturable_model(tmp_path, capsys, monkeypatch):
    src = tmp_path / "dyn.py"
    src.write_text(textwrap.dedent("""
        import torch
        class Dyn(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = torch.nn.Linear(4, 4)
            def forward(self, x):
                n = int(x.sum().item() > 0) + 1        # data-dependent shape
                return self.fc(x).repeat(n, 1)
        def make():
            return Dyn(), (torch.randn(1, 4),)
    """))
    out_dir = tmp_path / "out"
    code, _, err = run_cli(["export", f"{src}:make", "-o", out_dir], capsys, monkeypatch)
    assert_user_error(code, err, "torch.export could not capture", out_dir)


def test_bad_recipe_file(tmp_path, capsys, monkeypatch):
    recipe = tmp_path / "r.toml"
    recipe.write_text("[prune]\nsparsity = 3\n")
    code, _, err = run_cli(["export", "demo:digits-cnn", "--recipe", recipe, "-o", tmp_path / "o"], capsys, monkeypatch)
    assert_user_error(code, err, "[0, 1)", tmp_path / "o")


def test_user_factory_export_and_profile(tmp_path, capsys, monkeypatch):
    src = tmp_path / "mymodel.py"
    src.write_text(textwrap.dedent("""
        import torch
        def make():
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                                        torch.nn.ReLU(), torch.nn.Linear(64, 8))
            return model, (torch.randn(1, 32),)
    """))
    out_dir = tmp_path / "out"
    code, out, err = run_cli(["export", f"{src}:make", "--prune", "0.5", "--pattern", "nm:1:4", "-o", out_dir], capsys, monkeypatch)
    assert code == 2 and "fixes sparsity" in err  # nm:1:4 means 75%, but saying both differently is an error
    code, out, err = run_cli(["export", f"{src}:make", "--pattern", "nm:1:4", "-o", out_dir], capsys, monkeypatch)
    assert code in (0, None), err
    record = json.loads((out_dir / "manifest.json").read_text())
    assert record["layers"][1]["pattern"] == "nm:1:4" and record["layers"][1]["sparsity"] == 0.75
    assert record["artifacts"][0]["verified"]

    result = tmp_path / "prof.json"
    code, out, err = run_cli(["profile", out_dir / "model.pte", "--runs", "20", "--warmup", "2", "--json", result], capsys, monkeypatch)
    assert code in (0, None), err
    prof = json.loads(result.read_text())
    for key in ("load_ms", "first_run_ms", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "peak_rss_mb"):
        assert prof[key] > 0, key
    assert prof["count"] >= 20 and prof["threads"] == 1
    assert prof["p50_ms"] <= prof["p90_ms"] <= prof["p99_ms"]


def test_profile_errors(tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(["profile", tmp_path / "missing.pte"], capsys, monkeypatch)
    assert_user_error(code, err, "not found")
    bad = tmp_path / "garbage.pte"
    bad.write_bytes(b"\x00" * 64)
    code, _, err = run_cli(["profile", bad, "--runs", "1"], capsys, monkeypatch)
    assert_user_error(code, err, "could not run garbage.pte")
    other = tmp_path / "model.bin"
    other.write_bytes(b"x")
    code, _, err = run_cli(["profile", other], capsys, monkeypatch)
    assert_user_error(code, err, "unsupported artifact type")
    code, _, err = run_cli(["profile", bad, "--device", "toaster"], capsys, monkeypatch)
    assert_user_error(code, err, "unknown device")


def test_truncated_pte_fails_cleanly(tmp_path, capsys, monkeypatch, digits):
    out_dir = tmp_path / "ok"
    code, _, err = run_cli(["export", "demo:digits-cnn", "--finetune-steps", "0", "-o", out_dir], capsys, monkeypatch)
    assert code in (0, None), err
    data = (out_dir / "model.pte").read_bytes()
    cut = tmp_path / "cut.pte"
    cut.write_bytes(data[: len(data) // 2])
    code, _, err = run_cli(["profile", cut, "--runs", "1"], capsys, monkeypatch)
    assert_user_error(code, err, "could not run cut.pte")


def test_console_script_exit_code(tmp_path):
    """The installed `edgesparse` entry point, as a user runs it."""
    exe = [sys.executable, "-m", "edgesparse.cli"]
    proc = subprocess.run([*exe, "export", "demo:digits-cnn", "--prune", "1.5", "-o", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("edgesparse: error: sparsity must be in [0, 1)")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_bench_kernels_quick_writes_the_issue_rows(tmp_path):
    """`bench kernels --quick` (the real thing: every variant built and timed) and its JSON rows."""
    import time

    exe = [sys.executable, "-m", "edgesparse.cli"]
    started = time.perf_counter()
    proc = subprocess.run([*exe, "bench", "kernels", "--quick", "--json", str(tmp_path / "b.json")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert time.perf_counter() - started < 300
    rows = json.loads((tmp_path / "b.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    keys = {"op", "pattern", "dtype", "sparsity", "shape", "threads", "ours_ms", "baseline", "baseline_ms", "speedup"}
    assert all(keys <= row.keys() for row in rows)
    assert {r["baseline"] for r in rows} == {"xnnpack-fp32", "xnnpack-int8", "onnxruntime-fp32"}
    assert {r["op"] for r in rows} == {"linear", "conv1x1", "mlp"} and {r["dtype"] for r in rows} == {"float32", "int8"}
    assert {r["pattern"] for r in rows} == {"block:4x1", "block:1x4", "unstructured", "nm:2:4", "activation"}
    shapes = {r["shape"] for r in rows if r["op"] != "mlp"}
    assert {"1024->4096 batch 1", "1024->4096 batch 16", "4096->1024 batch 1", "256->512 @14x14", "512->1024 @7x7"} == shapes
    for row in rows:
        assert row["threads"] == 1 and row["ours_ms"] > 0
        assert row["speedup"] == pytest.approx(row["baseline_ms"] / row["ours_ms"])


def test_inspect_errors_are_one_line(tmp_path, capsys, monkeypatch):
    truncated = tmp_path / "model.onnx"
    truncated.write_bytes(b"\x08\x07\x12\x05torch\x3a\xff\xff\xff")
    for path, needle in ((tmp_path / "missing.tflite", "no such file"), (truncated, "corrupt"), (tmp_path / "x.txt", "expected a .pte")):
        code, _, err = run_cli(["inspect", path], capsys, monkeypatch)
        assert_user_error(code, err, needle)


def test_moe_offload_export_profile_and_bench(tmp_path):
    """MoE acceptance from the CLI: export demo:tiny-moe with experts offloaded at a 25% budget,
    profile it (latency and peak memory), and bench a small grid into JSON rows."""
    def cli(*args):
        proc = subprocess.run([sys.executable, "-m", "edgesparse.cli", *map(str, args)], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    cli("export", "demo:tiny-moe", "--moe-offload", "--expert-budget", "0.25", "-o", tmp_path / "moe")
    manifest = json.loads((tmp_path / "moe" / "moe.json").read_text())
    assert manifest["budget"] == 0.25 and manifest["verification"]
    cli("profile", tmp_path / "moe", "--tokens", "48", "--json", tmp_path / "p.json")
    prof = json.loads((tmp_path / "p.json").read_text())
    assert prof["count"] == 48 and prof["p50_ms"] > 0 and prof["peak_rss_mb"] > 0
    assert prof["cache_peak_bytes"] <= prof["budget_bytes"]
    cli("bench", "moe", tmp_path / "moe", "--budgets", "1,0.25", "--policies", "lru,predictive", "--tokens", "32",
        "--json", tmp_path / "b.json")
    rows = json.loads((tmp_path / "b.json").read_text())
    assert {(r["policy"], r["budget"]) for r in rows} == {("lru", 1.0), ("lru", 0.25), ("predictive", 1.0), ("predictive", 0.25)}
    for row in rows:
        assert {"policy", "budget", "peak_rss_mb", "tokens_per_s", "hit_rate"} <= set(row) and row["tokens_per_s"] > 0
