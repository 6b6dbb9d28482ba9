"""edgesparse's sparse CPU kernels: the C libraries built from this folder and their Python side.

    build()                 configure + build with CMake (make does this; tests call it if needed)
    available()             whether the ExecuTorch op library is built
    load_executorch_ops()   load it into this process's ExecuTorch runtime, exactly once
    tflite_registerer()     load the TFLite op library; the registerer name LiteRT's interpreter takes
    register_with_exporter(register_kernel)  hand export's registry our layer factories
"""

from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path

from edgesparse.errors import EdgesparseError, first_line

SOURCE_DIR = Path(__file__).resolve().parent
BUILD_DIR = SOURCE_DIR / "build"
ET_LIBRARY = BUILD_DIR / "libedgesparse_et.so"
C_LIBRARY = BUILD_DIR / "libedgesparse_kernels.so"
ORT_LIBRARY = BUILD_DIR / "libedgesparse_ort.so"  # ONNX Runtime custom ops, domain ai.edgesparse
TFLITE_LIBRARY = BUILD_DIR / "libedgesparse_tflite.so"  # TFLite custom ops Edgesparse* (tflite_ops/)
TFLITE_REGISTERER = "EdgesparseTfliteRegisterer"  # for InterpreterWithCustomOps(custom_op_registerers=[...])
RUNNER = BUILD_DIR / "edgesparse_runner"  # the torch-free C++ .pte runner
# the same runner cross-built for aarch64 Linux against the aarch64 executorch wheel (make arm-runner)
ARM_BUILD_DIR = SOURCE_DIR / "build-aarch64-runner"
ARM_ET_ROOT = ARM_BUILD_DIR / "executorch"
_loaded = False


def build(quiet: bool = True) -> None:
    """Configure and build the kernel libraries with CMake (about 5 s)."""
    out = subprocess.DEVNULL if quiet else None
    try:
        subprocess.run(["cmake", "-S", str(SOURCE_DIR), "-B", str(BUILD_DIR), "-DCMAKE_BUILD_TYPE=Release",
                        f"-DPython3_EXECUTABLE={sys.executable}"], check=True, stdout=out)
        subprocess.run(["cmake", "--build", str(BUILD_DIR), "-j2"], check=True, stdout=out)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise EdgesparseError(f"building the sparse kernels failed: {exc}", hint="run `make kernels` to see the compiler output") from None


def available() -> bool:
    return ET_LIBRARY.is_file()


def load_executorch_ops() -> bool:
    """Register the edgesparse:: kernels in ExecuTorch's operator registry, once per process.

    Registering the same kernel twice aborts the process, so this is idempotent and never loads
    a second copy. Returns False when the library has not been built."""
    global _loaded
    if _loaded:
        return True
    if not available():
        return False
    from executorch.extension.pybindings import portable_lib  # noqa: F401  (loads libexecutorch.so first)

    ctypes.CDLL(str(ET_LIBRARY), mode=ctypes.RTLD_GLOBAL)
    _loaded = True
    return True


def ort_session(path, threads: int = 1, profile_prefix: str | None = None):
    """An ONNX Runtime CPU session with the edgesparse op library registered (when built), so
    models with ai.edgesparse nodes run; plain models run as usual. profile_prefix: turn on ORT's
    per-node profiling, written by session.end_profiling() to a file with that prefix."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    if ORT_LIBRARY.is_file():
        options.register_custom_ops_library(str(ORT_LIBRARY))
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        first = first_line(exc)
        hint = "build the edgesparse op library with `make kernels`" if "edgesparse" in first and not ORT_LIBRARY.is_file() else None
        raise EdgesparseError(f"ONNX Runtime could not load {Path(path).name}: {first}", hint=hint) from None


_tflite_library = None


def tflite_registerer() -> str:
    """Load the TFLite custom-op library (once, RTLD_GLOBAL so the interpreter finds its registerer
    by name) and return that name; a one-line error when it is not built or cannot reach LiteRT's
    op resolver."""
    global _tflite_library
    if _tflite_library is None:
        if not TFLITE_LIBRARY.is_file():
            raise EdgesparseError("the model has edgesparse TFLite ops but the op library is not built",
                                  hint="build it with `make kernels`")
        from ai_edge_litert import interpreter  # noqa: F401  (loads LiteRT, whose resolver the registerer needs)

        library = ctypes.CDLL(str(TFLITE_LIBRARY), mode=ctypes.RTLD_GLOBAL)
        library.EdgesparseTfliteStatus.restype = ctypes.c_char_p
        _tflite_library = library
    why = _tflite_library.EdgesparseTfliteStatus()
    if why:
        raise EdgesparseError(f"cannot register the edgesparse TFLite ops in this LiteRT: {why.decode()}",
                              hint="see converters/README.md (TFLite custom ops)")
    return TFLITE_REGISTERER


def register_with_exporter(register_kernel) -> bool:
    """Register our layer factories with the exporter's `register_kernel(pattern_kind, dtype, name,
    factory, builtin)` (converters.sparse_swap's), so export swaps eligible fp32 layers for
    edgesparse:: ops. The registry is passed in: this room never imports the exporters."""
    if not available():
        return False
    from edgesparse.runtime_kernels.modules import register

    register(register_kernel)
    return True
