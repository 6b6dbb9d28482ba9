"""Activation sparsity on int8 weights (issue 15 item 3): the qs8-actsparse kernels on every ISA
this CPU runs (C ABI, es_force_isa), the edgesparse::qs8_actsparse_* ops in ExecuTorch (.pte) and
ONNX Runtime (.onnx) against torch and the integer reference, and `--act-sparsity 0.5 --quant
int8-dynamic` on a tiny Llama: exported, verified, run in the C++ runner on our int8 ops.
(kernel_test.c covers the same kernels natively and under qemu-aarch64: tests/test_kernels.py.)"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import edgesparse
from edgesparse import runtime_kernels
from edgesparse.runtime_kernels import capi
from edgesparse.runtime_kernels.formats import quantize_rows, quantize_weight

ISAS = ("scalar", "avx2", "avx512", "avx512vnni", "neon", "neondot")


@pytest.fixture(scope="module", autouse=True)
def built():
    if not (runtime_kernels.available() and runtime_kernels.ORT_LIBRARY.is_file()):
        runtime_kernels.build()


def _isas():
    """Every ISA row this CPU runs (es_force_isa accepts it)."""
    try:
        return [name for name in ISAS if capi.force_isa(name)]
    finally:
        capi.force_isa(None)


def _ort_session(op_type, x_name, tensors, attrs, tmp_path, threads=1):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    names = [name if value is not None else "" for name, value in tensors.items()]
    node = helper.make_node(op_type, [x_name, *names], ["y"], domain="ai.edgesparse", **attrs)
    inits = [numpy_helper.from_array(value.numpy(), name) for name, value in tensors.items() if value is not None]
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(x_name, TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.edgesparse", 1)])
    path = tmp_path / f"{op_type}.onnx"
    onnx.save(model, path)
    return edgesparse.ort_session(path, threads=threads)


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("biased", [False, True])
def test_int8_actsparse_linear_matches_torch_and_the_integer_reference(dynamic, biased, tmp_path):
    """Eager op == torch on the dequantized weight (fp32 activations) or the integer reference
    (dynamic int8 activations); every ISA's C kernel, the .pte and the ONNX Runtime node (1 and 2
    threads) equal the eager op; int8 stays close to the fp32 layer."""
    from edgesparse.converters.executorch import load_method, lower, run_pte
    from edgesparse.runtime_kernels.modules import QActSparseLinear

    gen = torch.Generator().manual_seed(4)
    linear = nn.Linear(300, 520, bias=biased)
    x = torch.randn(3, 300, generator=gen)
    x[:, ::7] = 0  # exact zeros
    threshold = float(x.abs().flatten().quantile(0.5))  # half the inputs skipped
    module = QActSparseLinear(linear, threshold, dynamic).eval()
    live = x.abs() > threshold
    q, scales = quantize_weight(linear.weight)
    bias = linear.bias.detach() if biased else torch.zeros(520)
    with torch.no_grad():
        if dynamic:  # the integer reference: exact int64 sums, then the float scaling
            xq, x_scale = quantize_rows(x)
            acc = (xq.long() * live) @ q.t().long()
            want = acc.float() * (scales * x_scale) + bias
        else:
            want = (x * live) @ (q.float() * scales[:, None]).t() + bias
        eager = module(x)
        fp32 = F.linear(x * live, linear.weight, linear.bias)
    tol = dict(rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    torch.testing.assert_close(eager, want, **tol)
    assert F.cosine_similarity(eager.flatten(), fp32.flatten(), dim=0) > 0.999
    isas = _isas()
    assert "scalar" in isas and len(isas) >= 1
    try:
        for isa in isas:
            assert capi.force_isa(isa)
            got = capi.qs8_actsparse_linear(module.weight_t, module.scales, module.bias, threshold, x, dynamic)
            torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{isa}: {m}")
    finally:
        capi.force_isa(None)
    path = tmp_path / "q.pte"
    path.write_bytes(lower(module, (x,)).buffer)
    torch.testing.assert_close(run_pte(load_method(path), (x,)), want, **tol)
    for threads in (1, 2):
        session = _ort_session("QActSparseLinear", "x", {"w": module.weight_t, "s": module.scales, "b": module.bias},
                               {"threshold": threshold, "dynamic": int(dynamic)}, tmp_path, threads)
        torch.testing.assert_close(torch.from_numpy(session.run(None, {"x": x.numpy()})[0]), want, **tol)


@pytest.mark.parametrize("activation,biases", [("silu", False), ("relu", True)])
def test_int8_gated_mlp_gate_gemv_matches_torch_on_every_isa(activation, biases, tmp_path):
    """The int8 gated MLP (gate phase: input-major GEMV over int8 gate_t [in, hidden]) equals
    torch's down(act(gate x) * up x) on the int8-dequantized weights with dead neurons zeroed:
    CATS (one threshold), CHESS (one per neuron) and dense (threshold < 0), on every ISA (C ABI),
    in the .pte and in ONNX Runtime (1 and 2 threads: neuron tiles split across threads)."""
    from edgesparse.converters.executorch import load_method, lower, run_pte
    from edgesparse.runtime_kernels.modules import QActSparseGatedMLP

    torch.manual_seed(5)
    # hidden 330: five full 64-neuron tiles and a ragged one; in 96, out 80
    gate, up, down = nn.Linear(96, 330, bias=biases), nn.Linear(96, 330, bias=biases), nn.Linear(330, 80, bias=biases)
    deq = [nn.Linear(m.in_features, m.out_features, bias=biases) for m in (gate, up, down)]
    with torch.no_grad():
        for src, dst in zip((gate, up, down), deq):
            q, s = quantize_weight(src.weight)
            dst.weight.copy_(q.float() * s[:, None])
            if biases:
                dst.bias.copy_(src.bias)
    g, u, d = deq
    x = torch.randn(3, 96)
    act = F.silu if activation == "silu" else torch.relu
    with torch.no_grad():
        a = act(g(x))
        threshold = float(a.abs().flatten().quantile(0.5)) + 1e-4
        per_neuron = a.abs().quantile(0.5, dim=0) + 1e-4
        cases = [(threshold, d(torch.where(a.abs() > threshold, a, 0.0) * u(x))),
                 (per_neuron, d(torch.where(a.abs() > per_neuron, a, 0.0) * u(x))), (-1.0, d(a * u(x)))]
        # keep the thresholds off the values so float summation order cannot flip a neuron
        assert (a.abs() - threshold).abs().min() > 1e-6 and (a.abs() - per_neuron).abs().min() > 1e-6
    tol = dict(rtol=1e-4, atol=1e-4)
    isas = _isas()
    for t, want in cases:
        module = QActSparseGatedMLP(gate, up, down, t, activation).eval()
        with torch.no_grad():
            torch.testing.assert_close(module(x), want, **tol)
        try:
            for isa in isas:
                assert capi.force_isa(isa)
                got = capi.qs8_gated_mlp(module.gate_t, module.bundle, module.scales, module.biases, module.thresholds,
                                         module.threshold, module.activation, x)
                torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{isa}: {m}")
        finally:
            capi.force_isa(None)
        path = tmp_path / "gated.pte"
        path.write_bytes(lower(module, (x,)).buffer)
        torch.testing.assert_close(run_pte(load_method(path), (x,)), want, **tol)
        if not isinstance(t, torch.Tensor):
            continue  # ONNX Runtime once, on the CHESS case (every operand present)
        onnx_path = tmp_path / "gated.onnx"
        torch.onnx.export(module, (x,), str(onnx_path), dynamo=True, external_data=False)
        for threads in (1, 2):
            session = edgesparse.ort_session(onnx_path, threads=threads)
            got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
            torch.testing.assert_close(got, want, **tol)


def test_fp32_gated_mlp_gate_is_input_major_on_every_isa():
    """The fp32 gated MLP's new gate phase (input-major GEMV, gate [in, hidden]) against torch on
    every ISA, with a hidden size that leaves a ragged tile."""
    from edgesparse.runtime_kernels.modules import ActSparseGatedMLP

    torch.manual_seed(6)
    gate, up, down = nn.Linear(64, 200, bias=False), nn.Linear(64, 200, bias=False), nn.Linear(200, 48, bias=False)
    module = ActSparseGatedMLP(gate, up, down, 0.05).eval()
    assert module.gate.shape == (64, 200)
    x = torch.randn(2, 64)
    with torch.no_grad():
        a = F.silu(gate(x))
        want = down(torch.where(a.abs() > 0.05, a, 0.0) * up(x))
    try:
        for isa in _isas():
            assert capi.force_isa(isa)
            torch.testing.assert_close(_f32_gated_capi(module, x), want, rtol=1e-5, atol=1e-5)
    finally:
        capi.force_isa(None)


def _f32_gated_capi(module, x):
    import ctypes

    class Gated(ctypes.Structure):
        _fields_ = [("in_", ctypes.c_size_t), ("hidden", ctypes.c_size_t), ("out", ctypes.c_size_t),
                    ("gate", capi._f32p), ("bundle", capi._f32p), ("gate_bias", capi._f32p), ("up_bias", capi._f32p),
                    ("down_bias", capi._f32p), ("act", ctypes.c_int), ("thresholds", capi._f32p)]

    inp, hidden = module.gate.shape
    out = module.bundle.shape[1] - inp
    y, h = torch.empty(x.shape[0], out), torch.empty(x.shape[0], hidden)
    w = Gated(inp, hidden, out, capi._ptr(module.gate, capi._f32p), capi._ptr(module.bundle, capi._f32p), None, None,
              None, module.activation, None)
    capi.lib().es_f32_gated_mlp(ctypes.byref(w), ctypes.c_float(module.threshold), ctypes.c_size_t(x.shape[0]),
                                capi._ptr(x, capi._f32p), capi._ptr(h, capi._f32p), capi._ptr(y, capi._f32p))
    return y


@pytest.mark.parametrize("method", ["chess", "teal"])
def test_act_sparsity_with_int8_dynamic_exports_verifies_and_runs_in_the_cpp_runner(method, tmp_path):
    """`--act-sparsity 0.5 --quant int8-dynamic` on a tiny Llama's decode step: the thresholded
    layers become our int8 act-sparse ops, the rest XNNPACK int8-dynamic (PT2E through the
    export wrapper); the .pte verifies against the eager quantized model and runs in the C++
    runner (which links our ops)."""
    from test_actsparse import tiny_bundle

    from edgesparse import export_model
    from edgesparse.converters.executorch import lower  # noqa: F401  (ExecuTorch present)
    from edgesparse.devices.local import profile_local
    from edgesparse.recipe import ActSparsityConfig, QuantConfig, Recipe

    tokens = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(1))
    recipe = Recipe(quant=QuantConfig(mode="int8-dynamic"),
                    act_sparsity=ActSparsityConfig(method=method, target=0.5, calib_tokens=256))
    record = export_model(tiny_bundle(tokens), recipe, tmp_path, ["pte"])
    (artifact,) = record["artifacts"]
    assert artifact["verified"], artifact
    act = record["act_sparsity"]
    assert act["kernel_layers"] == (2 if method == "chess" else 14)
    assert abs(act["measured_sparsity"]["mean"] - 0.5) <= 0.02
    want = "edgesparse::qs8_actsparse_gated_mlp" if method == "chess" else "edgesparse::qs8_actsparse_linear"
    assert any(k.startswith(want) for k in record["runtime_ops"]["kernels"]), record["runtime_ops"]
    assert record["quantization"]["mode"] == "int8-dynamic"
    assert "act_sparse_layers" in record["quantization"]
    ppl = record["metrics"]  # measured on the exported model in eager torch (our ops' eager twins + 8da8w linears)
    assert 0 < ppl["perplexity_compressed"] < 1.2 * ppl["perplexity_dense"]
    # the .pte holds our int8 ops and XNNPACK delegates (the int8-dynamic linears)
    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary((tmp_path / "model.pte").read_bytes())
    program = getattr(program, "program", program)
    ops = {op.name for plan in program.execution_plan for op in plan.operators}
    assert f"edgesparse::{want.split('::')[1]}" in ops, ops
    assert any(plan.delegates for plan in program.execution_plan)
    result = profile_local(tmp_path / "model.pte", runs=10, warmup=2, runtime="cpp")
    assert result["p50_ms"] > 0 and result["peak_rss_mb"] > 0


def test_act_sparsity_refuses_other_quant_modes_and_formats(tmp_path):
    from test_actsparse import tiny_bundle

    from edgesparse import export_model
    from edgesparse.errors import EdgesparseError
    from edgesparse.recipe import ActSparsityConfig, QuantConfig, Recipe

    tokens = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(1))
    act = ActSparsityConfig(method="cats", target=0.5, calib_tokens=256)
    with pytest.raises(EdgesparseError, match="fp32 or int8-dynamic"):
        export_model(tiny_bundle(tokens), Recipe(quant=QuantConfig(mode="int4w"), act_sparsity=act), tmp_path / "a", ["pte"])
    with pytest.raises(EdgesparseError, match=r"\.pte only"):
        export_model(tiny_bundle(tokens), Recipe(quant=QuantConfig(mode="int8-dynamic"), act_sparsity=act), tmp_path / "b",
                     ["pte", "onnx"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
