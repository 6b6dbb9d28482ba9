"""edgesparse: prune, quantize and export PyTorch models that run faster on edge devices.

    import edgesparse
    recipe = edgesparse.Recipe.load("recipe.toml")          # or build it in Python
    result = edgesparse.compress(model, recipe, example_inputs=(x,), calib=batches, finetune=hook)
    edgesparse.export_model("demo:digits-cnn", recipe, "out/")  # compress + .pte + manifest.json
    session = edgesparse.ort_session("out/model.onnx")       # ONNX Runtime with our sparse ops
"""

__version__ = "0.1.0"

from edgesparse.compress import CompressResult, compress  # noqa: E402
from edgesparse.errors import EdgesparseError  # noqa: E402
from edgesparse.models import ModelBundle, load_model  # noqa: E402
from edgesparse.pipeline import export_model  # noqa: E402
from edgesparse.recipe import ActSparsityConfig, LayerRule, Pattern, PruneConfig, QuantConfig, Recipe, Schedule  # noqa: E402
from edgesparse.runtime_kernels import ort_session  # noqa: E402

__all__ = [
    "ActSparsityConfig", "CompressResult", "EdgesparseError", "LayerRule", "ModelBundle", "Pattern", "PruneConfig", "QuantConfig",
    "Recipe", "Schedule", "compress", "export_model", "load_model",
    "ort_session",
]
