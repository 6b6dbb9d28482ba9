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


# ---- activation sparsity on int8 weights (issue 15 item 3) ----

def bench_int8(method: str = "chess", target: float = 0.5, rounds: int = 5, runs: int = 20,
               calib_tokens: int = 4096, decode: bool = True) -> list[dict]:
    """Rows for int8 weights with activation sparsity on SmolLM2-135M, C++ runner, interleaved,
    medians, at 1 thread (taskset -c 0) and all cores: layer MLP_LAYER's MLP block (ours fp32 vs
    XNNPACK fp32; ours int8 vs XNNPACK int8-dynamic) and, with `decode`, the whole decode step
    (int8-dynamic with `method` at `target` on our int8 ops vs dense int8-dynamic)."""
    import os

    from edgesparse.models import smollm2
    from edgesparse.quantize import quantize
    from edgesparse.recipe import QuantConfig

    torch.set_num_threads(1)
    model, tokenizer = smollm2.load()
    heldout = smollm2.heldout_chunks(tokenizer)
    calib = smollm2.calibration_chunks(tokenizer, calib_tokens)
    sparse = copy.deepcopy(model)
    actsparse.apply(sparse, actsparse.calibrate(sparse, calib, method, target))
    measured = actsparse.measured_sparsity(sparse, heldout)
    held_sparsity = sum(measured.values()) / len(measured)
    cfg = QuantConfig(mode="int8-dynamic")
    cores = {"1 thread": ["taskset", "-c", "0"], f"all {os.cpu_count()} cores": []}
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgesparse-bench-") as tmp:
        folder = Path(tmp)
        x = _mlp_input(model, heldout)
        x_path = folder / "x.f32"
        x.numpy().tofile(x_path)
        mlps = {
            "xnnpack fp32": model.model.layers[MLP_LAYER].mlp,
            "ours fp32": _swapped_mlp(sparse, int8=False),
            "xnnpack int8": quantize(copy.deepcopy(model.model.layers[MLP_LAYER].mlp), cfg, (x,), wrapped=True)[0],
            "ours int8": _swapped_mlp(sparse, int8=True),
        }
        ptes = {}
        for name, mlp in mlps.items():
            from edgesparse.converters.executorch import lower

            ptes[name] = folder / f"mlp-{name.replace(' ', '-')}.pte"
            ptes[name].write_bytes(lower(mlp.eval(), (x,)).buffer)
        for label, prefix in cores.items():
            for base, ours in (("xnnpack fp32", "ours fp32"), ("xnnpack int8", "ours int8")):
                o, b, s = _interleaved_on(prefix, (ptes[base], x_path), (ptes[ours], x_path), rounds, runs * 20,
                                          f"MLP block {ours} vs {base} ({label})")
                rows.append({"what": f"MLP block (layer {MLP_LAYER}, 576->1536->576)", "ours": ours, "baseline": base,
                             "threads": label, "method": method, "sparsity": held_sparsity, "ours_ms": o,
                             "baseline_ms": b, "speedup": s})
        if decode:
            from edgesparse.converters.executorch import lower
            from edgesparse.models.smollm2 import decode_step

            prompt = tokenizer("The", return_tensors="pt").input_ids
            dense_q = quantize(copy.deepcopy(model), cfg, (prompt,), wrapped=True)[0]
            ours_q = copy.deepcopy(sparse)
            actsparse.to_kernels(ours_q, int8=True)
            ours_q = quantize(ours_q, cfg, (prompt,), wrapped=True)[0]
            decode_ptes = {}
            for name, m in (("dense int8", dense_q), ("ours int8", ours_q)):
                step, example, _ = decode_step(m, prompt)
                decode_ptes[name] = folder / f"decode-{name.replace(' ', '-')}.pte"
                with _progress.status(f"exporting the {name} decode step (a few minutes)"):
                    decode_ptes[name].write_bytes(lower(step, example).buffer)
            with _progress.status("perplexity of the int8 act-sparse model"):
                ppl_ours, ppl_dense = smollm2.perplexity(ours_q, heldout), smollm2.perplexity(dense_q, heldout)
            for label, prefix in cores.items():
                o, b, s = _interleaved_on(prefix, (decode_ptes["dense int8"],), (decode_ptes["ours int8"],), rounds, runs,
                                          f"decode steps ({label})")
                rows.append({"what": "decode step (SmolLM2-135M, static KV cache)", "ours": f"int8 + {method} on our ops",
                             "baseline": "dense int8-dynamic (XNNPACK)", "threads": label, "method": method,
                             "sparsity": held_sparsity, "ours_ms": o, "baseline_ms": b, "speedup": s,
                             "perplexity": ppl_ours, "perplexity_baseline": ppl_dense})
    return rows


def _mlp_input(model, heldout) -> torch.Tensor:
    layer = model.model.layers[MLP_LAYER]
    captured = {}
    handle = layer.mlp.register_forward_pre_hook(lambda mod, args: captured.setdefault("x", args[0][0, 100:101].clone()))
    with torch.no_grad():
        model(heldout[0])
    handle.remove()
    return captured["x"]


def _swapped_mlp(model, int8: bool):
    holder = torch.nn.Module()
    holder.mlp = copy.deepcopy(model.model.layers[MLP_LAYER].mlp)
    actsparse.to_kernels(holder, int8=int8)
    return holder.mlp


def _interleaved_on(prefix: list[str], dense: tuple, sparse: tuple, rounds: int, runs: int, label: str):
    """_interleaved with the runner started under `prefix` (e.g. taskset -c 0)."""
    import os

    from edgesparse.devices.local import parse_runner_output
    from edgesparse.runtime_kernels import RUNNER

    def once(pte: Path, x_path: Path | None = None) -> float:
        argv = [*prefix, str(RUNNER), str(pte), "--runs", str(runs), "--warmup", str(max(3, runs // 10)),
                "--threads", "1" if prefix else str(os.cpu_count())]  # pinned: one pool thread; else one per core
        if x_path is not None:
            argv += ["--input", str(x_path)]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=900)
        return statistics.median(parse_runner_output(proc.stdout, proc.stderr, proc.returncode, pte.name, "in the C++ runner")["times_ms"])

    ours, base = [], []
    with _progress.status(f"timing {label} (C++ runner, {rounds} interleaved rounds)"):
        for _ in range(rounds):
            base.append(once(*dense))
            ours.append(once(*sparse))
    return statistics.median(ours), statistics.median(base), statistics.median(base) / statistics.median(ours)


def int8_markdown(rows: list[dict]) -> str:
    lines = ["| what | ours | baseline | threads | sparsity | ours ms | baseline ms | speedup |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['what']} | {r['ours']} | {r['baseline']} | {r['threads']} | {r['sparsity']:.1%} | {r['ours_ms']:.3f} "
                     f"| {r['baseline_ms']:.3f} | {r['speedup']:.2f}x |")
    return "\n".join(lines)


def bench_int8_mlp_shape(rounds: int = 5, runs: int = 300, inp: int = 576, hidden: int = 1536, target: float = 0.5) -> list[dict]:
    """The MLP-block rows of bench_int8 without loading SmolLM2: a random SwiGLU MLP of its shape,
    one token, the CATS threshold at the `target` quantile of this token's |SiLU(gate x)|; ours
    (fp32 and int8 weights) against XNNPACK's dense fp32 and int8-dynamic (8da8w) MLP, C++ runner,
    interleaved, medians, 1 thread (taskset -c 0) and all cores."""
    import os

    import torch.nn.functional as F

    from edgesparse.converters.executorch import lower
    from edgesparse.quantize import quantize
    from edgesparse.recipe import QuantConfig
    from edgesparse.runtime_kernels.modules import ActSparseGatedMLP, QActSparseGatedMLP

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj = torch.nn.Linear(inp, hidden, bias=False), torch.nn.Linear(inp, hidden, bias=False)
            self.down_proj = torch.nn.Linear(hidden, inp, bias=False)

        def forward(self, x):
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    torch.manual_seed(0)
    mlp, x = MLP().eval(), torch.randn(1, inp)
    with torch.no_grad():
        threshold = float(F.silu(mlp.gate_proj(x)).abs().quantile(target))
    parts = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgesparse-bench-") as tmp:
        folder = Path(tmp)
        x_path = folder / "x.f32"
        x.numpy().tofile(x_path)
        modules = {"xnnpack fp32": mlp, "ours fp32": ActSparseGatedMLP(*parts, threshold),
                   "xnnpack int8": quantize(copy.deepcopy(mlp), QuantConfig(mode="int8-dynamic"), (x,), wrapped=True)[0],
                   "ours int8": QActSparseGatedMLP(*parts, threshold)}
        ptes = {}
        for name, module in modules.items():
            ptes[name] = folder / f"{name.replace(' ', '-')}.pte"
            ptes[name].write_bytes(lower(module.eval(), (x,)).buffer)
        for label, prefix in (("1 thread", ["taskset", "-c", "0"]), (f"all {os.cpu_count()} cores", [])):
            for base, ours in (("xnnpack fp32", "ours fp32"), ("xnnpack int8", "ours int8")):
                o, b, s = _interleaved_on(prefix, (ptes[base], x_path), (ptes[ours], x_path), rounds, runs, f"{ours} vs {base} ({label})")
                rows.append({"what": f"MLP block {inp}->{hidden}->{inp} (random, one token)", "ours": ours, "baseline": base,
                             "threads": label, "method": "cats", "sparsity": target, "ours_ms": o, "baseline_ms": b, "speedup": s})
    return rows
