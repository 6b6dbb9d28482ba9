"""ONNX export: torch.onnx (dynamo) -> .onnx, verified in ONNX Runtime against eager torch.

Layers swapped for edgesparse kernels become `ai.edgesparse` nodes (BcsrLinear, BcsrConv1x1,
ActSparseLinear) holding the packed weights as initializers; ONNX Runtime runs them once the
edgesparse op library is registered, which `edgesparse.ort_session(path)` does. fp32 only for
now: int8 QDQ export comes with the converters work.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgesparse import _progress
from edgesparse._io import atomic_path, sha256_file
from edgesparse.converters import verify
from edgesparse.errors import EdgesparseError, first_line


def export_onnx(model: nn.Module, example_inputs: tuple, dest: str | Path, *, sample_inputs: list[tuple], quantized: bool) -> dict:
    if quantized:
        raise EdgesparseError("quantized ONNX export is not available yet", hint="use --quant none with --format onnx")
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        with _progress.status(f"exporting {dest.name} (torch.onnx)"), warnings.catch_warnings(), \
                contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            # it logs a warning per missing optional package (torchvision) on every export
            logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
            try:
                program = torch.onnx.export(model, tuple(example_inputs), dynamo=True, external_data=False, verbose=False)
            except Exception as exc:
                first = first_line(exc)
                raise EdgesparseError(f"torch.onnx could not export the model: {first}") from None
            program.save(str(tmp))
        with _progress.status(f"verifying {dest.name} in ONNX Runtime"):
            entry = verify_onnx(tmp, model, sample_inputs)
    entry.update(format="onnx", path=dest.name, bytes=dest.stat().st_size, sha256=sha256_file(dest))
    return entry


def verify_onnx(path: Path, model: nn.Module, sample_inputs: list[tuple]) -> dict:
    from edgesparse.runtime_kernels import ort_session

    session = ort_session(path)
    names = [i.name for i in session.get_inputs()]
    with torch.no_grad():
        reference = [model(*inputs) for inputs in sample_inputs]
    actual = [torch.from_numpy(np.asarray(session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})[0]))
              for inputs in sample_inputs]
    metrics = verify.compare(reference, actual)
    scale = max(float(r.abs().max()) for r in reference)
    entry = {"verified": verify.passes(metrics, False, scale), "samples": len(sample_inputs), "runtime": "onnxruntime"}
    entry.update(metrics)
    entry["tolerance"] = {"max_abs_error": verify.FP32_ATOL * max(1.0, scale)}
    return entry
