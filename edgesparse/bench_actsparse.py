"""`edgesparse bench actsparse`: activation sparsity on SmolLM2-135M, measured.

Per (method, target): the sparsity reached on held-out text, held-out perplexity against the dense
model's, and, for the latency targets, one decode step per token through our kernels against the
dense model, both as .pte files in the torch-free C++ runner (1 thread, interleaved rounds,
medians), plus the MLP block alone (one mid layer, a real token's hidden state, ExecuTorch's
runtime). With --finetune-steps, each cell is measured again after a recovery fine-tune with the
thresholds in place (same thresholds, so the same latency), and the dense model gets the same
fine-tune as a control: the fine-tune text is Shakespeare, like the held-out play, so part of
any gain is the domain, not recovery.
"""

from __future__ import annotations

import copy
import statistics
import subprocess
import tempfile
from pathlib import Path

import torch

from edgesparse import _progress, actsparse
from edgesparse.errors import EdgesparseError

MLP_LAYER = 15  # the mid layer whose MLP block is timed alone


def bench_actsparse(methods=("cats", "chess", "teal"), targets=(0.3, 0.5, 0.7), finetune_steps: int = 0,
                    latency_targets=(0.5,), rounds: int = 5, runs: int = 30, calib_tokens: int = 4096) -> list[dict]:
    from edgesparse.models import smollm2

    torch.set_num_threads(1)
    model, tokenizer = smollm2.load()
    heldout = smollm2.heldout_chunks(tokenizer)
    calib = smollm2.calibration_chunks(tokenizer, calib_tokens)
    with _progress.status("dense perplexity"):
        dense_ppl = smollm2.perplexity(model, heldout)
    rows = []
    if finetune_steps:  # the control: the same fine-tune on the dense model (same-domain text helps it too)
        tuned = copy.deepcopy(model)
        actsparse.recover(tuned, smollm2.make_finetune(tokenizer)(), finetune_steps)
        with _progress.status("dense fine-tuned: held-out perplexity"):
            rows.append({"method": "dense", "target": 0.0, "finetune_steps": finetune_steps, "sparsity": 0.0,
                         "perplexity": smollm2.perplexity(tuned, heldout), "perplexity_dense": dense_ppl,
                         "ms_per_token": None, "ms_per_token_dense": None})
        del tuned
    with tempfile.TemporaryDirectory(prefix="edgesparse-bench-") as tmp:
        folder = Path(tmp)
        dense_pte = None
        for method in methods:
            for target in targets:
                sparse = copy.deepcopy(model)
                actsparse.apply(sparse, actsparse.calibrate(sparse, calib, method, target))
                row = _quality(sparse, heldout, method, target, dense_ppl, 0)
                if target in latency_targets:
                    if dense_pte is None:
                        dense_pte = _decode_pte(model, tokenizer, folder / "dense.pte", kernels=False)
                        dense_mlp = _mlp_pte(model, heldout, folder / "dense-mlp.pte", kernels=False)
                    row.update(_latency(dense_pte, _decode_pte(sparse, tokenizer, folder / "sparse.pte", kernels=True), rounds, runs))
                    row.update(_mlp_latency(dense_mlp, _mlp_pte(sparse, heldout, folder / "sparse-mlp.pte", kernels=True),
                                            rounds, runs * 20))
                rows.append(row)
                if finetune_steps:
                    actsparse.recover(sparse, smollm2.make_finetune(tokenizer)(), finetune_steps)
                    tuned = _quality(sparse, heldout, method, target, dense_ppl, finetune_steps)
                    tuned.update({k: v for k, v in row.items() if "ms" in k})  # same thresholds, same work
                    rows.append(tuned)
                del sparse
    return rows


def _quality(model, heldout, method: str, target: float, dense_ppl: float, finetune_steps: int) -> dict:
    from edgesparse.models import smollm2

    with _progress.status(f"{method} {target:.0%}{' fine-tuned' if finetune_steps else ''}: held-out perplexity"):
        measured = actsparse.measured_sparsity(model, heldout)
        ppl = smollm2.perplexity(model, heldout)
    return {"method": method, "target": target, "finetune_steps": finetune_steps,
            "sparsity": sum(measured.values()) / len(measured), "perplexity": ppl, "perplexity_dense": dense_ppl,
            "ms_per_token": None, "ms_per_token_dense": None}


def _decode_pte(model, tokenizer, path: Path, kernels: bool) -> Path:
    """The model's decode step as a .pte (thresholded layers on our kernels when `kernels`)."""
    from edgesparse.converters.executorch import lower
    from edgesparse.models.smollm2 import decode_step

    export = copy.deepcopy(model)
    if kernels:
        actsparse.to_kernels(export)
    step, example, _ = decode_step(export, tokenizer("The", return_tensors="pt").input_ids)
    with _progress.status(f"exporting the decode step to {path.name} (a few minutes)"):
        path.write_bytes(lower(step, example).buffer)
    return path


def _mlp_pte(model, heldout, path: Path, kernels: bool) -> tuple[Path, Path]:
    """One mid layer's MLP as a .pte, and a real token's hidden state (the MLP's input) to feed it."""
    from edgesparse.converters.executorch import lower

    layer = model.model.layers[MLP_LAYER]
    captured = {}
    handle = layer.mlp.register_forward_pre_hook(lambda mod, args: captured.setdefault("x", args[0][0, 100:101].clone()))
    with torch.no_grad():
        model(heldout[0])
    handle.remove()
    mlp = copy.deepcopy(layer.mlp)
    if kernels:
        holder = torch.nn.Module()
        holder.mlp = mlp
        actsparse.to_kernels(holder)
        mlp = holder.mlp
    path.write_bytes(lower(mlp, (captured["x"],)).buffer)
    x_path = path.with_suffix(".f32")
    captured["x"].numpy().tofile(x_path)
    return path, x_path


def _runner_ms(pte: Path, runs: int, x_path: Path | None = None) -> float:
    from edgesparse.devices.local import parse_runner_output
    from edgesparse.runtime_kernels import RUNNER

    if not RUNNER.is_file():
        raise EdgesparseError("the C++ runner is not built", hint="run `make kernels`")
    argv = [str(RUNNER), str(pte), "--runs", str(runs), "--warmup", str(max(3, runs // 10)), "--threads", "1"]
    if x_path is not None:
        argv += ["--input", str(x_path)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    return statistics.median(parse_runner_output(proc.stdout, proc.stderr, proc.returncode, pte.name, "in the C++ runner")["times_ms"])


def _interleaved(dense: tuple, sparse: tuple, rounds: int, runs: int, label: str) -> tuple[float, float, float]:
    """(ours ms, dense ms, dense / ours): medians over `rounds` alternating runner calls, each
    (pte[, input file])."""
    ours, base = [], []
    with _progress.status(f"timing {label} (C++ runner, {rounds} interleaved rounds)"):
        for _ in range(rounds):
            base.append(_runner_ms(dense[0], runs, *dense[1:]))
            ours.append(_runner_ms(sparse[0], runs, *sparse[1:]))
    return statistics.median(ours), statistics.median(base), statistics.median(base) / statistics.median(ours)


def _latency(dense: Path, sparse: Path, rounds: int, runs: int) -> dict:
    ours, base, speedup = _interleaved((dense,), (sparse,), rounds, runs, "decode steps")
    return {"ms_per_token": ours, "ms_per_token_dense": base, "speedup": speedup}


def _mlp_latency(dense: tuple[Path, Path], sparse: tuple[Path, Path], rounds: int, runs: int) -> dict:
    ours, base, speedup = _interleaved(dense, sparse, rounds, runs, f"layer {MLP_LAYER}'s MLP block")
    return {"mlp_ms": ours, "mlp_ms_dense": base, "mlp_speedup": speedup}


def to_markdown(rows: list[dict]) -> str:
    lines = ["| method | target | fine-tune steps | held-out sparsity | perplexity | vs dense | ms/token | dense ms/token | speedup | MLP block speedup |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fmt = lambda v, f: f.format(v) if v is not None else "-"  # noqa: E731
        lines.append(f"| {r['method']} | {r['target']:.0%} | {r['finetune_steps']} | {r['sparsity']:.1%} | {r['perplexity']:.2f} "
                     f"| {100 * (r['perplexity'] / r['perplexity_dense'] - 1):+.1f}% | {fmt(r.get('ms_per_token'), '{:.2f}')} "
                     f"| {fmt(r.get('ms_per_token_dense'), '{:.2f}')} | {fmt(r.get('speedup'), '{:.2f}x')} "
                     f"| {fmt(r.get('mlp_speedup'), '{:.2f}x')} |")
    return "\n".join(lines)
