"""Our sparse kernels as TFLite custom ops: `--tflite-ops edgesparse` writes Edgesparse* ops that
ai-edge-litert's interpreter runs with our op library registered, equal to torch; without the
library, or with broken op attributes, loading fails with one line instead of a crash."""

import json
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from edgesparse import cli, runtime_kernels
from edgesparse.converters import ExportJob, inspect, tflite
from edgesparse.errors import EdgesparseError
from edgesparse.runtime_kernels.modules import NMConv1x1, NMLinear, SparseConv1x1, SparseLinear

pytest.importorskip("litert_torch", reason="the [tflite] extra (litert-torch) is not installed")


@pytest.fixture(scope="module", autouse=True)
def _op_library():
    if not runtime_kernels.TFLITE_LIBRARY.is_file():
        runtime_kernels.build()


class Net(nn.Module):
    """A 3x3 stem, two 1x1 convs, a global pool and two linears: what a small CNN looks like."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.pw1 = nn.Conv2d(32, 64, 1)
        self.pw2 = nn.Conv2d(64, 64, 1, bias=False)
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.pw1(x))
        x = torch.clamp(self.pw2(x), 0, 6)  # a fused RELU6 in TFLite
        x = x.mean((2, 3))
        return self.fc2(torch.relu(self.fc1(x)))


def block_prune(weight: torch.Tensor, rows: int, cols: int, keep: float = 0.2) -> torch.Tensor:
    out, inp = weight.shape
    score = weight.reshape(out // rows, rows, inp // cols, cols).abs().sum((1, 3))
    mask = score >= score.flatten().kthvalue(int(score.numel() * (1 - keep)) + 1).values
    return weight * mask[:, None, :, None].expand(-1, rows, -1, cols).reshape(out, inp)


def nm_prune(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    groups = weight.reshape(weight.shape[0], -1, m)
    keep = groups.abs().topk(n, dim=-1).indices
    return (groups * torch.zeros_like(groups).scatter_(-1, keep, 1.0)).reshape(weight.shape)


def pruned_pair(pattern: str):
    """(plain pruned torch model, the same with its 1x1 convs and fc1 swapped for our modules)."""
    model = Net().eval()
    swapped = Net().eval()
    with torch.no_grad():
        for name in ("pw1", "pw2", "fc1"):
            layer = getattr(model, name)
            w2d = layer.weight.reshape(layer.weight.shape[0], -1)
            w2d = nm_prune(w2d, 2, 4) if pattern == "nm:2:4" else block_prune(w2d, *map(int, pattern.split(":")[1].split("x")))
            layer.weight.copy_(w2d.reshape(layer.weight.shape))
        swapped.load_state_dict(model.state_dict())
        for name in ("pw1", "pw2", "fc1"):
            layer = getattr(model, name)
            w2d = layer.weight.reshape(layer.weight.shape[0], -1)
            conv = isinstance(layer, nn.Conv2d)
            if pattern == "nm:2:4":
                module = (NMConv1x1 if conv else NMLinear)(w2d, layer.bias, 2, 4)
            else:
                rows, cols = map(int, pattern.split(":")[1].split("x"))
                module = (SparseConv1x1 if conv else SparseLinear)(w2d, layer.bias, rows, cols)
            setattr(swapped, name, module)
    return model, swapped


def export(tmp_path, pattern: str):
    model, swapped = pruned_pair(pattern)
    x = torch.randn(1, 3, 12, 12)
    job = ExportJob(swapped, model, (x,), [(torch.randn(1, 3, 12, 12),) for _ in range(2)], tflite_ops="edgesparse")
    path = tmp_path / f"{pattern.replace(':', '_')}.tflite"
    return model, path, tflite.export_tflite(job, path)


def op_names(path):
    model = tflite.load(path.read_bytes())
    return [tflite.custom_op_name(model, op) or tflite.op_name(model, op) for op in model.subgraphs[0].operators]


@pytest.fixture(scope="module")
def block4x1(tmp_path_factory):
    return export(tmp_path_factory.mktemp("tfl"), "block:4x1")


@pytest.mark.parametrize("pattern", ["block:4x1", "block:1x4", "nm:2:4"])
def test_custom_ops_run_in_litert_and_equal_torch(pattern, block4x1, tmp_path):
    model, path, entry = block4x1 if pattern == "block:4x1" else export(tmp_path, pattern)
    assert entry["verified"] and entry["max_abs_error"] <= 1e-4
    names = op_names(path)
    kind = "Nm" if pattern.startswith("nm") else "Bcsr"
    # the two 1x1 convs and fc1 are our ops; fc2 (dense) and the stem stay builtin
    assert names.count(f"Edgesparse{kind}Conv1x1") == 2 and names.count(f"Edgesparse{kind}Linear") == 1, names
    assert names.count("FULLY_CONNECTED") == 1 and names.count("CONV_2D") == 1, names
    assert {op["activation"] for op in entry["edgesparse_ops"]} == {"relu", "relu6"}
    # independently of the exporter's own check: fresh inputs, XNNPACK on and off
    for xnnpack in (True, False):
        runner = tflite.interpreter(path, xnnpack=xnnpack)
        for _ in range(3):
            x = torch.randn(1, 3, 12, 12) * 3
            with torch.no_grad():
                expected = model(x)
            got = tflite.run_tflite(runner, (x,))
            assert got.shape == expected.shape
            assert float((got - expected).abs().max()) <= 1e-4


@pytest.mark.parametrize("pattern,batch", [("block:4x1", 7), ("nm:2:4", 7), ("block:1x4", 2)])
def test_two_threads_give_the_same_bits(pattern, batch, tmp_path):
    """The ops split rows (or output blocks) across the interpreter's threads: disjoint outputs,
    the same arithmetic, so 2 threads equal 1 bit for bit (XNNPACK off: only our ops differ)."""
    model, swapped = pruned_pair(pattern)
    x = torch.randn(batch, 3, 12, 12)
    path = tmp_path / "b.tflite"
    tflite.export_tflite(ExportJob(swapped, model, (x,), [(x,)], tflite_ops="edgesparse"), path)
    one, two = (tflite.run_tflite(tflite.interpreter(path, xnnpack=False, threads=t), (x,)) for t in (1, 2))
    assert torch.equal(one, two)
    with torch.no_grad():
        assert float((two - model(x)).abs().max()) <= 1e-4


def test_swapped_weights_are_stored_packed(block4x1):
    _, path, entry = block4x1
    model = tflite.load(path.read_bytes())
    graph = model.subgraphs[0]
    dense_weight_bytes = 4 * (64 * 32 + 64 * 64 + 128 * 64)
    packed = sum(op["stored_bytes"] for op in entry["edgesparse_ops"])
    assert packed < 0.5 * dense_weight_bytes
    # no buffer still holds a replaced layer's dense weight
    shapes = {tuple(int(d) for d in t.shape) for t in graph.tensors if model.buffers[t.buffer].data is not None}
    assert not shapes & {(64, 1, 1, 32), (64, 1, 1, 64), (128, 64)}


def test_inspect_reports_our_ops_sparse_on_both_targets(block4x1):
    _, path, _ = block4x1
    for target in ("x86_64", "arm64"):
        report = inspect.inspect_artifact(path, target)
        ours = [layer for layer in report["layers"] if layer["op"].startswith("Edgesparse")]
        assert len(ours) == 3 and all(layer["sparse"] for layer in ours)
        assert all(layer["pattern"] == "block:4x1" and layer["sparsity"] >= 0.75 for layer in ours)
        assert all("x86_64 and arm64" in layer["why"] for layer in ours)
        assert "edgesparse ops" in report["runtime"] and report["sparse_layers"] >= 3
        assert {tuple(layer["shape"]) for layer in ours} == {(64, 32), (64, 64), (128, 64)}
        assert [layer["name"] for layer in ours] == ["pw1", "pw2", "fc1"]  # the torch module names


def test_without_the_library_loading_fails_in_one_line(block4x1):
    _, path, _ = block4x1
    with pytest.raises(EdgesparseError) as error:
        tflite.interpreter(path, edgesparse_ops=False)
    message = str(error.value)
    assert "\n" not in message and "EdgesparseBcsr" in message
    assert error.value.hint and "registers the edgesparse ops" in error.value.hint


def rewrite_first_custom_op(source, dest, change):
    model = tflite.load(source.read_bytes())
    op = tflite.edgesparse_ops(model)[0]
    change(model, model.subgraphs[0], op)
    dest.write_bytes(tflite.pack(model))
    return dest


@pytest.mark.parametrize("case,needle", [
    ("truncated", "custom options are not edgesparse's"),
    ("magic", "custom options are not edgesparse's"),
    ("activation", "custom options out of range"),
    ("block", "no BCSR kernel for 3x1 blocks"),
    ("in_features", "features last"),
    ("col_idx", "col_idx out of range"),
])
def test_bad_custom_options_fail_at_prepare_in_one_line(case, needle, block4x1, tmp_path):
    _, path, _ = block4x1

    def change(model, graph, op):
        options = bytearray(bytes(bytearray(op.customOptions)))
        if case == "truncated":
            options = options[:13]
        elif case == "magic":
            options[:4] = b"XXXX"
        elif case == "activation":
            options[20] = 9
        elif case == "block":
            options[12] = 3
        elif case == "in_features":
            options[8] += 1
        elif case == "col_idx":
            tensor = graph.tensors[int(op.inputs[2])]
            cols = np.frombuffer(bytes(bytearray(model.buffers[tensor.buffer].data)), dtype=np.int32).copy()
            cols[0] = 10_000
            model.buffers[tensor.buffer].data = np.frombuffer(cols.tobytes(), dtype=np.uint8)
        op.customOptions = list(options)

    broken = rewrite_first_custom_op(path, tmp_path / f"{case}.tflite", change)
    with pytest.raises(EdgesparseError) as error:
        tflite.interpreter(broken)
    message = str(error.value)
    assert needle in message and "\n" not in message and "failed to prepare" in message
    if case in ("truncated", "magic"):  # inspect flags it too, rather than claiming it runs sparse
        layer = next(layer for layer in inspect.inspect_artifact(broken, "arm64")["layers"] if layer["op"].startswith("Edgesparse"))
        assert not layer["sparse"] and layer["why"].startswith("broken")


def run_cli(args, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["edgesparse", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.mark.slow  # the whole export pipeline (prune, swap, convert, verify)
def test_cli_export_with_edgesparse_tflite_ops(tmp_path, capsys, monkeypatch):
    src = tmp_path / "mymodel.py"
    src.write_text(textwrap.dedent("""
        import torch
        from torch import nn
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.stem = nn.Conv2d(3, 64, 3, padding=1)
                self.pw1 = nn.Conv2d(64, 128, 1)
                self.pw2 = nn.Conv2d(128, 128, 1)
                self.fc1 = nn.Linear(128, 256)
                self.fc2 = nn.Linear(256, 10)
            def forward(self, x):
                x = torch.relu(self.pw2(torch.relu(self.pw1(torch.relu(self.stem(x))))))
                return self.fc2(torch.relu(self.fc1(x.mean((2, 3)))))
        def make():
            torch.manual_seed(0)
            return Net(), (torch.randn(1, 3, 16, 16),)
    """))
    out_dir = tmp_path / "out"
    code, _, err = run_cli(["export", f"{src}:make", "--tflite-ops", "xla", "--format", "tflite", "-o", out_dir], capsys, monkeypatch)
    assert code == 2 and "unknown --tflite-ops" in err and len(err.strip().splitlines()) == 1
    code, out, err = run_cli(["export", f"{src}:make", "--prune", "0.9", "--pattern", "block:4x1", "--format", "tflite",
                              "--tflite-ops", "edgesparse", "-o", out_dir], capsys, monkeypatch)
    assert code in (0, None), err
    record = json.loads((out_dir / "manifest.json").read_text())
    artifact = record["artifacts"][0]
    swapped = [layer for layer in record["layers"] if layer["kernel"] != "dense-xnnpack"]
    assert swapped and artifact["verified"] and artifact["max_abs_error"] <= 1e-4
    assert artifact["tflite_ops"] == "edgesparse" and len(artifact["edgesparse_ops"]) == len(swapped)
    names = op_names(out_dir / "model.tflite")
    assert sum(name.startswith("Edgesparse") for name in names) == len(swapped)


@pytest.mark.slow  # a profiler child process (imports torch and LiteRT again)
def test_profile_runs_the_tflite_with_our_ops(block4x1):
    from edgesparse.devices.local import profile_local

    _, path, _ = block4x1
    result = profile_local(path, runs=20, warmup=2, threads=1)
    assert result["runtime"] == "ai-edge-litert" and result["threads"] == 1
    assert result["p50_ms"] > 0 and result["count"] >= 20 and result["input_shapes"] == [[1, 3, 12, 12]]
    assert result["threads_note"].startswith("3 edgesparse TFLite ops split across the interpreter's 1 thread")
    with pytest.raises(EdgesparseError, match="not available for .tflite"):
        profile_local(path, runs=2, per_op=True)


def test_remote_profile_of_a_tflite_is_refused_in_one_line(block4x1, capsys, monkeypatch):
    _, path, _ = block4x1
    code, _, err = run_cli(["profile", path, "--device", "ssh://nobody@127.0.0.1:1"], capsys, monkeypatch)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no .tflite runner" in err
