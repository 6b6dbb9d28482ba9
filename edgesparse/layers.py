"""Finding the prunable layers of a model: conv and linear weights, in execution-ish order.

Works for ordinary nn.Modules (nn.Conv2d / nn.Linear) and for GraphModules from a saved
ExportedProgram, where layers are aten.conv2d / aten.linear nodes reading a weight attribute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Layer:
    name: str
    owner: nn.Module  # the module holding the weight parameter
    kind: str  # "conv" or "linear"
    groups: int = 1

    @property
    def weight(self) -> torch.Tensor:
        return self.owner.weight

    @property
    def depthwise(self) -> bool:
        w = self.weight
        return self.kind == "conv" and self.groups > 1 and w.shape[1] == 1

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """The weight seen as [out, in*kh*kw], the view every pattern works on."""
        w = self.weight
        return w.shape[0], w[0].numel()


def find_layers(model: nn.Module) -> list[Layer]:
    layers = [
        Layer(name, module, "conv" if isinstance(module, nn.Conv2d) else "linear", getattr(module, "groups", 1))
        for name, module in model.named_modules()
        if isinstance(module, (nn.Conv2d, nn.Linear))
    ]
    if layers or not isinstance(model, torch.fx.GraphModule):
        return layers
    return _graph_layers(model)


def _graph_layers(gm: torch.fx.GraphModule) -> list[Layer]:
    """Layers of an exported GraphModule: the weight argument of each conv/linear call."""
    kinds = {
        torch.ops.aten.conv2d.default: "conv",
        torch.ops.aten.convolution.default: "conv",
        torch.ops.aten.linear.default: "linear",
    }
    layers, seen = [], set()
    for node in gm.graph.nodes:
        kind = kinds.get(node.target)
        if kind is None or len(node.args) < 2 or getattr(node.args[1], "op", None) != "get_attr":
            continue
        target = node.args[1].target
        owner_name, _, attr = target.rpartition(".")
        if attr != "weight" or target in seen:
            continue
        seen.add(target)
        groups = 1
        if kind == "conv":
            groups = node.args[6] if node.target == torch.ops.aten.conv2d.default and len(node.args) > 6 else (
                node.args[8] if len(node.args) > 8 else 1
            )
        layers.append(Layer(owner_name, gm.get_submodule(owner_name), kind, int(groups)))
    return layers


def set_training(model: nn.Module, training: bool) -> nn.Module:
    """model.train(flag), except for exported/PT2E graphs, which refuse mode switches and are
    already in inference form."""
    try:
        model.train(training)
    except NotImplementedError:
        pass
    return model
