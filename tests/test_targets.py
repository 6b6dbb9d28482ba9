"""Crossover tables per device (edgesparse/targets.py, runtime_kernels/crossover.py): measured
here by `bench kernels --device local`, used by `export --target`, named in each layer's reason;
a table from another architecture is refused."""

import json
import platform
import subprocess
import sys

import pytest


def cli(*args: str, env_cache=None):
    import os

    env = dict(os.environ, **({"EDGESPARSE_CACHE": str(env_cache)} if env_cache else {}))
    code = "import sys; sys.argv = ['edgesparse', *sys.argv[1:]]; from edgesparse.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=1200, env=env)


def write_table(path, machine: str, min_sparsity) -> None:
    entry = {"op": "conv1x1", "pattern": "block:4x1", "shape": "32->64 @8x8", "in": 32, "out": 64, "rows": 64,
             "min_sparsity": min_sparsity, "speedups": {}}
    path.write_text(json.dumps({"device": "test", "machine": machine, "cpu": "test", "threads": 1,
                                "table": [entry, entry | {"op": "linear", "shape": "64->64 batch 1", "rows": 1}]}))


def test_the_active_table_decides_and_is_named(tmp_path):
    from edgesparse.runtime_kernels import crossover

    write_table(tmp_path / "board.json", platform.machine(), 0.95)
    built_in = crossover.min_sparsity("conv1x1", "block:4x1", 64, 32, 64)
    with crossover.use_table(tmp_path / "board.json", "board.json"):
        assert crossover.min_sparsity("conv1x1", "block:4x1", 64, 32, 64) == (0.95, "measured at conv1x1 32->64 @8x8 in board.json")
        assert crossover.min_sparsity("conv1x1", "nm:2:4", 64, 32, 64)[1].endswith("in board.json)")
    assert crossover.min_sparsity("conv1x1", "block:4x1", 64, 32, 64) == built_in


def test_a_table_from_another_architecture_is_refused(tmp_path):
    other = "aarch64" if platform.machine() != "aarch64" else "x86_64"
    cache = tmp_path / "cache"
    (cache / "crossover").mkdir(parents=True)
    write_table(cache / "crossover" / "local.json", other, 0.5)  # where `bench kernels --device local` writes
    result = cli("export", "demo:digits-cnn", "--prune", "0.9", "--target", "local", "-o", str(tmp_path / "out"),
                 env_cache=cache)
    assert result.returncode == 2, result.stderr
    assert f"was measured on {other}, not on the target's {platform.machine()}" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    (tmp_path / "bad.json").write_text("{}")
    result = cli("export", "demo:digits-cnn", "--target", str(tmp_path / "bad.json"), "-o", str(tmp_path / "out"))
    assert result.returncode == 2 and "is not a crossover table" in result.stderr


@pytest.mark.slow
def test_bench_kernels_on_the_device_writes_its_table_and_export_uses_it(tmp_path):
    """The local flow end to end: measure (quick), write the table named after the device, export
    with --target local: every fp32 layer's reason names that table."""
    from edgesparse import runtime_kernels

    if not runtime_kernels.available():
        pytest.skip("the sparse kernels are not built (make kernels)")
    cache = tmp_path / "cache"
    result = cli("bench", "kernels", "--device", "local", "--quick", env_cache=cache)
    assert result.returncode == 0, result.stderr
    table_file = cache / "crossover" / "local.json"
    table = json.loads(table_file.read_text())
    assert table["machine"] == platform.machine() and table["threads"] == 1 and table["cpu"] and not table["emulated"]
    assert table["table"] and all({"op", "pattern", "min_sparsity", "speedups"} <= e.keys() for e in table["table"])
    result = cli("export", "demo:digits-cnn", "--prune", "0.9", "--pattern", "block:4x1", "--finetune-steps", "0",
                 "--target", "local", "-o", str(tmp_path / "out"), env_cache=cache)
    assert result.returncode == 0, result.stderr
    layers = json.loads((tmp_path / "out" / "manifest.json").read_text())["layers"]
    decided = [layer for layer in layers if "measured at" in layer["reason"] or "default threshold" in layer["reason"]]
    assert decided and all("in local.json" in layer["reason"] for layer in decided)


@pytest.mark.bench
def test_bench_kernels_on_the_emulated_arm64_device_writes_a_flagged_table_and_export_uses_it(tmp_path):
    """qemu-aarch64: edgesparse_kernel_bench pushed with its libraries, our kernels and dense
    XNNPACK timed in one process there; the table records aarch64, the runtime's thread count and
    that its timings are emulated (the flow and the file are what this checks, not a speed)."""
    from edgesparse import runtime_kernels

    if not (runtime_kernels.ARM_BUILD_DIR / "edgesparse_kernel_bench").is_file():
        if __import__("os").environ.get("CI"):
            pytest.fail("CI must build the aarch64 runner (make arm-runner)")
        pytest.skip("the aarch64 kernel bench is not built (make arm-runner)")
    cache = tmp_path / "cache"
    result = cli("bench", "kernels", "--device", "qemu-aarch64", "--quick", env_cache=cache)
    assert result.returncode == 0, result.stderr
    table = json.loads((cache / "crossover" / "qemu-aarch64.json").read_text())
    assert table["machine"] == "aarch64" and table["emulated"] and "not a speed" in table["timing_note"]
    assert table["threads"] >= 1 and table["device"] == "qemu-aarch64" and table["cpu"]
    assert {(e["op"], e["pattern"]) for e in table["table"]} == {(op, p) for op in ("linear", "conv1x1")
                                                                  for p in ("block:4x1", "block:1x4")}
    assert all(r["ours_ms"] > 0 and r["baseline_ms"] > 0 for r in table["rows"])
    result = cli("export", "demo:digits-cnn", "--prune", "0.9", "--pattern", "block:4x1", "--finetune-steps", "0",
                 "--target", "qemu-aarch64", "-o", str(tmp_path / "out"), env_cache=cache)
    assert result.returncode == 0, result.stderr
    layers = json.loads((tmp_path / "out" / "manifest.json").read_text())["layers"]
    decided = [layer for layer in layers if "measured at" in layer["reason"] or "default threshold" in layer["reason"]]
    assert decided and all("in qemu-aarch64.json (emulated timings, not a speed)" in layer["reason"] for layer in decided)
