"""ExecuTorch export: torch.export -> to_edge_transform_and_lower(XNNPACK) -> .pte, then verified
by running the .pte in the ExecuTorch runtime against eager torch on the same inputs."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from edgesparse import _progress
from edgesparse._io import atomic_path, native_stderr, sha256_file
from edgesparse.converters import ExportJob, verify
from edgesparse.errors import EdgesparseError
from edgesparse.quantize import capture


def lower(model: nn.Module, example_inputs: tuple, fuse: bool = True):
    """The staged pipeline; returns the ExecutorchProgramManager (`.buffer` is the .pte bytes).
    `fuse` keeps the layers between our sparse ops on our kernels (runtime_kernels/fusion.py), so
    XNNPACK is not entered (through NCHW/NHWC transposes) between them."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from edgesparse.runtime_kernels.fusion import fuse_chains

    exported = capture(model, example_inputs)
    fused = fuse_chains(exported) if fuse else {}
    edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
    program = edge.to_executorch()
    program.fused_chains = fused  # for the manifest: what moved off XNNPACK
    return program


def load_method(path: str | Path):
    """Load a .pte's forward method in the ExecuTorch Python runtime."""
    from executorch.runtime import Runtime

    from edgesparse.runtime_kernels import load_executorch_ops

    load_executorch_ops()  # programs with edgesparse:: ops need their kernels registered first
    log: list[str] = []
    try:
        with native_stderr(log):
            return Runtime.get().load_program(str(path)).load_method("forward")
    except Exception as exc:
        detail = next((line for line in reversed(log) if line.strip() and "cpuinfo" not in line), "")
        raise EdgesparseError(f"ExecuTorch could not load {Path(path).name}: {exc}" + (f" [{detail.strip()}]" if detail else "")) from None


def run_pte(method, inputs: tuple) -> torch.Tensor:
    return method.execute([t.contiguous() for t in inputs])[0]


def export_pte(job: ExportJob, dest: str | Path) -> dict:
    """Write a verified .pte at `dest` (atomically) and return its manifest entry."""
    dest = Path(dest)
    with _progress.status(f"exporting {dest.name} (torch.export -> XNNPACK -> .pte)"):
        program = lower(job.model, job.example_inputs)
    with atomic_path(dest) as tmp:
        tmp.write_bytes(program.buffer)
        with _progress.status(f"verifying {dest.name} in the ExecuTorch runtime"):
            # fp32: against the plain torch layers, so a wrong swap of our ops cannot verify itself
            quantized = job.quant != "none"
            reference = job.reference if job.reference is not None else job.model if quantized else job.pruned
            entry = verify_pte(tmp, reference, job.sample_inputs, job.statistical)
    entry.update(format="pte", path=dest.name, bytes=dest.stat().st_size, sha256=sha256_file(dest))
    if any(program.fused_chains.values()):
        entry["fused_chains"] = program.fused_chains
    return entry


def verify_pte(path: Path, model: nn.Module, sample_inputs: list[tuple], quantized: bool) -> dict:
    method = load_method(path)
    reference = verify.reference(model, sample_inputs)
    entry = verify.check(reference, [run_pte(method, inputs) for inputs in sample_inputs], quantized)
    return entry | {"samples": len(sample_inputs)}
