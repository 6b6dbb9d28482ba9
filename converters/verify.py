"""Numerical comparison of an artifact's outputs with eager torch on the same inputs."""

from __future__ import annotations

import torch


def compare(reference: list[torch.Tensor], actual: list[torch.Tensor]) -> dict:
    """max abs error, relative error (||a-r|| / ||r||) and cosine similarity over all samples."""
    ref = torch.cat([r.detach().reshape(-1).double() for r in reference])
    act = torch.cat([a.detach().reshape(-1).double() for a in actual])
    diff = act - ref
    return {
        "max_abs_error": float(diff.abs().max()) if diff.numel() else 0.0,
        "relative_error": float(diff.norm() / ref.norm().clamp_min(1e-30)),
        "cosine": float(torch.nn.functional.cosine_similarity(act, ref, dim=0)),
    }


# fp32: XNNPACK reorders sums, so allow tiny absolute drift scaled to the output magnitude.
FP32_ATOL = 1e-4
# quantized: the .pte's integer kernels vs the eager quantize/dequantize reference.
QUANT_MIN_COSINE = 0.999
QUANT_MAX_RELATIVE = 0.05


def passes(metrics: dict, quantized: bool, output_scale: float) -> bool:
    if quantized:
        return metrics["cosine"] >= QUANT_MIN_COSINE and metrics["relative_error"] <= QUANT_MAX_RELATIVE
    return metrics["max_abs_error"] <= FP32_ATOL * max(1.0, output_scale)


def tolerance(quantized: bool, output_scale: float) -> dict:
    if quantized:
        return {"min_cosine": QUANT_MIN_COSINE, "max_relative_error": QUANT_MAX_RELATIVE}
    return {"max_abs_error": FP32_ATOL * max(1.0, output_scale)}


def reference(model, sample_inputs: list[tuple]) -> list[torch.Tensor]:
    """Eager torch's outputs on the verification inputs."""
    with torch.no_grad():
        return [model(*inputs) for inputs in sample_inputs]


def check(reference_outputs: list[torch.Tensor], actual: list[torch.Tensor], quantized: bool) -> dict:
    """An artifact's outputs against torch's: the metrics, whether they pass, and the tolerance
    used (scaled by the largest reference output)."""
    metrics = compare(reference_outputs, actual)
    scale = max(float(r.abs().max()) for r in reference_outputs)
    return {"verified": passes(metrics, quantized, scale), **metrics, "tolerance": tolerance(quantized, scale)}
