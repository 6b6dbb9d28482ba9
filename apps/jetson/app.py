#!/usr/bin/env python3
"""Live image classification on a Jetson (or any Linux board): frames from a camera or a video file
(OpenCV), or a built-in synthetic source, into a .onnx in ONNX Runtime with the edgesparse op
library (TensorRT / CUDA providers when present, CPU otherwise) or a .pte through the C++ runner.
Shows FPS, p50 latency, peak memory and, on a Jetson, board power from tegrastats.

    python3 app.py MODEL [--video FILE | --camera N] [--frames N] [--headless] [--json OUT]

Needs python3, numpy and onnxruntime only (OpenCV, tegrastats and the edgesparse checkout are used
when present); never torch.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CHECKOUT = HERE.parent.parent  # the edgesparse source tree, when the app runs from it
OP_LIBRARY = "libedgesparse_ort.so"
# torchvision's ImageNet normalization, for 3-channel models; 1-channel models get [0, 1] pixels
IMAGENET_MEAN, IMAGENET_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


class AppError(Exception):
    """A user error: printed as one line, exit code 2."""


def first_file(*candidates: Path) -> Path | None:
    return next((path for path in candidates if path.is_file()), None)


def load_tegrastats():
    """edgesparse's tegrastats parser (devices/tegrastats.py), from beside this file (copied there
    on a board) or from the checkout, loaded by path: importing the edgesparse package would pull
    in torch. None when neither is there (then no power readout)."""
    path = first_file(HERE / "tegrastats.py", CHECKOUT / "devices" / "tegrastats.py")
    if path is None:
        return None
    spec = importlib.util.spec_from_file_location("edgesparse_tegrastats", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cv2_or_none():
    try:
        import cv2

        return cv2
    except ImportError:
        return None


# ---- frames -----------------------------------------------------------------------------------

def synthetic_frames(width: int = 320, height: int = 240):
    """Deterministic BGR frames: a white square and a red disc moving over a colour gradient."""
    yy, xx = np.mgrid[0:height, 0:width]
    ramp = (xx * 255 // width).astype(np.uint8)
    background = np.stack([ramp, ramp[:, ::-1], np.full_like(ramp, 40)], axis=-1)
    t = 0
    while True:
        frame = background.copy()
        x, y = (7 * t) % width, (3 * t) % height
        frame[max(y - 20, 0):y + 20, max(x - 20, 0):x + 20] = 255
        frame[(xx - (width - 1 - x)) ** 2 + (yy - y) ** 2 < 15 ** 2] = (0, 0, 255)
        yield frame
        t += 1


def capture_frames(cv2, source):
    capture = cv2.VideoCapture(source)
    if not capture.isOpened():
        raise AppError(f"cannot open {'camera' if isinstance(source, int) else 'video'} {source}")
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                return
            yield frame
    finally:
        capture.release()


def preprocess(frame: np.ndarray, shape: list[int], cv2=None) -> np.ndarray:
    """A BGR uint8 frame as the model's float32 NCHW input (resized; RGB + ImageNet normalization
    for 3 channels, the mean of the channels in [0, 1] for 1)."""
    _, channels, height, width = shape
    if cv2 is not None:
        frame = cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA)
    else:  # nearest neighbour
        rows = np.arange(height) * frame.shape[0] // height
        cols = np.arange(width) * frame.shape[1] // width
        frame = frame[rows][:, cols]
    pixels = frame[..., ::-1].astype(np.float32) / 255.0
    if channels == 1:
        pixels = pixels.mean(axis=-1, keepdims=True)
    elif channels == 3:
        pixels = (pixels - IMAGENET_MEAN) / IMAGENET_STD
    else:
        raise AppError(f"the model takes {channels} channels; this app feeds 1 or 3")
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)[None], dtype=np.float32)


# ---- models -----------------------------------------------------------------------------------

class OnnxModel:
    """ONNX Runtime: TensorRT, then CUDA, then CPU, whichever this onnxruntime build has; nodes a
    provider cannot take (our ai.edgesparse ones) run on the CPU with the registered op library."""

    runtime = "onnxruntime"

    def __init__(self, path: Path, op_library: Path | None, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        if op_library:
            options.register_custom_ops_library(str(op_library))
        gpu = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in ort.get_available_providers()]
        try:
            self.session = ort.InferenceSession(str(path), options, providers=[*gpu, "CPUExecutionProvider"])
        except Exception as exc:
            if not gpu:
                hint = "" if op_library else f" (a model with ai.edgesparse nodes needs --op-library {OP_LIBRARY})"
                raise AppError(f"ONNX Runtime cannot load {path.name}: {str(exc).splitlines()[0]}{hint}") from None
            print(f"note: {'/'.join(gpu)} failed ({str(exc).splitlines()[0]}); using the CPU", file=sys.stderr)
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.path, self.provider = path, self.session.get_providers()[0]
        self.op_library = str(op_library) if op_library else None
        first = self.session.get_inputs()[0]
        self.input_name = first.name
        self.shape = [d if isinstance(d, int) else 1 for d in first.shape]  # a symbolic batch is 1
        if len(first.shape) != 4 or not all(isinstance(d, int) for d in first.shape[1:]):
            raise AppError(f"{path.name} takes {first.shape}; this app feeds fixed-size NCHW images")
        self.runner_peak_rss_mb = None

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        out = self.session.run(None, {self.input_name: x})[0]
        return out, (time.perf_counter() - t0) * 1e3


class PteModel:
    """A .pte in the C++ runner, one runner process per frame (the runner reads one input file per
    run): the latency is the runner's own execute() time; FPS also pays for starting it and loading
    the model every frame. For a live loop, use the .onnx."""

    runtime = "executorch-cpp"
    provider = "executorch (XNNPACK + edgesparse kernels)"
    op_library = None

    def __init__(self, path: Path, runner: Path | None, input_shape: list[int] | None):
        runner = runner or first_file(HERE / "edgesparse-bench" / "edgesparse-bench",
                                      CHECKOUT / "runtime_kernels" / "build" / "edgesparse_runner")
        if runner is None:
            raise AppError("no C++ runner found: give --runner (edgesparse_runner, or the edgesparse-bench launcher)")
        # the bundle's launcher is a shell script: run it with sh (Android has no /bin/sh)
        self.command = ["sh", str(runner)] if runner.read_bytes()[:2] == b"#!" else [str(runner)]
        manifest = path.with_name("manifest.json")
        if input_shape is None and manifest.is_file():
            input_shape = json.loads(manifest.read_text()).get("example_input_shapes", [None])[0]
        if not input_shape or len(input_shape) != 4:
            raise AppError(f"the input shape of {path.name} is unknown: give --input-shape N,C,H,W")
        self.path, self.shape = path, list(input_shape)
        self.scratch = tempfile.TemporaryDirectory(prefix="edgesparse-app.")  # removed at exit
        self.folder = Path(self.scratch.name)
        self.runner_peak_rss_mb = 0.0

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        x.tofile(self.folder / "in.f32")
        proc = subprocess.run([*self.command, str(self.path), "--runs", "1", "--warmup", "0", "--input",
                               str(self.folder / "in.f32"), "--output", str(self.folder / "out.f32")],
                              capture_output=True, text=True, timeout=300)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        result = json.loads(lines[-1]) if lines else {"error": (proc.stderr.strip() or "no output").splitlines()[-1]}
        if proc.returncode or "error" in result:
            raise AppError(f"the runner failed on {self.path.name}: {result.get('error')}")
        self.runner_peak_rss_mb = max(self.runner_peak_rss_mb, result["peak_rss_mb"])
        return np.fromfile(self.folder / "out.f32", dtype=np.float32)[None], result["times_ms"][-1]


# ---- power ------------------------------------------------------------------------------------

class Power:
    """tegrastats every 100 ms while the app runs (a Jetson: `tegrastats` on the PATH and the
    parser importable); otherwise inactive."""

    def __init__(self):
        self.parser = load_tegrastats() if shutil.which("tegrastats") else None
        self.lines: list[str] = []
        self.process = self.reader = None
        if self.parser:
            self.process = subprocess.Popen(["tegrastats", "--interval", "100"], stdout=subprocess.PIPE,
                                            stderr=subprocess.DEVNULL, text=True)
            self.reader = threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True)
            self.reader.start()

    def now_mw(self) -> int | None:
        """The board's input power in the latest sample."""
        if not self.lines:
            return None
        rails = (self.parser.parse_line(self.lines[-1]) or {}).get("rails", {})
        return next((rails[name]["mw"] for name in self.parser.INPUT_RAILS if name in rails), None)

    def stop(self) -> None:
        if self.process:
            self.process.terminate()
            self.process.wait()
            self.reader.join(timeout=2)  # the lines still in the pipe

    def energy(self, mean_latency_ms: float) -> dict | None:
        """Mean input power over the run and energy per inference (edgesparse's definition)."""
        return self.parser.energy_per_inference(self.lines, mean_latency_ms) if self.parser else None


# ---- the loop ---------------------------------------------------------------------------------

def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def summarize(latencies: list[float]) -> dict:
    values = np.asarray(latencies)
    return {"p50": float(np.percentile(values, 50)), "p90": float(np.percentile(values, 90)),
            "p99": float(np.percentile(values, 99)), "mean": float(values.mean()), "min": float(values.min()),
            "max": float(values.max())}


def run(model, frames, count: int | None, cv2, show: str) -> dict:
    """Classify `count` frames (None: until the source ends or the user quits); show: "window",
    "line" (a status line every second on stderr) or "none"."""
    power = Power()
    latencies: list[float] = []
    prediction = {}
    started = last_status = time.perf_counter()
    try:
        for frame in frames:
            if count is not None and len(latencies) >= count:
                break
            logits, ms = model(preprocess(frame, model.shape, cv2))
            latencies.append(ms)
            scores = np.exp(logits.reshape(-1) - logits.max())
            scores /= scores.sum()
            prediction = {"class": int(scores.argmax()), "score": float(scores.max())}
            now = time.perf_counter()
            if show == "none" or (show == "line" and now - last_status < 1.0):
                continue
            status = (f"{len(latencies) / (now - started):.1f} fps  p50 {np.median(latencies[-100:]):.2f} ms  "
                      f"rss {peak_rss_mb():.0f} MB  class {prediction['class']} ({prediction['score']:.2f})")
            if (mw := power.now_mw()) is not None:
                status += f"  {mw / 1000:.2f} W"
            if show == "line":
                print(status, file=sys.stderr)
                last_status = now
                continue
            cv2.putText(frame, status, (8, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 255, 0), 1)
            cv2.imshow("edgesparse", frame)
            if cv2.waitKey(1) & 0xFF in (ord("q"), 27):
                break
    except KeyboardInterrupt:
        pass
    finally:
        power.stop()
    seconds = time.perf_counter() - started
    if not latencies:
        raise AppError("no frames came from the source")
    result = {"model": model.path.name, "runtime": model.runtime,
              "provider": model.provider, "op_library": model.op_library, "machine": platform.machine(),
              "frames": len(latencies), "seconds": seconds, "fps": len(latencies) / seconds,
              "latency_ms": summarize(latencies), "peak_rss_mb": peak_rss_mb(), "prediction": prediction}
    if model.runner_peak_rss_mb is not None:
        result["runner_peak_rss_mb"] = model.runner_peak_rss_mb
    if energy := power.energy(result["latency_ms"]["mean"]):
        result["power"] = energy
    return result


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a .onnx (ONNX Runtime) or a .pte (the C++ runner)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--video", help="a video file (OpenCV)")
    source.add_argument("--camera", type=int, help="a camera index (OpenCV), e.g. 0 for /dev/video0")
    parser.add_argument("--frames", type=int, help="stop after N frames (default: until the source ends or q; "
                                                   "300 when --headless)")
    parser.add_argument("--headless", action="store_true", help="no window and no status lines; write the JSON "
                                                                "(to --json, else stdout)")
    parser.add_argument("--json", type=Path, help="write the result JSON here")
    parser.add_argument("--op-library", type=Path, help=f"our ONNX Runtime op library ({OP_LIBRARY}; default: "
                                                        "beside this file, or the checkout's build)")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    parser.add_argument("--runner", type=Path, help=".pte: edgesparse_runner or the edgesparse-bench launcher")
    parser.add_argument("--input-shape", type=lambda s: [int(v) for v in s.split(",")],
                        help=".pte: N,C,H,W (default: from the manifest.json beside it)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` ends the run like Ctrl-C: with a result
    try:
        if not args.model.is_file():
            raise AppError(f"no such model: {args.model}")
        cv2 = cv2_or_none()
        if (args.video or args.camera is not None) and cv2 is None:
            raise AppError("--video and --camera need OpenCV (pip install opencv-python, or JetPack's python3-opencv)")
        if args.model.suffix == ".onnx":
            op_library = args.op_library or first_file(HERE / OP_LIBRARY,
                                                       CHECKOUT / "runtime_kernels" / "build" / OP_LIBRARY)
            model = OnnxModel(args.model, op_library, args.threads)
        elif args.model.suffix == ".pte":
            model = PteModel(args.model, args.runner, args.input_shape)
        else:
            raise AppError(f"{args.model.name}: expected a .onnx or a .pte")
        frames = (capture_frames(cv2, args.video if args.video else args.camera)
                  if args.video or args.camera is not None else synthetic_frames())
        count = args.frames if args.frames is not None else (300 if args.headless else None)
        has_display = os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
        show = "none" if args.headless else ("window" if cv2 is not None and has_display else "line")
        result = run(model, frames, count, cv2, show)
    except AppError as exc:
        print(f"app.py: error: {exc}", file=sys.stderr)
        return 2
    result["source"] = args.video or (f"camera {args.camera}" if args.camera is not None else "synthetic")
    text = json.dumps(result, indent=1)
    if args.json:  # temp file + rename: never a half-written result
        partial = args.json.with_name(f".{args.json.name}.part")
        partial.write_text(text + "\n")
        os.replace(partial, args.json)
    if args.headless and not args.json:
        print(text)
    elif not args.headless:
        lat = result["latency_ms"]
        print(f"{result['frames']} frames, {result['fps']:.1f} fps, p50 {lat['p50']:.2f} ms, p90 {lat['p90']:.2f} ms, "
              f"peak RSS {result['peak_rss_mb']:.0f} MB, {result['provider']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
