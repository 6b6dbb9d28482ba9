"""Retrain demo:tiny-moe and rewrite its committed weights (edgesparse/models/weights/tiny-moe.pt).

    python -m edgesparse.models.train_tiny_moe                 # the committed run: 2000 steps, 1 thread
    python -m edgesparse.models.train_tiny_moe --steps 200 --out /tmp/quick.pt

Seeded: the same command on the same machine and torch build gives the same weights (one
thread; other thread counts change floating-point summation order, not the outcome's quality).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from edgesparse.models import tiny_moe


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 leaves a core free on a 2-core machine)")
    ap.add_argument("--out", type=Path, default=tiny_moe.WEIGHTS)
    args = ap.parse_args(argv)

    cfg = tiny_moe.TinyMoEConfig()
    train_text, held_out = tiny_moe.corpus()
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    started = time.perf_counter()
    model, rows = tiny_moe.train(cfg, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
                                 threads=args.threads, text=train_text, log=log)
    train_s = time.perf_counter() - started

    # Score the fp16 weights that get committed, not the fp32 ones still in memory.
    half = tiny_moe.TinyMoELM(cfg)
    half.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    half.eval()
    log("scoring held-out Hamlet ...")
    held_ids = tiny_moe.encode(held_out)
    bpb = tiny_moe.bits_per_byte(half, held_ids)
    calib_bpb = tiny_moe.bits_per_byte(half, tiny_moe.calibration_text(65536))
    load = tiny_moe.expert_load(half, held_ids[:65536])
    params = sum(p.numel() for p in half.parameters())
    expert_params = sum(p.numel() for b in half.blocks for p in b.moe.experts.parameters())
    meta = {
        "steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed, "threads": args.threads,
        "tokens_seen": args.steps * args.batch * cfg.context, "train_bytes": len(train_text.encode()),
        "train_seconds": round(train_s, 1), "held_out": list(tiny_moe.HELD_OUT), "held_out_bytes": len(held_ids),
        "heldout_bits_per_byte": round(bpb, 4), "heldout_perplexity_per_byte": round(2 ** bpb, 3),
        "calib_play_bits_per_byte": round(calib_bpb, 4),
        "params": params, "expert_params": expert_params,
        "expert_load_heldout_64k": load, "final_loss": rows[-1]["loss"], "log": rows,
        "torch": str(torch.__version__), "machine": platform.machine(),
    }
    tiny_moe.save_weights(half, args.out, meta)
    summary = {k: v for k, v in meta.items() if k != "log"}
    summary["weights"] = str(args.out)
    summary["weights_bytes"] = args.out.stat().st_size
    print(json.dumps(summary, indent=2))
    shares = [[round(n / max(1, sum(layer)), 3) for n in layer] for layer in load]
    log(f"held-out Hamlet: {bpb:.3f} bits/byte (perplexity {2 ** bpb:.2f} per byte, {math.log(2) * bpb:.3f} nats); "
        f"expert shares per layer: {shares}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
