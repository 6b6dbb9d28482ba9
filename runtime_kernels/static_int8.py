"""Static int8 (`--quant int8`) with pruned 1x1 convs on our kernel, on quantized tensors.

After PT2E's convert, a quantized 1x1 conv is the chain
    dequantize(x_q) -> conv2d(., dequantize(w_q), bias) -> [relu | hardtanh] -> quantize
and the activation often follows as its own dequantize -> hardtanh -> quantize with the same
scale and zero point (XNNPACKQuantizer shares them). For a pruned 1x1 conv whose sparsity
reaches the crossover, that whole chain becomes one edgesparse::qs8_bcsr_conv1x1 call that takes
x_q and returns the int8 tensor the final quantize returned: the activation is its output clamp,
there is no dequantize/quantize pair around it, and XNNPACK keeps every other layer in int8
(its partitions end in the quantize that makes x_q and start at the dequantize of our output).
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
OP = torch.ops.edgesparse.qs8_bcsr_conv1x1.default


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
    hi) activation bounds) for a conv followed by [act] -> quantize [-> dequantize -> act ->
    quantize with the same parameters], or None when the conv is not followed that way."""
    chain, act = [conv], None
    nxt = _only_user(conv)
    if _is_act(nxt):
        act = nxt
        chain.append(act)
        nxt = _only_user(act)
    if nxt is None or nxt.target != Q:
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


def _is_1x1(conv: fx.Node, weight: torch.Tensor) -> bool:
    args = list(conv.args) + [None] * (7 - len(conv.args))
    stride, padding, dilation, groups = args[3] or [1, 1], args[4] or [0, 0], args[5] or [1, 1], args[6] or 1
    return (weight.dim() == 4 and tuple(weight.shape[2:]) == (1, 1) and list(stride) == [1, 1]
            and list(padding) == [0, 0] and list(dilation) == [1, 1] and groups == 1)


def swap_static_int8_convs(gm: fx.GraphModule, plans: list) -> int:
    """Replace the pruned 1x1 convs of a converted static-int8 PT2E graph with our int8 op, in
    place; returns how many. Each pruned plan gets its kernel or the reason it stays in XNNPACK."""
    from edgesparse.runtime_kernels.modules import _beats_dense, block_shape_for

    by_name = {plan.name: plan for plan in plans if plan.pattern and plan.pattern != "channel"}
    swapped, replaced = 0, set()
    for conv in list(gm.graph.nodes):
        if conv.target != _aten.conv2d.default:
            continue
        stack = list(conv.meta.get("nn_module_stack", {}).values())
        plan = by_name.get(stack[-1][0]) if stack else None
        if plan is None:
            continue
        x_dq, w_dq = conv.args[0], conv.args[1]
        bias = conv.args[2] if len(conv.args) > 2 else None
        if not (isinstance(x_dq, fx.Node) and x_dq.target == DQ and isinstance(w_dq, fx.Node) and w_dq.target == DQ_CHANNEL):
            plan.reason = "dense: this conv was not quantized (kept fp32)"
            continue
        w_q = _attr(gm, w_dq.args[0])
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
        q = nodes[-1]
        w_scale = _attr(gm, w_dq.args[1]).float()
        if bool((_attr(gm, w_dq.args[2]) != 0).any()) or x_dq.args[5] != torch.int8 or q.args[5] != torch.int8:
            plan.reason = "dense XNNPACK int8: our kernel takes symmetric int8 weights and int8 activations"
            continue
        x_scale, x_zp = torch.tensor(float(x_dq.args[1])), int(x_dq.args[2])
        y_scale, y_zp, qmin, qmax = torch.tensor(float(q.args[1])), int(q.args[2]), int(q.args[3]), int(q.args[4])
        step = x_scale * w_scale  # the int32 bias grid
        mult = (step / y_scale).contiguous()
        y_min = max(qmin, int(torch.round(torch.tensor(lo) / y_scale)) + y_zp) if lo > -float("inf") else qmin
        y_max = min(qmax, int(torch.round(torch.tensor(hi) / y_scale)) + y_zp) if hi < float("inf") else qmax
        packed = group_qs8_bcsr(weight, shape[0])
        prefix = f"_es_qs8_{swapped}"
        tensors = {"values": packed.values, "col_idx": packed.col_idx, "row_ptr": packed.row_ptr, "mult": mult}
        # the int32 bias (quantize._snap_biases put the fp32 one on this grid) less x_zp's share
        bias_q = torch.round(_attr(gm, bias).double() / step.double()) if isinstance(bias, fx.Node) else 0
        tensors["bias"] = (bias_q - x_zp * weight.double().sum(1)).clamp(-(2**31), 2**31 - 1).to(torch.int32)
        with gm.graph.inserting_before(q):
            args = [x_dq.args[0]]
            for name, tensor in tensors.items():
                gm.register_buffer(f"{prefix}_{name}", tensor.contiguous())
                args.append(gm.graph.get_attr(f"{prefix}_{name}"))
            node = gm.graph.call_function(OP, (*args, shape[0], weight.shape[1], weight.shape[0], y_zp, y_min, y_max))
        node.meta = dict(conv.meta)
        q.replace_all_uses_with(node)
        replaced |= {a.target for a in (*w_dq.args[:3], bias) if isinstance(a, fx.Node) and a.op == "get_attr"}
        for old in reversed(nodes):  # in-place activations are not dead code to fx: erase the chain here
            gm.graph.erase_node(old)
        swapped += 1
        plan.kernel = f"edgesparse::qs8_bcsr_conv1x1 ({shape[0]}x1, int8 static)"
    if swapped:
        gm.graph.eliminate_dead_code()
        # the dense int8 weights, their scales and the fp32 biases would still travel into the .pte
        used = {node.target for node in gm.graph.nodes if node.op == "get_attr"}
        for target in replaced - used:
            owner, _, name = target.rpartition(".")
            delattr(gm.get_submodule(owner) if owner else gm, name)
        gm.graph.lint()
        gm.recompile()
    return swapped
