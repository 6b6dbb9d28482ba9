"""`export_model`: the whole path from a model spec to verified artifacts plus a manifest,
written atomically into one output folder. The CLI's `export` is a thin skin over this."""

from __future__ import annotations

import copy
import time
from collections import Counter
from pathlib import Path

import torch

from edgesparse import actsparse, manifest as manifest_mod
from edgesparse._io import staging_dir, write_json_atomic
from edgesparse.compress import compress
from edgesparse.converters import ExportJob
from edgesparse.converters.executorch import export_pte, load_method, run_pte
from edgesparse.converters.onnx import export_onnx
from edgesparse.converters.tflite import export_tflite, interpreter, run_tflite
from edgesparse import runtime_kernels
from edgesparse.converters.sparse_swap import fold_batchnorm, has_kernels, register_kernel, swap_sparse_layers
from edgesparse.errors import EdgesparseError
from edgesparse.layers import set_training
from edgesparse.models import ModelBundle, load_model
from edgesparse.quantize import quantize
from edgesparse.recipe import Recipe

FORMATS = {"pte": export_pte, "onnx": export_onnx, "tflite": export_tflite}


def parse_formats(text: str) -> list[str]:
    formats = [f.strip().lower() for f in str(text).split(",") if f.strip()]
    if not formats:
        raise EdgesparseError("no export format given (use --format pte)")
    for fmt in formats:
        if fmt not in FORMATS:
            raise EdgesparseError(f"unknown format {fmt!r} (available: {', '.join(FORMATS)})")
    return list(dict.fromkeys(formats))


def export_model(
    spec: str | ModelBundle,
    recipe: Recipe,
    out_dir: str | Path,
    formats: list[str] = ("pte",),
    finetune: bool = True,
    onnx_sparse_storage: bool = False,
    tflite_ops: str = "builtin",
) -> dict:
    """Compress and export; returns the manifest (also written to out_dir/manifest.json)."""
    formats = parse_formats(",".join(formats))
    bundle = spec if isinstance(spec, ModelBundle) else load_model(spec)
    recipe = with_bundle_defaults(recipe, bundle)
    model = set_training(copy.deepcopy(bundle.model), False)
    started = time.perf_counter()
    metrics = {}
    metric = bundle.metric
    if bundle.evaluate:
        metrics[f"{metric}_dense"] = bundle.evaluate(_eager(set_training(bundle.model, False)))
    hook = bundle.finetune() if finetune and bundle.finetune and recipe.prune.schedule.steps else None
    int8_act = _int8_act_sparsity(recipe, formats)
    kernels = runtime_kernels.register_with_exporter(register_kernel) and has_kernels("float32")
    int8_sparse = kernels and _int8_sparse(recipe)
    result = compress(
        model, _without_quant(recipe) if int8_act or int8_sparse else recipe, example_inputs=bundle.example_inputs,
        calib=bundle.calib() if bundle.calib else None, finetune=hook, wrapped=bundle.export_wrapper is not None,
    )
    swapped, onnx_source = 0, None
    if int8_sparse:  # pruned linears -> our int8 op (fp32 model), then the rest int8-dynamic (XNNPACK / ORT)
        onnx_source = result.model = copy.deepcopy(result.model)  # result.pruned keeps the plain layers
        for plan in result.layers:
            plan.dtype = "int8"
        swapped = swap_sparse_layers(result.model, result.layers, bundle.example_inputs)
        result.model, result.quant = quantize(result.model, recipe.quant, bundle.example_inputs,
                                              wrapped=bundle.export_wrapper is not None)
        result.quant["sparse_layers"] = (f"{swapped} pruned linear layers on edgesparse::qs8_bcsr_linear: int8 per-channel "
                                         "symmetric weights in Rx1 blocks, int8 per-row dynamic activations")
    act_record = None
    if recipe.act_sparsity.active:
        act_record = actsparse.sparsify(result.model, bundle, recipe.act_sparsity, finetune=finetune)
    if int8_act:  # thresholded layers -> our int8 ops, then the other linears int8-dynamic (XNNPACK)
        if not runtime_kernels.available():
            raise EdgesparseError("activation sparsity on int8 weights needs the edgesparse kernels", hint="run `make kernels`")
        result.model = copy.deepcopy(result.model)  # result.pruned keeps the thresholded fp32 layers
        act_record["kernel_layers"] = actsparse.to_kernels(result.model, int8=True)
        result.model, result.quant = quantize(result.model, recipe.quant, bundle.example_inputs,
                                              wrapped=bundle.export_wrapper is not None)
        result.quant["act_sparse_layers"] = "edgesparse::qs8_actsparse_* ops: int8 per-channel symmetric weights"
        for plan in result.layers:
            plan.dtype = "int8"
    if bundle.evaluate:
        # the quantized graph is specialized to the example batch size: score it row by row
        predict = _eager(result.model)
        rowwise = _batch_one(bundle) and not bundle.export_wrapper
        metrics[f"{metric}_compressed"] = bundle.evaluate(_rowwise(predict) if rowwise else predict)
    if bundle.notes:
        metrics["eval_set"] = "; ".join(bundle.notes)
    pruned = copy.deepcopy(result.pruned)  # the swap below may work in place
    export_model_ = result.model
    if kernels and recipe.quant.mode == "none" and not recipe.act_sparsity.active:
        folds = fold_batchnorm(export_model_, bundle.example_inputs)
        for plan in result.layers:
            plan.batchnorm = folds.get(plan.name)
    reference = None
    if kernels and recipe.quant.mode == "int8" and recipe.prune.active and not recipe.act_sparsity.active:
        # pruned 1x1 convs -> our int8 op on the quantized tensors; the .pte is checked against the
        # graph before the swap, so a wrong swap cannot verify itself
        from edgesparse.runtime_kernels.static_int8 import swap_static_int8_convs

        reference = copy.deepcopy(export_model_)
        counts = swap_static_int8_convs(export_model_, result.layers)
        swapped = counts["conv1x1"]
        if swapped:
            result.quant["sparse_layers"] = (f"{swapped} pruned 1x1 convs on edgesparse::qs8_bcsr_conv1x1: int8 in and out "
                                             "(no dequantize/quantize around them), weights in Rx1 blocks")
            result.quant["chain_layers"] = (f"{counts['dwconv3x3']} depthwise 3x3 convs and {counts['add']} adds between them "
                                            "on edgesparse::qs8_dwconv3x3 / qs8_add (NCHW int8, no XNNPACK partition)")
    if not int8_sparse:
        swapped += swap_sparse_layers(export_model_, result.layers, bundle.example_inputs, quantized=recipe.quant.mode != "none")
    if act_record is not None:  # `pruned` keeps the thresholded torch layers; the export model gets the ops
        if not int8_act:
            act_record["kernel_layers"] = actsparse.to_kernels(export_model_) if kernels else 0
        else:
            act_record["kernels"] = sorted({m.kernel_name for m in export_model_.modules() if hasattr(m, "kernel_name")})
        swapped += act_record["kernel_layers"]
    layers = [plan.to_dict() for plan in result.layers]
    record = manifest_mod.new(bundle.name, recipe.to_dict(), result.sparsity_overall, result.quant, layers, metrics)
    record["prune_method"] = result.prune_method
    record["warnings"] = _warnings(recipe, result.layers, swapped, kernels)
    if act_record is not None:
        record["act_sparsity"] = act_record
    example_inputs, samples = bundle.example_inputs, bundle.verification_inputs()
    if bundle.export_wrapper:  # e.g. an LM: one decode step with a static KV cache
        export_model_, example_inputs, samples = bundle.export_wrapper(export_model_)
        pruned = bundle.export_wrapper(pruned)[0]
        onnx_source = bundle.export_wrapper(onnx_source)[0] if onnx_source is not None else None
    record["example_input_shapes"] = [list(t.shape) for t in example_inputs]
    if swapped:
        kernel_names = {plan.kernel for plan in result.layers if plan.kernel != "dense-xnnpack"}
        kernel_names |= {name for name in (act_record or {}).get("kernels", [])}
        record["runtime_ops"] = {"library": runtime_kernels.ET_LIBRARY.name, "onnx_library": runtime_kernels.ORT_LIBRARY.name,
                                 "kernels": sorted(kernel_names)}
    job = ExportJob(export_model_, pruned, example_inputs, samples, recipe.quant.mode,
                    calib=list(_calibration(bundle, recipe)), onnx_sparse_storage=onnx_sparse_storage,
                    tflite_ops=tflite_ops, onnx_source=onnx_source, thresholded=recipe.act_sparsity.active,
                    reference=reference)
    with staging_dir(out_dir) as stage:
        for fmt in formats:
            entry = FORMATS[fmt](job, stage / f"model.{fmt}")
            if bundle.evaluate and _batch_one(bundle) and not bundle.export_wrapper:  # score the artifact itself
                entry[metric] = bundle.evaluate(_rowwise(_artifact_predictor(fmt, stage / entry["path"])))
            record["artifacts"].append(entry)
        record["export_seconds"] = round(time.perf_counter() - started, 2)
        write_json_atomic(stage / "manifest.json", manifest_mod.validate(record))
    return record


def _int8_act_sparsity(recipe: Recipe, formats: list[str]) -> bool:
    """True for activation sparsity on int8 weights (--act-sparsity with --quant int8-dynamic): the
    thresholded layers run our int8 act-sparse ops, the rest XNNPACK int8-dynamic, in a .pte."""
    if not recipe.act_sparsity.active or recipe.quant.mode == "none":
        return False
    if recipe.quant.mode != "int8-dynamic":
        raise EdgesparseError(f"activation sparsity runs on fp32 or int8-dynamic weights (got --quant {recipe.quant.mode})",
                              hint="use --quant int8-dynamic or --quant none with --act-sparsity")
    if formats != ["pte"]:
        raise EdgesparseError("activation sparsity with --quant int8-dynamic exports .pte only (our int8 ops are ExecuTorch kernels here)",
                              hint="use --format pte, or --quant none for .onnx")
    return True


def _int8_sparse(recipe: Recipe) -> bool:
    """True when pruned layers can run on our int8 kernels: --quant int8-dynamic with element or
    block pruning (the layers are swapped before quantization; see swap_factory_int8)."""
    return (recipe.quant.mode == "int8-dynamic" and recipe.prune.active and recipe.prune.parsed_pattern.kind != "channel"
            and not recipe.act_sparsity.active)


def _without_quant(recipe: Recipe) -> Recipe:
    import dataclasses

    return dataclasses.replace(recipe, quant=dataclasses.replace(recipe.quant, mode="none"))


def _warnings(recipe: Recipe, plans: list, swapped: int, kernels: bool) -> list[str]:
    """One line each for a recipe that silently did nothing useful: pruning asked for but no layer
    pruned, or layers pruned but none running sparse; with the reason and the fix."""
    asked = recipe.prune.active and recipe.prune.parsed_pattern.kind != "channel"
    pruned = [plan for plan in plans if plan.pattern and plan.pattern != "channel"]
    if asked and not pruned:
        reasons = Counter(plan.reason for plan in plans)
        why = "; ".join(f"{n} layer{'s' if n > 1 else ''}: {reason}" for reason, n in reasons.most_common(3))
        fix = ("set keep_first_last_dense = false under [prune] in a recipe (--recipe)"
               if any("first/last" in plan.reason for plan in plans) else "check the recipe's exclude/override rules and the pattern")
        return [f"the model was left unpruned ({why}); fix: {fix}"]
    if asked and not swapped and recipe.quant.mode in ("none", "int8-dynamic") and not recipe.act_sparsity.active:
        reasons = Counter(plan.reason for plan in pruned)
        why = "; ".join(f"{n} layer{'s' if n > 1 else ''}: {reason}" for reason, n in reasons.most_common(2))
        fix = ("run `make kernels`" if not kernels else
               "prune further or to a pattern with a kernel (block:4x1, block:8x1, nm:2:4); see `edgesparse bench kernels`")
        return [f"{len(pruned)} layers are pruned but none runs sparse, so the export is no faster than dense ({why}); fix: {fix}"]
    return []


def with_bundle_defaults(recipe: Recipe, bundle: ModelBundle) -> Recipe:
    """The bundle's prune_defaults fill the recipe's prune fields still at their defaults."""
    import dataclasses

    from edgesparse.recipe import PruneConfig

    defaults = {f.name: f.default for f in dataclasses.fields(PruneConfig) if f.default is not dataclasses.MISSING}
    changes = {k: v for k, v in bundle.prune_defaults.items() if getattr(recipe.prune, k) == defaults.get(k)}
    return dataclasses.replace(recipe, prune=dataclasses.replace(recipe.prune, **changes)) if changes else recipe


def _calibration(bundle: ModelBundle, recipe: Recipe):
    """The int8 calibration batches the ONNX and TFLite quantizers use (the .pte's PT2E
    quantization calibrates on the same source)."""
    if recipe.quant.mode != "int8":
        return []
    from edgesparse.quantize import take_batches

    return take_batches(bundle.calib(), recipe.quant.calib_batches) if bundle.calib else [tuple(bundle.example_inputs)]


def _artifact_predictor(fmt: str, path: Path):
    if fmt == "pte":
        method = load_method(path)
        return lambda x: run_pte(method, (x,))
    if fmt == "tflite":
        runner = interpreter(path)
        return lambda x: run_tflite(runner, (x,))
    session = runtime_kernels.ort_session(path)
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def _eager(model):
    def predict(x):
        with torch.no_grad():
            return model(x)
    return predict


def _batch_one(bundle: ModelBundle) -> bool:
    return len(bundle.example_inputs) == 1 and bundle.example_inputs[0].shape[0] == 1


def _rowwise(predict):
    """Exported programs have the example's fixed batch of 1: feed a batch one row at a time."""
    return lambda x: torch.cat([predict(x[i : i + 1]) for i in range(len(x))])


def recipe_from_options(base: Recipe | None, prune: float | None, pattern: str | None, quant: str | None, steps: int | None,
                        act_sparsity: float | None = None, act_method: str | None = None,
                        act_finetune_steps: int | None = None, prune_method: str | None = None,
                        quant_method: str | None = None) -> Recipe:
    """CLI flags override the recipe file's values."""
    import dataclasses

    recipe = base or Recipe()
    prune_cfg = recipe.prune
    changes = {}
    if pattern is not None:
        changes["pattern"] = pattern
    if prune is not None:
        changes["sparsity"] = prune
    if prune_method is not None:
        changes["method"] = prune_method
    if changes:
        if "pattern" in changes and "sparsity" not in changes and changes["pattern"].startswith("nm"):
            changes["sparsity"] = 0.0
        prune_cfg = dataclasses.replace(prune_cfg, **changes)
    if steps is not None:
        prune_cfg = dataclasses.replace(prune_cfg, schedule=dataclasses.replace(prune_cfg.schedule, steps=steps))
    quant_cfg = dataclasses.replace(recipe.quant, mode=quant) if quant is not None else recipe.quant
    if quant_method is not None:
        quant_cfg = dataclasses.replace(quant_cfg, method=quant_method)
    act = {k: v for k, v in (("target", act_sparsity), ("method", act_method), ("finetune_steps", act_finetune_steps)) if v is not None}
    act_cfg = dataclasses.replace(recipe.act_sparsity, **act) if act else recipe.act_sparsity
    return Recipe(prune=prune_cfg, quant=quant_cfg, act_sparsity=act_cfg)
