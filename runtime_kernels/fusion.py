"""Keep chains of layers on our kernels: rewrites a torch.export graph so the layers between two
edgesparse:: ops run on edgesparse:: ops too, in NCHW, instead of entering XNNPACK.

Why: XNNPACK runs NHWC, our 1x1 convs NCHW, so every XNNPACK island between two of our ops is a
delegate call entered and left through a transpose pair (issue 13: 28 partitions and 36
transposes per inference in a sparse MobileNetV2). The rewrite works on the graph, by what each
node computes, not by module names:
  * a depthwise 3x3 conv (groups = channels, padding 1, stride 1 or 2) that reads from or feeds
    (through one activation) one of our ops becomes edgesparse::dwconv3x3;
  * a ReLU / ReLU6 / clamp whose input is one of our convs (and has no other reader) is folded into
    that conv's clamp;
  * `a + b` where one side is our BCSR 1x1 conv (read only by the add, no clamp yet) becomes that
    conv's residual (edgesparse::bcsr_conv1x1_fused: clamp(W x + b + residual)), so
    conv -> add -> ReLU (ResNet) folds as well as conv -> add (MobileNetV2).
Anything else is left to XNNPACK as before.
"""

from __future__ import annotations

import operator

import torch

from edgesparse.runtime_kernels import ops

aten = torch.ops.aten
es = torch.ops.edgesparse
NO_CLAMP = ops.NO_CLAMP

_ACTIVATIONS = {aten.relu.default, aten.relu_.default, aten.hardtanh.default, aten.hardtanh_.default,
                aten.clamp.default, aten.clamp_.default}
_CONVS = {aten.conv2d.default, aten.convolution.default}
_ADDS = {aten.add.Tensor, aten.add_.Tensor, operator.add}
_OURS_PREFIX = "edgesparse."


def _is_ours(node) -> bool:
    return node.op == "call_function" and str(node.target).startswith(_OURS_PREFIX)


def _clamp_of(node) -> tuple[float, float] | None:
    """The (min, max) an activation node clamps to, or None if it is not a plain clamp."""
    if node.op != "call_function" or node.target not in _ACTIVATIONS:
        return None
    if node.target in (aten.relu.default, aten.relu_.default):
        return (0.0, NO_CLAMP)
    if node.target in (aten.hardtanh.default, aten.hardtanh_.default):
        lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
        hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0)
    else:
        lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
        hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max")
    if not all(v is None or isinstance(v, (int, float)) for v in (lo, hi)) or (lo is None and hi is None):
        return None
    return (-NO_CLAMP if lo is None else float(lo), NO_CLAMP if hi is None else float(hi))


def _val(node):
    return node.meta.get("val") if hasattr(node, "meta") else None


def _depthwise_3x3(node) -> tuple | None:
    """(x, weight, bias, stride) of a depthwise 3x3 conv with padding 1 that our kernel runs, else None."""
    if node.op != "call_function" or node.target not in _CONVS:
        return None
    args = list(node.args)
    if node.target == aten.convolution.default:
        x, weight, bias, stride, padding, dilation, transposed, _, groups = args
        if transposed:
            return None
    else:
        defaults = [None, None, None, [1, 1], [0, 0], [1, 1], 1]
        x, weight, bias, stride, padding, dilation, groups = args + defaults[len(args):]
    w, xv = _val(weight), _val(x)
    if w is None or xv is None or xv.dim() != 4 or xv.dtype != torch.float32 or w.dtype != torch.float32:
        return None
    channels = xv.shape[1]
    if tuple(w.shape) != (channels, 1, 3, 3) or groups != channels or list(padding) != [1, 1] or list(dilation) != [1, 1]:
        return None
    if list(stride) not in ([1, 1], [2, 2]) or weight.op != "placeholder":
        return None
    return x, weight, bias, stride[0]


def _through_activation(node):
    """node's producer, looking through one activation (the conv an activated input came from)."""
    return node.args[0] if _clamp_of(node) is not None else node


def _feeds_ours(node) -> bool:
    users = list(node.users)
    if len(users) == 1 and _clamp_of(users[0]) is not None:
        users = list(users[0].users)
    return any(_is_ours(u) for u in users)


def _replace(graph, old, target, args):
    with graph.inserting_before(old):
        new = graph.call_function(target, tuple(args))
    new.meta = dict(old.meta)
    old.replace_all_uses_with(new)
    graph.erase_node(old)
    return new


def _fused_args(conv) -> list:
    """The bcsr_conv1x1_fused arguments equivalent to a bcsr_conv1x1 or bcsr_conv1x1_fused node."""
    if conv.target == es.bcsr_conv1x1_fused.default:
        return list(conv.args)
    x, values, col_idx, row_ptr, bias, *shape = conv.args
    return [x, values, col_idx, row_ptr, bias, None, *shape, -NO_CLAMP, NO_CLAMP]


def fuse_chains(program: torch.export.ExportedProgram) -> dict:
    """Rewrite `program` in place (see the module docstring); returns counts of what was fused."""
    graph = program.graph_module.graph
    counts = {"dwconv3x3": 0, "activation": 0, "residual": 0}

    for node in list(graph.nodes):  # depthwise convs next to our ops
        spec = _depthwise_3x3(node)
        if spec is None or not (_is_ours(_through_activation(spec[0])) or _feeds_ours(node)):
            continue
        x, weight, bias, stride = spec
        _replace(graph, node, es.dwconv3x3.default, [x, weight, bias, stride, -NO_CLAMP, NO_CLAMP])
        counts["dwconv3x3"] += 1

    for node in list(graph.nodes):  # conv -> add (the residual), before activations: clamp(conv + r)
        if node.op != "call_function" or node.target not in _ADDS or len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
            continue
        for mine, other in ((node.args[0], node.args[1]), (node.args[1], node.args[0])):
            if not (isinstance(mine, torch.fx.Node) and isinstance(other, torch.fx.Node) and mine is not other):
                continue
            if mine.target not in (es.bcsr_conv1x1.default, es.bcsr_conv1x1_fused.default) or len(mine.users) != 1:
                continue
            args = _fused_args(mine)
            mv, ov = _val(mine), _val(other)
            if args[5] is not None or args[-2:] != [-NO_CLAMP, NO_CLAMP] or mv is None or ov is None or \
                    mv.shape != ov.shape or ov.dtype != torch.float32:
                continue
            args[5] = other
            _replace(graph, node, es.bcsr_conv1x1_fused.default, args)
            graph.erase_node(mine)
            counts["residual"] += 1
            break

    for node in list(graph.nodes):  # our conv -> activation
        clamp = _clamp_of(node)
        if clamp is None:
            continue
        producer = node.args[0]
        if not isinstance(producer, torch.fx.Node) or len(producer.users) != 1:
            continue
        if producer.target in (es.bcsr_conv1x1.default, es.bcsr_conv1x1_fused.default):
            args = _fused_args(producer)
            target = es.bcsr_conv1x1_fused.default
        elif producer.target == es.dwconv3x3.default:
            args, target = list(producer.args), es.dwconv3x3.default
        else:
            continue
        if args[-2:] != [-NO_CLAMP, NO_CLAMP]:
            continue
        args[-2:] = list(clamp)
        _replace(graph, node, target, args)
        graph.erase_node(producer)
        counts["activation"] += 1

    graph.eliminate_dead_code()
    graph.lint()
    program.graph_module.recompile()
    return counts
