"""MoE offload export: the backbone (embeddings, attention, norms, routers) plus one
memory-mappable blob per expert and a `moe.json` manifest, for the numpy runtime in
devices/moe_runtime.py. Verified in that runtime against eager torch before it is moved into place.

    export_moe_offload(load_model("demo:tiny-moe"), "out/moe", expert_budget=0.25, dtype="int8")

Layout (all little-endian, arrays 64-byte aligned; names, dtypes, shapes and offsets are in the
manifest, with each file's size and sha256):
    backbone.bin               fp32: tok_emb, per block ln1/attn q,k,v,o/ln2/router, ln_f
    expert-L{l}-E{e}.bin       one expert: [gate,] up, down weights (fp32, or int8 + one fp32
                               scale per output row), biases in fp32
    moe.json                   config, budget, calibration routing statistics (expert use and the
                               inter-layer affinity table P(expert at l+1 | expert at l)), the
                               predictor's mixing weight, verification numbers
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgesparse._io import staging_dir, write_json_atomic
from edgesparse.errors import EdgesparseError

FORMAT = "edgesparse-moe-offload"
VERSION = 1
DTYPES = ("fp32", "int8")
ALIGN = 64
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
_ACT_MODULES = {nn.ReLU: "relu", nn.SiLU: "silu"}


# ---------------------------------------------------------------------------------------------
# reading the model through the MoE interface


def _expert_parts(expert: nn.Module, where: str) -> tuple[str, dict[str, nn.Linear]]:
    """(activation name, {"gate"?, "up", "down": nn.Linear}) of one expert MLP."""
    from edgesparse.models.tiny_moe import ACTIVATIONS

    if isinstance(expert, nn.Sequential):
        mods = list(expert)
        if len(mods) == 3 and isinstance(mods[0], nn.Linear) and isinstance(mods[2], nn.Linear):
            act = _ACT_MODULES.get(type(mods[1]))
            if isinstance(mods[1], nn.GELU):
                act = "gelu_tanh" if mods[1].approximate == "tanh" else "gelu"
            if act:
                return act, {"up": mods[0], "down": mods[2]}
        raise EdgesparseError(f"{where}: an nn.Sequential expert must be (nn.Linear, nn.ReLU | nn.SiLU | nn.GELU, nn.Linear)")
    up, down, gate = getattr(expert, "up", None), getattr(expert, "down", None), getattr(expert, "gate", None)
    if not isinstance(up, nn.Linear) or not isinstance(down, nn.Linear) or not (gate is None or isinstance(gate, nn.Linear)):
        raise EdgesparseError(f"{where}: {type(expert).__name__} is not an expert MLP this exporter can read",
                              hint="give it nn.Linear `up` and `down` (and optional `gate`) plus an `activation` name, "
                                   "or make it nn.Sequential(Linear, activation, Linear)")
    act = getattr(expert, "activation", None)
    if act not in ACTIVATIONS:
        raise EdgesparseError(f"{where}: expert activation {act!r} is not one of {', '.join(ACTIVATIONS)}")
    parts = {"up": up, "down": down}
    if gate is not None:
        parts["gate"] = gate
    return act, parts


def moe_layers(model: nn.Module) -> list[dict]:
    """Per block: {router, top_k, experts: [(activation, parts)]}, checked against the interface."""
    from edgesparse.models.tiny_moe import TinyMoELM

    if not isinstance(model, TinyMoELM):
        raise EdgesparseError(f"MoE offload export needs a TinyMoELM ({type(model).__name__} given)",
                              hint="plug your MoE modules into edgesparse.models.tiny_moe.TinyMoELM(config, moe_factory=...)")
    d = model.config.d_model
    layers = []
    for i, block in enumerate(model.blocks):
        moe, where = block.moe, f"blocks.{i}.moe"
        router, experts, k = getattr(moe, "router", None), getattr(moe, "experts", None), getattr(moe, "top_k", None)
        if not isinstance(router, nn.Linear) or router.in_features != d:
            raise EdgesparseError(f"{where}: `router` must be nn.Linear({d}, n_experts)")
        if not isinstance(experts, nn.ModuleList) or len(experts) != router.out_features:
            raise EdgesparseError(f"{where}: `experts` must be an nn.ModuleList of {router.out_features} expert MLPs (one per router output)")
        if not isinstance(k, int) or not 1 <= k <= len(experts):
            raise EdgesparseError(f"{where}: `top_k` must be an int in [1, {len(experts)}], got {k!r}")
        parsed = []
        for e, expert in enumerate(experts):
            act, parts = _expert_parts(expert, f"{where}.experts.{e}")
            ff = parts["up"].out_features
            if parts["up"].in_features != d or parts["down"].in_features != ff or parts["down"].out_features != d or (
                    "gate" in parts and (parts["gate"].in_features, parts["gate"].out_features) != (d, ff)):
                raise EdgesparseError(f"{where}.experts.{e}: shapes do not chain d_model {d} -> d_ff -> {d}")
            parsed.append((act, parts))
        layers.append({"router": router, "top_k": k, "experts": parsed})
    return layers


# ---------------------------------------------------------------------------------------------
# blobs


def _f32(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to(torch.float32).cpu().numpy()).astype("<f4", copy=False)


def quantize_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one fp32 scale per output row: w ~= q * scale[:, None]."""
    amax = np.abs(w).max(axis=1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype("<f4")
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def pack(arrays: dict[str, np.ndarray]) -> tuple[bytes, dict]:
    """Concatenate arrays (each 64-byte aligned) -> (bytes, {name: {dtype, shape, offset}})."""
    out, layout, offset = bytearray(), {}, 0
    for name, a in arrays.items():
        pad = -offset % ALIGN
        out += b"\0" * pad
        offset += pad
        raw = np.ascontiguousarray(a).tobytes()
        layout[name] = {"dtype": a.dtype.str if a.dtype.itemsize > 1 else a.dtype.name, "shape": list(a.shape), "offset": offset}
        out += raw
        offset += len(raw)
    out += b"\0" * (-offset % ALIGN)  # whole 64-byte units: expert-sized slots in a runtime arena stay aligned
    return bytes(out), layout


def _write_blob(stage: Path, name: str, arrays: dict[str, np.ndarray]) -> dict:
    data, layout = pack(arrays)
    path = stage / name
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # clean pages: the page cache can be dropped for cold-start benchmarks
    return {"file": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "tensors": layout}


def _expert_arrays(act: str, parts: dict[str, nn.Linear], dtype: str) -> dict[str, np.ndarray]:
    arrays = {}
    for name in ("gate", "up", "down"):
        if name not in parts:
            continue
        w = _f32(parts[name].weight)
        if dtype == "int8":
            arrays[f"{name}.weight"], arrays[f"{name}.scale"] = quantize_rows(w)
        else:
            arrays[f"{name}.weight"] = w
        if parts[name].bias is not None:
            arrays[f"{name}.bias"] = _f32(parts[name].bias)
    return arrays


def _backbone_arrays(model: nn.Module, layers: list[dict]) -> dict[str, np.ndarray]:
    arrays = {"tok_emb.weight": _f32(model.tok_emb.weight)}
    for i, (block, layer) in enumerate(zip(model.blocks, layers)):
        p = f"blocks.{i}."
        arrays[p + "ln1.weight"], arrays[p + "ln1.bias"] = _f32(block.ln1.weight), _f32(block.ln1.bias)
        for name in ("q", "k", "v", "o"):
            arrays[p + f"attn.{name}.weight"] = _f32(getattr(block.attn, name).weight)
        arrays[p + "ln2.weight"], arrays[p + "ln2.bias"] = _f32(block.ln2.weight), _f32(block.ln2.bias)
        arrays[p + "router.weight"] = _f32(layer["router"].weight)
        if layer["router"].bias is not None:
            arrays[p + "router.bias"] = _f32(layer["router"].bias)
    arrays["ln_f.weight"], arrays["ln_f.bias"] = _f32(model.ln_f.weight), _f32(model.ln_f.bias)
    return arrays


# ---------------------------------------------------------------------------------------------
# routing statistics from calibration text


@torch.no_grad()
def routing_trace(model: nn.Module, layers: list[dict], ids: torch.Tensor) -> list[dict]:
    """Per layer, for every calibration token: the residual stream entering the MoE
    (`hidden`), the chosen experts and their gates, by the interface's routing rule."""
    from edgesparse.models.tiny_moe import route

    ctx = model.config.context
    trace = [{"hidden": [], "chosen": [], "gates": []} for _ in layers]
    handles = []
    for i, block in enumerate(model.blocks):
        def hook(module, args, out, i=i):
            d = out.shape[-1]
            idx, gates = route(layers[i]["router"](out.reshape(-1, d)), layers[i]["top_k"])
            trace[i]["hidden"].append(args[0].reshape(-1, d))
            trace[i]["chosen"].append(idx)
            trace[i]["gates"].append(gates)
        handles.append(block.ln2.register_forward_hook(hook))
    model.eval()
    try:
        for start in range(0, len(ids), ctx):
            model(ids[None, start:start + ctx])
    finally:
        for h in handles:
            h.remove()
    return [{k: torch.cat(v) for k, v in t.items()} for t in trace]


def affinity_tables(trace: list[dict], n_experts: list[int], rows: slice = slice(None)) -> list[np.ndarray]:
    """P(expert e' at l+1 | expert e at l), counted over each token's top-k x top-k pairs;
    a row never seen is uniform."""
    tables = []
    for l in range(len(trace) - 1):
        counts = np.zeros((n_experts[l], n_experts[l + 1]))
        a, b = trace[l]["chosen"][rows].numpy(), trace[l + 1]["chosen"][rows].numpy()
        for i in range(a.shape[1]):
            for j in range(b.shape[1]):
                np.add.at(counts, (a[:, i], b[:, j]), 1)
        sums = counts.sum(axis=1, keepdims=True)
        tables.append(np.where(sums > 0, counts / np.maximum(sums, 1), 1.0 / n_experts[l + 1]))
    return tables


@torch.no_grad()
def predictor_recall(model: nn.Module, layers: list[dict], trace: list[dict], tables: list[np.ndarray],
                     rows: slice, alpha: float) -> float:
    """Share of layer l+1's chosen experts among the predictor's top-k (layer l+1's router on
    the hidden state entering layer l's MoE, mixed with the affinity row of layer l's experts)."""
    hit = total = 0
    for l in range(len(layers) - 1):
        k = layers[l + 1]["top_k"]
        hidden = trace[l]["hidden"][rows]
        probs = torch.softmax(layers[l + 1]["router"](model.blocks[l + 1].ln2(hidden)), -1).double()
        table = torch.from_numpy(tables[l])
        chosen, gates = trace[l]["chosen"][rows], trace[l]["gates"][rows].double()
        affinity = (gates[:, :, None] * table[chosen]).sum(1)
        guess = torch.topk(alpha * probs + (1 - alpha) * affinity, k, dim=-1).indices
        actual = trace[l + 1]["chosen"][rows]
        hit += int((guess[:, :, None] == actual[:, None, :]).any(-1).sum())
        total += actual.numel()
    return hit / max(total, 1)


# ---------------------------------------------------------------------------------------------
# the export


def _resolve(model_or_bundle) -> tuple[nn.Module, str]:
    from edgesparse.models import ModelBundle

    if isinstance(model_or_bundle, ModelBundle):
        return model_or_bundle.model, model_or_bundle.name
    if isinstance(model_or_bundle, nn.Module):
        return model_or_bundle, type(model_or_bundle).__name__
    raise EdgesparseError(f"export_moe_offload needs a model or ModelBundle, not {type(model_or_bundle).__name__}")


def export_moe_offload(model_or_bundle, out_dir, expert_budget: float = 0.25, dtype: str = "fp32",
                       calib_text: str | None = None, calib_bytes: int = 8192, sample_prompt: str | None = None,
                       verify_tokens: int = 48) -> dict:
    """Write `out_dir/moe.json`, `backbone.bin` and one `expert-L{l}-E{e}.bin` per expert,
    verified in the numpy runtime against torch, atomically (staging folder, then moved).
    Returns the manifest. `expert_budget` is the runtime's default fraction of expert bytes
    resident; `calib_text` (default: a training play) drives the routing statistics."""
    from edgesparse.devices.moe_runtime import check_budget
    from edgesparse.models import tiny_moe

    model, name = _resolve(model_or_bundle)
    if dtype not in DTYPES:
        raise EdgesparseError(f"unknown expert dtype {dtype!r} (available: {', '.join(DTYPES)})")
    check_budget(expert_budget)
    model.eval()
    layers = moe_layers(model)
    cfg = model.config
    text = calib_text if calib_text is not None else tiny_moe.calibration_text(calib_bytes)
    ids = tiny_moe.encode(text)[:calib_bytes]
    if len(ids) < 64:
        raise EdgesparseError(f"calibration text too short: {len(ids)} bytes (need >= 64)")
    trace = routing_trace(model, layers, ids)
    n_experts = [len(layer["experts"]) for layer in layers]
    half = slice(0, len(ids) // 2), slice(len(ids) // 2, None)
    fit_tables = affinity_tables(trace, n_experts, half[0])
    recall = {str(a): round(predictor_recall(model, layers, trace, fit_tables, half[1], a), 4) for a in ALPHAS} if len(layers) > 1 else {}
    alpha = max(ALPHAS, key=lambda a: (recall.get(str(a), 0), a)) if recall else 1.0
    tables = affinity_tables(trace, n_experts)
    usage = [torch.bincount(t["chosen"].flatten(), minlength=n).tolist() for t, n in zip(trace, n_experts)]
    prompt = sample_prompt if sample_prompt is not None else text[:32]

    out_dir = Path(out_dir)
    with staging_dir(out_dir) as stage:
        backbone = _write_blob(stage, "backbone.bin", _backbone_arrays(model, layers))
        experts = []
        for l, layer in enumerate(layers):
            row = []
            for e, (act, parts) in enumerate(layer["experts"]):
                spec = _write_blob(stage, f"expert-L{l}-E{e}.bin", _expert_arrays(act, parts, dtype))
                spec["activation"] = act
                row.append(spec)
            experts.append(row)
        total = sum(s["bytes"] for row in experts for s in row)
        # the runtime gives each layer floor(budget x its expert bytes)
        budget_bytes = total if expert_budget >= 1 else sum(math.floor(expert_budget * sum(s["bytes"] for s in row)) for row in experts)
        manifest = {
            "format": FORMAT, "version": VERSION, "model": name, "dtype": dtype,
            "config": {"vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "n_layers": cfg.n_layers,
                       "n_heads": cfg.n_heads, "rope_base": cfg.rope_base, "norm_eps": cfg.norm_eps,
                       "context": cfg.context, "top_k": [layer["top_k"] for layer in layers], "n_experts": n_experts},
            "tokenizer": "utf-8 bytes",
            "budget": float(expert_budget), "budget_bytes": int(budget_bytes),
            "expert_bytes_total": total, "backbone_bytes": backbone["bytes"],
            "backbone": backbone, "experts": experts,
            "calibration": {"bytes": len(ids), "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
                            "expert_usage": usage},
            "affinity": [t.round(6).tolist() for t in tables],
            "predictor": {"alpha": alpha, "top_k_recall_by_alpha": recall,
                          "how": "alpha * softmax(router[l+1](ln2[l+1](h))) + (1 - alpha) * sum_i gate_i * affinity[l][e_i]; "
                                 "recall measured on the second half of the calibration text with tables fitted on the first"},
            "sample_prompt": prompt,
        }
        write_json_atomic(stage / "moe.json", manifest)
        manifest["verification"] = _verify(model, stage, dtype, ids, prompt, verify_tokens, expert_budget)
        write_json_atomic(stage / "moe.json", manifest)
    return manifest


@torch.no_grad()
def _verify(model: nn.Module, stage: Path, dtype: str, ids: torch.Tensor, prompt: str, tokens: int, budget: float) -> dict:
    """The staged export in the numpy runtime vs eager torch: teacher-forced logits on 256
    calibration bytes with every expert resident (fp32 within 1e-4 x the logit scale; int8
    cosine >= 0.999), the same at the export's budget with prediction on (identical bit for bit),
    and greedy tokens from the sample prompt (fp32: identical)."""
    from edgesparse.converters.verify import check
    from edgesparse.devices.moe_runtime import MoERuntime
    from edgesparse.models.tiny_moe import encode, generate

    probe = ids[:256]
    reference = model(probe[None])[0]
    runs = []
    for policy, b in (("lru", 1.0), ("predictive", budget)):
        with MoERuntime(stage, policy=policy, budget=b) as rt:
            runs.append(np.stack([rt.step(int(t)) for t in probe]))
    quantized = dtype == "int8"
    metrics = check([reference], [torch.from_numpy(runs[0])], quantized)
    identical = bool(np.array_equal(runs[0], runs[1]))
    targets = probe[1:]
    bits = lambda logits: float(torch.nn.functional.cross_entropy(logits[:-1], targets)) / math.log(2)  # noqa: E731
    prompt_ids = encode(prompt)
    want, _ = generate(model, prompt_ids, tokens)
    with MoERuntime(stage, policy="lru", budget=1.0) as rt:
        got = rt.generate(prompt_ids.tolist(), tokens)[0]
    mismatch = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), None)
    ok = metrics["verified"] and identical and (quantized or mismatch is None)
    result = {**metrics, "teacher_forced_bytes": len(probe),
              "bits_per_byte_torch": round(bits(reference), 4), "bits_per_byte_runtime": round(bits(torch.from_numpy(runs[0])), 4),
              "offloaded_identical_to_resident": identical, "greedy_tokens": tokens,
              "greedy_first_mismatch": mismatch, "verified": ok}
    if not ok:
        why = ("offloaded logits differ from all-resident ones" if not identical else
               f"greedy tokens diverge from torch at token {mismatch}" if metrics["verified"] else
               f"logits differ from torch (max abs error {metrics['max_abs_error']:.3g}, cosine {metrics['cosine']:.6f})")
        raise EdgesparseError(f"the offloaded model does not match torch: {why}",
                              hint="a custom MoE module must follow the interface: top-k experts by router logit, "
                                   "weighted by a softmax over those k logits")
    return result
