"""Model specs: built-in demos (`demo:NAME`), user factories (`file.py:function`) and saved
ExportedPrograms (`.pt2`), all loaded into one ModelBundle."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from edgesparse.errors import EdgesparseError, first_line

Predict = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class ModelBundle:
    """A model plus what compression and verification need around it.

    evaluate(predict) -> the held-out `metric` (accuracy for classifiers, perplexity for LMs),
    where predict maps an input batch to the model's output; calib() yields input tuples for
    calibration; finetune() makes a fresh one-step hook. export_wrapper(model) -> (module,
    example_inputs, verification_inputs) says what to export when it is not the model's own
    forward (an LM exports one decode step with a static KV cache). prune_defaults: PruneConfig
    fields (e.g. exclude globs) that replace the recipe's values where it left them at their
    defaults, for models whose safe-to-prune layers are known (an encoder's FFNs).
    """

    name: str
    model: nn.Module
    example_inputs: tuple
    evaluate: Callable[[Predict], float] | None = None
    calib: Callable[[], Iterable[tuple]] | None = None
    finetune: Callable[[], Callable[[nn.Module, int], float | None]] | None = None
    sample_inputs: list[tuple] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    metric: str = "accuracy"
    export_wrapper: Callable[[nn.Module], tuple[nn.Module, tuple, list[tuple]]] | None = None
    prune_defaults: dict = field(default_factory=dict)

    def verification_inputs(self) -> list[tuple]:
        return self.sample_inputs or [self.example_inputs]


DEMOS = {
    "digits-cnn": "edgesparse.models.digits:bundle",
    "minilm-l6": "edgesparse.models.minilm:bundle",
    "mobilenetv2": "edgesparse.models.mobilenetv2:bundle",
    "smollm2-135m": "edgesparse.models.smollm2:bundle",
    "tiny-moe": "edgesparse.models.tiny_moe:bundle",
}


def load_model(spec: str) -> ModelBundle:
    """`demo:digits-cnn`, `demo:mobilenetv2`, `path/to/file.py:factory` or `model.pt2`."""
    if spec.startswith("demo:"):
        name = spec.removeprefix("demo:")
        if name not in DEMOS:
            raise EdgesparseError(f"unknown demo model {spec!r} (available: {', '.join('demo:' + d for d in DEMOS)})")
        module_name, func = DEMOS[name].split(":")
        return getattr(importlib.import_module(module_name), func)()
    if spec.endswith(".pt2"):
        return _load_pt2(Path(spec))
    path_text, sep, factory = spec.rpartition(":")
    if sep and path_text.endswith(".py") and factory:
        return _load_factory(Path(path_text), factory)
    if spec.endswith(".py"):
        raise EdgesparseError(f"{spec}: name the factory function, as {spec}:function_name")
    raise EdgesparseError(
        f"unsupported model {spec!r}: expected demo:NAME, path/to/file.py:factory or a .pt2 ExportedProgram"
    )


def _load_pt2(path: Path) -> ModelBundle:
    if not path.is_file():
        raise EdgesparseError(f"model file not found: {path}")
    try:
        ep = torch.export.load(str(path))
    except Exception as exc:
        raise EdgesparseError(f"{path} is not a readable ExportedProgram (.pt2): {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    example = ep.example_inputs
    if example is None:
        raise EdgesparseError(f"{path} was saved without example inputs; re-export with torch.export.export(model, args)")
    args, _kwargs = example
    return ModelBundle(path.stem, ep.module(), tuple(args))


def _load_factory(path: Path, factory: str) -> ModelBundle:
    if not path.is_file():
        raise EdgesparseError(f"model file not found: {path}")
    module_name = f"edgesparse_user_{path.stem}"
    try:
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    except Exception as exc:
        raise EdgesparseError(f"could not import {path}: {type(exc).__name__}: {first_line(exc)}") from exc
    fn = getattr(module, factory, None)
    if not callable(fn):
        raise EdgesparseError(f"{path} has no function {factory!r}")
    try:
        made = fn()
    except Exception as exc:  # the user's code: one line here, the traceback with --debug
        raise EdgesparseError(f"{path}: {factory}() raised {type(exc).__name__}: {first_line(exc)}",
                              hint="run `edgesparse --debug ...` for the traceback") from exc
    if isinstance(made, ModelBundle):
        return made
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], nn.Module):
        model, example = made
    elif isinstance(made, nn.Module) and hasattr(made, "example_inputs"):
        model, example = made, made.example_inputs
    else:
        raise EdgesparseError(
            f"{factory}() must return (model, example_inputs), a model with .example_inputs, or an edgesparse.ModelBundle"
        )
    example = example if isinstance(example, tuple) else (example,)
    return ModelBundle(f"{path.stem}:{factory}", model, example)
