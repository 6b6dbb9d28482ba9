"""TFLite export: litert-torch converts the pruned fp32 model, then a post-pass on the flatbuffer
makes the sparsity count on the device, and ai-edge-litert verifies the result against torch.

The post-pass (facts in ../shared/notes/onnx-and-tflite.md, section 6):
- pruned 1x1 CONV_2D and FULLY_CONNECTED weights are stored in TFLite's sparse format (CSR over
  the input dimension, blocked like the pruning pattern) and fed through a DENSIFY op. A sparse
  weight without DENSIFY silently gives NaN in XNNPACK, so there is never one without it. On ARM,
  DENSIFY'd static weights are what makes XNNPACK take its sparse (NCHW SpMM) path.
- SAME-padded depthwise convs become an explicit PAD + VALID conv: XNNPACK's sparse path refuses
  TensorFlow SAME padding, and litert-torch emits it for every stride-1 depthwise conv.
- int8 (`--quant int8`): full-integer static quantization with ai-edge-quantizer on the recipe's
  calibration data; int8 weights stay dense (XNNPACK's sparse path is fp32/fp16 only).
- `--tflite-ops edgesparse` (fp32): the layers export swapped for our kernels become Edgesparse*
  custom ops (packed weights, a 32-byte options blob) that our TFLite op library runs on any CPU;
  `interpreter()` registers that library. The rest of the post-pass applies to the other layers.
"""

from __future__ import annotations

import contextlib
import io
import logging
import struct
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgesparse import _progress
from edgesparse._io import atomic_path, native_stderr, sha256_file
from edgesparse.converters import verify
from edgesparse.errors import EdgesparseError, first_line

IDENTIFIER = b"TFL3"  # bytes 4..8 of every .tflite


def _schema():
    from ai_edge_litert import schema_py_generated

    return schema_py_generated


# ---- reading and writing the flatbuffer (shared with `edgesparse inspect`) -------------------

def load(data: bytes):
    """The model as the flatbuffer object API (ModelT), or a one-line error for anything that is
    not a well-formed TFLite model."""
    s = _schema()
    if len(data) < 8 or data[4:8] != IDENTIFIER:
        raise EdgesparseError("not a TFLite model (no TFL3 identifier)")
    try:
        model = s.ModelT.InitFromPackedBuf(data, 0)
        if not model.subgraphs:
            raise ValueError("no subgraphs")
        for graph in model.subgraphs:  # every index the graph holds must point somewhere
            for op in graph.operators or []:
                model.operatorCodes[op.opcodeIndex]
                for i in [*(op.inputs if op.inputs is not None else []), *(op.outputs if op.outputs is not None else [])]:
                    if i >= len(graph.tensors) or (i >= 0 and graph.tensors[i].buffer >= len(model.buffers)):
                        raise ValueError(f"tensor index {i} out of range")
    except EdgesparseError:
        raise
    except Exception as exc:  # flatbuffers raises anything from IndexError to struct.error
        raise EdgesparseError(f"corrupt or truncated TFLite model ({type(exc).__name__}: {first_line(exc)})") from None
    return model


def pack(model) -> bytes:
    import flatbuffers

    builder = flatbuffers.Builder(1 << 16)
    builder.Finish(model.Pack(builder), file_identifier=IDENTIFIER)
    return bytes(builder.Output())


def op_name(model, op) -> str:
    code = model.operatorCodes[op.opcodeIndex]
    value = max(code.builtinCode, code.deprecatedBuiltinCode)
    if not _BUILTIN_NAMES:
        _BUILTIN_NAMES.update({v: k for k, v in vars(_schema().BuiltinOperator).items() if not k.startswith("_")})
    return _BUILTIN_NAMES.get(value, f"OP_{value}")


_BUILTIN_NAMES: dict[int, str] = {}
_NUMPY_TYPES = {0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64, 9: np.int8}


def tensor_type_name(tensor) -> str:
    s = _schema()
    return next((k.lower() for k, v in vars(s.TensorType).items() if v == tensor.type), str(tensor.type))


def stored_bytes(model, index: int, graph) -> int:
    """Bytes the tensor's data takes in the file (its sparse form when a DENSIFY feeds it)."""
    source = densify_source(graph, index, model)
    tensor = graph.tensors[index if source is None else source]
    data = model.buffers[tensor.buffer].data
    return 0 if data is None else len(data)


def densify_source(graph, index: int, model) -> int | None:
    """The sparse tensor a DENSIFY op turns into tensor `index`, if one does."""
    for op in graph.operators or []:
        if op_name(model, op) == "DENSIFY" and list(op.outputs) == [index]:
            return int(op.inputs[0])
    return None


def constant(model, graph, index: int) -> np.ndarray | None:
    """A constant tensor's dense values (decoding TFLite's sparse format), or None if the tensor
    is computed at run time."""
    source = densify_source(graph, index, model)
    tensor = graph.tensors[index if source is None else source]
    data = model.buffers[tensor.buffer].data
    kind = _NUMPY_TYPES.get(tensor.type)
    if data is None or kind is None:
        return None
    values = np.frombuffer(bytes(data), dtype=kind)
    shape = [int(d) for d in tensor.shape]
    if tensor.sparsity is None:
        if values.size != int(np.prod(shape)):
            raise EdgesparseError(f"tensor {tensor.name!r} holds {values.size} values for shape {shape}")
        return values.reshape(shape)
    if kind is not np.float32:
        raise EdgesparseError("sparse TFLite weights other than fp32 are not supported")
    sparsity = tensor.sparsity
    block_map = list(sparsity.blockMap) if sparsity.blockMap is not None else []
    block_size = [int(sparsity.dimMetadata[len(shape) + i].denseSize) for i in range(len(block_map))]
    return _csr_to_dense(shape, sparsity, values, block_map, block_size)


def _csr_to_dense(shape, sparsity, values, block_map, block_size) -> np.ndarray:
    """Decode the layout `encode_sparse` writes: blocked dims first (dense except the last,
    which is CSR), then the block dims (dense), in traversal order 0..n+k-1."""
    n = len(shape)
    blocked = list(shape)
    for dim, size in zip(block_map, block_size):
        blocked[dim] //= size
    dims = sparsity.dimMetadata
    if list(sparsity.traversalOrder) != list(range(n + len(block_map))) or any(d.format != 0 for d in dims[: n - 1]) \
            or dims[n - 1].format != 1 or any(d.format != 0 for d in dims[n:]):
        raise EdgesparseError("this TFLite sparse layout is not one edgesparse reads (CSR over the last dimension)")
    block = int(np.prod(block_size)) if block_size else 1
    segments = np.asarray(dims[n - 1].arraySegments.values, dtype=np.int64)
    indices = np.asarray(dims[n - 1].arrayIndices.values, dtype=np.int64)
    rows = int(np.prod(blocked[: n - 1]))
    if len(segments) != rows + 1 or segments[-1] != len(indices) or len(values) != len(indices) * block \
            or (len(indices) and indices.max() >= blocked[n - 1]):
        raise EdgesparseError("inconsistent TFLite sparse tensor (segments, indices and values disagree)")
    out = np.zeros([*blocked, *block_size], dtype=np.float32).reshape(rows, blocked[n - 1], block)
    row_of = np.repeat(np.arange(rows), np.diff(segments))
    out[row_of, indices] = values.reshape(-1, block)
    out = out.reshape([*blocked, *block_size])
    # move each block dim next to the dim it splits, then merge
    order, axis = [], {dim: n + i for i, dim in enumerate(block_map)}
    for dim in range(n):
        order.append(dim)
        if dim in axis:
            order.append(axis[dim])
    return out.transpose(order).reshape(shape)


# ---- the post-pass --------------------------------------------------------------------------

def _opcode(model, builtin: int) -> int:
    for i, code in enumerate(model.operatorCodes):
        if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin:
            return i
    s = _schema()
    code = s.OperatorCodeT()
    code.builtinCode, code.deprecatedBuiltinCode, code.version = builtin, min(builtin, 127), 1
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def _add_tensor(model, graph, shape, kind: int, name: bytes, data: np.ndarray | None = None) -> int:
    s = _schema()
    buffer = s.BufferT()
    if data is not None:
        buffer.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), dtype=np.uint8)
    model.buffers.append(buffer)
    tensor = s.TensorT()
    tensor.shape, tensor.type, tensor.buffer, tensor.name = np.asarray(shape, dtype=np.int32), kind, len(model.buffers) - 1, name
    graph.tensors.append(tensor)
    return len(graph.tensors) - 1, tensor


def _index_vector(values: list[int]):
    s = _schema()
    top = max(values, default=0)
    for kind, cls, tag in ((np.uint8, s.Uint8VectorT, s.SparseIndexVector.Uint8Vector),
                           (np.uint16, s.Uint16VectorT, s.SparseIndexVector.Uint16Vector),
                           (np.int32, s.Int32VectorT, s.SparseIndexVector.Int32Vector)):
        if top <= np.iinfo(kind).max:
            vector = cls()
            vector.values = np.asarray(values, dtype=kind)  # Pack writes the array's own bytes
            return vector, tag
    raise EdgesparseError("tensor too large for TFLite's sparse format")


def _block_for(weight: np.ndarray) -> tuple[list[int], list[int]]:
    """block_map / block_size for the weight's pruning pattern: RxC blocks split the output dim
    (0) by R and the input dim (last) by C."""
    from edgesparse.patterns import detect_pattern

    pattern = detect_pattern(torch.from_numpy(weight.reshape(weight.shape[0], -1).copy()))
    if not pattern or not pattern.startswith("block:"):
        return [], []
    rows, cols = (int(v) for v in pattern.split(":")[1].split("x"))
    block_map, block_size = [], []
    if rows > 1:
        block_map.append(0), block_size.append(rows)
    if cols > 1:
        block_map.append(weight.ndim - 1), block_size.append(cols)
    return block_map, block_size


def encode_sparse(model, min_sparsity: float = 0.5) -> list[str]:
    """Store every fp32 1x1 CONV_2D / FULLY_CONNECTED weight with >= min_sparsity zeros in
    TFLite's sparse format behind a DENSIFY op; returns the encoded tensors' names."""
    s = _schema()
    graph = model.subgraphs[0]
    encoded, operators = [], []
    for op in graph.operators:
        name = op_name(model, op)
        weight_index = int(op.inputs[1]) if name in ("CONV_2D", "FULLY_CONNECTED") and len(op.inputs) > 1 else -1
        tensor = graph.tensors[weight_index] if weight_index >= 0 else None
        weight = constant(model, graph, weight_index) if tensor is not None and tensor.sparsity is None else None
        if weight is None or weight.dtype != np.float32 or (name == "CONV_2D" and weight.shape[1:3] != (1, 1)) \
                or densify_source(graph, weight_index, model) is not None or float((weight == 0).mean()) < min_sparsity:
            operators.append(op)
            continue
        block_map, block_size = _block_for(weight)
        sparse_values, sparsity = _encode(weight, block_map, block_size)
        index, sparse = _add_tensor(model, graph, tensor.shape, tensor.type, (tensor.name or b"weight") + b"/sparse", sparse_values)
        sparse.sparsity = sparsity
        model.buffers[tensor.buffer] = s.BufferT()  # the dense tensor is now DENSIFY's output
        densify = s.OperatorT()
        densify.opcodeIndex, densify.inputs, densify.outputs = _opcode(model, s.BuiltinOperator.DENSIFY), [index], [weight_index]
        densify.builtinOptionsType, densify.builtinOptions = s.BuiltinOptions.DensifyOptions, s.DensifyOptionsT()
        operators += [densify, op]
        encoded.append((tensor.name or b"").decode(errors="replace"))
    graph.operators = operators
    return encoded


def _encode(weight: np.ndarray, block_map: list[int], block_size: list[int]):
    """CSR over the last (input) dim, dense elsewhere, blocks as extra dense dims."""
    s = _schema()
    shape = list(weight.shape)
    n = len(shape)
    blocked = list(shape)
    for dim, size in zip(block_map, block_size):
        blocked[dim] //= size
    # [d0/R, R, ..., dn/C, C] -> [d0/R, ..., dn/C, R, C]
    split = []
    for dim in range(n):
        split += [blocked[dim], block_size[block_map.index(dim)]] if dim in block_map else [shape[dim]]
    inner = _block_axes(shape, block_map)
    tiles = weight.reshape(split).transpose([a for a in range(len(split)) if a not in inner] + inner)
    rows = int(np.prod(blocked[: n - 1]))
    block = int(np.prod(block_size)) if block_size else 1
    flat = tiles.reshape(rows, blocked[n - 1], block)
    keep = np.any(flat != 0, axis=2)
    segments = np.concatenate([[0], np.cumsum(keep.sum(axis=1))]).tolist()
    indices = np.nonzero(keep)[1].tolist()
    values = flat[keep].reshape(-1).astype(np.float32)
    sparsity = s.SparsityParametersT()
    sparsity.traversalOrder = list(range(n + len(block_map)))
    sparsity.blockMap = list(block_map)
    sparsity.dimMetadata = []
    for dim, size in enumerate([*blocked, *block_size]):
        meta = s.DimensionMetadataT()
        if dim == n - 1:
            meta.format = s.DimensionType.SPARSE_CSR
            meta.arraySegments, meta.arraySegmentsType = _index_vector(segments)
            meta.arrayIndices, meta.arrayIndicesType = _index_vector(indices)
        else:
            meta.format, meta.denseSize = s.DimensionType.DENSE, int(size)
        sparsity.dimMetadata.append(meta)
    return values, sparsity


def _block_axes(shape: list[int], block_map: list[int]) -> list[int]:
    """Positions of the block dims in the split shape."""
    axes, position = [], 0
    for dim in range(len(shape)):
        if dim in block_map:
            axes.append(position + 1)
            position += 2
        else:
            position += 1
    return axes


def rewrite_same_depthwise(model) -> int:
    """SAME-padded DEPTHWISE_CONV_2D -> PAD + VALID (same numbers; keeps XNNPACK's sparse path
    open). Returns how many convs were rewritten."""
    s = _schema()
    graph = model.subgraphs[0]
    operators, rewritten = [], 0
    for op in graph.operators:
        options = op.builtinOptions
        if op_name(model, op) != "DEPTHWISE_CONV_2D" or options.padding != s.Padding.SAME:
            operators.append(op)
            continue
        x = graph.tensors[op.inputs[0]]
        _, height, width, channels = (int(d) for d in x.shape)
        _, kh, kw, _ = (int(d) for d in graph.tensors[op.inputs[1]].shape)
        pads = [[0, 0]]
        for size, k, stride, dilation in ((height, kh, options.strideH, options.dilationHFactor or 1),
                                          (width, kw, options.strideW, options.dilationWFactor or 1)):
            total = max((-(-size // stride) - 1) * stride + (k - 1) * dilation + 1 - size, 0)
            pads.append([total // 2, total - total // 2])
        pads.append([0, 0])
        options.padding = s.Padding.VALID
        rewritten += 1
        if not any(before or after for before, after in pads):
            operators.append(op)
            continue
        padded_shape = [max(1, int(x.shape[0])), height + sum(pads[1]), width + sum(pads[2]), channels]
        pad_index, _ = _add_tensor(model, graph, [4, 2], s.TensorType.INT32, (x.name or b"x") + b"/pads", np.asarray(pads, np.int32))
        padded, _ = _add_tensor(model, graph, padded_shape, x.type, (x.name or b"x") + b"/padded")
        pad = s.OperatorT()
        pad.opcodeIndex, pad.inputs, pad.outputs = _opcode(model, s.BuiltinOperator.PAD), [int(op.inputs[0]), pad_index], [padded]
        pad.builtinOptionsType, pad.builtinOptions = s.BuiltinOptions.PadOptions, s.PadOptionsT()
        op.inputs = np.asarray([padded, *list(op.inputs)[1:]], dtype=np.int32)
        operators += [pad, op]
    graph.operators = operators
    return rewritten


# ---- edgesparse custom ops (--tflite-ops edgesparse) ------------------------------------------

TFLITE_OPS = ("builtin", "edgesparse")
CUSTOM_OPS = ("EdgesparseBcsrLinear", "EdgesparseBcsrConv1x1", "EdgesparseNmLinear", "EdgesparseNmConv1x1")
_OPTIONS = struct.Struct("<4s7I")  # the op contract in runtime_kernels/tflite_ops/tflite_ops.cpp
_MAGIC = b"ESP1"
_ACTIVATIONS = {0: "none", 1: "relu", 2: "relu_n1_to_1", 3: "relu6"}  # TFLite's fused activations our ops apply


def custom_options(out: int, inp: int, a: int, b: int, activation: int, keep_dims: bool) -> bytes:
    """The 32-byte attribute blob of an Edgesparse* op: out/in features, block RxC (BCSR) or n, m
    (N:M), the fused activation and whether the output keeps the input's leading dims."""
    return _OPTIONS.pack(_MAGIC, out, inp, a, b, activation, int(keep_dims), 0)


def parse_custom_options(data) -> dict | None:
    """The fields of an Edgesparse* op's options, or None when they are not a valid blob."""
    raw = bytes(bytearray(data)) if data is not None else b""
    if len(raw) != _OPTIONS.size:
        return None
    magic, out, inp, a, b, activation, keep, reserved = _OPTIONS.unpack(raw)
    if magic != _MAGIC or activation not in _ACTIVATIONS or keep > 1 or reserved:
        return None
    return {"out_features": out, "in_features": inp, "a": a, "b": b, "activation": _ACTIVATIONS[activation], "keep_dims": bool(keep)}


def custom_op_name(model, op) -> str | None:
    code = model.operatorCodes[op.opcodeIndex]
    if max(code.builtinCode, code.deprecatedBuiltinCode) != _schema().BuiltinOperator.CUSTOM or code.customCode is None:
        return None
    return code.customCode.decode(errors="replace") if isinstance(code.customCode, bytes) else str(code.customCode)


def edgesparse_ops(model) -> list:
    """The Edgesparse* custom ops in the model's graphs."""
    return [op for graph in model.subgraphs for op in graph.operators or [] if (custom_op_name(model, op) or "") in CUSTOM_OPS]


def dense_twin(model: nn.Module) -> tuple[nn.Module, dict]:
    """A copy of the export model with each edgesparse sparse module back as the plain Linear /
    1x1 Conv2d it computes (litert-torch cannot map our ops), and the formats those modules used,
    keyed by the exact bytes of their dense [out, in] weight, so the post-pass can find each one in
    the converted graph and pack the same format."""
    import copy

    from edgesparse.runtime_kernels import modules as sparse_modules
    from edgesparse.runtime_kernels.formats import unpack_bcsr, unpack_nm

    twin = copy.deepcopy(model)
    formats: dict[bytes, tuple[str, int, int]] = {}
    for name, module in list(twin.named_modules()):
        if not isinstance(module, sparse_modules._SparseModule):
            continue
        if isinstance(module, sparse_modules._BCSRModule):
            weight = unpack_bcsr(module.values, module.col_idx, module.row_ptr, module.block_rows, module.in_features,
                                 module.out_features, module.block_cols)
            kind, a, b = "bcsr", module.block_rows, module.block_cols
        elif isinstance(module, sparse_modules._NMModule):
            weight = unpack_nm(module.values, module.idx, module.n, module.m, module.in_features, module.out_features)
            kind, a, b = "nm", module.n, module.m
        else:
            raise EdgesparseError(f"--tflite-ops edgesparse has no TFLite op for {type(module).__name__} ({name})",
                                  hint="use --tflite-ops builtin")
        weight = weight.detach().float().contiguous()
        bias = module.bias is not None
        if module.conv:
            dense = nn.Conv2d(module.in_features, module.out_features, 1, bias=bias)
            dense.weight.data = weight.reshape(module.out_features, module.in_features, 1, 1).clone()
        else:
            dense = nn.Linear(module.in_features, module.out_features, bias=bias)
            dense.weight.data = weight.clone()
        if bias:
            dense.bias.data = module.bias.detach().float().clone()
        parent_name, _, child = name.rpartition(".")
        setattr(twin.get_submodule(parent_name) if parent_name else twin, child, dense)
        formats[weight.numpy().tobytes()] = (kind, a, b)
    return twin, formats


def emit_edgesparse_ops(model, formats: dict) -> list[dict]:
    """Replace each fp32 FULLY_CONNECTED / 1x1 stride-1 CONV_2D whose weight is one of `formats`'
    (a layer the export swapped for our kernels) with an Edgesparse* custom op whose packed weights
    are new constant tensors; returns one record per replaced op."""
    from edgesparse.runtime_kernels.formats import pack_bcsr, pack_nm

    s = _schema()
    graph = model.subgraphs[0]
    replaced, operators = [], []
    for op in graph.operators:
        name = op_name(model, op)
        inputs = [int(i) for i in op.inputs] if op.inputs is not None else []
        options = op.builtinOptions
        conv = name == "CONV_2D"
        eligible = name in ("FULLY_CONNECTED", "CONV_2D") and len(inputs) >= 2 and options is not None
        if eligible and conv:
            eligible = options.strideH == 1 and options.strideW == 1
        if eligible and not conv:
            eligible = options.weightsFormat == 0
        weight = constant(model, graph, inputs[1]) if eligible and graph.tensors[inputs[1]].sparsity is None else None
        if eligible and weight is not None and conv:
            eligible = weight.ndim == 4 and weight.shape[1:3] == (1, 1)
        weight2d = weight.reshape(weight.shape[0], -1) if eligible and weight is not None and weight.dtype == np.float32 else None
        found = formats.get(np.ascontiguousarray(weight2d).tobytes()) if weight2d is not None else None
        bias_index = inputs[2] if len(inputs) > 2 else -1
        bias = constant(model, graph, bias_index) if bias_index >= 0 else None
        x = graph.tensors[inputs[0]] if inputs else None
        if found is None or options.fusedActivationFunction not in _ACTIVATIONS or (bias_index >= 0 and bias is None) \
                or x is None or x.type != s.TensorType.FLOAT32:
            operators.append(op)
            continue
        kind, a, b = found
        out, inp = weight2d.shape
        label = (graph.tensors[inputs[1]].name or b"weight").decode(errors="replace")
        w = torch.from_numpy(weight2d.copy())
        if kind == "bcsr":
            packed = pack_bcsr(w, a, b)
            arrays = [(packed.values.numpy(), s.TensorType.FLOAT32, "values"), (packed.col_idx.numpy(), s.TensorType.INT32, "col_idx"),
                      (packed.row_ptr.numpy(), s.TensorType.INT32, "row_ptr")]
            custom = "EdgesparseBcsrConv1x1" if conv else "EdgesparseBcsrLinear"
            stored = packed.nbytes
        else:
            packed = pack_nm(w, a, b)
            arrays = [(packed.values.numpy(), s.TensorType.FLOAT32, "values"), (packed.idx.numpy(), s.TensorType.UINT8, "idx")]
            custom = "EdgesparseNmConv1x1" if conv else "EdgesparseNmLinear"
            stored = packed.nbytes
        new_inputs = [inputs[0]]
        for array, kind_code, suffix in arrays:
            index, _ = _add_tensor(model, graph, [array.size], kind_code, f"{label}/{suffix}".encode(), array.reshape(-1))
            new_inputs.append(index)
        if bias_index >= 0:
            new_inputs.append(bias_index)
        keep = bool(getattr(options, "keepNumDims", False))
        custom_op = s.OperatorT()
        custom_op.opcodeIndex = _custom_opcode(model, custom)
        custom_op.inputs, custom_op.outputs = new_inputs, [int(i) for i in op.outputs]
        custom_op.builtinOptionsType = s.BuiltinOptions.NONE
        custom_op.customOptions = list(custom_options(out, inp, a, b, options.fusedActivationFunction, keep))
        custom_op.customOptionsFormat = s.CustomOptionsFormat.FLEXBUFFERS  # the schema's only value; the blob is ours
        operators.append(custom_op)
        replaced.append({"op": custom, "weight": label, "shape": [out, inp],
                         "format": f"{a}x{b} blocks" if kind == "bcsr" else f"{a}:{b}", "stored_bytes": stored,
                         "activation": _ACTIVATIONS[options.fusedActivationFunction]})
    graph.operators = operators
    _drop_unused_buffers(model)
    return replaced


def _custom_opcode(model, name: str) -> int:
    s = _schema()
    for i, code in enumerate(model.operatorCodes):
        if max(code.builtinCode, code.deprecatedBuiltinCode) == s.BuiltinOperator.CUSTOM and code.customCode in (name, name.encode()):
            return i
    code = s.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = s.BuiltinOperator.CUSTOM
    code.customCode, code.version = name.encode(), 1
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def _drop_unused_buffers(model) -> None:
    """Empty the buffers that no operator input reads any more (the replaced dense weights)."""
    used_buffers = set()
    for graph in model.subgraphs:
        used = {int(i) for op in graph.operators or [] for i in (op.inputs if op.inputs is not None else []) if i >= 0}
        used |= {int(i) for i in (graph.inputs if graph.inputs is not None else [])}
        used |= {int(i) for i in (graph.outputs if graph.outputs is not None else [])}
        used_buffers |= {graph.tensors[i].buffer for i in used}
    for graph in model.subgraphs:
        for index, tensor in enumerate(graph.tensors):
            if tensor.buffer not in used_buffers and tensor.buffer > 0 and model.buffers[tensor.buffer].data is not None:
                model.buffers[tensor.buffer] = _schema().BufferT()


# ---- export ----------------------------------------------------------------------------------

def convert(model: nn.Module, example_inputs: tuple) -> bytes:
    """torch -> .tflite bytes with litert-torch (the optional `[tflite]` extra)."""
    # litert-torch and its converter log progress lines and absl/oneDNN notes on import and use
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            native_stderr():
        warnings.simplefilter("ignore")
        try:
            import litert_torch
        except ImportError:
            raise EdgesparseError("--format tflite needs litert-torch", hint="pip install 'edgesparse[tflite]' (about 1.1 GB)") from None
        logging.getLogger("litert_torch").setLevel(logging.ERROR)
        try:
            return bytes(litert_torch.convert(model.eval(), tuple(example_inputs)).model_content())
        except Exception as exc:
            raise EdgesparseError(f"litert-torch could not convert the model: {first_line(exc)}") from None


def quantize_int8(data: bytes, calib: list[tuple]) -> bytes:
    """Full-integer static int8 (weights per channel, activations per tensor) with ai-edge-quantizer,
    calibrated on `calib`."""
    import tempfile

    from ai_edge_quantizer import quantizer, recipe

    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()), native_stderr():
        source = Path(tmp) / "fp32.tflite"
        source.write_bytes(data)
        q = quantizer.Quantizer(str(source))
        q.load_quantization_recipe(recipe.static_wi8_ai8())
        signature = _signature_inputs(data)
        samples = [{name: t.numpy() for name, t in zip(signature, inputs)} for inputs in calib]
        result = q.quantize(q.calibrate({"serving_default": samples}))
        result.export_model(str(Path(tmp) / "int8.tflite"), overwrite=True)
        return (Path(tmp) / "int8.tflite").read_bytes()


def _signature_inputs(data: bytes) -> list[str]:
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_content=data).get_signature_runner()
    return list(runner.get_input_details())


def export_tflite(job, dest: str | Path) -> dict:
    dest = Path(dest)
    if job.quant not in ("none", "int8"):
        raise EdgesparseError(f"--quant {job.quant} is not available for --format tflite", hint="use --quant none or int8")
    ops = getattr(job, "tflite_ops", "builtin")
    if ops not in TFLITE_OPS:
        raise EdgesparseError(f"unknown --tflite-ops {ops!r} (available: {', '.join(TFLITE_OPS)})")
    if ops == "edgesparse" and job.quant != "none":
        raise EdgesparseError("--tflite-ops edgesparse runs fp32 kernels", hint="use --quant none, or --tflite-ops builtin for int8")
    formats: dict = {}
    source = job.pruned
    if ops == "edgesparse":
        source, formats = dense_twin(job.model)
    with _progress.status(f"exporting {dest.name} (litert-torch)"):
        dense = convert(source, job.example_inputs)
    model = load(dense)
    entry = {"dense_bytes": len(dense), "depthwise_same_rewritten": rewrite_same_depthwise(model), "tflite_ops": ops}
    if job.quant == "int8":
        with _progress.status(f"quantizing {dest.name} (int8, {len(job.calib)} calibration batches)"):
            data = quantize_int8(pack(model), job.calib)
        entry["storage"] = "dense int8 (XNNPACK's sparse path is fp32/fp16 only)"
    else:
        if ops == "edgesparse":
            entry["edgesparse_ops"] = emit_edgesparse_ops(model, formats)
            if not entry["edgesparse_ops"]:
                entry["edgesparse_ops_note"] = ("no layer was swapped for an edgesparse kernel (see the manifest's layer reasons)"
                                                if not formats else "litert-torch's graph held none of the swapped layers' weights as a plain FC / 1x1 conv")
        entry["sparse_weights"] = encode_sparse(model)
        entry["storage"] = "TFLite sparse format + DENSIFY for pruned 1x1 conv / fully-connected weights"
        if ops == "edgesparse":
            entry["storage"] = "edgesparse custom ops (packed BCSR / N:M weights) for swapped layers; " + entry["storage"] + " for the rest"
        data = pack(model)
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)
        with _progress.status(f"verifying {dest.name} in LiteRT (XNNPACK on and off)"):
            entry.update(verify_tflite(tmp, job.pruned, job.sample_inputs, job.quant != "none"))
    entry.update(format="tflite", path=dest.name, bytes=dest.stat().st_size, sha256=sha256_file(dest))
    entry["size_vs_dense"] = round(entry["bytes"] / entry["dense_bytes"], 4)
    return entry


def interpreter(path: str | Path, xnnpack: bool = True, threads: int = 1, edgesparse_ops: bool = True):
    """A LiteRT interpreter for the file, with the edgesparse op library registered when it is
    built (edgesparse_ops=False: never, to see what a plain runtime does with the file)."""
    from ai_edge_litert.interpreter import InterpreterWithCustomOps, OpResolverType

    from edgesparse import runtime_kernels

    resolver = OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    registerers = [runtime_kernels.tflite_registerer()] if edgesparse_ops and runtime_kernels.TFLITE_LIBRARY.is_file() else []
    try:
        with native_stderr():
            runner = InterpreterWithCustomOps(model_path=str(path), num_threads=threads, experimental_op_resolver_type=resolver,
                                              custom_op_registerers=registerers)
            runner.allocate_tensors()
    except Exception as exc:
        first = first_line(exc)
        hint = None
        if "Edgesparse" in first and not registerers:
            hint = ("build the edgesparse op library with `make kernels`" if edgesparse_ops
                    else "load it with edgesparse.converters.tflite.interpreter(path), which registers the edgesparse ops")
        raise EdgesparseError(f"LiteRT could not load {Path(path).name}: {first}", hint=hint) from None
    return runner


def run_tflite(runner, inputs: tuple) -> torch.Tensor:
    """float in, float out; a full-integer model's int8 input is quantized and its output
    dequantized with the tensors' own scale and zero point."""
    for detail, tensor in zip(runner.get_input_details(), inputs):
        value = tensor.detach().contiguous().numpy()
        if detail["dtype"] != np.float32:
            scale, zero = detail["quantization"]
            info = np.iinfo(detail["dtype"])
            value = np.clip(np.round(value / scale) + zero, info.min, info.max).astype(detail["dtype"])
        runner.set_tensor(detail["index"], value)
    runner.invoke()
    detail = runner.get_output_details()[0]
    out = runner.get_tensor(detail["index"]).astype(np.float32)
    if detail["dtype"] != np.float32:
        scale, zero = detail["quantization"]
        out = (out - zero) * scale
    return torch.from_numpy(out)


def verify_tflite(path: Path, model: nn.Module, sample_inputs: list[tuple], quantized: bool) -> dict:
    """Both with the default XNNPACK delegate and with the builtin kernels; the worse one counts."""
    reference = verify.reference(model, sample_inputs)
    runs = {}
    for name, xnnpack in (("xnnpack", True), ("builtin", False)):
        runner = interpreter(path, xnnpack)
        runs[name] = verify.check(reference, [run_tflite(runner, inputs) for inputs in sample_inputs], quantized)
    worst = max(runs.values(), key=lambda run: run["max_abs_error"])
    return worst | runs | {"verified": all(run["verified"] for run in runs.values()), "samples": len(sample_inputs),
                           "runtime": "ai-edge-litert (XNNPACK on and off)"}
