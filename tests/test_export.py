"""ExecuTorch export: the .pte run in the ExecuTorch runtime against eager torch, same inputs."""

import json

import pytest
import torch
from torch import nn

from edgesparse import ModelBundle, compress, export_model, manifest
from edgesparse.converters import sparse_swap
from edgesparse.converters.executorch import load_method, run_pte
from edgesparse.converters.verify import compare
from edgesparse.recipe import PruneConfig, QuantConfig, Recipe


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 128), nn.Linear(128, 128), nn.Linear(128, 16)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def mlp_bundle():
    torch.manual_seed(0)
    data = torch.randn(64, 1, 64)
    return ModelBundle("test-mlp", MLP().eval(), (data[0],), calib=lambda: ((x,) for x in data[:32]),
                       sample_inputs=[(x,) for x in data[32:40]])


def run_artifact(path, inputs):
    method = load_method(path)
    return [run_pte(method, i) for i in inputs]


def test_fp32_pte_matches_torch(tmp_path):
    bundle = mlp_bundle()
    record = export_model(bundle, Recipe(prune=PruneConfig(sparsity=0.8, pattern="block:4x1")), tmp_path)
    artifact = record["artifacts"][0]
    assert artifact["verified"] and artifact["max_abs_error"] < 1e-4
    # independent check: re-run the written file against the pruned eager model
    pruned = MLP().eval()
    pruned.load_state_dict(bundle.model.state_dict())  # export_model leaves the bundle's model dense
    # no fine-tune hook and calibration data: the default method is Wanda, calibrated on the same batches
    assert record["prune_method"] == "wanda"
    compress(pruned, Recipe(prune=PruneConfig(sparsity=0.8, pattern="block:4x1")), calib=bundle.calib())
    inputs = bundle.sample_inputs
    got = run_artifact(tmp_path / "model.pte", inputs)
    with torch.no_grad():
        want = [pruned(*i) for i in inputs]
    assert compare(want, got)["max_abs_error"] < 1e-4
    assert (tmp_path / "model.pte").stat().st_size == artifact["bytes"]


@pytest.mark.parametrize("mode", ["int8", "int8-dynamic"])
def test_int8_pte_within_tolerance(tmp_path, mode):
    bundle = mlp_bundle()
    record = export_model(bundle, Recipe(prune=PruneConfig(sparsity=0.5), quant=QuantConfig(mode=mode)), tmp_path)
    artifact = record["artifacts"][0]
    assert artifact["verified"], artifact
    assert artifact["cosine"] >= 0.999 and artifact["relative_error"] < 0.05
    # against the fp32 model as well: int8 error stays small
    fp32 = MLP().eval()
    fp32.load_state_dict(bundle.model.state_dict())
    compress(fp32, Recipe(prune=PruneConfig(sparsity=0.5)), calib=bundle.calib())
    with torch.no_grad():
        want = [fp32(*i) for i in bundle.sample_inputs]
    metrics = compare(want, run_artifact(tmp_path / "model.pte", bundle.sample_inputs))
    assert metrics["cosine"] > 0.99 and metrics["relative_error"] < 0.1
    assert record["quantization"]["mode"] == mode
    assert all(layer["dtype"] == "int8" for layer in record["layers"])


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        block = lambda cin, cout, k, groups=1: nn.Sequential(  # noqa: E731
            nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU6())
        self.stem, self.dw, self.expand = block(3, 16, 3), block(16, 16, 3, 16), block(16, 32, 1)
        self.project = nn.Sequential(nn.Conv2d(32, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(self.expand(self.dw(x)))
        return self.fc(x.mean((2, 3)))


def test_static_int8_cnn_keeps_its_ends_fp32_and_the_pte_equals_its_eager_reference(tmp_path):
    """Static int8 on a CNN: the first conv and the classifier stay fp32 (manifest says so), and
    with the biases on XNNPACK's int32 grid the .pte computes what the eager model computes (left
    fp32, the bias difference flips roundings through every layer: MobileNetV2 failed verification)."""
    torch.manual_seed(0)
    model = SmallCNN().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.5, 0.5)
    data = torch.rand(40, 1, 3, 16, 16)
    bundle = ModelBundle("small-cnn", model, (data[0],), calib=lambda: ((x,) for x in data[:32]),
                         sample_inputs=[(x,) for x in data[32:]])
    record = export_model(bundle, Recipe(quant=QuantConfig(mode="int8")), tmp_path)
    assert record["quantization"]["fp32_layers"] == ["fc", "stem.0"]
    assert {layer["name"]: layer["dtype"] for layer in record["layers"]} == {
        "stem.0": "float32", "dw.0": "int8", "expand.0": "int8", "project.0": "int8", "fc": "float32"}
    artifact = record["artifacts"][0]
    assert artifact["verified"] and artifact["relative_error"] < 5e-3, artifact  # the tolerance is 5e-2


def test_static_int8_cnn_runs_its_pruned_1x1_convs_on_int8_tensors(tmp_path):
    """Acceptance (issue 14): `--quant int8` with block pruning puts the pruned 1x1 convs on
    edgesparse::qs8_bcsr_conv1x1, which takes and returns the int8 tensors themselves: in the .pte
    no quantize / dequantize runs outside XNNPACK, and the op's input and output are int8. The
    .pte verifies against the quantized graph before the swap (cosine >= 0.999)."""
    from executorch.exir._serialize._program import deserialize_pte_binary
    from executorch.exir.schema import ScalarType

    torch.manual_seed(0)
    model = SmallCNN().eval()
    data = torch.rand(40, 1, 3, 16, 16)
    bundle = ModelBundle("small-cnn", model, (data[0],), calib=lambda: ((x,) for x in data[:32]),
                         sample_inputs=[(x,) for x in data[32:]])
    recipe = Recipe(prune=PruneConfig(sparsity=0.8, pattern="block:8x1"), quant=QuantConfig(mode="int8"))
    record = export_model(bundle, recipe, tmp_path)
    kernels = {layer["name"]: layer["kernel"] for layer in record["layers"]}
    assert kernels["expand.0"] == kernels["project.0"] == "edgesparse::qs8_bcsr_conv1x1 (8x1, int8 static)", kernels
    assert record["quantization"]["sparse_layers"].startswith("2 pruned 1x1 convs")
    # the depthwise conv before them and the residual add after them join them on our int8 ops
    assert record["quantization"]["chain_layers"].startswith("1 depthwise 3x3 convs and 1 adds")
    artifact = record["artifacts"][0]
    assert artifact["verified"] and artifact["cosine"] >= 0.999, artifact
    plan = deserialize_pte_binary((tmp_path / "model.pte").read_bytes()).program.execution_plan[0]
    names = [op.name for op in plan.operators]
    assert not [name for name in names if "quantize" in name], names
    calls = [i.instr_args for chain in plan.chains for i in chain.instructions
             if hasattr(i.instr_args, "op_index") and names[i.instr_args.op_index] == "edgesparse::qs8_bcsr_conv1x1"]
    assert len(calls) == 2 and "edgesparse::qs8_dwconv3x3" in names and "edgesparse::qs8_add" in names
    for call in calls:  # args: x, the weights..., out (and the returned alias)
        assert plan.values[call.args[0]].val.scalar_type == ScalarType.CHAR
        assert plan.values[call.args[-1]].val.scalar_type == ScalarType.CHAR


def test_int8_pte_is_smaller_than_fp32(tmp_path):
    bundle = mlp_bundle()
    fp32 = export_model(bundle, Recipe(), tmp_path / "fp32")["artifacts"][0]["bytes"]
    int8 = export_model(bundle, Recipe(quant=QuantConfig(mode="int8")), tmp_path / "int8")["artifacts"][0]["bytes"]
    assert int8 < 0.4 * fp32


def test_int4w_pte(tmp_path):
    bundle = mlp_bundle()
    record = export_model(bundle, Recipe(quant=QuantConfig(mode="int4w")), tmp_path)
    artifact = record["artifacts"][0]
    assert artifact["verified"] and artifact["cosine"] >= 0.999
    fp32 = export_model(bundle, Recipe(), tmp_path / "fp32")["artifacts"][0]["bytes"]
    assert artifact["bytes"] < 0.3 * fp32
    assert {layer["dtype"] for layer in record["layers"]} == {"int4"}


def test_manifest_schema(tmp_path):
    record = export_model(mlp_bundle(), Recipe(prune=PruneConfig(sparsity=0.9, pattern="block:4x1")), tmp_path)
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(record))
    manifest.validate(on_disk)
    for key in ("model", "recipe", "sparsity_overall", "layers", "metrics", "artifacts"):
        assert key in on_disk
    layer = on_disk["layers"][1]
    assert set(layer) >= {"name", "shape", "sparsity", "pattern", "dtype", "kernel"}
    assert layer["pattern"] == "block:4x1" and layer["sparsity"] == pytest.approx(0.9, abs=0.01)
    artifact = on_disk["artifacts"][0]
    assert set(artifact) >= {"format", "path", "bytes", "sha256", "max_abs_error", "cosine", "verified"}
    assert on_disk["recipe"]["prune"]["pattern"] == "block:4x1"
    # only the first/last layers of three stay dense, so overall = middle layer's share
    total = 64 * 128 + 128 * 128 + 128 * 16
    assert on_disk["sparsity_overall"] == pytest.approx(layer["sparsity"] * 128 * 128 / total)
    broken = dict(on_disk)
    del broken["layers"]
    with pytest.raises(Exception, match="layers"):
        manifest.validate(broken)


def test_sparse_kernel_seam_swaps_layers_before_export(tmp_path):
    """A registered kernel factory replaces eligible layers, and the plan records which kernel."""

    class Swapped(nn.Module):
        def __init__(self, linear):
            super().__init__()
            nz = linear.weight.detach() != 0
            self.register_buffer("values", linear.weight.detach()[nz])
            self.register_buffer("nz", nz)
            self.bias = linear.bias

        def forward(self, x):
            w = torch.zeros(self.nz.shape, dtype=self.values.dtype).masked_scatter(self.nz, self.values)
            return nn.functional.linear(x, w, self.bias)

    seen = []
    # a user's registration takes precedence over edgesparse's own N:M kernel
    sparse_swap.register_kernel("nm", "float32", "test-swap", lambda m, plan: seen.append(plan.name) or Swapped(m))
    try:
        record = export_model(mlp_bundle(), Recipe(prune=PruneConfig(pattern="nm:2:4")), tmp_path)
    finally:
        sparse_swap.unregister_kernel("nm", "float32")
    assert seen == ["fc2"]
    kernels = {layer["name"]: layer["kernel"] for layer in record["layers"]}
    assert kernels == {"fc1": "dense-xnnpack", "fc2": "test-swap", "fc3": "dense-xnnpack"}
    assert record["artifacts"][0]["verified"]
