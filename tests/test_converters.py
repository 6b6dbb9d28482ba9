"""ONNX and TFLite exporters and `edgesparse inspect`: artifacts run in their runtimes against torch,
the TFLite sparse encoding round-trips, XNNPACK's sparse-path verdicts, and fuzzed parsers."""

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from torch import nn

from edgesparse import compress
from edgesparse.converters import ExportJob, tflite
from edgesparse.converters.inspect import inspect_artifact
from edgesparse.converters.onnx import export_onnx
from edgesparse.errors import EdgesparseError
from edgesparse.recipe import PruneConfig, Recipe

litert_torch = pytest.importorskip("litert_torch", reason="the [tflite] extra (litert-torch) is not installed")


class TinyMobileNet(nn.Module):
    """XNNPACK's sparse-path shape: 3x3 stride-2 stem on 3 channels, depthwise + 1x1 blocks,
    global average pool, classifier."""

    def __init__(self):
        super().__init__()

        def block(cin, cout, stride):
            return [nn.Conv2d(cin, cin, 3, stride, 1, groups=cin), nn.ReLU(), nn.Conv2d(cin, cout, 1), nn.ReLU()]

        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), *block(16, 32, 1), *block(32, 64, 2), *block(64, 64, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)  # lowers to MEAN; x.mean((2, 3)) adds a TRANSPOSE first
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def pruned_mobilenet(sparsity: float, plans: list | None = None) -> nn.Module:
    torch.manual_seed(0)
    model = TinyMobileNet().eval()
    result = compress(model, Recipe(prune=PruneConfig(sparsity=sparsity, pattern="block:4x1")))
    if plans is not None:
        plans += result.layers
    return model


def job_for(model, quant="none", **kw):
    x = torch.rand(1, 3, 32, 32)
    samples = [(torch.rand(1, 3, 32, 32),) for _ in range(3)]
    return ExportJob(model, model, (x,), samples, quant, calib=[(torch.rand(1, 3, 32, 32),) for _ in range(8)], **kw)


@pytest.fixture(scope="module")
def mobilenet90(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tfl")
    model = pruned_mobilenet(0.9)
    entry = tflite.export_tflite(job_for(model), folder / "m90.tflite")
    return model, folder / "m90.tflite", entry


def test_sparse_tflite_runs_like_torch_with_and_without_xnnpack(mobilenet90):
    _, path, entry = mobilenet90
    assert entry["verified"] and entry["xnnpack"]["verified"] and entry["builtin"]["verified"]
    assert entry["xnnpack"]["max_abs_error"] <= 1e-4 and entry["builtin"]["max_abs_error"] <= 1e-4
    model = tflite.load(path.read_bytes())
    names = [tflite.op_name(model, op) for op in model.subgraphs[0].operators]
    assert names.count("DENSIFY") == 3  # the three pruned 1x1 convs; stem and classifier stay dense
    assert entry["depthwise_same_rewritten"] == 2  # the stride-1 ones; litert pads stride 2 itself and entry["size_vs_dense"] < 0.5


def test_inspect_eligible_sparse_mobilenet(mobilenet90):
    _, path, _ = mobilenet90
    arm = inspect_artifact(path, "arm64")
    assert arm["verdict"].startswith("yes") and arm["sparse_layers"] == arm["pruned_layers"] == 3, arm["verdict"]
    for layer in arm["layers"]:
        if layer["op"] == "CONV_2D" and layer["shape"][1:3] == [1, 1]:
            assert layer["sparse"] and layer["sparsity"] == pytest.approx(0.9, abs=0.01) and layer["pattern"] == "block:4x1"
    x86 = inspect_artifact(path, "x86_64")
    assert x86["verdict"].startswith("no") and "AVX" in x86["verdict"] and x86["fix"]


def test_inspect_half_sparse_is_below_two_thirds(tmp_path):
    path = tmp_path / "m50.tflite"
    tflite.export_tflite(job_for(pruned_mobilenet(0.5)), path)
    report = inspect_artifact(path, "arm64")
    assert report["verdict"].startswith("no") and "67%" in report["verdict"] and "67%" in report["fix"]


def test_same_padding_blocks_the_sparse_path_until_rewritten(mobilenet90, tmp_path):
    model, _, _ = mobilenet90
    x = torch.rand(1, 3, 32, 32)
    converted = tflite.load(tflite.convert(model, (x,)))
    tflite.encode_sparse(converted)
    before = tmp_path / "same.tflite"
    before.write_bytes(tflite.pack(converted))
    report = inspect_artifact(before, "arm64")
    assert report["verdict"].startswith("no") and "SAME" in report["verdict"] and "PAD + VALID" in report["fix"]
    assert tflite.rewrite_same_depthwise(converted) == 2
    after = tmp_path / "valid.tflite"
    after.write_bytes(tflite.pack(converted))
    assert inspect_artifact(after, "arm64")["verdict"].startswith("yes")
    a = tflite.run_tflite(tflite.interpreter(before), (x,))
    b = tflite.run_tflite(tflite.interpreter(after), (x,))
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(b, model(x).detach(), atol=1e-4)


@pytest.mark.parametrize("pattern", ["block:4x1", "block:1x4", "unstructured"])
def test_sparse_encoding_round_trips(pattern):
    from edgesparse.patterns import make_mask
    from edgesparse.recipe import Pattern

    torch.manual_seed(1)
    w = torch.randn(64, 1, 1, 32)
    w = (w * make_mask(w.reshape(64, 32), Pattern.parse(pattern), 0.8).reshape(w.shape)).numpy()
    block_map, block_size = tflite._block_for(w)
    assert (block_size == [4]) == pattern.startswith("block")
    values, sparsity = tflite._encode(w, block_map, block_size)
    decoded = tflite._csr_to_dense(list(w.shape), sparsity, values, block_map, block_size)
    assert np.array_equal(decoded, w) and values.size <= 0.25 * w.size


def test_int8_tflite_is_full_integer_and_close_to_torch(tmp_path):
    model = pruned_mobilenet(0.9)
    entry = tflite.export_tflite(job_for(model, "int8"), tmp_path / "q.tflite")
    assert entry["verified"] and entry["cosine"] >= 0.999 and entry["bytes"] < 0.7 * entry["dense_bytes"]
    runner = tflite.interpreter(tmp_path / "q.tflite")
    assert runner.get_input_details()[0]["dtype"] == np.int8 and runner.get_output_details()[0]["dtype"] == np.int8
    report = inspect_artifact(tmp_path / "q.tflite", "arm64")
    assert report["verdict"].startswith("no") and "fp32" in report["verdict"]


def test_onnx_sparse_storage_is_smaller_and_still_matches_torch(tmp_path):
    model = pruned_mobilenet(0.9)
    entry = export_onnx(job_for(model, onnx_sparse_storage=True), tmp_path / "s.onnx")
    assert entry["verified"] and entry["max_abs_error"] <= 1e-4
    assert len(entry["sparse_initializers"]) == 3 and entry["size_vs_dense"] < 0.75 and "densifies" in entry["storage"]
    report = inspect_artifact(tmp_path / "s.onnx", "arm64")
    pruned = [layer for layer in report["layers"] if layer["sparsity"] > 0.5]
    assert len(pruned) == 3 and all(layer["sparsity"] == pytest.approx(0.9, abs=0.01) and not layer["sparse"] for layer in pruned)
    for layer in pruned:  # 10% non-zeros at 4 + 8 (int64 index) bytes each
        assert layer["stored_bytes"] <= 0.31 * 4 * np.prod(layer["shape"]) + 100  # + names, dims
    assert report["verdict"].startswith("no") and "make kernels" in report["fix"]


@pytest.mark.parametrize("quant", ["int8", "int8-dynamic"])
def test_onnx_int8(tmp_path, quant):
    model = pruned_mobilenet(0.9)
    entry = export_onnx(job_for(model, quant), tmp_path / "q.onnx")
    assert entry["verified"] and entry["cosine"] >= 0.999, entry


def test_inspect_rejects_mislabeled_and_missing(tmp_path, mobilenet90):
    _, path, _ = mobilenet90
    cases = {"m.onnx": path.read_bytes(), "m.pte": path.read_bytes(), "empty.tflite": b"", "m.tflite": b"\x08\x07rubbish"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(EdgesparseError, match="is not"):
            inspect_artifact(tmp_path / name)
    for name, needle in (("nothing.tflite", "no such file"), ("m.bin", "expected a .pte")):
        with pytest.raises(EdgesparseError, match=needle):
            inspect_artifact(tmp_path / name)
    with pytest.raises(EdgesparseError, match="unknown target"):
        inspect_artifact(path, "riscv")


# ---- fuzzing: random byte flips and truncations of real exported files -----------------------

@pytest.fixture(scope="module")
def real_files(tmp_path_factory, mobilenet90):
    """One real artifact per format (the .pte with an edgesparse op and an XNNPACK delegate)."""
    from edgesparse.converters.executorch import export_pte
    from edgesparse.converters.sparse_swap import register_kernel, swap_sparse_layers
    from edgesparse.runtime_kernels import register_with_exporter

    folder = tmp_path_factory.mktemp("fuzz")
    model, tfl_path, _ = mobilenet90
    export_onnx(job_for(model, onnx_sparse_storage=True), folder / "m.onnx")
    plans = []
    swapped = pruned_mobilenet(0.9, plans)
    if register_with_exporter(register_kernel):
        swap_sparse_layers(swapped, plans, (torch.rand(1, 3, 32, 32),))
    export_pte(job_for(swapped), folder / "m.pte")
    return {"tflite": tfl_path.read_bytes(), "onnx": (folder / "m.onnx").read_bytes(), "pte": (folder / "m.pte").read_bytes()}


def _mutations():
    flips = st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=8)
    return st.tuples(flips, st.floats(0, 1))


@pytest.mark.parametrize("fmt", ["tflite", "onnx", "pte"])
def test_fuzzed_files_give_a_clean_error_or_a_report(fmt, real_files, tmp_path_factory):
    """No crash and no hang: each corrupted file either parses or raises EdgesparseError."""
    original = real_files[fmt]
    folder = tmp_path_factory.mktemp(f"fuzz-{fmt}")
    outcomes = {"report": 0, "error": 0}

    @settings(max_examples=60, deadline=20000, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(_mutations())
    def check(mutation):
        flips, keep = mutation
        data = bytearray(original)
        for where, value in flips:
            data[int(where * len(data))] = value
        if keep < 0.5:  # half of the cases are also truncated
            data = data[: int(keep * 2 * len(data))]
        path = folder / f"m.{fmt}"
        path.write_bytes(bytes(data))
        try:
            report = inspect_artifact(path, "arm64")
            json.dumps(report)
            outcomes["report"] += 1
        except EdgesparseError as exc:
            assert "\n" not in str(exc)
            outcomes["error"] += 1

    check()
    assert outcomes["error"] > 0, outcomes  # truncations must be caught
