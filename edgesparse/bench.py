"""`edgesparse bench kernels`: our sparse ops against dense baselines, measured in one run.

Every variant of a case is a one-layer program run through the same call of its runtime (the
ExecuTorch Python runtime for dense XNNPACK fp32, dense XNNPACK int8 and our sparse .pte, fp32 and,
for linear layers, int8; ONNX Runtime for its MatMul/Conv), so call overhead is the same on both
sides. Dense kernels do not look at the values, so each shape's dense programs are built once
(from its first case's layer) and timed again, interleaved, in every case of that shape. Rounds interleave the variants (A, B, C, A, B, C, ...) so they see the same machine load,
and each reported time is the median over rounds of per-round medians. One thread unless --threads says otherwise.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgesparse import _progress
from edgesparse._io import native_stderr
from edgesparse.patterns import make_mask
from edgesparse.recipe import Pattern


@dataclass(frozen=True)
class Case:
    op: str  # "linear", "conv1x1", or "mlp" (in -> out -> in with ReLU, activation-sparse)
    inp: int
    out: int
    rows: int  # batch for linear, pixels side (HxW = rows x rows) for conv1x1
    pattern: str
    sparsity: float

    @property
    def shape(self) -> str:
        if self.op in ("linear", "mlp"):
            return f"{self.inp}->{self.out}{'->' + str(self.inp) if self.op == 'mlp' else ''} batch {self.rows}"
        return f"{self.inp}->{self.out} @{self.rows}x{self.rows}"

    def example(self) -> torch.Tensor:
        gen = torch.Generator().manual_seed(1)
        if self.op in ("linear", "mlp"):
            return torch.randn(self.rows, self.inp, generator=gen)
        return torch.randn(1, self.inp, self.rows, self.rows, generator=gen)


def cases(quick: bool) -> list[Case]:
    layers = [("linear", 1024, 4096, 1), ("linear", 1024, 4096, 16), ("linear", 4096, 1024, 1),
              ("conv1x1", 256, 512, 14), ("conv1x1", 512, 1024, 7)]
    if not quick:
        # larger than this CPU's L3 in fp32 (235 MB): the DRAM-bound case phones live in
        layers.append(("linear", 4096, 14336, 1))
    sparsities = (0.7, 0.9) if quick else (0.5, 0.7, 0.8, 0.9, 0.95)
    patterns = ("block:4x1", "block:1x4", "unstructured") if quick else ("block:4x1", "block:8x1", "block:1x4", "unstructured")
    weight_sparse = [Case(op, i, o, r, p, s) for op, i, o, r in layers for p in patterns for s in sparsities
                     if not (quick and p == "unstructured" and s != 0.9)]
    weight_sparse += [Case(op, i, o, r, "nm:2:4", 0.5) for op, i, o, r in layers]  # 2:4 is 50% by construction
    mlp_sparsities = (0.5, 0.9) if quick else (0.5, 0.7, 0.9)
    return weight_sparse + [Case("mlp", 1024, 4096, 1, "activation", s) for s in mlp_sparsities]


def _mlp(case: Case) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(case.inp, case.out), nn.ReLU(), nn.Linear(case.out, case.inp)).eval()


def _activation_sparse(mlp: nn.Module, case: Case, x: torch.Tensor) -> nn.Module:
    """The same MLP with TEAL-style magnitude thresholds on the inputs of both linears, set on
    this input so that `case.sparsity` of each layer's input channels are skipped."""
    from edgesparse.runtime_kernels.modules import ActSparseLinear

    up, down = mlp[0], mlp[2]
    t_in = torch.quantile(x.abs().flatten(), case.sparsity).item()
    sparse_up = ActSparseLinear(up, t_in)
    with torch.no_grad():
        hidden = torch.relu(sparse_up(x))
    t_hidden = torch.quantile(hidden.abs().flatten(), case.sparsity).item()
    return nn.Sequential(sparse_up, nn.ReLU(), ActSparseLinear(down, t_hidden)).eval()


def _layer(case: Case) -> nn.Module:
    if case.op == "mlp":
        return _mlp(case)
    torch.manual_seed(0)
    layer = nn.Linear(case.inp, case.out) if case.op == "linear" else nn.Conv2d(case.inp, case.out, 1)
    with torch.no_grad():
        layer.weight.mul_(make_mask(layer.weight, Pattern.parse(case.pattern), case.sparsity))
    return layer.eval()


def _sparse(layer: nn.Module, case: Case, x: torch.Tensor) -> nn.Module:
    from edgesparse.runtime_kernels.modules import sparse_module

    if case.op == "mlp":
        return _activation_sparse(layer, case, x)
    return sparse_module(case.op, Pattern.parse(case.pattern), layer.weight.reshape(case.out, case.inp), layer.bias)


def _sparse_int8(layer: nn.Module, case: Case) -> nn.Module | None:
    """The int8 sparse linear (BCSR Rx1 blocks only), or None."""
    from edgesparse.runtime_kernels.modules import QSparseLinear, block_shape_for

    if case.op != "linear":
        return None
    shape = block_shape_for(Pattern.parse(case.pattern))
    if shape is None or shape[1] != 1:
        return None
    return QSparseLinear(layer.weight, layer.bias, shape[0])


def _pte_runner(module: nn.Module, x: torch.Tensor, folder: Path, name: str, quant: str = "none"):
    from edgesparse.converters.executorch import load_method, lower
    from edgesparse.quantize import quantize
    from edgesparse.recipe import QuantConfig

    if quant != "none":
        module, _ = quantize(module, QuantConfig(mode=quant), (x,), calib=[(x,)])
    path = folder / f"{name}.pte"
    path.write_bytes(lower(module, (x,)).buffer)
    method = load_method(path)
    inputs = [x]
    return lambda: method.execute(inputs), path.stat().st_size


def _ort_runner(layer: nn.Module, case: Case, x: torch.Tensor, threads: int):
    """A small ONNX graph (MatMul+Add, MatMul+Add+Relu+MatMul+Add, or Conv) holding the dense weights."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    def matmul_add(linear: nn.Linear, src: str, dst: str, tag: str):
        inits.extend([numpy_helper.from_array(np.ascontiguousarray(linear.weight.detach().numpy().T), f"w{tag}"),
                      numpy_helper.from_array(linear.bias.detach().numpy(), f"b{tag}")])
        nodes.extend([helper.make_node("MatMul", [src, f"w{tag}"], [f"t{tag}"]), helper.make_node("Add", [f"t{tag}", f"b{tag}"], [dst])])

    inits, nodes = [], []
    if case.op == "mlp":
        matmul_add(layer[0], "x", "h", "0")
        nodes.append(helper.make_node("Relu", ["h"], ["r"]))
        matmul_add(layer[2], "r", "y", "1")
        out_shape = [case.rows, case.inp]
    elif case.op == "linear":
        matmul_add(layer, "x", "y", "")
        out_shape = [case.rows, case.out]
    else:
        w = layer.weight.detach().numpy()
        b = layer.bias.detach().numpy()
        inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
        nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"])]
        out_shape = [1, case.out, case.rows, case.rows]
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy()}
    return lambda: session.run(None, feed)


def _median_ms(fn, runs: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def bench_kernels(quick: bool = False, threads: int = 1, rounds: int | None = None, runs: int | None = None) -> list[dict]:
    from executorch.extension.pybindings import portable_lib

    from edgesparse.runtime_kernels import load_executorch_ops
    from edgesparse.runtime_kernels.capi import isa

    load_executorch_ops()
    torch.set_num_threads(threads)
    with native_stderr():
        portable_lib._unsafe_reset_threadpool(threads)
    rounds = rounds or (3 if quick else 5)
    runs = runs or (30 if quick else 100)
    rows = []
    all_cases = cases(quick)
    with tempfile.TemporaryDirectory() as tmp, _progress.bar("benchmarking kernels", len(all_cases)) as advance:
        folder = Path(tmp)
        baselines: dict[tuple, dict] = {}
        for index, case in enumerate(all_cases):
            layer, x = _layer(case), case.example()
            shape = (case.op, case.inp, case.out, case.rows)
            if shape not in baselines:  # dense kernels' speed does not depend on the values: one build per shape
                baselines[shape] = {
                    "xnnpack-fp32": _pte_runner(layer, x, folder, f"dense{index}")[0],
                    "xnnpack-int8": _pte_runner(layer, x, folder, f"int8_{index}", "int8" if case.op == "conv1x1" else "int8-dynamic")[0],
                    "onnxruntime-fp32": _ort_runner(layer, case, x, threads),
                }
            variants = {"ours": _pte_runner(_sparse(layer, case, x), x, folder, f"sparse{index}")[0], **baselines[shape]}
            if (int8 := _sparse_int8(layer, case)) is not None:  # int8 sparse against int8 dense
                variants["ours-int8"] = _pte_runner(int8, x, folder, f"qsparse{index}")[0]
            per_round = {name: [] for name in variants}
            for _ in range(rounds):
                for name, fn in variants.items():
                    per_round[name].append(_median_ms(fn, runs, warmup=max(3, runs // 10)))
            pairs = [("ours", "float32", b) for b in ("xnnpack-fp32", "xnnpack-int8", "onnxruntime-fp32")]
            if "ours-int8" in variants:
                pairs.append(("ours-int8", "int8", "xnnpack-int8"))
            for mine, dtype, baseline in pairs:
                ours = statistics.median(per_round[mine])
                base = statistics.median(per_round[baseline])
                rows.append({"op": case.op, "pattern": case.pattern, "dtype": dtype, "sparsity": case.sparsity,
                             "shape": case.shape, "in": case.inp, "out": case.out,
                             "rows": case.rows * case.rows if case.op == "conv1x1" else case.rows, "threads": threads, "ours_ms": ours, "baseline": baseline,
                             "baseline_ms": base, "speedup": base / ours, "isa": isa(), "rounds": rounds, "runs": runs})
            advance(info=case.shape)
    return rows


# A sparse op must beat dense XNNPACK fp32 by this much to be chosen (timing noise margin).
CROSSOVER_MARGIN = 1.1


def crossover(rows: list[dict]) -> list[dict]:
    """Per (op, pattern, shape, dtype): the lowest measured sparsity from which ours beats dense
    XNNPACK of the same dtype (fp32 against fp32, int8 against int8) by CROSSOVER_MARGIN at that
    sparsity and every higher one (None: never)."""
    table: dict[tuple, list] = {}
    for row in rows:
        same_dtype = row["baseline"] == {"float32": "xnnpack-fp32", "int8": "xnnpack-int8"}[row["dtype"]]
        if same_dtype and row["op"] != "mlp":  # weight-sparse
            table.setdefault((row["op"], row["pattern"], row["dtype"], row["shape"], row["in"], row["out"], row["rows"]), []).append(row)
    out = []
    for (op, pattern, dtype, shape, inp, outp, act_rows), measured in sorted(table.items()):
        measured.sort(key=lambda r: r["sparsity"])
        min_sparsity = None
        for i, row in enumerate(measured):
            if all(r["speedup"] >= CROSSOVER_MARGIN for r in measured[i:]):
                min_sparsity = row["sparsity"]
                break
        out.append({"op": op, "pattern": pattern, **({"dtype": dtype} if dtype != "float32" else {}), "shape": shape, "in": inp, "out": outp, "rows": act_rows,
                    "min_sparsity": min_sparsity, "speedups": {f"{r['sparsity']:.2f}": round(r["speedup"], 3) for r in measured}})
    return out


def _speedup_table(rows: list[dict], title: str) -> list[str]:
    """One line per (op, shape, pattern), one column per sparsity: the speedups in `rows`."""
    sparsities = sorted({r["sparsity"] for r in rows})
    by_key = {(r["op"], r["shape"], r["pattern"], r["sparsity"]): r for r in rows}
    lines = [f"| {title} | shape | pattern | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |",
             "|---|---|---|" + "---|" * len(sparsities)]
    for op, shape, pattern in dict.fromkeys((r["op"], r["shape"], r["pattern"]) for r in rows):
        cells = [f"{by_key[(op, shape, pattern, s)]['speedup']:.2f}x" if (op, shape, pattern, s) in by_key else "" for s in sparsities]
        lines.append(f"| {op} | {shape} | {pattern} | " + " | ".join(cells) + " |")
    return lines


def to_markdown(rows: list[dict]) -> str:
    """Speedup of our fp32 ops vs XNNPACK fp32 and of our int8 ops vs XNNPACK int8 across
    sparsities, then every baseline's time at 90%."""
    fp32 = [r for r in rows if r["dtype"] == "float32"]
    lines = _speedup_table([r for r in fp32 if r["baseline"] == "xnnpack-fp32"], "fp32 ours vs XNNPACK fp32")
    int8 = [r for r in rows if r["dtype"] == "int8"]
    if int8:
        lines += [""] + _speedup_table(int8, "int8 ours vs XNNPACK int8")
    at90 = [r for r in fp32 if abs(r["sparsity"] - 0.9) < 1e-9]
    if at90:
        lines += ["", "| op (90%) | shape | pattern | ours fp32 ms | XNNPACK fp32 ms | XNNPACK int8 ms | ORT fp32 ms | ours int8 ms |",
                  "|---|---|---|---|---|---|---|---|"]
        for op, shape, pattern in dict.fromkeys((r["op"], r["shape"], r["pattern"]) for r in at90):
            group = {r["baseline"]: r for r in at90 if (r["op"], r["shape"], r["pattern"]) == (op, shape, pattern)}
            q = next((r for r in int8 if (r["op"], r["shape"], r["pattern"]) == (op, shape, pattern) and abs(r["sparsity"] - 0.9) < 1e-9), None)
            cells = [f"{group[b]['baseline_ms']:.3f} ({group[b]['speedup']:.2f}x)" for b in ("xnnpack-fp32", "xnnpack-int8", "onnxruntime-fp32")]
            cells.append(f"{q['ours_ms']:.3f}" if q else "")
            lines.append(f"| {op} | {shape} | {pattern} | {group['xnnpack-fp32']['ours_ms']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# The bare runtime loop, in a fresh process like the profiler's child: load, warm up, time
# execute() calls, print the median in ms. Nothing else.
_BARE_LOOP = """
import statistics, sys, time, torch
from executorch.extension.pybindings import portable_lib
from executorch.runtime import Runtime
from edgesparse.runtime_kernels import load_executorch_ops
path, runs, warmup, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
load_executorch_ops()
torch.set_num_threads(threads)
portable_lib._unsafe_reset_threadpool(threads)
program = Runtime.get().load_program(path)
method = program.load_method("forward")
meta = program.metadata("forward")
inputs = [torch.randn(tuple(meta.input_tensor_meta(i).sizes())) for i in range(meta.num_inputs())]
for _ in range(warmup + 1):
    method.execute(inputs)
times = []
for _ in range(runs):
    t0 = time.perf_counter()
    method.execute(inputs)
    times.append(time.perf_counter() - t0)
print(statistics.median(times) * 1e3)
"""


def bench_runner(artifact: Path, rounds: int = 5, runs: int = 500, warmup: int = 20, threads: int = 1) -> dict:
    """The profiler's own overhead: p50 through `edgesparse profile` (its child process, its loop,
    its JSON) against the bare runtime loop in an equally fresh process, interleaved rounds,
    medians of the per-round p50s. (float32 inputs: the demo models' kind.)"""
    import subprocess
    import sys

    from edgesparse.devices import profile

    profiled, bare = [], []
    for _ in range(rounds):
        profiled.append(profile(artifact, "local", runs=runs, warmup=warmup, threads=threads)["p50_ms"])
        proc = subprocess.run([sys.executable, "-c", _BARE_LOOP, str(artifact), str(runs), str(warmup), str(threads)],
                              capture_output=True, text=True, timeout=600, check=True)
        bare.append(float(proc.stdout.strip().splitlines()[-1]))
    ours, base = statistics.median(profiled), statistics.median(bare)
    return {"artifact": str(artifact), "threads": threads, "rounds": rounds, "runs": runs, "profile_p50_ms": ours,
            "bare_loop_p50_ms": base, "overhead_pct": 100 * (ours - base) / base,
            "per_round": {"profile": profiled, "bare": bare}}
