"""ONNX export: torch.onnx (dynamo) -> .onnx, verified in ONNX Runtime against eager torch.

- fp32: layers swapped for edgesparse kernels become `ai.edgesparse` nodes (BcsrLinear,
  BcsrConv1x1, NmLinear, ...) holding the packed weights as initializers; ONNX Runtime runs them
  once the edgesparse op library is registered (`edgesparse.runtime_kernels.ort_session`).
- int8: ONNX Runtime's static QDQ quantization (int8 weights per channel, uint8 activations,
  MinMax on the recipe's calibration batches); int8-dynamic: dynamic quantization of MatMul/Gemm
  only (dynamic ConvInteger is slower than fp32 in ORT). Both start from the plain pruned model:
  the edgesparse ORT ops are fp32.
- `onnx_sparse_storage`: initializers that are mostly zeros are stored as SparseTensorProto when
  that is smaller. A smaller file only: ONNX Runtime densifies them at load.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgesparse import _progress
from edgesparse._io import atomic_path, native_stderr, sha256_file
from edgesparse.converters import ExportJob, verify
from edgesparse.errors import EdgesparseError, first_line

SPARSE_STORAGE_NOTE = "sparse initializers (SparseTensorProto): ONNX Runtime densifies them at load, so smaller file, dense speed"


def to_onnx(model: nn.Module, example_inputs: tuple):
    """torch.onnx (dynamo) -> onnx.ModelProto, weights inside, without the per-node debug
    metadata (torch stack traces: a third of a small model's file)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        # it logs a warning per missing optional package (torchvision) on every export
        logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
        try:
            source = model
            if getattr(model, "export_strict", False):  # it lowers only from dynamo's strict capture
                source = _capture_for_onnx(model, example_inputs)
            proto = torch.onnx.export(source, tuple(example_inputs), dynamo=True, external_data=False, verbose=False).model_proto
        except Exception as exc:
            raise EdgesparseError(f"torch.onnx could not export the model: {first_line(exc)}") from None
    for node in proto.graph.node:
        del node.metadata_props[:]
    return proto


def _capture_for_onnx(model: nn.Module, example_inputs: tuple):
    """For modules that capture only with dynamo (strict): capture, then turn the graph back into
    a module whose edgesparse op calls emit their ai.edgesparse nodes, for torch.onnx to trace."""
    from edgesparse.quantize import capture
    from edgesparse.runtime_kernels.modules import onnx_emitter

    module = capture(model, example_inputs).module()
    for node in module.graph.nodes:
        if node.op == "call_function" and str(node.target).startswith("edgesparse."):
            node.target = onnx_emitter(node.target, tuple(node.meta["val"].shape))
    module.recompile()
    return module


def export_onnx(job: ExportJob, dest: str | Path) -> dict:
    dest = Path(dest)
    if hasattr(job.pruned, "cache_io"):  # a decode step with a static KV cache: ONNX has no state
        job = _with_cache_io(job)
    if job.quant == "int4w":
        raise EdgesparseError("--quant int4w is not available for --format onnx", hint="use --quant none, int8 or int8-dynamic")
    quantized = job.quant != "none"
    with _progress.status(f"exporting {dest.name} (torch.onnx)"):
        dense = to_onnx(job.pruned, job.example_inputs)
        proto = dense if quantized or job.model is job.pruned else to_onnx(job.model, job.example_inputs)
    entry = {"dense_bytes": dense.ByteSize()}
    if quantized:
        with _progress.status(f"quantizing {dest.name} ({job.quant}, ONNX Runtime)"):
            source = dense if job.onnx_source is None else to_onnx(job.onnx_source, job.example_inputs)
            proto = quantize(source, job.quant, job.calib)
        entry["quantization"] = ("static QDQ: int8 per-channel weights, uint8 activations" if job.quant == "int8"
                                 else "dynamic: int8 MatMul/Gemm weights")
    if job.onnx_sparse_storage:
        entry["sparse_initializers"] = store_sparse(proto)
        entry["storage"] = SPARSE_STORAGE_NOTE
    with atomic_path(dest) as tmp:
        tmp.write_bytes(proto.SerializeToString())
        with _progress.status(f"verifying {dest.name} in ONNX Runtime"):
            entry.update(verify_onnx(tmp, job.pruned, job.sample_inputs, job.statistical))  # plain torch layers: a wrong swap cannot verify itself
    entry.update(format="onnx", path=dest.name, bytes=dest.stat().st_size, sha256=sha256_file(dest))
    entry["size_vs_dense"] = round(entry["bytes"] / entry["dense_bytes"], 4)
    return entry


def quantize(model, mode: str, calib: list[tuple]):
    """ONNX Runtime quantization of a ModelProto; returns the quantized ModelProto."""
    import onnx
    from onnxruntime import quantization as q

    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), \
            native_stderr():
        warnings.simplefilter("ignore")
        logging.getLogger().setLevel(logging.ERROR)  # ORT's quantizer logs through the root logger
        source, target = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(model, source)
        if mode == "int8-dynamic":
            q.quantize_dynamic(source, target, op_types_to_quantize=["MatMul", "Gemm"], per_channel=True)
        else:
            names = [i.name for i in model.graph.input]
            reader = _CalibrationReader([{n: t.numpy() for n, t in zip(names, batch)} for batch in calib])
            q.quantize_static(source, target, reader, quant_format=q.QuantFormat.QDQ, per_channel=True,
                              activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8)
        return onnx.load(target)


class _CalibrationReader:
    def __init__(self, feeds: list[dict]):
        self._feeds = iter(feeds)

    def get_next(self):
        return next(self._feeds, None)


def store_sparse(model) -> list[str]:
    """Move initializers whose SparseTensorProto (values + int64 flat indices) is smaller than
    their dense form into graph.sparse_initializer; returns their names."""
    from onnx import helper, numpy_helper

    graph = model.graph
    moved, keep = [], []
    for init in graph.initializer:
        array = numpy_helper.to_array(init)
        nonzero = np.flatnonzero(array)
        if array.ndim < 2 or nonzero.size * (array.itemsize + 8) >= array.nbytes:
            keep.append(init)
            continue
        values = numpy_helper.from_array(array.reshape(-1)[nonzero], init.name)
        indices = numpy_helper.from_array(nonzero.astype(np.int64), init.name + "_indices")
        graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, list(array.shape)))
        moved.append(init.name)
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return moved


def _with_cache_io(job: ExportJob) -> ExportJob:
    """The job with its stateful step(s) turned into cache-in / cache-out ones (see cache_io)."""
    import dataclasses

    pruned, example_inputs, samples = job.pruned.cache_io(job.sample_inputs)
    model = pruned if job.model is job.pruned else job.model.cache_io(job.sample_inputs)[0]
    source = job.onnx_source.cache_io(job.sample_inputs)[0] if job.onnx_source is not None else None
    return dataclasses.replace(job, model=model, pruned=pruned, example_inputs=example_inputs, sample_inputs=samples,
                               onnx_source=source)


def _flat(outputs) -> torch.Tensor:
    """One output, or several (a step's logits and its cache) as one flat tensor to compare."""
    if isinstance(outputs, (list, tuple)):
        return torch.cat([torch.as_tensor(np.asarray(t)).reshape(-1) for t in outputs])
    return outputs


def verify_onnx(path: Path, model: nn.Module, sample_inputs: list[tuple], quantized: bool = False) -> dict:
    from edgesparse.runtime_kernels import ort_session

    session = ort_session(path)
    names = [i.name for i in session.get_inputs()]
    reference = [_flat(outputs) for outputs in verify.reference(model, sample_inputs)]
    runs = [session.run(None, {n: t.numpy() for n, t in zip(names, inputs)}) for inputs in sample_inputs]
    actual = [_flat(outputs) if len(outputs) > 1 else torch.from_numpy(np.asarray(outputs[0])) for outputs in runs]
    return verify.check(reference, actual, quantized) | {"samples": len(sample_inputs), "runtime": "onnxruntime"}
