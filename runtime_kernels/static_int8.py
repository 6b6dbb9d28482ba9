"""Static int8 (`--quant int8`) with pruned 1x1 convs on our kernel, on quantized tensors.

After PT2E's convert, a quantized 1x1 conv is the chain
    dequantize(x_q) -> conv2d(., dequantize(w_q), bias) -> [relu | hardtanh] -> quantize
and the activation often follows as its own dequantize -> hardtanh -> quantize with the same
scale and zero point (XNNPACKQuantizer shares them). For a pruned 1x1 conv whose sparsity
reaches the crossover, that whole chain becomes one edgesparse::qs8_bcsr_conv1x1 call that takes
x_q and returns the int8 tensor the final quantize returned: the activation is its output clamp,
there is no dequantize/quantize pair around it, and XNNPACK keeps every other layer in int8
(its partitions end in the quantize that makes x_q and start at the dequantize of our output).

XNNPACK runs NHWC, so each of its partitions between two of our NCHW ops costs a delegate call and
a transpose pair. The depthwise 3x3 convs and residual adds that read from or feed our ops
therefore move onto our int8 kernels as well (edgesparse::qs8_dwconv3x3, edgesparse::qs8_add):
in MobileNetV2 every inverted-residual block then runs on our ops from end to end.
"""

from __future__ import annotations

import torch
import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401  (registers torch.ops.quantized_decomposed)
from torch import fx

from edgesparse.recipe import Pattern
from edgesparse.runtime_kernels import ops  # noqa: F401  (defines torch.ops.edgesparse.*)
from edgesparse.runtime_kernels.formats import group_qs8_bcsr

_qd = torch.ops.quantized_decomposed
Q, DQ, DQ_CHANNEL = _qd.quantize_per_tensor.default, _qd.dequantize_per_tensor.default, _qd.dequantize_per_channel.default
_aten = torch.ops.aten
RELUS = {_aten.relu.default, _aten.relu_.default}
HARDTANHS = {_aten.hardtanh.default, _aten.hardtanh_.default}
ADDS = {_aten.add.Tensor, _aten.add_.Tensor}
OP = torch.ops.edgesparse.qs8_bcsr_conv1x1.default
DWCONV, ADD = torch.ops.edgesparse.qs8_dwconv3x3.default, torch.ops.edgesparse.qs8_add.default


def _attr(gm: fx.GraphModule, node) -> torch.Tensor:
    obj = gm
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _bounds(act: fx.Node | None) -> tuple[float, float]:
    if act is None:
        return -float("inf"), float("inf")
    if act.target in RELUS:
        return 0.0, float("inf")
    lo = act.args[1] if len(act.args) > 1 else act.kwargs.get("min_val", -1.0)
    hi = act.args[2] if len(act.args) > 2 else act.kwargs.get("max_val", 1.0)
    return float(lo), float(hi)


def _is_act(node: fx.Node | None) -> bool:
    return node is not None and (node.target in RELUS or node.target in HARDTANHS)


def _chain(conv: fx.Node):
    """(the chain's nodes from the conv to the quantize whose int8 output our op replaces, (lo,
    hi) activation bounds) for a conv followed by [act] -> quantize to int8 [-> dequantize -> act
    -> quantize with the same parameters], or None when the conv is not followed that way."""
    chain, act = [conv], None
    nxt = _only_user(conv)
    if _is_act(nxt):
        act = nxt
        chain.append(act)
        nxt = _only_user(act)
    if nxt is None or nxt.target != Q or nxt.args[5] != torch.int8:
        return None
    chain.append(nxt)
    dq = _only_user(nxt)  # the activation quantized on its own, with the conv's output parameters
    if act is None and dq is not None and dq.target == DQ and tuple(dq.args[1:]) == tuple(nxt.args[1:]):
        act2 = _only_user(dq)
        q2 = _only_user(act2) if _is_act(act2) else None
        if q2 is not None and q2.target == Q and tuple(q2.args[1:]) == tuple(nxt.args[1:]):
            chain += [dq, act2, q2]
            act = act2
    return chain, _bounds(act)


def _conv_args(conv: fx.Node):
    """(stride, padding, dilation, groups) of an aten.conv2d node."""
    args = list(conv.args) + [None] * (7 - len(conv.args))
    return list(args[3] or [1, 1]), list(args[4] or [0, 0]), list(args[5] or [1, 1]), args[6] or 1


def _is_1x1(conv: fx.Node, weight: torch.Tensor) -> bool:
    stride, padding, dilation, groups = _conv_args(conv)
    return (weight.dim() == 4 and tuple(weight.shape[2:]) == (1, 1) and stride == [1, 1] and padding == [0, 0]
            and dilation == [1, 1] and groups == 1)


def _is_dw3x3(conv: fx.Node, weight: torch.Tensor) -> bool:
    stride, padding, dilation, groups = _conv_args(conv)
    return (weight.dim() == 4 and tuple(weight.shape[1:]) == (1, 3, 3) and groups == weight.shape[0]
            and stride in ([1, 1], [2, 2]) and padding == [1, 1] and dilation == [1, 1])


class _Rewriter:
    """Replaces chains of the converted graph with calls of our int8 ops, keeping the attributes
    that the replaced chains read for removal at the end."""

    def __init__(self, gm: fx.GraphModule):
        self.gm, self.count, self.replaced = gm, 0, set()

    def out_range(self, q: fx.Node, lo: float, hi: float) -> tuple[int, int, int]:
        """(y_zp, y_min, y_max) of the chain's final quantize, its activation's bounds folded in."""
        y_scale, y_zp, qmin, qmax = torch.tensor(float(q.args[1])), int(q.args[2]), int(q.args[3]), int(q.args[4])
        y_min = max(qmin, int(torch.round(torch.tensor(lo) / y_scale)) + y_zp) if lo > -float("inf") else qmin
        y_max = min(qmax, int(torch.round(torch.tensor(hi) / y_scale)) + y_zp) if hi < float("inf") else qmax
        return y_zp, y_min, y_max

    def replace(self, nodes: list, op, inputs: list, tensors: dict, scalars: tuple, reads: tuple) -> fx.Node:
        """nodes[0] .. nodes[-1] (a chain ending in a quantize) -> op(*inputs, *tensors, *scalars)."""
        gm, q = self.gm, nodes[-1]
        with gm.graph.inserting_before(q):
            args = list(inputs)
            for name, tensor in tensors.items():
                if tensor is None:
                    args.append(None)
                    continue
                gm.register_buffer(f"_es_qs8_{self.count}_{name}", tensor.contiguous())
                args.append(gm.graph.get_attr(f"_es_qs8_{self.count}_{name}"))
            node = gm.graph.call_function(op, (*args, *scalars))
        node.meta = dict(nodes[0].meta)
        q.replace_all_uses_with(node)
        self.replaced |= {a.target for a in reads if isinstance(a, fx.Node) and a.op == "get_attr"}
        for old in reversed(nodes):  # in-place activations are not dead code to fx: erase the chain here
            gm.graph.erase_node(old)
        self.count += 1
        return node

    def finish(self) -> None:
        gm = self.gm
        gm.graph.eliminate_dead_code()
        # the dense int8 weights, their scales and the fp32 biases would still travel into the .pte
        used = {node.target for node in gm.graph.nodes if node.op == "get_attr"}
        for target in self.replaced - used:
            owner, _, name = target.rpartition(".")
            delattr(gm.get_submodule(owner) if owner else gm, name)
        gm.graph.lint()
        gm.recompile()


def _int8_dq(node) -> bool:
    return isinstance(node, fx.Node) and node.target == DQ and node.args[5] == torch.int8


def _quantized_conv(gm, conv: fx.Node):
    """(x dequantize, weight dequantize, bias, int8 weight, per-channel weight scales) of a conv
    whose input and weight are int8 (symmetric weights), else None."""
    x_dq, w_dq = conv.args[0], conv.args[1]
    if not (_int8_dq(x_dq) and isinstance(w_dq, fx.Node) and w_dq.target == DQ_CHANNEL
            and bool((_attr(gm, w_dq.args[2]) == 0).all())):
        return None
    bias = conv.args[2] if len(conv.args) > 2 else None
    return x_dq, w_dq, bias, _attr(gm, w_dq.args[0]), _attr(gm, w_dq.args[1]).float()


def _int32_bias(gm, bias, step: torch.Tensor):
    """The conv's fp32 bias on its int32 grid (quantize._snap_biases put it there), as float64, or 0."""
    return torch.round(_attr(gm, bias).double() / step.double()) if isinstance(bias, fx.Node) else 0


def swap_static_int8_convs(gm: fx.GraphModule, plans: list) -> dict:
    """Replace the pruned 1x1 convs of a converted static-int8 PT2E graph with our int8 op, and the
    depthwise 3x3 convs and adds that read from or feed our ops with our int8 ones (so the chain
    between two of our convs never enters XNNPACK), in place. Returns the counts per op; each
    pruned plan gets its kernel or the reason it stays in XNNPACK."""
    from edgesparse.runtime_kernels.modules import _beats_dense, block_shape_for

    by_name = {plan.name: plan for plan in plans if plan.pattern and plan.pattern != "channel"}
    rw = _Rewriter(gm)
    counts = {"conv1x1": 0, "dwconv3x3": 0, "add": 0}
    for conv in list(gm.graph.nodes):
        if conv.target != _aten.conv2d.default:
            continue
        stack = list(conv.meta.get("nn_module_stack", {}).values())
        plan = by_name.get(stack[-1][0]) if stack else None
        if plan is None:
            continue
        quantized = _quantized_conv(gm, conv)
        if quantized is None:
            plan.reason = "dense: this conv was not quantized to int8 (kept fp32)"
            continue
        x_dq, w_dq, bias, w_q, w_scale = quantized
        chain = _chain(conv)
        if not _is_1x1(conv, w_q) or chain is None:
            plan.reason = "dense XNNPACK int8: our static int8 kernel runs stride-1 unpadded 1x1 convs followed by a quantize"
            continue
        shape = block_shape_for(Pattern.parse(plan.pattern))
        if shape is None or shape[1] != 1:
            plan.reason = f"dense XNNPACK int8: our int8 sparse kernel runs Rx1 blocks (block:1x1/2x1/4x1/8x1, unstructured), not {plan.pattern}"
            continue
        weight = w_q.reshape(w_q.shape[0], -1)
        if not _beats_dense("conv1x1", plan, weight, "int8"):
            continue
        nodes, (lo, hi) = chain
        x_zp, step = int(x_dq.args[2]), torch.tensor(float(x_dq.args[1])) * w_scale  # step: the int32 bias grid
        packed = group_qs8_bcsr(weight, shape[0])
        tensors = {"values": packed.values, "col_idx": packed.col_idx, "row_ptr": packed.row_ptr,
                   "mult": step / float(nodes[-1].args[1]),
                   # the int32 bias less the input zero point's share
                   "bias": (_int32_bias(gm, bias, step) - x_zp * weight.double().sum(1)).clamp(-(2**31), 2**31 - 1).to(torch.int32)}
        rw.replace(nodes, OP, [x_dq.args[0]], tensors, (shape[0], weight.shape[1], weight.shape[0], *rw.out_range(nodes[-1], lo, hi)),
                   (*w_dq.args[:3], bias))
        counts["conv1x1"] += 1
        plan.kernel = f"edgesparse::qs8_bcsr_conv1x1 ({shape[0]}x1, int8 static)"
    if counts["conv1x1"]:
        _keep_chains(gm, rw, counts)
        rw.finish()
    return counts


def _ours(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and str(node.target).startswith("edgesparse.")


def _touches_ours(dequantizes: list, q: fx.Node) -> bool:
    """Whether one of the dequantized inputs comes from our op, or the final quantize feeds one."""
    return any(_ours(dq.args[0]) for dq in dequantizes) or any(map(_ours, q.users))


def _shape(dq: fx.Node) -> tuple | None:
    """The shape of a dequantized tensor, from the node that produced it (convert_pt2e's quantize
    and dequantize nodes carry none)."""
    src = dq.args[0]
    if isinstance(src, fx.Node) and src.target == Q:
        src = src.args[0]
    val = src.meta.get("val") if isinstance(src, fx.Node) else None
    return tuple(val.shape) if val is not None else None


def _keep_chains(gm: fx.GraphModule, rw: _Rewriter, counts: dict) -> None:
    """Depthwise 3x3 convs and adds whose int8 input comes from one of our ops or whose int8 output
    goes to one, onto our int8 ops (in graph order, so a chain of them converts link by link)."""
    for node in list(gm.graph.nodes):
        if node.target == _aten.conv2d.default:
            quantized = _quantized_conv(gm, node)
            chain = _chain(node) if quantized else None
            if chain is None or not _is_dw3x3(node, quantized[3]):
                continue
            x_dq, w_dq, bias, w_q, w_scale = quantized
            nodes, (lo, hi) = chain
            if not _touches_ours([x_dq], nodes[-1]):
                continue
            step = torch.tensor(float(x_dq.args[1])) * w_scale
            bias_q = _int32_bias(gm, bias, step)
            tensors = {"weight": w_q, "mult": step / float(nodes[-1].args[1]),
                       "bias": bias_q.to(torch.int32) if isinstance(bias_q, torch.Tensor) else None}
            rw.replace(nodes, DWCONV, [x_dq.args[0]], tensors,
                       (_conv_args(node)[0][0], int(x_dq.args[2]), *rw.out_range(nodes[-1], lo, hi)), (*w_dq.args[:3], bias))
            counts["dwconv3x3"] += 1
        elif node.target in ADDS and len(node.args) == 2 and not node.kwargs:
            a, b = node.args
            chain = _chain(node)
            if chain is None or not (_int8_dq(a) and _int8_dq(b)):
                continue
            nodes, (lo, hi) = chain
            if _shape(a) is None or _shape(a) != _shape(b) or not _touches_ours([a, b], nodes[-1]):
                continue
            y_scale = torch.tensor(float(nodes[-1].args[1]))
            mults = [float(torch.tensor(float(t.args[1])) / y_scale) for t in (a, b)]
            rw.replace(nodes, ADD, [a.args[0], b.args[0]], {},
                       (*mults, int(a.args[2]), int(b.args[2]), *rw.out_range(nodes[-1], lo, hi)), ())
            counts["add"] += 1
