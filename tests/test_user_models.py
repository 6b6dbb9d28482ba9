"""Users' own model code: Conv2d / Linear subclasses and BatchNorm fold into our kernels, layers are
judged by what they compute (not their class), every layer says why it runs where it runs, and a
recipe that does nothing useful, or a factory that raises, says so in one line."""

import json
from pathlib import Path

import pytest
import torch

from edgesparse import runtime_kernels
from edgesparse.converters.sparse_swap import fold_batchnorm
from edgesparse.models import load_model
from edgesparse.pipeline import export_model
from edgesparse.recipe import PruneConfig, QuantConfig, Recipe

from test_cli import assert_user_error, run_cli
from user_models import make, make_odd

HERE = Path(__file__).resolve().parent
BLOCK90 = Recipe(prune=PruneConfig(sparsity=0.9, pattern="block:4x1"))

pytestmark = pytest.mark.skipif(not runtime_kernels.available(), reason="the edgesparse kernels are not built")


def test_batchnorm_folds_into_conv_subclasses_in_place():
    model, example = make()
    with torch.no_grad():
        want = model(*example)
    convs = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    report = fold_batchnorm(model, example)
    assert report == {name: f"folded {name.rpartition('.')[0]}.1" for name in convs}
    assert {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)} == convs  # same objects
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(*example), want, rtol=1e-5, atol=1e-5)


def test_fold_that_would_change_the_output_is_undone():
    """A conv whose forward ignores its bias attribute cannot take a BN's shift: left as it was."""

    class NoBiasConv(torch.nn.Conv2d):
        def forward(self, x):
            return torch.nn.functional.conv2d(x, self.weight)

    model = torch.nn.Sequential(NoBiasConv(3, 8, 1, bias=False), torch.nn.BatchNorm2d(8)).eval()
    model[1].running_mean.fill_(0.3)
    example = (torch.rand(1, 3, 4, 4),)
    with torch.no_grad():
        want = model(*example)
    assert fold_batchnorm(model, example) == {"0": "BatchNorm 1 not folded: folding changed the model's output"}
    assert isinstance(model[1], torch.nn.BatchNorm2d)
    with torch.no_grad():
        torch.testing.assert_close(model(*example), want)


def test_subclass_model_runs_every_eligible_layer_sparse(tmp_path):
    """Acceptance: Conv2d / Linear subclasses with BN after each conv: folded, all eligible
    layers swapped, .pte and .onnx verified, and no empty reason anywhere."""
    bundle = load_model(f"{HERE / 'user_models.py'}:make")
    record = export_model(bundle, BLOCK90, tmp_path / "out", ["pte", "onnx"])
    layers = {layer["name"]: layer for layer in record["layers"]}
    eligible = ["expand.0", "project.0", "expand2.0", "project2.0", "fc"]  # 1x1 convs and inner linear
    for name in eligible:
        assert layers[name]["kernel"].startswith("edgesparse::"), (name, layers[name]["reason"])
        assert layers[name]["reason"].startswith("sparse from")
    for name in ("expand.0", "project.0", "expand2.0", "project2.0", "stem.0", "depthwise.0"):
        assert layers[name]["batchnorm"].startswith("folded"), layers[name]
    assert layers["depthwise.0"]["kernel"] == "dense-xnnpack" and "depthwise" in layers["depthwise.0"]["reason"]
    assert all(layer["reason"].strip() for layer in record["layers"])
    assert {a["format"] for a in record["artifacts"]} == {"pte", "onnx"}
    assert all(a["verified"] for a in record["artifacts"])
    assert record["warnings"] == []
    assert (tmp_path / "out" / "model.pte").stat().st_size < 0.5 * 4 * sum(p.numel() for p in bundle.model.parameters())


def test_layers_are_judged_by_what_they_compute(tmp_path):
    """A weight-standardized 1x1 conv and a Linear that scales its output keep their own forward
    (dense, with the reason); plain subclasses beside them still run sparse."""
    record = export_model(load_model(f"{HERE / 'user_models.py'}:make_odd"), BLOCK90, tmp_path / "out", ["pte"])
    layers = {layer["name"]: layer for layer in record["layers"]}
    for name in ("expand2.0", "fc"):
        assert layers[name]["kernel"] == "dense-xnnpack"
        assert layers[name]["computes"] == "other" and "computes something else" in layers[name]["reason"]
    assert layers["project2.0"]["kernel"].startswith("edgesparse::")
    assert record["artifacts"][0]["verified"]


def test_unpruned_recipe_warns_with_reason_and_fix(tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(["export", f"{HERE / 'user_models.py'}:make_two_layer_ffn", "--prune", "0.9",
                            "-o", tmp_path / "out"], capsys, monkeypatch)
    assert code in (0, None)
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, err
    assert "left unpruned" in warnings[0] and "first/last" in warnings[0] and "keep_first_last_dense = false" in warnings[0]


def test_factory_that_raises_is_one_line(tmp_path, capsys, monkeypatch):
    out_dir = tmp_path / "out"
    code, _, err = run_cli(["export", f"{HERE / 'user_models.py'}:make_raising", "-o", out_dir], capsys, monkeypatch)
    assert_user_error(code, err, "user_models.py: make_raising() raised FileNotFoundError: pretrained weights not found", out_dir)
    code, _, err = run_cli(["--debug", "export", f"{HERE / 'user_models.py'}:make_raising", "-o", out_dir], capsys, monkeypatch)
    assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("edgesparse: error:")


def test_int8_dynamic_export_runs_pruned_linears_on_our_int8_kernels(tmp_path, capsys, monkeypatch):
    """Acceptance (issue 14): `export --prune 0.9 --pattern block:8x1 --quant int8-dynamic` on a
    model of Linear layers swaps the pruned ones for our int8 op (the manifest says so, with the
    crossover that chose it), leaves the rest to the runtime's int8-dynamic kernels, and both
    artifacts verify; the .pte holds the pruned weights sparsely, so it is far smaller than dense int8."""
    import onnx

    out_dir = tmp_path / "out"
    code, _, err = run_cli(["export", f"{HERE / 'user_models.py'}:make_ffn_stack", "--prune", "0.9", "--pattern", "block:8x1",
                            "--quant", "int8-dynamic", "--format", "pte,onnx", "-o", out_dir], capsys, monkeypatch)
    assert code in (0, None), err
    record = json.loads((out_dir / "manifest.json").read_text())
    layers = {layer["name"]: layer for layer in record["layers"]}
    pruned = [name for name, layer in layers.items() if layer["pattern"] == "block:8x1"]
    assert len(pruned) == 4
    for name in pruned:
        assert layers[name]["kernel"] == "edgesparse::qs8_bcsr_linear (8x1, int8)" and layers[name]["dtype"] == "int8"
        assert layers[name]["reason"].startswith("sparse from"), layers[name]["reason"]
    assert "4 pruned linear layers on edgesparse::qs8_bcsr_linear" in record["quantization"]["sparse_layers"]
    assert record["runtime_ops"]["kernels"] == ["edgesparse::qs8_bcsr_linear (8x1, int8)"]
    pte, onnx_entry = record["artifacts"]
    assert pte["verified"] and onnx_entry["verified"], (pte, onnx_entry)
    weights = sum(layer["shape"][0] * layer["shape"][1] for layer in record["layers"])
    assert pte["bytes"] < 0.5 * weights  # dense int8 alone would be one byte per weight
    nodes = [node.op_type for node in onnx.load(out_dir / "model.onnx").graph.node]
    assert nodes.count("QBcsrLinear") == 4 and nodes.count("MatMulInteger") == 2  # the first/last layers: ORT's int8


def test_int8_dynamic_keeps_patterns_without_an_int8_kernel_dense_with_the_reason(tmp_path):
    record = export_model(load_model(f"{HERE / 'user_models.py'}:make_ffn_stack"),
                          Recipe(prune=PruneConfig(sparsity=0.9, pattern="block:1x4"), quant=QuantConfig(mode="int8-dynamic")),
                          tmp_path / "out", ["pte"])
    pruned = [layer for layer in record["layers"] if layer["pattern"] == "block:1x4"]
    assert pruned and all(layer["kernel"] == "dense-xnnpack" and "runs Rx1 blocks" in layer["reason"] for layer in pruned)
    assert record["artifacts"][0]["verified"]
