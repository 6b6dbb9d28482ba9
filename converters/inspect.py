"""`edgesparse inspect`: what is inside a .pte, .onnx or .tflite, layer by layer, and whether each
pruned layer will really run sparse on the target runtime, and if not, why and how to fix it.

Everything is read from the artifact itself (weights are decoded, sparsity and pattern are measured
from their zeros); nothing comes from the manifest. The rules per runtime:
- ExecuTorch: a layer runs sparse only as an `edgesparse::` op; XNNPACK's delegate is dense.
- ONNX Runtime: only `ai.edgesparse` nodes run sparse; sparse initializers are densified at load.
- TFLite: XNNPACK's sparse (NCHW SpMM) path, whose cluster rules come from XNNPACK's and the
  TFLite delegate's sources (../shared/notes/onnx-and-tflite.md section 6).
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from edgesparse.errors import EdgesparseError, first_line
from edgesparse.patterns import detect_pattern

TARGETS = ("arm64", "x86_64")
PRUNED = 0.05  # a weight with at least this many zeros counts as pruned
XNNPACK_MIN_ZEROS = 2 / 3
KERNELS_FIX = "export with the edgesparse kernels built (`make kernels`) and a kernel pattern, e.g. --pattern block:4x1"
INT8_FIX = "export doesn't swap int8 layers for sparse kernels yet: use --quant none to run the pruned layers sparse"


@dataclass
class Layer:
    name: str
    op: str
    shape: list[int]
    dtype: str
    stored_bytes: int
    sparsity: float
    pattern: str | None
    sparse: bool  # runs on a sparse kernel on the target
    why: str  # what runs it, or why it runs dense
    fix: str = ""


def host_target() -> str:
    return "arm64" if platform.machine() in ("aarch64", "arm64") else "x86_64"


def sniff(data: bytes) -> str | None:
    if data[4:8] == b"TFL3":
        return "tflite"
    if data[4:6] == b"ET" and data[6:8].isdigit():
        return "pte"
    if data[:1] == b"\x08":  # protobuf field 1 (ir_version), varint: how every ONNX model starts
        return "onnx"
    return None


FORMAT_NAMES = {"pte": "an ExecuTorch program", "onnx": "an ONNX model", "tflite": "a TFLite model"}


def read(path: str | Path) -> tuple[str, bytes]:
    """(format, bytes), after checking the file exists and its content matches its extension."""
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in FORMAT_NAMES:
        raise EdgesparseError(f"{path.name}: expected a .pte, .onnx or .tflite file")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise EdgesparseError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise EdgesparseError(f"{path} is a directory") from None
    found = sniff(data)
    if found != fmt:
        looks = f"it looks like {FORMAT_NAMES[found]}" if found else "unknown content" if data else "empty file"
        raise EdgesparseError(f"{path.name} is not {FORMAT_NAMES[fmt]} ({looks})")
    return fmt, data


def inspect_artifact(path: str | Path, target: str | None = None) -> dict:
    target = target or host_target()
    if target not in TARGETS:
        raise EdgesparseError(f"unknown target {target!r} (use {' or '.join(TARGETS)})")
    fmt, data = read(path)
    reader = {"pte": _pte_layers, "onnx": _onnx_layers, "tflite": _tflite_layers}[fmt]
    try:
        layers, runtime, blocker = reader(data, target)
    except EdgesparseError as exc:
        raise EdgesparseError(f"{Path(path).name}: {exc}") from None
    except Exception as exc:  # a well-formed container with inconsistent contents
        raise EdgesparseError(f"{Path(path).name} is corrupt: {type(exc).__name__}: {first_line(exc)}") from None
    report = {"artifact": str(path), "format": fmt, "target": target, "runtime": runtime,
              "layers": [asdict(layer) for layer in layers]}
    report.update(_verdict(layers, target, runtime, blocker))
    return report


def _verdict(layers: list[Layer], target: str, runtime: str, blocker: str) -> dict:
    # pruned weights, or activation-sparse layers (dense weights, skipped at run time)
    pruned = [layer for layer in layers if layer.sparsity >= PRUNED or layer.pattern == "activation"]
    fast = [layer for layer in pruned if layer.sparse]
    fixes = list(dict.fromkeys(layer.fix for layer in pruned if not layer.sparse and layer.fix))
    kind = "sparse" if any(layer.pattern == "activation" for layer in pruned) else "pruned"
    if not pruned:
        verdict = f"no pruned layers: nothing can run sparse ({runtime}, {target})"
    elif len(fast) == len(pruned):
        verdict = f"yes: all {len(pruned)} {kind} layers run sparse on {target} ({runtime})"
    else:
        verdict = f"{'partly' if fast else 'no'}: {len(fast)} of {len(pruned)} {kind} layers run sparse on {target} ({runtime})"
        if blocker:
            verdict += f"; {blocker}"
    return {"verdict": verdict, "sparse_layers": len(fast), "pruned_layers": len(pruned), "fix": fixes[0] if fixes else ""}


def _measure(weight: np.ndarray) -> tuple[float, str | None]:
    matrix = torch.from_numpy(np.ascontiguousarray(weight).reshape(weight.shape[0], -1).copy())
    sparsity = float((matrix == 0).float().mean()) if matrix.numel() else 0.0
    return sparsity, detect_pattern(matrix, PRUNED)


# ---- ExecuTorch ------------------------------------------------------------------------------

def _pte_layers(data: bytes, target: str):
    from executorch.exir._serialize._program import deserialize_pte_binary

    try:
        pte = deserialize_pte_binary(data)
        plan = pte.program.execution_plan[0]
    except Exception as exc:
        raise EdgesparseError(f"corrupt or truncated ExecuTorch program ({type(exc).__name__}: {first_line(exc)})") from None
    named = pte.named_data
    layers = []
    for chain in plan.chains:
        for instruction in chain.instructions:
            call = instruction.instr_args
            if hasattr(call, "op_index"):
                operator = plan.operators[call.op_index].name
                if operator.startswith("edgesparse::"):
                    layers.append(_edgesparse_op(operator, [plan.values[i].val for i in call.args], pte.program.constant_buffer, len(layers)))
            elif hasattr(call, "delegate_index"):
                delegate = plan.delegates[call.delegate_index]
                if "xnnpack" in delegate.id.lower():
                    payload = pte.program.backend_delegate_data[delegate.processed.index].data
                    layers += _xnnpack_layers(payload, named, len(layers))
    return layers, "ExecuTorch", ""


def _tensor(value, buffers) -> torch.Tensor:
    from executorch.exir.schema import ScalarType

    kinds = {ScalarType.FLOAT: np.float32, ScalarType.INT: np.int32, ScalarType.LONG: np.int64,
             ScalarType.CHAR: np.int8, ScalarType.BYTE: np.uint8}
    storage = bytes(buffers[value.data_buffer_idx].storage)
    count = int(np.prod(value.sizes))
    return torch.from_numpy(np.frombuffer(storage, dtype=kinds[value.scalar_type], count=count).copy()).reshape(list(value.sizes))


def _edgesparse_op(operator: str, args: list, buffers, index: int) -> Layer:
    from edgesparse.runtime_kernels.formats import ungroup_qs8, unpack_bcsr, unpack_nm

    op = operator.split("::")[1]
    ints = [a.int_val for a in args if hasattr(a, "int_val")]
    tensors = [a for a in args if hasattr(a, "sizes")]
    stored = sum(len(buffers[t.data_buffer_idx].storage) for t in tensors[1:] if t.data_buffer_idx)
    get = lambda i: _tensor(tensors[i], buffers)  # noqa: E731  (tensors[0] is the input x)
    dtype = "float32"
    if op.startswith("bcsr"):
        rows, cols, inp, out = ints[:4]
        weight, pattern = unpack_bcsr(get(1), get(2), get(3), rows, inp, out, cols), f"block:{rows}x{cols}"
    elif op.startswith("nm"):
        n, m, inp, out = ints[:4]
        weight, pattern = unpack_nm(get(1), get(2), n, m, inp, out), f"nm:{n}:{m}"
    elif op == "dwconv3x3":  # dense depthwise conv on our kernel, keeping a chain of sparse layers off XNNPACK
        weight = get(1)
        return Layer(f"{op}#{index}", operator, list(weight.shape), dtype, stored, float((weight == 0).float().mean()),
                     None, False, f"{operator}: dense depthwise kernel (NCHW, between sparse layers: no XNNPACK partition)")
    elif op in ("qs8_bcsr_linear", "qs8_bcsr_conv1x1"):
        rows, inp, out = ints[:3]
        weight = unpack_bcsr(ungroup_qs8(get(1), rows).float(), get(2), get(3), rows, inp, out)
        pattern, dtype = f"block:{rows}x1", "int8"
    else:  # activation-sparse ops: dense weights, sparse activations
        weight = get(1).t()
        return Layer(f"{op}#{index}", operator, list(weight.shape), dtype, stored, 0.0, "activation", True,
                     f"{operator}: activation-sparse kernel (skips the weights of activations below its threshold)")
    sparsity = float((weight == 0).float().mean())
    return Layer(f"{op}#{index}", operator, list(weight.shape), dtype, stored, sparsity, pattern, True, f"{operator} (edgesparse kernel)")


_XNN_WEIGHTED = {"XNNConv2d": "conv2d", "XNNDepthwiseConv2d": "depthwise_conv2d", "XNNFullyConnected": "fully_connected"}
_XNN_TYPES = {"xnn_datatype_fp32": (np.float32, "float32"), "xnn_datatype_fp16": (np.float16, "float16"),
              "xnn_datatype_qcint8": (np.int8, "int8"), "xnn_datatype_qint8": (np.int8, "int8"),
              "xnn_datatype_qcint4": (np.uint8, "int4"), "xnn_datatype_qbint4": (np.uint8, "int4")}


def _xnnpack_layers(payload: bytes, named, first: int) -> list[Layer]:
    graph, constants = _xnnpack_graph(payload)
    values = {}
    for value in graph.get("xvalues", []):
        body = value["xvalue_union"]
        tensor = body.get("tensor_value", body)
        values[tensor["id_out"]] = tensor
    layers = []
    for node in graph.get("xnodes", []):
        kind = node["xnode_union_type"]
        if kind not in _XNN_WEIGHTED:
            continue
        tensor = values[node["xnode_union"]["filter_id"]]
        kind_np, dtype = _XNN_TYPES.get(tensor["datatype"], (None, tensor["datatype"].replace("xnn_datatype_", "")))
        raw = _xnnpack_constant(graph["constant_data"][tensor["constant_buffer_idx"]], constants, named)
        dims = [int(d) for d in tensor["dims"]]
        sparsity, pattern = 0.0, None
        if kind_np is not None and dtype != "int4" and raw is not None and len(raw) >= int(np.prod(dims)) * np.dtype(kind_np).itemsize:
            weight = np.frombuffer(raw, dtype=kind_np, count=int(np.prod(dims))).reshape(dims)
            if kind == "XNNDepthwiseConv2d":  # [1, kh, kw, channels]: one filter per channel
                weight = weight.reshape(-1, dims[-1]).T
            sparsity, pattern = _measure(weight)
        why = "dense: ExecuTorch's XNNPACK delegate has no sparse kernels"
        fix = INT8_FIX if dtype != "float32" else KERNELS_FIX
        layers.append(Layer(f"xnnpack#{first + len(layers)}", _XNN_WEIGHTED[kind], dims, dtype, len(raw or b""), sparsity,
                            pattern, False, why, fix if sparsity >= PRUNED else ""))
    return layers


def _xnnpack_graph(payload: bytes) -> tuple[dict, bytes]:
    """The delegate's flatbuffer as a dict (decoded with ExecuTorch's flatc and XNNPACK's schema)
    and its inline constant data."""
    import json
    import re
    import subprocess
    import tempfile

    import executorch

    if len(payload) < 30 or payload[4:8] != b"XH00":
        raise EdgesparseError("XNNPACK delegate payload without its XH00 header")
    start, size = int.from_bytes(payload[10:14], "little"), int.from_bytes(payload[14:18], "little")
    cstart, csize = int.from_bytes(payload[18:22], "little"), int.from_bytes(payload[22:30], "little")
    if start + size > len(payload) or cstart + csize > len(payload):
        raise EdgesparseError("truncated XNNPACK delegate payload")
    root = Path(list(executorch.__path__)[0])
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "graph.bin").write_bytes(payload[start : start + size])
        done = subprocess.run([str(root / "data/bin/flatc"), "--json", "--strict-json", "--raw-binary", "--defaults-json",
                               "-o", tmp, str(root / "backends/xnnpack/serialization/schema.fbs"), "--", "graph.bin"],
                              cwd=tmp, capture_output=True, text=True, timeout=60)
        out = Path(tmp) / "graph.json"
        if done.returncode or not out.is_file():
            raise EdgesparseError(f"corrupt XNNPACK delegate graph ({first_line(done.stderr or 'flatc failed')})")
        text = re.sub(r"(?<=[:\[,\s])(-?)inf\b", r"\1Infinity", out.read_text()).replace(": nan", ": NaN")
    return json.loads(text), payload[cstart : cstart + csize]


def _xnnpack_constant(entry: dict, inline: bytes, named) -> bytes | None:
    key = entry.get("named_key")
    if key:
        if named is None or key not in named.pte_data:
            return None
        return bytes(named.buffers[named.pte_data[key].buffer_index])
    offset, size = int(entry.get("offset", 0)), int(entry.get("size", 0))
    return inline[offset : offset + size] if size else None


# ---- ONNX ------------------------------------------------------------------------------------

_ONNX_WEIGHTED = {"Conv": "conv", "Gemm": "gemm", "MatMul": "matmul", "ConvInteger": "conv", "MatMulInteger": "matmul"}


def _onnx_layers(data: bytes, target: str):
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load_from_string(data)
        graph = model.graph
    except Exception as exc:
        raise EdgesparseError(f"corrupt or truncated ONNX model ({type(exc).__name__}: {first_line(exc)})") from None
    arrays, stored = {}, {}
    for init in graph.initializer:
        arrays[init.name], stored[init.name] = numpy_helper.to_array(init), init.ByteSize()
    for sparse in graph.sparse_initializer:
        name = sparse.values.name
        values, indices = numpy_helper.to_array(sparse.values), numpy_helper.to_array(sparse.indices)
        dense = np.zeros(int(np.prod(sparse.dims)), dtype=values.dtype)
        if indices.ndim == 2:
            indices = np.ravel_multi_index(indices.T, tuple(sparse.dims))
        dense[indices] = values
        arrays[name], stored[name] = dense.reshape(list(sparse.dims)), sparse.ByteSize()
    producers = {out: node for node in graph.node for out in node.output}
    layers = []
    for index, node in enumerate(graph.node):
        name = node.name or f"{node.op_type}#{index}"
        if node.domain == "ai.edgesparse":
            layers.append(_onnx_edgesparse(node, name, arrays, stored))
            continue
        if node.op_type not in _ONNX_WEIGHTED or len(node.input) < 2:
            continue
        source = node.input[1]
        if source in producers and producers[source].op_type == "DequantizeLinear":  # QDQ int8 weight
            source = producers[source].input[0]
        if source not in arrays:
            continue
        weight = arrays[source]
        if node.op_type in ("MatMul", "MatMulInteger") or (node.op_type == "Gemm" and not _attr(node, "transB", 0)):
            weight = weight.T  # [in, out] -> [out, in]
        sparsity, pattern = _measure(weight)
        why = ("dense: ONNX Runtime has no sparse weight kernels (it densifies sparse initializers at load)"
               if sparsity >= PRUNED else "dense")
        fix = KERNELS_FIX if weight.dtype == np.float32 else INT8_FIX
        layers.append(Layer(name, node.op_type, list(weight.shape), str(weight.dtype), stored[source], sparsity, pattern,
                            False, why, fix if sparsity >= PRUNED else ""))
    return layers, "ONNX Runtime", ""


def _attr(node, name: str, default):
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _onnx_edgesparse(node, name: str, arrays: dict, stored: dict) -> Layer:
    from edgesparse.runtime_kernels.formats import unpack_bcsr, unpack_nm

    tensor = lambda i: torch.from_numpy(arrays[node.input[i]].copy())  # noqa: E731
    size = sum(stored.get(i, 0) for i in node.input[1:])
    op = f"ai.edgesparse.{node.op_type}"
    inp, out = _attr(node, "in_features", 0), _attr(node, "out_features", 0)
    if node.op_type.startswith("Bcsr"):
        rows, cols = _attr(node, "block_rows", 1), _attr(node, "block_cols", 1)
        weight, pattern = unpack_bcsr(tensor(1), tensor(2), tensor(3), rows, inp, out, cols), f"block:{rows}x{cols}"
    elif node.op_type.startswith("Nm"):
        n, m = _attr(node, "n", 2), _attr(node, "m", 4)
        weight, pattern = unpack_nm(tensor(1), tensor(2), n, m, inp, out), f"nm:{n}:{m}"
    else:
        weight = tensor(1).t()
        return Layer(name, op, list(weight.shape), "float32", size, 0.0, "activation", True,
                     f"{op}: activation-sparse kernel (skips the weights of activations below its threshold)")
    sparsity = float((weight == 0).float().mean())
    return Layer(name, op, list(weight.shape), "float32", size, sparsity, pattern, True,
                 f"{op} (edgesparse ONNX Runtime op library)")


# ---- TFLite ----------------------------------------------------------------------------------

_UNARY = {"RELU", "RELU6", "RELU_N1_TO_1", "RELU_0_TO_1", "HARD_SWISH", "LOGISTIC", "TANH", "ABS", "NEG", "SQUARE",
          "SQRT", "RSQRT", "LEAKY_RELU", "ELU", "PRELU", "FLOOR", "CEIL", "ROUND", "EXP", "GELU"}
_CLUSTER_OK = _UNARY | {"ADD", "MUL", "SUB", "DIV", "DENSIFY", "PAD", "FULLY_CONNECTED"}
_CLUSTER_EXITS = {"MEAN", "SUM", "DEPTH_TO_SPACE", "AVERAGE_POOL_2D"}
_TFL_WEIGHTED = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"}


def _tflite_layers(data: bytes, target: str):
    from edgesparse.converters import tflite as tfl

    model = tfl.load(data)
    graph = model.subgraphs[0]
    ops = list(graph.operators or [])
    names = [tfl.op_name(model, op) for op in ops]
    producers = {int(out): i for i, op in enumerate(ops) for out in op.outputs}
    layers: list[tuple[int, Layer]] = []
    for i, (op, kind) in enumerate(zip(ops, names)):
        if kind not in _TFL_WEIGHTED or len(op.inputs) < 2:
            continue
        index = int(op.inputs[1])
        weight = tfl.constant(model, graph, index)
        if weight is None:
            continue
        tensor = graph.tensors[index]
        matrix = weight.reshape(-1, weight.shape[-1]).T if kind == "DEPTHWISE_CONV_2D" else weight
        sparsity, pattern = _measure(matrix)
        layers.append((i, Layer(_tflite_name(tensor.name) or _tflite_name(graph.tensors[int(op.outputs[0])].name), kind, [int(d) for d in tensor.shape],
                                tfl.tensor_type_name(tensor), tfl.stored_bytes(model, index, graph), sparsity, pattern,
                                False, "")))
    blocker, fix, cluster, per_op = _xnnpack_cluster(model, graph, ops, names, producers, layers, target)
    for i, layer in layers:
        if i in per_op:
            layer.why, layer.fix = per_op[i]
        elif i in cluster and layer.op == "CONV_2D" and _is_1x1(graph, ops[i]) and not blocker:
            layer.sparse, layer.why = True, "XNNPACK sparse (NCHW SpMM) path"
        elif i in cluster and not blocker:
            layer.why = "dense NCHW kernel inside XNNPACK's sparse cluster (only 1x1 convs run SpMM)"
        elif blocker:
            layer.why, layer.fix = f"dense: {blocker}", fix
        else:
            layer.why = "dense: outside XNNPACK's sparse cluster (it ends at the global pool)"
    layers += [(i, _tflite_edgesparse(model, graph, op, i)) for i, op in enumerate(ops)
               if (tfl.custom_op_name(model, op) or "") in tfl.CUSTOM_OPS]
    layers.sort(key=lambda item: item[0])
    rows = [layer for _, layer in layers]
    for layer in rows:
        if layer.sparsity < PRUNED and not layer.sparse:
            layer.fix = ""
    ours = any(layer.op in tfl.CUSTOM_OPS for layer in rows)
    return rows, "TFLite + XNNPACK" + (" + edgesparse ops" if ours else ""), blocker


def _tflite_edgesparse(model, graph, op, index: int) -> Layer:
    """An Edgesparse* custom op: our kernel runs it on every target (x86_64 and arm64 builds of the
    op library), whatever XNNPACK's sparse path would do, once the library is registered."""
    from edgesparse.converters import tflite as tfl
    from edgesparse.runtime_kernels.formats import unpack_bcsr, unpack_nm

    kind = tfl.custom_op_name(model, op)
    inputs = [int(i) for i in op.inputs]
    name = _tflite_name((graph.tensors[inputs[1]].name or b"").removesuffix(b"/values")) or f"{kind}#{index}"
    stored = sum(tfl.stored_bytes(model, i, graph) for i in inputs[1:] if i >= 0)
    options = tfl.parse_custom_options(op.customOptions)
    arrays = [tfl.constant(model, graph, i) for i in inputs[1:4 if "Bcsr" in kind else 3]]
    if options is None or any(a is None for a in arrays):
        return Layer(name, kind, [], "float32", stored, 0.0, None, False,
                     "broken: its custom options or packed weights are not edgesparse's (the op fails at prepare)",
                     "re-export with `edgesparse export --format tflite --tflite-ops edgesparse`")
    out, inp, a, b = options["out_features"], options["in_features"], options["a"], options["b"]
    tensors = [torch.from_numpy(np.ascontiguousarray(array).reshape(-1).copy()) for array in arrays]
    if "Bcsr" in kind:
        weight, pattern = unpack_bcsr(*tensors, a, inp, out, b), f"block:{a}x{b}"
    else:
        weight, pattern = unpack_nm(*tensors, a, b, inp, out), f"nm:{a}:{b}"
    sparsity = float((weight == 0).float().mean())
    return Layer(name, kind, [out, inp], "float32", stored, sparsity, pattern, True,
                 f"{kind}: edgesparse's sparse kernel (TFLite op library, x86_64 and arm64; the interpreter must "
                 "register it: edgesparse.converters.tflite.interpreter does)")


def _tflite_name(raw: bytes | None) -> str:
    """litert-torch names tensors by module path ('Pkg.Model/torch.nn...Sequential_blocks/...Conv2d_3');
    turn that back into the torch name (blocks.0.3)."""
    text = (raw or b"").decode(errors="replace")
    parts = [p for p in text.split(";") if p]
    best = next((p for p in parts if any(k in p.rsplit("/", 1)[-1] for k in ("Conv", "Linear"))), None)
    if best is None:
        return text if "/" not in text else ""
    return ".".join(piece.rsplit(".", 1)[-1].split("_", 1)[-1] for piece in best.split("/")[1:])


def _is_1x1(graph, op) -> bool:
    shape = [int(d) for d in graph.tensors[int(op.inputs[1])].shape]
    return len(shape) == 4 and shape[1:3] == [1, 1]


def _padding(model, graph, ops, names, producers, i) -> tuple[list[int] | None, bool]:
    """(the zero padding [top, bottom, left, right] a PAD feeding the conv at i adds (None if it
    pads more than H and W, or with non-zeros), whether the conv itself uses TensorFlow SAME)."""
    from edgesparse.converters import tflite as tfl

    op = ops[i]
    same = op.builtinOptions.padding == tfl._schema().Padding.SAME
    source = producers.get(int(op.inputs[0]))
    if source is None or names[source] != "PAD":
        return [0, 0, 0, 0], same
    values = tfl.constant(model, graph, int(ops[source].inputs[1]))
    if values is None or values.shape != (4, 2) or values[0].any() or values[3].any():
        return None, same
    return [int(values[1][0]), int(values[1][1]), int(values[2][0]), int(values[2][1])], same


def _xnnpack_cluster(model, graph, ops, names, producers, layers, target):
    """XNNPACK's sparse-inference rules; returns (blocker, fix, ops in the cluster, per-op (why, fix))."""
    from edgesparse.converters import tflite as tfl

    per_op: dict[int, tuple[str, str]] = {}
    weighted = dict(layers)
    if any(layer.dtype not in ("float32", "float16") for layer in weighted.values()):
        return ("int8/quantized weights: XNNPACK's sparse path is fp32/fp16 only", "export with --quant none for sparse TFLite",
                set(), per_op)
    stem = next((i for i, kind in enumerate(names) if kind == "CONV_2D" and not _is_1x1(graph, ops[i])), None)
    stem_fix = "stem conv must be 3x3 stride 2 with 3 input channels and padding 1"
    if stem is None:
        return "no 3x3 stride-2 stem conv (XNNPACK's sparse cluster starts at one)", stem_fix, set(), per_op
    shape = [int(d) for d in graph.tensors[int(ops[stem].inputs[1])].shape]
    options = ops[stem].builtinOptions
    pads, same = _padding(model, graph, ops, names, producers, stem)
    if shape[1:] != [3, 3, 3] or (options.strideH, options.strideW) != (2, 2) or same or pads != [1, 1, 1, 1]:
        per_op[stem] = ("dense: not a valid stem for XNNPACK's sparse cluster", stem_fix)
        return (f"the first conv is {shape[1]}x{shape[2]} stride {options.strideH} with {shape[3]} input channels"
                f"{' and SAME padding' if same else ''} (XNNPACK's sparse cluster needs a 3x3 stride-2 stem with 3 input channels, padding 1)",
                stem_fix, set(), per_op)
    cluster, blocker, fix = {stem}, "", ""
    end = next((i for i in range(stem + 1, len(ops)) if names[i] in _CLUSTER_EXITS), None)
    if end is None:
        return "no global average pool / mean after the stem (the sparse cluster has no exit)", "end the conv stack with a global average pool", set(), per_op
    for i in range(stem + 1, end):
        kind = names[i]
        cluster.add(i)
        problem = None
        if kind == "CONV_2D":
            o = ops[i].builtinOptions
            if not _is_1x1(graph, ops[i]):
                problem = ("a full (non-1x1) conv inside the cluster", "only the stem may be a full conv; use depthwise + 1x1")
            elif (o.strideH, o.strideW) != (1, 1):
                problem = ("1x1 conv with stride > 1", "use stride 1 for 1x1 convs")
            elif tfl.densify_source(graph, int(ops[i].inputs[1]), model) is None:
                problem = ("weights stored dense: XNNPACK only goes sparse for static sparse weights behind DENSIFY",
                           "re-export with `edgesparse export --format tflite` (stores pruned weights sparse)")
        elif kind == "DEPTHWISE_CONV_2D":
            o = ops[i].builtinOptions
            k = [int(d) for d in graph.tensors[int(ops[i].inputs[1])].shape][1:3]
            pads, same = _padding(model, graph, ops, names, producers, i)
            if same:
                problem = ("depthwise conv with TensorFlow SAME padding", "rewrite SAME depthwise convs as PAD + VALID (edgesparse export does)")
            elif k not in ([3, 3], [5, 5]) or (o.strideH, o.strideW) not in ((1, 1), (2, 2)) or pads != [k[0] // 2] * 4:
                problem = (f"depthwise {k[0]}x{k[1]} stride {o.strideH} with padding {pads}",
                           "depthwise convs must be 3x3 pad 1 or 5x5 pad 2, stride 1 or 2")
        elif kind == "TRANSPOSE":
            problem = ("a TRANSPOSE inside the cluster (torch's x.mean((2, 3)) on NCHW converts to TRANSPOSE + MEAN)",
                       "pool with nn.AdaptiveAvgPool2d(1), which converts to a plain MEAN")
        elif kind not in _CLUSTER_OK:
            problem = (f"{kind} is not allowed inside XNNPACK's sparse cluster", f"remove {kind} between the stem and the global pool")
        if problem:
            per_op[i] = (f"dense: {problem[0]}", problem[1])
            if not blocker:
                blocker, fix = problem
    total = zeros = 0
    for i in cluster:
        if i in weighted and names[i] in ("CONV_2D", "FULLY_CONNECTED") and i != stem:
            count = int(np.prod(weighted[i].shape))
            total, zeros = total + count, zeros + weighted[i].sparsity * count
    if not blocker and total and zeros / total < XNNPACK_MIN_ZEROS:
        blocker = f"only {zeros / total:.0%} zeros in the cluster's 1x1 conv weights (XNNPACK needs >= 67%)"
        fix = "prune the 1x1 convs to >= 67% sparsity"
    if not blocker and target == "x86_64":
        blocker = "x86 with AVX: XNNPACK turns its sparse path off (its sparse kernels target SSE only)"
        fix = "run it on arm64; on x86 use the .pte/.onnx with edgesparse kernels"
    return blocker, fix, cluster, per_op
